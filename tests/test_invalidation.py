"""The tenant change listener: notifications, and a full resync after a lost connection."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from channels.provider import PermanentDeliveryError
from switchboard.embedded import EmbeddedPostgres
from switchboard.settings import Settings
from tenants import store
from tenants.invalidation import APPLICATION_NAME, TenantChangeListener
from tenants.store import notify_tenant_changed
from tests.conftest import TenantCredentials
from tests.helpers import tenant_providers


async def cut_the_listeners_connection(pool: asyncpg.Pool) -> None:
    """Terminate the listener's backend from the server side (as a restart or a proxy would)."""
    terminated = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        APPLICATION_NAME,
    )
    assert terminated == 1


async def test_changes_arrive_and_a_lost_connection_triggers_a_full_resync(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    changed: list[uuid.UUID] = []
    resyncs: list[int] = []
    resynced = asyncio.Event()

    def on_resync() -> None:
        resyncs.append(1)
        resynced.set()

    listener = TenantChangeListener(
        settings.require_database_url(), changed.append, on_resync, probe_interval_s=0.1
    )
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        assert len(resyncs) == 1  # the first connect resyncs too
        tenant_id = uuid.uuid4()
        async with pool.acquire() as conn, conn.transaction():
            await notify_tenant_changed(conn, tenant_id)
        await asyncio.wait_for(listener.wait_for_changes(1), 1.0)
        assert changed == [tenant_id]

        resynced.clear()
        await cut_the_listeners_connection(pool)
        await asyncio.wait_for(resynced.wait(), 10)
    finally:
        listener.stop()
        await asyncio.wait_for(task, 10)
    assert listener.resyncs == 2


async def test_a_change_made_while_the_connection_is_lost_takes_effect_after_the_resync(
    pool: asyncpg.Pool, settings: Settings, tenant: TenantCredentials, postgres: EmbeddedPostgres
) -> None:
    providers = tenant_providers(pool, settings)  # a worker's providers (default SMTP for email)
    listener = TenantChangeListener(
        settings.require_database_url(),
        providers.invalidate,
        providers.invalidate_all,
        probe_interval_s=0.1,
        reconnect_backoff_s=0.1,
    )
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        cached = await providers.provider_for(tenant.tenant_id, "email")

        # The listener's connection drops and, for now, the database lets no one in again (set
        # from another database: PostgreSQL refuses it for the current one).
        name = await pool.fetchval("SELECT current_database()")
        server = await asyncpg.connect(postgres.dsn())
        await server.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        try:
            await cut_the_listeners_connection(pool)
            await asyncio.wait_for(listener.disconnected.wait(), 10)
            async with pool.acquire() as conn, conn.transaction():  # its NOTIFY reaches no one
                assert await store.set_tenant_disabled(conn, tenant.tenant_id, True) is not None
            assert await providers.provider_for(tenant.tenant_id, "email") is cached  # stale until resync
        finally:
            await server.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            await server.close()

        await asyncio.wait_for(listener.connected.wait(), 10)  # reconnected, after the full resync
        with pytest.raises(PermanentDeliveryError, match="the tenant is disabled"):
            await providers.provider_for(tenant.tenant_id, "email")
        assert listener.resyncs == 2
        assert listener.changes_seen == 0  # it came through the resync: the notification was lost
    finally:
        listener.stop()
        await asyncio.wait_for(task, 10)
        await providers.close()
