"""Payment processor configuration records in PostgreSQL (table ``processor_configs``).

One row per tenant and processor (``"stripe"``, ``"adyen"``): non-secret
settings as JSON, the secrets sealed (``key_id``, ``nonce``, ``ciphertext``;
associated data ``processor_secrets_associated_data(tenant, processor)``).
Setting or deleting a row sends ``NOTIFY switchboard_tenant_changes,
'<tenant id>'`` in the same transaction, like every tenant change
(tenants/store.py), so every process's processor cache drops that tenant when
the change commits (tenants/invalidation.py).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from switchboard.db.pool import Connection
from tenants.store import notify_tenant_changed


@dataclass(frozen=True)
class StoredProcessorConfig:
    """A processor configuration row: settings in clear, secrets sealed.

    ``priority``: 0-1000, lower first. ``settings``: non-secret fields by name.
    ``secret_fields``: API names of the secret fields that are set.
    ``secret_fingerprint`` / ``webhook_secret_fingerprints``: 16 hex digits
    each (``MasterKeyRing.fingerprint``) of all secrets, and of each webhook
    secret in order. ``nonce`` and ``ciphertext`` are left out of the repr.
    ``updated_at`` is ``None`` only on a record not yet written.
    """

    tenant_id: uuid.UUID
    processor: str
    priority: int
    settings: dict[str, str]
    secret_fields: list[str]
    key_id: str
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    secret_fingerprint: str
    webhook_secret_fingerprints: list[str]
    updated_at: datetime | None = None


def _record(row: asyncpg.Record) -> StoredProcessorConfig:
    values = dict(row)
    values["settings"] = json.loads(values["settings"])
    values["secret_fields"] = list(values["secret_fields"])
    values["webhook_secret_fingerprints"] = list(values["webhook_secret_fingerprints"])
    return StoredProcessorConfig(**values)


async def upsert_processor_config(conn: Connection, config: StoredProcessorConfig) -> StoredProcessorConfig:
    """Create or replace the configuration of (tenant, processor) and tell every process.

    Run it in a transaction: the change notification is sent at commit.
    Raises asyncpg's ``ForeignKeyViolationError`` if the tenant does not exist.
    """
    row = await conn.fetchrow(
        """INSERT INTO processor_configs (tenant_id, processor, priority, settings, secret_fields, key_id,
                                           nonce, ciphertext, secret_fingerprint, webhook_secret_fingerprints)
            VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10)
            ON CONFLICT (tenant_id, processor) DO UPDATE SET
                priority = excluded.priority, settings = excluded.settings,
                secret_fields = excluded.secret_fields, key_id = excluded.key_id, nonce = excluded.nonce,
                ciphertext = excluded.ciphertext, secret_fingerprint = excluded.secret_fingerprint,
                webhook_secret_fingerprints = excluded.webhook_secret_fingerprints, updated_at = now()
            RETURNING tenant_id, processor, priority, settings, secret_fields, key_id, nonce, ciphertext,
                      secret_fingerprint, webhook_secret_fingerprints, updated_at""",
        config.tenant_id,
        config.processor,
        config.priority,
        json.dumps(config.settings),
        config.secret_fields,
        config.key_id,
        config.nonce,
        config.ciphertext,
        config.secret_fingerprint,
        config.webhook_secret_fingerprints,
    )
    assert row is not None
    await notify_tenant_changed(conn, config.tenant_id)
    return _record(row)


async def get_processor_config(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID, processor: str
) -> StoredProcessorConfig | None:
    """The configuration of (tenant, processor), or ``None``."""
    row = await conn.fetchrow(
        """SELECT tenant_id, processor, priority, settings, secret_fields, key_id, nonce, ciphertext,
                  secret_fingerprint, webhook_secret_fingerprints, updated_at
             FROM processor_configs WHERE tenant_id = $1 AND processor = $2""",
        tenant_id,
        processor,
    )
    return _record(row) if row else None


async def list_processor_configs(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID
) -> list[StoredProcessorConfig]:
    """Every processor configuration of the tenant, in failover order (priority, then name)."""
    rows = await conn.fetch(
        """SELECT tenant_id, processor, priority, settings, secret_fields, key_id, nonce, ciphertext,
                  secret_fingerprint, webhook_secret_fingerprints, updated_at
             FROM processor_configs WHERE tenant_id = $1 ORDER BY priority, processor""",
        tenant_id,
    )
    return [_record(r) for r in rows]


async def delete_processor_config(conn: Connection, tenant_id: uuid.UUID, processor: str) -> bool:
    """Delete the configuration of (tenant, processor); ``False`` if there was none.

    Run it in a transaction: the change notification is sent at commit.
    """
    deleted = await conn.fetchval(
        "DELETE FROM processor_configs WHERE tenant_id = $1 AND processor = $2 RETURNING true",
        tenant_id,
        processor,
    )
    if deleted:
        await notify_tenant_changed(conn, tenant_id)
    return bool(deleted)
