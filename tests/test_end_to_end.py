"""SendNotification over gRPC -> PostgreSQL -> relay -> Kafka -> workers -> providers."""

from __future__ import annotations

import json

import asyncpg

from channels.sandbox import sandbox_file
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from tests.conftest import SmtpSink, TenantCredentials
from tests.helpers import running_pipeline, send_request, wait_for


async def test_notification_is_delivered_on_every_channel(
    stub: notify_pb2_grpc.NotificationServiceAsyncStub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    smtp_sink: SmtpSink,
) -> None:
    request = send_request()
    accepted = await stub.SendNotification(request, metadata=tenant.metadata)
    assert accepted.status == notify_pb2.NOTIFICATION_STATUS_ACCEPTED
    assert [d.channel for d in accepted.deliveries] == [
        notify_pb2.CHANNEL_EMAIL,
        notify_pb2.CHANNEL_SMS,
        notify_pb2.CHANNEL_PUSH,
    ]

    async with running_pipeline(pool, settings):

        async def final() -> notify_pb2.Notification | None:
            got = await stub.GetNotification(
                notify_pb2.GetNotificationRequest(notification_id=accepted.notification_id),
                metadata=tenant.metadata,
            )
            return (
                got.notification
                if got.notification.status == notify_pb2.NOTIFICATION_STATUS_DELIVERED
                else None
            )

        notification = await wait_for(final)

    by_channel = {d.channel: d for d in notification.deliveries}
    assert all(
        d.status == notify_pb2.DELIVERY_STATUS_DELIVERED and d.attempts == 1 for d in by_channel.values()
    )
    assert notification.request_id == request.request_id
    assert dict(notification.metadata) == {"order": "42"}

    email_delivery = by_channel[notify_pb2.CHANNEL_EMAIL]
    (message,) = smtp_sink.messages_for_delivery(email_delivery.delivery_id)
    assert message["To"] == "ada@example.com"
    assert message["Subject"] == "Hello"
    parts = {
        p.get_content_type(): p.get_payload(decode=True).decode()
        for p in message.walk()
        if not p.is_multipart()
    }
    assert parts["text/plain"].strip() == "Plain body"
    assert parts["text/html"].strip() == "<p>HTML body</p>"
    assert email_delivery.provider == "smtp"
    assert email_delivery.provider_message_id == f"<{email_delivery.delivery_id}@switchboard>"

    sms_lines = [
        json.loads(line)
        for line in sandbox_file(settings.resolved_sandbox_dir(), "sms").read_text().splitlines()
    ]
    assert [(r["delivery_id"], r["recipient"], r["content"]["text"]) for r in sms_lines] == [
        (by_channel[notify_pb2.CHANNEL_SMS].delivery_id, "+14155550123", "Hello by SMS")
    ]
    push_lines = [
        json.loads(line)
        for line in sandbox_file(settings.resolved_sandbox_dir(), "push").read_text().splitlines()
    ]
    assert [(r["delivery_id"], r["content"]["data"]) for r in push_lines] == [
        (by_channel[notify_pb2.CHANNEL_PUSH].delivery_id, {"k": "v"})
    ]
