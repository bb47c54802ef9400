"""The tenant change listener: notifications, and a full resync after a lost connection."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from switchboard.settings import Settings
from tenants.invalidation import TenantChangeListener
from tenants.store import notify_tenant_changed


async def test_changes_arrive_and_a_lost_connection_triggers_a_full_resync(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    changed: list[uuid.UUID] = []
    changed_event = asyncio.Event()
    resyncs: list[int] = []
    resynced = asyncio.Event()

    def on_resync() -> None:
        resyncs.append(1)
        resynced.set()

    def on_change(tenant_id: uuid.UUID) -> None:
        changed.append(tenant_id)
        changed_event.set()

    listener = TenantChangeListener(
        settings.require_database_url(), on_change, on_resync, probe_interval_s=0.1
    )
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        assert len(resyncs) == 1  # the first connect resyncs too
        tenant_id = uuid.uuid4()
        async with pool.acquire() as conn, conn.transaction():
            await notify_tenant_changed(conn, tenant_id)
        await asyncio.wait_for(changed_event.wait(), 1.0)
        assert changed == [tenant_id]

        # Cut the listener's connection from the server side.
        resynced.clear()
        terminated = await pool.fetchval(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
                  AND (query LIKE 'LISTEN%' OR query = 'SELECT 1')"""
        )
        assert terminated >= 1
        await asyncio.wait_for(resynced.wait(), 10)
    finally:
        listener.stop()
        await asyncio.wait_for(task, 10)
    assert listener.resyncs == 2
