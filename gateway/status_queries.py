"""Status reads: notifications with their deliveries, always scoped to one tenant."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

import asyncpg
from google.protobuf import timestamp_pb2

from channels.catalog import CHANNEL_VALUES
from switchboard.db.pool import Connection
from switchboard.notify.v1 import notify_pb2

DELIVERY_STATUS_VALUES: dict[str, notify_pb2.DeliveryStatus.ValueType] = {
    "queued": notify_pb2.DELIVERY_STATUS_QUEUED,
    "sending": notify_pb2.DELIVERY_STATUS_SENDING,
    "delivered": notify_pb2.DELIVERY_STATUS_DELIVERED,
    "failed": notify_pb2.DELIVERY_STATUS_FAILED,
}
FINAL_DELIVERY_STATUSES = frozenset({"delivered", "failed"})


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


async def get_notification(
    conn: asyncpg.Pool | Connection, tenant_id: uuid.UUID, notification_id: uuid.UUID
) -> notify_pb2.Notification | None:
    """The notification ``notification_id`` of ``tenant_id`` with its deliveries, or ``None``.

    Another tenant's notification is ``None`` as well: ids never cross tenants.
    """
    row = await conn.fetchrow(
        """SELECT id, request_id, metadata, created_at, fallback_channels FROM notifications
            WHERE id = $1 AND tenant_id = $2""",
        notification_id,
        tenant_id,
    )
    if row is None:
        return None
    deliveries = await conn.fetch(
        """SELECT id, channel, recipient, status, attempts, last_error, provider, provider_message_id,
                  updated_at, chain_position
             FROM deliveries WHERE notification_id = $1 AND tenant_id = $2
            ORDER BY chain_position, channel""",
        notification_id,
        tenant_id,
    )
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
