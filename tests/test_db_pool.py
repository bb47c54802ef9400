"""The shared pool returns connections without asyncpg's reset query
(switchboard/db/pool.py): what that query would undo must never be left behind."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import asyncpg
import pytest

from gateway.status_stream import StatusHub
from switchboard.db.pool import create_pool, release_without_reset_query
from switchboard.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("gateway", "channels", "tenants", "payments", "switchboard")

#: Session state that would outlive a pooled connection's user, and the files
#: allowed to create it because they use a connection of their own.
SESSION_STATE = {
    "session advisory lock": (re.compile(r"pg_advisory_lock\("), {"switchboard/db/migrate.py"}),
    "session setting": (re.compile(r"set_config\([^)]*,\s*false\s*\)", re.I), set()),
    "SET outside a transaction": (
        re.compile(r"""execute\(\s*(f?["']{1,3})\s*SET\s+(?!LOCAL\b)""", re.I),
        set(),
    ),
    "LISTEN": (
        re.compile(r"add_listener\("),
        {"gateway/status_stream.py", "gateway/relay.py", "tenants/invalidation.py"},
    ),
}


def test_no_code_leaves_session_state_on_a_connection() -> None:
    found: list[str] = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT).as_posix()
            if "/v1/" in relative:
                continue  # generated code
            text = path.read_text(encoding="utf-8")
            for what, (pattern, allowed) in SESSION_STATE.items():
                if relative not in allowed and pattern.search(text):
                    found.append(f"{relative}: {what}")
    assert found == [], "session state on pooled connections needs the pool's reset query back"


def test_the_guard_recognises_session_state() -> None:
    """The patterns above match the statements they exist to catch."""
    pattern = {what: found[0] for what, found in SESSION_STATE.items()}
    assert pattern["session advisory lock"].search("await c.execute('SELECT pg_advisory_lock($1)', k)")
    assert not pattern["session advisory lock"].search("pg_advisory_xact_lock($1)")
    assert pattern["session setting"].search("set_config('lock_timeout', $1, false)")
    assert pattern["SET outside a transaction"].search('await conn.execute("SET statement_timeout = 5")')
    assert not pattern["SET outside a transaction"].search('await conn.execute("SET LOCAL x = 1")')
    assert pattern["LISTEN"].search("await conn.add_listener(channel, callback)")


async def test_the_pool_uses_the_hook_and_still_rolls_back_an_open_transaction(settings: Settings) -> None:
    pool = await create_pool(settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": 1}))
    try:
        assert pool._reset is release_without_reset_query  # type: ignore[attr-defined]
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMPORARY TABLE leaked (x int) ON COMMIT DROP")
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid  # the same connection came back ...
            assert not conn.is_in_transaction()  # ... with its transaction rolled back
            assert await conn.fetchval("SELECT to_regclass('pg_temp.leaked')") is None
    finally:
        await pool.close()


async def test_a_status_hub_returns_its_connection_not_listening(settings: Settings) -> None:
    pool = await create_pool(settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": 1}))
    hub = StatusHub(pool, probe_interval_s=0.05)
    try:
        subscription = hub.subscribe(uuid.uuid4())
        await hub.connected.wait()
        listening_pid = hub.backend_pid
        hub.unsubscribe(subscription)
        async with pool.acquire() as conn:  # the pool's only connection: free once the hub let go
            assert conn.get_server_pid() == listening_pid
            assert await conn.fetch("SELECT pg_listening_channels()") == []
    finally:
        await hub.close()
        await pool.close()


async def test_released_connections_answer_the_next_caller(settings: Settings) -> None:
    pool = await create_pool(settings.model_copy(update={"db_pool_min_size": 2, "db_pool_max_size": 2}))
    try:
        results = [await pool.fetchval("SELECT 1") for _ in range(50)]
        assert results == [1] * 50
        with pytest.raises(asyncpg.UndefinedTableError):
            await pool.fetchval("SELECT * FROM no_such_table")
        assert await pool.fetchval("SELECT 1") == 1  # an error does not poison the connection
    finally:
        await pool.close()
