"""The Twilio SMS provider against the fake Twilio server over real HTTP on loopback.

Covers the wire format the fake received (path, method, basic auth, form
fields, StatusCallback), success, one test per row of the failure table
(documented error codes, 429 with Retry-After, 5xx, timeouts, resets,
malformed answers), the duplicate window of ambiguous failures, and that the
auth token never shows in error text, reprs, exception chains or client logs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import httpx
import pytest

from channels.provider import AMBIGUOUS_PREFIX, DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from channels.twilio import TwilioProvider, is_ambiguous
from gateway.server import Gateway
from gateway.validation import RequestInvalid
from switchboard.embedded import free_port
from switchboard.fakes.http import Fault
from switchboard.fakes.twilio import FakeTwilio
from switchboard.notify.v1 import events_pb2, notify_pb2
from switchboard.settings import Settings
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tenants.provider_config import split_provider_config
from tests.conftest import TenantCredentials
from tests.helpers import new_request_id, tenant_providers
from tests.test_admin_api import OPERATOR

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "f3b1c2d4e5a697887766554433221100"
SERVICE_SID = "MG" + "fedcba9876543210" * 2
FROM_NUMBER = "+14155550100"
RECIPIENT = "+14155550123"
CALLBACK_URL = "https://hooks.example.com/twilio/status?tenant=acme"
TIMEOUT_S = 0.5
BASIC = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()


def sms_event(recipient: str = RECIPIENT, text: str = "Your code is 123456") -> events_pb2.DeliveryRequested:
    return events_pb2.DeliveryRequested(
        delivery_id=str(uuid.uuid4()),
        notification_id=str(uuid.uuid4()),
        tenant_id=str(uuid.uuid4()),
        channel=notify_pb2.CHANNEL_SMS,
        recipient=recipient,
        sms=notify_pb2.SmsContent(text=text),
    )


def assert_secret_free(exc: BaseException) -> None:
    """The token is in none of the texts an error can end up in, and nothing is chained."""
    texts = [str(exc), repr(exc), getattr(exc, "reason", ""), "".join(traceback.format_exception(exc))]
    for text in texts:
        assert AUTH_TOKEN not in text
        assert BASIC not in text
    assert exc.__cause__ is None
    assert exc.__context__ is None


@pytest.fixture(autouse=True)
def no_token_in_client_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        if record.name.split(".")[0] in ("httpx", "httpcore", "channels"):
            assert AUTH_TOKEN not in record.getMessage()
            assert BASIC not in record.getMessage()


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    server = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def provider(fake: FakeTwilio) -> AsyncIterator[TwilioProvider]:
    client = TwilioProvider(
        ACCOUNT_SID, AUTH_TOKEN, from_number=FROM_NUMBER, base_url=fake.base_url, timeout_s=TIMEOUT_S
    )
    yield client
    await client.close()


async def send_failure(
    provider: TwilioProvider, event: events_pb2.DeliveryRequested | None = None
) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        await provider.send(event or sms_event())
    assert_secret_free(info.value)
    return info.value


# --- wire format and success ------------------------------------------------------------------


async def test_wire_format_with_from_number(fake: FakeTwilio, provider: TwilioProvider) -> None:
    result = await provider.send(sms_event(text="Ünïcode & symbols: 100%"))

    assert result.provider_message_id == fake.messages[0]["sid"]
    assert result.provider_message_id.startswith("SM")
    [received] = fake.received
    assert received.method == "POST"
    assert received.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert received.headers["Authorization"] == f"Basic {BASIC}"
    assert received.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert received.body == {"To": RECIPIENT, "Body": "Ünïcode & symbols: 100%", "From": FROM_NUMBER}
    assert fake.messages[0]["status"] == "queued"


async def test_wire_format_with_messaging_service_and_status_callback(fake: FakeTwilio) -> None:
    client = TwilioProvider(
        ACCOUNT_SID,
        AUTH_TOKEN,
        messaging_service_sid=SERVICE_SID,
        status_callback_url=CALLBACK_URL,
        base_url=fake.base_url,
        timeout_s=TIMEOUT_S,
    )
    try:
        result = await client.send(sms_event())
    finally:
        await client.close()

    assert result.provider_message_id == fake.messages[0]["sid"]
    assert fake.received[0].body == {
        "To": RECIPIENT,
        "Body": "Your code is 123456",
        "MessagingServiceSid": SERVICE_SID,
        "StatusCallback": CALLBACK_URL,
    }
    assert fake.messages[0]["status"] == "accepted"


async def test_repr_hides_the_token(provider: TwilioProvider) -> None:
    assert AUTH_TOKEN not in repr(provider)
    assert "redacted" in repr(provider)
    assert provider.name == "twilio"


def test_a_sender_is_required() -> None:
    with pytest.raises(ValueError, match="from_number or messaging_service_sid"):
        TwilioProvider(ACCOUNT_SID, AUTH_TOKEN)


# --- Twilio error codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        pytest.param(21211, 400, id="21211-invalid-to"),
        pytest.param(21614, 400, id="21614-not-mobile"),
        pytest.param(21610, 400, id="21610-unsubscribed"),
        pytest.param(21408, 400, id="21408-region-permission"),
        pytest.param(21606, 400, id="21606-invalid-from"),
        pytest.param(21659, 400, id="21659-from-not-twilio"),
        pytest.param(20003, 401, id="20003-authentication"),
        pytest.param(21999, 400, id="unknown-4xx"),
    ],
)
async def test_documented_refusals_are_permanent(
    fake: FakeTwilio, provider: TwilioProvider, code: int, status: int
) -> None:
    fake.inject(FakeTwilio.error(code, status, message=f"refused with {code}"))

    error = await send_failure(provider)

    assert isinstance(error, PermanentDeliveryError)
    assert f"Twilio {code} (HTTP {status})" in error.reason
    assert f"refused with {code}" in error.reason
    assert not is_ambiguous(error)
    assert fake.received == []


async def test_wrong_auth_token_is_permanent(fake: FakeTwilio) -> None:
    wrong = "0" * 32
    client = TwilioProvider(
        ACCOUNT_SID, wrong, from_number=FROM_NUMBER, base_url=fake.base_url, timeout_s=TIMEOUT_S
    )
    try:
        error = await send_failure(client)
    finally:
        await client.close()
    assert isinstance(error, PermanentDeliveryError)
    assert "20003" in error.reason
    assert wrong not in error.reason


async def test_20429_is_retryable_with_retry_after(fake: FakeTwilio, provider: TwilioProvider) -> None:
    fake.inject(FakeTwilio.error(20429, 429, "Too Many Requests", headers={"Retry-After": "3"}))
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert error.retry_after_s == 3.0
    assert not is_ambiguous(error)


async def test_plain_429_is_retryable_with_retry_after(fake: FakeTwilio, provider: TwilioProvider) -> None:
    fake.inject(Fault.rate_limited(retry_after_s=5))
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert error.retry_after_s == 5.0
    assert not is_ambiguous(error)


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_retryable_and_ambiguous(
    fake: FakeTwilio, provider: TwilioProvider, status: int
) -> None:
    fake.inject(Fault.http_status(status))
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert error.reason.startswith(AMBIGUOUS_PREFIX)
    assert f"HTTP {status}" in error.reason


async def test_provider_text_echoing_the_token_is_scrubbed(
    fake: FakeTwilio, provider: TwilioProvider
) -> None:
    fake.inject(FakeTwilio.error(20003, 401, message=f"bad token {AUTH_TOKEN}"))
    error = await send_failure(provider)
    assert "<redacted>" in error.reason


# --- transport faults and the duplicate window -------------------------------------------------


async def test_slow_answer_past_the_timeout_is_retryable_and_ambiguous(
    fake: FakeTwilio, provider: TwilioProvider
) -> None:
    fake.inject(Fault.slow(delay_s=TIMEOUT_S * 3))
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert is_ambiguous(error)
    assert "ReadTimeout" in error.reason
    # The fake, like Twilio, still creates the Message after the client gave up.
    for _ in range(100):
        if fake.messages:
            break
        await asyncio.sleep(0.05)
    assert len(fake.messages) == 1


async def test_connection_reset_is_retryable_and_ambiguous(
    fake: FakeTwilio, provider: TwilioProvider
) -> None:
    fake.inject(Fault.reset())
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert is_ambiguous(error)


async def test_malformed_answer_is_retryable_and_ambiguous(
    fake: FakeTwilio, provider: TwilioProvider
) -> None:
    fake.inject(Fault.malformed())
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert is_ambiguous(error)


async def test_201_without_sid_is_retryable_and_ambiguous(fake: FakeTwilio, provider: TwilioProvider) -> None:
    fake.inject(Fault.http_status(201, body="{}"))
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert is_ambiguous(error)


async def test_lost_response_is_the_duplicate_window(fake: FakeTwilio, provider: TwilioProvider) -> None:
    """Twilio created the Message but the 201 was lost: ambiguous, and the retry creates a second one."""
    fake.inject(Fault.lost_response())
    event = sms_event()
    error = await send_failure(provider, event)
    assert isinstance(error, RetryableDeliveryError)
    assert is_ambiguous(error)
    assert len(fake.messages) == 1

    await provider.send(event)
    assert len(fake.messages) == 2
    assert fake.received[0].body == fake.received[1].body


async def test_connection_refused_is_retryable_and_not_ambiguous() -> None:
    client = TwilioProvider(
        ACCOUNT_SID,
        AUTH_TOKEN,
        from_number=FROM_NUMBER,
        base_url=f"http://127.0.0.1:{free_port()}",
        timeout_s=TIMEOUT_S,
    )
    try:
        error = await send_failure(client)
    finally:
        await client.close()
    assert isinstance(error, RetryableDeliveryError)
    assert not is_ambiguous(error)
    assert "not sent" in error.reason


# --- local checks, lifecycle, the fake's own wire checks ----------------------------------------


async def test_invalid_recipient_is_permanent_without_a_request(
    fake: FakeTwilio, provider: TwilioProvider
) -> None:
    error = await send_failure(provider, sms_event(recipient="4155550123"))
    assert isinstance(error, PermanentDeliveryError)
    assert fake.requests_seen == 0


async def test_send_after_close_is_retryable(fake: FakeTwilio, provider: TwilioProvider) -> None:
    await provider.close()
    await provider.close()
    error = await send_failure(provider)
    assert isinstance(error, RetryableDeliveryError)
    assert fake.requests_seen == 0


@pytest.mark.parametrize(
    ("form", "code"),
    [
        pytest.param({"Body": "hi", "From": FROM_NUMBER}, 21604, id="missing-to"),
        pytest.param({"To": "4155550123", "Body": "hi", "From": FROM_NUMBER}, 21211, id="to-not-e164"),
        pytest.param({"To": RECIPIENT, "Body": "", "From": FROM_NUMBER}, 21602, id="empty-body"),
        pytest.param({"To": RECIPIENT, "Body": "hi"}, 21603, id="no-sender"),
        pytest.param({"To": RECIPIENT, "Body": "hi", "From": "+0"}, 21212, id="bad-from"),
        pytest.param({"To": RECIPIENT, "Body": "hi", "MessagingServiceSid": "MG1"}, 21701, id="bad-service"),
        pytest.param(
            {"To": RECIPIENT, "Body": "hi", "From": FROM_NUMBER, "StatusCallback": "ftp://x"},
            21609,
            id="bad-callback",
        ),
    ],
)
async def test_fake_refuses_a_bad_form(fake: FakeTwilio, form: dict[str, str], code: int) -> None:
    async with httpx.AsyncClient(base_url=fake.base_url, auth=(ACCOUNT_SID, AUTH_TOKEN)) as client:
        response = await client.post(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", data=form)
    assert response.status_code == 400
    assert response.json()["code"] == code
    assert fake.received == []


async def test_fake_checks_auth_method_and_content_type(fake: FakeTwilio) -> None:
    path = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    form = {"To": RECIPIENT, "Body": "hi", "From": FROM_NUMBER}
    async with httpx.AsyncClient(base_url=fake.base_url) as client:
        anonymous = await client.post(path, data=form)
        other_account = await client.post(
            f"/2010-04-01/Accounts/AC{'1' * 32}/Messages.json", data=form, auth=(ACCOUNT_SID, AUTH_TOKEN)
        )
        as_json = await client.post(path, json=form, auth=(ACCOUNT_SID, AUTH_TOKEN))
        get = await client.get(path, auth=(ACCOUNT_SID, AUTH_TOKEN))
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, 20003)
    assert (other_account.status_code, other_account.json()["code"]) == (401, 20003)
    assert as_json.status_code == 400
    assert get.status_code == 405
    assert fake.received == []


# --- a tenant's StatusCallback, configured through the admin API -------------------------------


def twilio_config(status_callback_url: str = "", base_url: str = "") -> tenants_pb2.ProviderConfig:
    return tenants_pb2.ProviderConfig(
        twilio=tenants_pb2.TwilioConfig(
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            from_number=FROM_NUMBER,
            base_url=base_url,
            status_callback_url=status_callback_url,
        )
    )


async def test_a_tenants_status_callback_reaches_twilio_only_when_configured(
    fake: FakeTwilio, gateway: Gateway, pool: asyncpg.Pool, settings: Settings, tenant: TenantCredentials
) -> None:
    providers = tenant_providers(pool, settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        admin = tenants_pb2_grpc.TenantAdminServiceStub(channel)

        async def configure_and_send(status_callback_url: str) -> dict[str, str]:
            reply = await admin.SetProviderConfig(
                tenants_pb2.SetProviderConfigRequest(
                    request_id=new_request_id(),
                    tenant_id=str(tenant.tenant_id),
                    channel=notify_pb2.CHANNEL_SMS,
                    config=twilio_config(status_callback_url, fake.base_url),
                ),
                metadata=OPERATOR,
            )
            assert reply.config.settings["status_callback_url"] == status_callback_url  # shown: not a secret
            providers.invalidate(tenant.tenant_id)  # what the change notification does in a worker
            provider = await providers.provider_for(tenant.tenant_id, "sms")
            await provider.send(sms_event())
            body: dict[str, str] = fake.received[-1].body
            return body

        try:
            with_callback = await configure_and_send(CALLBACK_URL)
            without_callback = await configure_and_send("")
        finally:
            await providers.close()
    assert with_callback["StatusCallback"] == CALLBACK_URL
    assert "StatusCallback" not in without_callback
    assert without_callback == {"To": RECIPIENT, "Body": "Your code is 123456", "From": FROM_NUMBER}


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/twilio",  # cleartext to a public host
        "https://my_hooks.example.com/twilio",  # Twilio refuses underscores (21609)
        "https://user:pass@hooks.example.com/twilio",  # credentials would show on reads
        "https://hooks.example.com/twilio#frag",
        "ftp://hooks.example.com/twilio",
        "https:///no-host",
        "https://hooks.example.com/" + "a" * 2048,
        "https://hooks.example.com/with space",
    ],
)
def test_an_unacceptable_status_callback_url_is_refused_naming_the_field(url: str) -> None:
    with pytest.raises(RequestInvalid) as caught:
        split_provider_config("sms", twilio_config(url))
    assert [v.field for v in caught.value.violations] == ["config.twilio.status_callback_url"]


@pytest.mark.parametrize(
    "url",
    [
        CALLBACK_URL,
        "http://127.0.0.1:8080/twilio/status",  # loopback: a local fake
        "http://[::1]:8080/twilio/status",
        "http://localhost/twilio/status",
    ],
)
def test_https_and_loopback_http_status_callback_urls_are_accepted(url: str) -> None:
    split = split_provider_config("sms", twilio_config(url))
    assert split.settings["status_callback_url"] == url
    assert "status_callback_url" not in split.secrets
