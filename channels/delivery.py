"""One delivery attempt, from claim to recorded outcome: the worker's domain logic.

``deliver`` is called once per consumed DeliveryRequested event:

1. **Claim** (one transaction): move the delivery to SENDING and count the
   attempt, unless it is already final (DELIVERED/FAILED) or a retry is
   scheduled for later: then the event is a duplicate and nothing happens
   (idempotent consumer).
2. **Send** through the tenant's provider, outside any transaction.
3. **Record** (one transaction): the attempt's outcome and the new status.
   A retryable failure with attempts left schedules the retry as an outbox row
   due after a backoff with full jitter (never a sleep in the consumer); a
   permanent failure or the last attempt ends FAILED and writes the
   DeliveryDeadLettered event to the ``.dlq`` topic through the outbox.

The caller commits the Kafka offset only after ``deliver`` returns.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import asyncpg
import uuid6
from google.protobuf import timestamp_pb2

from channels.callbacks import build_status_payload, enqueue_status_change
from channels.catalog import CHANNEL_NAMES, dead_letter_topic, delivery_topic
from channels.provider import DeliveryError, Provider, RetryableDeliveryError
from gateway.status_stream import DELIVERY_STATUS_CHANNEL, notify_delivery_status_changed
from gateway.write_path import OUTBOX_NOTIFY_CHANNEL, build_delivery_event
from switchboard.db.pool import Connection
from switchboard.notify.v1 import events_pb2, notify_pb2

#: Longest error text stored per attempt (characters).
ERROR_TEXT_MAX_CHARS = 1000


class Outcome(StrEnum):
    """What ``deliver`` did with one event."""

    DELIVERED = "delivered"
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"
    SKIPPED = "skipped"


def backoff_delay_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**(attempt-1))].

    Source: AWS Architecture Blog, "Exponential Backoff And Jitter" (2015).
    ``attempt`` is the 1-based number of the attempt that just failed.
    """
    ceiling = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0.0, ceiling)


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


#: Unix time in seconds (``time.time``); injectable so tests can move time without waiting.
Clock = Callable[[], float]


def _utc(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock(), UTC)


async def _status_changed(
    tx: Connection,
    event: events_pb2.DeliveryRequested,
    status: str,
    attempt: int,
    error: str = "",
    *,
    occurred_at: datetime,
) -> None:
    """Queue the tenant's signed status callback (if it has one) in the same transaction."""
    await notify_delivery_status_changed(tx, event.notification_id)  # WatchNotification (sent at commit)
    await enqueue_status_change(
        tx,
        tenant_id=event.tenant_id,
        delivery_id=event.delivery_id,
        notification_id=event.notification_id,
        channel=CHANNEL_NAMES[event.channel],
        status=status,
        attempt=attempt,
        error=error,
        provider_message_id="",
        occurred_at=occurred_at,
    )


#: Claim a delivery as ONE statement (one round trip, one commit): SENDING with
#: attempts + 1 unless it is final or its retry is not due (a duplicate event),
#: open the attempt row, queue the tenant's status callback (with the attempt
#: number the UPDATE produced) and announce the change to watchers at commit.
CLAIM_SQL = """
WITH u AS (
    UPDATE deliveries
       SET status = 'sending', attempts = attempts + 1, updated_at = now(), next_attempt_at = NULL
     WHERE id = $1 AND tenant_id = $2
       AND status IN ('queued', 'sending')
       AND (next_attempt_at IS NULL OR next_attempt_at <= now())
    RETURNING attempts
),
a AS (
    INSERT INTO delivery_attempts (delivery_id, attempt_number, provider)
    SELECT $1, attempts, '' FROM u
),
c AS (
    INSERT INTO callback_deliveries (tenant_id, delivery_id, payload)
    SELECT t.tenant_id, $1, jsonb_set($3::jsonb, '{attempt}', to_jsonb(u.attempts))
      FROM tenant_callbacks t, u
     WHERE t.tenant_id = $2
)
SELECT u.attempts, pg_notify($4, $5) FROM u
"""

#: Record a successful attempt as ONE statement: the attempt row, the delivery
#: (DELIVERED, final), the tenant's status callback and the watchers' NOTIFY.
DELIVERED_SQL = """
WITH a AS (
    UPDATE delivery_attempts
       SET outcome = 'delivered', provider = $3, provider_message_id = $4, finished_at = now()
     WHERE delivery_id = $1 AND attempt_number = $2
),
d AS (
    UPDATE deliveries SET status = 'delivered', provider = $3, provider_message_id = $4,
           last_error = '', updated_at = now()
     WHERE id = $1
),
c AS (
    INSERT INTO callback_deliveries (tenant_id, delivery_id, payload)
    SELECT tenant_id, $1, $6::jsonb FROM tenant_callbacks WHERE tenant_id = $5
)
SELECT pg_notify($7, $8)
"""


def _callback_payload(
    event: events_pb2.DeliveryRequested, status: str, attempt: int, provider_message_id: str = ""
) -> str:
    return json.dumps(
        build_status_payload(
            tenant_id=event.tenant_id,
            delivery_id=event.delivery_id,
            notification_id=event.notification_id,
            channel=CHANNEL_NAMES[event.channel],
            status=status,
            attempt=attempt,
            error="",
            provider_message_id=provider_message_id,
            occurred_at=datetime.now(UTC),
        ),
        separators=(",", ":"),
    )


async def claim_delivery(pool: asyncpg.Pool, event: events_pb2.DeliveryRequested) -> int | None:
    """Mark the delivery SENDING and open attempt N; return N, or ``None`` for a duplicate event.

    One statement (:data:`CLAIM_SQL`); raises asyncpg's exception on a database error.
    """
    attempt = await pool.fetchval(
        CLAIM_SQL,
        uuid.UUID(event.delivery_id),
        uuid.UUID(event.tenant_id),
        _callback_payload(event, "sending", 0),
        DELIVERY_STATUS_CHANNEL,
        event.notification_id,
    )
    return None if attempt is None else int(attempt)


async def record_delivered(
    pool: asyncpg.Pool,
    event: events_pb2.DeliveryRequested,
    attempt: int,
    provider_name: str,
    provider_message_id: str,
) -> None:
    """Record a successful attempt: the delivery becomes DELIVERED (final). One statement."""
    await pool.execute(
        DELIVERED_SQL,
        uuid.UUID(event.delivery_id),
        attempt,
        provider_name,
        provider_message_id,
        uuid.UUID(event.tenant_id),
        _callback_payload(event, "delivered", attempt, provider_message_id),
        DELIVERY_STATUS_CHANNEL,
        event.notification_id,
    )


async def _attempt_history(tx: Connection, delivery_id: uuid.UUID) -> list[events_pb2.DeliveryAttempt]:
    rows = await tx.fetch(
        """SELECT attempt_number, provider, outcome, error, started_at, finished_at
             FROM delivery_attempts WHERE delivery_id = $1 ORDER BY attempt_number""",
        delivery_id,
    )
    return [
        events_pb2.DeliveryAttempt(
            attempt_number=r["attempt_number"],
            provider=r["provider"],
            outcome=r["outcome"],
            error=r["error"],
            start_time=_timestamp(r["started_at"]),
            end_time=_timestamp(r["finished_at"] or r["started_at"]),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class RetryPolicy:
    """How long a delivery keeps trying: ``max_attempts`` per replay, and while
    ``max_age_s`` seconds have not passed since the notification was accepted
    or, after a DLQ replay, since that replay; backoff bounds in seconds."""

    max_attempts: int
    max_age_s: float
    base_s: float
    cap_s: float


def _give_up_reason(
    error: DeliveryError, attempts_this_replay: int, age_s: float, policy: RetryPolicy, reason: str
) -> str | None:
    """``None`` to retry, or the final reason recorded on the delivery."""
    if not error.retryable:
        return reason
    if attempts_this_replay >= policy.max_attempts:
        return f"gave up after {attempts_this_replay} attempts: {reason}"
    if age_s >= policy.max_age_s:
        return f"gave up: older than {policy.max_age_s:.0f} s: {reason}"
    return None


async def _start_next_fallback(
    tx: Connection,
    event: events_pb2.DeliveryRequested,
    chain_position: int,
    topic_prefix: str,
    now: datetime,
) -> events_pb2.DeliveryRequested | None:
    """Create the delivery for the next channel of the notification's fallback
    chain, with its outbox row and its QUEUED status callback, in ``tx``.

    Returns ``None`` when there is no next channel, and also when the next
    position already exists: a link that fails again after a DLQ replay does
    not start the rest of the chain a second time (the unique index
    ``deliveries_chain_link_key`` of migration 0014 makes a second delivery at
    one position impossible, even for two workers at once).
    """
    notification = await tx.fetchrow(
        "SELECT fallback_channels, recipients, request FROM notifications WHERE id = $1",
        uuid.UUID(event.notification_id),
    )
    if notification is None or chain_position + 1 >= len(notification["fallback_channels"]):
        return None
    channel = notification["fallback_channels"][chain_position + 1]
    request = notify_pb2.SendNotificationRequest.FromString(notification["request"])
    next_id = uuid6.uuid7()
    next_event = build_delivery_event(
        request,
        tenant_id=uuid.UUID(event.tenant_id),
        notification_id=uuid.UUID(event.notification_id),
        delivery_id=next_id,
        channel=channel,
        recipient=json.loads(notification["recipients"])[channel],
        accept_time=event.accept_time,
    )
    payload = next_event.SerializeToString()
    created = await tx.fetchval(
        """INSERT INTO deliveries (id, notification_id, tenant_id, channel, recipient, event, chain_position)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (notification_id, chain_position) WHERE chain_position > 0 DO NOTHING
           RETURNING id""",
        next_id,
        uuid.UUID(event.notification_id),
        uuid.UUID(event.tenant_id),
        channel,
        next_event.recipient,
        payload,
        chain_position + 1,
    )
    if created is None:
        return None
    await tx.execute(
        "INSERT INTO outbox (topic, key, payload, delivery_id) VALUES ($1, $2, $3, $4)",
        delivery_topic(channel, topic_prefix),
        event.tenant_id.encode("ascii"),
        payload,
        next_id,
    )
    await _status_changed(tx, next_event, "queued", 0, occurred_at=now)
    return next_event


async def record_failure(
    pool: asyncpg.Pool,
    event: events_pb2.DeliveryRequested,
    attempt: int,
    error: DeliveryError,
    *,
    provider_name: str,
    policy: RetryPolicy,
    retry_delay_s: float,
    topic_prefix: str,
    clock: Clock = time.time,
) -> Outcome:
    """Record a failed attempt; schedule a retry, or end FAILED.

    A retryable ``error`` is retried ``retry_delay_s`` seconds from now unless
    the policy's attempt or age limit is reached; both count from the last DLQ
    replay if there was one (a replay gets a fresh budget), else from the
    first attempt and the notification's accept time. ``clock`` gives "now"
    (Unix seconds) for the age, the due time and the status callback.

    Ending FAILED writes the dead letter (a ``dead_letters`` row and the
    DeliveryDeadLettered event to ``notify.<channel>.dlq`` through the outbox)
    and, for a fallback notification, starts the delivery on the next channel
    (unless it exists already), all in the same transaction.
    """
    delivery_id = uuid.UUID(event.delivery_id)
    reason = error.reason[:ERROR_TEXT_MAX_CHARS]
    channel = CHANNEL_NAMES[event.channel]
    now = _utc(clock)
    async with pool.acquire() as tx, tx.transaction():
        await tx.execute(
            """UPDATE delivery_attempts SET outcome = $3, error = $4, provider = $5, finished_at = now()
                WHERE delivery_id = $1 AND attempt_number = $2""",
            delivery_id,
            attempt,
            "retryable" if error.retryable else "permanent",
            reason,
            provider_name,
        )
        row = await tx.fetchrow(
            """UPDATE deliveries SET provider = $2 WHERE id = $1
               RETURNING attempts_before_replay, chain_position, last_replayed_at""",
            delivery_id,
            provider_name,
        )
        assert row is not None
        budget_start = event.accept_time.ToDatetime(tzinfo=UTC)
        if row["last_replayed_at"] is not None:
            budget_start = max(budget_start, row["last_replayed_at"])
        age_s = (now - budget_start).total_seconds()
        final_reason = _give_up_reason(error, attempt - row["attempts_before_replay"], age_s, policy, reason)
        if final_reason is None:
            due = now + timedelta(seconds=retry_delay_s)
            await tx.execute(
                """UPDATE deliveries SET status = 'queued', last_error = $2, next_attempt_at = $3,
                          last_enqueued_at = now(), updated_at = now() WHERE id = $1""",
                delivery_id,
                reason,
                due,
            )
            await _status_changed(tx, event, "queued", attempt, reason, occurred_at=now)
            await tx.execute(
                """INSERT INTO outbox (topic, key, payload, delivery_id, available_at)
                   VALUES ($1, $2, $3, $4, $5)""",
                delivery_topic(channel, topic_prefix),
                event.tenant_id.encode("ascii"),
                event.SerializeToString(),
                delivery_id,
                due,
            )
            return Outcome.RETRY_SCHEDULED
        await tx.execute(
            "UPDATE deliveries SET status = 'failed', last_error = $2, updated_at = now() WHERE id = $1",
            delivery_id,
            final_reason,
        )
        await _status_changed(tx, event, "failed", attempt, final_reason, occurred_at=now)
        dead = events_pb2.DeliveryDeadLettered(
            delivery=event,
            reason=final_reason,
            attempts=await _attempt_history(tx, delivery_id),
            dead_letter_time=_timestamp(now),
        )
        await tx.execute(
            "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
            dead_letter_topic(channel, topic_prefix),
            event.tenant_id.encode("ascii"),
            dead.SerializeToString(),
        )
        await tx.execute(
            """INSERT INTO dead_letters (delivery_id, tenant_id, channel, reason, attempts)
               VALUES ($1, $2, $3, $4, $5)""",
            delivery_id,
            uuid.UUID(event.tenant_id),
            channel,
            final_reason,
            attempt,
        )
        await _start_next_fallback(tx, event, row["chain_position"], topic_prefix, now)
        await tx.execute("SELECT pg_notify($1, '')", OUTBOX_NOTIFY_CHANNEL)
        return Outcome.FAILED


async def deliver(
    pool: asyncpg.Pool,
    event: events_pb2.DeliveryRequested,
    provider_for: Callable[[], Awaitable[Provider]],
    *,
    policy: RetryPolicy,
    topic_prefix: str = "",
    clock: Clock = time.time,
) -> Outcome:
    """Claim, send and record one delivery event; see the module docstring.

    ``provider_for`` resolves the tenant's provider after the claim, so a
    tenant that is disabled or has no provider gets a recorded, final FAILED
    (its ``PermanentDeliveryError``) instead of an endless redelivery.
    Database errors propagate (the caller must not commit the offset then).
    """
    attempt = await claim_delivery(pool, event)
    if attempt is None:
        return Outcome.SKIPPED
    provider_name = ""
    error: DeliveryError
    try:
        provider = await provider_for()
        provider_name = provider.name
        result = await provider.send(event)
    except DeliveryError as failure:
        error = failure
    except Exception as exc:  # an unknown failure is retryable, a bounded number of times
        error = RetryableDeliveryError(f"unexpected provider error: {type(exc).__name__}")
    else:
        await record_delivered(pool, event, attempt, provider_name, result.provider_message_id)
        return Outcome.DELIVERED
    delay = backoff_delay_s(attempt, policy.base_s, policy.cap_s)
    if error.retry_after_s is not None:
        delay = max(delay, error.retry_after_s)
    return await record_failure(
        pool,
        event,
        attempt,
        error,
        provider_name=provider_name,
        policy=policy,
        retry_delay_s=delay,
        topic_prefix=topic_prefix,
        clock=clock,
    )
