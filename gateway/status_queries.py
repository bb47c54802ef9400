"""Status reads: notifications with their deliveries, always scoped to one tenant.

- :func:`get_notification`: one notification (GetNotification, WatchNotification).
- :func:`list_notifications`: one page of a tenant's notifications, newest
  first, for ListNotifications. Pagination follows AIP-158 (``page_size``
  0-1000, 0 meaning 50; an opaque ``page_token`` that is only valid with the
  same filters); the filters are explicit request fields in the spirit of
  AIP-160 (``status``, ``channel``, ``create_time_after``,
  ``create_time_before``). :func:`parse_list_request` turns a request into a
  :class:`ListQuery` or raises ``RequestInvalid`` naming each bad field
  (AIP-193 ``BadRequest``).

A notification's status is not stored: it is derived from its deliveries by
:func:`notification_status`. Filtering by status is done in SQL by
:data:`NOTIFICATION_STATUS_SQL`, an aggregate over the deliveries that mirrors
that function exactly (fallback chains included); a test compares the two on
every combination of delivery statuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from google.protobuf import timestamp_pb2

from channels.catalog import CHANNEL_NAMES, CHANNEL_VALUES
from gateway import pagination
from gateway.validation import FieldViolation, RequestInvalid
from switchboard.db.pool import Connection
from switchboard.notify.v1 import notify_pb2

DELIVERY_STATUS_VALUES: dict[str, notify_pb2.DeliveryStatus.ValueType] = {
    "queued": notify_pb2.DELIVERY_STATUS_QUEUED,
    "sending": notify_pb2.DELIVERY_STATUS_SENDING,
    "delivered": notify_pb2.DELIVERY_STATUS_DELIVERED,
    "failed": notify_pb2.DELIVERY_STATUS_FAILED,
}
FINAL_DELIVERY_STATUSES = frozenset({"delivered", "failed"})
#: Notification statuses after which nothing changes any more.
FINAL_NOTIFICATION_STATUSES: frozenset[notify_pb2.NotificationStatus.ValueType] = frozenset(
    {
        notify_pb2.NOTIFICATION_STATUS_DELIVERED,
        notify_pb2.NOTIFICATION_STATUS_PARTIALLY_DELIVERED,
        notify_pb2.NOTIFICATION_STATUS_FAILED,
    }
)

#: AIP-158: the page size when the request leaves ``page_size`` at 0, and the largest accepted.
PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 1000

#: The name :data:`NOTIFICATION_STATUS_SQL` yields for each filterable status.
STATUS_SQL_NAMES: dict[notify_pb2.NotificationStatus.ValueType, str] = {
    notify_pb2.NOTIFICATION_STATUS_ACCEPTED: "accepted",
    notify_pb2.NOTIFICATION_STATUS_DELIVERED: "delivered",
    notify_pb2.NOTIFICATION_STATUS_PARTIALLY_DELIVERED: "partially_delivered",
    notify_pb2.NOTIFICATION_STATUS_FAILED: "failed",
}

#: :func:`notification_status` as an aggregate over ``deliveries d`` of the
#: notification ``n`` (use it in a subquery ``FROM deliveries d WHERE
#: d.notification_id = n.id``). ``n.fallback_channels`` is constant within the
#: aggregate. Yields a :data:`STATUS_SQL_NAMES` value.
NOTIFICATION_STATUS_SQL = """
    CASE
      WHEN cardinality(n.fallback_channels) > 0 THEN
        CASE
          WHEN count(*) FILTER (WHERE d.status = 'delivered') > 0 THEN 'delivered'
          WHEN count(*) >= cardinality(n.fallback_channels)
               AND count(*) FILTER (WHERE d.status = 'failed') = count(*) THEN 'failed'
          ELSE 'accepted'
        END
      WHEN count(*) = 0
           OR count(*) FILTER (WHERE d.status IN ('delivered', 'failed')) < count(*) THEN 'accepted'
      WHEN count(*) FILTER (WHERE d.status = 'delivered') = count(*) THEN 'delivered'
      WHEN count(*) FILTER (WHERE d.status = 'failed') = count(*) THEN 'failed'
      ELSE 'partially_delivered'
    END"""

_NOTIFICATION_COLUMNS = "n.id, n.request_id, n.metadata, n.created_at, n.fallback_channels"
_DELIVERY_COLUMNS = """id, notification_id, channel, recipient, status, attempts, last_error, provider,
                       provider_message_id, updated_at, chain_position"""


def notification_status(
    delivery_statuses: Iterable[str], chain_length: int = 0
) -> notify_pb2.NotificationStatus.ValueType:
    """Derive a notification's status from its deliveries' statuses (names as stored).

    ACCEPTED while any delivery is not final; then DELIVERED, FAILED or
    PARTIALLY_DELIVERED. For a fallback chain of ``chain_length`` channels:
    DELIVERED once any delivery is, FAILED when every channel of the chain
    failed, ACCEPTED otherwise.
    """
    statuses = list(delivery_statuses)
    if chain_length:
        if "delivered" in statuses:
            return notify_pb2.NOTIFICATION_STATUS_DELIVERED
        if len(statuses) >= chain_length and all(s == "failed" for s in statuses):
            return notify_pb2.NOTIFICATION_STATUS_FAILED
        return notify_pb2.NOTIFICATION_STATUS_ACCEPTED
    if not statuses or any(s not in FINAL_DELIVERY_STATUSES for s in statuses):
        return notify_pb2.NOTIFICATION_STATUS_ACCEPTED
    if all(s == "delivered" for s in statuses):
        return notify_pb2.NOTIFICATION_STATUS_DELIVERED
    if all(s == "failed" for s in statuses):
        return notify_pb2.NOTIFICATION_STATUS_FAILED
    return notify_pb2.NOTIFICATION_STATUS_PARTIALLY_DELIVERED


def _timestamp(value: object) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)  # type: ignore[arg-type]
    return ts


def _notification_message(
    row: asyncpg.Record, deliveries: Sequence[asyncpg.Record]
) -> notify_pb2.Notification:
    """A ``Notification`` from its ``notifications`` row and its ``deliveries`` rows (in display order)."""
    notification = notify_pb2.Notification(
        notification_id=str(row["id"]),
        request_id=row["request_id"],
        status=notification_status((d["status"] for d in deliveries), len(row["fallback_channels"])),
        fallback_channels=[CHANNEL_VALUES[c] for c in row["fallback_channels"]],  # type: ignore[misc]
        metadata=json.loads(row["metadata"]),
        create_time=_timestamp(row["created_at"]),
    )
    for d in deliveries:
        notification.deliveries.add(
            delivery_id=str(d["id"]),
            channel=CHANNEL_VALUES[d["channel"]],
            recipient=d["recipient"],
            status=DELIVERY_STATUS_VALUES[d["status"]],
            attempts=d["attempts"],
            last_error=d["last_error"],
            provider=d["provider"],
            provider_message_id=d["provider_message_id"],
            update_time=_timestamp(d["updated_at"]),
            chain_position=d["chain_position"],
        )
    return notification


async def get_notification(
    conn: asyncpg.Pool | Connection, tenant_id: uuid.UUID, notification_id: uuid.UUID
) -> notify_pb2.Notification | None:
    """The notification ``notification_id`` of ``tenant_id`` with its deliveries, or ``None``.

    Another tenant's notification is ``None`` as well: ids never cross tenants.
    """
    row = await conn.fetchrow(
        f"""SELECT {_NOTIFICATION_COLUMNS} FROM notifications n
            WHERE n.id = $1 AND n.tenant_id = $2""",  # noqa: S608 (a column-list constant; values are bound)
        notification_id,
        tenant_id,
    )
    if row is None:
        return None
    deliveries = await conn.fetch(
        f"""SELECT {_DELIVERY_COLUMNS}
             FROM deliveries WHERE notification_id = $1 AND tenant_id = $2
            ORDER BY chain_position, channel""",  # noqa: S608 (a column-list constant; values are bound)
        notification_id,
        tenant_id,
    )
    return _notification_message(row, deliveries)


@dataclass(frozen=True)
class ListQuery:
    """A validated ListNotifications request.

    ``status`` is a :data:`STATUS_SQL_NAMES` value and ``channel`` a channel
    name (``None``: no filter). ``created_after``/``created_before`` are
    exclusive bounds. ``after`` is the page token's cursor: ``(created_at, id)``
    of the last notification of the previous page.
    """

    page_size: int
    status: str | None = None
    channel: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    after: tuple[datetime, uuid.UUID] | None = None

    def filter_fingerprint(self) -> str:
        """A short digest of the filters, carried in page tokens (AIP-158: a token
        is only valid with the request parameters it was issued for)."""
        filters = [
            self.status,
            self.channel,
            self.created_after.isoformat() if self.created_after else None,
            self.created_before.isoformat() if self.created_before else None,
        ]
        return hashlib.sha256(json.dumps(filters).encode()).hexdigest()[:16]


_FOREIGN_CURSOR = "not a page token from a previous ListNotifications answer with the same filters"


def encode_page_token(query: ListQuery, created_at: datetime, notification_id: uuid.UUID) -> str:
    """An opaque AIP-158 page token: "after this item, with these filters" (gateway/pagination.py)."""
    return pagination.encode_page_token(created_at, notification_id, query.filter_fingerprint())


def decode_page_token(token: str, query: ListQuery) -> tuple[datetime, uuid.UUID]:
    """The cursor in ``token``; raises ``ValueError`` for a token we did not issue
    or one issued for other filters than ``query``'s."""
    return pagination.decode_page_token(token, query.filter_fingerprint(), _FOREIGN_CURSOR)


def parse_list_request(request: notify_pb2.ListNotificationsRequest) -> ListQuery:
    """Validate a ListNotifications request; raises ``RequestInvalid`` naming every bad field.

    Rules: ``page_size`` 0-1000 (0 means :data:`PAGE_SIZE_DEFAULT`); ``status``
    unspecified or a known status; ``channel`` unspecified or one concrete
    channel (not ``CHANNEL_ALL``); valid timestamps with ``create_time_before``
    later than ``create_time_after``; ``page_token`` empty or issued by an
    earlier call with the same filters.
    """
    violations: list[FieldViolation] = []
    if not 0 <= request.page_size <= PAGE_SIZE_MAX:
        violations.append(
            FieldViolation(
                field="page_size", description=f"must be 0 (default {PAGE_SIZE_DEFAULT}) to {PAGE_SIZE_MAX}"
            )
        )
    status = None
    if request.status != notify_pb2.NOTIFICATION_STATUS_UNSPECIFIED:
        status = STATUS_SQL_NAMES.get(request.status)
        if status is None:
            violations.append(
                FieldViolation(field="status", description="must be a known NotificationStatus")
            )
    channel = None
    if request.channel != notify_pb2.CHANNEL_UNSPECIFIED:
        channel = CHANNEL_NAMES.get(request.channel)
        if channel is None:
            violations.append(
                FieldViolation(
                    field="channel",
                    description="must be CHANNEL_EMAIL, CHANNEL_SMS or CHANNEL_PUSH (or unset: any channel)",
                )
            )
    created_after, created_before = pagination.create_time_range(request, violations)
    query = ListQuery(
        page_size=request.page_size or PAGE_SIZE_DEFAULT,
        status=status,
        channel=channel,
        created_after=created_after,
        created_before=created_before,
    )
    if request.page_token and not violations:
        try:
            after = decode_page_token(request.page_token, query)
        except ValueError as exc:
            violations.append(FieldViolation(field="page_token", description=str(exc)))
        else:
            query = dataclasses.replace(query, after=after)
    if violations:
        raise RequestInvalid(violations)
    return query


async def list_notifications(
    conn: asyncpg.Pool | Connection, tenant_id: uuid.UUID, query: ListQuery
) -> tuple[list[notify_pb2.Notification], str]:
    """One page of ``tenant_id``'s notifications matching ``query``, newest first
    (``created_at DESC, id DESC``), and the next page token (``""`` on the last page).

    Keyset pagination over ``notifications_tenant_created_id_idx``; the status
    filter evaluates :data:`NOTIFICATION_STATUS_SQL` per candidate notification
    (one index lookup into ``deliveries`` each), the channel filter matches a
    delivery on the channel or the channel in the fallback chain.
    """
    conditions = ["n.tenant_id = $1"]
    args: list[object] = [tenant_id]

    def bind(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    if query.status is not None:
        conditions.append(f"agg.status = {bind(query.status)}")
    if query.channel is not None:
        channel = bind(query.channel)
        conditions.append(f"(agg.on_channel OR {channel} = ANY (n.fallback_channels))")
    if query.created_after is not None:
        conditions.append(f"n.created_at > {bind(query.created_after)}")
    if query.created_before is not None:
        conditions.append(f"n.created_at < {bind(query.created_before)}")
    if query.after is not None:
        conditions.append(f"(n.created_at, n.id) < ({bind(query.after[0])}, {bind(query.after[1])})")
    on_channel = f"coalesce(bool_or(d.channel = {bind(query.channel)}), false)" if query.channel else "false"
    # Every interpolated piece is a constant of this module; every value is a bind parameter.
    sql = f"""
        SELECT {_NOTIFICATION_COLUMNS}
          FROM notifications n
         CROSS JOIN LATERAL (
               SELECT {NOTIFICATION_STATUS_SQL} AS status, {on_channel} AS on_channel
                 FROM deliveries d
                WHERE d.notification_id = n.id AND d.tenant_id = n.tenant_id) agg
         WHERE {" AND ".join(conditions)}
         ORDER BY n.created_at DESC, n.id DESC
         LIMIT {bind(query.page_size + 1)}"""  # noqa: S608
    rows = await conn.fetch(sql, *args)
    page = rows[: query.page_size]
    by_notification: dict[uuid.UUID, list[asyncpg.Record]] = {r["id"]: [] for r in page}
    if page:
        for d in await conn.fetch(
            f"""SELECT {_DELIVERY_COLUMNS} FROM deliveries
                 WHERE notification_id = ANY ($1::uuid[]) AND tenant_id = $2
                 ORDER BY chain_position, channel""",  # noqa: S608 (a column-list constant; values are bound)
            list(by_notification),
            tenant_id,
        ):
            by_notification[d["notification_id"]].append(d)
    notifications = [_notification_message(r, by_notification[r["id"]]) for r in page]
    next_token = ""
    if len(rows) > query.page_size:
        last = page[-1]
        next_token = encode_page_token(query, last["created_at"], last["id"])
    return notifications, next_token
