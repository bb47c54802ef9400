"""Versioned SQL migrations, applied in order under a PostgreSQL advisory lock.

Migrations are the files ``switchboard/db/migrations/NNNN_name.sql``; each is
applied once, in its own transaction, and recorded in ``schema_migrations``.
A session-level advisory lock makes concurrent ``migrate`` runs take turns, so
two processes never apply the same migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import asyncpg

# pg_advisory_lock key: the ASCII of "swbmigr" as a 64-bit integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"swbmigr", "big")


@dataclass(frozen=True)
class Migration:
    """One migration file: ``version`` (the NNNN prefix), ``name`` and its SQL."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Read the packaged migrations, sorted by version.

    Raises ``ValueError`` for a file name without a numeric prefix or for two
    files with the same version.
    """
    found: dict[int, Migration] = {}
    folder = resources.files("switchboard.db") / "migrations"
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        prefix, _, rest = entry.name.partition("_")
        if not prefix.isdigit():
            raise ValueError(f"migration file name must start with a number: {entry.name}")
        version = int(prefix)
        if version in found:
            raise ValueError(f"two migrations with version {version}")
        found[version] = Migration(version, rest.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def apply_migrations(conn: asyncpg.Connection) -> list[int]:
    """Apply every pending migration on ``conn``; return the versions applied.

    Holds ``pg_advisory_lock(MIGRATION_LOCK_KEY)`` for the whole run, so a
    concurrent caller waits and then finds nothing left to do.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied: list[int] = []
        for migration in load_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration.version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def migrate(dsn: str) -> list[int]:
    """Connect to ``dsn`` and apply pending migrations; return the versions applied."""
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()
