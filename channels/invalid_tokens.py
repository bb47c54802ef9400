"""FCM registration tokens recorded invalid, in PostgreSQL (``invalid_push_tokens``).

Shared by every worker process, so a token FCM called UNREGISTERED,
SENDER_ID_MISMATCH or INVALID_ARGUMENT fails fast everywhere afterwards
(FCM v1 ErrorCode reference:
https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode).
"""

from __future__ import annotations

import uuid

import asyncpg


class PostgresInvalidTokenStore:
    """An ``InvalidTokenStore`` (channels/fcm.py) on the ``invalid_push_tokens`` table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def is_invalid(self, tenant_id: uuid.UUID, token: str) -> bool:
        """Whether ``token`` was recorded invalid for ``tenant_id``."""
        return bool(
            await self._pool.fetchval(
                "SELECT true FROM invalid_push_tokens WHERE tenant_id = $1 AND token = $2", tenant_id, token
            )
        )

    async def mark_invalid(self, tenant_id: uuid.UUID, token: str, reason: str) -> None:
        """Record ``token`` as invalid for ``tenant_id`` (idempotent; the latest reason wins)."""
        await self._pool.execute(
            """INSERT INTO invalid_push_tokens (tenant_id, token, reason) VALUES ($1, $2, $3)
               ON CONFLICT (tenant_id, token) DO UPDATE SET reason = excluded.reason, recorded_at = now()""",
            tenant_id,
            token,
            reason,
        )
