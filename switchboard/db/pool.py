"""The asyncpg connection pool every process uses."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from switchboard.settings import Settings

#: A connection, pooled or not (what query helpers take).
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """Open a pool to ``settings.database_url`` sized by the ``db_pool_*`` settings.

    Raises ``RuntimeError`` if the URL is not set, and asyncpg's connection
    errors if the server cannot be reached.
    """
    pool = await asyncpg.create_pool(
        settings.require_database_url(),
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        command_timeout=settings.db_command_timeout_s,
    )
    assert pool is not None
    return pool
