"""Processor webhooks in: an aiohttp endpoint for Stripe and Adyen events.

Routes (``SWITCHBOARD_WEBHOOK_ADDR``, default ``127.0.0.1:8081``; put TLS in front)::

    POST /webhooks/stripe/{tenant_id}     one Stripe Event (https://docs.stripe.com/webhooks)
    POST /webhooks/adyen/{tenant_id}      an Adyen standard webhook (https://docs.adyen.com/development-resources/webhooks)

The tenant id in the path selects whose secrets verify the delivery, and
everything the delivery can touch is that tenant's: an event signed with
another tenant's secret does not verify here, and a verified event only
changes payments of the tenant in its path, at the processor that sent it.

**Verification.** Stripe: the ``Stripe-Signature`` header
(``t=<unix s>,v1=<hex>[,v1=...]``: HMAC-SHA256 over ``"<t>." + raw body``,
constant-time compare, any of the tenant's configured endpoint secrets, so a
secret can be rolled; 300 s tolerance either way), by
:func:`payments.stripe_signature.verify_signature`. Adyen: each
NotificationRequestItem's ``additionalData.hmacSignature`` (base64
HMAC-SHA256 of the eight-field signing string under a hex key, any of the
tenant's keys), by :class:`payments.adyen_signature.AdyenWebhookVerifier`;
items are verified one by one. Secrets come from the tenant's sealed
processor configuration (:meth:`tenants.processor_cache.ProcessorCache.webhook_secrets`)
and never appear in logs, answers or stored rows.

**A delivery that verifies** is normalized (payments/webhook_events.py), then
in ONE transaction it is recorded in ``webhook_events`` (migration 0013) and
applied (payments/webhook_apply.py: transition, ledger journal, PaymentEvent
in the outbox). Only after that commit is it answered ``200`` (Stripe: a small
JSON; Adyen: ``[accepted]``, as Adyen requires). Its event id (Stripe
``evt_...``; Adyen ``eventCode:pspReference:success``) is unique per tenant and
processor among verified rows: a repeated delivery is answered ``200`` and
changes nothing (``deliveries`` is counted). Events Switchboard does not act
on are recorded as ``ignored`` and answered ``200``.

**A delivery that does not verify** (bad or missing signature, another
secret, a timestamp outside the tolerance, no secret configured) is never
trusted. It is answered ``400``; it is recorded for audit (``verified =
false``, outcome ``rejected``, the reason, its claimed event id, which takes no
part in deduplication); and the payments it claims to be about (found by the
references in it, within the path's tenant and processor) get their open
operations looked up at the processor by the janitor, soon
(:func:`payments.webhook_apply.schedule_lookups`: now, but not inside the
window in which the operation's own request may still be executing). So a
genuine event whose signature check failed for an operational reason (a
rolled secret not configured yet) still gets its payment resolved, from the
processor's own API.

**Other answers.** ``404`` for a path whose tenant id is not a UUID or not a
tenant; ``413`` for a body over ``max_body_bytes`` (default 256 KiB; Stripe
events are far smaller, Adyen JSON webhooks carry one item); ``400`` for a
body that is not the documented shape; ``503`` (with ``Retry-After``) when
PostgreSQL or the processor configuration cannot be used right now, or the
payment stayed locked longer than ``lock_timeout_ms`` -- nothing is recorded
then, and Stripe and Adyen retry non-2xx deliveries (Stripe for up to three
days, https://docs.stripe.com/webhooks#retries).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import asyncpg
import structlog
from aiohttp import web

from payments.adyen_signature import AdyenWebhookVerifier
from payments.adyen_signature import SignatureError as AdyenSignatureError
from payments.stripe_signature import DEFAULT_TOLERANCE_S, SIGNATURE_HEADER, SignatureError, verify_signature
from payments.webhook_apply import (
    DEFAULT_LOOKUP_AFTER_S,
    Applied,
    ApplyContext,
    ApplyOutcome,
    apply_notification,
    find_claimed_payments,
    schedule_lookups,
)
from payments.webhook_events import (
    MAX_REFERENCE_CHARS,
    ClaimedReferences,
    MalformedNotification,
    ProcessorNotification,
    adyen_event_id,
    adyen_items,
    claimed_references,
    normalize_adyen_item,
    normalize_stripe_event,
    stripe_envelope,
)
from switchboard.db.pool import Connection
from switchboard.settings import Settings
from tenants.processor_cache import ProcessorConfigUnusable, ProcessorNotConfigured

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Largest request body accepted, bytes (413 beyond).
MAX_BODY_BYTES: Final = 256 * 1024
#: How long applying an event waits for the payment's row lock, milliseconds (503 beyond).
DEFAULT_LOCK_TIMEOUT_MS: Final = 5_000
#: ``Retry-After`` of a 503, seconds.
RETRY_AFTER_S: Final = 5
#: What Adyen expects in the body of a successful answer.
ADYEN_ACCEPTED: Final = "[accepted]"
#: Longest rejection reason stored (characters).
_MAX_DETAIL_CHARS: Final = 1000


class WebhookSecretSource(Protocol):
    """Where a tenant's webhook secrets come from (:class:`tenants.processor_cache.ProcessorCache`)."""

    async def webhook_secrets(self, tenant_id: uuid.UUID, name: str) -> list[str]:
        """The secrets of the tenant's ``name`` processor; raises ``ProcessorNotConfigured`` /
        ``ProcessorConfigUnusable`` (and loader errors) like the processor cache."""
        ...


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any | None:
    """``body`` parsed as strict JSON (no NaN/Infinity), or None when it is not JSON."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None


def _scrubbed(value: Any) -> Any:
    """A copy of ``value`` without any ``client_secret`` (Stripe: never store it)."""
    if isinstance(value, Mapping):
        return {k: _scrubbed(v) for k, v in value.items() if k != "client_secret"}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


def stored_payload(value: Any) -> str | None:
    """The JSON text stored in ``webhook_events.payload``: ``value`` without ``client_secret``;
    None for no value or one PostgreSQL's jsonb cannot hold (a NUL character, a lone surrogate)."""
    if value is None:
        return None
    text = json.dumps(_scrubbed(value), ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")  # a lone surrogate ("\\ud800" in the body) is not UTF-8
    except UnicodeEncodeError:
        return None
    return None if "\\u0000" in text or "\x00" in text else text


def _claimed_text(value: Any) -> str:
    return value[:MAX_REFERENCE_CHARS] if isinstance(value, str) and value.isprintable() else ""


@dataclass(frozen=True)
class _Rejection:
    """A delivery (or Adyen item) whose signature did not verify: what it claims, and why."""

    event_id: str
    event_type: str
    payload: Any
    claimed: ClaimedReferences
    reason: str


@dataclass(frozen=True)
class _Verified:
    """A verified delivery (or Adyen item): its id, type, body and notification (None: not acted on)."""

    event_id: str
    event_type: str
    payload: Any
    notification: ProcessorNotification | None
    why_ignored: str = ""


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _busy(message: str) -> web.Response:
    return _error(503, message, **{"Retry-After": str(RETRY_AFTER_S)})


class WebhookReceiver:
    """The request handlers; see the module docstring.

    ``pool``: PostgreSQL. ``secrets``: the tenants' webhook secrets. ``topic_prefix``:
    Kafka topic prefix of the PaymentEvents written. ``lookup_after_s``: seconds
    (``SWITCHBOARD_PAYMENT_LOOKUP_AFTER_S``). ``tolerance_s``: Stripe signature
    timestamp tolerance, seconds. ``lock_timeout_ms``: longest wait for a payment row
    lock. ``max_body_bytes``: request body limit. ``clock``: UNIX seconds (Stripe
    timestamps). Raises ``ValueError`` for non-positive limits.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        secrets: WebhookSecretSource,
        *,
        topic_prefix: str = "",
        lookup_after_s: float = DEFAULT_LOOKUP_AFTER_S,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
        max_body_bytes: int = MAX_BODY_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not lookup_after_s > 0 or not tolerance_s > 0 or lock_timeout_ms < 1 or max_body_bytes < 1:
            raise ValueError("webhook receiver limits must be positive")
        self._pool = pool
        self._secrets = secrets
        self._ctx = ApplyContext(topic_prefix=topic_prefix, lookup_after_s=lookup_after_s)
        self._tolerance_s = tolerance_s
        self._lock_timeout_ms = lock_timeout_ms
        self.max_body_bytes = max_body_bytes
        self._clock = clock

    def __repr__(self) -> str:
        return f"WebhookReceiver(max_body_bytes={self.max_body_bytes}, tolerance_s={self._tolerance_s})"

    # -- common steps ------------------------------------------------------------------------------

    async def _prelude(
        self, request: web.Request, processor: str
    ) -> tuple[uuid.UUID, bytes, list[str]] | web.Response:
        """Tenant id, raw body and the tenant's secrets; or the error answer."""
        try:
            tenant_id = uuid.UUID(request.match_info["tenant_id"])
        except ValueError:
            return _error(404, "no such tenant")
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return _error(413, f"the body exceeds {self.max_body_bytes} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the body exceeds {self.max_body_bytes} bytes")
        try:
            known = await self._pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)", tenant_id
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.error("webhook: database unavailable", processor=processor, error=type(exc).__name__)
            return _busy("the database is unavailable; retry later")
        if not known:
            return _error(404, "no such tenant")
        try:
            secrets = await self._secrets.webhook_secrets(tenant_id, processor)
        except ProcessorNotConfigured:
            secrets = []
        except ProcessorConfigUnusable as exc:
            log.error(
                "webhook: processor configuration unusable", tenant_id=str(tenant_id), processor=processor
            )
            return _busy(f"the {processor} configuration cannot be used now ({exc.code})")
        except Exception as exc:
            log.error(
                "webhook: loading secrets failed",
                tenant_id=str(tenant_id),
                processor=processor,
                error=type(exc).__name__,
            )
            return _busy("the processor configuration cannot be loaded now; retry later")
        return tenant_id, body, secrets

    async def _transaction(self, work: Callable[[Connection], Awaitable[T]]) -> T | web.Response:
        """Run ``work`` in one transaction with the lock timeout; a 503 answer when PostgreSQL fails."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "SELECT set_config('lock_timeout', $1, true)", f"{self._lock_timeout_ms}ms"
                )
                return await work(conn)
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            return _busy("the payment is being changed; retry later")
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
            log.error("webhook: database unavailable", error=type(exc).__name__)
            return _busy("the database is unavailable; retry later")

    async def _record_verified(
        self, conn: Connection, tenant_id: uuid.UUID, processor: str, event: _Verified
    ) -> tuple[bool, Applied]:
        """Record a verified event and apply it (same transaction). Returns (duplicate, outcome)."""
        row = await conn.fetchrow(
            """INSERT INTO webhook_events (tenant_id, processor, event_id, event_type, verified, payload,
                                           outcome, detail)
               VALUES ($1, $2, $3, $4, true, $5::jsonb, 'ignored', $6)
               ON CONFLICT (tenant_id, processor, event_id) WHERE verified
               DO UPDATE SET deliveries = webhook_events.deliveries + 1, last_received_at = now()
               RETURNING id, (xmax = 0) AS inserted, outcome, detail, payment_id""",
            tenant_id,
            processor,
            event.event_id,
            event.event_type[:MAX_REFERENCE_CHARS],
            stored_payload(event.payload),
            event.why_ignored[:_MAX_DETAIL_CHARS],
        )
        assert row is not None
        if not row["inserted"]:
            return True, Applied(ApplyOutcome(row["outcome"]), row["payment_id"], row["detail"])
        if event.notification is None:
            return False, Applied(ApplyOutcome.IGNORED, None, event.why_ignored)
        applied = await apply_notification(conn, tenant_id, event.notification, self._ctx)
        await conn.execute(
            "UPDATE webhook_events SET outcome = $2, detail = $3, payment_id = $4 WHERE id = $1",
            row["id"],
            applied.outcome.value,
            applied.detail[:_MAX_DETAIL_CHARS],
            applied.payment_id,
        )
        return False, applied

    async def _record_rejected(
        self, conn: Connection, tenant_id: uuid.UUID, processor: str, rejection: _Rejection
    ) -> int:
        """Record a delivery that did not verify and look up the payments it names; returns the
        number of operations whose lookup was scheduled."""
        payments = await find_claimed_payments(conn, tenant_id, processor, rejection.claimed)
        scheduled = await schedule_lookups(conn, tenant_id, payments, self._ctx.lookup_after_s)
        detail = f"{rejection.reason}; {len(payments)} payment(s) named, {scheduled} lookup(s) scheduled"
        await conn.execute(
            """INSERT INTO webhook_events (tenant_id, processor, event_id, event_type, verified, payload,
                                           outcome, detail, payment_id)
               VALUES ($1, $2, $3, $4, false, $5::jsonb, 'rejected', $6, $7)""",
            tenant_id,
            processor,
            rejection.event_id,
            rejection.event_type,
            stored_payload(rejection.payload),
            detail[:_MAX_DETAIL_CHARS],
            payments[0] if payments else None,
        )
        log.warning(
            "webhook rejected: signature not verified; looking the payment up instead",
            tenant_id=str(tenant_id),
            processor=processor,
            reason=rejection.reason,
            claimed_event_id=rejection.event_id[:100],
            payments=len(payments),
            lookups=scheduled,
        )
        return scheduled

    async def _record(
        self,
        tenant_id: uuid.UUID,
        processor: str,
        verified: list[_Verified],
        rejected: list[_Rejection],
    ) -> list[tuple[bool, Applied]] | web.Response:
        async def work(conn: Connection) -> list[tuple[bool, Applied]]:
            results = [await self._record_verified(conn, tenant_id, processor, event) for event in verified]
            for rejection in rejected:
                await self._record_rejected(conn, tenant_id, processor, rejection)
            return results

        results = await self._transaction(work)
        if isinstance(results, web.Response):
            return results
        for event, (duplicate, applied) in zip(verified, results, strict=True):
            log.info(
                "webhook event",
                tenant_id=str(tenant_id),
                processor=processor,
                event_id=event.event_id,
                event_type=event.event_type,
                duplicate=duplicate,
                outcome=applied.outcome.value,
                payment_id=str(applied.payment_id) if applied.payment_id else None,
            )
        return results

    # -- Stripe --------------------------------------------------------------------------------------

    def _stripe_failure(self, body: bytes, header: str | None, secrets: list[str]) -> str | None:
        if not secrets:
            return "no webhook signing secret is configured for this tenant's stripe processor"
        try:
            verify_signature(body, header, secrets, tolerance_s=self._tolerance_s, clock=self._clock)
        except SignatureError as exc:
            return str(exc)
        except ValueError:
            return "a configured webhook signing secret is unusable"
        return None

    async def handle_stripe(self, request: web.Request) -> web.Response:
        """``POST /webhooks/stripe/{tenant_id}``: one Stripe Event (see the module docstring)."""
        prelude = await self._prelude(request, "stripe")
        if isinstance(prelude, web.Response):
            return prelude
        tenant_id, body, secrets = prelude
        parsed = parse_json(body)
        failure = self._stripe_failure(body, request.headers.get(SIGNATURE_HEADER), secrets)
        if failure is not None:
            claimed = parsed if isinstance(parsed, Mapping) else {}
            rejection = _Rejection(
                event_id=_claimed_text(claimed.get("id")),
                event_type=_claimed_text(claimed.get("type")),
                payload=parsed,
                claimed=claimed_references("stripe", parsed),
                reason=failure,
            )
            recorded = await self._record(tenant_id, "stripe", [], [rejection])
            if isinstance(recorded, web.Response):
                return recorded
            return _error(400, "signature verification failed")
        if not isinstance(parsed, Mapping):
            return _error(400, "the body is not a JSON object")
        try:
            event_id, event_type = stripe_envelope(parsed)
        except MalformedNotification as exc:
            return _error(400, f"not a Stripe event: {exc}")
        why = ""
        try:
            notification = normalize_stripe_event(parsed)
        except MalformedNotification as exc:
            notification, why = None, f"malformed {event_type}: {exc}"
        if notification is None and not why:
            why = f"event type {event_type} is not acted on"
        event = _Verified(event_id, event_type, parsed, notification, why)
        results = await self._record(tenant_id, "stripe", [event], [])
        if isinstance(results, web.Response):
            return results
        ((duplicate, applied),) = results
        return web.json_response({"received": True, "duplicate": duplicate, "outcome": applied.outcome.value})

    # -- Adyen ---------------------------------------------------------------------------------------

    async def handle_adyen(self, request: web.Request) -> web.Response:
        """``POST /webhooks/adyen/{tenant_id}``: a standard webhook batch (see the module docstring).

        Answers ``[accepted]`` when every item verified (and was recorded); ``400`` when any
        did not (the verified ones are recorded and applied all the same).
        """
        prelude = await self._prelude(request, "adyen")
        if isinstance(prelude, web.Response):
            return prelude
        tenant_id, body, secrets = prelude
        parsed = parse_json(body)
        try:
            items = adyen_items(parsed)
        except MalformedNotification as exc:
            rejection = _Rejection("", "", parsed, claimed_references("adyen", parsed), f"malformed: {exc}")
            recorded = await self._record(tenant_id, "adyen", [], [rejection])
            if isinstance(recorded, web.Response):
                return recorded
            return _error(400, f"not an Adyen standard webhook: {exc}")
        verifier: AdyenWebhookVerifier | None = None
        if secrets:
            try:
                verifier = AdyenWebhookVerifier(secrets)
            except ValueError:
                verifier = None
        verified: list[_Verified] = []
        rejected: list[_Rejection] = []
        for item in items:
            failure = self._adyen_failure(verifier, item)
            event_id = ""
            if failure is None:
                try:
                    event_id = adyen_event_id(item)
                except MalformedNotification as exc:
                    failure = f"malformed: {exc}"
            if failure is not None:
                rejected.append(self._adyen_rejection(item, failure))
                continue
            why = ""
            try:
                notification = normalize_adyen_item(item)
            except MalformedNotification as exc:
                notification, why = None, f"malformed {item.get('eventCode')}: {exc}"
            if notification is None and not why:
                why = f"eventCode {item.get('eventCode')} is not acted on"
            verified.append(_Verified(event_id, str(item.get("eventCode")), item, notification, why))
        results = await self._record(tenant_id, "adyen", verified, rejected)
        if isinstance(results, web.Response):
            return results
        if rejected:
            return _error(400, f"{len(rejected)} of {len(items)} notification item(s) failed verification")
        return web.Response(text=ADYEN_ACCEPTED, content_type="text/plain")

    @staticmethod
    def _adyen_failure(verifier: AdyenWebhookVerifier | None, item: Mapping[str, Any]) -> str | None:
        if verifier is None:
            return "no HMAC key is configured for this tenant's adyen processor"
        try:
            verifier.verify_item(item)
        except AdyenSignatureError as exc:
            return exc.reason
        return None

    @staticmethod
    def _adyen_rejection(item: Mapping[str, Any], reason: str) -> _Rejection:
        try:
            claimed_id = adyen_event_id(item)
        except MalformedNotification:
            claimed_id = ""
        return _Rejection(
            event_id=claimed_id,
            event_type=_claimed_text(item.get("eventCode")),
            payload=item,
            claimed=claimed_references("adyen", {"notificationItems": [{"NotificationRequestItem": item}]}),
            reason=reason,
        )


def create_webhook_app(receiver: WebhookReceiver) -> web.Application:
    """The aiohttp application: the two routes of the module docstring, body limit
    ``receiver.max_body_bytes`` (aiohttp's ``client_max_size``)."""
    app = web.Application(client_max_size=receiver.max_body_bytes)
    app.router.add_post("/webhooks/stripe/{tenant_id}", receiver.handle_stripe)
    app.router.add_post("/webhooks/adyen/{tenant_id}", receiver.handle_adyen)
    return app


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:8081"`` for IPv6) -> ``(host, port)``; raises ``ValueError``."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"webhook address {address!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


@dataclass
class WebhookServer:
    """A running webhook endpoint: ``host``, the bound ``port``; :meth:`stop` it."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def base_url(self) -> str:
        """``http://<host>:<port>`` (for tests and logs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (at most the runner's shutdown timeout)."""
        await self.runner.cleanup()


async def start_webhook_server(
    pool: asyncpg.Pool,
    secrets: WebhookSecretSource,
    settings: Settings,
    address: str | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> WebhookServer:
    """Listen on ``address`` (default ``settings.webhook_addr``; port 0 picks a free one).

    Uses ``settings.kafka_topic_prefix`` and ``settings.payment_lookup_after_s``.
    Raises ``ValueError`` for a malformed address and ``OSError`` when it cannot bind.
    """
    host, port = parse_address(address or settings.webhook_addr)
    receiver = WebhookReceiver(
        pool,
        secrets,
        topic_prefix=settings.kafka_topic_prefix,
        lookup_after_s=settings.payment_lookup_after_s,
        max_body_bytes=max_body_bytes,
    )
    runner = web.AppRunner(create_webhook_app(receiver), access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for address_info in runner.addresses:
        if isinstance(address_info, tuple) and len(address_info) >= 2:
            bound = int(address_info[1])
            break
    return WebhookServer(runner, host, bound)


async def run_webhook_server(settings: Settings) -> None:
    """``switchboard webhooks``: serve the webhook endpoint until SIGTERM/SIGINT.

    Opens the pool, verifies the master key ring, builds the processor cache (its
    webhook secrets) with the tenant change listener that drops a tenant's cached
    secrets when its configuration changes, and listens on ``SWITCHBOARD_WEBHOOK_ADDR``.
    The drain stops accepting and lets requests in flight finish within
    ``SWITCHBOARD_SHUTDOWN_GRACE_S``.
    """
    from switchboard.db.pool import create_pool
    from switchboard.signals import drain, wait_for_shutdown_signal
    from tenants.invalidation import TenantChangeListener
    from tenants.key_ring import load_verified_key_ring
    from tenants.processor_cache import processor_cache_for

    pool = await create_pool(settings)
    ring = await load_verified_key_ring(settings, pool)
    processors = processor_cache_for(pool, settings, ring)
    listener = TenantChangeListener(
        settings.require_database_url(), processors.invalidate, processors.invalidate_all
    )
    listening = asyncio.create_task(listener.run())
    server = await start_webhook_server(pool, processors, settings)
    log.info("webhook endpoint serving", address=settings.webhook_addr, port=server.port)
    await wait_for_shutdown_signal()

    async def shut_down() -> None:
        await server.stop()
        listener.stop()
        await listening
        await processors.close()
        await pool.close()

    await drain(shut_down(), settings.shutdown_grace_s)
    log.info("webhook endpoint stopped")
