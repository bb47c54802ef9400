"""The Stripe connector against the fake Stripe over real HTTP on loopback.

Covers the wire format the fake checked (path, Bearer auth, Stripe-Version,
Idempotency-Key = ``{payment_id}_{attempt_no}``, bracket-notation form body),
every PaymentIntent status mapping, every row of the error table (card
declines, 400/401/403/404, 409 in-flight key, idempotency_error, 429 with
Retry-After, 5xx, 424, Stripe-Should-Retry, timeout, reset, malformed, connect
refused), the lost-response path (ambiguous -> lookup finds it -> the retry
replays -> exactly one charge), lookup under search lag, refunds (partial,
over-refund), the fake's own idempotency and wire checks, signed webhook
delivery, and that the secret key never shows in reprs, errors or logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from aiohttp import web

from payments.processor import (
    AmbiguousProcessorError,
    CaptureMethod,
    ChargeRequest,
    Declined,
    PermanentProcessorError,
    ProcessorError,
    ProcessorStatus,
    RefundStatus,
    RetryableProcessorError,
)
from payments.stripe import (
    API_VERSION,
    MalformedStripeObject,
    StripeProcessor,
    encode_form,
    from_stripe_amount,
    map_payment_intent,
    map_refund,
    search_query_for,
    to_stripe_amount,
)
from payments.stripe_signature import SIGNATURE_HEADER, construct_event
from switchboard.embedded import free_port
from switchboard.fakes.http import Fault
from switchboard.fakes.stripe import FakeStripe

SECRET_KEY = "sk_test_51NzSwitchboardFakeKey0123456789abcdefABCDEF"
WEBHOOK_SECRET = "whsec_switchboard_test_0123456789abcdef"
TIMEOUT_S = 0.5


def charge_request(
    *,
    amount_minor: int = 1050,
    currency: str = "EUR",
    payment_method: str = "pm_card_visa",
    capture_method: CaptureMethod = CaptureMethod.AUTOMATIC,
    attempt_no: int = 1,
    payment_id: uuid.UUID | None = None,
) -> ChargeRequest:
    return ChargeRequest(
        payment_id=payment_id or uuid.uuid4(),
        attempt_no=attempt_no,
        amount_minor=amount_minor,
        currency=currency,
        payment_method=payment_method,
        capture_method=capture_method,
        customer_reference="cust-42",
        description="Order o-1",
        metadata={"order": "o-1"},
    )


def assert_secret_free(exc: BaseException) -> None:
    """The key is in none of the texts an error can end up in, and nothing is chained."""
    for text in (str(exc), repr(exc), "".join(traceback.format_exception(exc))):
        assert SECRET_KEY not in text
    assert exc.__cause__ is None
    assert exc.__context__ is None


async def failure(call: Any) -> ProcessorError:
    """Await ``call`` (a coroutine) expecting a ProcessorError; check it is secret-free."""
    with pytest.raises(ProcessorError) as info:
        await call
    assert_secret_free(info.value)
    return info.value


@pytest.fixture(autouse=True)
def no_key_in_client_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        if record.name.split(".")[0] in ("httpx", "httpcore", "payments", "aiohttp"):
            assert SECRET_KEY not in record.getMessage()


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    server = FakeStripe(SECRET_KEY)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def lagging_fake() -> AsyncIterator[FakeStripe]:
    server = FakeStripe(SECRET_KEY, search_lag=True)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def stripe(fake: FakeStripe) -> AsyncIterator[StripeProcessor]:
    client = StripeProcessor(SECRET_KEY, base_url=fake.base_url, timeout_s=TIMEOUT_S)
    yield client
    await client.aclose()


def posts(fake: FakeStripe) -> list[Any]:
    return [received for received in fake.received if received.method == "POST"]


# --- pure helpers -------------------------------------------------------------------------------


def test_encode_form_uses_bracket_notation() -> None:
    assert encode_form(
        {
            "amount": 1050,
            "confirm": True,
            "off_session": False,
            "description": None,
            "metadata": {"k": "v", "n": {"deep": "x"}},
            "expand": ["latest_charge", "customer"],
        }
    ) == [
        ("amount", "1050"),
        ("confirm", "true"),
        ("off_session", "false"),
        ("metadata[k]", "v"),
        ("metadata[n][deep]", "x"),
        ("expand[0]", "latest_charge"),
        ("expand[1]", "customer"),
    ]


def test_isk_is_two_decimal_at_stripe() -> None:
    assert to_stripe_amount(1500, "ISK") == 150_000
    assert from_stripe_amount(150_000, "isk") == 1500
    assert to_stripe_amount(1050, "EUR") == 1050
    assert to_stripe_amount(500, "JPY") == 500
    with pytest.raises(MalformedStripeObject):
        from_stripe_amount(150_050, "ISK")


def test_search_query_escapes_quotes() -> None:
    assert search_query_for("abc_1") == "metadata['switchboard_attempt']:'abc_1'"
    assert search_query_for("a'b\\c") == "metadata['switchboard_attempt']:'a\\'b\\\\c'"


def intent(status: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": "pi_123",
        "object": "payment_intent",
        "amount": 1000,
        "amount_received": 0,
        "currency": "usd",
        "status": status,
        **fields,
    }


@pytest.mark.parametrize(
    ("obj", "status", "decline_code", "captured"),
    [
        pytest.param(
            intent("succeeded", amount_received=1000), ProcessorStatus.SUCCEEDED, None, 1000, id="ok"
        ),
        pytest.param(
            intent("succeeded", amount_received=600),
            ProcessorStatus.SUCCEEDED,
            None,
            600,
            id="partial-capture",
        ),
        pytest.param(intent("requires_capture"), ProcessorStatus.REQUIRES_CAPTURE, None, 0, id="authorized"),
        pytest.param(intent("processing"), ProcessorStatus.PROCESSING, None, 0, id="processing"),
        pytest.param(
            intent(
                "requires_payment_method",
                last_payment_error={"code": "card_declined", "decline_code": "insufficient_funds"},
            ),
            ProcessorStatus.FAILED,
            "insufficient_funds",
            0,
            id="declined",
        ),
        pytest.param(
            intent("requires_payment_method", last_payment_error={"code": "expired_card"}),
            ProcessorStatus.FAILED,
            "expired_card",
            0,
            id="declined-code-only",
        ),
        pytest.param(
            intent("requires_payment_method"), ProcessorStatus.FAILED, None, 0, id="never-confirmed"
        ),
        pytest.param(intent("requires_confirmation"), ProcessorStatus.FAILED, None, 0, id="unconfirmed"),
        pytest.param(
            intent("requires_action"), ProcessorStatus.FAILED, "authentication_required", 0, id="needs-3ds"
        ),
        pytest.param(
            intent("canceled", cancellation_reason="requested_by_customer"),
            ProcessorStatus.CANCELED,
            None,
            0,
            id="canceled",
        ),
        pytest.param(
            intent("canceled", cancellation_reason="abandoned"),
            ProcessorStatus.FAILED,
            "authentication_required",
            0,
            id="abandoned",
        ),
    ],
)
def test_payment_intent_status_mapping(
    obj: dict[str, Any], status: ProcessorStatus, decline_code: str | None, captured: int
) -> None:
    payment = map_payment_intent(obj)
    assert payment.status is status
    assert payment.decline_code == decline_code
    assert payment.amount_captured_minor == captured
    assert (payment.processor_reference, payment.amount_minor, payment.currency) == ("pi_123", 1000, "USD")


@pytest.mark.parametrize(
    "obj",
    [
        intent("some_new_status"),
        {**intent("succeeded"), "object": "charge"},
        {k: v for k, v in intent("succeeded").items() if k != "id"},
        {**intent("succeeded"), "amount": "1000"},
        {**intent("succeeded"), "currency": None},
    ],
)
def test_unrecognised_payment_intents_are_malformed(obj: dict[str, Any]) -> None:
    with pytest.raises(MalformedStripeObject):
        map_payment_intent(obj)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("succeeded", RefundStatus.SUCCEEDED),
        ("pending", RefundStatus.PENDING),
        ("requires_action", RefundStatus.PENDING),
        ("failed", RefundStatus.FAILED),
        ("canceled", RefundStatus.FAILED),
    ],
)
def test_refund_status_mapping(status: str, expected: RefundStatus) -> None:
    refund = map_refund(
        {"id": "re_1", "object": "refund", "amount": 300, "currency": "eur", "status": status}
    )
    assert (refund.processor_reference, refund.status, refund.amount_minor, refund.currency) == (
        "re_1",
        expected,
        300,
        "EUR",
    )


# --- wire format and success ----------------------------------------------------------------------


async def test_create_charge_wire_format(fake: FakeStripe, stripe: StripeProcessor) -> None:
    request = charge_request()

    payment = await stripe.create_charge(request)

    [sent] = posts(fake)
    assert (sent.method, sent.path) == ("POST", "/v1/payment_intents")
    assert sent.headers["Authorization"] == f"Bearer {SECRET_KEY}"
    assert sent.headers["Stripe-Version"] == API_VERSION
    assert sent.headers["Idempotency-Key"] == f"{request.payment_id}_1" == request.idempotency_key
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert sent.body == {
        "amount": "1050",
        "currency": "eur",
        "payment_method": "pm_card_visa",
        "confirm": "true",
        "capture_method": "automatic",
        "automatic_payment_methods": {"enabled": "true", "allow_redirects": "never"},
        "description": "Order o-1",
        "metadata": {
            "order": "o-1",
            "switchboard_payment_id": str(request.payment_id),
            "switchboard_attempt": request.idempotency_key,
            "switchboard_customer_reference": "cust-42",
        },
    }
    [stored] = fake.intents.values()
    assert payment.processor_reference == stored["id"]
    assert payment.status is ProcessorStatus.SUCCEEDED
    assert (payment.amount_minor, payment.amount_captured_minor, payment.currency) == (1050, 1050, "EUR")
    [charge] = fake.captured_charges()
    assert (charge["payment_intent"], charge["amount_captured"]) == (stored["id"], 1050)


async def test_reserved_metadata_keys_win_over_caller_keys(fake: FakeStripe, stripe: StripeProcessor) -> None:
    request = replace(charge_request(), metadata={"switchboard_attempt": "forged", "other": "kept"})
    await stripe.create_charge(request)
    metadata = posts(fake)[0].body["metadata"]
    assert metadata["switchboard_attempt"] == request.idempotency_key
    assert metadata["other"] == "kept"


async def test_isk_amounts_are_scaled_on_the_wire(fake: FakeStripe, stripe: StripeProcessor) -> None:
    payment = await stripe.create_charge(charge_request(amount_minor=1500, currency="ISK"))
    assert posts(fake)[0].body["amount"] == "150000"
    assert (payment.amount_minor, payment.currency) == (1500, "ISK")


async def test_manual_capture_authorizes_then_captures_partially(
    fake: FakeStripe, stripe: StripeProcessor
) -> None:
    request = charge_request(amount_minor=1000, capture_method=CaptureMethod.MANUAL)
    authorized = await stripe.create_charge(request)
    assert authorized.status is ProcessorStatus.REQUIRES_CAPTURE
    assert authorized.amount_captured_minor == 0
    assert fake.captured_charges() == []
    assert len(fake.charges) == 1

    captured = await stripe.capture(authorized.processor_reference, 600, "EUR", "cap-1")

    capture_post = posts(fake)[-1]
    assert capture_post.path == f"/v1/payment_intents/{authorized.processor_reference}/capture"
    assert capture_post.body == {"amount_to_capture": "600"}
    assert capture_post.headers["Idempotency-Key"] == "cap-1"
    assert captured.status is ProcessorStatus.SUCCEEDED
    assert (captured.amount_minor, captured.amount_captured_minor) == (1000, 600)
    assert [c["amount_captured"] for c in fake.captured_charges()] == [600]

    again = await failure(stripe.capture(authorized.processor_reference, 100, "EUR", "cap-2"))
    assert isinstance(again, PermanentProcessorError)
    assert again.code == "payment_intent_unexpected_state"


async def test_capture_beyond_the_authorization_is_refused(fake: FakeStripe, stripe: StripeProcessor) -> None:
    authorized = await stripe.create_charge(
        charge_request(amount_minor=1000, capture_method=CaptureMethod.MANUAL)
    )
    error = await failure(stripe.capture(authorized.processor_reference, 1001, "EUR", "cap-big"))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == "amount_too_large"
    assert fake.captured_charges() == []


async def test_cancel_releases_an_authorization(fake: FakeStripe, stripe: StripeProcessor) -> None:
    authorized = await stripe.create_charge(charge_request(capture_method=CaptureMethod.MANUAL))
    canceled = await stripe.cancel(authorized.processor_reference, "cancel-1")
    assert canceled.status is ProcessorStatus.CANCELED
    assert posts(fake)[-1].path == f"/v1/payment_intents/{authorized.processor_reference}/cancel"
    assert posts(fake)[-1].body == {}
    assert fake.captured_charges() == []


async def test_cancel_after_success_is_permanent(stripe: StripeProcessor) -> None:
    charged = await stripe.create_charge(charge_request())
    error = await failure(stripe.cancel(charged.processor_reference, "cancel-late"))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == "payment_intent_unexpected_state"


async def test_processing_then_settled_by_retrieve(fake: FakeStripe, stripe: StripeProcessor) -> None:
    pending = await stripe.create_charge(charge_request(payment_method="pm_fake_processing"))
    assert pending.status is ProcessorStatus.PROCESSING

    fake.finish_processing(pending.processor_reference)
    settled = await stripe.retrieve(pending.processor_reference)

    assert settled.status is ProcessorStatus.SUCCEEDED
    assert fake.received[-1].method == "GET"
    assert fake.received[-1].path == f"/v1/payment_intents/{pending.processor_reference}"


async def test_processing_that_fails_maps_to_failed(fake: FakeStripe, stripe: StripeProcessor) -> None:
    pending = await stripe.create_charge(charge_request(payment_method="pm_fake_processing"))
    fake.finish_processing(pending.processor_reference, succeed=False)
    failed = await stripe.retrieve(pending.processor_reference)
    assert (failed.status, failed.decline_code) == (ProcessorStatus.FAILED, "generic_decline")


async def test_requires_action_is_abandoned_and_declined(fake: FakeStripe, stripe: StripeProcessor) -> None:
    request = charge_request(payment_method="pm_card_authenticationRequired")

    error = await failure(stripe.create_charge(request))

    assert isinstance(error, Declined)
    assert error.code == "authentication_required"
    [stored] = fake.intents.values()
    assert (stored["status"], stored["cancellation_reason"]) == ("canceled", "abandoned")
    cancel = posts(fake)[-1]
    assert cancel.path == f"/v1/payment_intents/{stored['id']}/cancel"
    assert cancel.headers["Idempotency-Key"] == f"{request.idempotency_key}:abandon"
    assert fake.charges == []
    looked_up = await stripe.lookup_charge(request)
    assert looked_up is not None
    assert (looked_up.status, looked_up.decline_code) == (ProcessorStatus.FAILED, "authentication_required")

    # A retry with the same key replays both answers and ends the same way.
    again = await failure(stripe.create_charge(request))
    assert isinstance(again, Declined)
    assert fake.replays == [request.idempotency_key, f"{request.idempotency_key}:abandon"]
    assert len(fake.intents) == 1


# --- declines ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
        ("pm_card_chargeDeclinedLostCard", "lost_card"),
        ("pm_card_chargeDeclinedStolenCard", "stolen_card"),
        ("pm_card_chargeDeclinedFraudulent", "fraudulent"),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card"),
        ("pm_card_chargeDeclinedIncorrectCvc", "incorrect_cvc"),
        ("pm_card_chargeDeclinedProcessingError", "processing_error"),
    ],
)
async def test_card_declines(fake: FakeStripe, stripe: StripeProcessor, token: str, code: str) -> None:
    request = charge_request(payment_method=token)

    error = await failure(stripe.create_charge(request))

    assert isinstance(error, Declined)
    assert error.code == code
    assert error.definitely_not_charged
    assert not error.retryable
    assert "HTTP 402 card_error" in str(error)
    assert fake.charges == []
    looked_up = await stripe.lookup_charge(request)
    assert looked_up is not None
    assert (looked_up.status, looked_up.decline_code) == (ProcessorStatus.FAILED, code)


# --- error classes -------------------------------------------------------------------------------


async def test_wrong_key_is_permanent(fake: FakeStripe) -> None:
    wrong = "sk_test_" + "0" * 40
    client = StripeProcessor(wrong, base_url=fake.base_url, timeout_s=TIMEOUT_S)
    try:
        error = await failure(client.create_charge(charge_request()))
    finally:
        await client.aclose()
    assert isinstance(error, PermanentProcessorError)
    assert "HTTP 401" in str(error)
    assert wrong not in str(error)
    assert fake.intents == {}


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        pytest.param(
            FakeStripe.error(400, "invalid_request_error", code="parameter_invalid_integer"),
            "parameter_invalid_integer",
            id="400-invalid-request",
        ),
        pytest.param(FakeStripe.error(401, "invalid_request_error"), "invalid_request_error", id="401-auth"),
        pytest.param(
            FakeStripe.error(403, "invalid_request_error", code="secret_key_required"),
            "secret_key_required",
            id="403-permission",
        ),
        pytest.param(
            FakeStripe.error(404, "invalid_request_error", code="resource_missing"), "resource_missing"
        ),
        pytest.param(Fault.http_status(400, body="{}"), "http_400", id="400-without-envelope"),
    ],
)
async def test_refusals_are_permanent(
    fake: FakeStripe, stripe: StripeProcessor, fault: Fault, code: str
) -> None:
    fake.inject(fault)
    error = await failure(stripe.create_charge(charge_request()))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == code
    assert error.definitely_not_charged
    assert fake.intents == {}


async def test_unknown_payment_method_is_permanent(stripe: StripeProcessor) -> None:
    error = await failure(stripe.create_charge(charge_request(payment_method="pm_nope")))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == "resource_missing"


async def test_429_is_retryable_with_retry_after(fake: FakeStripe, stripe: StripeProcessor) -> None:
    request = charge_request()
    fake.inject(Fault.rate_limited(retry_after_s=7))

    error = await failure(stripe.create_charge(request))

    assert isinstance(error, RetryableProcessorError)
    assert error.retry_after_s == 7.0
    assert error.definitely_not_charged
    assert fake.intents == {}
    payment = await stripe.create_charge(request)
    assert payment.status is ProcessorStatus.SUCCEEDED
    assert len(fake.captured_charges()) == 1


async def test_rate_limit_error_envelope_is_retryable(fake: FakeStripe, stripe: StripeProcessor) -> None:
    fake.inject(
        FakeStripe.error(429, "invalid_request_error", code="rate_limit", headers={"Retry-After": "2"})
    )
    error = await failure(stripe.create_charge(charge_request()))
    assert isinstance(error, RetryableProcessorError)
    assert (error.code, error.retry_after_s) == ("rate_limit", 2.0)


async def test_in_flight_key_is_409_retryable_then_replays(fake: FakeStripe, stripe: StripeProcessor) -> None:
    request = charge_request()
    hold = fake.hold_execution()
    first = asyncio.create_task(stripe.create_charge(request))
    await asyncio.wait_for(hold.reached.wait(), 5)

    error = await failure(stripe.create_charge(request))

    assert isinstance(error, RetryableProcessorError)
    assert error.code == "idempotency_key_in_use"
    hold.release()
    charged = await asyncio.wait_for(first, 5)
    replayed = await stripe.create_charge(request)
    assert replayed == charged
    assert fake.replays == [request.idempotency_key]
    assert len(fake.captured_charges()) == 1


async def test_409_with_should_retry_false_is_ambiguous(fake: FakeStripe, stripe: StripeProcessor) -> None:
    fake.inject(
        FakeStripe.error(
            409, "idempotency_error", code="idempotency_key_in_use", headers={"Stripe-Should-Retry": "false"}
        )
    )
    error = await failure(stripe.create_charge(charge_request()))
    assert isinstance(error, AmbiguousProcessorError)
    assert not error.definitely_not_charged


async def test_lock_timeout_is_retryable(fake: FakeStripe, stripe: StripeProcessor) -> None:
    fake.inject(FakeStripe.error(400, "invalid_request_error", code="lock_timeout"))
    error = await failure(stripe.create_charge(charge_request()))
    assert isinstance(error, RetryableProcessorError)
    assert error.code == "lock_timeout"


async def test_should_retry_true_makes_a_4xx_retryable(fake: FakeStripe, stripe: StripeProcessor) -> None:
    fake.inject(
        FakeStripe.error(
            400, "invalid_request_error", code="some_new_code", headers={"Stripe-Should-Retry": "true"}
        )
    )
    error = await failure(stripe.create_charge(charge_request()))
    assert isinstance(error, RetryableProcessorError)
    assert "Stripe-Should-Retry: true" in str(error)


async def test_key_reused_with_other_parameters_is_ambiguous(
    fake: FakeStripe, stripe: StripeProcessor
) -> None:
    """idempotency_error proves an earlier request with the key executed: it may have charged."""
    request = charge_request(amount_minor=1000)
    first = await stripe.create_charge(request)

    error = await failure(stripe.create_charge(replace(request, amount_minor=2000)))

    assert isinstance(error, AmbiguousProcessorError)
    assert error.code == "idempotency_error"
    assert "same parameters" in str(error)
    looked_up = await stripe.lookup_charge(request)
    assert looked_up is not None
    assert looked_up.processor_reference == first.processor_reference
    assert len(fake.captured_charges()) == 1


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(FakeStripe.error(500, "api_error"), id="500-api-error"),
        pytest.param(Fault.http_status(502, body="<html>bad gateway</html>"), id="502-html"),
        pytest.param(Fault.http_status(503), id="503"),
        pytest.param(FakeStripe.error(424, "invalid_request_error"), id="424-dependency"),
    ],
)
async def test_server_errors_are_ambiguous(fake: FakeStripe, stripe: StripeProcessor, fault: Fault) -> None:
    fake.inject(fault)
    error = await failure(stripe.create_charge(charge_request()))
    assert isinstance(error, AmbiguousProcessorError)
    assert not error.definitely_not_charged
    assert not error.retryable
    assert "indeterminate" in str(error)


async def test_5xx_stays_ambiguous_whatever_stripe_should_retry_says(
    fake: FakeStripe, stripe: StripeProcessor
) -> None:
    fake.inject(FakeStripe.error(500, "api_error", headers={"Stripe-Should-Retry": "true"}))
    error = await failure(stripe.create_charge(charge_request()))
    assert isinstance(error, AmbiguousProcessorError)
    assert "Stripe-Should-Retry: true" in str(error)


async def test_timeout_after_sending_is_ambiguous_and_resolved_by_lookup(
    fake: FakeStripe, stripe: StripeProcessor
) -> None:
    request = charge_request()
    fake.inject(Fault.slow(delay_s=TIMEOUT_S * 4))

    error = await failure(stripe.create_charge(request))

    assert isinstance(error, AmbiguousProcessorError)
    assert "ReadTimeout" in str(error)
    # Like Stripe, the fake still executes the request after the client gave up.
    await fake.wait_for(lambda: len(fake.intents) == 1)
    looked_up = await stripe.lookup_charge(request)
    assert looked_up is not None
    assert looked_up.status is ProcessorStatus.SUCCEEDED
    retried = await stripe.create_charge(request)
    assert retried.processor_reference == looked_up.processor_reference
    assert fake.replays == [request.idempotency_key]
    assert len(fake.captured_charges()) == 1


async def test_connection_reset_is_ambiguous(fake: FakeStripe, stripe: StripeProcessor) -> None:
    request = charge_request()
    fake.inject(Fault.reset())

    error = await failure(stripe.create_charge(request))

    assert isinstance(error, AmbiguousProcessorError)
    assert fake.intents == {}
    assert await stripe.lookup_charge(request) is None
    await stripe.create_charge(request)
    assert len(fake.captured_charges()) == 1


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault.malformed(), id="html-200"),
        pytest.param(Fault.http_status(200, body='{"object": "payment_intent"}'), id="intent-without-id"),
        pytest.param(Fault.http_status(200, body="[]"), id="json-array"),
        pytest.param(Fault.http_status(302, body="{}"), id="redirect"),
    ],
)
async def test_malformed_answers_are_ambiguous(
    fake: FakeStripe, stripe: StripeProcessor, fault: Fault
) -> None:
    fake.inject(fault)
    error = await failure(stripe.create_charge(charge_request()))
    assert isinstance(error, AmbiguousProcessorError)
    assert error.code == "malformed"


async def test_connection_refused_is_retryable() -> None:
    client = StripeProcessor(SECRET_KEY, base_url=f"http://127.0.0.1:{free_port()}", timeout_s=TIMEOUT_S)
    try:
        error = await failure(client.create_charge(charge_request()))
    finally:
        await client.aclose()
    assert isinstance(error, RetryableProcessorError)
    assert error.code == "connect"
    assert "not sent" in str(error)


async def test_reads_that_fail_are_retryable(fake: FakeStripe, stripe: StripeProcessor) -> None:
    charged = await stripe.create_charge(charge_request())
    for fault in (Fault.http_status(500), Fault.reset(), Fault.malformed()):
        fake.inject(fault)
        error = await failure(stripe.retrieve(charged.processor_reference))
        assert isinstance(error, RetryableProcessorError)
    fake.inject(Fault.http_status(503))
    error = await failure(stripe.lookup_charge(charge_request()))
    assert isinstance(error, RetryableProcessorError)


async def test_retrieve_unknown_intent_is_permanent(stripe: StripeProcessor) -> None:
    error = await failure(stripe.retrieve("pi_doesnotexist"))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == "resource_missing"


# --- the lost response and the lookup ------------------------------------------------------------


async def test_lost_response_lookup_then_replay_charges_once(
    fake: FakeStripe, stripe: StripeProcessor
) -> None:
    """Stripe charged but the answer was lost: ambiguous; lookup finds it; the retry replays it."""
    request = charge_request()
    fake.inject(Fault.lost_response())

    error = await failure(stripe.create_charge(request))

    assert isinstance(error, AmbiguousProcessorError)
    assert len(fake.captured_charges()) == 1
    looked_up = await stripe.lookup_charge(request)
    assert looked_up is not None
    assert looked_up.status is ProcessorStatus.SUCCEEDED
    [stored] = fake.intents.values()
    assert looked_up.processor_reference == stored["id"]
    search = next(r for r in fake.received if r.path == "/v1/payment_intents/search")
    assert search.body == {
        "query": f"metadata['switchboard_attempt']:'{request.idempotency_key}'",
        "limit": "10",
    }

    retried = await stripe.create_charge(request)

    assert retried.processor_reference == stored["id"]
    assert retried.status is ProcessorStatus.SUCCEEDED
    assert fake.replays == [request.idempotency_key]
    assert len(fake.captured_charges()) == 1
    assert len(fake.intents) == 1


async def test_lookup_falls_back_to_the_list_while_search_lags(lagging_fake: FakeStripe) -> None:
    fake = lagging_fake
    stripe = StripeProcessor(SECRET_KEY, base_url=fake.base_url, timeout_s=TIMEOUT_S)
    try:
        request = charge_request()
        fake.inject(Fault.lost_response())
        await failure(stripe.create_charge(request))

        looked_up = await stripe.lookup_charge(request)

        assert looked_up is not None
        assert looked_up.status is ProcessorStatus.SUCCEEDED
        reads = [(r.path, r.body) for r in fake.received if r.method == "GET"]
        assert reads[0][0] == "/v1/payment_intents/search"
        assert reads[1][0] == "/v1/payment_intents"
        assert set(reads[1][1]) == {"created[gte]", "limit"}
        assert int(reads[1][1]["created[gte]"]) <= int(time.time()) - 3600 + 5
    finally:
        await stripe.aclose()


async def test_lookup_rereads_a_stale_search_hit(lagging_fake: FakeStripe) -> None:
    fake = lagging_fake
    stripe = StripeProcessor(SECRET_KEY, base_url=fake.base_url, timeout_s=TIMEOUT_S)
    try:
        request = charge_request(capture_method=CaptureMethod.MANUAL)
        authorized = await stripe.create_charge(request)
        fake.refresh_search_index()  # the index now holds the requires_capture snapshot
        await stripe.capture(authorized.processor_reference, 1050, "EUR", "cap-stale")

        looked_up = await stripe.lookup_charge(request)

        assert looked_up is not None
        assert looked_up.status is ProcessorStatus.SUCCEEDED
        assert looked_up.amount_captured_minor == 1050
        assert not any(r.path == "/v1/payment_intents" and r.method == "GET" for r in fake.received)
    finally:
        await stripe.aclose()


async def test_lookup_is_none_only_when_search_and_list_both_miss(
    fake: FakeStripe, stripe: StripeProcessor
) -> None:
    await stripe.create_charge(charge_request())  # another attempt's PaymentIntent
    assert await stripe.lookup_charge(charge_request()) is None
    paths = [r.path for r in fake.received if r.method == "GET"]
    assert paths == ["/v1/payment_intents/search", "/v1/payment_intents"]


async def test_lookup_pages_through_the_list_and_gives_up_past_the_bound(lagging_fake: FakeStripe) -> None:
    fake = lagging_fake
    requests = [charge_request() for _ in range(5)]
    setup = StripeProcessor(SECRET_KEY, base_url=fake.base_url, timeout_s=TIMEOUT_S)
    short = StripeProcessor(
        SECRET_KEY, base_url=fake.base_url, timeout_s=TIMEOUT_S, list_page_size=2, lookup_max_pages=2
    )
    enough = StripeProcessor(
        SECRET_KEY, base_url=fake.base_url, timeout_s=TIMEOUT_S, list_page_size=2, lookup_max_pages=3
    )
    try:
        for request in requests:
            await setup.create_charge(request)
        oldest = requests[0]

        error = await failure(short.lookup_charge(oldest))
        assert isinstance(error, RetryableProcessorError)
        assert error.code == "lookup_incomplete"

        found = await enough.lookup_charge(oldest)
        assert found is not None
        assert found.processor_reference == next(iter(fake.intents))
        assert any("starting_after" in r.body for r in fake.received if r.method == "GET")
        assert await enough.lookup_charge(charge_request()) is None
    finally:
        for client in (setup, short, enough):
            await client.aclose()


async def test_lookup_window_is_bounded_by_the_clock(lagging_fake: FakeStripe) -> None:
    """Past the freshness window the list is not consulted for old PaymentIntents: search must know."""
    fake = lagging_fake
    later = StripeProcessor(
        SECRET_KEY, base_url=fake.base_url, timeout_s=TIMEOUT_S, clock=lambda: time.time() + 7200
    )
    try:
        request = charge_request()
        await later.create_charge(request)
        assert await later.lookup_charge(request) is None  # index not refreshed, created > window ago
        fake.refresh_search_index()
        found = await later.lookup_charge(request)
        assert found is not None
        assert found.status is ProcessorStatus.SUCCEEDED
    finally:
        await later.aclose()


# --- refunds -------------------------------------------------------------------------------------


async def test_partial_refunds_then_over_refund_is_refused(fake: FakeStripe, stripe: StripeProcessor) -> None:
    charged = await stripe.create_charge(charge_request(amount_minor=1000))
    reference = charged.processor_reference

    first = await stripe.refund(reference, 300, "EUR", "refund-1")

    sent = posts(fake)[-1]
    assert (sent.path, sent.headers["Idempotency-Key"]) == ("/v1/refunds", "refund-1")
    assert sent.body == {
        "payment_intent": reference,
        "amount": "300",
        "metadata": {"switchboard_refund_key": "refund-1"},
    }
    assert (first.status, first.amount_minor, first.currency) == (RefundStatus.SUCCEEDED, 300, "EUR")
    assert first.processor_reference.startswith("re_")

    too_much = await failure(stripe.refund(reference, 800, "EUR", "refund-2"))
    assert isinstance(too_much, PermanentProcessorError)
    assert too_much.code == "amount_too_large"

    rest = await stripe.refund(reference, 700, "EUR", "refund-3")
    assert rest.amount_minor == 700
    exhausted = await failure(stripe.refund(reference, 1, "EUR", "refund-4"))
    assert isinstance(exhausted, PermanentProcessorError)
    assert exhausted.code == "charge_already_refunded"
    assert sum(refund["amount"] for refund in fake.refunds.values()) == 1000
    assert fake.charges[0]["refunded"] is True


async def test_refund_retry_replays_the_same_refund(fake: FakeStripe, stripe: StripeProcessor) -> None:
    charged = await stripe.create_charge(charge_request(amount_minor=1000))
    fake.inject(Fault.lost_response())
    error = await failure(stripe.refund(charged.processor_reference, 400, "EUR", "refund-lost"))
    assert isinstance(error, AmbiguousProcessorError)

    refund = await stripe.refund(charged.processor_reference, 400, "EUR", "refund-lost")

    assert list(fake.refunds) == [refund.processor_reference]
    assert fake.replays == ["refund-lost"]


async def test_refund_of_an_uncaptured_payment_is_refused(stripe: StripeProcessor) -> None:
    authorized = await stripe.create_charge(charge_request(capture_method=CaptureMethod.MANUAL))
    error = await failure(stripe.refund(authorized.processor_reference, 100, "EUR", "refund-early"))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == "charge_not_refundable"


# --- local checks, lifecycle, secrets --------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.capture("pi_../../v1/refunds", 1, "EUR", "k"), id="reference-path"),
        pytest.param(lambda s: s.refund("ch_123", 1, "EUR", "k"), id="reference-kind"),
        pytest.param(lambda s: s.capture("pi_1", 0, "EUR", "k"), id="zero-capture"),
        pytest.param(lambda s: s.refund("pi_1", -1, "EUR", "k"), id="negative-refund"),
        pytest.param(lambda s: s.cancel("pi_1", ""), id="empty-key"),
        pytest.param(lambda s: s.cancel("pi_1", "k" * 256), id="long-key"),
        pytest.param(lambda s: s.create_charge(charge_request(amount_minor=0)), id="zero-amount"),
        pytest.param(lambda s: s.create_charge(charge_request(currency="EURO")), id="bad-currency"),
        pytest.param(lambda s: s.create_charge(charge_request(payment_method="")), id="no-payment-method"),
        pytest.param(
            lambda s: s.create_charge(replace(charge_request(), metadata={"a[b]": "x"})),
            id="bracket-metadata",
        ),
        pytest.param(
            lambda s: s.create_charge(replace(charge_request(), metadata={"k": "v" * 501})),
            id="long-metadata",
        ),
        pytest.param(
            lambda s: s.create_charge(replace(charge_request(), metadata={f"k{i}": "v" for i in range(48)})),
            id="too-many-metadata-keys",
        ),
    ],
)
async def test_invalid_calls_are_permanent_without_a_request(
    fake: FakeStripe, stripe: StripeProcessor, call: Any
) -> None:
    error = await failure(call(stripe))
    assert isinstance(error, PermanentProcessorError)
    assert "not sent" in str(error)
    assert fake.requests_seen == 0


async def test_calls_after_close_are_retryable(fake: FakeStripe, stripe: StripeProcessor) -> None:
    await stripe.aclose()
    await stripe.aclose()
    error = await failure(stripe.create_charge(charge_request()))
    assert isinstance(error, RetryableProcessorError)
    assert fake.requests_seen == 0


async def test_repr_hides_the_key(stripe: StripeProcessor) -> None:
    for text in (repr(stripe), str(stripe), f"{stripe}"):
        assert SECRET_KEY not in text
        assert "<redacted>" in text
    assert "mode='test'" in repr(stripe)
    assert stripe.name == "stripe"


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="secret_key"):
        StripeProcessor("")
    with pytest.raises(ValueError, match="timeouts"):
        StripeProcessor(SECRET_KEY, timeout_s=0)
    with pytest.raises(ValueError, match="list_page_size"):
        StripeProcessor(SECRET_KEY, list_page_size=101)


async def test_stripe_text_echoing_the_key_is_scrubbed(fake: FakeStripe, stripe: StripeProcessor) -> None:
    fake.inject(
        FakeStripe.error(401, "invalid_request_error", message=f"Invalid API Key provided: {SECRET_KEY}")
    )
    error = await failure(stripe.create_charge(charge_request()))
    assert "<redacted>" in str(error)


# --- the fake's own checks --------------------------------------------------------------------------


def form(**overrides: str) -> dict[str, str]:
    base = {
        "amount": "1000",
        "currency": "usd",
        "payment_method": "pm_card_visa",
        "confirm": "true",
        "automatic_payment_methods[enabled]": "true",
        "automatic_payment_methods[allow_redirects]": "never",
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value != "<drop>"}


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        pytest.param(form(amount="<drop>"), 400, "parameter_missing", id="missing-amount"),
        pytest.param(form(amount="ten"), 400, "parameter_invalid_integer", id="amount-not-integer"),
        pytest.param(form(currency="USD"), 400, "parameter_invalid_string", id="upper-case-currency"),
        pytest.param(
            form(currency="isk", amount="150050"), 400, "invalid_charge_amount_no_decimal_compatible"
        ),
        pytest.param(form(surprise="1"), 400, "parameter_unknown", id="unknown-param"),
        pytest.param(form(confirm="yes"), 400, None, id="bad-boolean"),
        pytest.param(form(payment_method="<drop>"), 400, "parameter_missing", id="confirm-without-pm"),
        pytest.param(
            form(**{"automatic_payment_methods[allow_redirects]": "<drop>"}), 400, None, id="needs-return-url"
        ),
        pytest.param({"metadata[" + "k" * 41 + "]": "v", **form()}, 400, None, id="long-metadata-key"),
    ],
)
async def test_fake_refuses_a_bad_create_form(
    fake: FakeStripe, data: dict[str, str], status: int, code: str | None
) -> None:
    async with httpx.AsyncClient(
        base_url=fake.base_url, headers={"Authorization": f"Bearer {SECRET_KEY}"}
    ) as client:
        response = await client.post("/v1/payment_intents", data=data, headers={"Idempotency-Key": "k1"})
        retried = await client.post("/v1/payment_intents", data=form(), headers={"Idempotency-Key": "k1"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error.get("code") == code
    # the refusal was not saved under k1: the retry with the same key executed
    assert len(fake.intents) == 1
    assert retried.status_code == 200
    assert "Idempotent-Replayed" not in retried.headers


async def test_fake_checks_auth_content_type_and_version(fake: FakeStripe) -> None:
    async with httpx.AsyncClient(base_url=fake.base_url) as client:
        anonymous = await client.post("/v1/payment_intents", data=form())
        wrong = await client.post(
            "/v1/payment_intents", data=form(), headers={"Authorization": "Bearer sk_test_wrongwrongwrong"}
        )
        basic = await client.get("/v1/payment_intents", auth=(SECRET_KEY, ""))
        as_json = await client.post(
            "/v1/payment_intents", json=form(), headers={"Authorization": f"Bearer {SECRET_KEY}"}
        )
        bad_version = await client.get(
            "/v1/payment_intents",
            headers={"Authorization": f"Bearer {SECRET_KEY}", "Stripe-Version": "yesterday"},
        )
    assert anonymous.status_code == 401
    assert wrong.status_code == 401
    assert "sk_test_wrongwrongwrong" not in wrong.text
    assert basic.status_code == 200
    assert basic.json()["object"] == "list"
    assert as_json.status_code == 400
    assert bad_version.status_code == 400
    assert fake.intents == {}


async def test_fake_idempotency_replays_and_refuses_other_parameters(fake: FakeStripe) -> None:
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Idempotency-Key": "same-key"}
    async with httpx.AsyncClient(base_url=fake.base_url, headers=headers) as client:
        first = await client.post("/v1/payment_intents", data=form())
        replay = await client.post("/v1/payment_intents", data=form())
        other_params = await client.post("/v1/payment_intents", data=form(amount="2000"))
        other_endpoint = await client.post("/v1/refunds", data={"payment_intent": first.json()["id"]})
    assert first.status_code == 200
    assert "Idempotent-Replayed" not in first.headers
    assert (replay.status_code, replay.json()) == (200, first.json())
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Original-Request"] == first.headers["Request-Id"]
    for refused in (other_params, other_endpoint):
        assert refused.status_code == 400
        assert refused.json()["error"]["type"] == "idempotency_error"
    assert len(fake.intents) == 1
    assert len(fake.captured_charges()) == 1


async def test_fake_replays_a_decline(fake: FakeStripe) -> None:
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "Idempotency-Key": "declined-key"}
    data = form(payment_method="pm_card_chargeDeclinedInsufficientFunds")
    async with httpx.AsyncClient(base_url=fake.base_url, headers=headers) as client:
        first = await client.post("/v1/payment_intents", data=data)
        replay = await client.post("/v1/payment_intents", data=data)
    assert first.status_code == 402
    error = first.json()["error"]
    assert (error["type"], error["code"], error["decline_code"]) == (
        "card_error",
        "card_declined",
        "insufficient_funds",
    )
    assert error["payment_intent"]["status"] == "requires_payment_method"
    assert (replay.status_code, replay.json()) == (402, first.json())
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert len(fake.intents) == 1


async def test_fake_search_and_list_shapes(fake: FakeStripe, stripe: StripeProcessor) -> None:
    await stripe.create_charge(charge_request())
    async with httpx.AsyncClient(
        base_url=fake.base_url, headers={"Authorization": f"Bearer {SECRET_KEY}"}
    ) as client:
        by_status = await client.get("/v1/payment_intents/search", params={"query": "status:'succeeded'"})
        unsupported = await client.get("/v1/payment_intents/search", params={"query": "amount>5"})
        listed = await client.get("/v1/payment_intents", params={"limit": "1"})
    assert by_status.json()["object"] == "search_result"
    assert len(by_status.json()["data"]) == 1
    assert unsupported.status_code == 400
    assert listed.json()["object"] == "list"
    assert listed.json()["has_more"] is False


# --- webhooks --------------------------------------------------------------------------------------


async def test_fake_delivers_signed_webhooks_that_verify(fake: FakeStripe, stripe: StripeProcessor) -> None:
    received: list[tuple[bytes, str | None]] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers.get(SIGNATURE_HEADER)))
        arrived.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/webhooks/stripe", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", free_port())
    await site.start()
    try:
        payment = await stripe.create_charge(charge_request())
        [event] = [e for e in fake.events if e["type"] == "payment_intent.succeeded"]
        url = f"http://{site.name.removeprefix('http://')}/webhooks/stripe"
        response = await fake.send_event(url, event, WEBHOOK_SECRET)
        await asyncio.wait_for(arrived.wait(), 5)
    finally:
        await runner.cleanup()

    assert response.status_code == 200
    [(body, header)] = received
    verified = construct_event(body, header, WEBHOOK_SECRET)
    assert verified["type"] == "payment_intent.succeeded"
    assert verified["data"]["object"]["id"] == payment.processor_reference
    assert json.loads(body) == event


# --- confirm (POST /v1/payment_intents/{id}/confirm) ---------------------------------------------------


async def unconfirmed_intent(fake: FakeStripe, **form: str) -> str:
    """A PaymentIntent created without ``confirm`` (over HTTP, as another integration would)."""
    body = {
        "amount": "2500",
        "currency": "eur",
        "automatic_payment_methods[enabled]": "true",
        "automatic_payment_methods[allow_redirects]": "never",
        **form,
    }
    async with httpx.AsyncClient(base_url=fake.base_url) as client:
        response = await client.post(
            "/v1/payment_intents",
            data=body,
            headers={"Authorization": f"Bearer {SECRET_KEY}", "Idempotency-Key": str(uuid.uuid4())},
        )
    assert response.status_code == 200, response.text
    intent = response.json()
    return str(intent["id"])


async def test_confirm_wire_format_and_replay(fake: FakeStripe, stripe: StripeProcessor) -> None:
    reference = await unconfirmed_intent(fake, payment_method="pm_card_visa")
    assert fake.intents[reference]["status"] == "requires_confirmation"

    payment = await stripe.confirm(reference, "confirm-key-1")

    sent = posts(fake)[-1]
    assert (sent.method, sent.path) == ("POST", f"/v1/payment_intents/{reference}/confirm")
    assert sent.headers["Authorization"] == f"Bearer {SECRET_KEY}"
    assert sent.headers["Stripe-Version"] == API_VERSION
    assert sent.headers["Idempotency-Key"] == "confirm-key-1"
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert sent.body == {}  # the PaymentIntent's own payment method; nothing else is sent
    assert (payment.processor_reference, payment.status) == (reference, ProcessorStatus.SUCCEEDED)
    assert (payment.amount_minor, payment.amount_captured_minor, payment.currency) == (2500, 2500, "EUR")
    # The same key again is answered from Stripe's idempotency store: still one charge.
    again = await stripe.confirm(reference, "confirm-key-1")
    assert again.status is ProcessorStatus.SUCCEEDED
    assert fake.replays == ["confirm-key-1"]
    assert len(fake.captured_charges()) == 1


async def test_confirm_with_a_new_payment_method_after_a_decline(
    fake: FakeStripe, stripe: StripeProcessor
) -> None:
    reference = await unconfirmed_intent(fake, capture_method="manual")
    assert fake.intents[reference]["status"] == "requires_payment_method"
    declined = await failure(stripe.confirm(reference, "k-1", payment_method="pm_card_chargeDeclined"))
    assert isinstance(declined, Declined)
    assert declined.code == "generic_decline"
    assert posts(fake)[-1].body == {"payment_method": "pm_card_chargeDeclined"}
    assert fake.intents[reference]["status"] == "requires_payment_method"

    authorized = await stripe.confirm(reference, "k-2", payment_method="pm_card_mastercard")

    assert authorized.status is ProcessorStatus.REQUIRES_CAPTURE
    assert posts(fake)[-1].body == {"payment_method": "pm_card_mastercard"}
    [charge] = fake.charges
    assert (charge["payment_method"], charge["captured"]) == ("pm_card_mastercard", False)


async def test_confirm_in_a_status_that_does_not_allow_it_is_permanent(
    fake: FakeStripe, stripe: StripeProcessor
) -> None:
    charged = await stripe.create_charge(charge_request())
    error = await failure(stripe.confirm(charged.processor_reference, "k-late"))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == "payment_intent_unexpected_state"
    assert len(fake.charges) == 1
    # Not sent at all: a reference that is not a PaymentIntent id, an empty payment method.
    for call in (
        stripe.confirm("ch_123", "k"),
        stripe.confirm(charged.processor_reference, "k", payment_method=""),
    ):
        refused = await failure(call)
        assert isinstance(refused, PermanentProcessorError)
    assert len(posts(fake)) == 2


async def test_confirm_needing_authentication_is_abandoned(fake: FakeStripe, stripe: StripeProcessor) -> None:
    reference = await unconfirmed_intent(fake, payment_method="pm_card_authenticationRequired")
    error = await failure(stripe.confirm(reference, "k-3ds"))
    assert isinstance(error, Declined)
    assert error.code == "authentication_required"
    assert (fake.intents[reference]["status"], fake.intents[reference]["cancellation_reason"]) == (
        "canceled",
        "abandoned",
    )
    assert posts(fake)[-1].headers["Idempotency-Key"] == "k-3ds:abandon"
    assert fake.charges == []


async def test_the_fake_refuses_confirm_parameters_it_does_not_implement(fake: FakeStripe) -> None:
    reference = await unconfirmed_intent(fake, payment_method="pm_card_visa")
    async with httpx.AsyncClient(base_url=fake.base_url) as client:
        response = await client.post(
            f"/v1/payment_intents/{reference}/confirm",
            data={"off_session": "true"},
            headers={"Authorization": f"Bearer {SECRET_KEY}", "Idempotency-Key": "k-off"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "parameter_unknown"
    assert fake.intents[reference]["status"] == "requires_confirmation"
