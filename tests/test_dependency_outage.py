"""PostgreSQL down: the gateway answers UNAVAILABLE within the deadline, reports
NOT_SERVING, and recovers by itself when the database returns."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from gateway.server import start_gateway
from switchboard.db.migrate import migrate
from switchboard.embedded import EmbeddedPostgres, free_port
from switchboard.notify.v1 import notify_pb2_grpc
from switchboard.settings import Settings
from tenants.sealing import MasterKeyRing
from tests.conftest import make_tenant
from tests.helpers import send_request
from tests.test_gateway import rich_status

pytestmark = pytest.mark.slow


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL this test may kill and restart."""
    server = EmbeddedPostgres(tmp_path / "pg", free_port(), options={"fsync": "off"})
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def outage_stack(
    own_postgres: EmbeddedPostgres, settings: Settings, key_ring: MasterKeyRing
) -> AsyncIterator[tuple[EmbeddedPostgres, int, asyncpg.Pool]]:
    dsn = own_postgres.dsn()
    await migrate(dsn)
    settings.database_url = SecretStr(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=5, command_timeout=5)
    assert pool is not None
    gateway = await start_gateway(pool, settings, key_ring, "127.0.0.1:0")
    try:
        yield own_postgres, gateway.port, pool
    finally:
        await gateway.stop(grace_s=1)
        await pool.close()


async def health_of(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=2
    )
    return int(reply.status)


async def wait_health(channel: grpc.aio.Channel, status: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while await health_of(channel) != status:
        assert time.monotonic() < deadline, f"health did not become {status} within {within_s} s"
        await asyncio.sleep(0.1)


async def test_database_outage_is_unavailable_within_the_deadline_and_recovers(
    outage_stack: tuple[EmbeddedPostgres, int, asyncpg.Pool],
) -> None:
    postgres, port, pool = outage_stack
    tenant = await make_tenant(pool, f"outage-{uuid.uuid4().hex[:8]}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = notify_pb2_grpc.NotificationServiceStub(channel)
        await stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=5)
        assert await health_of(channel) == health_pb2.HealthCheckResponse.SERVING

        postgres.kill()
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=2)
            elapsed = time.monotonic() - started
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
            assert elapsed < 2.0
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in rich_status(caught.value).details)
        await wait_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING, within_s=5)

        await asyncio.to_thread(postgres.start)
        await wait_health(channel, health_pb2.HealthCheckResponse.SERVING, within_s=15)
        accepted = await stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=5)
        assert accepted.notification_id
