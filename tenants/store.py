"""Tenant, API-key and provider-configuration records in PostgreSQL.

Every change that other processes must see (a provider configuration set or
deleted, a key revoked, a tenant disabled or enabled) sends
``NOTIFY switchboard_tenant_changes, '<tenant id>'`` in the same transaction,
so it is delivered exactly when the change commits (see tenants/invalidation.py).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from switchboard.db.pool import Connection
from tenants.api_keys import NewApiKey, ParsedApiKey, generate_api_key, secret_matches

#: A tenant name (``fullmatch``); the same rule as the ``tenants.name`` CHECK constraint.
TENANT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: The rule in words, for error messages.
TENANT_NAME_RULE = "tenant names are 1-63 of a-z 0-9 '-', starting with a letter or digit"

#: The NOTIFY channel carrying the id of a tenant whose keys, state or providers changed.
TENANT_CHANGES_CHANNEL = "switchboard_tenant_changes"

_TENANT_COLUMNS = """id, name, display_name, created_at, updated_at, disabled_at,
                     max_delivery_attempts, max_delivery_age_seconds, requests_per_second, burst"""


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits; 0 means the gateway default."""

    max_delivery_attempts: int = 0
    max_delivery_age_seconds: int = 0
    requests_per_second: int = 0
    burst: int = 0


@dataclass(frozen=True)
class Tenant:
    """A tenant row."""

    id: uuid.UUID
    name: str
    display_name: str
    created_at: datetime
    updated_at: datetime
    disabled_at: datetime | None
    limits: TenantLimits


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key row, without anything secret."""

    id: str
    tenant_id: uuid.UUID
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class StoredProviderConfig:
    """A provider configuration row: settings in clear, secrets sealed."""

    tenant_id: uuid.UUID
    channel: str
    provider: str
    settings: dict[str, Any]
    secret_fields: list[str]
    key_id: str
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    secret_fingerprint: str
    updated_at: datetime


class TenantExists(Exception):
    """Raised when a tenant name is already taken."""


@dataclass(frozen=True)
class KeyLookup:
    """The outcome of looking up a presented API key.

    ``tenant_id`` is set only when the key exists, matches and is not revoked;
    ``tenant_disabled`` tells a valid key of a disabled tenant apart.
    """

    tenant_id: uuid.UUID | None
    tenant_disabled: bool = False
    key_id: str | None = None
    requests_per_second: int = 0
    burst: int = 0


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(
        id=row["id"],
        name=row["name"],
        display_name=row["display_name"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        disabled_at=row["disabled_at"],
        limits=TenantLimits(
            row["max_delivery_attempts"],
            row["max_delivery_age_seconds"],
            row["requests_per_second"],
            row["burst"],
        ),
    )


async def notify_tenant_changed(conn: Connection, tenant_id: uuid.UUID) -> None:
    """Queue the change notification for ``tenant_id`` (sent at commit)."""
    await conn.execute("SELECT pg_notify($1, $2)", TENANT_CHANGES_CHANNEL, str(tenant_id))


async def create_tenant(
    conn: Connection, name: str, display_name: str = "", limits: TenantLimits | None = None
) -> Tenant:
    """Insert a tenant named ``name`` (lowercase letters, digits, '-'; at most 63).

    Raises ``TenantExists`` if the name is taken and ``ValueError`` if it is malformed.
    """
    limits = limits or TenantLimits()
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO tenants (id, name, display_name, max_delivery_attempts, max_delivery_age_seconds,
                                    requests_per_second, burst)
                VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_TENANT_COLUMNS}""",
            uuid.uuid4(),
            name,
            display_name,
            limits.max_delivery_attempts,
            limits.max_delivery_age_seconds,
            limits.requests_per_second,
            limits.burst,
        )
    except asyncpg.UniqueViolationError:
        raise TenantExists(f"a tenant named {name!r} already exists") from None
    except asyncpg.CheckViolationError:
        raise ValueError(TENANT_NAME_RULE) from None
    assert row is not None
    return _tenant(row)


async def get_tenant(conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID) -> Tenant | None:
    """The tenant ``tenant_id``, or ``None``."""
    row = await conn.fetchrow(f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE id = $1", tenant_id)
    return _tenant(row) if row else None


async def get_tenant_by_name(conn: Connection, name: str) -> Tenant | None:
    """The tenant named ``name``, or ``None``."""
    row = await conn.fetchrow(f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE name = $1", name)
    return _tenant(row) if row else None


def encode_page_token(created_at: datetime, tenant_id: uuid.UUID) -> str:
    """An opaque AIP-158 page token for "after this tenant"."""
    raw = json.dumps([created_at.isoformat(), str(tenant_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    """Inverse of :func:`encode_page_token`; raises ``ValueError`` for a token we did not issue."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, tenant = json.loads(raw)
        return datetime.fromisoformat(created), uuid.UUID(tenant)
    except (ValueError, TypeError) as exc:
        raise ValueError("not a page token from a previous ListTenants answer") from exc


async def list_tenants(
    conn: Connection | asyncpg.Pool, page_size: int, after: tuple[datetime, uuid.UUID] | None
) -> tuple[list[Tenant], tuple[datetime, uuid.UUID] | None]:
    """One page of tenants, oldest first, and the cursor for the next page (``None`` on the last)."""
    if after is None:
        rows = await conn.fetch(
            f"SELECT {_TENANT_COLUMNS} FROM tenants ORDER BY created_at, id LIMIT $1", page_size + 1
        )
    else:
        rows = await conn.fetch(
            f"""SELECT {_TENANT_COLUMNS} FROM tenants WHERE (created_at, id) > ($1, $2)
                ORDER BY created_at, id LIMIT $3""",
            after[0],
            after[1],
            page_size + 1,
        )
    tenants = [_tenant(r) for r in rows[:page_size]]
    more = len(rows) > page_size
    return tenants, ((tenants[-1].created_at, tenants[-1].id) if more and tenants else None)


async def update_tenant(
    conn: Connection, tenant_id: uuid.UUID, *, display_name: str | None, limits: dict[str, int]
) -> Tenant | None:
    """Set ``display_name`` (if not ``None``) and the given limit columns; ``None`` if no such tenant."""
    sets, args = ["updated_at = now()"], [tenant_id]
    if display_name is not None:
        args.append(display_name)  # type: ignore[arg-type]
        sets.append(f"display_name = ${len(args)}")
    for column, value in limits.items():
        assert column in TenantLimits.__dataclass_fields__
        args.append(value)  # type: ignore[arg-type]
        sets.append(f"{column} = ${len(args)}")
    row = await conn.fetchrow(
        f"UPDATE tenants SET {', '.join(sets)} WHERE id = $1 RETURNING {_TENANT_COLUMNS}",
        *args,
    )
    if row is not None:
        await notify_tenant_changed(conn, tenant_id)
    return _tenant(row) if row else None


async def set_tenant_disabled(conn: Connection, tenant_id: uuid.UUID, disabled: bool) -> Tenant | None:
    """Disable or enable a tenant (and tell every process); ``None`` if no such tenant."""
    row = await conn.fetchrow(
        f"""UPDATE tenants SET disabled_at = CASE WHEN $2 THEN coalesce(disabled_at, now()) END,
                               updated_at = now()
             WHERE id = $1 RETURNING {_TENANT_COLUMNS}""",
        tenant_id,
        disabled,
    )
    if row is not None:
        await notify_tenant_changed(conn, tenant_id)
    return _tenant(row) if row else None


async def create_api_key(conn: Connection, tenant_id: uuid.UUID) -> NewApiKey:
    """Generate a key for ``tenant_id`` and store its id and hash; the token is returned once."""
    key = generate_api_key()
    await conn.execute(
        "INSERT INTO api_keys (id, tenant_id, prefix, secret_sha256) VALUES ($1, $2, $3, $4)",
        key.key_id,
        tenant_id,
        key.display_prefix,
        key.secret_sha256,
    )
    return key


_KEY_COLUMNS = "id, tenant_id, prefix, created_at, last_used_at, revoked_at"


async def get_api_key(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID, key_id: str
) -> ApiKeyRecord | None:
    """Key ``key_id`` of ``tenant_id`` (another tenant's key is ``None``)."""
    row = await conn.fetchrow(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = $1 AND tenant_id = $2", key_id, tenant_id
    )
    return ApiKeyRecord(**dict(row)) if row else None


async def list_api_keys(conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID) -> list[ApiKeyRecord]:
    """The tenant's keys, newest first."""
    rows = await conn.fetch(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC, id", tenant_id
    )
    return [ApiKeyRecord(**dict(r)) for r in rows]


async def revoke_api_key(conn: Connection, tenant_id: uuid.UUID, key_id: str) -> ApiKeyRecord | None:
    """Revoke (idempotently) and tell every process; ``None`` if the tenant has no such key."""
    row = await conn.fetchrow(
        f"""UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
             WHERE id = $1 AND tenant_id = $2 RETURNING {_KEY_COLUMNS}""",
        key_id,
        tenant_id,
    )
    if row is not None:
        await notify_tenant_changed(conn, tenant_id)
    return ApiKeyRecord(**dict(row)) if row else None


async def lookup_api_key(conn: Connection | asyncpg.Pool, presented: ParsedApiKey) -> KeyLookup:
    """Resolve a presented key to its tenant (constant-time secret comparison)."""
    row = await conn.fetchrow(
        """SELECT k.tenant_id, k.secret_sha256, k.revoked_at, t.disabled_at, t.requests_per_second, t.burst
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
            WHERE k.id = $1""",
        presented.key_id,
    )
    if row is None or not secret_matches(presented, row["secret_sha256"]) or row["revoked_at"] is not None:
        return KeyLookup(tenant_id=None)
    return KeyLookup(
        tenant_id=row["tenant_id"],
        tenant_disabled=row["disabled_at"] is not None,
        key_id=presented.key_id,
        requests_per_second=row["requests_per_second"],
        burst=row["burst"],
    )


async def touch_api_key(conn: Connection | asyncpg.Pool, key_id: str) -> None:
    """Record a use of ``key_id`` (at most one write per key per minute)."""
    await conn.execute(
        """UPDATE api_keys SET last_used_at = now()
            WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')""",
        key_id,
    )


_CONFIG_COLUMNS = """tenant_id, channel, provider, settings, secret_fields, key_id, nonce, ciphertext,
                     secret_fingerprint, updated_at"""


def _config(row: asyncpg.Record) -> StoredProviderConfig:
    values = dict(row)
    values["settings"] = json.loads(values["settings"])
    values["secret_fields"] = list(values["secret_fields"])
    return StoredProviderConfig(**values)


async def upsert_provider_config(conn: Connection, config: StoredProviderConfig) -> StoredProviderConfig:
    """Create or replace the configuration of (tenant, channel) and tell every process."""
    row = await conn.fetchrow(
        f"""INSERT INTO provider_configs (tenant_id, channel, provider, settings, secret_fields, key_id,
                                          nonce, ciphertext, secret_fingerprint)
            VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9)
            ON CONFLICT (tenant_id, channel) DO UPDATE SET
                provider = excluded.provider, settings = excluded.settings,
                secret_fields = excluded.secret_fields, key_id = excluded.key_id, nonce = excluded.nonce,
                ciphertext = excluded.ciphertext, secret_fingerprint = excluded.secret_fingerprint,
                updated_at = now()
            RETURNING {_CONFIG_COLUMNS}""",
        config.tenant_id,
        config.channel,
        config.provider,
        json.dumps(config.settings),
        config.secret_fields,
        config.key_id,
        config.nonce,
        config.ciphertext,
        config.secret_fingerprint,
    )
    assert row is not None
    await notify_tenant_changed(conn, config.tenant_id)
    return _config(row)


async def get_provider_config(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID, channel: str
) -> StoredProviderConfig | None:
    """The configuration of (tenant, channel), or ``None``."""
    row = await conn.fetchrow(
        f"SELECT {_CONFIG_COLUMNS} FROM provider_configs WHERE tenant_id = $1 AND channel = $2",
        tenant_id,
        channel,
    )
    return _config(row) if row else None


async def list_provider_configs(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID
) -> list[StoredProviderConfig]:
    """Every configuration of the tenant, by channel."""
    rows = await conn.fetch(
        f"SELECT {_CONFIG_COLUMNS} FROM provider_configs WHERE tenant_id = $1 ORDER BY channel", tenant_id
    )
    return [_config(r) for r in rows]


async def delete_provider_config(conn: Connection, tenant_id: uuid.UUID, channel: str) -> bool:
    """Delete the configuration of (tenant, channel); ``False`` if there was none."""
    deleted = await conn.fetchval(
        "DELETE FROM provider_configs WHERE tenant_id = $1 AND channel = $2 RETURNING true",
        tenant_id,
        channel,
    )
    if deleted:
        await notify_tenant_changed(conn, tenant_id)
    return bool(deleted)
