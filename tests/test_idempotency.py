"""Idempotency keys past the retention window: taken over, and reaped."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from gateway.relay import reap_idempotency_keys
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import send_request

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub


async def age_keys(pool: asyncpg.Pool, hours: float) -> None:
    await pool.execute("UPDATE idempotency_keys SET created_at = now() - make_interval(hours => $1)", hours)


async def test_a_request_id_past_the_retention_window_is_a_new_request(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = send_request()
    first = await stub.SendNotification(request, metadata=tenant.metadata)
    await age_keys(pool, 25)  # the default retention is 24 h
    changed = send_request(request_id=request.request_id, sms=notify_pb2.SmsContent(text="a new request"))
    second = await stub.SendNotification(changed, metadata=tenant.metadata)
    assert second.notification_id != first.notification_id
    # ...and within the window again, the new answer is the one replayed.
    assert await stub.SendNotification(changed, metadata=tenant.metadata) == second


async def test_the_reaper_deletes_only_expired_keys(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    for _ in range(3):
        await stub.SendNotification(send_request(), metadata=tenant.metadata)
    await age_keys(pool, 25)
    fresh = await stub.SendNotification(send_request(), metadata=tenant.metadata)
    assert await reap_idempotency_keys(pool, retention_s=24 * 3600) == 3
    assert await reap_idempotency_keys(pool, retention_s=24 * 3600) == 0
    left = await pool.fetch("SELECT request_id FROM idempotency_keys")
    assert len(left) == 1
    assert fresh.notification_id  # its key is the one left
