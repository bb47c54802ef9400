"""Per-tenant rate limits: token bucket math, and RESOURCE_EXHAUSTED with RetryInfo over gRPC."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from gateway.rate_limit import TenantRateLimiter, TokenBucket
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import row_counts, send_request
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
