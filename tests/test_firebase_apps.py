"""Per-tenant Firebase apps: initialized once, deleted from a running loop, tokens refreshed off the loop.

Every request goes to a fake OAuth2 token endpoint on 127.0.0.1: it answers the
JWT-bearer grant (RFC 7523) that google-auth sends for a service account after a
deliberate delay, so a blocking refresh on the event loop shows up as a stall.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import firebase_admin  # type: ignore[import-untyped]
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from firebase_admin import messaging

# The JWT-bearer grant checks are shared with the fake FCM (switchboard/fakes/fcm.py).
from switchboard.fakes.fcm import JWT_BEARER, verify_grant
from tenants import firebase_apps
from tenants.firebase_apps import (
    access_token_needs_refresh,
    app_name,
    delete_app,
    ensure_access_token,
    get_or_create_app,
    refresh_access_token,
)
from tests.helpers import max_loop_gap, record_firebase_app_names

TOKEN_DELAY_S = 0.3


@dataclass
class FakeTokenEndpoint:
    """A Google OAuth2 token endpoint stand-in on loopback."""

    url: str
    public_keys: dict[str, bytes] = field(default_factory=dict)  # private_key_id -> public PEM
    grants: list[dict[str, Any]] = field(default_factory=list)  # decoded JWT claims
    other_requests: list[str] = field(default_factory=list)
    delay_s: float = TOKEN_DELAY_S
    counter: int = 0


def _handler(endpoint: FakeTokenEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode())
            if self.path != "/token" or form.get("grant_type") != [JWT_BEARER]:
                self._reply(400, {"error": "unsupported_grant_type"})
                return
            assertion = form["assertion"][0]
            try:
                claims = verify_grant(assertion, endpoint.public_keys)
            except (ValueError, KeyError, InvalidSignature) as error:
                self._reply(400, {"error": "invalid_grant", "error_description": str(error)})
                return
            endpoint.grants.append(claims)
            time.sleep(endpoint.delay_s)
            endpoint.counter += 1
            self._reply(
                200, {"access_token": f"token-{endpoint.counter}", "expires_in": 3600, "token_type": "Bearer"}
            )

        def do_GET(self) -> None:
            endpoint.other_requests.append(f"{self.path} {self.headers.get('Authorization')}")
            self._reply(200, {"ok": True})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def token_endpoint() -> Iterator[FakeTokenEndpoint]:
    """The fake token endpoint, served from a thread for the module."""
    endpoint = FakeTokenEndpoint(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(endpoint))
    server.daemon_threads = True
    endpoint.url = f"http://127.0.0.1:{server.server_port}/token"
    thread = threading.Thread(target=server.serve_forever, name="fake-token-endpoint", daemon=True)
    thread.start()
    yield endpoint
    server.shutdown()
    server.server_close()
    thread.join()


def make_service_account(endpoint: FakeTokenEndpoint, project_id: str = "acme-push") -> dict[str, Any]:
    """A service-account JSON with a fresh RSA key whose token_uri is the fake endpoint."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_id = uuid.uuid4().hex
    endpoint.public_keys[key_id] = public_pem
    return {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": key_id,
        "private_key": private_pem.decode(),
        "client_email": f"firebase-adminsdk@{project_id}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": endpoint.url,
    }


@pytest.fixture
def service_account(token_endpoint: FakeTokenEndpoint) -> dict[str, Any]:
    """A fresh service account for one test."""
    return make_service_account(token_endpoint)


@pytest.fixture
async def tenant_id() -> AsyncIterator[uuid.UUID]:
    """A tenant id whose Firebase app (if any) is deleted after the test."""
    tenant = uuid.uuid4()
    yield tenant
    try:
        app = firebase_admin.get_app(app_name(tenant))
    except ValueError:
        return
    await delete_app(app)


async def test_100_concurrent_first_uses_initialize_one_app(
    tenant_id: uuid.UUID, service_account: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_firebase_app_names(monkeypatch, "initialize_app")

    apps = await asyncio.gather(*(get_or_create_app(tenant_id, service_account) for _ in range(100)))

    assert calls == [f"switchboard-tenant-{tenant_id}-0"]
    assert all(app is apps[0] for app in apps)
    assert apps[0].name == f"switchboard-tenant-{tenant_id}-0"
    assert apps[0].project_id == "acme-push"
    assert firebase_admin.get_app(app_name(tenant_id)) is apps[0]
    assert await get_or_create_app(tenant_id, service_account) is apps[0]
    assert calls == [f"switchboard-tenant-{tenant_id}-0"]


async def test_tenants_get_separate_apps(token_endpoint: FakeTokenEndpoint, tenant_id: uuid.UUID) -> None:
    other_tenant = uuid.uuid4()
    first = await get_or_create_app(tenant_id, make_service_account(token_endpoint, "first"))
    second = await get_or_create_app(other_tenant, make_service_account(token_endpoint, "second"))
    try:
        assert first is not second
        assert (first.project_id, second.project_id) == ("first", "second")
    finally:
        await delete_app(second)


async def test_a_changed_service_account_replaces_the_app(
    token_endpoint: FakeTokenEndpoint, tenant_id: uuid.UUID, service_account: dict[str, Any]
) -> None:
    old = await get_or_create_app(tenant_id, service_account)
    rotated = make_service_account(token_endpoint)  # new key, new private_key_id

    new = await get_or_create_app(tenant_id, rotated)

    assert new is not old
    assert firebase_admin.get_app(app_name(tenant_id)) is new
    assert new.credential.signer.key_id == rotated["private_key_id"]
    await delete_app(old)  # the old provider's late close must not delete the new app
    assert firebase_admin.get_app(app_name(tenant_id)) is new


async def test_an_invalid_service_account_raises_value_error(tenant_id: uuid.UUID) -> None:
    with pytest.raises(ValueError, match="project_id"):
        await get_or_create_app(tenant_id, {"type": "service_account"})
    with pytest.raises(ValueError, match="service_account"):
        await get_or_create_app(tenant_id, {"type": "authorized_user", "project_id": "p"})
    with pytest.raises(ValueError, match="does not exist"):
        firebase_admin.get_app(app_name(tenant_id))


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
async def test_firebase_admin_delete_app_fails_inside_a_running_loop(
    tenant_id: uuid.UUID, service_account: dict[str, Any]
) -> None:
    # Why delete_app exists: the SDK's own delete closes the messaging client with asyncio.run.
    app = await get_or_create_app(tenant_id, service_account)
    messaging._get_messaging_service(app)  # the service a push provider uses

    with pytest.raises(RuntimeError, match="running event loop"):
        firebase_admin.delete_app(app)


async def test_delete_app_from_a_running_loop(
    token_endpoint: FakeTokenEndpoint, tenant_id: uuid.UUID, service_account: dict[str, Any]
) -> None:
    app = await get_or_create_app(tenant_id, service_account)
    service = messaging._get_messaging_service(app)
    await refresh_access_token(app)
    # Leave a pooled keep-alive connection on this loop, as a real send would.
    port = token_endpoint.url.split(":")[2].split("/")[0]
    response = await service._async_client.request("GET", f"http://127.0.0.1:{port}/ping")
    assert response.status_code == 200
    assert token_endpoint.other_requests[-1].endswith("Bearer " + app.credential.get_credential().token)

    loop = asyncio.get_running_loop()
    debug = loop.get_debug()
    loop.set_debug(True)  # makes touching this loop's sockets from another thread an error
    try:
        await delete_app(app)
    finally:
        loop.set_debug(debug)

    assert service._async_client.async_client.is_closed
    with pytest.raises(ValueError, match="does not exist"):
        firebase_admin.get_app(app_name(tenant_id))
    await delete_app(app)  # idempotent


async def test_token_refresh_off_the_loop_does_not_stall_it(
    token_endpoint: FakeTokenEndpoint, tenant_id: uuid.UUID, service_account: dict[str, Any]
) -> None:
    app = await get_or_create_app(tenant_id, service_account)
    assert access_token_needs_refresh(app)
    grants_before = len(token_endpoint.grants)

    async def off_the_loop() -> None:
        await refresh_access_token(app)

    async def on_the_loop() -> None:
        app.credential.get_access_token()  # what a send does when the token is stale

    _, gap_to_thread = await max_loop_gap(off_the_loop)
    assert not access_token_needs_refresh(app)
    _, gap_on_loop = await max_loop_gap(on_the_loop)
    print(
        f"\nevent-loop max gap during a token refresh ({TOKEN_DELAY_S * 1000:.0f} ms endpoint delay): "
        f"asyncio.to_thread {gap_to_thread * 1000:.1f} ms, on the loop {gap_on_loop * 1000:.1f} ms"
    )

    assert len(token_endpoint.grants) == grants_before + 2
    claims = token_endpoint.grants[-1]
    assert claims["iss"] == service_account["client_email"]
    assert "https://www.googleapis.com/auth/firebase" in claims["scope"]
    assert gap_to_thread < TOKEN_DELAY_S * 0.8  # room for a loaded machine; on the loop it is >= 1x
    assert gap_on_loop >= TOKEN_DELAY_S


async def test_concurrent_refreshes_share_one_token_request(
    token_endpoint: FakeTokenEndpoint, tenant_id: uuid.UUID, service_account: dict[str, Any]
) -> None:
    app = await get_or_create_app(tenant_id, service_account)
    grants_before = len(token_endpoint.grants)

    await asyncio.gather(*(ensure_access_token(app) for _ in range(20)))
    await ensure_access_token(app)  # fresh now: no request

    assert len(token_endpoint.grants) == grants_before + 1
    assert not firebase_apps._refreshes


async def test_needs_refresh_near_expiry(tenant_id: uuid.UUID, service_account: dict[str, Any]) -> None:
    app = await get_or_create_app(tenant_id, service_account)
    await refresh_access_token(app)
    credential = app.credential.get_credential()
    expiry = credential.expiry  # naive UTC, about an hour ahead

    assert not access_token_needs_refresh(app)
    assert access_token_needs_refresh(app, margin_s=3700)
    credential.expiry = None
    assert not access_token_needs_refresh(app)  # a token without expiry stays valid
    credential.expiry = expiry
    credential.token = None
    assert access_token_needs_refresh(app)
