"""`switchboard demo`: one notification on every channel through the real API.

Brings up the dev stack; through the admin API creates (or reuses) the tenant
``demo``, gives it its own providers, sealed like any tenant's (SMTP to the dev
sink; Twilio and FCM to the dev stack's fakes, so the real provider code runs)
and a fresh API key; calls ``SendNotification`` over gRPC
for EMAIL, SMS and PUSH; polls ``GetNotification`` until every delivery is
final or the timeout passes; and prints where each delivery landed. Exit code
0 only if all were DELIVERED.
"""

from __future__ import annotations

import asyncio
import json
import mailbox
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from channels.catalog import CHANNEL_NAMES
from channels.sandbox import sandbox_file
from switchboard.dev import DevStack
from switchboard.fakes.dev import DEV_TWILIO_ACCOUNT_SID
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc

DEMO_TENANT = "demo"
FINAL = {notify_pb2.DELIVERY_STATUS_DELIVERED, notify_pb2.DELIVERY_STATUS_FAILED}


@dataclass
class DemoResult:
    """What the demo saw: the final notification and where each delivery landed."""

    notification: notify_pb2.Notification
    landed: dict[str, str]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        """Every delivery DELIVERED."""
        return bool(self.notification.deliveries) and all(
            d.status == notify_pb2.DELIVERY_STATUS_DELIVERED for d in self.notification.deliveries
        )


async def demo_api_key(stack: DevStack) -> tuple[str, str]:
    """Through the admin API: create the demo tenant if missing, give it its own
    providers (sealed like any tenant's) and return its id and a new API key."""
    metadata = (("authorization", f"Bearer {stack.admin_token}"),)
    async with grpc.aio.insecure_channel(stack.grpc_addr) as channel:
        admin = tenants_pb2_grpc.TenantAdminServiceStub(channel)
        tenant_id = ""
        token = ""
        while not tenant_id:
            page = await admin.ListTenants(
                tenants_pb2.ListTenantsRequest(page_token=token), metadata=metadata
            )
            tenant_id = next((t.tenant_id for t in page.tenants if t.name == DEMO_TENANT), "")
            token = page.next_page_token
            if not token:
                break
        if not tenant_id:
            created = await admin.CreateTenant(
                tenants_pb2.CreateTenantRequest(
                    request_id=str(uuid.uuid4()), name=DEMO_TENANT, display_name="Demo tenant"
                ),
                metadata=metadata,
            )
            tenant_id = created.tenant.tenant_id
        await admin.SetProviderConfig(
            tenants_pb2.SetProviderConfigRequest(
                request_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                channel=notify_pb2.CHANNEL_EMAIL,
                config=tenants_pb2.ProviderConfig(
                    smtp=tenants_pb2.SmtpConfig(
                        host=stack.settings.smtp_host,
                        port=stack.settings.smtp_port,
                        tls_mode=tenants_pb2.SMTP_TLS_MODE_NONE,
                        from_address="Demo <demo@switchboard.localhost>",
                    )
                ),
            ),
            metadata=metadata,
        )
        fakes = stack.fakes
        assert fakes is not None
        await admin.SetProviderConfig(
            tenants_pb2.SetProviderConfigRequest(
                request_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                channel=notify_pb2.CHANNEL_SMS,
                config=tenants_pb2.ProviderConfig(
                    twilio=tenants_pb2.TwilioConfig(
                        account_sid=DEV_TWILIO_ACCOUNT_SID,
                        auth_token=fakes.twilio_auth_token,
                        from_number="+15005550006",
                        base_url=fakes.twilio_base_url,
                    )
                ),
            ),
            metadata=metadata,
        )
        await admin.SetProviderConfig(
            tenants_pb2.SetProviderConfigRequest(
                request_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                channel=notify_pb2.CHANNEL_PUSH,
                config=tenants_pb2.ProviderConfig(
                    fcm=tenants_pb2.FcmConfig(
                        service_account_json=fakes.service_account_path.read_text(encoding="utf-8"),
                        endpoint_base=fakes.fcm_base_url,
                    )
                ),
            ),
            metadata=metadata,
        )
        key = await admin.CreateApiKey(
            tenants_pb2.CreateApiKeyRequest(request_id=str(uuid.uuid4()), tenant_id=tenant_id),
            metadata=metadata,
        )
        return tenant_id, key.secret


def find_in_maildir(maildir: Path, delivery_id: str) -> str:
    """The Maildir file holding the email of ``delivery_id``, or ''."""
    if not maildir.exists():
        return ""
    box = mailbox.Maildir(maildir, create=False)
    for key, message in box.items():
        if message.get("X-Switchboard-Delivery-Id") == delivery_id:
            sub = "new" if (maildir / "new" / key).exists() else "cur"
            return str(maildir / sub / key)
    return ""


def find_in_sandbox(path: Path, delivery_id: str) -> str:
    """``<file>:<line>`` of ``delivery_id`` in a sandbox JSON-lines file, or ''."""
    if not path.exists():
        return ""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if json.loads(line).get("delivery_id") == delivery_id:
                return f"{path}:{number}"
    return ""


async def send_and_wait(stack: DevStack, api_key: str, timeout_s: float) -> DemoResult:
    """Send the demo notification and poll until final or ``timeout_s``."""
    started = time.monotonic()
    metadata = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(stack.grpc_addr) as channel:
        stub = notify_pb2_grpc.NotificationServiceStub(channel)
        request = notify_pb2.SendNotificationRequest(
            request_id=str(uuid.uuid4()),
            channels=[notify_pb2.CHANNEL_ALL],
            recipient=notify_pb2.Recipient(
                email="ada@example.com",
                phone_number="+14155550123",
                fcm_token="demo-token:APA91bH_demo-registration-token",  # noqa: S106 (not a secret)
            ),
            email=notify_pb2.EmailContent(
                subject="Hello from Switchboard",
                text="Your first notification.",
                html="<p>Your first <b>notification</b>.</p>",
            ),
            sms=notify_pb2.SmsContent(text="Hello from Switchboard"),
            push=notify_pb2.PushContent(title="Hello", body="From Switchboard", data={"kind": "demo"}),
            metadata={"source": "switchboard-demo"},
        )
        accepted = await stub.SendNotification(request, metadata=metadata, timeout=10)
        deadline = started + timeout_s
        while True:
            got = await stub.GetNotification(
                notify_pb2.GetNotificationRequest(notification_id=accepted.notification_id),
                metadata=metadata,
                timeout=10,
            )
            notification = got.notification
            if all(d.status in FINAL for d in notification.deliveries) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    landed: dict[str, str] = {}
    journals = {"twilio": "twilio.jsonl", "fcm": "fcm.jsonl"}
    for d in notification.deliveries:
        name = CHANNEL_NAMES[d.channel]
        if name == "email":
            landed[d.delivery_id] = find_in_maildir(stack.maildir, d.delivery_id)
        elif d.provider in journals and stack.fakes is not None and d.provider_message_id:
            journal = stack.fakes.journal_dir / journals[d.provider]
            landed[d.delivery_id] = f"fake {d.provider}: {d.provider_message_id} ({journal})"
        else:
            landed[d.delivery_id] = find_in_sandbox(sandbox_file(stack.sandbox_dir, name), d.delivery_id)
    return DemoResult(notification=notification, landed=landed, elapsed_s=time.monotonic() - started)


def print_result(console: Console, result: DemoResult) -> None:
    """The delivery table."""
    table = Table(title=f"Notification {result.notification.notification_id}")
    for column in ("channel", "delivery id", "status", "attempts", "provider", "landed in / last error"):
        table.add_column(column, overflow="fold")
    for d in result.notification.deliveries:
        where = result.landed.get(d.delivery_id) or d.last_error or "-"
        table.add_row(
            CHANNEL_NAMES[d.channel],
            d.delivery_id,
            notify_pb2.DeliveryStatus.Name(d.status).removeprefix("DELIVERY_STATUS_"),
            str(d.attempts),
            d.provider,
            where,
        )
    console.print(table)
