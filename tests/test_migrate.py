"""Schema migrations: applied once, even by concurrent runs."""

from __future__ import annotations

import asyncio

import asyncpg

from switchboard.db.migrate import load_migrations, migrate
from switchboard.embedded import EmbeddedPostgres


async def test_concurrent_migrations_apply_each_version_once(postgres: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(postgres.dsn())
    await conn.execute("CREATE DATABASE migrate_race")
    await conn.close()
    dsn = postgres.dsn("migrate_race")
    results = await asyncio.gather(*[migrate(dsn) for _ in range(4)])
    versions = [m.version for m in load_migrations()]
    assert sorted(v for applied in results for v in applied) == versions
    check = await asyncpg.connect(dsn)
    try:
        assert [
            r["version"] for r in await check.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        ] == versions
    finally:
        await check.close()
    assert await migrate(dsn) == []
