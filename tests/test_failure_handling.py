"""Fallback chains, dead-letter replay, and per-tenant retry limits."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest

from channels.dead_letters import DeadLetterFilter, list_dead_letters, replay_dead_letters
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from tests.conftest import TenantCredentials
from tests.helpers import running_pipeline, send_request, wait_for
from tests.test_gateway import rich_status, violations
from tests.test_worker import ScriptedSmtpHandler, scripted_smtp  # noqa: F401 (fixture)

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub


async def notification(
    stub: Stub, tenant: TenantCredentials, notification_id: str
) -> notify_pb2.Notification:
    got = await stub.GetNotification(
        notify_pb2.GetNotificationRequest(notification_id=notification_id), metadata=tenant.metadata
    )
    return got.notification


async def test_fallback_tries_the_next_channel_after_a_permanent_failure(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    scripted_smtp.replies = ["550 5.1.1 no such mailbox"]
    request = send_request(channels=[], fallback_channels=[notify_pb2.CHANNEL_EMAIL, notify_pb2.CHANNEL_SMS])
    accepted = await stub.SendNotification(request, metadata=tenant.metadata)
    assert [d.channel for d in accepted.deliveries] == [notify_pb2.CHANNEL_EMAIL]  # only the first, for now

    async def done() -> notify_pb2.Notification | None:
        found = await notification(stub, tenant, accepted.notification_id)
        return found if found.status != notify_pb2.NOTIFICATION_STATUS_ACCEPTED else None

    async with running_pipeline(pool, settings):
        final = await wait_for(done, timeout_s=60)
    assert final.status == notify_pb2.NOTIFICATION_STATUS_DELIVERED
    assert list(final.fallback_channels) == [notify_pb2.CHANNEL_EMAIL, notify_pb2.CHANNEL_SMS]
    chain = [(d.chain_position, d.channel, d.status) for d in final.deliveries]
    assert chain == [
        (0, notify_pb2.CHANNEL_EMAIL, notify_pb2.DELIVERY_STATUS_FAILED),
        (1, notify_pb2.CHANNEL_SMS, notify_pb2.DELIVERY_STATUS_DELIVERED),
    ]
    assert final.deliveries[0].last_error.startswith("SMTP 550")


async def test_fallback_chain_validation(stub: Stub, tenant: TenantCredentials) -> None:
    request = send_request(
        fallback_channels=[notify_pb2.CHANNEL_SMS, notify_pb2.CHANNEL_SMS, notify_pb2.CHANNEL_ALL]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotification(request, metadata=tenant.metadata)
    named = violations(rich_status(caught.value))
    assert {"channels", "fallback_channels[1]", "fallback_channels[2]"} <= set(named)


async def test_a_permanent_failure_lands_in_the_dlq_and_replays_to_success_once(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    scripted_smtp.replies = ["554 5.7.1 rejected for policy reasons"]
    accepted = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )
    delivery_id = uuid.UUID(accepted.deliveries[0].delivery_id)
    mine = DeadLetterFilter(tenant_id=tenant.tenant_id, channel="email", reason="policy")
    async with running_pipeline(pool, settings, channels=("email",)):
        letters = await wait_for(lambda: list_dead_letters(pool, mine), timeout_s=60)
        assert [d.delivery_id for d in letters] == [delivery_id]
        assert await list_dead_letters(pool, DeadLetterFilter(reason="no such text")) == []
        assert (
            await replay_dead_letters(pool, mine, topic_prefix=settings.kafka_topic_prefix, dry_run=True) == 1
        )

        # The fault is cleared (no scripted replies left): the replay succeeds.
        assert await replay_dead_letters(pool, mine, topic_prefix=settings.kafka_topic_prefix) == 1
        assert await replay_dead_letters(pool, mine, topic_prefix=settings.kafka_topic_prefix) == 0

        async def delivered() -> bool:
            return bool(
                await pool.fetchval("SELECT status = 'delivered' FROM deliveries WHERE id = $1", delivery_id)
            )

        await wait_for(delivered, timeout_s=60)
    assert len(scripted_smtp.accepted) == 1
    row = await pool.fetchrow("SELECT attempts, replays FROM deliveries WHERE id = $1", delivery_id)
    assert row is not None
    assert (row["attempts"], row["replays"]) == (2, 1)
    assert await list_dead_letters(pool, mine) == []


async def test_the_tenant_limit_on_attempts_applies(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    await pool.execute("UPDATE tenants SET max_delivery_attempts = 2 WHERE id = $1", tenant.tenant_id)
    scripted_smtp.replies = ["451 4.3.0 later"] * 10
    accepted = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )

    async def failed() -> asyncpg.Record | None:
        return await pool.fetchrow(
            "SELECT attempts, last_error FROM deliveries WHERE notification_id = $1 AND status = 'failed'",
            uuid.UUID(accepted.notification_id),
        )

    async with running_pipeline(pool, settings, channels=("email",)):
        row = await wait_for(failed, timeout_s=60)
    assert row["attempts"] == 2
    assert row["last_error"].startswith("gave up after 2 attempts")


async def test_a_delivery_older_than_the_tenant_max_age_is_not_retried(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    await pool.execute("UPDATE tenants SET max_delivery_age_seconds = 1 WHERE id = $1", tenant.tenant_id)
    settings.worker_retry_base_ms = 1500  # the second attempt comes after the notification is 1 s old
    settings.worker_retry_max_ms = 1500
    scripted_smtp.replies = ["451 4.3.0 later"] * 10
    accepted = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )

    async def failed() -> asyncpg.Record | None:
        return await pool.fetchrow(
            "SELECT attempts, last_error FROM deliveries WHERE notification_id = $1 AND status = 'failed'",
            uuid.UUID(accepted.notification_id),
        )

    async with running_pipeline(pool, settings, channels=("email",)):
        row = await wait_for(failed, timeout_s=60)
    assert "older than 1 s" in row["last_error"]
    assert row["attempts"] < settings.worker_max_attempts


async def test_a_waiting_retry_does_not_hold_up_the_partition(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    """Same tenant (so same key and partition): the first delivery waits a long
    backoff while the second, behind it in the partition, is delivered."""
    settings.worker_retry_base_ms = settings.worker_retry_max_ms = 600_000
    scripted_smtp.replies = ["451 4.3.0 later"]
    first = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )
    second = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )

    async def status_of(reply: notify_pb2.SendNotificationResponse) -> str:
        return str(
            await pool.fetchval(
                "SELECT status FROM deliveries WHERE notification_id = $1", uuid.UUID(reply.notification_id)
            )
        )

    async def second_delivered() -> bool:
        return await status_of(second) == "delivered"

    async with running_pipeline(pool, settings, channels=("email",)):
        await wait_for(second_delivered, timeout_s=30)
    # The first one failed and waits a backoff drawn from [0, 600 s] (outbox row due
    # later), while the consumer went on: a worker sleeping through that backoff
    # would have held the second one for minutes.
    outcome = await pool.fetchval(
        """SELECT a.outcome FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
            WHERE d.notification_id = $1 AND a.attempt_number = 1""",
        uuid.UUID(first.notification_id),
    )
    assert outcome == "retryable"
