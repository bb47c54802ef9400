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

import asyncio
import hashlib
import json
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeAlias

import asyncpg
import uuid6
from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from channels.catalog import CHANNEL_VALUES, delivery_topic
from gateway.errors import idempotency_key_reused, key_in_flux
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
            json.dumps(dict(item.request.metadata)) if item.request.metadata else "{}",
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


#: The whole write of a group of calls, as ONE statement (one round trip, one
#: commit): the idempotency keys first; only the items whose key was inserted
#: (new, or taken over after the retention window) get their notification,
#: deliveries and outbox rows; the relay is NOTIFYed when anything was
#: written. A single statement is atomic: all of it commits or none of it does.
#: Foreign keys are checked at the end of the statement, after every CTE has
#: inserted. Every array carries the tenant, so calls of several tenants can
#: share one statement (group commit, :class:`GroupCommit`).
ACCEPT_SQL = """
WITH k AS (
    INSERT INTO idempotency_keys AS ik (tenant_id, request_id, request_hash, response)
    SELECT t.tenant, t.r, t.h, t.resp
      FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[]) AS t(tenant, r, h, resp)
    ON CONFLICT (tenant_id, request_id) DO UPDATE
       SET request_hash = excluded.request_hash, response = excluded.response, created_at = now()
     WHERE ik.created_at < now() - make_interval(secs => $5)
    RETURNING ik.tenant_id, ik.request_id
),
n AS (
    INSERT INTO notifications (id, tenant_id, request_id, metadata, created_at,
                               fallback_channels, recipients, request)
    SELECT t.id, t.tenant, t.r, t.m::jsonb, t.c,
           ARRAY(SELECT jsonb_array_elements_text(t.f::jsonb)), t.rc::jsonb, t.q
      FROM unnest($6::uuid[], $7::uuid[], $8::text[], $9::text[], $10::timestamptz[], $11::text[],
                  $12::text[], $13::bytea[]) AS t(id, tenant, r, m, c, f, rc, q)
     WHERE (t.tenant, t.r) IN (SELECT tenant_id, request_id FROM k)
),
d AS (
    INSERT INTO deliveries (id, notification_id, tenant_id, channel, recipient, event,
                            created_at, updated_at)
    SELECT t.id, t.n, t.tenant, t.ch, t.rcp, t.e, t.c, t.c
      FROM unnest($14::uuid[], $15::uuid[], $16::uuid[], $17::text[], $18::text[], $19::text[],
                  $20::bytea[], $21::timestamptz[]) AS t(id, n, tenant, r, ch, rcp, e, c)
     WHERE (t.tenant, t.r) IN (SELECT tenant_id, request_id FROM k)
),
o AS (
    INSERT INTO outbox (topic, key, payload, delivery_id, created_at)
    SELECT t.topic, convert_to(t.tenant::text, 'UTF8'), t.e, t.id, t.c
      FROM unnest($22::text[], $20::bytea[], $14::uuid[], $21::timestamptz[], $16::uuid[], $17::text[])
           AS t(topic, e, id, c, tenant, r)
     WHERE (t.tenant, t.r) IN (SELECT tenant_id, request_id FROM k)
)
SELECT coalesce(array_agg(k.tenant_id), '{}') AS tenants,
       coalesce(array_agg(k.request_id), '{}') AS request_ids,
       CASE WHEN count(*) > 0 THEN pg_notify($23, '') END AS notified
  FROM k
"""

#: One call's share of a group write: its tenant and its validated items.
AcceptCall: TypeAlias = tuple[uuid.UUID, list[AcceptRequest]]


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
    asyncpg's exception), nothing is. See :func:`accept_calls`.
    """
    (outcomes,) = await accept_calls(
        pool, [(tenant_id, items)], topic_prefix=topic_prefix, retention_s=retention_s
    )
    return outcomes


async def accept_calls(
    pool: asyncpg.Pool,
    calls: list[AcceptCall],
    *,
    topic_prefix: str = "",
    retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
) -> list[list[AcceptOutcome]]:
    """Write several calls' items (of any tenants) in ONE statement; outcomes per call, per item.

    The write is :data:`ACCEPT_SQL`: one round trip and one commit, whatever
    the number of calls and items. A tenant + request_id repeated in the group
    is written once; the later items get the first one's answer (or the
    reuse error if their request differs). Keys are written in (tenant,
    request_id) order, so two concurrent groups never wait on each other's
    keys in opposite orders (no deadlock). Raises asyncpg's exception on a
    database error; nothing is written then.
    """
    flat = [(tenant_id, item) for tenant_id, items in calls for item in items]
    if not flat:
        return [[] for _ in calls]
    fingerprints = [request_fingerprint(item.request) for _, item in flat]
    first_of: dict[tuple[uuid.UUID, str], int] = {}
    rows = _Rows([], [], [])
    planned: dict[tuple[uuid.UUID, str], notify_pb2.SendNotificationResponse] = {}
    keys: list[tuple[uuid.UUID, str, bytes, bytes]] = []
    for index, (tenant_id, item) in enumerate(flat):
        key = (tenant_id, item.request.request_id)
        if key in first_of:
            continue
        first_of[key] = index
        response = _plan_rows(tenant_id, item, topic_prefix, rows)
        planned[key] = response
        keys.append((tenant_id, item.request.request_id, fingerprints[index], response.SerializeToString()))
    keys.sort(key=lambda k: (k[0], k[1]))
    request_of = {n[0]: n[2] for n in rows.notifications}  # notification id -> request_id
    record = await pool.fetchrow(
        ACCEPT_SQL,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [k[3] for k in keys],
        retention_s,
        [n[0] for n in rows.notifications],
        [n[1] for n in rows.notifications],
        [n[2] for n in rows.notifications],
        [n[3] for n in rows.notifications],
        [n[4] for n in rows.notifications],
        [json.dumps(n[5]) if n[5] else "[]" for n in rows.notifications],
        [n[6] for n in rows.notifications],
        [n[7] for n in rows.notifications],
        [d[0] for d in rows.deliveries],
        [d[1] for d in rows.deliveries],
        [d[2] for d in rows.deliveries],
        [request_of[d[1]] for d in rows.deliveries],
        [d[3] for d in rows.deliveries],
        [d[4] for d in rows.deliveries],
        [d[5] for d in rows.deliveries],
        [d[6] for d in rows.deliveries],
        [o[0] for o in rows.outbox],
        OUTBOX_NOTIFY_CHANNEL,
    )
    assert record is not None
    inserted = set(zip(record["tenants"], record["request_ids"], strict=True))
    stored: dict[tuple[uuid.UUID, str], asyncpg.Record] = {}
    missing = [(k[0], k[1]) for k in keys if (k[0], k[1]) not in inserted]
    if missing:
        # Replays and mismatches: the keys were committed before (possibly by a
        # concurrent call this statement waited for); read them after our commit.
        for row in await pool.fetch(
            """SELECT k.tenant_id, k.request_id, k.request_hash, k.response
                 FROM idempotency_keys k
                 JOIN unnest($1::uuid[], $2::text[]) AS m(tenant, r)
                   ON k.tenant_id = m.tenant AND k.request_id = m.r""",
            [m[0] for m in missing],
            [m[1] for m in missing],
        ):
            stored[(row["tenant_id"], row["request_id"])] = row
    outcomes: list[AcceptOutcome] = []
    for index, (tenant_id, item) in enumerate(flat):
        key = (tenant_id, item.request.request_id)
        if key in inserted:
            same = fingerprints[index] == fingerprints[first_of[key]]
            outcomes.append(planned[key] if same else idempotency_key_reused(key[1]))
            continue
        existing = stored.get(key)
        if existing is None:
            # Reaped between our conflict and our read: the key is free again.
            outcomes.append(key_in_flux(key[1]))
        elif existing["request_hash"] != fingerprints[index]:
            outcomes.append(idempotency_key_reused(key[1]))
        else:
            outcomes.append(notify_pb2.SendNotificationResponse.FromString(existing["response"]))
    per_call: list[list[AcceptOutcome]] = []
    offset = 0
    for _, items in calls:
        per_call.append(outcomes[offset : offset + len(items)])
        offset += len(items)
    return per_call


@dataclass
class _Waiting:
    call: AcceptCall
    future: asyncio.Future[list[AcceptOutcome]]


class GroupCommit:
    """Group commit of accepts: concurrent calls share one statement and one commit.

    A call that finds a free writer is written at once (no added latency when
    the gateway is idle). While all ``writers`` are busy, arriving calls queue;
    a writer that finishes takes everything queued (up to ``max_items``
    notifications) into its next statement. Batch size thus follows the load:
    1 at low load, dozens under pressure, which cuts PostgreSQL transactions,
    WAL flushes and round trips per notification. Each caller is answered only
    after the commit that holds its rows, so ACCEPTED keeps its meaning.

    A database error fails every call of that group (each answers UNAVAILABLE
    and the client retries with the same request_id). A caller cancelled
    while waiting (deadline) does not cancel the write: the others depend on it.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        topic_prefix: str = "",
        retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
        writers: int = 4,
        max_items: int = 1000,
    ) -> None:
        self._pool = pool
        self._topic_prefix = topic_prefix
        self._retention_s = retention_s
        self._writers = writers
        self._max_items = max_items
        self._busy = 0
        self._queue: deque[_Waiting] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Statements written and calls they carried (for metrics and tests).
        self.statements = 0
        self.calls = 0

    async def accept(self, tenant_id: uuid.UUID, items: list[AcceptRequest]) -> list[AcceptOutcome]:
        """Write one call's ``items``; return one outcome per item after the commit.

        Raises asyncpg's exception if the group's write failed (nothing of it is written).
        """
        future: asyncio.Future[list[AcceptOutcome]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting((tenant_id, items), future))
        self._start_writers()
        return await future

    async def wait_idle(self) -> None:
        """Return once every write started so far has finished (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start_writers(self) -> None:
        while self._queue and self._busy < self._writers:
            group = [self._queue.popleft()]
            size = len(group[0].call[1])
            while self._queue and size + len(self._queue[0].call[1]) <= self._max_items:
                waiting = self._queue.popleft()
                size += len(waiting.call[1])
                group.append(waiting)
            self._busy += 1
            task = asyncio.create_task(self._write(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, group: list[_Waiting]) -> None:
        live = [w for w in group if not w.future.done()]  # callers gone before we started
        try:
            if live:
                results = await accept_calls(
                    self._pool,
                    [w.call for w in live],
                    topic_prefix=self._topic_prefix,
                    retention_s=self._retention_s,
                )
                self.statements += 1
                self.calls += len(live)
                for waiting, outcomes in zip(live, results, strict=True):
                    if not waiting.future.done():
                        waiting.future.set_result(outcomes)
        except BaseException as exc:
            for waiting in live:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy -= 1
            self._start_writers()
