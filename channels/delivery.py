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

import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import asyncpg
from google.protobuf import timestamp_pb2

from channels.catalog import CHANNEL_NAMES, dead_letter_topic, delivery_topic
from channels.provider import DeliveryError, Provider, RetryableDeliveryError
from gateway.write_path import OUTBOX_NOTIFY_CHANNEL
from switchboard.db.pool import Connection
from switchboard.notify.v1 import events_pb2

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


async def claim_delivery(pool: asyncpg.Pool, event: events_pb2.DeliveryRequested) -> int | None:
    """Mark the delivery SENDING and open attempt N; return N, or ``None`` for a duplicate event."""
    async with pool.acquire() as tx, tx.transaction():
        attempt = await tx.fetchval(
            """UPDATE deliveries
                  SET status = 'sending', attempts = attempts + 1, updated_at = now(),
                      next_attempt_at = NULL
                WHERE id = $1 AND tenant_id = $2
                  AND status IN ('queued', 'sending')
                  AND (next_attempt_at IS NULL OR next_attempt_at <= now())
            RETURNING attempts""",
            uuid.UUID(event.delivery_id),
            uuid.UUID(event.tenant_id),
        )
        if attempt is None:
            return None
        await tx.execute(
            "INSERT INTO delivery_attempts (delivery_id, attempt_number, provider) VALUES ($1, $2, '')",
            uuid.UUID(event.delivery_id),
            attempt,
        )
        return int(attempt)


async def record_delivered(
    pool: asyncpg.Pool,
    event: events_pb2.DeliveryRequested,
    attempt: int,
    provider_name: str,
    provider_message_id: str,
) -> None:
    """Record a successful attempt: the delivery becomes DELIVERED (final)."""
    delivery_id = uuid.UUID(event.delivery_id)
    async with pool.acquire() as tx, tx.transaction():
        await tx.execute(
            """UPDATE delivery_attempts
                  SET outcome = 'delivered', provider = $3, provider_message_id = $4, finished_at = now()
                WHERE delivery_id = $1 AND attempt_number = $2""",
            delivery_id,
            attempt,
            provider_name,
            provider_message_id,
        )
        await tx.execute(
            """UPDATE deliveries SET status = 'delivered', provider = $2, provider_message_id = $3,
                      last_error = '', updated_at = now()
                WHERE id = $1""",
            delivery_id,
            provider_name,
            provider_message_id,
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


async def record_failure(
    pool: asyncpg.Pool,
    event: events_pb2.DeliveryRequested,
    attempt: int,
    error: DeliveryError,
    *,
    provider_name: str,
    max_attempts: int,
    retry_delay_s: float,
    topic_prefix: str,
) -> Outcome:
    """Record a failed attempt; schedule a retry or end FAILED with a dead-letter event."""
    delivery_id = uuid.UUID(event.delivery_id)
    reason = error.reason[:ERROR_TEXT_MAX_CHARS]
    retry = error.retryable and attempt < max_attempts
    channel = CHANNEL_NAMES[event.channel]
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
        await tx.execute("UPDATE deliveries SET provider = $2 WHERE id = $1", delivery_id, provider_name)
        if retry:
            due = datetime.now(UTC) + timedelta(seconds=retry_delay_s)
            await tx.execute(
                """UPDATE deliveries SET status = 'queued', last_error = $2, next_attempt_at = $3,
                          last_enqueued_at = now(), updated_at = now() WHERE id = $1""",
                delivery_id,
                reason,
                due,
            )
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
        final_reason = reason if not error.retryable else f"gave up after {attempt} attempts: {reason}"
        await tx.execute(
            "UPDATE deliveries SET status = 'failed', last_error = $2, updated_at = now() WHERE id = $1",
            delivery_id,
            final_reason,
        )
        dead = events_pb2.DeliveryDeadLettered(
            delivery=event,
            reason=final_reason,
            attempts=await _attempt_history(tx, delivery_id),
            dead_letter_time=_timestamp(datetime.now(UTC)),
        )
        await tx.execute(
            "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
            dead_letter_topic(channel, topic_prefix),
            event.tenant_id.encode("ascii"),
            dead.SerializeToString(),
        )
        await tx.execute("SELECT pg_notify($1, '')", OUTBOX_NOTIFY_CHANNEL)
        return Outcome.FAILED


async def deliver(
    pool: asyncpg.Pool,
    event: events_pb2.DeliveryRequested,
    provider_for: Callable[[], Awaitable[Provider]],
    *,
    max_attempts: int,
    retry_base_s: float,
    retry_cap_s: float,
    topic_prefix: str = "",
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
    delay = backoff_delay_s(attempt, retry_base_s, retry_cap_s)
    if error.retry_after_s is not None:
        delay = max(delay, error.retry_after_s)
    return await record_failure(
        pool,
        event,
        attempt,
        error,
        provider_name=provider_name,
        max_attempts=max_attempts,
        retry_delay_s=delay,
        topic_prefix=topic_prefix,
    )
