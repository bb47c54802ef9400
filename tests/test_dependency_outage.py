"""PostgreSQL down or stalled: the gateway answers UNAVAILABLE within the deadline,
reports NOT_SERVING, and recovers by itself when the database returns."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.payments.v1 import payments_pb2_grpc
from switchboard.settings import Settings
from tenants.sealing import MasterKeyRing
from tests.conftest import make_tenant
from tests.helpers import send_request, suspended
from tests.test_gateway import rich_status
from tests.test_payment_service import create_request

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


#: The client's deadline in the stall test, and how much later than it an answer may come.
DEADLINE_S, LATE_MARGIN_S = 1.0, 0.25


async def test_every_rpc_answers_within_the_deadline_while_postgres_is_stalled_and_recovers(
    outage_stack: tuple[EmbeddedPostgres, int, asyncpg.Pool],
) -> None:
    """A PostgreSQL that stops answering (SIGSTOP: connections open, no replies) must not
    hold an RPC past the client's deadline: every RPC answers UNAVAILABLE with RetryInfo
    before it (gateway/rpc.py's budget), not DEADLINE_EXCEEDED from the client's own
    timer, health turns NOT_SERVING, and after SIGCONT the gateway serves again by itself."""
    postgres, port, pool = outage_stack
    tenant = await make_tenant(pool, f"stall-{uuid.uuid4().hex[:8]}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        notify = notify_pb2_grpc.NotificationServiceStub(channel)
        payments = payments_pb2_grpc.PaymentServiceStub(channel)
        metadata = tenant.metadata
        sent = await notify.SendNotification(send_request(), metadata=metadata, timeout=5)

        def calls(timeout_s: float) -> dict[str, Callable[[], Awaitable[object]]]:
            return {
                "SendNotification": lambda: notify.SendNotification(
                    send_request(), metadata=metadata, timeout=timeout_s
                ),
                "GetNotification": lambda: notify.GetNotification(
                    notify_pb2.GetNotificationRequest(notification_id=sent.notification_id),
                    metadata=metadata,
                    timeout=timeout_s,
                ),
                "ListNotifications": lambda: notify.ListNotifications(
                    notify_pb2.ListNotificationsRequest(page_size=10), metadata=metadata, timeout=timeout_s
                ),
                "CreatePayment": lambda: payments.CreatePayment(
                    create_request(), metadata=metadata, timeout=timeout_s
                ),
            }

        for call in calls(5).values():
            await call()  # every path warm: auth cached, statements prepared
        answers: dict[str, tuple[str, float]] = {}
        with suspended(postgres.pid):  # PostgreSQL stalls: every process SIGSTOPped
            for _ in range(2):  # the second round finds the pool's connections still held by the first
                for name, call in calls(DEADLINE_S).items():
                    started = time.monotonic()
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call()
                    elapsed = time.monotonic() - started
                    answers[name] = (caught.value.code().name, round(elapsed, 3))
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, (name, caught.value)
                    assert elapsed < DEADLINE_S + LATE_MARGIN_S, (name, elapsed)
                    retry = error_details_pb2.RetryInfo()
                    assert any(d.Unpack(retry) for d in rich_status(caught.value).details), name
            await wait_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING, within_s=5)
        print(f"answers while stalled (code, s): {answers}")

        await wait_health(channel, health_pb2.HealthCheckResponse.SERVING, within_s=15)
        for name, call in calls(5).items():
            assert await call(), name
