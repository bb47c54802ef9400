"""The Adyen Checkout connector against the fake Adyen over real HTTP on loopback, and webhook HMACs.

Covers the wire format the fake received (paths, X-API-Key, Idempotency-Key,
JSON bodies), every resultCode mapping, one test per row of the error table
(401/403/422/704/429/5xx, timeouts, resets, malformed answers, refused
connections), the lost-response path (ambiguous, then lookup finds the one
charge by replaying the Idempotency-Key), idempotency in the fake (replay,
different body, concurrent duplicate), captures/cancels/refunds with their
totals, standard-webhook HMAC signatures (valid, tampered, rotated key,
missing), and that the API key and HMAC keys never show in reprs, error
text, exception chains or client logs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uuid6
from aiohttp import web

from payments.adyen import DEFAULT_REPLAY_WINDOW_S, AdyenProcessor
from payments.adyen_signature import (
    AdyenWebhookVerifier,
    SignatureError,
    compute_signature,
    signing_string,
    verify_item,
)
from payments.processor import (
    AmbiguousProcessorError,
    CaptureMethod,
    ChargeRequest,
    Declined,
    PaymentProcessor,
    PermanentProcessorError,
    ProcessorError,
    ProcessorStatus,
    RefundStatus,
    RetryableProcessorError,
)
from switchboard.embedded import free_port
from switchboard.fakes.adyen import FakeAdyen
from switchboard.fakes.http import Fault

API_KEY = "AQEyhmfxK4_test_api_key_5f9c7e1d2b3a4c5d6e7f8091a2b3c4d5"
MERCHANT = "SwitchboardTestECOM"
HMAC_KEY = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
NEW_HMAC_KEY = "74F490DD33F7327BAECC88B2947C011FC02D014A473AAA33A8EC93E4DC069174"
SHOPPER = "customer-42"
TIMEOUT_S = 1.0
SECRETS = (API_KEY, HMAC_KEY, NEW_HMAC_KEY)


def charge(
    method: str = "stored_succeed",
    *,
    capture: CaptureMethod = CaptureMethod.AUTOMATIC,
    amount: int = 1050,
    currency: str = "EUR",
    attempt: int = 1,
    payment_id: uuid.UUID | None = None,
    metadata: dict[str, str] | None = None,
    customer: str = SHOPPER,
) -> ChargeRequest:
    return ChargeRequest(
        payment_id=payment_id or uuid6.uuid7(),
        attempt_no=attempt,
        amount_minor=amount,
        currency=currency,
        payment_method=method,
        capture_method=capture,
        customer_reference=customer,
        description="order 1001",
        metadata=metadata or {},
    )


def assert_secret_free(exc: BaseException) -> None:
    """No secret is in any text an error can end up in, and nothing is chained."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
    assert exc.__cause__ is None
    assert exc.__context__ is None


@pytest.fixture(autouse=True)
def no_secret_in_client_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        if record.name.split(".")[0] in ("httpx", "httpcore", "payments", "aiohttp"):
            for secret in SECRETS:
                assert secret not in record.getMessage()


@pytest.fixture
async def fake() -> AsyncIterator[FakeAdyen]:
    server = FakeAdyen(API_KEY, MERCHANT, hmac_key=HMAC_KEY)
    await server.start()
    yield server
    server.release()
    await server.stop()


@pytest.fixture
async def processor(fake: FakeAdyen) -> AsyncIterator[AdyenProcessor]:
    client = AdyenProcessor(API_KEY, MERCHANT, base_url=fake.checkout_url, timeout_s=TIMEOUT_S)
    yield client
    await client.aclose()


async def failure(call: Any) -> ProcessorError:
    """Await ``call`` (a coroutine) expecting a ProcessorError; check it is secret-free."""
    with pytest.raises(ProcessorError) as info:
        await call
    assert_secret_free(info.value)
    return info.value


# --- wire format and result codes -------------------------------------------------------------


async def test_wire_format_of_an_automatic_capture_charge(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    request = charge(metadata={"tenant": "acme", "order": "1001"})

    payment = await processor.create_charge(request)

    [created] = fake.charges
    assert payment.processor_reference == created.psp_reference
    assert payment.status is ProcessorStatus.SUCCEEDED
    assert (payment.amount_minor, payment.currency, payment.amount_captured_minor) == (1050, "EUR", 1050)
    [received] = fake.received
    assert (received.method, received.path) == ("POST", "/v71/payments")
    assert received.headers["X-API-Key"] == API_KEY
    assert received.headers["Idempotency-Key"] == f"{request.payment_id}_1"
    assert received.headers["Content-Type"] == "application/json"
    assert received.body == {
        "merchantAccount": MERCHANT,
        "amount": {"value": 1050, "currency": "EUR"},
        "reference": f"{request.payment_id}_1",
        "merchantOrderReference": str(request.payment_id),
        "paymentMethod": {"type": "scheme", "storedPaymentMethodId": "stored_succeed"},
        "shopperReference": SHOPPER,
        "shopperInteraction": "ContAuth",
        "recurringProcessingModel": "UnscheduledCardOnFile",
        "returnUrl": "https://switchboard.invalid/adyen/return",
        "captureDelayHours": 0,
        "metadata": {"tenant": "acme", "order": "1001"},
    }
    assert created.captured == 1050
    assert created.metadata == {"tenant": "acme", "order": "1001"}


async def test_manual_capture_is_requested_per_payment(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    payment = await processor.create_charge(charge(capture=CaptureMethod.MANUAL))

    assert payment.status is ProcessorStatus.REQUIRES_CAPTURE
    assert payment.amount_captured_minor == 0
    body = fake.received[0].body
    assert body["additionalData"] == {"manualCapture": "true"}
    assert "captureDelayHours" not in body
    assert "metadata" not in body
    assert fake.charges[0].manual_capture
    assert fake.charges[0].captured == 0


@pytest.mark.parametrize(
    ("method", "status"),
    [
        pytest.param("stored_pending", ProcessorStatus.PROCESSING, id="Pending"),
        pytest.param("stored_received", ProcessorStatus.PROCESSING, id="Received"),
        pytest.param("stored_cancelled", ProcessorStatus.CANCELED, id="Cancelled"),
    ],
)
async def test_non_final_and_cancelled_result_codes(
    fake: FakeAdyen, processor: AdyenProcessor, method: str, status: ProcessorStatus
) -> None:
    payment = await processor.create_charge(charge(method))
    assert payment.status is status
    assert payment.processor_reference == fake.charges[0].psp_reference
    assert payment.amount_captured_minor == 0


@pytest.mark.parametrize(
    ("method", "code", "reason"),
    [
        pytest.param("stored_refused", "2", "Refused", id="refused"),
        pytest.param("stored_insufficient_funds", "12", "Not enough balance", id="not-enough-balance"),
        pytest.param("stored_expired_card", "6", "Expired Card", id="expired-card"),
    ],
)
async def test_refused_is_declined_with_the_refusal_reason(
    fake: FakeAdyen, processor: AdyenProcessor, method: str, code: str, reason: str
) -> None:
    error = await failure(processor.create_charge(charge(method)))

    assert isinstance(error, Declined)
    assert error.code == code
    assert reason in str(error)
    assert error.definitely_not_charged
    assert not error.retryable
    assert len(fake.charges) == 1


async def test_error_result_code_is_permanent(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    error = await failure(processor.create_charge(charge("stored_error")))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == "4"
    assert "Acquirer Error" in str(error)


async def test_a_shopper_action_is_permanent_for_a_merchant_initiated_charge(
    processor: AdyenProcessor,
) -> None:
    error = await failure(processor.create_charge(charge("stored_redirect")))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == "RedirectShopper"


async def test_an_unknown_result_code_is_ambiguous(processor: AdyenProcessor) -> None:
    error = await failure(processor.create_charge(charge("stored_partially_authorised")))
    assert isinstance(error, AmbiguousProcessorError)
    assert error.code == "unknown_result_code"
    assert not error.definitely_not_charged


async def test_processor_satisfies_the_protocol_and_hides_the_key(processor: AdyenProcessor) -> None:
    as_protocol: PaymentProcessor = processor
    assert as_protocol.name == "adyen"
    assert API_KEY not in repr(processor)
    assert "<redacted>" in repr(processor)
    assert MERCHANT in repr(processor)


def test_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="api_key"):
        AdyenProcessor("", MERCHANT)
    with pytest.raises(ValueError, match="merchant_account"):
        AdyenProcessor(API_KEY, "")
    with pytest.raises(ValueError, match="recurring_processing_model") as info:
        AdyenProcessor(API_KEY, MERCHANT, recurring_processing_model="Weekly")
    assert API_KEY not in str(info.value)


# --- error classification ---------------------------------------------------------------------


async def test_wrong_api_key_is_permanent(fake: FakeAdyen) -> None:
    wrong = "AQE_wrong_key_0000000000000000"
    client = AdyenProcessor(wrong, MERCHANT, base_url=fake.checkout_url, timeout_s=TIMEOUT_S)
    try:
        error = await failure(client.create_charge(charge()))
    finally:
        await client.aclose()
    assert isinstance(error, PermanentProcessorError)
    assert "HTTP 401" in str(error)
    assert wrong not in str(error)
    assert fake.charges == []


async def test_wrong_merchant_account_is_permanent(fake: FakeAdyen) -> None:
    client = AdyenProcessor(API_KEY, "SomeoneElseECOM", base_url=fake.checkout_url, timeout_s=TIMEOUT_S)
    try:
        error = await failure(client.create_charge(charge()))
    finally:
        await client.aclose()
    assert isinstance(error, PermanentProcessorError)
    assert error.code == "901"
    assert "HTTP 403" in str(error)


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        pytest.param(charge("no_such_token"), "800", id="unknown-stored-method"),
        pytest.param(charge(metadata={f"k{i}": "v" for i in range(21)}), "177", id="metadata-pairs"),
        pytest.param(charge(metadata={"k" * 21: "v"}), "178", id="metadata-key"),
        pytest.param(charge(metadata={"k": "v" * 81}), "179", id="metadata-value"),
    ],
)
async def test_validation_errors_are_permanent(
    fake: FakeAdyen, processor: AdyenProcessor, request_: ChargeRequest, code: str
) -> None:
    error = await failure(processor.create_charge(request_))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == code
    assert "HTTP 422" in str(error)
    assert fake.charges == []


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        pytest.param(charge(amount=0), "invalid_amount", id="zero-amount"),
        pytest.param(charge(currency="eur"), "invalid_currency", id="lower-case-currency"),
        pytest.param(charge(""), "invalid_payment_method", id="no-token"),
        pytest.param(charge(customer="ab"), "invalid_shopper_reference", id="short-shopper-reference"),
    ],
)
async def test_invalid_charges_are_refused_without_a_request(
    fake: FakeAdyen, processor: AdyenProcessor, request_: ChargeRequest, code: str
) -> None:
    error = await failure(processor.create_charge(request_))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == code
    assert fake.requests_seen == 0


@pytest.mark.parametrize(("status", "code"), [(400, "702"), (404, "000"), (409, "000")])
async def test_other_4xx_are_permanent(
    fake: FakeAdyen, processor: AdyenProcessor, status: int, code: str
) -> None:
    fake.inject(FakeAdyen.error(status, code, "refused"))
    error = await failure(processor.create_charge(charge()))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == code
    assert f"HTTP {status}" in str(error)


@pytest.mark.parametrize("status", [409, 422])
async def test_idempotency_in_progress_704_is_retryable(
    fake: FakeAdyen, processor: AdyenProcessor, status: int
) -> None:
    fake.inject(FakeAdyen.error(status, "704", "request already processed or in progress"))
    error = await failure(processor.create_charge(charge()))
    assert isinstance(error, RetryableProcessorError)
    assert error.code == "704"
    assert error.definitely_not_charged


async def test_429_is_retryable_with_retry_after(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    fake.inject(Fault.rate_limited(retry_after_s=3))
    error = await failure(processor.create_charge(charge()))
    assert isinstance(error, RetryableProcessorError)
    assert error.retry_after_s == 3.0
    assert fake.charges == []


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_is_ambiguous(fake: FakeAdyen, processor: AdyenProcessor, status: int) -> None:
    fake.inject(FakeAdyen.error(status, "905", "Payment details are not supported", error_type="internal"))
    error = await failure(processor.create_charge(charge()))
    assert isinstance(error, AmbiguousProcessorError)
    assert f"HTTP {status}" in str(error)
    assert not error.definitely_not_charged


async def test_adyen_text_echoing_the_key_is_scrubbed(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    fake.inject(FakeAdyen.error(401, "000", f"bad key {API_KEY}", error_type="security"))
    error = await failure(processor.create_charge(charge()))
    assert "<redacted>" in str(error)


async def test_slow_answer_is_ambiguous_and_lookup_finds_the_one_charge(
    fake: FakeAdyen, processor: AdyenProcessor
) -> None:
    request = charge()
    fake.inject(Fault.slow(delay_s=TIMEOUT_S * 3))

    error = await failure(processor.create_charge(request))

    assert isinstance(error, AmbiguousProcessorError)
    assert "ReadTimeout" in str(error)
    # Like Adyen, the fake still processes the request after the client gave up.
    await fake.wait_until(lambda: len(fake.charges) == 1)
    found = await processor.lookup_charge(request)
    assert found is not None
    assert found.processor_reference == fake.charges[0].psp_reference
    assert found.status is ProcessorStatus.SUCCEEDED
    assert len(fake.charges) == 1
    assert fake.replays == 1


async def test_connection_reset_is_ambiguous(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    fake.inject(Fault.reset())
    error = await failure(processor.create_charge(charge()))
    assert isinstance(error, AmbiguousProcessorError)
    assert fake.charges == []


async def test_malformed_answer_is_ambiguous(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    fake.inject(Fault.malformed())
    error = await failure(processor.create_charge(charge()))
    assert isinstance(error, AmbiguousProcessorError)
    assert error.code == "malformed_response"


async def test_200_without_psp_reference_is_ambiguous(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    fake.inject(Fault.http_status(200, body='{"resultCode": "Authorised"}'))
    error = await failure(processor.create_charge(charge()))
    assert isinstance(error, AmbiguousProcessorError)


async def test_connection_refused_is_retryable() -> None:
    client = AdyenProcessor(
        API_KEY, MERCHANT, base_url=f"http://127.0.0.1:{free_port()}/v71", timeout_s=TIMEOUT_S
    )
    try:
        error = await failure(client.create_charge(charge()))
    finally:
        await client.aclose()
    assert isinstance(error, RetryableProcessorError)
    assert "not sent" in str(error)
    assert error.definitely_not_charged


async def test_calls_after_close_are_retryable_without_a_request(
    fake: FakeAdyen, processor: AdyenProcessor
) -> None:
    await processor.aclose()
    await processor.aclose()
    error = await failure(processor.create_charge(charge()))
    assert isinstance(error, RetryableProcessorError)
    assert fake.requests_seen == 0


# --- idempotency and lookup -------------------------------------------------------------------


async def test_lost_response_is_ambiguous_and_lookup_finds_exactly_one_charge(
    fake: FakeAdyen, processor: AdyenProcessor
) -> None:
    request = charge(capture=CaptureMethod.MANUAL)
    fake.inject(Fault.lost_response())

    error = await failure(processor.create_charge(request))

    assert isinstance(error, AmbiguousProcessorError)
    assert len(fake.charges) == 1
    found = await processor.lookup_charge(request)
    assert found is not None
    assert found.processor_reference == fake.charges[0].psp_reference
    assert found.status is ProcessorStatus.REQUIRES_CAPTURE
    assert (found.amount_minor, found.currency) == (1050, "EUR")
    assert len(fake.charges) == 1
    assert fake.replays == 1
    # The replay is the same request: same key, same body.
    assert len(fake.received) == 1
    again = await processor.create_charge(request)
    assert again == found
    assert len(fake.charges) == 1


async def test_lookup_of_a_refused_attempt_returns_failed(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    request = charge("stored_insufficient_funds")
    fake.inject(Fault.lost_response())
    await failure(processor.create_charge(request))

    found = await processor.lookup_charge(request)

    assert found is not None
    assert found.status is ProcessorStatus.FAILED
    assert found.decline_code == "12"
    assert len(fake.charges) == 1


async def test_lookup_of_a_request_adyen_never_got_performs_it_once(
    fake: FakeAdyen, processor: AdyenProcessor
) -> None:
    request = charge()
    fake.inject(Fault.reset())
    await failure(processor.create_charge(request))
    assert fake.charges == []

    found = await processor.lookup_charge(request)
    assert found is not None
    assert found.status is ProcessorStatus.SUCCEEDED
    assert len(fake.charges) == 1
    assert await processor.lookup_charge(request) == found
    assert len(fake.charges) == 1


async def test_lookup_past_the_replay_window_is_refused_without_a_request(fake: FakeAdyen) -> None:
    request = charge()
    sent_at = (request.payment_id.int >> 80) / 1000.0
    client = AdyenProcessor(
        API_KEY,
        MERCHANT,
        base_url=fake.checkout_url,
        timeout_s=TIMEOUT_S,
        clock=lambda: sent_at + DEFAULT_REPLAY_WINDOW_S + 60,
    )
    try:
        error = await failure(client.lookup_charge(request))
    finally:
        await client.aclose()
    assert isinstance(error, AmbiguousProcessorError)
    assert error.code == "replay_window_exceeded"
    assert fake.requests_seen == 0


async def test_lookup_refused_by_adyen_cannot_tell(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    fake.inject(FakeAdyen.error(403, "010", "Not allowed", error_type="security"))
    error = await failure(processor.lookup_charge(charge()))
    assert isinstance(error, PermanentProcessorError)
    assert "unknown" in str(error)


async def test_lookup_while_the_original_is_in_progress_is_retryable(fake: FakeAdyen) -> None:
    """A concurrent duplicate gets Adyen's 704; after the first finishes, the key replays its answer."""
    request = charge()
    patient = AdyenProcessor(API_KEY, MERCHANT, base_url=fake.checkout_url, timeout_s=5.0)
    try:
        fake.hold()
        first = asyncio.create_task(patient.create_charge(request))
        async with asyncio.timeout(5):
            await fake.parked.wait()

        error = await failure(patient.lookup_charge(request))
        assert isinstance(error, RetryableProcessorError)
        assert error.code == "704"
        assert "HTTP 409" in str(error)
        duplicate = await failure(patient.create_charge(request))
        assert isinstance(duplicate, RetryableProcessorError)

        fake.release()
        payment = await first
        assert payment.status is ProcessorStatus.SUCCEEDED
        assert await patient.lookup_charge(request) == payment
    finally:
        await patient.aclose()
    assert len(fake.charges) == 1


async def test_same_key_with_another_body_is_refused(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    request = charge()
    await processor.create_charge(request)
    changed = charge(amount=2000, payment_id=request.payment_id)

    error = await failure(processor.create_charge(changed))

    assert isinstance(error, PermanentProcessorError)
    assert "different request" in str(error)
    assert len(fake.charges) == 1
    assert fake.charges[0].amount == 1050


async def test_a_new_attempt_is_a_new_charge(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    first = charge("stored_refused")
    await failure(processor.create_charge(first))
    second = await processor.create_charge(charge(payment_id=first.payment_id, attempt=2))
    assert second.status is ProcessorStatus.SUCCEEDED
    assert [c.merchant_reference for c in fake.charges] == [f"{first.payment_id}_1", f"{first.payment_id}_2"]


# --- captures, cancels, refunds ---------------------------------------------------------------


async def test_partial_captures_up_to_the_authorised_amount(
    fake: FakeAdyen, processor: AdyenProcessor
) -> None:
    payment = await processor.create_charge(charge(capture=CaptureMethod.MANUAL))
    psp = payment.processor_reference

    captured = await processor.capture(psp, 600, "EUR", "cap-1")

    assert captured.status is ProcessorStatus.PROCESSING
    assert (captured.processor_reference, captured.amount_minor, captured.currency) == (psp, 600, "EUR")
    received = fake.received[-1]
    assert (received.method, received.path) == ("POST", f"/v71/payments/{psp}/captures")
    assert received.headers["Idempotency-Key"] == "cap-1"
    assert received.headers["X-API-Key"] == API_KEY
    assert received.body == {
        "merchantAccount": MERCHANT,
        "amount": {"value": 600, "currency": "EUR"},
        "reference": "cap-1",
    }
    assert fake.modifications[-1]["pspReference"] in captured.message

    # A retried capture with the same key replays the first answer; nothing is captured twice.
    assert await processor.capture(psp, 600, "EUR", "cap-1") == captured
    await processor.capture(psp, 450, "EUR", "cap-2")
    assert fake.payments[psp].captured == 1050

    over = await failure(processor.capture(psp, 1, "EUR", "cap-3"))
    assert isinstance(over, PermanentProcessorError)
    assert over.code == "137"
    assert fake.payments[psp].captured == 1050
    assert [m["kind"] for m in fake.modifications] == ["captures", "captures"]


async def test_capture_of_an_unknown_payment_and_in_another_currency(
    fake: FakeAdyen, processor: AdyenProcessor
) -> None:
    unknown = await failure(processor.capture("ABCDEF0123456789", 100, "EUR", "cap-x"))
    assert isinstance(unknown, PermanentProcessorError)
    assert unknown.code == "167"
    payment = await processor.create_charge(charge(capture=CaptureMethod.MANUAL))
    other = await failure(processor.capture(payment.processor_reference, 100, "USD", "cap-y"))
    assert isinstance(other, PermanentProcessorError)
    assert fake.modifications == []


async def test_cancel_releases_an_uncaptured_authorisation(
    fake: FakeAdyen, processor: AdyenProcessor
) -> None:
    payment = await processor.create_charge(charge(capture=CaptureMethod.MANUAL))
    psp = payment.processor_reference

    cancelled = await processor.cancel(psp, "cancel-1")

    assert cancelled.status is ProcessorStatus.PROCESSING
    assert cancelled.processor_reference == psp
    received = fake.received[-1]
    assert received.path == f"/v71/payments/{psp}/cancels"
    assert received.body == {"merchantAccount": MERCHANT, "reference": "cancel-1"}
    assert fake.payments[psp].cancelled
    again = await failure(processor.cancel(psp, "cancel-2"))
    assert isinstance(again, PermanentProcessorError)
    no_capture = await failure(processor.capture(psp, 100, "EUR", "cap-after-cancel"))
    assert isinstance(no_capture, PermanentProcessorError)


async def test_cancel_after_capture_is_refused(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    payment = await processor.create_charge(charge())
    error = await failure(processor.cancel(payment.processor_reference, "cancel-1"))
    assert isinstance(error, PermanentProcessorError)
    assert not fake.payments[payment.processor_reference].cancelled


async def test_partial_refunds_and_over_refund_rejected(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    payment = await processor.create_charge(charge())
    psp = payment.processor_reference

    first = await processor.refund(psp, 300, "EUR", "refund-1")

    assert first.status is RefundStatus.PENDING
    assert (first.amount_minor, first.currency) == (300, "EUR")
    assert first.processor_reference == fake.modifications[-1]["pspReference"]
    assert first.processor_reference != psp
    received = fake.received[-1]
    assert received.path == f"/v71/payments/{psp}/refunds"
    assert received.headers["Idempotency-Key"] == "refund-1"
    assert received.body == {
        "merchantAccount": MERCHANT,
        "amount": {"value": 300, "currency": "EUR"},
        "reference": "refund-1",
    }
    assert await processor.refund(psp, 300, "EUR", "refund-1") == first  # replayed, not refunded twice
    second = await processor.refund(psp, 700, "EUR", "refund-2")
    assert second.processor_reference != first.processor_reference
    assert fake.payments[psp].refunded == 1000

    over = await failure(processor.refund(psp, 51, "EUR", "refund-3"))
    assert isinstance(over, PermanentProcessorError)
    assert over.code == "137"
    assert fake.payments[psp].refunded == 1000
    last = await processor.refund(psp, 50, "EUR", "refund-4")
    assert last.status is RefundStatus.PENDING
    assert fake.payments[psp].refunded == 1050


async def test_refund_before_capture_is_rejected(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    payment = await processor.create_charge(charge(capture=CaptureMethod.MANUAL))
    error = await failure(processor.refund(payment.processor_reference, 100, "EUR", "refund-1"))
    assert isinstance(error, PermanentProcessorError)
    assert fake.payments[payment.processor_reference].refunded == 0


@pytest.mark.parametrize(
    ("call", "code"),
    [
        pytest.param(lambda p: p.capture("../payments", 100, "EUR", "k"), "invalid_reference", id="path"),
        pytest.param(lambda p: p.refund("ABCDEF0123456789", 0, "EUR", "k"), "invalid_amount", id="zero"),
        pytest.param(lambda p: p.refund("ABCDEF0123456789", 10, "euro", "k"), "invalid_currency", id="ccy"),
        pytest.param(lambda p: p.cancel("ABCDEF0123456789", "k" * 65), "invalid_key", id="long-key"),
    ],
)
async def test_invalid_modifications_are_refused_without_a_request(
    fake: FakeAdyen, processor: AdyenProcessor, call: Any, code: str
) -> None:
    error = await failure(call(processor))
    assert isinstance(error, PermanentProcessorError)
    assert error.code == code
    assert fake.requests_seen == 0


async def test_modification_5xx_and_lost_response_are_ambiguous(
    fake: FakeAdyen, processor: AdyenProcessor
) -> None:
    payment = await processor.create_charge(charge())
    psp = payment.processor_reference
    fake.inject(Fault.http_status(503))
    assert isinstance(await failure(processor.refund(psp, 100, "EUR", "r-1")), AmbiguousProcessorError)
    assert fake.payments[psp].refunded == 0

    fake.inject(Fault.lost_response())
    assert isinstance(await failure(processor.refund(psp, 100, "EUR", "r-1")), AmbiguousProcessorError)
    assert fake.payments[psp].refunded == 100
    retried = await processor.refund(psp, 100, "EUR", "r-1")  # same key: the refund is not repeated
    assert fake.payments[psp].refunded == 100
    assert retried.processor_reference == fake.modifications[-1]["pspReference"]

    fake.inject(Fault.http_status(201, body='{"status": "failed"}'))
    malformed = await failure(processor.refund(psp, 100, "EUR", "r-2"))
    assert isinstance(malformed, AmbiguousProcessorError)


# --- the fake's own wire checks ---------------------------------------------------------------


def valid_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "merchantAccount": MERCHANT,
        "amount": {"value": 100, "currency": "EUR"},
        "reference": "ref-1",
        "paymentMethod": {"type": "scheme", "storedPaymentMethodId": "stored_succeed"},
        "shopperReference": SHOPPER,
        "shopperInteraction": "ContAuth",
        "recurringProcessingModel": "UnscheduledCardOnFile",
        "returnUrl": "https://example.com/return",
    }
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param(valid_body(shopperInteration="ContAuth"), 400, "702", id="unknown-field"),
        pytest.param(valid_body(merchantAccount="Other"), 403, "901", id="merchant-account"),
        pytest.param(valid_body(amount=None), 422, "100", id="no-amount"),
        pytest.param(valid_body(amount={"value": "100", "currency": "EUR"}), 422, "137", id="value-string"),
        pytest.param(valid_body(amount={"value": 10.5, "currency": "EUR"}), 422, "137", id="value-float"),
        pytest.param(valid_body(amount={"value": 100, "currency": "eu"}), 422, "137", id="currency"),
        pytest.param(valid_body(amount={"value": 100}), 422, "137", id="no-currency"),
        pytest.param(valid_body(reference=None), 422, "130", id="no-reference"),
        pytest.param(valid_body(reference="r" * 81), 422, "130", id="long-reference"),
        pytest.param(valid_body(returnUrl=None), 422, "000", id="no-return-url"),
        pytest.param(valid_body(paymentMethod={"type": "scheme"}), 422, "000", id="no-token"),
        pytest.param(valid_body(shopperReference="ab"), 422, "000", id="short-shopper"),
        pytest.param(valid_body(shopperInteraction="Phone"), 422, "000", id="interaction"),
        pytest.param(valid_body(recurringProcessingModel=None), 422, "000", id="no-recurring-model"),
        pytest.param(valid_body(captureDelayHours=-1), 422, "000", id="capture-delay"),
        pytest.param(valid_body(additionalData={"manualCapture": True}), 422, "000", id="additional-data"),
    ],
)
async def test_fake_refuses_a_bad_payment_request(
    fake: FakeAdyen, body: dict[str, Any], status: int, code: str
) -> None:
    async with httpx.AsyncClient(base_url=fake.checkout_url, headers={"X-API-Key": API_KEY}) as client:
        response = await client.post("/payments", json=body, headers={"Idempotency-Key": "k-1"})
    assert response.status_code == status
    answer = response.json()
    assert (answer["status"], answer["errorCode"]) == (status, code)
    assert set(answer) == {"status", "errorCode", "message", "errorType"}
    assert fake.charges == []
    assert fake.received == []


async def test_fake_checks_key_method_json_and_idempotency_key(fake: FakeAdyen) -> None:
    async with httpx.AsyncClient(base_url=fake.checkout_url) as client:
        anonymous = await client.post("/payments", json=valid_body())
        not_json = await client.post("/payments", content=b"amount=100", headers={"X-API-Key": API_KEY})
        get = await client.get("/payments", headers={"X-API-Key": API_KEY})
        long_key = await client.post(
            "/payments", json=valid_body(), headers={"X-API-Key": API_KEY, "Idempotency-Key": "k" * 65}
        )
        accepted = await client.post(
            "/payments", json=valid_body(), headers={"X-API-Key": API_KEY, "Idempotency-Key": "k-2"}
        )
    assert (anonymous.status_code, anonymous.json()["errorType"]) == (401, "security")
    assert (not_json.status_code, not_json.json()["errorCode"]) == (400, "702")
    assert get.status_code == 405
    assert long_key.status_code == 422
    assert accepted.status_code == 200
    assert accepted.headers["Idempotency-Key"] == "k-2"
    assert len(fake.charges) == 1


# --- webhook HMAC signatures ------------------------------------------------------------------

#: Adyen's published test vector (Adyen Python API library, test/UtilTest.py).
ADYEN_VECTOR_ITEM: dict[str, Any] = {
    "pspReference": "7914073381342284",
    "merchantReference": "TestPayment-1407325143704",
    "merchantAccountCode": "TestMerchant",
    "amount": {"currency": "EUR", "value": 1130},
    "eventCode": "AUTHORISATION",
    "success": "true",
    "eventDate": "2019-05-06T17:15:34.121+02:00",
    "operations": ["CANCEL", "CAPTURE", "REFUND"],
    "paymentMethod": "visa",
}
ADYEN_VECTOR_SIGNATURE = "coqCmt/IZ4E3CzPvMY8zTjQVL5hYJUiBRg8UU+iCWo0="


def test_signing_string_and_adyen_test_vector() -> None:
    assert signing_string(ADYEN_VECTOR_ITEM) == (
        "7914073381342284::TestMerchant:TestPayment-1407325143704:1130:EUR:AUTHORISATION:true"
    )
    assert compute_signature(ADYEN_VECTOR_ITEM, HMAC_KEY) == ADYEN_VECTOR_SIGNATURE
    signed = {**ADYEN_VECTOR_ITEM, "additionalData": {"hmacSignature": ADYEN_VECTOR_SIGNATURE}}
    assert verify_item(signed, [HMAC_KEY]) == 0


async def test_fake_webhooks_are_signed_and_verify(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    payment = await processor.create_charge(charge(capture=CaptureMethod.MANUAL))
    capture = await processor.capture(payment.processor_reference, 1050, "EUR", "cap-1")
    refund = await processor.refund(payment.processor_reference, 200, "EUR", "refund-1")

    items = AdyenWebhookVerifier([HMAC_KEY]).verify_body(fake.notification_request(fake.notifications))

    assert [item["eventCode"] for item in items] == ["AUTHORISATION", "CAPTURE", "REFUND"]
    authorisation, captured, refunded = items
    assert authorisation["pspReference"] == payment.processor_reference
    assert "originalReference" not in authorisation
    assert authorisation["merchantReference"] == fake.charges[0].merchant_reference
    assert authorisation["success"] == "true"
    assert captured["originalReference"] == payment.processor_reference
    assert captured["pspReference"] in capture.message
    assert captured["amount"] == {"currency": "EUR", "value": 1050}
    assert refunded["pspReference"] == refund.processor_reference
    assert refunded["amount"] == {"currency": "EUR", "value": 200}


async def test_refused_authorisation_webhook_says_success_false(
    fake: FakeAdyen, processor: AdyenProcessor
) -> None:
    await failure(processor.create_charge(charge("stored_refused")))
    [item] = AdyenWebhookVerifier([HMAC_KEY]).verify_body(fake.notification_request(fake.notifications))
    assert (item["success"], item["reason"]) == ("false", "Refused")


async def test_cancellation_webhook(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    payment = await processor.create_charge(charge(capture=CaptureMethod.MANUAL))
    await processor.cancel(payment.processor_reference, "cancel-1")
    item = fake.notifications[-1]
    assert item["eventCode"] == "CANCELLATION"
    assert item["originalReference"] == payment.processor_reference
    assert AdyenWebhookVerifier([HMAC_KEY]).verify_item(item) == 0


@pytest.mark.parametrize(
    ("change", "value"),
    [
        pytest.param("amount", {"currency": "EUR", "value": 1}, id="amount"),
        pytest.param("success", "false", id="success"),
        pytest.param("eventCode", "REFUND", id="event-code"),
        pytest.param("merchantReference", "someone-else", id="reference"),
        pytest.param("originalReference", "ABCDEF0123456789", id="original-reference"),
    ],
)
async def test_tampered_item_is_rejected(
    fake: FakeAdyen, processor: AdyenProcessor, change: str, value: Any
) -> None:
    await processor.create_charge(charge())
    tampered = {**fake.notifications[0], change: value}

    with pytest.raises(SignatureError) as info:
        AdyenWebhookVerifier([HMAC_KEY]).verify_item(tampered)

    assert "does not match" in info.value.reason
    signature = fake.notifications[0]["additionalData"]["hmacSignature"]
    for text in (str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))):
        assert HMAC_KEY not in text
        assert signature not in text


def test_rotated_keys_are_accepted_and_tell_which_key_signed() -> None:
    old = {
        **ADYEN_VECTOR_ITEM,
        "additionalData": {"hmacSignature": compute_signature(ADYEN_VECTOR_ITEM, HMAC_KEY)},
    }
    new = {
        **ADYEN_VECTOR_ITEM,
        "additionalData": {"hmacSignature": compute_signature(ADYEN_VECTOR_ITEM, NEW_HMAC_KEY)},
    }
    during_rotation = AdyenWebhookVerifier([NEW_HMAC_KEY, HMAC_KEY])
    assert during_rotation.verify_item(new) == 0
    assert during_rotation.verify_item(old) == 1
    after_rotation = AdyenWebhookVerifier([NEW_HMAC_KEY])
    with pytest.raises(SignatureError, match="1 configured key"):
        after_rotation.verify_item(old)
    assert HMAC_KEY not in repr(during_rotation)
    assert NEW_HMAC_KEY not in repr(during_rotation)
    assert "2 redacted" in repr(during_rotation)


@pytest.mark.parametrize(
    ("additional", "reason"),
    [
        pytest.param(None, "missing additionalData.hmacSignature", id="no-additional-data"),
        pytest.param({}, "missing additionalData.hmacSignature", id="no-signature"),
        pytest.param({"hmacSignature": ""}, "missing additionalData.hmacSignature", id="empty"),
        pytest.param({"hmacSignature": "not base64!"}, "not valid base64", id="not-base64"),
        pytest.param({"hmacSignature": base64.b64encode(b"short").decode()}, "wrong length", id="short"),
        pytest.param({"hmacSignature": 12}, "not a string", id="not-a-string"),
        pytest.param("x", "additionalData is not an object", id="additional-data-string"),
    ],
)
def test_missing_or_malformed_signature(additional: Any, reason: str) -> None:
    item = dict(ADYEN_VECTOR_ITEM)
    if additional is not None:
        item["additionalData"] = additional
    with pytest.raises(SignatureError, match=reason):
        AdyenWebhookVerifier([HMAC_KEY]).verify_item(item)


async def test_unsigned_webhooks_are_rejected(processor: AdyenProcessor) -> None:
    unsigned = FakeAdyen(API_KEY, MERCHANT)  # no HMAC key configured
    await unsigned.start()
    client = AdyenProcessor(API_KEY, MERCHANT, base_url=unsigned.checkout_url, timeout_s=TIMEOUT_S)
    try:
        await client.create_charge(charge())
    finally:
        await client.aclose()
        await unsigned.stop()
    with pytest.raises(SignatureError, match=r"notificationItems\[0\]: missing"):
        AdyenWebhookVerifier([HMAC_KEY]).verify_body(unsigned.notification_request(unsigned.notifications))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param([], "not a JSON object", id="list"),
        pytest.param({"live": "false"}, "no notificationItems", id="no-items"),
        pytest.param({"notificationItems": [{"Other": {}}]}, "no NotificationRequestItem", id="no-item"),
    ],
)
def test_malformed_webhook_bodies(body: Any, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        AdyenWebhookVerifier([HMAC_KEY]).verify_body(body)


def test_a_non_integer_amount_is_refused() -> None:
    item = {**ADYEN_VECTOR_ITEM, "amount": {"currency": "EUR", "value": "1130"}}
    with pytest.raises(SignatureError, match="not an integer"):
        signing_string(item)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        pytest.param([], "at least one", id="none"),
        pytest.param([""], "#1 is empty", id="empty"),
        pytest.param([HMAC_KEY, "zz" + HMAC_KEY[2:]], "#2 is not a hex", id="not-hex"),
        pytest.param([HMAC_KEY[:-1]], "#1 is not a hex", id="odd-length"),
    ],
)
def test_bad_key_configuration_never_echoes_a_key(keys: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        AdyenWebhookVerifier(keys)
    for key in keys:
        if key:
            assert key not in str(info.value)
            assert key[2:] not in "".join(traceback.format_exception(info.value))


async def test_fake_delivers_signed_webhooks_over_http(fake: FakeAdyen, processor: AdyenProcessor) -> None:
    verifier = AdyenWebhookVerifier([HMAC_KEY])
    seen: list[str] = []

    async def endpoint(request: web.Request) -> web.Response:
        try:
            items = verifier.verify_body(await request.json())
        except SignatureError as exc:
            return web.Response(status=401, text=exc.reason)
        seen.extend(str(item["eventCode"]) for item in items)
        return web.Response(status=202, text="[accepted]")

    app = web.Application()
    app.router.add_post("/webhooks/adyen", endpoint)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        payment = await processor.create_charge(charge(capture=CaptureMethod.MANUAL))
        await processor.capture(payment.processor_reference, 500, "EUR", "cap-1")
        response = await fake.deliver_notifications(f"http://127.0.0.1:{port}/webhooks/adyen")
        assert response is not None
        assert (response.status_code, response.text) == (202, "[accepted]")
        assert await fake.deliver_notifications(f"http://127.0.0.1:{port}/webhooks/adyen") is None
        fake.notifications.append({**fake.notifications[0], "success": "false"})  # forged, bad signature
        forged = await fake.deliver_notifications(f"http://127.0.0.1:{port}/webhooks/adyen")
        assert forged is not None
        assert forged.status_code == 401
        assert "does not match" in forged.text
    finally:
        await runner.cleanup()
    assert seen == ["AUTHORISATION", "CAPTURE"]
    assert fake.delivered_notifications == 2
