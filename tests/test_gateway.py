"""The gateway over gRPC: auth, validation, idempotency, batch, reads, isolation."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import row_counts, send_request

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status carried in the error's trailing metadata."""
    found: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert found is not None, "no rich status details"
    return found


def violations(status: status_pb2.Status) -> dict[str, str]:
    """field -> description of the BadRequest detail."""
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return {v.field: v.description for v in bad.field_violations}
    raise AssertionError("no BadRequest detail")


def error_reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo detail")


INVALID_CASES = [
    ("request_id", {"request_id": ""}),
    ("request_id", {"request_id": "has space"}),
    ("request_id", {"request_id": "x" * 129}),
    ("channels", {"channels": []}),
    ("channels[0]", {"channels": [notify_pb2.CHANNEL_UNSPECIFIED]}),
    (
        "recipient.email",
        {
            "recipient": notify_pb2.Recipient(
                email="not-an-address", phone_number="+14155550123", fcm_token="tok"
            )
        },
    ),
    ("recipient.email", {"recipient": notify_pb2.Recipient(phone_number="+14155550123", fcm_token="tok")}),
    (
        "recipient.phone_number",
        {
            "recipient": notify_pb2.Recipient(
                email="a@example.com", phone_number="4155550123", fcm_token="tok"
            )
        },
    ),
    (
        "recipient.phone_number",
        {"recipient": notify_pb2.Recipient(email="a@example.com", phone_number="+1000", fcm_token="tok")},
    ),
    (
        "recipient.fcm_token",
        {
            "recipient": notify_pb2.Recipient(
                email="a@example.com", phone_number="+14155550123", fcm_token="bad token with spaces"
            )
        },
    ),
    (
        "recipient.fcm_token",
        {"recipient": notify_pb2.Recipient(email="a@example.com", phone_number="+14155550123")},
    ),
    ("email.subject", {"email": notify_pb2.EmailContent(text="body")}),
    ("email.subject", {"email": notify_pb2.EmailContent(subject="x" * 999, text="body")}),
    ("email.subject", {"email": notify_pb2.EmailContent(subject="a\r\nBcc: evil@example.com", text="body")}),
    ("email.text", {"email": notify_pb2.EmailContent(subject="s")}),
    ("email.html", {"email": notify_pb2.EmailContent(subject="s", html="x" * (256 * 1024 + 1))}),
    ("sms.text", {"sms": notify_pb2.SmsContent(text="")}),
    ("sms.text", {"sms": notify_pb2.SmsContent(text="x" * 1601)}),
    ("push", {"push": notify_pb2.PushContent()}),
    ("push.title", {"push": notify_pb2.PushContent(title="t" * 257, body="b")}),
    ('push.data["from"]', {"push": notify_pb2.PushContent(title="t", data={"from": "x"})}),
    ("push.data", {"push": notify_pb2.PushContent(title="t", data={"k": "v" * 5000})}),
    ("metadata", {"metadata": {f"k{i}": "v" for i in range(33)}}),
    ('metadata["bad key"]', {"metadata": {"bad key": "v"}}),
    ('metadata["k"]', {"metadata": {"k": "v" * 513}}),
    ('metadata["k"]', {"metadata": {"k": "nul\x00"}}),
]


@pytest.mark.parametrize(
    ("field", "overrides"), INVALID_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(INVALID_CASES)]
)
async def test_invalid_field_is_named_and_nothing_is_written(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool, field: str, overrides: dict[str, object]
) -> None:
    before = await row_counts(pool)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotification(send_request(**overrides), metadata=tenant.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rich_status(caught.value)
    assert field in violations(status), violations(status)
    assert error_reason(status) == "INVALID_FIELDS"
    assert await row_counts(pool) == before


async def test_every_bad_field_is_reported_at_once(stub: Stub, tenant: TenantCredentials) -> None:
    request = send_request(
        request_id="",
        recipient=notify_pb2.Recipient(email="nope", phone_number="123", fcm_token=""),
        sms=notify_pb2.SmsContent(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotification(request, metadata=tenant.metadata)
    assert set(violations(rich_status(caught.value))) >= {
        "request_id",
        "recipient.email",
        "recipient.phone_number",
        "recipient.fcm_token",
        "sms.text",
    }


async def test_only_requested_channels_need_content(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = notify_pb2.SendNotificationRequest(
        request_id="sms-only",
        channels=[notify_pb2.CHANNEL_SMS],
        recipient=notify_pb2.Recipient(phone_number="+442071838750"),
        sms=notify_pb2.SmsContent(text="hi"),
    )
    accepted = await stub.SendNotification(request, metadata=tenant.metadata)
    assert [d.channel for d in accepted.deliveries] == [notify_pb2.CHANNEL_SMS]
    counts = await row_counts(pool)
    assert (counts["notifications"], counts["deliveries"], counts["outbox"]) == (1, 1, 1)


async def test_accept_writes_notification_deliveries_and_outbox_rows(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    accepted = await stub.SendNotification(send_request(), metadata=tenant.metadata)
    rows = await pool.fetch(
        """SELECT d.id, d.channel, d.status, o.topic, o.key FROM deliveries d
             JOIN outbox o ON o.payload = d.event WHERE d.notification_id = $1 ORDER BY d.channel""",
        uuid.UUID(accepted.notification_id),
    )
    assert {r["channel"] for r in rows} == {"email", "sms", "push"}
    assert all(r["status"] == "queued" and r["key"] == str(tenant.tenant_id).encode() for r in rows)
    assert {str(r["id"]) for r in rows} == {d.delivery_id for d in accepted.deliveries}
    assert all(r["topic"].endswith(f"notify.{r['channel']}") for r in rows)


async def test_repeated_request_id_replays_the_first_answer_and_writes_nothing(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = send_request()
    first = await stub.SendNotification(request, metadata=tenant.metadata)
    after_first = await row_counts(pool)
    second = await stub.SendNotification(request, metadata=tenant.metadata)
    assert second == first
    assert await row_counts(pool) == after_first


async def test_concurrent_requests_with_one_request_id_commit_once(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = send_request()
    answers = await asyncio.gather(
        *[stub.SendNotification(request, metadata=tenant.metadata) for _ in range(20)]
    )
    assert len({a.notification_id for a in answers}) == 1
    assert (await row_counts(pool))["notifications"] == 1


async def test_request_id_reused_with_other_parameters_is_rejected(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = send_request()
    await stub.SendNotification(request, metadata=tenant.metadata)
    before = await row_counts(pool)
    changed = send_request(request_id=request.request_id, sms=notify_pb2.SmsContent(text="other text"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotification(changed, metadata=tenant.metadata)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already used for a different request" in (caught.value.details() or "")
    assert error_reason(rich_status(caught.value)) == "IDEMPOTENCY_KEY_REUSED"
    assert await row_counts(pool) == before


async def test_same_request_id_in_two_tenants_are_two_notifications(
    stub: Stub, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    request = send_request()
    a = await stub.SendNotification(request, metadata=tenant.metadata)
    b = await stub.SendNotification(request, metadata=other_tenant.metadata)
    assert a.notification_id != b.notification_id


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Basic abc"),),
        (("authorization", "Bearer not-a-key"),),
        (("authorization", "Bearer sb_aaaaaaaaaaaa_wrongsecret"),),
    ],
)
async def test_missing_or_bad_key_is_unauthenticated(
    stub: Stub, pool: asyncpg.Pool, tenant: TenantCredentials, metadata: tuple[tuple[str, str], ...]
) -> None:
    before = await row_counts(pool)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotification(send_request(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await row_counts(pool) == before


async def test_right_key_id_with_wrong_secret_is_unauthenticated(
    stub: Stub, tenant: TenantCredentials
) -> None:
    key_id = tenant.api_key.split("_")[1]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotification(
            send_request(), metadata=(("authorization", f"Bearer sb_{key_id}_forged"),)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_disabled_tenant_is_permission_denied(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    await pool.execute("UPDATE tenants SET disabled_at = now() WHERE id = $1", tenant.tenant_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotification(send_request(), metadata=tenant.metadata)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_get_notification_of_another_tenant_is_not_found(
    stub: Stub, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    accepted = await stub.SendNotification(send_request(), metadata=tenant.metadata)
    request = notify_pb2.GetNotificationRequest(notification_id=accepted.notification_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetNotification(request, metadata=other_tenant.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    own = await stub.GetNotification(request, metadata=tenant.metadata)
    assert own.notification.status == notify_pb2.NOTIFICATION_STATUS_ACCEPTED
    assert {d.status for d in own.notification.deliveries} == {notify_pb2.DELIVERY_STATUS_QUEUED}


async def test_get_notification_with_malformed_id_names_the_field(
    stub: Stub, tenant: TenantCredentials
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetNotification(
            notify_pb2.GetNotificationRequest(notification_id="nope"), metadata=tenant.metadata
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "notification_id" in violations(rich_status(caught.value))


async def test_batch_accepts_and_rejects_items_on_their_own(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    good = [send_request() for _ in range(3)]
    bad = send_request(recipient=notify_pb2.Recipient(email="x", phone_number="+14155550123", fcm_token="t"))
    reply = await stub.SendNotificationBatch(
        notify_pb2.SendNotificationBatchRequest(requests=[good[0], bad, good[1], good[2], good[0]]),
        metadata=tenant.metadata,
    )
    kinds = [r.WhichOneof("result") for r in reply.results]
    assert kinds == ["response", "error", "response", "response", "response"]
    assert reply.results[1].error.code == code_pb2.INVALID_ARGUMENT
    assert "recipient.email" in violations(reply.results[1].error)
    # The repeated item replays the first answer.
    assert reply.results[4].response == reply.results[0].response
    assert (await row_counts(pool))["notifications"] == 3


async def test_batch_mixing_new_replayed_and_reused_keys_writes_only_the_new(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    earlier = send_request()
    first = await stub.SendNotification(earlier, metadata=tenant.metadata)
    new = send_request()
    reused_in_batch = send_request(request_id=new.request_id, sms=notify_pb2.SmsContent(text="other"))
    reused_earlier = send_request(request_id=earlier.request_id, sms=notify_pb2.SmsContent(text="other"))
    reply = await stub.SendNotificationBatch(
        notify_pb2.SendNotificationBatchRequest(requests=[earlier, new, reused_in_batch, reused_earlier]),
        metadata=tenant.metadata,
    )
    assert reply.results[0].response == first
    assert reply.results[1].response.status == notify_pb2.NOTIFICATION_STATUS_ACCEPTED
    assert [error_reason(reply.results[i].error) for i in (2, 3)] == ["IDEMPOTENCY_KEY_REUSED"] * 2
    counts = await row_counts(pool)
    assert counts["notifications"] == 2
    assert counts["deliveries"] == counts["outbox"] == 6  # send_request asks for all three channels


@pytest.mark.parametrize("count", [0, 501])
async def test_batch_size_limits(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool, count: int
) -> None:
    before = await row_counts(pool)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotificationBatch(
            notify_pb2.SendNotificationBatchRequest(requests=[send_request() for _ in range(count)]),
            metadata=tenant.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests" in violations(rich_status(caught.value))
    assert await row_counts(pool) == before


async def test_health_and_reflection_are_served(gateway: object) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    port = gateway.port  # type: ignore[attr-defined]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="switchboard.notify.v1.NotificationService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names: set[str] = set()
        async for response in responses:
            names |= {s.name for s in response.list_services_response.service}
        assert {
            "switchboard.notify.v1.NotificationService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
