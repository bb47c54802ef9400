"""Channel workers: idempotent consumer, offsets after outcomes, retries, dead letters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from channels.catalog import dead_letter_topic
from channels.delivery import Outcome, RetryPolicy, backoff_delay_s, deliver
from channels.worker import ChannelWorker
from gateway.relay import OutboxRelay
from switchboard.embedded import free_port
from switchboard.notify.v1 import events_pb2, notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from tests.conftest import SmtpSink, TenantCredentials
from tests.helpers import running_pipeline, send_request, tenant_providers, wait_for

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub


def email_only(**overrides: object) -> notify_pb2.SendNotificationRequest:
    return send_request(channels=[notify_pb2.CHANNEL_EMAIL], **overrides)


class WorkerKilled(BaseException):
    """Simulates the process dying (not an Exception: nothing catches it)."""


class DiesBeforeCommit(ChannelWorker):
    """A worker that records outcomes and then dies before committing offsets."""

    async def commit_offsets(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        raise WorkerKilled


async def test_worker_dying_after_delivery_before_commit_does_not_deliver_or_mark_twice(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool, settings: Settings, smtp_sink: SmtpSink
) -> None:
    accepted = await stub.SendNotification(email_only(), metadata=tenant.metadata)
    delivery_id = accepted.deliveries[0].delivery_id
    relay = OutboxRelay(pool, settings)
    relay_task = asyncio.create_task(relay.run())
    try:
        doomed = DiesBeforeCommit(pool, settings, "email", tenant_providers(pool, settings))
        with pytest.raises(WorkerKilled):
            await asyncio.wait_for(doomed.run(), 60)
        assert doomed.outcomes[Outcome.DELIVERED] == 1
        assert len(smtp_sink.messages_for_delivery(delivery_id)) == 1

        # The offset was not committed: a new worker in the group gets the event again.
        survivor = ChannelWorker(pool, settings, "email", tenant_providers(pool, settings))
        task = asyncio.create_task(survivor.run())
        try:
            await wait_for(lambda: _async(survivor.outcomes[Outcome.SKIPPED] >= 1), timeout_s=60)
        finally:
            survivor.stop()
            await task
    finally:
        relay.stop()
        await relay_task
    assert survivor.outcomes[Outcome.DELIVERED] == 0
    assert len(smtp_sink.messages_for_delivery(delivery_id)) == 1
    row = await pool.fetchrow("SELECT status, attempts FROM deliveries WHERE id = $1", uuid.UUID(delivery_id))
    assert row is not None
    assert (row["status"], row["attempts"]) == ("delivered", 1)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM delivery_attempts WHERE delivery_id = $1", uuid.UUID(delivery_id)
        )
        == 1
    )


async def _async(value: bool) -> bool:
    return value


async def test_redelivered_event_for_a_final_delivery_does_nothing(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool, settings: Settings, smtp_sink: SmtpSink
) -> None:
    accepted = await stub.SendNotification(email_only(), metadata=tenant.metadata)
    payload = await pool.fetchval(
        "SELECT event FROM deliveries WHERE notification_id = $1", uuid.UUID(accepted.notification_id)
    )
    event = events_pb2.DeliveryRequested.FromString(payload)
    providers = tenant_providers(pool, settings)
    for expected in (Outcome.DELIVERED, Outcome.SKIPPED):
        outcome = await deliver(
            pool,
            event,
            lambda: providers.provider_for(tenant.tenant_id, "email"),
            policy=RetryPolicy(max_attempts=5, max_age_s=3600, base_s=0.01, cap_s=0.01),
        )
        assert outcome == expected
    assert len(smtp_sink.messages_for_delivery(event.delivery_id)) == 1


@dataclass
class ScriptedSmtpHandler:
    """An SMTP server answering DATA with scripted replies, then 250."""

    replies: list[str]
    accepted: list[Envelope] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.replies:
            return self.replies.pop(0)
        self.accepted.append(envelope)
        return "250 OK"


@pytest.fixture
def scripted_smtp(settings: Settings) -> Iterator[ScriptedSmtpHandler]:
    handler = ScriptedSmtpHandler(replies=[])
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    settings.smtp_port = controller.port
    yield handler
    controller.stop()


async def test_transient_smtp_failures_are_retried_with_backoff_until_delivered(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,
) -> None:
    scripted_smtp.replies = ["451 4.3.0 try again later", "421 4.7.0 busy"]
    accepted = await stub.SendNotification(email_only(), metadata=tenant.metadata)
    delivery_id = uuid.UUID(accepted.deliveries[0].delivery_id)
    async with running_pipeline(pool, settings, channels=("email",)):
        await wait_for(lambda: _status_is(pool, delivery_id, "delivered"), timeout_s=60)
    attempts = await pool.fetch(
        "SELECT outcome, error FROM delivery_attempts WHERE delivery_id = $1 ORDER BY attempt_number",
        delivery_id,
    )
    assert [a["outcome"] for a in attempts] == ["retryable", "retryable", "delivered"]
    assert attempts[0]["error"].startswith("SMTP 451")
    assert len(scripted_smtp.accepted) == 1


async def _status_is(pool: asyncpg.Pool, delivery_id: uuid.UUID, status: str) -> bool:
    return bool(await pool.fetchval("SELECT status = $2 FROM deliveries WHERE id = $1", delivery_id, status))


async def test_permanent_failure_ends_failed_with_a_dead_letter_event(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,
) -> None:
    scripted_smtp.replies = ["550 5.1.1 mailbox unavailable"]
    accepted = await stub.SendNotification(email_only(), metadata=tenant.metadata)
    delivery_id = uuid.UUID(accepted.deliveries[0].delivery_id)
    async with running_pipeline(pool, settings, channels=("email",)):
        await wait_for(lambda: _status_is(pool, delivery_id, "failed"), timeout_s=60)
        got = await stub.GetNotification(
            notify_pb2.GetNotificationRequest(notification_id=accepted.notification_id),
            metadata=tenant.metadata,
        )
        await wait_for(lambda: _none_unpublished(pool), timeout_s=30)
    delivery = got.notification.deliveries[0]
    assert got.notification.status == notify_pb2.NOTIFICATION_STATUS_FAILED
    assert delivery.status == notify_pb2.DELIVERY_STATUS_FAILED
    assert delivery.attempts == 1
    assert delivery.last_error.startswith("SMTP 550")

    dead = await read_one(settings, dead_letter_topic("email", settings.kafka_topic_prefix))
    event = events_pb2.DeliveryDeadLettered.FromString(dead)
    assert event.delivery.delivery_id == str(delivery_id)
    assert event.reason.startswith("SMTP 550")
    assert [(a.attempt_number, a.outcome) for a in event.attempts] == [(1, "permanent")]


async def test_exhausted_attempts_end_failed(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,
) -> None:
    settings.worker_max_attempts = 3
    scripted_smtp.replies = [f"451 4.3.0 later, try {n}" for n in range(1, 11)]
    accepted = await stub.SendNotification(email_only(), metadata=tenant.metadata)
    delivery_id = uuid.UUID(accepted.deliveries[0].delivery_id)
    async with running_pipeline(pool, settings, channels=("email",)):
        await wait_for(lambda: _status_is(pool, delivery_id, "failed"), timeout_s=60)
        await wait_for(lambda: _none_unpublished(pool), timeout_s=30)
    row = await pool.fetchrow("SELECT attempts, last_error FROM deliveries WHERE id = $1", delivery_id)
    assert row is not None
    assert row["attempts"] == 3
    assert row["last_error"].startswith("gave up after 3 attempts: SMTP 451")

    # The dead letter carries the whole history: every attempt with its own error.
    dead = events_pb2.DeliveryDeadLettered.FromString(
        await read_one(settings, dead_letter_topic("email", settings.kafka_topic_prefix))
    )
    assert dead.delivery.delivery_id == str(delivery_id)
    assert dead.reason == row["last_error"]
    assert [(a.attempt_number, a.outcome, a.provider, a.error) for a in dead.attempts] == [
        (n, "retryable", "smtp", f"SMTP 451: 4.3.0 later, try {n} (reply to DATA)") for n in (1, 2, 3)
    ]
    starts = [a.start_time.ToDatetime() for a in dead.attempts]
    ends = [a.end_time.ToDatetime() for a in dead.attempts]
    assert all(start <= end for start, end in zip(starts, ends, strict=True))
    assert starts == sorted(starts)


async def _none_unpublished(pool: asyncpg.Pool) -> bool:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")) == 0


async def read_one(settings: Settings, topic: str) -> bytes:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"reader-{uuid.uuid4()}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
        return bytes(record.value or b"")
    finally:
        await consumer.stop()


def test_backoff_is_full_jitter_capped_exponential() -> None:
    import random

    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)]:
        samples = [backoff_delay_s(attempt, 1.0, 30.0, rng) for _ in range(500)]
        assert min(samples) >= 0.0
        assert max(samples) <= ceiling
        assert max(samples) > 0.8 * ceiling  # spread over the whole range (full jitter)
