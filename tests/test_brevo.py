"""The Brevo email provider against the fake Brevo API: wire format, idempotency,
and one test per row of the failure table (channels/brevo.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from channels.brevo import DUPLICATE_MESSAGE_ID_PREFIX, BrevoProvider
from channels.provider import DeliveryError, PermanentDeliveryError, RetryableDeliveryError, parse_retry_after
from switchboard.fakes.brevo import FakeBrevo
from switchboard.fakes.http import Fault
from switchboard.notify.v1 import events_pb2, notify_pb2

API_KEY = "xkeysib-7d1e5a0c9b3f4e2a8c6d0b1f3e5a7c9d-SeCrEtKeY"
SENDER = "no-reply@acme.example"


def email_event(*, text: str = "Plain body", html: str = "<p>HTML body</p>") -> events_pb2.DeliveryRequested:
    return events_pb2.DeliveryRequested(
        delivery_id=str(uuid.uuid4()),
        notification_id=str(uuid.uuid4()),
        tenant_id=str(uuid.uuid4()),
        channel=notify_pb2.CHANNEL_EMAIL,
        recipient="ada@example.com",
        email=notify_pb2.EmailContent(subject="Hello", text=text, html=html),
    )


@pytest.fixture
async def brevo() -> AsyncIterator[FakeBrevo]:
    fake = FakeBrevo(API_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def provider(brevo: FakeBrevo) -> AsyncIterator[BrevoProvider]:
    client = BrevoProvider(API_KEY, SENDER, "Acme", base_url=brevo.base_url, timeout_s=5.0)
    yield client
    await client.close()


def assert_no_secret(error: DeliveryError, provider: BrevoProvider, secret: str = API_KEY) -> None:
    assert secret not in str(error)
    assert secret not in error.reason
    assert secret not in repr(error)
    assert secret not in repr(provider)
    assert error.__cause__ is None
    assert error.__context__ is None


async def test_wire_format_and_message_id(brevo: FakeBrevo, provider: BrevoProvider) -> None:
    event = email_event()
    result = await provider.send(event)

    assert len(brevo.received) == 1
    request = brevo.received[0]
    assert (request.method, request.path) == ("POST", "/v3/smtp/email")
    headers = {name.lower(): value for name, value in request.headers.items()}
    assert headers["api-key"] == API_KEY
    assert headers["accept"] == "application/json"
    assert headers["content-type"] == "application/json"
    assert request.body == {
        "sender": {"email": SENDER, "name": "Acme"},
        "to": [{"email": "ada@example.com"}],
        "subject": "Hello",
        "textContent": "Plain body",
        "htmlContent": "<p>HTML body</p>",
        "headers": {"X-Switchboard-Delivery-Id": event.delivery_id, "idempotencyKey": event.delivery_id},
    }
    assert result.provider_message_id == brevo.message_ids[0]
    assert result.provider_message_id.endswith("@smtp-relay.mailin.fr>")


async def test_text_only_and_no_sender_name(brevo: FakeBrevo) -> None:
    provider = BrevoProvider(API_KEY, SENDER, base_url=brevo.base_url)
    try:
        await provider.send(email_event(html=""))
    finally:
        await provider.close()
    body = brevo.received[0].body
    assert body["sender"] == {"email": SENDER}
    assert body["textContent"] == "Plain body"
    assert "htmlContent" not in body


async def test_lost_response_retry_is_not_sent_twice(brevo: FakeBrevo, provider: BrevoProvider) -> None:
    """Brevo accepted the email but the answer was lost: the retry carries the same
    idempotency key, Brevo refuses it as a duplicate, and the delivery counts as sent."""
    event = email_event()
    brevo.inject(Fault.lost_response())
    with pytest.raises(RetryableDeliveryError) as first:
        await provider.send(event)
    assert "may have accepted" in first.value.reason

    result = await provider.send(event)
    assert result.provider_message_id == f"{DUPLICATE_MESSAGE_ID_PREFIX}{event.delivery_id}"
    assert len(brevo.received) == 1
    assert brevo.duplicates_refused == 1


async def test_another_delivery_is_not_a_duplicate(brevo: FakeBrevo, provider: BrevoProvider) -> None:
    first = await provider.send(email_event())
    second = await provider.send(email_event())
    assert first.provider_message_id != second.provider_message_id
    assert len(brevo.received) == 2
    assert brevo.duplicates_refused == 0


def _brevo_error(code: str, message: str) -> str:
    return json.dumps({"code": code, "message": message})


@dataclass(frozen=True)
class Row:
    """One row of the failure table, produced by an injected fault."""

    fault: Fault
    error: type[DeliveryError]
    in_reason: str
    retry_after_s: float | None = None


FAILURE_TABLE = {
    "400 bad request": Row(
        Fault.http_status(400, _brevo_error("invalid_parameter", "email is not valid in to")),
        PermanentDeliveryError,
        "invalid_parameter: email is not valid in to",
    ),
    "403 forbidden": Row(
        Fault.http_status(
            403, _brevo_error("permission_denied", "Unable to send email. Your account is not yet activated")
        ),
        PermanentDeliveryError,
        "permission_denied",
    ),
    "404 not found": Row(
        Fault.http_status(404, _brevo_error("document_not_found", "Not found")),
        PermanentDeliveryError,
        "Brevo HTTP 404",
    ),
    "422 other 4xx": Row(
        Fault.http_status(422, _brevo_error("unprocessable", "cannot process")),
        PermanentDeliveryError,
        "Brevo HTTP 422",
    ),
    "408 request timeout": Row(
        Fault.http_status(408), RetryableDeliveryError, "Brevo HTTP 408 request timeout"
    ),
    "429 with Retry-After": Row(
        FakeBrevo.rate_limited(reset_s=3, retry_after_s=7), RetryableDeliveryError, "Brevo HTTP 429", 7.0
    ),
    "429 with a later x-sib-ratelimit-reset than Retry-After": Row(
        FakeBrevo.rate_limited(reset_s=20, retry_after_s=5), RetryableDeliveryError, "Brevo HTTP 429", 20.0
    ),
    "429 with x-sib-ratelimit-reset": Row(
        FakeBrevo.rate_limited(reset_s=12), RetryableDeliveryError, "too_many_requests", 12.0
    ),
    "500": Row(Fault.http_status(500), RetryableDeliveryError, "Brevo HTTP 500"),
    "503": Row(
        Fault.http_status(503, headers={"Retry-After": "4"}), RetryableDeliveryError, "Brevo HTTP 503", 4.0
    ),
    "connection reset": Row(Fault.reset(), RetryableDeliveryError, "may have accepted"),
    "malformed body": Row(Fault.malformed(), RetryableDeliveryError, "without the documented messageId"),
}


@pytest.mark.parametrize("row", FAILURE_TABLE.values(), ids=FAILURE_TABLE.keys())
async def test_failure_table(brevo: FakeBrevo, provider: BrevoProvider, row: Row) -> None:
    brevo.inject(row.fault)
    with pytest.raises(DeliveryError) as caught:
        await provider.send(email_event())
    error = caught.value
    assert type(error) is row.error
    assert row.in_reason in error.reason
    assert error.retry_after_s == row.retry_after_s
    assert_no_secret(error, provider)
    assert brevo.received == []


async def test_401_wrong_key_is_permanent_and_neither_key_is_quoted(brevo: FakeBrevo) -> None:
    wrong_key = "xkeysib-0000000000000000000000000000000000000000-WrOnG"
    provider = BrevoProvider(wrong_key, SENDER, base_url=brevo.base_url)
    try:
        with pytest.raises(PermanentDeliveryError) as caught:
            await provider.send(email_event())
    finally:
        await provider.close()
    assert "Brevo HTTP 401" in caught.value.reason
    assert "unauthorized: Key not found" in caught.value.reason
    assert_no_secret(caught.value, provider, wrong_key)
    assert_no_secret(caught.value, provider, API_KEY)


async def test_401_body_echoing_the_key_is_scrubbed(brevo: FakeBrevo, provider: BrevoProvider) -> None:
    brevo.inject(Fault.http_status(401, _brevo_error("unauthorized", f"Key {API_KEY} not found")))
    with pytest.raises(PermanentDeliveryError) as caught:
        await provider.send(email_event())
    assert "<redacted>" in caught.value.reason
    assert_no_secret(caught.value, provider)


async def test_402_out_of_credits_is_permanent(brevo: FakeBrevo, provider: BrevoProvider) -> None:
    brevo.credits_exhausted = True
    with pytest.raises(PermanentDeliveryError) as caught:
        await provider.send(email_event())
    assert "Brevo HTTP 402" in caught.value.reason
    assert "not_enough_credits" in caught.value.reason
    assert "until topped up" in caught.value.reason
    assert_no_secret(caught.value, provider)

    brevo.credits_exhausted = False
    await provider.send(email_event())
    assert len(brevo.received) == 1


async def test_slow_answer_past_the_timeout_is_retryable(brevo: FakeBrevo) -> None:
    provider = BrevoProvider(API_KEY, SENDER, base_url=brevo.base_url, timeout_s=0.2)
    brevo.inject(Fault.slow(1.0))
    try:
        with pytest.raises(RetryableDeliveryError) as caught:
            await provider.send(email_event())
    finally:
        await provider.close()
    assert "did not answer in time" in caught.value.reason
    assert_no_secret(caught.value, provider)


async def test_unreachable_is_retryable_and_not_sent() -> None:
    fake = FakeBrevo(API_KEY)
    await fake.start()
    base_url = fake.base_url
    await fake.stop()  # nothing listens there any more
    provider = BrevoProvider(API_KEY, SENDER, base_url=base_url, timeout_s=2.0)
    try:
        with pytest.raises(RetryableDeliveryError) as caught:
            await provider.send(email_event())
    finally:
        await provider.close()
    assert "unreachable, not sent" in caught.value.reason


async def test_closed_provider_does_not_send(brevo: FakeBrevo, provider: BrevoProvider) -> None:
    await provider.close()
    with pytest.raises(RetryableDeliveryError):
        await provider.send(email_event())
    assert brevo.received == []
    assert API_KEY not in repr(provider)


async def test_fake_checks_required_fields_and_content_type(brevo: FakeBrevo) -> None:
    url = f"{brevo.base_url}/v3/smtp/email"
    headers = {"api-key": API_KEY, "accept": "application/json"}
    body = {"sender": {"email": SENDER}, "to": [{"email": "ada@example.com"}], "subject": "Hi"}
    async with httpx.AsyncClient() as client:
        no_content = await client.post(url, json=body, headers=headers)
        no_subject = await client.post(url, json={**body, "subject": "", "textContent": "x"}, headers=headers)
        not_json = await client.post(url, content=b"sender=x", headers=headers)
    assert no_content.status_code == 400
    assert no_content.json() == {
        "code": "missing_parameter",
        "message": "Either of htmlContent or textContent is required",
    }
    assert no_subject.status_code == 400
    assert no_subject.json()["code"] == "missing_parameter"
    assert not_json.status_code == 400
    assert brevo.received == []


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
