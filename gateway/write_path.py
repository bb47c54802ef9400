"""The write path: accept validated notifications in ONE PostgreSQL transaction.

For each notification the transaction writes the idempotency record
(tenant + ``request_id``, with a SHA-256 of the request and the answer), the
notification, one delivery per channel and one outbox row per delivery; it
then ``NOTIFY``s the relay. The caller answers ACCEPTED only after the commit.

A ``request_id`` the tenant already used answers from its stored record and
writes nothing: the same request gets the first answer back; a different
request gets ``FAILED_PRECONDITION`` (Stripe's semantics). Two concurrent
requests with one key serialize on the primary key of ``idempotency_keys``:
the second waits for the first to commit, then replays its answer.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeAlias

import asyncpg
import uuid6
from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from channels.catalog import CHANNEL_VALUES, delivery_topic
from gateway.errors import idempotency_key_reused
from gateway.validation import NotificationPlan
from switchboard.notify.v1 import events_pb2, notify_pb2

#: How long a request_id is remembered (Stripe keeps keys 24 h); a setting.
DEFAULT_IDEMPOTENCY_RETENTION_S = 86_400.0

#: The channel relays LISTEN on; NOTIFY is delivered at commit.
OUTBOX_NOTIFY_CHANNEL = "switchboard_outbox"


@dataclass(frozen=True)
class AcceptRequest:
    """A validated request ready to be written."""

    request: notify_pb2.SendNotificationRequest
    plan: NotificationPlan


AcceptOutcome: TypeAlias = notify_pb2.SendNotificationResponse | status_pb2.Status


def request_fingerprint(request: notify_pb2.SendNotificationRequest) -> bytes:
    """SHA-256 of the deterministic protobuf encoding (map entries sorted).

    Two requests with the same fingerprint are the same request for
    idempotency purposes; field order in the client's encoding does not matter.
    """
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


def build_delivery_event(
    request: notify_pb2.SendNotificationRequest,
    *,
    tenant_id: uuid.UUID,
    notification_id: uuid.UUID,
    delivery_id: uuid.UUID,
    channel: str,
    recipient: str,
    accept_time: timestamp_pb2.Timestamp,
) -> events_pb2.DeliveryRequested:
    """The DeliveryRequested event for one channel of ``request``."""
    event = events_pb2.DeliveryRequested(
        delivery_id=str(delivery_id),
        notification_id=str(notification_id),
        tenant_id=str(tenant_id),
        channel=CHANNEL_VALUES[channel],  # type: ignore[arg-type]
        recipient=recipient,
        accept_time=accept_time,
    )
    if channel == "email":
        event.email.CopyFrom(request.email)
    elif channel == "sms":
        event.sms.CopyFrom(request.sms)
    else:
        event.push.CopyFrom(request.push)
    return event


@dataclass
class _Rows:
    notifications: list[tuple[object, ...]]
    deliveries: list[tuple[object, ...]]
    outbox: list[tuple[object, ...]]


def _plan_rows(
    tenant_id: uuid.UUID, item: AcceptRequest, topic_prefix: str, rows: _Rows
) -> notify_pb2.SendNotificationResponse:
    now = datetime.now(UTC)
    accept_time = timestamp_pb2.Timestamp()
    accept_time.FromDatetime(now)
    notification_id = uuid6.uuid7()
    response = notify_pb2.SendNotificationResponse(
        notification_id=str(notification_id), status=notify_pb2.NOTIFICATION_STATUS_ACCEPTED
    )
    plan = item.plan
    rows.notifications.append(
        (
            notification_id,
            tenant_id,
            item.request.request_id,
            json.dumps(dict(item.request.metadata)),
            now,
            list(plan.channels) if plan.fallback else [],
            json.dumps(plan.recipients) if plan.fallback else "{}",
            item.request.SerializeToString() if plan.fallback else None,
        )
    )
    key = str(tenant_id).encode("ascii")
    for channel in plan.channels[:1] if plan.fallback else plan.channels:
        delivery_id = uuid6.uuid7()
        recipient = item.plan.recipients[channel]
        event = build_delivery_event(
            item.request,
            tenant_id=tenant_id,
            notification_id=notification_id,
            delivery_id=delivery_id,
            channel=channel,
            recipient=recipient,
            accept_time=accept_time,
        ).SerializeToString()
        rows.deliveries.append((delivery_id, notification_id, tenant_id, channel, recipient, event, now))
        rows.outbox.append((delivery_topic(channel, topic_prefix), key, event, delivery_id, now))
        response.deliveries.add(channel=CHANNEL_VALUES[channel], delivery_id=str(delivery_id))
    return response


async def accept_notifications(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    items: list[AcceptRequest],
    *,
    topic_prefix: str = "",
    retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
) -> list[AcceptOutcome]:
    """Write ``items`` for ``tenant_id`` in one transaction; one outcome per item.

    An outcome is the ``SendNotificationResponse`` (new or replayed) or a
    ``google.rpc.Status`` (the request_id was used for a different request).
    A request_id older than ``retention_s`` seconds is treated as unused.
    Either everything new is committed or, on a database error (raised as
    asyncpg's exception), nothing is.
    """
    outcomes: list[AcceptOutcome] = []
    rows = _Rows([], [], [])
    async with pool.acquire() as conn, conn.transaction():
        for item in items:
            fingerprint = request_fingerprint(item.request)
            planned = _Rows([], [], [])
            response = _plan_rows(tenant_id, item, topic_prefix, planned)
            # A key older than the retention window counts as unused: it is
            # taken over (the reaper deletes such keys; this covers the gap).
            inserted = await conn.fetchval(
                """INSERT INTO idempotency_keys (tenant_id, request_id, request_hash, response)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (tenant_id, request_id) DO UPDATE
                      SET request_hash = excluded.request_hash, response = excluded.response,
                          created_at = now()
                    WHERE idempotency_keys.created_at < now() - make_interval(secs => $5)
                   RETURNING true""",
                tenant_id,
                item.request.request_id,
                fingerprint,
                response.SerializeToString(),
                retention_s,
            )
            if inserted:
                rows.notifications += planned.notifications
                rows.deliveries += planned.deliveries
                rows.outbox += planned.outbox
                outcomes.append(response)
                continue
            # A replay or a mismatch: nothing planned for this item is written.
            existing = await conn.fetchrow(
                """SELECT request_hash, response FROM idempotency_keys
                    WHERE tenant_id = $1 AND request_id = $2""",
                tenant_id,
                item.request.request_id,
            )
            assert existing is not None
            if existing["request_hash"] != fingerprint:
                outcomes.append(idempotency_key_reused(item.request.request_id))
            else:
                outcomes.append(notify_pb2.SendNotificationResponse.FromString(existing["response"]))
        if rows.notifications:
            await conn.executemany(
                """INSERT INTO notifications (id, tenant_id, request_id, metadata, created_at,
                                              fallback_channels, recipients, request)
                   VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7::jsonb, $8)""",
                rows.notifications,
            )
            await conn.executemany(
                """INSERT INTO deliveries (id, notification_id, tenant_id, channel, recipient, event,
                                           created_at, updated_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $7)""",
                rows.deliveries,
            )
            await conn.executemany(
                """INSERT INTO outbox (topic, key, payload, delivery_id, created_at)
                   VALUES ($1, $2, $3, $4, $5)""",
                rows.outbox,
            )
            await conn.execute("SELECT pg_notify($1, '')", OUTBOX_NOTIFY_CHANNEL)
    return outcomes
