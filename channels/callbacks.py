"""Status callbacks: signed HTTP POSTs telling a tenant that a delivery changed status.

A tenant registers one endpoint (``set_tenant_callback``: an ``http(s)`` URL;
the call returns a new 32-byte signing secret, shown once). From then on every
delivery status change recorded by the worker also queues one event
(``enqueue_status_change``, one statement inside the status change's own
transaction), and a ``CallbackDispatcher`` task POSTs the queued events,
retrying failures with backoff. The dispatcher touches only its own tables
(``tenant_callbacks``, ``callback_deliveries``) and runs as its own task, so a
slow or broken endpoint never delays a delivery.

What a receiver gets
====================

``POST <url>`` with these headers::

    Content-Type: application/json
    User-Agent: Switchboard-Callbacks/1
    Switchboard-Event-Id: 4711
    Switchboard-Signature: t=1735689600,v1=5f2b...9c0e

and a JSON object body (UTF-8, no insignificant whitespace; field order is
not significant and may change)::

    {"event_id": "4711",                      # same as Switchboard-Event-Id
     "type": "delivery.status_changed",
     "delivery_id": "0194...", "notification_id": "0194...", "tenant_id": "5f0c...",
     "channel": "email",                      # email | sms | push
     "status": "delivered",                   # queued | sending | delivered | failed
     "attempt": 1,                            # the delivery attempt the change belongs to
     "error": "",                             # why the attempt failed, else ""
     "provider_message_id": "<...>",          # the provider's id, else ""
     "occurred_at": "2025-01-01T00:00:00.123456Z"}   # RFC 3339, UTC

Answer any 2xx (the response body is ignored) to acknowledge. Anything else
(3xx included: redirects are not followed), a connection error, or no
complete answer within the dispatcher's timeout (10 s by default) is retried
with exponential backoff and full jitter, up to ``max_attempts`` POSTs
(10 by default), and then given up (``given_up_at`` set on the row).

Delivery is at least once: the same event can arrive more than once (a
dispatcher stopping between your 2xx and its recording of it, a lease
expiring); deduplicate on ``event_id`` (the body field is covered by the
signature; the header is a convenience copy). Events are not ordered: order
the changes of one delivery by ``occurred_at`` and ``attempt``.

The signature
=============

Modelled on Stripe's webhook signatures (``Stripe-Signature``, scheme ``v1``;
https://docs.stripe.com/webhooks#verify-manually):

``Switchboard-Signature`` is a comma-separated list of ``key=value`` items:
exactly one ``t=<timestamp>`` (Unix time in whole seconds, when this POST was
signed; every retry is signed afresh) and one or more
``v1=<signature>``, where ``<signature>`` is 64 lowercase hex digits::

    v1 = hex(HMAC-SHA256(key=signing_secret, msg=f"{t}.".encode("ascii") + raw_body))

``signing_secret`` is the 32 raw bytes ``set_tenant_callback`` returned
(shown to people as 64 hex digits: the HMAC key is ``bytes.fromhex(shown)``,
not the hex text). During a secret rotation the header carries one ``v1=``
per valid secret (the new one first); a receiver accepts the event if any of
them matches its secret. Items with other keys (future schemes) must be
ignored. To verify (``verify_signature`` does exactly this):

1. Parse the header; reject it without exactly one integer ``t`` or without any ``v1``.
2. Compute the expected ``v1`` over the RAW request body bytes (before any
   JSON parsing) and compare with each ``v1`` in constant time
   (``hmac.compare_digest``).
3. Reject if ``|now - t| > 300`` seconds (replay protection; Stripe's default
   tolerance, here checked in both directions).

The signing secret
==================

The secret is a shared HMAC key (like Stripe's ``whsec_...``): the
dispatcher needs it in clear to sign, so in this first version it is stored in
clear in ``tenant_callbacks.signing_secret`` (``bytea``, 32 bytes from
``secrets.token_bytes``). It never appears in a log line, an error text, a
``repr`` or ``last_error``. Sealing it under the master key ring is a
follow-up (it needs the master-key rotation and start-up check to cover this
table too).

The queue and its states
========================

A ``callback_deliveries`` row is pending while ``delivered_at`` and
``given_up_at`` are both NULL, and due when ``next_attempt_at <= now``. A
dispatcher claims due rows (``FOR UPDATE SKIP LOCKED``) by counting the
attempt and pushing ``next_attempt_at`` one lease ahead, commits, POSTs
without holding any lock, then records the outcome: ``delivered_at`` on 2xx;
otherwise the error in ``last_error`` and the next attempt after a backoff;
or, once ``max_attempts`` POSTs failed, ``given_up_at`` with ``last_error =
"gave up after N attempts: <last error>"``. A dispatcher that dies
mid-attempt leaves its rows leased; they are due again when the lease ends,
and their ``last_error`` says that no outcome was recorded. A row of a tenant
whose endpoint was deleted is given up, not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import random
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

import asyncpg
import httpx
import structlog

from switchboard.db.pool import Connection

log = structlog.get_logger(__name__)

#: The header carrying ``t=<unix seconds>,v1=<hex HMAC-SHA256>[,v1=...]``.
SIGNATURE_HEADER = "Switchboard-Signature"
#: The header carrying the event id (the ``callback_deliveries`` row id), for receiver deduplication.
EVENT_ID_HEADER = "Switchboard-Event-Id"
#: The signature scheme this module writes and verifies.
SIGNATURE_SCHEME = "v1"
#: ``type`` of every status-change event.
EVENT_TYPE = "delivery.status_changed"
#: Length of a signing secret (bytes); shown as twice as many hex digits.
SIGNING_SECRET_BYTES = 32
#: Default accepted distance between a signature's ``t`` and now (seconds).
DEFAULT_TOLERANCE_S = 300.0
#: Longest callback URL accepted (characters).
URL_MAX_CHARS = 2048
#: Longest delivery error copied into an event, and longest ``last_error`` stored (characters).
ERROR_TEXT_MAX_CHARS = 1000
#: Delivery statuses an event can carry (the ``deliveries.status`` values).
STATUSES = frozenset({"queued", "sending", "delivered", "failed"})
#: Sent as ``User-Agent``.
USER_AGENT = "Switchboard-Callbacks/1"


class CallbackUrlError(ValueError):
    """A callback URL that is not an absolute ``http``/``https`` URL we accept; the message says why."""


# --- signatures -------------------------------------------------------------------------------------------


def _v1(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()


def signature_header(signing_secrets: Sequence[bytes], timestamp: int, body: bytes) -> str:
    """The ``Switchboard-Signature`` value signing ``body`` at ``timestamp`` with each secret.

    ``t=<timestamp>,v1=<hex>[,v1=<hex>...]``: one ``v1`` per secret, in the
    given order (current secret first during a rotation). ``timestamp`` is
    Unix time in whole seconds. Raises ``ValueError`` for no secrets.
    """
    if not signing_secrets:
        raise ValueError("at least one signing secret is needed")
    entries = (f"{SIGNATURE_SCHEME}={_v1(secret, timestamp, body)}" for secret in signing_secrets)
    return ",".join([f"t={timestamp}", *entries])


def sign_payload(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Switchboard-Signature`` value for ``body`` signed with ``secret`` at ``timestamp``.

    ``t=<timestamp>,v1=<64 hex digits of HMAC-SHA256(secret, f"{timestamp}." + body)>``;
    ``timestamp`` is Unix time in whole seconds, ``body`` the exact bytes sent.
    """
    return signature_header([secret], timestamp, body)


def verify_signature(
    secret: bytes,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (a ``Switchboard-Signature`` value) signs ``body`` with ``secret``.

    True when the header has exactly one integer ``t``, ``|now - t| <=
    tolerance_s`` (seconds; ``now`` defaults to ``time.time()``), and at least
    one ``v1`` entry equals the expected HMAC-SHA256 (compared with
    ``hmac.compare_digest``). Several ``v1`` entries are allowed (secret
    rotation); items with other keys are ignored. A malformed header gives
    False, never an exception. ``body`` must be the raw request body bytes.
    """
    timestamps: list[str] = []
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            timestamps.append(value.strip())
        elif key == SIGNATURE_SCHEME:
            candidates.append(value.strip())
    if len(timestamps) != 1 or not timestamps[0].isascii() or not timestamps[0].isdigit() or not candidates:
        return False
    timestamp = int(timestamps[0])
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _v1(secret, timestamp, body).encode("ascii")
    matched = False
    for candidate in candidates:
        # Every entry is compared (no early exit), each in constant time; bytes, so
        # a non-ASCII entry compares unequal instead of raising.
        matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    return matched


# --- enqueueing (inside the status change's transaction) ---------------------------------------------------


def _rfc3339(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("occurred_at must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def build_status_payload(
    *,
    tenant_id: uuid.UUID | str,
    delivery_id: uuid.UUID | str,
    notification_id: uuid.UUID | str,
    channel: str,
    status: str,
    attempt: int,
    error: str,
    provider_message_id: str,
    occurred_at: datetime,
) -> dict[str, object]:
    """The stored event (the POSTed body without ``event_id``), as a dict of JSON values.

    Ids become canonical UUID strings, ``occurred_at`` an RFC 3339 UTC string
    with microseconds, ``error`` is cut to 1000 characters. Raises
    ``ValueError`` for a malformed id, an unknown status, a negative attempt or
    a naive ``occurred_at``.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, not {status!r}")
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    return {
        "type": EVENT_TYPE,
        "delivery_id": str(uuid.UUID(str(delivery_id))),
        "notification_id": str(uuid.UUID(str(notification_id))),
        "tenant_id": str(uuid.UUID(str(tenant_id))),
        "channel": channel,
        "status": status,
        "attempt": attempt,
        "error": error[:ERROR_TEXT_MAX_CHARS],
        "provider_message_id": provider_message_id,
        "occurred_at": _rfc3339(occurred_at),
    }


async def enqueue_status_change(
    conn: Connection,
    *,
    tenant_id: uuid.UUID | str,
    delivery_id: uuid.UUID | str,
    notification_id: uuid.UUID | str,
    channel: str,
    status: str,
    attempt: int,
    error: str,
    provider_message_id: str,
    occurred_at: datetime,
) -> bool:
    """Queue a ``delivery.status_changed`` event if the tenant has a callback endpoint.

    One statement (``INSERT ... SELECT ... FROM tenant_callbacks WHERE
    tenant_id = $1``: a primary-key lookup and one insert), meant to run on
    the connection and inside the transaction that records the status change,
    so the event commits or rolls back with it. Returns True if a row was
    queued, False if the tenant has no endpoint. The payload is described by
    ``build_status_payload`` (which raises ``ValueError`` for bad arguments,
    before anything is written); database errors propagate.
    """
    payload = build_status_payload(
        tenant_id=tenant_id,
        delivery_id=delivery_id,
        notification_id=notification_id,
        channel=channel,
        status=status,
        attempt=attempt,
        error=error,
        provider_message_id=provider_message_id,
        occurred_at=occurred_at,
    )
    result = await conn.execute(
        """INSERT INTO callback_deliveries (tenant_id, delivery_id, payload)
           SELECT tenant_id, $2, $3::jsonb FROM tenant_callbacks WHERE tenant_id = $1""",
        uuid.UUID(str(tenant_id)),
        uuid.UUID(str(delivery_id)),
        json.dumps(payload, separators=(",", ":")),
    )
    return result == "INSERT 0 1"


# --- endpoint configuration ------------------------------------------------------------------------------


def validate_callback_url(url: str) -> str:
    """Return ``url`` stripped of surrounding whitespace if it is an acceptable callback URL.

    Accepted: an absolute ``http://`` or ``https://`` URL with a host, at most
    2048 characters, without user info (credentials in a URL end up in logs)
    and without a fragment. Raises ``CallbackUrlError`` naming the problem.
    """
    url = url.strip()
    if not url:
        raise CallbackUrlError("the callback URL is empty")
    if len(url) > URL_MAX_CHARS:
        raise CallbackUrlError(f"the callback URL is longer than {URL_MAX_CHARS} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise CallbackUrlError("the callback URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise CallbackUrlError("the callback URL is malformed (bad host or port)") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise CallbackUrlError("the callback URL must start with http:// or https://")
    if not parts.hostname:
        raise CallbackUrlError("the callback URL has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackUrlError("the callback URL must not contain user info (user:password@)")
    if parts.fragment:
        raise CallbackUrlError("the callback URL must not contain a fragment (#...)")
    if port == 0:
        raise CallbackUrlError("the callback URL has port 0")
    return url


@dataclass(frozen=True)
class TenantCallback:
    """A tenant's endpoint as the admin API may show it: never the secret.

    ``previous_secret_expires_at`` is set while a replaced secret still signs
    (a rotation with overlap), else ``None``.
    """

    tenant_id: uuid.UUID
    url: str
    created_at: datetime
    updated_at: datetime
    previous_secret_expires_at: datetime | None


def _tenant_callback(row: asyncpg.Record) -> TenantCallback:
    expires = row["previous_secret_expires_at"]
    return TenantCallback(
        tenant_id=row["tenant_id"],
        url=row["url"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        previous_secret_expires_at=expires if row["previous_signing_secret"] is not None else None,
    )


async def set_tenant_callback(
    conn: Connection, tenant_id: uuid.UUID, url: str, *, previous_secret_valid_s: float = 0.0
) -> bytes:
    """Create or replace the tenant's endpoint with a NEW signing secret; return the secret (32 bytes).

    The secret is shown once (present it as ``secret.hex()``); only this call
    ever returns it. Events already queued are sent to the new URL with the new
    secret. With ``previous_secret_valid_s > 0`` (seconds) the replaced secret
    keeps signing too (a second ``v1=`` entry) for that long, so receivers can
    switch secrets without rejecting anything; with 0 it stops at once.

    Raises ``CallbackUrlError`` for an unacceptable URL (see
    ``validate_callback_url``), ``ValueError`` for a negative
    ``previous_secret_valid_s``, ``LookupError`` if the tenant does not exist.
    """
    url = validate_callback_url(url)
    if not math.isfinite(previous_secret_valid_s) or previous_secret_valid_s < 0:
        raise ValueError("previous_secret_valid_s must be a finite number of seconds >= 0")
    secret = secrets.token_bytes(SIGNING_SECRET_BYTES)
    row = await conn.fetchrow(
        """INSERT INTO tenant_callbacks (tenant_id, url, signing_secret)
           SELECT id, $2, $3 FROM tenants WHERE id = $1
           ON CONFLICT (tenant_id) DO UPDATE
              SET url = EXCLUDED.url,
                  signing_secret = EXCLUDED.signing_secret,
                  previous_signing_secret = CASE WHEN $4::float8 > 0 THEN tenant_callbacks.signing_secret END,
                  previous_secret_expires_at =
                      CASE WHEN $4::float8 > 0 THEN now() + make_interval(secs => $4::float8) END,
                  updated_at = now()
           RETURNING tenant_id""",
        tenant_id,
        url,
        secret,
        float(previous_secret_valid_s),
    )
    if row is None:
        raise LookupError(f"no tenant with id {tenant_id}")
    return secret


async def get_tenant_callback(conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID) -> TenantCallback | None:
    """The tenant's endpoint without its secret, or ``None`` if it has none."""
    row = await conn.fetchrow(
        """SELECT tenant_id, url, created_at, updated_at, previous_signing_secret, previous_secret_expires_at
             FROM tenant_callbacks WHERE tenant_id = $1""",
        tenant_id,
    )
    return _tenant_callback(row) if row is not None else None


async def delete_tenant_callback(conn: Connection, tenant_id: uuid.UUID) -> bool:
    """Remove the tenant's endpoint; return whether it had one.

    In the same transaction its pending events are given up
    (``last_error = "gave up: the status callback endpoint was deleted"``):
    with no endpoint there is nowhere to send them. Later status changes
    queue nothing.
    """
    async with conn.transaction():
        deleted = await conn.execute("DELETE FROM tenant_callbacks WHERE tenant_id = $1", tenant_id)
        if deleted != "DELETE 1":
            return False
        await conn.execute(
            """UPDATE callback_deliveries
                  SET given_up_at = now(), last_error = 'gave up: the status callback endpoint was deleted'
                WHERE tenant_id = $1 AND delivered_at IS NULL AND given_up_at IS NULL""",
            tenant_id,
        )
        return True


# --- dispatching ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedCallback:
    """One claimed event, leased to this dispatcher until ``lease_until`` (Unix seconds).

    ``attempt`` is the 1-based number of the POST about to be made (also the
    fencing token: the outcome is recorded only if the row still has it).
    ``body`` is the exact bytes to POST and sign. The secrets are excluded
    from the repr.
    """

    event_id: int
    tenant_id: uuid.UUID
    attempt: int
    url: str
    body: bytes
    claimed_at: float
    lease_until: float
    signing_secrets: tuple[bytes, ...] = field(repr=False)


def backoff_delay_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff (seconds): uniform in [0, min(cap_s, base_s * 2**(attempt-1))].

    Source: AWS Architecture Blog, "Exponential Backoff And Jitter" (2015).
    ``attempt`` is the 1-based number of the attempt that just failed.
    """
    ceiling = min(cap_s, base_s * (2.0 ** min(max(0, attempt - 1), 60)))
    return (rng or random).uniform(0.0, ceiling)


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: all that logs show of an endpoint (a path or query may hold
    the tenant's tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in delay-seconds form (RFC 9110 section 10.2.3), else ``None``."""
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isascii() and value.isdigit() else None


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class CallbackDispatcher:
    """POSTs queued status-change events to tenants' endpoints; see the module docstring.

    ``pool``: the database. Give it its own small pool (2-4 connections) in
    production, so callback work never waits for or takes a connection the
    delivery path needs. ``http_client``: used as given (and not closed); by
    default the dispatcher makes and owns one (no redirects, at most
    ``max_concurrency`` connections) and closes it in ``aclose``.

    Units and bounds: ``batch_size`` rows claimed per round; ``max_attempts``
    POSTs per event before giving up; ``base_backoff_s``/``max_backoff_s``:
    full-jitter backoff bounds (seconds; a ``Retry-After`` in seconds on the
    answer lengthens the wait, within ``max_backoff_s``); ``timeout_s``: the
    whole POST, connecting included (seconds); ``poll_interval_s``: idle wait
    between rounds; ``max_concurrency``: POSTs in flight at once;
    ``lease_s``: how long a claimed row stays reserved, by default
    ``timeout_s * (ceil(batch_size / max_concurrency) + 1)``, long enough for
    a whole round (a row whose POST could not start early enough to end
    within its lease is released, not sent); ``error_backoff_s``: wait after a
    failed round (database down). ``clock`` gives Unix time in seconds and is
    the only time source for scheduling, leases and signatures; ``rng`` draws
    the jitter. Raises ``ValueError`` for non-positive sizes or times.

    Counters (since construction): ``delivered``, ``failed`` (attempts that
    will be retried), ``given_up``.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        http_client: httpx.AsyncClient | None = None,
        batch_size: int = 100,
        max_attempts: int = 10,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 3600.0,
        timeout_s: float = 10.0,
        poll_interval_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        max_concurrency: int = 16,
        lease_s: float | None = None,
        error_backoff_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if batch_size < 1 or max_attempts < 1 or max_concurrency < 1:
            raise ValueError("batch_size, max_attempts and max_concurrency must be >= 1")
        for name, value in (
            ("timeout_s", timeout_s),
            ("poll_interval_s", poll_interval_s),
            ("max_backoff_s", max_backoff_s),
            ("error_backoff_s", error_backoff_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds")
        if not base_backoff_s >= 0:
            raise ValueError("base_backoff_s must be >= 0 seconds")
        default_lease_s = timeout_s * (math.ceil(batch_size / max_concurrency) + 1)
        if lease_s is not None and not lease_s > timeout_s:
            raise ValueError("lease_s must be longer than timeout_s")
        self._pool = pool
        self._owns_client = http_client is None
        self._http = http_client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )
        self._batch_size = batch_size
        self._max_attempts = max_attempts
        self._base_backoff_s = base_backoff_s
        self._max_backoff_s = max_backoff_s
        self._timeout_s = timeout_s
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._lease_s = default_lease_s if lease_s is None else lease_s
        self._error_backoff_s = error_backoff_s
        self._rng = rng
        self._slots = asyncio.Semaphore(max_concurrency)
        self.delivered = 0
        self.failed = 0
        self.given_up = 0

    @property
    def lease_s(self) -> float:
        """How long a claimed row stays reserved for this dispatcher (seconds)."""
        return self._lease_s

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if the dispatcher made it."""
        if self._owns_client:
            await self._http.aclose()

    async def claim(self) -> list[ClaimedCallback]:
        """Claim up to ``batch_size`` due rows in one short transaction; return those to POST.

        Each claimed row gets ``attempts + 1``, ``next_attempt_at = now +
        lease_s`` and a ``last_error`` saying no outcome was recorded yet (what
        remains if this dispatcher dies before recording one). Due rows whose
        attempts are already spent (their last holder died) or whose tenant
        has no endpoint any more are given up here instead. ``FOR UPDATE SKIP
        LOCKED``: concurrent dispatchers claim disjoint rows, and the lease
        keeps a row from being claimed again after the commit. Database errors
        propagate (nothing is claimed then).
        """
        now = self._clock()
        lease_until = now + self._lease_s
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """WITH due AS (
                       SELECT c.id, t.url, t.signing_secret,
                              CASE WHEN t.previous_secret_expires_at > $1
                                   THEN t.previous_signing_secret END AS previous_secret,
                              (t.tenant_id IS NOT NULL AND c.attempts < $4) AS send
                         FROM callback_deliveries c
                         LEFT JOIN tenant_callbacks t ON t.tenant_id = c.tenant_id
                        WHERE c.delivered_at IS NULL AND c.given_up_at IS NULL AND c.next_attempt_at <= $1
                        ORDER BY c.next_attempt_at
                        LIMIT $2
                        FOR UPDATE OF c SKIP LOCKED)
                   UPDATE callback_deliveries AS c
                      SET attempts        = c.attempts + CASE WHEN due.send THEN 1 ELSE 0 END,
                          next_attempt_at = CASE WHEN due.send THEN $3 ELSE c.next_attempt_at END,
                          given_up_at     = CASE WHEN due.send THEN NULL ELSE $1 END,
                          last_error      = CASE
                              WHEN due.send THEN 'attempt ' || (c.attempts + 1) || ': no outcome recorded'
                                   || ' (in flight, or the dispatcher stopped mid-attempt)'
                              WHEN due.url IS NULL
                                   THEN 'gave up: the tenant has no status callback endpoint any more'
                              ELSE 'gave up after ' || c.attempts || ' attempts: ' || c.last_error END
                     FROM due
                    WHERE c.id = due.id
                RETURNING c.id, c.tenant_id, c.attempts, c.payload::text AS payload, c.last_error, due.send,
                          due.url, due.signing_secret, due.previous_secret""",
                _utc(now),
                self._batch_size,
                _utc(lease_until),
                self._max_attempts,
            )
        claimed: list[ClaimedCallback] = []
        for row in rows:
            if not row["send"]:
                self.given_up += 1
                log.warning(
                    "status callback given up",
                    event_id=row["id"],
                    tenant_id=str(row["tenant_id"]),
                    attempts=row["attempts"],
                    error=row["last_error"],
                )
                continue
            body = json.dumps(
                {"event_id": str(row["id"]), **json.loads(row["payload"])}, separators=(",", ":")
            ).encode()
            signing: tuple[bytes, ...] = (row["signing_secret"],)
            if row["previous_secret"] is not None:
                signing = (row["signing_secret"], row["previous_secret"])
            claimed.append(
                ClaimedCallback(
                    event_id=row["id"],
                    tenant_id=row["tenant_id"],
                    attempt=row["attempts"],
                    url=row["url"],
                    body=body,
                    claimed_at=now,
                    lease_until=lease_until,
                    signing_secrets=signing,
                )
            )
        return claimed

    async def run_once(self) -> int:
        """One round: claim due rows, POST them (at most ``max_concurrency`` at once), record each outcome.

        Returns how many rows were claimed for sending (0: nothing was due).
        Each outcome is recorded as soon as its POST ends. HTTP failures of
        any kind are outcomes, not exceptions; a database error propagates
        after every POST of the round has finished (rows whose outcome could
        not be recorded come back when their lease ends).
        """
        claimed = await self.claim()
        if not claimed:
            return 0
        results = await asyncio.gather(*(self._process(c) for c in claimed), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(claimed)

    async def run(self, stop: asyncio.Event) -> None:
        """Run rounds until ``stop`` is set; never raises for a failed round.

        After a round that claimed nothing it waits ``poll_interval_s`` (or
        until ``stop``); after a failed round (logged) ``error_backoff_s``.
        A round in progress when ``stop`` is set is finished first (bounded
        by ``timeout_s`` per POST). Does not close the HTTP client: use
        ``aclose`` or ``async with``.
        """
        while not stop.is_set():
            try:
                claimed = await self.run_once()
            except Exception as exc:  # asyncpg and OS errors: log, back off, try again
                log.warning("status callback round failed", error=repr(exc))
                await self._wait(stop, self._error_backoff_s)
                continue
            if claimed == 0:
                await self._wait(stop, self._poll_interval_s)

    @staticmethod
    async def _wait(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def _process(self, claimed: ClaimedCallback) -> None:
        async with self._slots:
            if self._clock() + self._timeout_s > claimed.lease_until:
                await self._release(claimed)
                return
            error, retry_after_s = await self._post(claimed)
        if error is None:
            await self._record_delivered(claimed)
        else:
            await self._record_failure(claimed, error, retry_after_s)

    async def _post(self, claimed: ClaimedCallback) -> tuple[str | None, float | None]:
        """POST one event; return ``(None, None)`` on 2xx, else ``(error text, Retry-After seconds)``."""
        timestamp = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_ID_HEADER: str(claimed.event_id),
            SIGNATURE_HEADER: signature_header(claimed.signing_secrets, timestamp, claimed.body),
        }
        try:
            async with (
                asyncio.timeout(self._timeout_s),
                self._http.stream("POST", claimed.url, content=claimed.body, headers=headers) as response,
            ):
                # The body is never read: receivers' answers are not stored or logged.
                status, reason = response.status_code, response.reason_phrase
                retry_after_s = _retry_after_s(response)
        except (TimeoutError, httpx.TimeoutException):
            return f"no answer within {self._timeout_s:g} s", None
        except httpx.HTTPError as exc:
            # httpx messages can quote the URL, whose path or query may carry the tenant's tokens.
            text = str(exc).replace(claimed.url, _origin(claimed.url)).strip()
            described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            return described[:ERROR_TEXT_MAX_CHARS], None
        except Exception as exc:  # anything else the transport raises is a failed attempt, retried
            return f"{type(exc).__name__}", None
        if 200 <= status < 300:
            return None, None
        return f"HTTP {status} {reason}".strip()[:ERROR_TEXT_MAX_CHARS], retry_after_s

    async def _record_delivered(self, claimed: ClaimedCallback) -> None:
        # Recorded even if the lease ran out and another attempt started: the receiver has the event.
        await self._pool.execute(
            """UPDATE callback_deliveries SET delivered_at = $2, given_up_at = NULL, last_error = ''
                WHERE id = $1 AND delivered_at IS NULL""",
            claimed.event_id,
            _utc(self._clock()),
        )
        self.delivered += 1
        log.debug(
            "status callback delivered",
            event_id=claimed.event_id,
            tenant_id=str(claimed.tenant_id),
            attempt=claimed.attempt,
            endpoint=_origin(claimed.url),
        )

    async def _record_failure(
        self, claimed: ClaimedCallback, error: str, retry_after_s: float | None
    ) -> None:
        now = self._clock()
        fields = {
            "event_id": claimed.event_id,
            "tenant_id": str(claimed.tenant_id),
            "attempt": claimed.attempt,
            "endpoint": _origin(claimed.url),
            "error": error,
        }
        if claimed.attempt >= self._max_attempts:
            updated = await self._pool.execute(
                """UPDATE callback_deliveries SET given_up_at = $3, last_error = $4
                    WHERE id = $1 AND attempts = $2 AND delivered_at IS NULL AND given_up_at IS NULL""",
                claimed.event_id,
                claimed.attempt,
                _utc(now),
                f"gave up after {claimed.attempt} attempts: {error}",
            )
            if updated == "UPDATE 1":
                self.given_up += 1
                log.warning("status callback given up", **fields)
            return
        delay_s = backoff_delay_s(claimed.attempt, self._base_backoff_s, self._max_backoff_s, self._rng)
        if retry_after_s is not None:
            delay_s = max(delay_s, min(retry_after_s, self._max_backoff_s))
        # Fenced on the attempt number: a dispatcher whose lease ran out does not overwrite a newer attempt.
        updated = await self._pool.execute(
            """UPDATE callback_deliveries SET next_attempt_at = $3, last_error = $4
                WHERE id = $1 AND attempts = $2 AND delivered_at IS NULL AND given_up_at IS NULL""",
            claimed.event_id,
            claimed.attempt,
            _utc(now) + timedelta(seconds=delay_s),
            f"attempt {claimed.attempt}: {error}",
        )
        if updated == "UPDATE 1":
            self.failed += 1
            log.info("status callback attempt failed, retrying", retry_in_s=round(delay_s, 3), **fields)

    async def _release(self, claimed: ClaimedCallback) -> None:
        """Hand back a row whose POST could not end within its lease, without counting the attempt."""
        await self._pool.execute(
            """UPDATE callback_deliveries SET attempts = attempts - 1, next_attempt_at = $3,
                      last_error = 'released unsent: the lease was too short for the round'
                WHERE id = $1 AND attempts = $2 AND delivered_at IS NULL AND given_up_at IS NULL""",
            claimed.event_id,
            claimed.attempt,
            _utc(self._clock()),
        )
