"""The 2Factor SMS provider against the fake 2Factor server over real HTTP on loopback.

Covers the wire format the fake received, success, one test per row of the
failure table (HTTP-200 ``Status: Error`` answers by ``Details``, HTTP
status, transport faults) and that the API key (part of the URL path) never
shows in error text, reprs, exception chains or httpx/httpcore logs.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import httpx
import pytest

from channels.provider import (
    AMBIGUOUS_PREFIX,
    DeliveryError,
    PermanentDeliveryError,
    RetryableDeliveryError,
    parse_retry_after,
)
from channels.two_factor import TwoFactorProvider
from switchboard.embedded import free_port
from switchboard.fakes.http import Fault
from switchboard.fakes.two_factor import FakeTwoFactor
from switchboard.notify.v1 import events_pb2, notify_pb2

API_KEY = "5c1e7a2b-9d4f-11ef-8c3a-0200cd936042"
SENDER_ID = "SWBORD"
RECIPIENT = "+919876543210"
TIMEOUT_S = 0.5


def sms_event(
    recipient: str = RECIPIENT, text: str = "Your order 42 has shipped."
) -> events_pb2.DeliveryRequested:
    return events_pb2.DeliveryRequested(
        delivery_id=str(uuid.uuid4()),
        notification_id=str(uuid.uuid4()),
        tenant_id=str(uuid.uuid4()),
        channel=notify_pb2.CHANNEL_SMS,
        recipient=recipient,
        sms=notify_pb2.SmsContent(text=text),
    )


def assert_secret_free(exc: BaseException, secret: str = API_KEY) -> None:
    """The secret is in none of the texts an error can end up in, and nothing is chained."""
    texts = [str(exc), repr(exc), getattr(exc, "reason", ""), "".join(traceback.format_exception(exc))]
    assert all(secret not in text for text in texts), texts
    assert exc.__cause__ is None
    assert exc.__context__ is None


@pytest.fixture(autouse=True)
def no_key_in_client_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """httpx logs every request URL at INFO: the key must never be in what the client side logs."""
    caplog.set_level(logging.DEBUG)
    yield
    client_side = [r for r in caplog.records if r.name.split(".")[0] in ("httpx", "httpcore", "channels")]
    for record in client_side:
        assert API_KEY not in record.getMessage()


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwoFactor]:
    server = FakeTwoFactor(API_KEY, sender_ids=(SENDER_ID,))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def provider(fake: FakeTwoFactor) -> AsyncIterator[TwoFactorProvider]:
    client = TwoFactorProvider(API_KEY, SENDER_ID, base_url=fake.base_url, timeout_s=TIMEOUT_S)
    yield client
    await client.close()


async def send_failure(
    provider: TwoFactorProvider, event: events_pb2.DeliveryRequested | None = None
) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        await provider.send(event or sms_event())
    assert_secret_free(info.value)
    return info.value


# --- wire format and success ------------------------------------------------------------------


async def test_wire_format_and_success(fake: FakeTwoFactor, provider: TwoFactorProvider) -> None:
    result = await provider.send(sms_event(text="Hello from Switchboard & co: 100% ✓"))

    assert result.provider_message_id == fake.message_ids[0]
    [received] = fake.received
    assert received.method == "POST"
    assert received.path == f"/API/V1/{API_KEY}/ADDON_SERVICES/SEND/TSMS"
    assert received.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert received.body == {
        "From": SENDER_ID,
        "To": "919876543210",
        "Msg": "Hello from Switchboard & co: 100% ✓",
    }


async def test_httpx_logs_show_the_placeholder_not_the_key(
    provider: TwoFactorProvider, caplog: pytest.LogCaptureFixture
) -> None:
    await provider.send(sms_event())
    [line] = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert "/API/V1/REDACTED-API-KEY/ADDON_SERVICES/SEND/TSMS" in line
    assert API_KEY not in line


async def test_repr_hides_the_key(provider: TwoFactorProvider) -> None:
    assert API_KEY not in repr(provider)
    assert "redacted" in repr(provider)
    assert provider.name == "two_factor"


# --- HTTP 200 with Status: Error, classified by Details ----------------------------------------


@pytest.mark.parametrize(
    ("details", "retryable"),
    [
        pytest.param("Invalid API Key - No Account Exists", False, id="invalid-api-key"),
        pytest.param("Invalid Phone Number - Length Mismatch(Expected: 10)", False, id="invalid-number"),
        pytest.param("Number is registered in DND, message not sent", False, id="dnd"),
        pytest.param("DLT Template not approved for this message", False, id="dlt-template"),
        pytest.param("Sender Id not approved", False, id="sender-not-approved"),
        pytest.param("Insufficient Balance", False, id="insufficient-balance"),
        pytest.param("Rate limit exceeded, please try again later", True, id="rate-limited"),
        pytest.param("Service temporarily unavailable", True, id="transient"),
        pytest.param("Something nobody documented", True, id="unknown"),
    ],
)
async def test_status_error_with_http_200_is_a_failure(
    fake: FakeTwoFactor, provider: TwoFactorProvider, details: str, retryable: bool
) -> None:
    fake.inject(FakeTwoFactor.error(details))

    error = await send_failure(provider)

    assert error.retryable is retryable
    assert isinstance(error, RetryableDeliveryError if retryable else PermanentDeliveryError)
    assert details in error.reason
    assert not error.reason.startswith(AMBIGUOUS_PREFIX)
    assert fake.received == []


async def test_insufficient_balance_says_permanent_until_topped_up(
    fake: FakeTwoFactor, provider: TwoFactorProvider
) -> None:
    fake.inject(FakeTwoFactor.error("Insufficient Balance"))
    error = await send_failure(provider)
    assert "topped up" in error.reason


async def test_wrong_api_key_is_permanent(fake: FakeTwoFactor) -> None:
    wrong_key = "00000000-0000-0000-0000-000000000000"
    client = TwoFactorProvider(wrong_key, SENDER_ID, base_url=fake.base_url, timeout_s=TIMEOUT_S)
    try:
        error = await send_failure(client)
    finally:
        await client.close()
    assert isinstance(error, PermanentDeliveryError)
    assert "Invalid API Key" in error.reason
    assert_secret_free(error, wrong_key)


async def test_unregistered_sender_id_is_permanent(fake: FakeTwoFactor) -> None:
    client = TwoFactorProvider(API_KEY, "OTHERS", base_url=fake.base_url, timeout_s=TIMEOUT_S)
    try:
        error = await send_failure(client)
    finally:
        await client.close()
    assert isinstance(error, PermanentDeliveryError)
    assert "Sender Id" in error.reason


async def test_details_echoing_the_key_are_scrubbed(fake: FakeTwoFactor, provider: TwoFactorProvider) -> None:
    fake.inject(FakeTwoFactor.error(f"Invalid API Key {API_KEY} - No Account Exists"))
    error = await send_failure(provider)
    assert isinstance(error, PermanentDeliveryError)
    assert "<redacted>" in error.reason


# --- HTTP status and transport faults ----------------------------------------------------------


async def test_429_is_retryable_with_retry_after(fake: FakeTwoFactor, provider: TwoFactorProvider) -> None:
    fake.inject(Fault.rate_limited(retry_after_s=7))
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert error.retry_after_s == 7.0
    assert not error.reason.startswith(AMBIGUOUS_PREFIX)


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_retryable_and_ambiguous(
    fake: FakeTwoFactor, provider: TwoFactorProvider, status: int
) -> None:
    fake.inject(Fault.http_status(status))
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert error.reason.startswith(AMBIGUOUS_PREFIX)
    assert f"HTTP {status}" in error.reason


async def test_other_4xx_is_permanent(fake: FakeTwoFactor, provider: TwoFactorProvider) -> None:
    fake.inject(Fault.http_status(403, body="forbidden"))
    error = await send_failure(provider)
    assert isinstance(error, PermanentDeliveryError)
    assert "HTTP 403" in error.reason


async def test_slow_answer_past_the_timeout_is_retryable_and_ambiguous(
    fake: FakeTwoFactor, provider: TwoFactorProvider
) -> None:
    fake.inject(Fault.slow(delay_s=TIMEOUT_S * 3))
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert error.reason.startswith(AMBIGUOUS_PREFIX)
    assert "ReadTimeout" in error.reason


async def test_connection_reset_is_retryable_and_ambiguous(
    fake: FakeTwoFactor, provider: TwoFactorProvider
) -> None:
    fake.inject(Fault.reset())
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert error.reason.startswith(AMBIGUOUS_PREFIX)


async def test_malformed_answer_is_retryable_and_ambiguous(
    fake: FakeTwoFactor, provider: TwoFactorProvider
) -> None:
    fake.inject(Fault.malformed())
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert error.reason.startswith(AMBIGUOUS_PREFIX)


async def test_lost_response_is_the_duplicate_window(
    fake: FakeTwoFactor, provider: TwoFactorProvider
) -> None:
    """2Factor sent the SMS but the answer was lost: ambiguous, and the retry sends it again."""
    fake.inject(Fault.lost_response())
    event = sms_event()
    error = await send_failure(provider, event)
    assert isinstance(error, RetryableDeliveryError)
    assert error.reason.startswith(AMBIGUOUS_PREFIX)
    assert len(fake.received) == 1

    await provider.send(event)
    assert len(fake.received) == 2


async def test_connection_refused_is_retryable_and_not_ambiguous() -> None:
    client = TwoFactorProvider(
        API_KEY, SENDER_ID, base_url=f"http://127.0.0.1:{free_port()}", timeout_s=TIMEOUT_S
    )
    try:
        error = await send_failure(client)
    finally:
        await client.close()
    assert isinstance(error, RetryableDeliveryError)
    assert not error.reason.startswith(AMBIGUOUS_PREFIX)
    assert "not sent" in error.reason


# --- local checks, lifecycle, helpers --------------------------------------------------------


async def test_invalid_recipient_is_permanent_without_a_request(
    fake: FakeTwoFactor, provider: TwoFactorProvider
) -> None:
    error = await send_failure(provider, sms_event(recipient="9876543210"))
    assert isinstance(error, PermanentDeliveryError)
    assert fake.requests_seen == 0


async def test_send_after_close_is_retryable(fake: FakeTwoFactor, provider: TwoFactorProvider) -> None:
    await provider.close()
    await provider.close()
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert fake.requests_seen == 0


async def test_fake_refuses_a_bad_wire_format(fake: FakeTwoFactor) -> None:
    async with httpx.AsyncClient(base_url=fake.base_url) as client:
        path = f"/API/V1/{API_KEY}/ADDON_SERVICES/SEND/TSMS"
        plus = await client.post(path, data={"From": SENDER_ID, "To": "+919876543210", "Msg": "hi"})
        empty = await client.post(path, data={"From": SENDER_ID, "To": "919876543210", "Msg": ""})
        as_json = await client.post(path, json={"From": SENDER_ID, "To": "919876543210", "Msg": "hi"})
        get = await client.get(path)
    assert plus.json()["Status"] == "Error"
    assert empty.json()["Status"] == "Error"
    assert as_json.json()["Status"] == "Error"
    assert get.status_code == 405
    assert fake.received == []


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
