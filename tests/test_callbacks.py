"""Status callbacks: signatures, the queue, and the dispatcher against a real HTTP receiver on loopback.

Time is driven by an injected clock (``FakeClock``), never by sleeping: the
dispatcher takes every scheduling decision, lease and signature timestamp
from it, and the receiver verifies signatures against the same clock.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from channels.callbacks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    CallbackDispatcher,
    CallbackUrlError,
    delete_tenant_callback,
    enqueue_status_change,
    get_tenant_callback,
    set_tenant_callback,
    sign_payload,
    signature_header,
    validate_callback_url,
    verify_signature,
)
from switchboard.embedded import free_port
from tests.conftest import TenantCredentials
from tests.helpers import wait_for

OCCURRED_AT = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


class FakeClock:
    """Unix time in seconds that moves only when told to (starts a little ahead of the database's now())."""

    def __init__(self) -> None:
        self.now = time.time() + 5.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MaxJitter(random.Random):
    """A jitter source that always draws the upper bound: backoff = the full ceiling, deterministically."""

    def uniform(self, a: float, b: float) -> float:
        return b


@dataclass
class Received:
    """One POST the receiver got."""

    headers: dict[str, str]
    body: bytes
    verified: bool

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """A tenant's endpoint on 127.0.0.1: verifies each signature, records each POST, answers as told.

    ``responses`` are popped one per POST (status, extra headers); when empty it
    answers ``default_status``. With ``echo_secret`` an error answer carries the
    secret in its body (to prove the dispatcher never stores or logs answers).
    """

    clock: FakeClock
    port: int = 0
    secret: bytes | None = None
    responses: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)
    default_status: int = 200
    delay_s: float = 0.0
    echo_secret: bool = False
    received: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/switchboard?token=tenant-side-token"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get(SIGNATURE_HEADER, "")
        verified = self.secret is not None and verify_signature(self.secret, header, body, now=self.clock())
        self.received.append(Received(dict(request.headers), body, verified))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status, headers = self.responses.popleft() if self.responses else (self.default_status, {})
        text = "ok"
        if status >= 300 and self.echo_secret and self.secret is not None:
            text = f"bad signature; your secret is {self.secret.hex()}"
        return web.Response(status=status, text=text, headers=headers)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def receiver(clock: FakeClock) -> AsyncIterator[Receiver]:
    recv = Receiver(clock)
    app = web.Application()
    app.router.add_post("/hooks/switchboard", recv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    recv.port = runner.addresses[0][1]
    yield recv
    await runner.cleanup()


@pytest.fixture
async def dispatchers() -> AsyncIterator[list[CallbackDispatcher]]:
    """Dispatchers a test made; closed at the end."""
    made: list[CallbackDispatcher] = []
    yield made
    for dispatcher in made:
        await dispatcher.aclose()


async def configure(pool: asyncpg.Pool, tenant: TenantCredentials, receiver: Receiver) -> bytes:
    """Point the tenant's callbacks at ``receiver``; return the secret (also given to the receiver)."""
    async with pool.acquire() as conn:
        secret = await set_tenant_callback(conn, tenant.tenant_id, receiver.url)
    receiver.secret = secret
    return secret


async def enqueue(pool: asyncpg.Pool, tenant_id: uuid.UUID, **overrides: Any) -> tuple[bool, dict[str, Any]]:
    """Queue one status change in its own transaction; return (queued, the arguments used)."""
    args: dict[str, Any] = {
        "tenant_id": tenant_id,
        "delivery_id": uuid.uuid4(),
        "notification_id": uuid.uuid4(),
        "channel": "email",
        "status": "delivered",
        "attempt": 1,
        "error": "",
        "provider_message_id": "<msg-1@example.com>",
        "occurred_at": OCCURRED_AT,
        **overrides,
    }
    async with pool.acquire() as conn, conn.transaction():
        queued = await enqueue_status_change(conn, **args)
    return queued, args


async def only_row(pool: asyncpg.Pool) -> asyncpg.Record:
    rows = await pool.fetch("SELECT * FROM callback_deliveries")
    assert len(rows) == 1
    return rows[0]


def make_dispatcher(
    pool: asyncpg.Pool, clock: FakeClock, made: list[CallbackDispatcher], **options: Any
) -> CallbackDispatcher:
    dispatcher = CallbackDispatcher(pool, clock=clock, rng=MaxJitter(), **options)
    made.append(dispatcher)
    return dispatcher


# --- signatures -------------------------------------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    secret = bytes(range(32))
    body = b'{"event_id":"1","status":"delivered"}'
    header = sign_payload(secret, 1_735_689_600, body)
    expected = hmac.new(secret, b"1735689600." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1735689600,v1={expected}"
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
    assert verify_signature(secret, header, body, now=1_735_689_600)
    assert verify_signature(secret, f" {header.replace(',', ' , ')} ", body, now=1_735_689_600)


def test_verify_rejects_tampering_wrong_secrets_and_stale_timestamps() -> None:
    secret, other = b"s" * 32, b"o" * 32
    body = b'{"status":"delivered"}'
    t = 1_735_689_600
    header = sign_payload(secret, t, body)
    assert not verify_signature(secret, header, body.replace(b"delivered", b"failed"), now=t)
    assert not verify_signature(secret, header, body + b" ", now=t)
    assert not verify_signature(other, header, body, now=t)
    assert verify_signature(secret, header, body, now=t + 300)
    assert not verify_signature(secret, header, body, now=t + 301)
    assert not verify_signature(secret, header, body, now=t - 301)
    assert verify_signature(secret, header, body, now=t + 3000, tolerance_s=3600)
    # The timestamp is signed: moving it invalidates the signature.
    assert not verify_signature(secret, header.replace(f"t={t}", f"t={t + 1}"), body, now=t)
    v1 = header.split("v1=")[1]
    for malformed in ["", f"v1={v1}", f"t={t}", f"t=abc,v1={v1}", f"t={t},t={t},v1={v1}", f"t={t},v1=zz"]:
        assert not verify_signature(secret, malformed, body, now=t), malformed
    assert not verify_signature(secret, f"t={t},v1=\u00e9{v1[1:]}", body, now=t)


def test_verify_accepts_any_of_several_v1_entries() -> None:
    new, old, stranger = b"n" * 32, b"p" * 32, b"x" * 32
    body = b"{}"
    t = 1_735_689_600
    header = signature_header([new, old], t, body)
    assert header.count("v1=") == 2
    assert verify_signature(new, header, body, now=t)
    assert verify_signature(old, header, body, now=t)
    assert not verify_signature(stranger, header, body, now=t)
    # Unknown schemes are ignored, in any position.
    assert verify_signature(new, f"v0=deadbeef,{header},v9=x", body, now=t)


# --- configuration and enqueueing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://example.com/hook",
        "javascript:alert(1)",
        "/relative/path",
        "https://",
        "https://user:pw@example.com/hook",
        "https://example.com/hook#frag",
        "https://exa mple.com/hook",
        "https://example.com:99999/hook",
        "https://example.com/" + "a" * 2100,
    ],
)
def test_bad_callback_urls_are_rejected(url: str) -> None:
    with pytest.raises(CallbackUrlError):
        validate_callback_url(url)


def test_good_callback_urls_are_accepted() -> None:
    assert validate_callback_url(" https://hooks.example.com/a?b=c ") == "https://hooks.example.com/a?b=c"
    assert validate_callback_url("HTTP://127.0.0.1:8080/x") == "HTTP://127.0.0.1:8080/x"


async def test_set_callback_for_unknown_tenant_is_a_lookup_error(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(LookupError):
            await set_tenant_callback(conn, uuid.uuid4(), "https://example.com/hook")
        with pytest.raises(CallbackUrlError):
            await set_tenant_callback(conn, uuid.uuid4(), "gopher://example.com/")


async def test_enqueue_only_when_the_tenant_has_a_callback(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    queued, _ = await enqueue(pool, tenant.tenant_id)
    assert not queued
    assert await pool.fetchval("SELECT count(*) FROM callback_deliveries") == 0

    async with pool.acquire() as conn:
        secret = await set_tenant_callback(conn, tenant.tenant_id, "https://hooks.example.com/sb")
        shown = await get_tenant_callback(conn, tenant.tenant_id)
    assert len(secret) == 32
    assert shown is not None
    assert shown.url == "https://hooks.example.com/sb"
    assert secret.hex() not in repr(shown)

    queued, args = await enqueue(
        pool, tenant.tenant_id, status="failed", attempt=3, error="550 mailbox unavailable", channel="sms"
    )
    assert queued
    row = await only_row(pool)
    assert row["tenant_id"] == tenant.tenant_id
    assert row["delivery_id"] == args["delivery_id"]
    assert row["attempts"] == 0
    assert row["delivered_at"] is None
    assert row["given_up_at"] is None
    assert json.loads(row["payload"]) == {
        "type": "delivery.status_changed",
        "delivery_id": str(args["delivery_id"]),
        "notification_id": str(args["notification_id"]),
        "tenant_id": str(tenant.tenant_id),
        "channel": "sms",
        "status": "failed",
        "attempt": 3,
        "error": "550 mailbox unavailable",
        "provider_message_id": "<msg-1@example.com>",
        "occurred_at": "2025-01-02T03:04:05.678901Z",
    }

    async with pool.acquire() as conn:
        assert await delete_tenant_callback(conn, tenant.tenant_id)
        assert not await delete_tenant_callback(conn, tenant.tenant_id)
        assert await get_tenant_callback(conn, tenant.tenant_id) is None
    queued, _ = await enqueue(pool, tenant.tenant_id)
    assert not queued
    # The pending event had nowhere to go any more: given up, not left pending.
    row = await only_row(pool)
    assert row["given_up_at"] is not None
    assert row["last_error"] == "gave up: the status callback endpoint was deleted"


async def test_enqueue_commits_and_rolls_back_with_the_status_change(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    async with pool.acquire() as conn:
        await set_tenant_callback(conn, tenant.tenant_id, "https://hooks.example.com/sb")

    class Abort(Exception):
        pass

    async def status_change_that_fails_later() -> None:
        async with pool.acquire() as conn, conn.transaction():
            assert await enqueue_status_change(
                conn,
                tenant_id=str(tenant.tenant_id),
                delivery_id=str(uuid.uuid4()),
                notification_id=uuid.uuid4(),
                channel="push",
                status="sending",
                attempt=1,
                error="",
                provider_message_id="",
                occurred_at=OCCURRED_AT,
            )
            raise Abort

    with pytest.raises(Abort):
        await status_change_that_fails_later()
    assert await pool.fetchval("SELECT count(*) FROM callback_deliveries") == 0


async def test_enqueue_rejects_bad_arguments_before_writing(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    for overrides in (
        {"status": "lost"},
        {"attempt": -1},
        {"occurred_at": datetime(2025, 1, 1)},
        {"delivery_id": "not-a-uuid"},
    ):
        with pytest.raises(ValueError, match=r"."):
            await enqueue(pool, tenant.tenant_id, **overrides)


# --- the dispatcher ----------------------------------------------------------------------------------------


async def test_dispatcher_delivers_with_a_valid_signature_and_the_exact_body(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    secret = await configure(pool, tenant, receiver)
    _, args = await enqueue(pool, tenant.tenant_id)
    dispatcher = make_dispatcher(pool, clock, dispatchers)

    assert await dispatcher.run_once() == 1
    assert len(receiver.received) == 1
    got = receiver.received[0]
    assert got.verified
    row = await only_row(pool)
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers[EVENT_ID_HEADER] == str(row["id"])
    assert got.headers["User-Agent"].startswith("Switchboard-Callbacks/")
    # The signature covers exactly the bytes that arrived.
    t = int(clock())
    assert got.headers[SIGNATURE_HEADER] == sign_payload(secret, t, got.body)
    assert got.event == {"event_id": str(row["id"]), **json.loads(row["payload"])}
    assert got.event["delivery_id"] == str(args["delivery_id"])
    assert row["delivered_at"] is not None
    assert row["given_up_at"] is None
    assert row["attempts"] == 1
    assert row["last_error"] == ""
    assert dispatcher.delivered == 1
    assert await dispatcher.run_once() == 0
    assert len(receiver.received) == 1


async def test_failures_are_retried_with_backoff_and_delivered_once(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    await configure(pool, tenant, receiver)
    await enqueue(pool, tenant.tenant_id)
    receiver.responses.extend([(500, {}), (503, {})])
    dispatcher = make_dispatcher(pool, clock, dispatchers, base_backoff_s=2.0, max_backoff_s=60.0)

    assert await dispatcher.run_once() == 1
    row = await only_row(pool)
    assert row["delivered_at"] is None
    assert row["attempts"] == 1
    assert row["last_error"] == "attempt 1: HTTP 500 Internal Server Error"
    # Full jitter with the upper bound drawn: base * 2**0 = 2 s.
    assert row["next_attempt_at"].timestamp() == pytest.approx(clock() + 2.0, abs=1e-3)
    assert await dispatcher.run_once() == 0
    clock.advance(1.9)
    assert await dispatcher.run_once() == 0
    clock.advance(0.2)

    assert await dispatcher.run_once() == 1
    row = await only_row(pool)
    assert row["attempts"] == 2
    assert row["last_error"] == "attempt 2: HTTP 503 Service Unavailable"
    assert row["next_attempt_at"].timestamp() == pytest.approx(clock() + 4.0, abs=1e-3)
    clock.advance(4.0)

    assert await dispatcher.run_once() == 1
    row = await only_row(pool)
    assert row["delivered_at"] is not None
    assert row["attempts"] == 3
    assert row["last_error"] == ""
    clock.advance(3600)
    assert await dispatcher.run_once() == 0
    assert len(receiver.received) == 3
    assert all(r.verified for r in receiver.received)
    assert len({r.headers[EVENT_ID_HEADER] for r in receiver.received}) == 1
    assert len({r.body for r in receiver.received}) == 1
    assert (dispatcher.failed, dispatcher.delivered) == (2, 1)


async def test_retry_after_lengthens_the_backoff(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    await configure(pool, tenant, receiver)
    await enqueue(pool, tenant.tenant_id)
    receiver.responses.append((429, {"Retry-After": "30"}))
    dispatcher = make_dispatcher(pool, clock, dispatchers, base_backoff_s=1.0)
    assert await dispatcher.run_once() == 1
    row = await only_row(pool)
    assert row["next_attempt_at"].timestamp() == pytest.approx(clock() + 30.0, abs=1e-3)


async def test_gives_up_after_max_attempts(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    await configure(pool, tenant, receiver)
    await enqueue(pool, tenant.tenant_id)
    receiver.default_status = 500
    dispatcher = make_dispatcher(
        pool, clock, dispatchers, max_attempts=3, base_backoff_s=1.0, max_backoff_s=5.0
    )
    for _ in range(3):
        assert await dispatcher.run_once() == 1
        clock.advance(5.0)
    row = await only_row(pool)
    assert row["delivered_at"] is None
    assert row["given_up_at"] is not None
    assert row["attempts"] == 3
    assert row["last_error"] == "gave up after 3 attempts: HTTP 500 Internal Server Error"
    clock.advance(86_400)
    assert await dispatcher.run_once() == 0
    assert len(receiver.received) == 3
    assert dispatcher.given_up == 1


async def test_a_crashed_dispatchers_rows_come_back_after_the_lease(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    await configure(pool, tenant, receiver)
    await enqueue(pool, tenant.tenant_id)
    crashed = make_dispatcher(pool, clock, dispatchers, timeout_s=5.0, lease_s=10.0)
    survivor = make_dispatcher(pool, clock, dispatchers, timeout_s=5.0)

    claimed = await crashed.claim()  # ... and never POSTs or records anything
    assert len(claimed) == 1
    assert claimed[0].attempt == 1
    row = await only_row(pool)
    assert row["attempts"] == 1
    assert row["last_error"].startswith("attempt 1: no outcome recorded")
    assert row["next_attempt_at"].timestamp() == pytest.approx(clock() + 10.0, abs=1e-3)

    assert await survivor.run_once() == 0  # leased: not due
    clock.advance(9.0)
    assert await survivor.run_once() == 0
    clock.advance(1.5)
    assert await survivor.run_once() == 1
    row = await only_row(pool)
    assert row["delivered_at"] is not None
    assert row["attempts"] == 2
    assert row["last_error"] == ""
    assert len(receiver.received) == 1
    assert receiver.received[0].verified


async def test_a_crash_on_the_last_attempt_is_given_up_without_another_post(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    await configure(pool, tenant, receiver)
    await enqueue(pool, tenant.tenant_id)
    dispatcher = make_dispatcher(pool, clock, dispatchers, max_attempts=1, timeout_s=1.0, lease_s=2.0)
    assert len(await dispatcher.claim()) == 1
    clock.advance(3.0)
    assert await dispatcher.run_once() == 0
    row = await only_row(pool)
    assert row["given_up_at"] is not None
    assert row["attempts"] == 1
    assert row["last_error"].startswith("gave up after 1 attempts: attempt 1: no outcome recorded")
    assert receiver.received == []


async def test_a_late_failure_from_an_expired_lease_does_not_overwrite_the_newer_attempt(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    await configure(pool, tenant, receiver)
    await enqueue(pool, tenant.tenant_id)
    slow = make_dispatcher(pool, clock, dispatchers, timeout_s=1.0, lease_s=2.0)
    fast = make_dispatcher(pool, clock, dispatchers, timeout_s=1.0, lease_s=2.0)
    stale = (await slow.claim())[0]
    clock.advance(3.0)
    fresh = (await fast.claim())[0]
    assert fresh.attempt == 2
    await slow._record_failure(stale, "HTTP 500 Internal Server Error", None)
    row = await only_row(pool)
    assert row["attempts"] == 2
    assert row["last_error"].startswith("attempt 2: no outcome recorded")
    assert row["next_attempt_at"].timestamp() == pytest.approx(fresh.lease_until, abs=1e-3)


async def test_two_dispatchers_never_post_one_row_twice(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    await configure(pool, tenant, receiver)
    for _ in range(40):
        await enqueue(pool, tenant.tenant_id)
    receiver.delay_s = 0.02
    first = make_dispatcher(pool, clock, dispatchers, batch_size=25)
    second = make_dispatcher(pool, clock, dispatchers, batch_size=25)

    counts = await asyncio.gather(first.run_once(), second.run_once())
    assert sum(counts) == 40
    assert min(counts) > 0
    assert list(await asyncio.gather(first.run_once(), second.run_once())) == [0, 0]
    event_ids = [r.headers[EVENT_ID_HEADER] for r in receiver.received]
    assert len(event_ids) == 40
    assert len(set(event_ids)) == 40
    assert all(r.verified for r in receiver.received)
    assert await pool.fetchval("SELECT count(*) FROM callback_deliveries WHERE delivered_at IS NULL") == 0
    assert await pool.fetchval("SELECT max(attempts) FROM callback_deliveries") == 1


async def test_rows_of_a_removed_endpoint_are_given_up_not_sent(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    await configure(pool, tenant, receiver)
    await enqueue(pool, tenant.tenant_id)
    # As if an enqueue raced the deletion: the row outlived its endpoint.
    await pool.execute("DELETE FROM tenant_callbacks")
    dispatcher = make_dispatcher(pool, clock, dispatchers)
    assert await dispatcher.run_once() == 0
    row = await only_row(pool)
    assert row["given_up_at"] is not None
    assert row["last_error"] == "gave up: the tenant has no status callback endpoint any more"
    assert receiver.received == []


async def test_a_rotated_secret_keeps_signing_during_the_overlap(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
) -> None:
    old = await configure(pool, tenant, receiver)
    async with pool.acquire() as conn:
        new = await set_tenant_callback(conn, tenant.tenant_id, receiver.url, previous_secret_valid_s=60)
        shown = await get_tenant_callback(conn, tenant.tenant_id)
    assert new != old
    assert shown is not None
    assert shown.previous_secret_expires_at is not None
    receiver.secret = new
    dispatcher = make_dispatcher(pool, clock, dispatchers)

    await enqueue(pool, tenant.tenant_id)
    assert await dispatcher.run_once() == 1
    during = receiver.received[-1]
    assert during.headers[SIGNATURE_HEADER].count("v1=") == 2
    assert verify_signature(new, during.headers[SIGNATURE_HEADER], during.body, now=clock())
    assert verify_signature(old, during.headers[SIGNATURE_HEADER], during.body, now=clock())

    clock.advance(120)
    await enqueue(pool, tenant.tenant_id)
    assert await dispatcher.run_once() == 1
    after = receiver.received[-1]
    assert after.headers[SIGNATURE_HEADER].count("v1=") == 1
    assert verify_signature(new, after.headers[SIGNATURE_HEADER], after.body, now=clock())
    assert not verify_signature(old, after.headers[SIGNATURE_HEADER], after.body, now=clock())


async def test_timeouts_connection_errors_and_answers_never_leak_the_secret(
    pool: asyncpg.Pool,
    tenant: TenantCredentials,
    other_tenant: TenantCredentials,
    receiver: Receiver,
    clock: FakeClock,
    dispatchers: list[CallbackDispatcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = await configure(pool, tenant, receiver)
    async with pool.acquire() as conn:
        # Nothing listens there: connection refused.
        other_secret = await set_tenant_callback(
            conn, other_tenant.tenant_id, f"http://127.0.0.1:{free_port()}/hook?token=t0ps3cret-path-token"
        )
    receiver.echo_secret = True
    receiver.responses.extend([(401, {}), (200, {})])
    await enqueue(pool, tenant.tenant_id)
    await enqueue(pool, other_tenant.tenant_id)
    dispatcher = make_dispatcher(pool, clock, dispatchers, timeout_s=0.3, max_attempts=2, max_backoff_s=1.0)

    with capture_logs() as logs:
        assert await dispatcher.run_once() == 2  # 401 with the secret echoed; connection refused
        receiver.delay_s = 1.0  # then: an answer too late
        clock.advance(1.0)
        claimed = await make_dispatcher(pool, clock, dispatchers).claim()
        assert len(claimed) == 2
        for one in claimed:
            await dispatcher._process(one)

    rows = {r["tenant_id"]: r for r in await pool.fetch("SELECT * FROM callback_deliveries")}
    assert rows[tenant.tenant_id]["last_error"] == "gave up after 2 attempts: no answer within 0.3 s"
    refused = rows[other_tenant.tenant_id]["last_error"]
    assert refused.startswith("gave up after 2 attempts: ConnectError")
    assert "t0ps3cret-path-token" not in refused
    assert [r.verified for r in receiver.received] == [True, True]
    # Each tenant's events go to its own endpoint only.
    assert {r.event["tenant_id"] for r in receiver.received} == {str(tenant.tenant_id)}

    forms = [
        form
        for s in (secret, other_secret)
        for form in (
            s.hex(),
            s.hex().upper(),
            base64.b64encode(s).decode(),
            base64.urlsafe_b64encode(s).decode(),
        )
    ]
    texts = [
        *(r["last_error"] for r in rows.values()),
        repr(logs),
        caplog.text,
        repr(claimed),
        *(json.dumps(r.headers) for r in receiver.received),
    ]
    for text in texts:
        for form in forms:
            assert form not in text
        assert repr(secret) not in text
        assert repr(other_secret) not in text
    assert {entry["event"] for entry in logs} >= {
        "status callback attempt failed, retrying",
        "status callback given up",
    }


async def test_run_loop_delivers_and_stops_promptly(
    pool: asyncpg.Pool, tenant: TenantCredentials, receiver: Receiver, dispatchers: list[CallbackDispatcher]
) -> None:
    await configure(pool, tenant, receiver)
    await enqueue(pool, tenant.tenant_id)
    dispatcher = CallbackDispatcher(pool, poll_interval_s=30.0)  # real clock
    dispatchers.append(dispatcher)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await wait_for(
            lambda: pool.fetchval("SELECT count(*) FROM callback_deliveries WHERE delivered_at IS NOT NULL")
        )
        assert len(receiver.received) == 1
        assert receiver.received[0].verified
        await asyncio.sleep(0.05)  # the loop is now idle, waiting out its 30 s poll interval
    finally:
        stop.set()
        # It waits on the stop event, not in a bare sleep: it returns long before 30 s.
        await asyncio.wait_for(task, 2.0)


async def test_run_loop_survives_a_failed_round(
    pool: asyncpg.Pool, dispatchers: list[CallbackDispatcher]
) -> None:
    class Flaky(CallbackDispatcher):
        rounds = 0

        async def run_once(self) -> int:
            self.rounds += 1
            if self.rounds == 1:
                raise OSError("database unreachable")
            return await super().run_once()

    dispatcher = Flaky(pool, poll_interval_s=0.01, error_backoff_s=0.01)
    dispatchers.append(dispatcher)

    async def three_rounds() -> bool | None:
        return dispatcher.rounds >= 3 or None

    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(dispatcher.run(stop))
        await wait_for(three_rounds)
        stop.set()
        await asyncio.wait_for(task, 2.0)
    assert any(entry["event"] == "status callback round failed" for entry in logs)


async def test_dispatcher_rejects_nonsense_settings(pool: asyncpg.Pool) -> None:
    options: dict[str, Any]
    for options in ({"batch_size": 0}, {"timeout_s": 0.0}, {"lease_s": 1.0, "timeout_s": 2.0}):
        with pytest.raises(ValueError, match=r"."):
            CallbackDispatcher(pool, **options)
    # A client passed in is used as given and left open.
    async with httpx.AsyncClient() as client:
        async with CallbackDispatcher(pool, http_client=client):
            pass
        assert not client.is_closed
