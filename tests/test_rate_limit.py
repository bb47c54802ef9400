"""Per-tenant rate limits: token bucket math, and RESOURCE_EXHAUSTED with RetryInfo over gRPC."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from aiokafka.partitioner import DefaultPartitioner
from google.rpc import error_details_pb2

from gateway.rate_limit import TenantRateLimiter, TokenBucket
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from tests.conftest import TenantCredentials, make_tenant
from tests.helpers import row_counts, running_pipeline, send_request, wait_for
from tests.test_gateway import rich_status

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2.0, capacity=4.0, clock=clock)
    assert [bucket.take() for _ in range(4)] == [0.0] * 4
    assert bucket.take() == pytest.approx(0.5)  # one token comes back every 0.5 s
    clock.now += 0.5
    assert bucket.take() == 0.0
    clock.now += 10  # refills up to the capacity, not beyond
    assert [bucket.take() for _ in range(5)][-1] == pytest.approx(0.5)
    assert bucket.take(cost=5) == float("inf")  # more than the capacity: never


def test_limiter_is_per_tenant_and_unlimited_by_default() -> None:
    clock = FakeClock()
    limiter = TenantRateLimiter(clock)
    a, b = uuid.uuid4(), uuid.uuid4()
    assert all(limiter.admit(a, 0, 0) == 0.0 for _ in range(1000))  # 0 = no limit
    assert [limiter.admit(b, 1, 2) for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.admit(b, 1, 2) > 0
    assert limiter.admit(uuid.uuid4(), 1, 2) == 0.0  # another tenant is unaffected


async def test_over_the_limit_is_resource_exhausted_with_retry_info_and_writes_nothing(
    stub: Stub, tenant: TenantCredentials, other_tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    await pool.execute(
        "UPDATE tenants SET requests_per_second = 1, burst = 3 WHERE id = $1", tenant.tenant_id
    )
    for _ in range(3):
        await stub.SendNotification(send_request(), metadata=tenant.metadata)
    before = await row_counts(pool)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotification(send_request(), metadata=tenant.metadata)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in rich_status(caught.value).details)
    assert 0 < retry.retry_delay.ToMilliseconds() <= 1000
    assert await row_counts(pool) == before
    # A batch costs one token per item: too big a batch never fits the bucket.
    with pytest.raises(grpc.aio.AioRpcError) as batch:
        await stub.SendNotificationBatch(
            notify_pb2.SendNotificationBatchRequest(requests=[send_request() for _ in range(4)]),
            metadata=tenant.metadata,
        )
    assert batch.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Another tenant is not held back.
    await stub.SendNotification(send_request(), metadata=other_tenant.metadata)


async def test_one_tenants_flood_does_not_hold_up_another_tenants_delivery(
    stub: Stub, pool: asyncpg.Pool, settings: Settings
) -> None:
    """The worker handles different tenants' messages concurrently (one lane per
    partition and tenant): a quiet tenant's SMS is delivered while a flooding
    tenant's backlog is still being worked through. (Within one partition, Kafka
    order still puts a message behind those before it: tenants share partitions
    by hash of their id; see docs/operations.md.)"""
    partitioner = DefaultPartitioner()
    flood = await make_tenant(pool, "flood")
    flood_partition = partitioner(str(flood.tenant_id).encode(), [0, 1], [0, 1])
    quiet = None
    for index in range(20):
        candidate = await make_tenant(pool, f"quiet-{index}")
        if partitioner(str(candidate.tenant_id).encode(), [0, 1], [0, 1]) != flood_partition:
            quiet = candidate
            break
    assert quiet is not None
    sms = notify_pb2.CHANNEL_SMS
    for _ in range(3):
        await stub.SendNotificationBatch(
            notify_pb2.SendNotificationBatchRequest(
                requests=[send_request(channels=[sms]) for _ in range(200)]
            ),
            metadata=flood.metadata,
        )
    quiet_reply = await stub.SendNotification(send_request(channels=[sms]), metadata=quiet.metadata)

    async def quiet_delivered() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT status = 'delivered' FROM deliveries WHERE notification_id = $1",
                uuid.UUID(quiet_reply.notification_id),
            )
        )

    async with running_pipeline(pool, settings, channels=("sms",)):
        await wait_for(quiet_delivered, timeout_s=60, interval_s=0.01)
        flood_left = await pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE tenant_id = $1 AND status <> 'delivered'", flood.tenant_id
        )
    assert flood_left > 0, "the quiet tenant waited for the whole flood"
