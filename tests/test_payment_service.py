"""PaymentService: accept in one transaction, Stripe idempotency, money rules under the row
lock, Get/List/Watch, tenant isolation, and the worker primitives of payments/store.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.payment_service import PAYMENT_SERVICE_NAME
from gateway.server import Gateway
from gateway.write_path import OUTBOX_NOTIFY_CHANNEL
from payments import store
from payments.state_machine import (
    FailoverNotAllowed,
    IllegalTransition,
    OperationTrigger,
    PaymentStatus,
    PaymentTrigger,
)
from payments.validation import AMOUNT_MAX_MINOR, looks_like_card_number
from switchboard.notify.v1 import notify_pb2_grpc
from switchboard.payments.v1 import events_pb2, payments_pb2, payments_pb2_grpc
from switchboard.settings import Settings
from tests.conftest import TenantCredentials
from tests.helpers import send_request, tenant_row_counts, wait_for

if TYPE_CHECKING:
    PaymentStub = payments_pb2_grpc.PaymentServiceAsyncStub
    NotifyStub = notify_pb2_grpc.NotificationServiceAsyncStub

PAYMENT_TABLES = (
    "payments",
    "payment_attempts",
    "payment_captures",
    "payment_refunds",
    "payment_transitions",
    "outbox",
    "idempotency_keys",
)


@pytest.fixture
async def payments_stub(gateway: Gateway) -> AsyncIterator[PaymentStub]:
    """A PaymentService client connected to the test gateway."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield payments_pb2_grpc.PaymentServiceStub(channel)


def create_request(**overrides: Any) -> payments_pb2.CreatePaymentRequest:
    """A valid automatic-capture request of 10.50 EUR; keywords replace top-level fields."""
    request = payments_pb2.CreatePaymentRequest(
        request_id=str(uuid.uuid4()),
        amount_minor=1050,
        currency="EUR",
        customer_reference="cust-42",
        customer=payments_pb2.CustomerContact(email="ada@example.com", phone_number="+14155550123"),
        payment_method="pm_card_visa",
        description="Order 42",
        metadata={"order": "42"},
    )
    for name, value in overrides.items():
        if name == "metadata":
            request.metadata.clear()
            request.metadata.update(value)
        elif isinstance(value, payments_pb2.CustomerContact):
            request.customer.CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status carried in the error's trailing metadata."""
    found: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert found is not None, "no rich status details"
    return found


def detail(status: status_pb2.Status, kind: type[Any]) -> Any:
    """The first detail of type ``kind``; fails if there is none."""
    for packed in status.details:
        found = kind()
        if packed.Unpack(found):
            return found
    raise AssertionError(f"no {kind.__name__} detail in {status}")


def reason(status: status_pb2.Status) -> str:
    """The ErrorInfo reason."""
    info: error_details_pb2.ErrorInfo = detail(status, error_details_pb2.ErrorInfo)
    return info.reason


def violations(status: status_pb2.Status) -> dict[str, str]:
    """field -> description of the BadRequest detail."""
    bad: error_details_pb2.BadRequest = detail(status, error_details_pb2.BadRequest)
    return {v.field: v.description for v in bad.field_violations}


async def call_error(call: Any) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """Await ``call`` expecting an RPC error; its code and rich status."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), rich_status(caught.value)


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    """Row count of every table a payment mutation may write."""
    return {t: await pool.fetchval(f"SELECT count(*) FROM {t}") for t in PAYMENT_TABLES}  # noqa: S608


async def create(stub: PaymentStub, tenant: TenantCredentials, **overrides: Any) -> payments_pb2.Payment:
    """CreatePayment; the accepted payment."""
    response = await stub.CreatePayment(create_request(**overrides), metadata=tenant.metadata)
    return response.payment


async def drive(pool: asyncpg.Pool, tenant_id: uuid.UUID, payment_id: str, to: PaymentStatus) -> None:
    """Move a REQUIRES_PROCESSING payment to ``to`` the way the payment worker does, with
    the worker primitives: attempt 1 at "stripe", then its outcome."""
    pid = uuid.UUID(payment_id)
    async with pool.acquire() as conn, conn.transaction():
        payment = await store.lock_payment(conn, tenant_id, pid)
        assert payment is not None
        attempt = await store.start_attempt(conn, payment, "stripe")
    async with pool.acquire() as conn, conn.transaction():
        payment = await store.lock_payment(conn, tenant_id, pid)
        assert payment is not None
        if to is PaymentStatus.UNKNOWN:
            await store.finish_attempt(conn, tenant_id, pid, attempt, OperationTrigger.AMBIGUOUS)
            trigger = PaymentTrigger.ATTEMPT_UNKNOWN
        else:
            await store.finish_attempt(
                conn, tenant_id, pid, attempt, OperationTrigger.SUCCEEDED, processor_reference="pi_123"
            )
            trigger = (
                PaymentTrigger.ATTEMPT_SUCCEEDED
                if to is PaymentStatus.SUCCEEDED
                else PaymentTrigger.ATTEMPT_AUTHORIZED
            )
        captured = payment.amount_minor if to is PaymentStatus.SUCCEEDED else None
        await store.record_transition(
            conn,
            tenant_id,
            pid,
            PaymentStatus.PROCESSING,
            to,
            trigger,
            attempt_no=attempt,
            amount_captured_minor=captured,
        )


async def outbox_commands(pool: asyncpg.Pool) -> list[tuple[str, bytes, events_pb2.PaymentCommand]]:
    """(topic, key, command) of every payments.commands outbox row, oldest first."""
    rows = await pool.fetch(
        "SELECT topic, key, payload FROM outbox WHERE topic LIKE '%payments.commands' ORDER BY id"
    )
    return [(r["topic"], r["key"], events_pb2.PaymentCommand.FromString(r["payload"])) for r in rows]


# --- CreatePayment --------------------------------------------------------------------------------


async def test_create_commits_payment_transition_and_command_then_answers_accepted(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool, settings: Settings
) -> None:
    request = create_request(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    response = await payments_stub.CreatePayment(request, metadata=tenant.metadata)
    payment = response.payment
    assert payment.status == payments_pb2.PAYMENT_STATUS_REQUIRES_PROCESSING
    assert (payment.amount_minor, payment.currency) == (1050, "EUR")
    assert payment.capture_method == payments_pb2.CAPTURE_METHOD_MANUAL
    assert payment.request_id == request.request_id
    assert payment.customer.phone_number == "+14155550123"
    assert dict(payment.metadata) == {"order": "42"}
    assert [(t.from_status, t.to_status, t.cause) for t in payment.transitions] == [
        (payments_pb2.PAYMENT_STATUS_UNSPECIFIED, payments_pb2.PAYMENT_STATUS_REQUIRES_PROCESSING, "created")
    ]
    # Everything was committed before the answer: the payment reads back exactly as answered.
    got = await payments_stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=payment.payment_id), metadata=tenant.metadata
    )
    assert got.payment == payment
    ((topic, key, command),) = await outbox_commands(pool)
    assert topic == f"{settings.kafka_topic_prefix}payments.commands"
    assert key == str(tenant.tenant_id).encode()
    assert command.kind == events_pb2.PAYMENT_COMMAND_KIND_CREATE
    assert (command.payment_id, command.tenant_id) == (payment.payment_id, str(tenant.tenant_id))
    assert command.request_id == request.request_id
    uuid.UUID(command.command_id)
    stored = await pool.fetchval("SELECT request_id FROM idempotency_keys")
    assert stored == f"payments {request.request_id}"


async def test_create_notifies_the_relay_in_the_accepting_transaction(
    payments_stub: PaymentStub, tenant: TenantCredentials, settings: Settings
) -> None:
    listener = await asyncpg.connect(settings.require_database_url())
    notified = asyncio.Event()
    try:
        await listener.add_listener(OUTBOX_NOTIFY_CHANNEL, lambda *_: notified.set())
        await create(payments_stub, tenant)
        await asyncio.wait_for(notified.wait(), 10)
    finally:
        await listener.close()
    assert notified.is_set()


async def test_replayed_request_id_returns_the_first_answer_and_writes_nothing(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = create_request()
    first = await payments_stub.CreatePayment(request, metadata=tenant.metadata)
    before = await counts(pool)
    # Map order in the client's encoding does not matter.
    again = create_request(request_id=request.request_id, metadata={"order": "42"})
    assert await payments_stub.CreatePayment(again, metadata=tenant.metadata) == first
    assert await counts(pool) == before


async def test_request_id_reused_with_other_parameters_is_failed_precondition(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = create_request()
    await payments_stub.CreatePayment(request, metadata=tenant.metadata)
    before = await counts(pool)
    changed = create_request(request_id=request.request_id, amount_minor=2000)
    code, status = await call_error(payments_stub.CreatePayment(changed, metadata=tenant.metadata))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(status) == "IDEMPOTENCY_KEY_REUSED"
    assert detail(status, error_details_pb2.PreconditionFailure).violations[0].type == "IDEMPOTENCY_KEY"
    assert await counts(pool) == before


async def test_request_id_of_one_method_used_for_another_is_reused(
    payments_stub: PaymentStub, tenant: TenantCredentials
) -> None:
    payment = await create(payments_stub, tenant)
    code, status = await call_error(
        payments_stub.CancelPayment(
            payments_pb2.CancelPaymentRequest(request_id=payment.request_id, payment_id=payment.payment_id),
            metadata=tenant.metadata,
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(status) == "IDEMPOTENCY_KEY_REUSED"


async def test_payment_and_notification_request_ids_are_separate_key_spaces(
    payments_stub: PaymentStub, stub: NotifyStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    shared = str(uuid.uuid4())
    await stub.SendNotification(send_request(request_id=shared), metadata=tenant.metadata)
    payment = await create(payments_stub, tenant, request_id=shared)
    assert payment.status == payments_pb2.PAYMENT_STATUS_REQUIRES_PROCESSING
    keys = sorted(r["request_id"] for r in await pool.fetch("SELECT request_id FROM idempotency_keys"))
    assert keys == [shared, f"payments {shared}"]


async def test_same_request_id_in_two_tenants_is_two_payments(
    payments_stub: PaymentStub, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    request = create_request()
    first = await payments_stub.CreatePayment(request, metadata=tenant.metadata)
    second = await payments_stub.CreatePayment(request, metadata=other_tenant.metadata)
    assert first.payment.payment_id != second.payment.payment_id


async def test_concurrent_creates_with_one_request_id_commit_once(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = create_request()
    answers = await asyncio.gather(
        *(payments_stub.CreatePayment(request, metadata=tenant.metadata) for _ in range(10))
    )
    assert len({a.payment.payment_id for a in answers}) == 1
    assert all(a == answers[0] for a in answers)
    assert (await counts(pool))["payments"] == 1


async def test_every_bad_field_is_named_and_nothing_is_written(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    before = await counts(pool)
    bad = create_request(
        request_id="has space",
        amount_minor=0,
        currency="eur",
        customer_reference="x" * 129,
        customer=payments_pb2.CustomerContact(email="not-an-email", phone_number="+1555"),
        payment_method="4242 4242 4242 4242",
        capture_method=7,
        description="d" * 1001,
        metadata={f"k{i}": "v" for i in range(33)},
    )
    code, status = await call_error(payments_stub.CreatePayment(bad, metadata=tenant.metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(status)
    expected = {
        "request_id",
        "amount_minor",
        "currency",
        "customer_reference",
        "customer.email",
        "customer.phone_number",
        "payment_method",
        "capture_method",
        "description",
        "metadata",
    }
    assert expected <= set(found), found
    assert "EUR" in found["currency"]
    assert "card number" in found["payment_method"]
    assert await counts(pool) == before
    # Sent again, the same answer: a failed validation stores nothing, not even the key.
    again_code, again = await call_error(payments_stub.CreatePayment(bad, metadata=tenant.metadata))
    assert (again_code, violations(again)) == (code, found)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("amount_minor", -5, "minor units"),
        ("amount_minor", AMOUNT_MAX_MINOR + 1, "minor units"),
        ("currency", "XAU", "without a minor unit"),
        ("currency", "CHE", "fund code"),
        ("currency", "ABC", "not a current ISO 4217"),
        ("currency", "HRK", "not a current ISO 4217"),
        ("currency", "", "required"),
        ("payment_method", "", "required"),
        ("payment_method", "pm " + "x" * 10, "printable ASCII"),
        ("payment_method", "p" * 256, "printable ASCII"),
    ],
)
async def test_create_field_rules(
    payments_stub: PaymentStub, tenant: TenantCredentials, field: str, value: object, needle: str
) -> None:
    code, status = await call_error(
        payments_stub.CreatePayment(create_request(**{field: value}), metadata=tenant.metadata)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in violations(status)[field]


@pytest.mark.parametrize(("currency", "amount"), [("JPY", 500), ("KWD", 1), ("USD", AMOUNT_MAX_MINOR)])
async def test_currencies_of_every_exponent_and_the_largest_amount_are_accepted(
    payments_stub: PaymentStub, tenant: TenantCredentials, currency: str, amount: int
) -> None:
    payment = await create(
        payments_stub, tenant, currency=currency, amount_minor=amount, customer=payments_pb2.CustomerContact()
    )
    assert (payment.currency, payment.amount_minor) == (currency, amount)


def test_card_number_detection() -> None:
    assert looks_like_card_number("4242424242424242")
    assert looks_like_card_number("4000-0566-5566-5556")
    assert not looks_like_card_number("4242424242424241")  # fails the Luhn check
    assert not looks_like_card_number("pm_1MqLiJLkdIwHu7ixUEgbFdYF")


async def test_undecodable_request_is_invalid_argument(gateway: Gateway, tenant: TenantCredentials) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        call = channel.unary_unary(
            f"/{PAYMENT_SERVICE_NAME}/CreatePayment",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        # Field 3 (currency) holds invalid UTF-8.
        code, status = await call_error(call(b"\x1a\x02\xff\xfe", metadata=tenant.metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "currency" in violations(status)


# --- Capture and cancel ---------------------------------------------------------------------------


async def test_capture_of_an_authorized_payment_is_accepted_once(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.REQUIRES_CAPTURE)
    too_much = payments_pb2.CapturePaymentRequest(
        request_id=str(uuid.uuid4()), payment_id=payment.payment_id, amount_minor=1051
    )
    code, status = await call_error(payments_stub.CapturePayment(too_much, metadata=tenant.metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the authorized 1050" in violations(status)["amount_minor"]
    request = payments_pb2.CapturePaymentRequest(
        request_id=str(uuid.uuid4()), payment_id=payment.payment_id, amount_minor=800
    )
    reply = await payments_stub.CapturePayment(request, metadata=tenant.metadata)
    assert reply.capture.status == payments_pb2.CAPTURE_STATUS_PENDING
    assert (reply.capture.amount_minor, reply.capture.request_id) == (800, request.request_id)
    assert await payments_stub.CapturePayment(request, metadata=tenant.metadata) == reply  # replayed
    second = payments_pb2.CapturePaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id)
    code, status = await call_error(payments_stub.CapturePayment(second, metadata=tenant.metadata))
    assert (code, reason(status)) == (grpc.StatusCode.FAILED_PRECONDITION, "CAPTURE_NOT_ALLOWED")
    commands = [c for _, _, c in await outbox_commands(pool)]
    assert [c.kind for c in commands] == [
        events_pb2.PAYMENT_COMMAND_KIND_CREATE,
        events_pb2.PAYMENT_COMMAND_KIND_CAPTURE,
    ]
    assert commands[1].capture_id == reply.capture.capture_id
    got = await payments_stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=payment.payment_id), metadata=tenant.metadata
    )
    assert list(got.payment.captures) == [reply.capture]
    assert got.payment.status == payments_pb2.PAYMENT_STATUS_REQUIRES_CAPTURE
    (attempt,) = got.payment.attempts
    assert attempt.idempotency_key == f"{payment.payment_id}_1"
    assert (attempt.status, attempt.processor_reference) == (payments_pb2.ATTEMPT_STATUS_SUCCEEDED, "pi_123")


async def test_capture_whole_amount_with_zero(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.REQUIRES_CAPTURE)
    reply = await payments_stub.CapturePayment(
        payments_pb2.CapturePaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id),
        metadata=tenant.metadata,
    )
    assert reply.capture.amount_minor == 1050


async def test_an_error_answer_is_replayed_even_after_the_payment_changed(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    request = payments_pb2.CapturePaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id)
    code, first = await call_error(payments_stub.CapturePayment(request, metadata=tenant.metadata))
    assert (code, reason(first)) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_CAPTURABLE")
    assert "REQUIRES_PROCESSING" in first.message
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.REQUIRES_CAPTURE)
    # Stripe semantics: the key's first answer, error included, is what it answers.
    again_code, again = await call_error(payments_stub.CapturePayment(request, metadata=tenant.metadata))
    assert (again_code, again) == (code, first)
    assert (await counts(pool))["payment_captures"] == 0


async def test_cancel_before_processing_cancels_at_once(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant)
    request = payments_pb2.CancelPaymentRequest(
        request_id=str(uuid.uuid4()), payment_id=payment.payment_id, reason="duplicate"
    )
    reply = await payments_stub.CancelPayment(request, metadata=tenant.metadata)
    assert reply.payment.status == payments_pb2.PAYMENT_STATUS_CANCELED
    assert reply.payment.cancellation_reason == "duplicate"
    assert reply.payment.HasField("cancel_request_time")
    assert [(t.to_status, t.cause) for t in reply.payment.transitions][-1] == (
        payments_pb2.PAYMENT_STATUS_CANCELED,
        "cancel_requested",
    )
    assert [c.kind for _, _, c in await outbox_commands(pool)][-1] == events_pb2.PAYMENT_COMMAND_KIND_CANCEL
    again = payments_pb2.CancelPaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id)
    code, status = await call_error(payments_stub.CancelPayment(again, metadata=tenant.metadata))
    assert (code, reason(status)) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_CANCELABLE")
    # The worker cannot start an attempt on it any more.
    async with pool.acquire() as conn, conn.transaction():
        locked = await store.lock_payment(conn, tenant.tenant_id, uuid.UUID(payment.payment_id))
        assert locked is not None
        with pytest.raises(IllegalTransition):
            await store.start_attempt(conn, locked, "stripe")


async def test_cancel_of_an_authorization_waits_for_the_processor_and_blocks_capture(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.REQUIRES_CAPTURE)
    reply = await payments_stub.CancelPayment(
        payments_pb2.CancelPaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id),
        metadata=tenant.metadata,
    )
    assert reply.payment.status == payments_pb2.PAYMENT_STATUS_REQUIRES_CAPTURE
    assert reply.payment.HasField("cancel_request_time")
    capture = payments_pb2.CapturePaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id)
    code, status = await call_error(payments_stub.CapturePayment(capture, metadata=tenant.metadata))
    assert (code, reason(status)) == (grpc.StatusCode.FAILED_PRECONDITION, "CAPTURE_NOT_ALLOWED")
    again = payments_pb2.CancelPaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id)
    code, status = await call_error(payments_stub.CancelPayment(again, metadata=tenant.metadata))
    assert (code, reason(status)) == (grpc.StatusCode.FAILED_PRECONDITION, "CANCEL_ALREADY_REQUESTED")


async def test_cancel_while_a_capture_is_open_is_refused(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.REQUIRES_CAPTURE)
    await payments_stub.CapturePayment(
        payments_pb2.CapturePaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id),
        metadata=tenant.metadata,
    )
    code, status = await call_error(
        payments_stub.CancelPayment(
            payments_pb2.CancelPaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id),
            metadata=tenant.metadata,
        )
    )
    assert (code, reason(status)) == (grpc.StatusCode.FAILED_PRECONDITION, "CANCEL_NOT_ALLOWED")


async def test_nothing_is_allowed_while_unknown(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.UNKNOWN)
    before = await counts(pool)
    pid = payment.payment_id
    calls = [
        payments_stub.CapturePayment(
            payments_pb2.CapturePaymentRequest(request_id=str(uuid.uuid4()), payment_id=pid),
            metadata=tenant.metadata,
        ),
        payments_stub.CancelPayment(
            payments_pb2.CancelPaymentRequest(request_id=str(uuid.uuid4()), payment_id=pid),
            metadata=tenant.metadata,
        ),
        payments_stub.RefundPayment(
            payments_pb2.RefundPaymentRequest(request_id=str(uuid.uuid4()), payment_id=pid),
            metadata=tenant.metadata,
        ),
    ]
    for call in calls:
        code, status = await call_error(call)
        assert (code, reason(status)) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_STATUS_UNKNOWN")
        assert "UNKNOWN" in status.message
        violation = detail(status, error_details_pb2.PreconditionFailure).violations[0]
        assert violation.subject == f"payments/{pid}"
    after = await counts(pool)
    # Only the three keys (with their error answers) were written.
    assert after == {**before, "idempotency_keys": before["idempotency_keys"] + 3}
    async with pool.acquire() as conn, conn.transaction():
        locked = await store.lock_payment(conn, tenant.tenant_id, uuid.UUID(pid))
        assert locked is not None
        with pytest.raises(IllegalTransition):  # and no new attempt either: it may have charged
            await store.start_attempt(conn, locked, "adyen")


# --- Refunds --------------------------------------------------------------------------------------


async def test_refunds_up_to_the_captured_amount(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.SUCCEEDED)
    pid = payment.payment_id
    first = await payments_stub.RefundPayment(
        payments_pb2.RefundPaymentRequest(
            request_id=str(uuid.uuid4()), payment_id=pid, amount_minor=300, reason="requested_by_customer"
        ),
        metadata=tenant.metadata,
    )
    assert (first.refund.status, first.refund.amount_minor) == (payments_pb2.REFUND_STATUS_PENDING, 300)
    too_much = payments_pb2.RefundPaymentRequest(
        request_id=str(uuid.uuid4()), payment_id=pid, amount_minor=751
    )
    code, status = await call_error(payments_stub.RefundPayment(too_much, metadata=tenant.metadata))
    assert (code, reason(status)) == (grpc.StatusCode.FAILED_PRECONDITION, "REFUND_EXCEEDS_CAPTURED")
    info = detail(status, error_details_pb2.ErrorInfo)
    assert (info.metadata["refundable_minor"], info.metadata["captured_minor"]) == ("750", "1050")
    rest = await payments_stub.RefundPayment(
        payments_pb2.RefundPaymentRequest(request_id=str(uuid.uuid4()), payment_id=pid),
        metadata=tenant.metadata,
    )
    assert rest.refund.amount_minor == 750
    code, status = await call_error(
        payments_stub.RefundPayment(
            payments_pb2.RefundPaymentRequest(request_id=str(uuid.uuid4()), payment_id=pid),
            metadata=tenant.metadata,
        )
    )
    assert (code, reason(status)) == (grpc.StatusCode.FAILED_PRECONDITION, "REFUND_EXCEEDS_CAPTURED")
    assert "nothing left to refund" in status.message
    # A FAILED refund's amount is refundable again.
    await pool.execute(
        "UPDATE payment_refunds SET status = 'failed' WHERE id = $1", uuid.UUID(rest.refund.refund_id)
    )
    again = await payments_stub.RefundPayment(
        payments_pb2.RefundPaymentRequest(request_id=str(uuid.uuid4()), payment_id=pid),
        metadata=tenant.metadata,
    )
    assert again.refund.amount_minor == 750
    got = await payments_stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=pid), metadata=tenant.metadata
    )
    assert [r.refund_id for r in got.payment.refunds] == [
        first.refund.refund_id,
        rest.refund.refund_id,
        again.refund.refund_id,
    ]
    kinds = [c.kind for _, _, c in await outbox_commands(pool)]
    assert kinds.count(events_pb2.PAYMENT_COMMAND_KIND_REFUND) == 3


async def test_refund_of_a_payment_not_succeeded_is_refused(
    payments_stub: PaymentStub, tenant: TenantCredentials
) -> None:
    payment = await create(payments_stub, tenant)
    code, status = await call_error(
        payments_stub.RefundPayment(
            payments_pb2.RefundPaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id),
            metadata=tenant.metadata,
        )
    )
    assert (code, reason(status)) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_REFUNDABLE")


@pytest.mark.parametrize("amounts", [[1000] * 25, [3000, 4000, 5000, 2500, 1500, 6000, 700, 300, 999, 1]])
async def test_concurrent_refunds_never_exceed_the_captured_amount(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool, amounts: list[int]
) -> None:
    """Hyperswitch #13182 (concurrent refunds together exceeding the captured amount) cannot
    happen: the check and the insert run under the payment's row lock."""
    payment = await create(payments_stub, tenant, amount_minor=10_000)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.SUCCEEDED)

    async def refund(amount: int) -> int | status_pb2.Status:
        request = payments_pb2.RefundPaymentRequest(
            request_id=str(uuid.uuid4()), payment_id=payment.payment_id, amount_minor=amount
        )
        try:
            reply = await payments_stub.RefundPayment(request, metadata=tenant.metadata)
        except grpc.aio.AioRpcError as error:
            return rich_status(error)
        return reply.refund.amount_minor

    outcomes = await asyncio.gather(*(refund(a) for a in amounts))
    accepted = [o for o in outcomes if isinstance(o, int)]
    refused = [o for o in outcomes if isinstance(o, status_pb2.Status)]
    assert sum(accepted) <= 10_000
    assert refused, "the test must over-subscribe the captured amount"
    assert {(r.code, reason(r)) for r in refused} == {
        (code_pb2.FAILED_PRECONDITION, "REFUND_EXCEEDS_CAPTURED")
    }
    stored = await pool.fetchval("SELECT coalesce(sum(amount_minor), 0) FROM payment_refunds")
    assert stored == sum(accepted)
    if amounts == [1000] * 25:
        assert sum(accepted) == 10_000


# --- Concurrency and locks ------------------------------------------------------------------------


async def waiting_on_locks(pool: asyncpg.Pool, count: int) -> None:
    """Wait until ``count`` sessions of this database wait on a lock."""

    async def check() -> bool:
        waiting = await pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'"""
        )
        return bool(waiting >= count)

    await wait_for(check, timeout_s=20, interval_s=0.02)


async def test_concurrent_same_key_waits_for_the_first_then_replays(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.SUCCEEDED)
    request = payments_pb2.RefundPaymentRequest(
        request_id=str(uuid.uuid4()), payment_id=payment.payment_id, amount_minor=100
    )
    async with pool.acquire() as holder, holder.transaction():
        # Hold the payment's row lock, as a worker's transaction would.
        await store.lock_payment(holder, tenant.tenant_id, uuid.UUID(payment.payment_id))
        first = asyncio.ensure_future(payments_stub.RefundPayment(request, metadata=tenant.metadata))
        await waiting_on_locks(pool, 1)  # the first waits on the payment row
        second = asyncio.ensure_future(payments_stub.RefundPayment(request, metadata=tenant.metadata))
        await waiting_on_locks(pool, 2)  # the second waits on the first's key
    answers = await asyncio.gather(first, second)
    assert answers[0] == answers[1]
    assert (await counts(pool))["payment_refunds"] == 1


async def test_lock_timeouts_answer_aborted_with_retry_info(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.SUCCEEDED)
    pid = uuid.UUID(payment.payment_id)
    request = payments_pb2.RefundPaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id)
    before = await counts(pool)
    async with pool.acquire() as holder, holder.transaction():
        await store.lock_payment(holder, tenant.tenant_id, pid)
        busy = await store.refund_payment(pool, tenant.tenant_id, request, pid, lock_timeout_ms=100)
        # The same key held by an uncommitted first request: the key's wait times out.
        await holder.execute(
            """INSERT INTO idempotency_keys (tenant_id, request_id, request_hash, response)
               VALUES ($1, $2, '', '')""",
            tenant.tenant_id,
            store.stored_request_id("in-flight"),
        )
        in_flight = payments_pb2.RefundPaymentRequest(request_id="in-flight", payment_id=payment.payment_id)
        flux = await store.refund_payment(pool, tenant.tenant_id, in_flight, pid, lock_timeout_ms=100)
    assert isinstance(busy, status_pb2.Status)
    assert isinstance(flux, status_pb2.Status)
    assert (busy.code, reason(busy)) == (code_pb2.ABORTED, "PAYMENT_BUSY")
    assert (flux.code, reason(flux)) == (code_pb2.ABORTED, "IDEMPOTENCY_KEY_IN_FLUX")
    for status in (busy, flux):
        assert detail(status, error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() > 0
    after = await counts(pool)
    assert after == {**before, "idempotency_keys": before["idempotency_keys"] + 1}  # the holder's key only
    # Nothing was stored for the busy request: retried, it goes through.
    reply = await store.refund_payment(pool, tenant.tenant_id, request, pid)
    assert isinstance(reply, payments_pb2.RefundPaymentResponse)


# --- Reads ----------------------------------------------------------------------------------------


Metadata = tuple[tuple[str, str], ...]


async def _watch_first_message(stub: PaymentStub, pid: str, md: Metadata) -> Any:
    """WatchPayment is a stream: its status surfaces when the first message is read."""
    call = stub.WatchPayment(payments_pb2.WatchPaymentRequest(payment_id=pid), metadata=md, timeout=10)
    return await call.read()


#: Every PaymentService RPC that takes a payment id -> a call of it on payment ``pid`` with
#: metadata ``md``. tests/test_isolation.py fails when such an RPC has no case here.
PAYMENT_ISOLATION_CASES: dict[str, Callable[[PaymentStub, str, Metadata], Awaitable[Any]]] = {
    "GetPayment": lambda stub, pid, md: stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=pid), metadata=md
    ),
    "CapturePayment": lambda stub, pid, md: stub.CapturePayment(
        payments_pb2.CapturePaymentRequest(request_id=str(uuid.uuid4()), payment_id=pid), metadata=md
    ),
    "CancelPayment": lambda stub, pid, md: stub.CancelPayment(
        payments_pb2.CancelPaymentRequest(request_id=str(uuid.uuid4()), payment_id=pid), metadata=md
    ),
    "RefundPayment": lambda stub, pid, md: stub.RefundPayment(
        payments_pb2.RefundPaymentRequest(request_id=str(uuid.uuid4()), payment_id=pid), metadata=md
    ),
    "WatchPayment": _watch_first_message,
}


@pytest.mark.parametrize("rpc", sorted(PAYMENT_ISOLATION_CASES))
async def test_another_tenants_payment_is_not_found_and_unchanged(
    rpc: str,
    payments_stub: PaymentStub,
    tenant: TenantCredentials,
    other_tenant: TenantCredentials,
    pool: asyncpg.Pool,
) -> None:
    # Authorized, not captured: a Capture, Cancel or Refund that leaked through would change it.
    payment = await create(payments_stub, tenant, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.REQUIRES_CAPTURE)
    pid = payment.payment_id
    get = payments_pb2.GetPaymentRequest(payment_id=pid)
    before = await payments_stub.GetPayment(get, metadata=tenant.metadata)
    assert before.payment.status == payments_pb2.PAYMENT_STATUS_REQUIRES_CAPTURE
    counts_before = await tenant_row_counts(pool, tenant.tenant_id)

    code, status = await call_error(PAYMENT_ISOLATION_CASES[rpc](payments_stub, pid, other_tenant.metadata))

    assert code == grpc.StatusCode.NOT_FOUND
    assert detail(status, error_details_pb2.ResourceInfo).resource_name == pid
    assert await payments_stub.GetPayment(get, metadata=tenant.metadata) == before
    # Nothing of A's, nor anything untenanted (the outbox: no command), was added or removed. The
    # other tenant's own request_id is kept with its NOT_FOUND answer, as documented (replayed).
    assert await tenant_row_counts(pool, tenant.tenant_id) == counts_before


async def test_another_tenant_lists_none_of_its_payments(
    payments_stub: PaymentStub, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    payment = await create(payments_stub, tenant, customer_reference="cust-42")
    mine = await payments_stub.ListPayments(payments_pb2.ListPaymentsRequest(), metadata=tenant.metadata)
    assert [p.payment_id for p in mine.payments] == [payment.payment_id]
    for request in (
        payments_pb2.ListPaymentsRequest(),
        payments_pb2.ListPaymentsRequest(customer_reference="cust-42"),
    ):
        listed = await payments_stub.ListPayments(request, metadata=other_tenant.metadata)
        assert list(listed.payments) == []


async def test_get_with_a_malformed_id_names_the_field(
    payments_stub: PaymentStub, tenant: TenantCredentials
) -> None:
    code, status = await call_error(
        payments_stub.GetPayment(payments_pb2.GetPaymentRequest(payment_id="nope"), metadata=tenant.metadata)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "payment_id" in violations(status)


async def test_unauthenticated_calls_are_refused(payments_stub: PaymentStub) -> None:
    code, _ = await call_error(payments_stub.CreatePayment(create_request()))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_list_pages_newest_first_and_filters(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    made = [await create(payments_stub, tenant, customer_reference=f"c{i % 2}") for i in range(5)]
    usd = await create(payments_stub, tenant, currency="USD", customer_reference="c9")
    await drive(pool, tenant.tenant_id, made[0].payment_id, PaymentStatus.SUCCEEDED)
    seen: list[str] = []
    token = ""
    while True:
        page = await payments_stub.ListPayments(
            payments_pb2.ListPaymentsRequest(page_size=2, page_token=token), metadata=tenant.metadata
        )
        assert len(page.payments) <= 2
        seen += [p.payment_id for p in page.payments]
        token = page.next_page_token
        if not token:
            break
    assert seen == [p.payment_id for p in reversed([*made, usd])]

    async def ids(**filters: Any) -> list[str]:
        reply = await payments_stub.ListPayments(
            payments_pb2.ListPaymentsRequest(**filters), metadata=tenant.metadata
        )
        return [p.payment_id for p in reply.payments]

    assert await ids(currency="USD") == [usd.payment_id]
    assert await ids(status=payments_pb2.PAYMENT_STATUS_SUCCEEDED) == [made[0].payment_id]
    assert await ids(customer_reference="c1") == [made[3].payment_id, made[1].payment_id]
    middle = made[2].create_time
    assert await ids(create_time_before=middle) == [made[1].payment_id, made[0].payment_id]
    assert await ids(create_time_after=middle, create_time_before=made[4].create_time) == [made[3].payment_id]
    got = await payments_stub.ListPayments(
        payments_pb2.ListPaymentsRequest(currency="USD"), metadata=tenant.metadata
    )
    assert (
        got.payments[0]
        == (
            await payments_stub.GetPayment(
                payments_pb2.GetPaymentRequest(payment_id=usd.payment_id), metadata=tenant.metadata
            )
        ).payment
    )
    # A token is only valid with the filters it was issued for (AIP-158).
    first = await payments_stub.ListPayments(
        payments_pb2.ListPaymentsRequest(page_size=1), metadata=tenant.metadata
    )
    code, status = await call_error(
        payments_stub.ListPayments(
            payments_pb2.ListPaymentsRequest(page_size=1, page_token=first.next_page_token, currency="EUR"),
            metadata=tenant.metadata,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in violations(status)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"page_size": 1001}, "page_size"),
        ({"status": 99}, "status"),
        ({"currency": "eur"}, "currency"),
        ({"page_token": "garbage"}, "page_token"),
        (
            {
                "create_time_after": timestamp_pb2.Timestamp(seconds=2_000_000_000),
                "create_time_before": timestamp_pb2.Timestamp(seconds=1_000_000_000),
            },
            "create_time_before",
        ),
    ],
)
async def test_list_rejects_bad_requests_naming_the_field(
    payments_stub: PaymentStub, tenant: TenantCredentials, request_fields: dict[str, Any], field: str
) -> None:
    code, status = await call_error(
        payments_stub.ListPayments(
            payments_pb2.ListPaymentsRequest(**request_fields), metadata=tenant.metadata
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(status)


async def test_watch_streams_each_change_and_ends_when_final(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant)
    pid = uuid.UUID(payment.payment_id)
    stream = payments_stub.WatchPayment(
        payments_pb2.WatchPaymentRequest(payment_id=payment.payment_id), metadata=tenant.metadata, timeout=30
    )
    messages = aiter(stream)
    first = await anext(messages)
    assert first.payment.status == payments_pb2.PAYMENT_STATUS_REQUIRES_PROCESSING
    assert not first.HasField("transition")
    async with pool.acquire() as conn, conn.transaction():
        locked = await store.lock_payment(conn, tenant.tenant_id, pid)
        assert locked is not None
        attempt = await store.start_attempt(conn, locked, "stripe")
    processing = await anext(messages)
    assert processing.payment.status == payments_pb2.PAYMENT_STATUS_PROCESSING
    assert (processing.transition.cause, processing.transition.attempt_no) == ("attempt_started", attempt)
    async with pool.acquire() as conn, conn.transaction():
        await store.finish_attempt(
            conn, tenant.tenant_id, pid, attempt, OperationTrigger.SUCCEEDED, processor_reference="pi_9"
        )
        await store.record_transition(
            conn,
            tenant.tenant_id,
            pid,
            PaymentStatus.PROCESSING,
            PaymentStatus.SUCCEEDED,
            PaymentTrigger.ATTEMPT_SUCCEEDED,
            attempt_no=attempt,
            amount_captured_minor=1050,
        )
    succeeded = await anext(messages)
    assert succeeded.payment.status == payments_pb2.PAYMENT_STATUS_SUCCEEDED
    assert succeeded.payment.amount_captured_minor == 1050
    assert succeeded.payment.processor_reference == "pi_9"
    assert succeeded.transition.to_status == payments_pb2.PAYMENT_STATUS_SUCCEEDED
    rest = [m async for m in messages]  # the stream ends after the final status
    assert rest == []
    assert await stream.code() == grpc.StatusCode.OK


async def test_watch_of_a_final_payment_sends_one_message(
    payments_stub: PaymentStub, tenant: TenantCredentials
) -> None:
    payment = await create(payments_stub, tenant)
    await payments_stub.CancelPayment(
        payments_pb2.CancelPaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment.payment_id),
        metadata=tenant.metadata,
    )
    stream = payments_stub.WatchPayment(
        payments_pb2.WatchPaymentRequest(payment_id=payment.payment_id), metadata=tenant.metadata, timeout=30
    )
    messages = [m async for m in stream]
    assert [m.payment.status for m in messages] == [payments_pb2.PAYMENT_STATUS_CANCELED]


async def test_payment_service_is_reflected_and_healthy(gateway: Gateway) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=PAYMENT_SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names: set[str] = set()
        async for response in responses:
            names = {s.name for s in response.list_services_response.service}
            break
    assert PAYMENT_SERVICE_NAME in names


# --- Worker primitives and database rules ---------------------------------------------------------


async def test_failover_only_after_attempts_that_definitely_did_not_charge(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant)
    pid = uuid.UUID(payment.payment_id)
    async with pool.acquire() as conn, conn.transaction():
        locked = await store.lock_payment(conn, tenant.tenant_id, pid)
        assert locked is not None
        first = await store.start_attempt(conn, locked, "stripe")
        status = await store.finish_attempt(
            conn, tenant.tenant_id, pid, first, OperationTrigger.FAILED, failure_code="card_declined"
        )
        assert status.value == "failed"
        await store.record_transition(
            conn,
            tenant.tenant_id,
            pid,
            PaymentStatus.PROCESSING,
            PaymentStatus.FAILED,
            PaymentTrigger.ATTEMPT_FAILED,
            attempt_no=first,
            failure_code="card_declined",
        )
        failed = await store.lock_payment(conn, tenant.tenant_id, pid)
        assert failed is not None
        second = await store.start_attempt(conn, failed, "adyen")  # failover in the same transaction
        assert second == 2
        await store.finish_attempt(conn, tenant.tenant_id, pid, second, OperationTrigger.AMBIGUOUS)
        await store.record_transition(
            conn,
            tenant.tenant_id,
            pid,
            PaymentStatus.PROCESSING,
            PaymentStatus.UNKNOWN,
            PaymentTrigger.ATTEMPT_UNKNOWN,
            attempt_no=second,
        )
        await store.record_transition(
            conn,
            tenant.tenant_id,
            pid,
            PaymentStatus.UNKNOWN,
            PaymentStatus.FAILED,
            PaymentTrigger.RESOLVED_FAILED,
            attempt_no=second,
        )
        # Attempt 2 is still UNKNOWN (not resolved as failed): a third attempt could double-charge.
        again = await store.lock_payment(conn, tenant.tenant_id, pid)
        assert again is not None
        with pytest.raises(FailoverNotAllowed):
            await store.start_attempt(conn, again, "stripe")
    rows = await pool.fetch(
        """SELECT attempt_no, idempotency_key, processor, next_lookup_at
             FROM payment_attempts ORDER BY attempt_no"""
    )
    assert [(r["idempotency_key"], r["processor"]) for r in rows] == [
        (f"{pid}_1", "stripe"),
        (f"{pid}_2", "adyen"),
    ]
    assert rows[0]["next_lookup_at"] is None  # FAILED: nothing to look up
    assert rows[1]["next_lookup_at"] is not None  # UNKNOWN: the janitor looks it up
    got = await payments_stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=payment.payment_id), metadata=tenant.metadata
    )
    assert [t.cause for t in got.payment.transitions] == [
        "created",
        "attempt_started",
        "attempt_failed",
        "failover_attempt_started",
        "attempt_unknown",
        "resolved_failed",
    ]


async def test_record_transition_refuses_what_the_state_machine_does_not_allow(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant)
    pid = uuid.UUID(payment.payment_id)
    async with pool.acquire() as conn:
        with pytest.raises(IllegalTransition):
            await store.record_transition(
                conn,
                tenant.tenant_id,
                pid,
                PaymentStatus.REQUIRES_PROCESSING,
                PaymentStatus.SUCCEEDED,
                PaymentTrigger.ATTEMPT_SUCCEEDED,
                amount_captured_minor=1050,
            )
        with pytest.raises(ValueError, match="leads from"):
            await store.record_transition(
                conn,
                tenant.tenant_id,
                pid,
                PaymentStatus.REQUIRES_PROCESSING,
                PaymentStatus.FAILED,
                PaymentTrigger.ATTEMPT_STARTED,
            )
        with pytest.raises(store.StaleStatus):
            await store.record_transition(
                conn,
                tenant.tenant_id,
                pid,
                PaymentStatus.PROCESSING,
                PaymentStatus.FAILED,
                PaymentTrigger.ATTEMPT_FAILED,
            )
    assert await pool.fetchval("SELECT status FROM payments") == "requires_processing"


async def test_the_database_keeps_the_money_rules_and_the_history(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    payment = await create(payments_stub, tenant)
    await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.SUCCEEDED)
    pid = uuid.UUID(payment.payment_id)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE payments SET amount_refunded_minor = 1051 WHERE id = $1", pid)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE payments SET amount_captured_minor = 1051 WHERE id = $1", pid)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "UPDATE payments SET status = 'failed' WHERE id = $1", pid
        )  # captured, not succeeded
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute("UPDATE payment_transitions SET cause = 'forged'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute("DELETE FROM payment_transitions")
    insert_capture = """INSERT INTO payment_captures (id, tenant_id, payment_id, request_id, amount_minor)
                        VALUES ($1, $2, $3, 'r', 1)"""
    await pool.execute(insert_capture, uuid.uuid4(), tenant.tenant_id, pid)
    with pytest.raises(asyncpg.UniqueViolationError):  # one open capture per payment
        await pool.execute(insert_capture, uuid.uuid4(), tenant.tenant_id, pid)
    assert await pool.fetchval("SELECT count(*) FROM payment_transitions") == 3


async def test_accept_time_matches_the_stored_time(
    payments_stub: PaymentStub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    payment = await create(payments_stub, tenant)
    stored = await pool.fetchval("SELECT created_at FROM payments")
    assert payment.create_time.ToDatetime(tzinfo=UTC) == stored
    assert stored >= before
