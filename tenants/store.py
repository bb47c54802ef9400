"""Tenant and API-key records in PostgreSQL.

The full admin API (TenantAdminService) is a later issue; this module holds the
queries the CLI and the gateway need now.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from switchboard.db.pool import Connection
from tenants.api_keys import NewApiKey, ParsedApiKey, generate_api_key, secret_matches


@dataclass(frozen=True)
class Tenant:
    """A tenant row."""

    id: uuid.UUID
    name: str
    display_name: str
    created_at: datetime
    disabled_at: datetime | None


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


async def create_tenant(conn: Connection, name: str, display_name: str = "") -> Tenant:
    """Insert a tenant named ``name`` (lowercase letters, digits, '-'; at most 63).

    Raises ``TenantExists`` if the name is taken and ``ValueError`` if it is malformed.
    """
    try:
        row = await conn.fetchrow(
            """INSERT INTO tenants (id, name, display_name) VALUES ($1, $2, $3)
               RETURNING id, name, display_name, created_at, disabled_at""",
            uuid.uuid4(),
            name,
            display_name,
        )
    except asyncpg.UniqueViolationError:
        raise TenantExists(f"a tenant named {name!r} already exists") from None
    except asyncpg.CheckViolationError:
        raise ValueError("tenant names are 1-63 of a-z 0-9 '-', starting with a letter or digit") from None
    assert row is not None
    return Tenant(**dict(row))


async def get_tenant_by_name(conn: Connection, name: str) -> Tenant | None:
    """The tenant named ``name``, or ``None``."""
    row = await conn.fetchrow(
        "SELECT id, name, display_name, created_at, disabled_at FROM tenants WHERE name = $1", name
    )
    return Tenant(**dict(row)) if row else None


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


async def lookup_api_key(conn: Connection | asyncpg.Pool, presented: ParsedApiKey) -> KeyLookup:
    """Resolve a presented key to its tenant (constant-time secret comparison)."""
    row = await conn.fetchrow(
        """SELECT k.tenant_id, k.secret_sha256, k.revoked_at, t.disabled_at
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
            WHERE k.id = $1""",
        presented.key_id,
    )
    if row is None or not secret_matches(presented, row["secret_sha256"]) or row["revoked_at"] is not None:
        return KeyLookup(tenant_id=None)
    return KeyLookup(tenant_id=row["tenant_id"], tenant_disabled=row["disabled_at"] is not None)
