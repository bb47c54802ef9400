"""The asyncpg connection pool every process uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from switchboard.settings import Settings

#: A connection, pooled or not (what query helpers take).
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy


async def release_without_reset_query(connection: asyncpg.Connection) -> None:
    """Pool ``reset`` hook: send nothing more when a connection goes back to the pool.

    Before calling this hook asyncpg has already rolled back a transaction left
    open and dropped the connection's listener callbacks (``Connection._reset``).
    What the default hook adds is one more round trip per release, the query
    ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` (asyncpg
    ``Connection.get_reset_query``), which undoes session state. Our pooled
    connections hold none: settings are transaction-local (``set_config(..., true)``),
    advisory locks are transaction-level (``pg_advisory_xact_lock``), cursors live
    inside transactions, and the one LISTEN on a pooled connection
    (``gateway.status_stream``) removes its listener, which sends ``UNLISTEN``,
    before the connection is released; session-level locks and LISTENs use
    connections of their own (migrations, the relay, tenant invalidation).
    ``tests/test_db_pool.py`` checks these rules. Measured: the default hook
    halves the rate of one-statement pool calls and costs about 60 µs of
    PostgreSQL CPU and 60-100 µs of client CPU per release (BENCHMARKS.md).
    """
    del connection


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """Open a pool to ``settings.database_url`` sized by the ``db_pool_*`` settings.

    Connections go back to the pool without asyncpg's reset query
    (:func:`release_without_reset_query`). Raises ``RuntimeError`` if the URL is
    not set, and asyncpg's connection errors if the server cannot be reached.
    """
    pool = await asyncpg.create_pool(
        settings.require_database_url(),
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        command_timeout=settings.db_command_timeout_s,
        reset=release_without_reset_query,
    )
    assert pool is not None
    return pool


@asynccontextmanager
async def read_snapshot(pool: asyncpg.Pool) -> AsyncIterator[Connection]:
    """A pooled connection inside a ``REPEATABLE READ READ ONLY`` transaction.

    Every query made on it sees the same snapshot of the database (PostgreSQL
    docs, "Transaction Isolation"), so a read made of several statements, such
    as a payment and then its attempts and transitions, is never torn by a commit
    landing between them. Read-only: a write on it raises
    ``asyncpg.ReadOnlySQLTransactionError``.
    """
    async with (
        pool.acquire() as connection,
        connection.transaction(isolation="repeatable_read", readonly=True),
    ):
        yield connection
