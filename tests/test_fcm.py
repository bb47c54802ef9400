"""Push through FCM HTTP v1 with firebase-admin, against the fake FCM and OAuth2 endpoints.

firebase-admin runs unmodified apart from its FCM endpoint base (one private instance
attribute per app, channels/fcm.py ``point_messaging_at``). The fake (switchboard/fakes/fcm.py)
runs on its own event loop in a thread, so a token refresh that blocked the calling loop (as the
SDK's own auth flow does after a 401) would stall that loop, not deadlock it, and show up in the
loop-gap measurements. Every request goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import firebase_admin  # type: ignore[import-untyped]
import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from firebase_admin import exceptions as firebase_exceptions
from firebase_admin import messaging

import channels.fcm
from channels.fcm import (
    FcmProvider,
    InMemoryInvalidTokenStore,
    classify_fcm_error,
    fcm_send_url,
    point_messaging_at,
)
from channels.provider import (
    DeliveryError,
    PermanentDeliveryError,
    Provider,
    RetryableDeliveryError,
    SendResult,
)
from switchboard.fakes.fcm import FCM_ERROR_TYPE, GRANT_AUDIENCE, JWT_BEARER, FakeFcm, serving_in_thread
from switchboard.fakes.http import Fault, Received
from switchboard.notify.v1 import events_pb2, notify_pb2
from tenants.firebase_apps import app_name, delete_app, get_or_create_app
from tenants.provider_cache import ProviderCache
from tests.helpers import max_loop_gap, record_firebase_app_names, wait_for

PROJECT = "acme-push"
SDK_FCM_URL = "https://fcm.googleapis.com/v1/projects/{0}/messages:send"
SCOPE_CLOUD = "https://www.googleapis.com/auth/cloud-platform"


def new_token() -> str:
    """Something shaped like an FCM registration token (``<instance id>:APA91b...``)."""
    return f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(100)}"


def push_event(
    tenant_id: uuid.UUID,
    token: str,
    *,
    title: str = "Order shipped",
    body: str = "Your order 42 is on its way",
    data: dict[str, str] | None = None,
) -> events_pb2.DeliveryRequested:
    """A push DeliveryRequested for ``token``."""
    event = events_pb2.DeliveryRequested(
        delivery_id=str(uuid.uuid4()),
        notification_id=str(uuid.uuid4()),
        tenant_id=str(tenant_id),
        channel=notify_pb2.CHANNEL_PUSH,
        recipient=token,
        push=notify_pb2.PushContent(title=title, body=body),
    )
    event.push.data.update(data if data is not None else {"order_id": "42"})
    return event


def lower_headers(received: Received) -> dict[str, str]:
    return {name.lower(): value for name, value in received.headers.items()}


def app_of(provider: FcmProvider) -> Any:
    """The provider's own Firebase app (raises ValueError if it has none)."""
    return firebase_admin.get_app(provider.app_name)


async def _delete_tenant_app(tenant_id: uuid.UUID) -> None:
    """Delete the tenant's generation-0 app (made with get_or_create_app directly), if any."""
    try:
        app = firebase_admin.get_app(app_name(tenant_id))
    except ValueError:
        return
    await delete_app(app)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
#: google-auth >= 2.62 would look up the service account's Regional Access Boundary at
#: https://iamcredentials.googleapis.com/.../allowedLocations in a background thread after a
#: token is used; tenants/firebase_apps.keep_off_google_when_not_google prevents that for
#: non-Google token endpoints, so no lookup at all may happen here.
REFUSED_LOOKUPS_EXPECTED: frozenset[str] = frozenset()


@pytest.fixture(scope="module", autouse=True)
def loopback_only() -> Iterator[list[str]]:
    """Refuse name resolution of anything but loopback while this module runs (every thread).

    Yields the refused host names; afterwards only the expected google-auth lookup may be among them.
    """
    refused: list[str] = []
    resolve = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in LOOPBACK_HOSTS:
            refused.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"no network beyond loopback here ({name})")
        return resolve(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", guarded)
        yield refused
    assert set(refused) <= REFUSED_LOOKUPS_EXPECTED, refused


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeFcm]:
    """FCM + OAuth2 token endpoint on 127.0.0.1, on its own loop, for the module."""
    with serving_in_thread(FakeFcm()) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_fake(fake: FakeFcm) -> Iterator[None]:
    """No scripted errors, faults or grant refusals carried between tests."""
    fake.clear()
    yield
    fake.clear()
    fake.token_delay_s = 0.0


@pytest.fixture
async def tenant_id() -> AsyncIterator[uuid.UUID]:
    """A tenant whose Firebase app (if any) is deleted after the test."""
    tenant = uuid.uuid4()
    yield tenant
    await _delete_tenant_app(tenant)


@pytest.fixture
def service_account(fake: FakeFcm) -> dict[str, Any]:
    """A fresh service account of project ``acme-push``, known to the fake."""
    return fake.service_account(PROJECT)


@pytest.fixture
def invalid_tokens() -> InMemoryInvalidTokenStore:
    return InMemoryInvalidTokenStore()


@pytest.fixture
async def provider(
    fake: FakeFcm,
    tenant_id: uuid.UUID,
    service_account: dict[str, Any],
    invalid_tokens: InMemoryInvalidTokenStore,
) -> AsyncIterator[FcmProvider]:
    """The tenant's FCM provider pointed at the fake."""
    fcm = FcmProvider(tenant_id, service_account, endpoint_base=fake.base_url, invalid_tokens=invalid_tokens)
    yield fcm
    await fcm.close()


# -- success ---------------------------------------------------------------------------


async def test_send_reaches_the_fake_with_its_token_and_the_documented_body(
    fake: FakeFcm, provider: FcmProvider, tenant_id: uuid.UUID, service_account: dict[str, Any]
) -> None:
    token = new_token()

    result = await provider.send(push_event(tenant_id, token, data={"order_id": "42", "kind": "shipping"}))

    assert isinstance(result, SendResult)
    assert re.fullmatch(rf"projects/{PROJECT}/messages/\S+", result.provider_message_id)
    [request] = [r for r in fake.received if r.body["message"].get("token") == token]
    assert request.method == "POST"
    assert request.path == f"/v1/projects/{PROJECT}/messages:send"
    assert request.body == {
        "message": {
            "token": token,
            "notification": {"title": "Order shipped", "body": "Your order 42 is on its way"},
            "data": {"order_id": "42", "kind": "shipping"},
        }
    }
    headers = lower_headers(request)
    assert headers["x-firebase-client"].startswith("fire-admin-python/")  # the SDK itself sent it
    scheme, access_token = headers["authorization"].split(" ")
    assert scheme == "Bearer"
    issued = fake.issued[access_token]  # a token the fake's /token endpoint issued
    assert (issued.client_email, issued.project_id) == (service_account["client_email"], PROJECT)
    [grant] = [g for g in fake.grants if g.access_token == access_token]
    assert grant.claims["iss"] == service_account["client_email"]
    assert grant.claims["aud"] == GRANT_AUDIENCE
    assert SCOPE_CLOUD in grant.claims["scope"].split()

    app = app_of(provider)
    assert app.name == provider.app_name
    assert app.name.startswith(f"switchboard-tenant-{tenant_id}-")
    assert app.credential.get_credential().token == access_token
    # Unmodified library: the class constant is Google's; only this app's service instance moved.
    assert messaging._MessagingService.FCM_URL == SDK_FCM_URL
    assert (
        messaging._get_messaging_service(app)._fcm_url
        == f"{fake.base_url}/v1/projects/{PROJECT}/messages:send"
    )
    assert provider.send_url == fcm_send_url(fake.base_url, PROJECT)


async def test_notification_and_data_are_left_out_when_empty(
    fake: FakeFcm, provider: FcmProvider, tenant_id: uuid.UUID
) -> None:
    data_only, bare, title_only = new_token(), new_token(), new_token()

    await provider.send(push_event(tenant_id, data_only, title="", body="", data={"sync": "1"}))
    await provider.send(push_event(tenant_id, bare, title="", body="", data={}))
    await provider.send(push_event(tenant_id, title_only, body="", data={}))

    bodies = {r.body["message"]["token"]: r.body for r in fake.received}
    assert bodies[data_only] == {"message": {"token": data_only, "data": {"sync": "1"}}}
    assert bodies[bare] == {"message": {"token": bare}}
    assert bodies[title_only] == {
        "message": {"token": title_only, "notification": {"title": "Order shipped"}}
    }


async def test_the_first_send_stays_off_the_event_loop(fake: FakeFcm, provider: FcmProvider) -> None:
    # The first send creates the app and its messaging service and fetches a token (500 ms here):
    # all of it off the loop, which keeps ticking every 10 ms. Worker threads holding the GIL
    # can still delay a tick by some tens of ms; a refresh on the loop would stall it >= 500 ms.
    fake.token_delay_s = 0.5
    started = time.perf_counter()
    _, gap = await max_loop_gap(lambda: provider.send(push_event(provider.tenant_id, new_token())))
    elapsed = time.perf_counter() - started

    print(f"\nfirst send {elapsed * 1000:.0f} ms (500 ms token grant), longest loop gap {gap * 1000:.1f} ms")
    assert elapsed >= 0.5
    # Well under the 500 ms an on-loop refresh would stall it, with room for a loaded CI machine.
    assert gap < 0.4, f"the loop stalled for {gap * 1000:.0f} ms"


async def test_a_401_refreshes_the_token_off_the_event_loop(
    fake: FakeFcm, provider: FcmProvider, tenant_id: uuid.UUID
) -> None:
    # FCM answers 401 when it no longer takes the access token (revoked, or expired early);
    # the SDK then refreshes the token and resends. That refresh is a blocking google-auth
    # POST: with the token endpoint taking 500 ms, the loop must keep ticking meanwhile.
    await provider.send(push_event(tenant_id, new_token()))  # app, messaging client and token ready
    grants_before = len(fake.grants)
    fake.token_delay_s = 0.5
    fake.inject(Fault.http_status(401))
    token = new_token()

    result, gap = await max_loop_gap(lambda: provider.send(push_event(tenant_id, token)))

    print(f"\n401 -> token refresh (500 ms grant) -> resend: longest event-loop gap {gap * 1000:.1f} ms")
    assert result.provider_message_id.startswith(f"projects/{PROJECT}/messages/")
    first, second = fake.sends_to(token)
    assert len(fake.grants) == grants_before + 1
    assert lower_headers(first)["authorization"] != lower_headers(second)["authorization"]
    assert lower_headers(second)["authorization"] == f"Bearer {fake.grants[-1].access_token}"
    assert gap < 0.4, f"the loop stalled for {gap * 1000:.0f} ms"


async def test_401s_of_a_whole_batch_share_one_token_refresh(
    fake: FakeFcm, provider: FcmProvider, tenant_id: uuid.UUID
) -> None:
    # 20 sends go out at once with the same token and all come back 401: one refresh for all of
    # them (the SDK's own flow would run 20 refreshes one after the other on the loop).
    await provider.send(push_event(tenant_id, new_token()))
    grants_before = len(fake.grants)
    fake.token_delay_s = 0.3
    events = [push_event(tenant_id, new_token()) for _ in range(20)]
    fake.inject(*[Fault.http_status(401) for _ in events])

    outcomes, gap = await max_loop_gap(lambda: provider.send_batch(events))

    assert all(isinstance(outcome, SendResult) for outcome in outcomes), outcomes
    assert len(fake.grants) == grants_before + 1
    assert all(len(fake.sends_to(e.recipient)) == 2 for e in events)
    assert gap < 0.25, f"the loop stalled for {gap * 1000:.0f} ms"


# -- the error table -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One FCM answer and how the provider must take it."""

    code: str
    retryable: bool
    token_invalid: bool = False
    retry_after_s: float | None = None
    header_s: int | None = None  # Retry-After sent by the fake
    requests: int = 1  # sends reaching the fake (the SDK retries 500/503 and re-auths on 401)
    http_status: int | None = None
    canonical: str | None = None
    data: tuple[tuple[str, str], ...] = ()  # the push data (a reserved key: payload error)


ERROR_TABLE = [
    # https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode
    Row("UNREGISTERED", retryable=False, token_invalid=True),
    Row("SENDER_ID_MISMATCH", retryable=False, token_invalid=True),
    Row("INVALID_ARGUMENT", retryable=False, token_invalid=True),  # FcmError + BadRequest message.token
    Row("INVALID_ARGUMENT", retryable=False, token_invalid=False, data=(("from", "x"),)),  # payload
    Row("THIRD_PARTY_AUTH_ERROR", retryable=False, requests=3),  # 401: SDK refreshes twice, resends
    Row("QUOTA_EXCEEDED", retryable=True, retry_after_s=30, header_s=30),
    Row("QUOTA_EXCEEDED", retryable=True, retry_after_s=60),  # no header: "minimum 1 minute"
    Row("UNAVAILABLE", retryable=True, retry_after_s=7, header_s=7, requests=5),  # SDK: 4 retries
    Row("INTERNAL", retryable=True, requests=5),
    Row("UNSPECIFIED_ERROR", retryable=True, requests=5),  # 500 UNKNOWN
    Row("A_CODE_FROM_THE_FUTURE", retryable=True, http_status=409, canonical="ABORTED"),  # unknown
]


async def test_every_fcm_error_code_is_classified(
    fake: FakeFcm, provider: FcmProvider, tenant_id: uuid.UUID, invalid_tokens: InMemoryInvalidTokenStore
) -> None:
    tokens = [new_token() for _ in ERROR_TABLE]
    for row, token in zip(ERROR_TABLE, tokens, strict=True):
        if not row.data:
            fake.fail_token(
                token,
                row.code,
                retry_after_s=row.header_s,
                http_status=row.http_status,
                canonical=row.canonical,
            )
    events = [
        push_event(tenant_id, token, data=dict(row.data) or None)
        for row, token in zip(ERROR_TABLE, tokens, strict=True)
    ]

    # Concurrently: the SDK's own 500/503 retries take about 7 s each.
    outcomes = await asyncio.gather(*(provider.send(e) for e in events), return_exceptions=True)

    for row, token, outcome in zip(ERROR_TABLE, tokens, outcomes, strict=True):
        label = f"{row.code} {dict(row.data) or ''}"
        assert isinstance(outcome, DeliveryError), f"{label}: {outcome!r}"
        expected = RetryableDeliveryError if row.retryable else PermanentDeliveryError
        assert type(outcome) is expected, f"{label}: {outcome!r}"
        assert outcome.retry_after_s == row.retry_after_s, f"{label}: {outcome.retry_after_s}"
        assert outcome.reason.startswith(f"FCM {row.code} ("), f"{label}: {outcome.reason}"
        assert token not in outcome.reason
        assert await invalid_tokens.is_invalid(tenant_id, token) is row.token_invalid, label
        if row.token_invalid:
            assert invalid_tokens.reason(tenant_id, token) == row.code
        assert len(fake.sends_to(token)) == row.requests, label


async def test_transport_faults_and_rate_limits(
    fake: FakeFcm, tenant_id: uuid.UUID, service_account: dict[str, Any]
) -> None:
    provider = FcmProvider(tenant_id, service_account, endpoint_base=fake.base_url, timeout_s=1.0)
    try:
        await provider.send(push_event(tenant_id, new_token()))  # token fetched; faults hit sends only

        fake.inject(Fault.rate_limited(retry_after_s=3))
        with pytest.raises(RetryableDeliveryError) as rate_limited:
            await provider.send(push_event(tenant_id, new_token()))
        assert rate_limited.value.retry_after_s == 3
        assert "RESOURCE_EXHAUSTED" in rate_limited.value.reason

        token = new_token()
        fake.inject(Fault.http_status(503))  # one 503: the SDK retries it itself
        assert (await provider.send(push_event(tenant_id, token))).provider_message_id
        assert len(fake.sends_to(token)) == 2

        for fault in (Fault.reset(), Fault.malformed(), Fault.slow(2.0)):
            fake.inject(fault)
            with pytest.raises(RetryableDeliveryError):
                await provider.send(push_event(tenant_id, new_token()))

        token = new_token()
        fake.inject(Fault.lost_response())  # accepted, answer lost: retryable, so the worker sends it again
        with pytest.raises(RetryableDeliveryError):
            await provider.send(push_event(tenant_id, token))
        assert [r.body["message"]["token"] for r in fake.received[-1:]] == [token]
    finally:
        await provider.close()


async def test_a_refused_token_grant_is_permanent(
    fake: FakeFcm, provider: FcmProvider, tenant_id: uuid.UUID
) -> None:
    fake.grant_error = "invalid_grant"  # e.g. the key was deleted in the Google Cloud console
    token = new_token()

    with pytest.raises(PermanentDeliveryError, match="token endpoint refused"):
        await provider.send(push_event(tenant_id, token))
    assert fake.sends_to(token) == []


async def test_retry_after_as_an_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    response = httpx.Response(
        503,
        headers={"Retry-After": format_datetime(when, usegmt=True)},
        json={"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}},
    )
    error = firebase_exceptions.UnavailableError("overloaded", http_response=response)

    classified = classify_fcm_error(error).error

    assert isinstance(classified, RetryableDeliveryError)
    assert classified.retry_after_s is not None
    assert 110 <= classified.retry_after_s <= 120


@pytest.mark.parametrize(
    ("details", "token_invalid"),
    [
        # https://firebase.google.com/docs/cloud-messaging/error-codes, example 2: the token.
        ([{"@type": FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"}], True),
        # Example 1: a data value, named by a google.rpc.BadRequest field violation.
        (
            [
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "message.data[0].value", "description": "TYPE_STRING"}],
                }
            ],
            False,
        ),
        ([], False),  # no details at all (e.g. the payload is too big)
    ],
)
async def test_invalid_argument_marks_the_token_only_when_it_names_it(
    details: list[dict[str, Any]], token_invalid: bool
) -> None:
    body = {"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT", "details": details}}
    error = firebase_exceptions.InvalidArgumentError("bad", http_response=httpx.Response(400, json=body))

    classified = classify_fcm_error(error)

    assert isinstance(classified.error, PermanentDeliveryError)
    assert classified.token_invalid is token_invalid


# -- invalid tokens ---------------------------------------------------------------------


async def test_an_unregistered_token_fails_fast_afterwards(
    fake: FakeFcm,
    provider: FcmProvider,
    tenant_id: uuid.UUID,
    invalid_tokens: InMemoryInvalidTokenStore,
) -> None:
    token = new_token()
    fake.fail_token(token, "UNREGISTERED")

    with pytest.raises(PermanentDeliveryError, match="UNREGISTERED"):
        await provider.send(push_event(tenant_id, token))
    assert invalid_tokens.reason(tenant_id, token) == "UNREGISTERED"

    requests_before, grants_before = fake.requests_seen, len(fake.grants)
    with pytest.raises(PermanentDeliveryError, match="earlier"):
        await provider.send(push_event(tenant_id, token))
    assert fake.requests_seen == requests_before  # nothing reached the fake
    assert len(fake.grants) == grants_before
    assert len(fake.sends_to(token)) == 1

    # Per tenant: another tenant (sharing the store) still tries the same token.
    other_tenant = uuid.uuid4()
    other = FcmProvider(
        other_tenant,
        fake.service_account("other-push"),
        endpoint_base=fake.base_url,
        invalid_tokens=invalid_tokens,
    )
    try:
        fake.clear()
        assert (await other.send(push_event(other_tenant, token))).provider_message_id
    finally:
        await other.close()


# -- batches ---------------------------------------------------------------------------


async def test_send_batch_with_mixed_outcomes(
    fake: FakeFcm,
    provider: FcmProvider,
    tenant_id: uuid.UUID,
    invalid_tokens: InMemoryInvalidTokenStore,
) -> None:
    ok_1, unregistered, quota, known_bad, ok_2, foreign = (new_token() for _ in range(6))
    fake.fail_token(unregistered, "UNREGISTERED")
    fake.fail_token(quota, "QUOTA_EXCEEDED", retry_after_s=5)
    await invalid_tokens.mark_invalid(tenant_id, known_bad, "UNREGISTERED")
    email = events_pb2.DeliveryRequested(
        delivery_id=str(uuid.uuid4()),
        tenant_id=str(tenant_id),
        channel=notify_pb2.CHANNEL_EMAIL,
        recipient="someone@example.com",
        email=notify_pb2.EmailContent(subject="s", text="t"),
    )
    events = [
        push_event(tenant_id, ok_1),
        push_event(tenant_id, unregistered),
        push_event(tenant_id, quota),
        push_event(tenant_id, known_bad),
        push_event(tenant_id, ok_2),
        push_event(uuid.uuid4(), foreign),  # another tenant's delivery
        email,
    ]

    outcomes = await provider.send_batch(events)

    assert len(outcomes) == len(events)
    first, second = outcomes[0], outcomes[4]
    assert isinstance(first, SendResult)
    assert isinstance(second, SendResult)
    assert first.provider_message_id != second.provider_message_id
    assert isinstance(outcomes[1], PermanentDeliveryError)
    assert "UNREGISTERED" in outcomes[1].reason
    assert isinstance(outcomes[2], RetryableDeliveryError)
    assert outcomes[2].retry_after_s == 5
    assert isinstance(outcomes[3], PermanentDeliveryError)
    assert "earlier" in outcomes[3].reason
    assert isinstance(outcomes[5], PermanentDeliveryError)
    assert "another tenant" in outcomes[5].reason
    assert isinstance(outcomes[6], PermanentDeliveryError)
    assert "not a push delivery" in outcomes[6].reason
    assert await invalid_tokens.is_invalid(tenant_id, unregistered)
    sent = {r.body["message"]["token"] for r in fake.attempts if isinstance(r.body, dict)}
    assert {ok_1, unregistered, quota, ok_2} <= sent
    assert not {known_bad, foreign} & sent

    assert await provider.send_batch([]) == []
    with pytest.raises(ValueError, match="at most 500"):
        await provider.send_batch([push_event(tenant_id, ok_1)] * 501)


# -- apps, endpoints, lifecycle ---------------------------------------------------------


async def test_two_tenants_get_two_apps_at_two_endpoints(fake: FakeFcm) -> None:
    tenant_a, tenant_b, tenant_c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    token_a, token_b = new_token(), new_token()
    with serving_in_thread(FakeFcm()) as other:
        provider_a = FcmProvider(tenant_a, fake.service_account("tenant-a"), endpoint_base=fake.base_url)
        provider_b = FcmProvider(tenant_b, other.service_account("tenant-b"), endpoint_base=other.base_url)
        try:
            result_a, result_b = await asyncio.gather(
                provider_a.send(push_event(tenant_a, token_a)), provider_b.send(push_event(tenant_b, token_b))
            )
            app_a, app_b = app_of(provider_a), app_of(provider_b)

            assert result_a.provider_message_id.startswith("projects/tenant-a/messages/")
            assert result_b.provider_message_id.startswith("projects/tenant-b/messages/")
            assert [r.path for r in fake.sends_to(token_a)] == ["/v1/projects/tenant-a/messages:send"]
            assert [r.path for r in other.sends_to(token_b)] == ["/v1/projects/tenant-b/messages:send"]
            assert fake.sends_to(token_b) == []
            assert other.sends_to(token_a) == []
            assert app_a is not app_b
            service_a, service_b = (messaging._get_messaging_service(a) for a in (app_a, app_b))
            assert service_a is not service_b
            assert service_a._fcm_url == f"{fake.base_url}/v1/projects/tenant-a/messages:send"
            assert service_b._fcm_url == f"{other.base_url}/v1/projects/tenant-b/messages:send"

            # A tenant on Google's endpoint: its app keeps the SDK's URL; the others are untouched.
            app_c = await get_or_create_app(tenant_c, make_google_account("tenant-c"))
            assert point_messaging_at(app_c, "") == SDK_FCM_URL.format("tenant-c")
            assert messaging._get_messaging_service(app_c)._fcm_url == SDK_FCM_URL.format("tenant-c")
            assert service_a._fcm_url.startswith(fake.base_url)
            assert messaging._MessagingService.FCM_URL == SDK_FCM_URL
        finally:
            await provider_a.close()
            await provider_b.close()
            await _delete_tenant_app(tenant_c)
    for provider in (provider_a, provider_b):
        with pytest.raises(ValueError, match="does not exist"):
            app_of(provider)
    with pytest.raises(ValueError, match="does not exist"):
        firebase_admin.get_app(app_name(tenant_c))


def make_google_account(project_id: str) -> dict[str, Any]:
    """A service account with Google's token_uri (never used for a request here)."""
    from switchboard.fakes.fcm import make_service_account

    return make_service_account("https://oauth2.googleapis.com/token", project_id)


async def test_close_deletes_the_app(fake: FakeFcm, provider: FcmProvider, tenant_id: uuid.UUID) -> None:
    await provider.send(push_event(tenant_id, new_token()))
    app = app_of(provider)
    service = messaging._get_messaging_service(app)

    await provider.close()

    with pytest.raises(ValueError, match="does not exist"):
        app_of(provider)
    assert service._async_client.async_client.is_closed
    await provider.close()  # idempotent
    requests_before = fake.requests_seen
    with pytest.raises(RetryableDeliveryError, match="closed"):
        await provider.send(push_event(tenant_id, new_token()))
    assert fake.requests_seen == requests_before
    with pytest.raises(ValueError, match="does not exist"):
        app_of(provider)  # a closed provider does not bring the app back


async def test_an_app_deleted_during_a_send_is_retryable(
    provider: FcmProvider, tenant_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def deleted_meanwhile(app: Any) -> None:  # e.g. the cache closed the provider
        await delete_app(app)

    monkeypatch.setattr(channels.fcm, "ensure_access_token", deleted_meanwhile)

    with pytest.raises(RetryableDeliveryError, match="went away"):
        await provider.send(push_event(tenant_id, new_token()))


async def test_it_is_a_provider(fake: FakeFcm, tenant_id: uuid.UUID, service_account: dict[str, Any]) -> None:
    provider: Provider = FcmProvider(tenant_id, service_account, endpoint_base=fake.base_url)
    assert provider.name == "fcm"
    assert "private_key" not in repr(provider)
    await provider.close()  # never used: nothing to delete

    with pytest.raises(ValueError, match="endpoint_base"):
        FcmProvider(tenant_id, service_account, endpoint_base="fcm.example.com")
    with pytest.raises(ValueError, match="project_id"):
        FcmProvider(tenant_id, {"type": "service_account"})


async def test_an_unusable_service_account_is_permanent(fake: FakeFcm, tenant_id: uuid.UUID) -> None:
    provider = FcmProvider(
        tenant_id,
        {"type": "service_account", "project_id": "p", "private_key": "nope"},
        endpoint_base=fake.base_url,
    )
    with pytest.raises(PermanentDeliveryError, match="service account is invalid"):
        await provider.send(push_event(tenant_id, new_token()))
    await provider.close()


# -- behind the provider cache ------------------------------------------------------------


@pytest.fixture
def initialized(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the apps firebase_admin.initialize_app creates during the test, in order."""
    return record_firebase_app_names(monkeypatch, "initialize_app")


@pytest.fixture
def deleted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the apps firebase_admin.delete_app deletes during the test (from any thread)."""
    return record_firebase_app_names(monkeypatch, "delete_app")


class FcmCache:
    """A ProviderCache whose loader builds real FcmProviders for the fake (one per load)."""

    def __init__(self, fake: FakeFcm, service_account: dict[str, Any], **options: Any) -> None:
        self.built: list[FcmProvider] = []
        self.now = 0.0

        async def load(tenant_id: uuid.UUID, channel: str) -> Provider:
            assert channel == "push"
            provider = FcmProvider(tenant_id, service_account, endpoint_base=fake.base_url)
            self.built.append(provider)
            return provider

        self.cache = ProviderCache(load, timer=lambda: self.now, **options)

    async def deliver(self, tenant_id: uuid.UUID) -> SendResult:
        """What a worker does per push: the tenant's provider from the cache, then one send."""
        provider = await self.cache.get(tenant_id, "push")
        return await provider.send(push_event(tenant_id, new_token()))


async def test_behind_the_cache_100_concurrent_first_deliveries_initialize_one_app(
    fake: FakeFcm, tenant_id: uuid.UUID, service_account: dict[str, Any], initialized: list[str]
) -> None:
    fcm = FcmCache(fake, service_account)

    results = await asyncio.gather(*(fcm.deliver(tenant_id) for _ in range(100)))

    [provider] = fcm.built
    assert initialized == [provider.app_name]
    assert len({r.provider_message_id for r in results}) == 100
    assert fcm.cache.stats.loads == 1
    await fcm.cache.close()


async def test_behind_the_cache_eviction_deletes_the_evicted_providers_app(
    fake: FakeFcm, service_account: dict[str, Any], deleted: list[str]
) -> None:
    fcm = FcmCache(fake, service_account, max_tenants=1, idle_ttl_s=3600)
    tenant_a, tenant_b = uuid.uuid4(), uuid.uuid4()
    await fcm.deliver(tenant_a)
    [provider_a] = fcm.built
    client_a = messaging._get_messaging_service(app_of(provider_a))._async_client.async_client

    await fcm.deliver(tenant_b)  # max_tenants=1: tenant A is evicted for size
    await fcm.cache.drain_releases()

    assert deleted == [provider_a.app_name]
    assert client_a.is_closed
    with pytest.raises(ValueError, match="does not exist"):
        app_of(provider_a)
    provider_b = fcm.built[1]
    fcm.now += 3600  # an hour idle
    assert fcm.cache.expire() == 1
    await fcm.cache.drain_releases()
    assert deleted == [provider_a.app_name, provider_b.app_name]
    assert fcm.cache.stats.evictions == 2
    await fcm.cache.close()


async def test_invalidating_a_tenant_while_its_pushes_are_in_flight_fails_none(
    fake: FakeFcm, tenant_id: uuid.UUID, service_account: dict[str, Any], deleted: list[str]
) -> None:
    # Any change to the tenant (here as for a revoked API key: the push configuration is the
    # same) invalidates it. The old provider is released in the background while sends on it
    # are still under way and while the new provider already sends: none of them may fail.
    fcm = FcmCache(fake, service_account)
    await fcm.deliver(tenant_id)  # the first provider's app, messaging client and token are up
    fake.inject(*[Fault.slow(0.5) for _ in range(20)])  # the next 20 requests stay in flight 0.5 s
    seen = len(fake.attempts)
    in_flight = [asyncio.create_task(fcm.deliver(tenant_id)) for _ in range(10)]

    async def on_the_wire() -> bool:
        return len(fake.attempts) >= seen + 10

    await wait_for(on_the_wire, timeout_s=10, interval_s=0.005)  # all 10 reached the fake
    fcm.cache.invalidate(tenant_id)
    meanwhile = [asyncio.create_task(fcm.deliver(tenant_id)) for _ in range(10)]
    outcomes = await asyncio.gather(*in_flight, *meanwhile, return_exceptions=True)
    await fcm.cache.drain_releases()
    after = await asyncio.gather(*(fcm.deliver(tenant_id) for _ in range(5)), return_exceptions=True)

    failures = [o for o in [*outcomes, *after] if not isinstance(o, SendResult)]
    assert failures == []
    first, second = fcm.built
    assert deleted == [first.app_name]  # the old provider deleted its own app, not the new one's
    assert app_of(second).name == second.app_name
    await fcm.cache.close()
    assert deleted == [first.app_name, second.app_name]


# -- the fake itself --------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _grant_assertion(account: dict[str, Any], *, scope: str = SCOPE_CLOUD) -> str:
    """An RS256 JWT-bearer assertion signed with ``account``'s key, as google-auth makes one."""
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": account["private_key_id"]}
    claims = {
        "iss": account["client_email"],
        "aud": GRANT_AUDIENCE,
        "scope": scope,
        "iat": now,
        "exp": now + 3600,
    }
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    key = serialization.load_pem_private_key(account["private_key"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


async def test_the_fake_checks_the_wire_format(fake: FakeFcm) -> None:
    account = fake.service_account("wire-a")
    send_a = f"{fake.base_url}/v1/projects/wire-a/messages:send"
    token = new_token()
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.post(fake.token_url, data={"grant_type": "password", "assertion": "x"})
        assert refused.status_code == 400
        assert refused.json()["error"] == "unsupported_grant_type"

        unknown_key = make_google_account("wire-a")  # never registered with the fake
        refused = await client.post(
            fake.token_url, data={"grant_type": JWT_BEARER, "assertion": _grant_assertion(unknown_key)}
        )
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_grant"

        granted = await client.post(
            fake.token_url, data={"grant_type": JWT_BEARER, "assertion": _grant_assertion(account)}
        )
        assert granted.status_code == 200
        answer = granted.json()
        assert answer["expires_in"] == 3600
        assert answer["token_type"] == "Bearer"
        bearer = {"Authorization": f"Bearer {answer['access_token']}"}

        unauthenticated = await client.post(send_a, json={"message": {"token": token}})
        assert unauthenticated.status_code == 401
        assert unauthenticated.json()["error"]["status"] == "UNAUTHENTICATED"

        other_project = await client.post(
            f"{fake.base_url}/v1/projects/wire-b/messages:send",
            json={"message": {"token": token}},
            headers=bearer,
        )
        assert other_project.status_code == 403
        assert other_project.json()["error"]["status"] == "PERMISSION_DENIED"

        for body, field in [
            ({"message": {"token": token}, "extra": 1}, "extra"),
            ({"message": {"token": token, "topic": "news"}}, "message"),
            ({"message": {"notification": {"title": "t"}}}, "message"),
            ({"message": {"token": token, "data": {"n": 1}}}, "message.data[0].value"),
            ({"message": {"token": token, "data": {"gcm.x": "1"}}}, "message.data"),
            ({"message": {"token": token, "notification": {"subtitle": "s"}}}, "message.notification"),
        ]:
            bad = await client.post(send_a, json=body, headers=bearer)
            assert bad.status_code == 400, body
            error = bad.json()["error"]
            assert error["status"] == "INVALID_ARGUMENT"
            [bad_request] = [d for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest")]
            assert bad_request["fieldViolations"][0]["field"] == field, body

        too_big = await client.post(
            send_a, json={"message": {"token": token, "data": {"k": "x" * 5000}}}, headers=bearer
        )
        assert too_big.status_code == 400
        assert "details" not in too_big.json()["error"]

        fake.fail_token(token, "UNREGISTERED")
        unregistered = await client.post(send_a, json={"message": {"token": token}}, headers=bearer)
        assert unregistered.status_code == 404
        assert unregistered.json() == {
            "error": {
                "code": 404,
                "message": "Requested entity was not found.",
                "status": "NOT_FOUND",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": "UNREGISTERED",
                    }
                ],
            }
        }

        accepted = await client.post(send_a, json={"message": {"token": new_token()}}, headers=bearer)
        assert accepted.status_code == 200
        assert re.fullmatch(r"projects/wire-a/messages/\S+", accepted.json()["name"])
