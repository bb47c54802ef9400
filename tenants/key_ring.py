"""The master key ring of a process, checked against the database at start."""

from __future__ import annotations

import asyncpg

from switchboard.settings import Settings
from tenants.master_keys import verify_master_keys
from tenants.sealing import MasterKeyRing


async def load_verified_key_ring(settings: Settings, pool: asyncpg.Pool) -> MasterKeyRing:
    """Parse ``SWITCHBOARD_MASTER_KEY`` and verify it against what the database holds.

    Raises ``MasterKeyError`` (a clear message, never key material) when the
    setting is missing or malformed, a key does not match the data it wrote,
    or stored secrets use a key id the ring lacks: processes fail at start,
    not on first use.
    """
    ring = MasterKeyRing.parse(settings.master_key.get_secret_value() if settings.master_key else None)
    async with pool.acquire() as conn:
        await verify_master_keys(conn, ring)
    return ring
