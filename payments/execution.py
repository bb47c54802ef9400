"""Payment execution: run charges, captures, cancels and refunds at the processors and record the outcome.

Plain domain functions called by the payment worker (payments/worker.py, one
call per consumed ``PaymentCommand``) and by the janitor (payments/janitor.py,
for operations whose outcome is not known yet). Transport stays at the edges:
these functions take ids, talk to PostgreSQL and to a :class:`ProcessorSource`
(the tenant's processor connectors) and return an :class:`Outcome`.

Every function follows the same three steps:

1. **Claim** (one transaction under the payment row lock,
   :func:`payments.store.lock_payment`): check the state machine, write the
   operation row BEFORE the processor is called (a charge attempt with its key
   ``{payment_id}_{attempt_no}``, :func:`payments.store.start_attempt`; a
   capture or refund moves to PROCESSING) and give it a **lease**:
   ``next_lookup_at = now + lookup_after_s``. Commit.
2. **Call** the processor outside any transaction, with the operation's
   idempotency key (charge: ``{payment_id}_{attempt_no}``; capture and refund:
   their id; cancel: ``{payment_id}_cancel``). A
   :class:`~payments.processor.RetryableProcessorError` ("not processed") is
   retried with the SAME key, at most ``retry_max_sends`` sends, waiting
   ``Retry-After`` or a doubling backoff of at most ``retry_max_s`` (only this
   payment's lane waits: no other payment or tenant is held up), renewing the
   lease before each resend.
3. **Record** (one transaction under the payment row lock): the operation's
   outcome, the payment's transition (:func:`payments.store.record_transition`),
   the ledger journal (:func:`payments.ledger.post_journal`, same transaction)
   and the ``PaymentEvent`` in the outbox (:mod:`payments.events`, same
   transaction), all written by :mod:`payments.outcomes` (which processor
   webhooks record their outcomes with too).

**Idempotent consumer.** A command for a payment already past its step finds
nothing to claim and returns :attr:`Outcome.SKIPPED` (so do the copies the
payment sweeper, payments/sweeper.py, publishes for commands it presumes lost). A charge attempt left
PENDING by a worker that died mid-call is sent again with the SAME key when
its command is redelivered (within ``resend_window_s``, well inside the
processors' key retention: Stripe keeps keys at least 24 h, Adyen at least 31
days), so the processor answers the first request's result instead of
charging again. The lease makes sure the janitor never looks up an operation
whose request may still be executing: it only picks operations whose
``next_lookup_at`` has passed, and ``lookup_after_s`` (default 60 s) must
exceed the processor timeout (Stripe and Adyen clients: 30 s a request).

**Outcome rules of a charge attempt** (``SUCCEEDED`` below means "the
processor charged"):

=====================================  ===============================================================
answer                                 what happens
=====================================  ===============================================================
succeeded (automatic capture)          attempt SUCCEEDED, payment SUCCEEDED, capture journal
                                       (``capture:<payment id>``, reference = the processor's id),
                                       event ``payment.succeeded``
authorized (manual capture)            attempt SUCCEEDED, payment REQUIRES_CAPTURE, no journal
                                       (an authorization moves no money), ``payment.requires_capture``
processing (outcome follows)           attempt stays PENDING, payment PROCESSING; the janitor looks it
                                       up on the lookup schedule
:class:`Declined`, or a failed /       attempt FAILED, payment FAILED, ``payment.failed``. **No
canceled payment                       failover**: a decline is the customer's bank answering, not a
                                       processor fault; another processor would ask the same bank.
:class:`PermanentProcessorError`       attempt FAILED and, in the same transaction, **failover**: a new
(auth/config errors, invalid           attempt at the next processor of the route (see below); without
request, processor not configured),    one the payment is FAILED (``payment.failed``). Only when the
or Retryable with retries exhausted    failure proves nothing was charged: no request with the attempt's
                                       key had been sent before this call (its ``sends`` counter, counted
                                       and committed before every send and lookup, was 0), no one else
                                       took its lease meanwhile, and no answer said "a request with this
                                       key is in progress" (:data:`IN_PROGRESS_CODES`). Otherwise as
                                       Ambiguous: a resent attempt's 401 says nothing about its first send.
:class:`AmbiguousProcessorError`       attempt UNKNOWN, payment UNKNOWN, ``payment.unknown``,
(timeout, reset, 5xx, malformed)       ``next_lookup_at = now + lookup_schedule_s[0]``. Nothing else
                                       happens to the payment (no new attempt, no failover, no capture,
                                       cancel or refund) until the janitor resolves it.
=====================================  ===============================================================

**Route and failover.** A payment's route is its tenant's ordered processor
list (payments/routing.py: the first matching routing rule, else
configuration priority). An attempt goes to the first processor of the
route not tried yet for this payment whose circuit breaker lets a call
through; an OPEN breaker is skipped (that is a failover too). When every
remaining processor's breaker is open, the command is deferred (re-enqueued
in the outbox, due when the first breaker half-opens) until the payment has
waited ``breaker_wait_max_s``, after which the first remaining processor is
tried anyway. A failover never returns to a processor already tried for the
payment. Breakers count every processor error except a decline as a failure
and every answer (including a decline) as a success.

**Captures, cancels, refunds.** Sent with their own key; a success posts the
capture (``capture:<capture id>``) or refund (``refund:<refund id>``) journal
and updates ``amount_captured_minor`` / ``amount_refunded_minor`` in the same
transaction. A processor that accepts the request and reports the outcome
later (Adyen's ``received``, Stripe's ``pending`` refund) leaves it
PROCESSING for the processor's webhook. Ambiguous answers make the capture
or refund UNKNOWN (the payment's status does not change: it stays
REQUIRES_CAPTURE / SUCCEEDED, and the UNKNOWN operation blocks another
capture and keeps its refund amount reserved). The janitor's "lookup" of a
capture, cancel or refund is the same request again with the same
idempotency key, which Stripe and Adyen answer from their idempotency store
(the first result, once executed) or execute now, once. It is only done
within ``replay_window_s`` (20 h, inside Stripe's 24 h key retention); later
the operation is left UNKNOWN for an operator (logged). Before a refund is
sent, the refunds already sent or done plus this one are checked against the
captured amount under the row lock (the gateway checked it at accept time;
this keeps the processor from ever being asked for more).
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Final, Generic, Protocol, TypeVar

import asyncpg
import structlog

from payments import store
from payments.outcomes import (
    OPEN_ATTEMPT_PAYMENT_STATUS,
    OPERATION_TABLES,
    ChargeAttempt,
    Operation,
    OperationKind,
    clip,
    fail_attempt,
    move_operation,
    publish_event,
    record_canceled,
    record_charged,
    record_declined,
    record_operation_failed,
    record_operation_succeeded,
)
from payments.processor import (
    AmbiguousProcessorError,
    CaptureMethod,
    ChargeRequest,
    Declined,
    PaymentProcessor,
    PermanentProcessorError,
    ProcessorError,
    ProcessorPayment,
    ProcessorRefund,
    ProcessorStatus,
    RetryableProcessorError,
)
from payments.processor import RefundStatus as ProcessorRefundStatus
from payments.routing import BreakerSource, load_route_rules, route_for
from payments.state_machine import (
    AttemptStatus,
    CaptureStatus,
    OperationTrigger,
    PaymentStatus,
    PaymentTrigger,
    RefundStatus,
)
from switchboard.db.pool import Connection
from switchboard.payments.v1 import events_pb2
from switchboard.settings import Settings
from tenants.processor_cache import ProcessorHandle

log = structlog.get_logger(__name__)

_P = PaymentStatus
_A = AttemptStatus
_O = OperationTrigger
T = TypeVar("T")

#: Error codes that say "a request with this idempotency key is being executed" (Stripe
#: ``idempotency_key_in_use`` / ``lock_timeout`` / a bare 409, Adyen errorCode ``704``): the
#: request may yet charge, so exhausting retries on them never counts as "not charged".
IN_PROGRESS_CODES: Final = frozenset({"idempotency_key_in_use", "lock_timeout", "conflict", "704"})
#: The processor name of the attempt recorded when a payment has no processor to go to.
NO_PROCESSOR: Final = "none"
#: At most this many attempts one call drives (each at a processor not tried yet).
MAX_ATTEMPTS_PER_CALL: Final = 32
#: Shortest deferral of a command while breakers are open, seconds.
MIN_DEFER_S: Final = 1.0


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (the default :attr:`Executor.clock`)."""
    return datetime.now(UTC)


def parse_lookup_schedule(text: str) -> tuple[float, ...]:
    """Parse ``SWITCHBOARD_PAYMENT_LOOKUP_SCHEDULE_S``: comma-separated positive seconds, e.g.
    ``"300,3600,86400"`` (5 min, 1 h, then daily: the last step repeats).

    Raises ``ValueError`` naming the bad item, or for an empty schedule.
    """
    steps: list[float] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"lookup schedule step {item!r} is not a number of seconds") from None
        if not value > 0:
            raise ValueError(f"lookup schedule step {item!r} must be positive")
        steps.append(value)
    if not steps:
        raise ValueError("the lookup schedule needs at least one step (seconds)")
    return tuple(steps)


@dataclass(frozen=True)
class ExecutionPolicy:
    """Timing rules of execution (all durations in seconds).

    ``lookup_schedule_s``: waits before the janitor's 1st, 2nd, ... lookup of an
    UNKNOWN operation; the last repeats. ``lookup_after_s``: the lease of an operation
    in flight (must exceed the processor's request timeout). ``retry_max_sends``: sends
    of one request on retryable errors. ``retry_base_s`` / ``retry_max_s``: backoff
    base and the longest wait in a lane (a longer ``Retry-After`` ends the retries).
    ``breaker_wait_max_s``: how long a payment waits for an open breaker before it is
    tried anyway. ``resend_window_s``: a PENDING attempt older than this is not sent
    again by a redelivered command (left to the janitor). ``replay_window_s``: the
    janitor repeats a capture, cancel or refund with its key only this long after it
    was requested. Raises ``ValueError`` for non-positive values.
    """

    lookup_schedule_s: tuple[float, ...] = (300.0, 3600.0, 86400.0)
    lookup_after_s: float = 60.0
    retry_max_sends: int = 3
    retry_base_s: float = 0.2
    retry_max_s: float = 2.0
    breaker_wait_max_s: float = 900.0
    resend_window_s: float = 3600.0
    replay_window_s: float = 20 * 3600.0

    def __post_init__(self) -> None:
        if not self.lookup_schedule_s or min(self.lookup_schedule_s) <= 0:
            raise ValueError("lookup_schedule_s needs positive steps")
        if self.retry_max_sends < 1:
            raise ValueError("retry_max_sends must be at least 1")
        durations = (
            self.lookup_after_s,
            self.retry_base_s,
            self.retry_max_s,
            self.breaker_wait_max_s,
            self.resend_window_s,
            self.replay_window_s,
        )
        if min(durations) <= 0:
            raise ValueError("execution durations must be positive")

    @classmethod
    def from_settings(cls, settings: Settings) -> ExecutionPolicy:
        """The policy of the ``SWITCHBOARD_PAYMENT_*`` settings."""
        return cls(
            lookup_schedule_s=parse_lookup_schedule(settings.payment_lookup_schedule_s),
            lookup_after_s=settings.payment_lookup_after_s,
            retry_max_sends=settings.payment_retry_max_sends,
            retry_base_s=settings.payment_retry_base_ms / 1000,
            retry_max_s=settings.payment_retry_max_ms / 1000,
            breaker_wait_max_s=settings.payment_breaker_wait_max_s,
        )

    def lookup_delay_s(self, lookups: int) -> float:
        """The wait before the next lookup after ``lookups`` scheduled ones (0-based step)."""
        return self.lookup_schedule_s[min(lookups, len(self.lookup_schedule_s) - 1)]

    def retry_delay_s(self, sends: int, retry_after_s: float | None) -> float | None:
        """The wait before send ``sends + 1`` after a retryable error: ``Retry-After`` when the
        processor gave one, else ``retry_base_s * 2**(sends-1)``; None when it exceeds
        ``retry_max_s`` (retrying in the lane would hold it up too long)."""
        delay = retry_after_s if retry_after_s is not None else self.retry_base_s * 2 ** max(0, sends - 1)
        return None if delay > self.retry_max_s else delay


class ProcessorSource(Protocol):
    """The tenant's processor connectors (:class:`tenants.processor_cache.ProcessorCache`)."""

    async def get_processor(self, tenant_id: uuid.UUID, name: str) -> PaymentProcessor:
        """The tenant's ``name`` connector; raises ProcessorError subclasses when unusable."""
        ...

    async def processors_for(self, tenant_id: uuid.UUID) -> list[ProcessorHandle]:
        """The tenant's usable processors in priority order."""
        ...


@dataclass
class Executor:
    """What execution needs: the pool, the processors, the breakers and the policy.

    ``topic_prefix``: the Kafka topic prefix of events and deferred commands.
    ``clock``: timezone-aware "now" for leases and the lookup schedule (tests inject a
    fake one). ``sleep``: waits between retries of one request (seconds).
    """

    pool: asyncpg.Pool
    processors: ProcessorSource
    breakers: BreakerSource
    policy: ExecutionPolicy = field(default_factory=ExecutionPolicy)
    topic_prefix: str = ""
    clock: Callable[[], datetime] = utc_now
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


class Outcome(enum.StrEnum):
    """What one execution call did."""

    #: The operation happened (charged, captured, canceled, refunded).
    SUCCEEDED = "succeeded"
    #: The charge was authorized; a capture follows (manual capture).
    REQUIRES_CAPTURE = "requires_capture"
    #: The processor accepted it and reports the outcome later (webhook or lookup).
    PROCESSING = "processing"
    #: Definitely not done, and nothing more follows.
    FAILED = "failed"
    #: The answer was lost: the janitor looks it up on the lookup schedule.
    UNKNOWN = "unknown"
    #: It will be sent again later with the same idempotency key.
    RETRY_SCHEDULED = "retry_scheduled"
    #: Every remaining processor's breaker is open: the command comes back later.
    DEFERRED = "deferred"
    #: Nothing to do (already past this step, or another worker's / the janitor's turn).
    SKIPPED = "skipped"
    #: Past the replay window: left UNKNOWN for an operator (logged).
    NEEDS_OPERATOR = "needs_operator"


def charge_request(payment: store.PaymentRow, attempt_no: int) -> ChargeRequest:
    """The processor request of ``payment``'s attempt ``attempt_no`` (a pure function of the
    stored payment, so a lookup replays exactly what the attempt sent)."""
    return ChargeRequest(
        payment_id=payment.id,
        attempt_no=attempt_no,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        payment_method=payment.payment_method,
        capture_method=CaptureMethod(payment.capture_method),
        customer_reference=payment.customer_reference,
        description=payment.description,
        metadata=dict(payment.metadata),
    )


async def _enqueue_create(
    conn: Connection, topic_prefix: str, payment: store.PaymentRow, due: datetime
) -> None:
    """Defer ``payment``'s charge: a new CREATE command in the outbox, due at ``due``."""
    command = store.payment_command(
        events_pb2.PAYMENT_COMMAND_KIND_CREATE, payment.tenant_id, payment.id, payment.request_id, utc_now()
    )
    await store.enqueue_command(conn, topic_prefix, command, available_at=due)


# --- calling a processor --------------------------------------------------------------------------


@dataclass
class _Call(Generic[T]):
    """The result of one request with its retries: the answer, or the last error."""

    value: T | None = None
    error: ProcessorError | None = None
    errors: list[ProcessorError] = field(default_factory=list)
    exhausted: bool = False
    #: Someone else renewed the lease between two sends: we stopped and record nothing.
    lost: bool = False

    @property
    def answered(self) -> bool:
        """The processor answered about this request (a result or a decline)."""
        return self.value is not None or isinstance(self.error, Declined)

    def proves_not_done(self, fresh: bool) -> bool:
        """Whether the failure proves the processor did not do it (see the module docstring)."""
        if not fresh or self.lost or self.value is not None:
            return False
        if isinstance(self.error, AmbiguousProcessorError) or self.error is None:
            return False
        if any(e.code in IN_PROGRESS_CODES for e in self.errors):
            return False
        return isinstance(self.error, PermanentProcessorError) or self.exhausted


async def _call_with_retries(
    ex: Executor, call: Callable[[], Awaitable[T]], renew_lease: Callable[[], Awaitable[bool]]
) -> _Call[T]:
    """Send with :attr:`ExecutionPolicy.retry_max_sends` tries on RetryableProcessorError."""
    errors: list[ProcessorError] = []
    for sends in range(1, ex.policy.retry_max_sends + 1):
        try:
            return _Call(value=await call(), errors=errors)
        except RetryableProcessorError as exc:
            errors.append(exc)
            delay = ex.policy.retry_delay_s(sends, exc.retry_after_s)
            if sends == ex.policy.retry_max_sends or delay is None:
                break
            await ex.sleep(delay)
            if not await renew_lease():
                return _Call(error=exc, errors=errors, lost=True)
        except ProcessorError as exc:
            errors.append(exc)
            return _Call(error=exc, errors=errors)
    return _Call(error=errors[-1], errors=errors, exhausted=True)


async def _renew(ex: Executor, sql: str, *keys: object, lease: list[datetime]) -> bool:
    """Move a lease (``lease[0]``) forward if it is still ours; updates ``lease[0]``."""
    new = ex.clock() + timedelta(seconds=ex.policy.lookup_after_s)
    ok = await ex.pool.fetchval(sql, *keys, lease[0], new)
    if ok:
        lease[0] = new
    return bool(ok)


# --- charges --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Send:
    """An attempt to send: claimed (lease ``lease``) and committed."""

    payment: store.PaymentRow
    attempt_no: int
    processor: str
    lease: datetime
    #: No request with the attempt's key was sent before this call (``sends`` was 0).
    fresh: bool


@dataclass(frozen=True)
class _Attempt(ChargeAttempt):
    next_lookup_at: datetime | None
    lookups: int
    sends: int
    started_at: datetime


_ATTEMPT_SELECT = """SELECT attempt_no, status, processor, next_lookup_at, lookups, sends, started_at
                       FROM payment_attempts WHERE payment_id = $1 AND tenant_id = $2"""


def _attempt(row: asyncpg.Record) -> _Attempt:
    return _Attempt(
        attempt_no=row["attempt_no"],
        status=AttemptStatus(row["status"]),
        processor=row["processor"],
        next_lookup_at=row["next_lookup_at"],
        lookups=row["lookups"],
        sends=row["sends"],
        started_at=row["started_at"],
    )


async def _lock_attempt(
    conn: Connection, payment: store.PaymentRow, attempt_no: int | None
) -> _Attempt | None:
    """Attempt ``attempt_no`` of the payment (the latest when None), locked FOR UPDATE."""
    if attempt_no is None:
        sql = _ATTEMPT_SELECT + " ORDER BY attempt_no DESC LIMIT 1 FOR UPDATE"
        row = await conn.fetchrow(sql, payment.id, payment.tenant_id)
    else:
        sql = _ATTEMPT_SELECT + " AND attempt_no = $3 FOR UPDATE"
        row = await conn.fetchrow(sql, payment.id, payment.tenant_id, attempt_no)
    return None if row is None else _attempt(row)


async def _set_attempt_lease(
    conn: Connection, payment: store.PaymentRow, attempt_no: int, at: datetime, *, lookups: int | None = None
) -> None:
    await conn.execute(
        """UPDATE payment_attempts
              SET next_lookup_at = $4, lookups = coalesce($5, lookups), updated_at = now()
            WHERE payment_id = $1 AND tenant_id = $2 AND attempt_no = $3""",
        payment.id,
        payment.tenant_id,
        attempt_no,
        at,
        lookups,
    )


async def _claim_send(conn: Connection, payment: store.PaymentRow, attempt_no: int, lease: datetime) -> bool:
    """Give the attempt the lease ``lease`` and count the send about to happen (committed before
    the processor is called). Returns whether it is the attempt's first send."""
    before = await conn.fetchval(
        """UPDATE payment_attempts SET next_lookup_at = $4, sends = sends + 1, updated_at = now()
            WHERE payment_id = $1 AND tenant_id = $2 AND attempt_no = $3
        RETURNING sends - 1""",
        payment.id,
        payment.tenant_id,
        attempt_no,
        lease,
    )
    return int(before) == 0


@dataclass(frozen=True)
class _Pick:
    """Where the next attempt goes: ``name``; or wait ``defer_s`` for a breaker; or nowhere."""

    name: str | None
    defer_s: float | None
    candidates: tuple[str, ...]


async def usable_processors(ex: Executor, tenant_id: uuid.UUID) -> tuple[str, ...]:
    """The tenant's usable processor names in priority order. Called BEFORE a transaction is
    opened: a cache miss loads configurations through the pool, and a command holding a
    connection while waiting for another could exhaust the pool."""
    return tuple(h.name for h in await ex.processors.processors_for(tenant_id))


async def route(conn: Connection, payment: store.PaymentRow, usable: tuple[str, ...]) -> list[str]:
    """The payment's route: ordered processor names (payments/routing.py); ``usable`` from
    :func:`usable_processors`."""
    rules = await load_route_rules(conn, payment.tenant_id)
    return route_for(
        rules,
        usable,
        currency=payment.currency,
        amount_minor=payment.amount_minor,
        payment_method=payment.payment_method,
    )


async def _pick(
    ex: Executor, conn: Connection, payment: store.PaymentRow, tried: set[str], usable: tuple[str, ...]
) -> _Pick:
    candidates = tuple(name for name in await route(conn, payment, usable) if name not in tried)
    if not candidates:
        return _Pick(None, None, candidates)
    for name in candidates:
        if ex.breakers.allow(payment.tenant_id, name):
            return _Pick(name, None, candidates)
    waited_s = (ex.clock() - payment.created_at).total_seconds()
    if waited_s >= ex.policy.breaker_wait_max_s:
        log.warning(
            "payment: every breaker open past the wait limit, trying anyway",
            payment_id=str(payment.id),
            processor=candidates[0],
        )
        return _Pick(candidates[0], None, candidates)
    wait_s = min(ex.breakers.retry_in_s(payment.tenant_id, name) for name in candidates)
    return _Pick(None, max(MIN_DEFER_S, wait_s), candidates)


async def _start_attempt(
    ex: Executor, conn: Connection, payment: store.PaymentRow, processor: str, detail: str
) -> int:
    """:func:`payments.store.start_attempt` (REQUIRES_PROCESSING or FAILED -> PROCESSING) and its
    ``payment.processing`` event (attempt number and processor); returns the attempt number."""
    attempt_no = await store.start_attempt(conn, payment, processor, detail=detail)
    trigger = PaymentTrigger.ATTEMPT_STARTED
    if payment.status is _P.FAILED:
        trigger = PaymentTrigger.FAILOVER_ATTEMPT_STARTED
    await publish_event(conn, ex, payment, payment.status, trigger, attempt_no=attempt_no)
    return attempt_no


async def _start_next_attempt(
    ex: Executor, conn: Connection, payment: store.PaymentRow, tried: set[str], usable: tuple[str, ...]
) -> _Send | Outcome | None:
    """Start the payment's next attempt (payment locked, REQUIRES_PROCESSING or FAILED).

    Returns the attempt to send, DEFERRED, FAILED (no processor at all for a new
    payment), or None (a failed payment with no processor left: the caller announces it).
    """
    now = ex.clock()
    pick = await _pick(ex, conn, payment, tried, usable)
    if pick.defer_s is not None:
        due = now + timedelta(seconds=pick.defer_s)
        if payment.status is _P.FAILED:
            # FAILED is final to clients: the failover attempt starts in this transaction and
            # is sent when the command comes back.
            attempt_no = await _start_attempt(
                ex, conn, payment, pick.candidates[0], f"failover to {pick.candidates[0]}, breaker open"
            )
            lease = due + timedelta(seconds=ex.policy.lookup_after_s)
            await _set_attempt_lease(conn, payment, attempt_no, lease)
        await _enqueue_create(conn, ex.topic_prefix, payment, due)
        log.info("payment deferred: breakers open", payment_id=str(payment.id), defer_s=pick.defer_s)
        return Outcome.DEFERRED
    if pick.name is None:
        if payment.status is not _P.REQUIRES_PROCESSING:
            return None
        # Nothing to send to: record an attempt that was never sent, so the payment can end FAILED.
        attempt_no = await store.start_attempt(conn, payment, NO_PROCESSOR, detail="no processor")
        message = "the tenant has no usable payment processor for this payment (routing rules, configuration)"
        await store.finish_attempt(
            conn,
            payment.tenant_id,
            payment.id,
            attempt_no,
            _O.FAILED,
            failure_code="no_processor",
            failure_message=message,
        )
        await store.record_transition(
            conn,
            payment.tenant_id,
            payment.id,
            _P.PROCESSING,
            _P.FAILED,
            PaymentTrigger.ATTEMPT_FAILED,
            attempt_no=attempt_no,
            failure_code="no_processor",
            failure_message=message,
        )
        await publish_event(
            conn, ex, payment, _P.PROCESSING, PaymentTrigger.ATTEMPT_FAILED, attempt_no=attempt_no
        )
        return Outcome.FAILED
    detail = f"processor {pick.name}" if not tried else f"failover to {pick.name}"
    attempt_no = await _start_attempt(ex, conn, payment, pick.name, detail)
    lease = now + timedelta(seconds=ex.policy.lookup_after_s)
    fresh = await _claim_send(conn, payment, attempt_no, lease)
    return _Send(payment, attempt_no, pick.name, lease, fresh=fresh)


async def _tried(conn: Connection, payment: store.PaymentRow) -> set[str]:
    rows = await conn.fetch(
        "SELECT processor FROM payment_attempts WHERE payment_id = $1 AND tenant_id = $2",
        payment.id,
        payment.tenant_id,
    )
    return {r["processor"] for r in rows}


async def _begin_charge(ex: Executor, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> _Send | Outcome:
    usable = await usable_processors(ex, tenant_id)
    async with ex.pool.acquire() as conn, conn.transaction():
        payment = await store.lock_payment(conn, tenant_id, payment_id)
        if payment is None:
            log.warning("payment command for an unknown payment", payment_id=str(payment_id))
            return Outcome.SKIPPED
        if payment.status is _P.REQUIRES_PROCESSING:
            started = await _start_next_attempt(ex, conn, payment, set(), usable)
            assert started is not None
            return started
        if payment.status is not _P.PROCESSING:
            return Outcome.SKIPPED  # past this step (or UNKNOWN: only the janitor may act)
        attempt = await _lock_attempt(conn, payment, None)
        now = ex.clock()
        if attempt is None or attempt.status is not _A.PENDING:
            return Outcome.SKIPPED
        if (now - attempt.started_at).total_seconds() > ex.policy.resend_window_s:
            return Outcome.SKIPPED  # too old to send again safely: the janitor looks it up
        waited_s = (now - payment.created_at).total_seconds()
        if not ex.breakers.allow(tenant_id, attempt.processor) and waited_s < ex.policy.breaker_wait_max_s:
            defer_s = max(MIN_DEFER_S, ex.breakers.retry_in_s(tenant_id, attempt.processor))
            due = now + timedelta(seconds=defer_s)
            lease = due + timedelta(seconds=ex.policy.lookup_after_s)
            await _set_attempt_lease(conn, payment, attempt.attempt_no, lease)
            await _enqueue_create(conn, ex.topic_prefix, payment, due)
            return Outcome.DEFERRED
        # Taken over (a redelivered command after a crash, a deferred failover): send again with
        # the SAME key; the processor answers the first request's result if there was one.
        lease = now + timedelta(seconds=ex.policy.lookup_after_s)
        fresh = await _claim_send(conn, payment, attempt.attempt_no, lease)
        return _Send(payment, attempt.attempt_no, attempt.processor, lease, fresh=fresh)


_RENEW_ATTEMPT_SQL = """UPDATE payment_attempts SET next_lookup_at = $5, sends = sends + 1
                         WHERE payment_id = $1 AND tenant_id = $2 AND attempt_no = $3
                           AND status = 'pending' AND next_lookup_at = $4
                     RETURNING true"""


async def _send_charge(ex: Executor, send: _Send) -> tuple[_Call[ProcessorPayment], _Send]:
    tenant_id = send.payment.tenant_id
    try:
        processor = await ex.processors.get_processor(tenant_id, send.processor)
    except ProcessorError as exc:  # not configured / unusable: nothing was sent anywhere
        return _Call(error=exc, errors=[exc]), send
    request = charge_request(send.payment, send.attempt_no)
    lease = [send.lease]

    async def renew() -> bool:
        keys = (send.payment.id, tenant_id, send.attempt_no)
        return await _renew(ex, _RENEW_ATTEMPT_SQL, *keys, lease=lease)

    result = await _call_with_retries(ex, lambda: processor.create_charge(request), renew)
    if not result.lost:
        ex.breakers.record(tenant_id, send.processor, ok=result.answered)
    return result, replace(send, lease=lease[0])


async def _apply_charged(
    ex: Executor,
    conn: Connection,
    payment: store.PaymentRow,
    attempt: _Attempt,
    answer: ProcessorPayment,
) -> Outcome:
    """The attempt charged or authorized (PENDING or UNKNOWN before): record it
    (:func:`payments.outcomes.record_charged`: journal, event)."""
    captured: int | None = None  # an authorization (manual capture) captures nothing
    if answer.status is ProcessorStatus.SUCCEEDED:
        captured = answer.amount_captured_minor
        if not 0 < captured <= payment.amount_minor:
            captured = payment.amount_minor
    await record_charged(
        conn,
        ex,
        payment,
        attempt,
        processor_reference=answer.processor_reference,
        amount_captured_minor=captured,
    )
    return Outcome.REQUIRES_CAPTURE if captured is None else Outcome.SUCCEEDED


async def _apply_declined(
    ex: Executor, conn: Connection, payment: store.PaymentRow, attempt: _Attempt, code: str, message: str
) -> Outcome:
    """The attempt was declined (PENDING or UNKNOWN before): payment FAILED, no failover."""
    await record_declined(conn, ex, payment, attempt, code, message)
    return Outcome.FAILED


async def _apply_not_charged(
    ex: Executor,
    conn: Connection,
    payment: store.PaymentRow,
    attempt: _Attempt,
    code: str,
    message: str,
    usable: tuple[str, ...],
) -> _Send | Outcome:
    """The attempt definitely did not charge and the processor is at fault: attempt FAILED and,
    in the same transaction, a failover attempt at the next processor (else payment FAILED)."""
    trigger = await fail_attempt(conn, payment, attempt, code, message)
    failed = await store.lock_payment(conn, payment.tenant_id, payment.id)
    assert failed is not None
    following = await _start_next_attempt(ex, conn, failed, await _tried(conn, failed), usable)
    if following is not None:
        return following  # no payment.failed: a failover attempt follows in this transaction
    await publish_event(conn, ex, payment, payment.status, trigger, attempt_no=attempt.attempt_no)
    return Outcome.FAILED


async def _apply_unknown(
    ex: Executor, conn: Connection, payment: store.PaymentRow, attempt: _Attempt, code: str, message: str
) -> Outcome:
    """The answer was lost: attempt and payment UNKNOWN, first lookup after the first schedule step.

    Never before the send's lease ends (``lookup_after_s``): a lookup while the
    request may still be executing at the processor could miss a charge in
    progress and fail the payment over to a second processor.
    """
    first_s = max(ex.policy.lookup_delay_s(0), ex.policy.lookup_after_s)
    due = ex.clock() + timedelta(seconds=first_s)
    await store.finish_attempt(
        conn,
        payment.tenant_id,
        payment.id,
        attempt.attempt_no,
        _O.AMBIGUOUS,
        failure_code=clip(code),
        failure_message=clip(message),
        next_lookup_at=due,
    )
    await _set_attempt_lease(conn, payment, attempt.attempt_no, due, lookups=1)
    await store.record_transition(
        conn,
        payment.tenant_id,
        payment.id,
        _P.PROCESSING,
        _P.UNKNOWN,
        PaymentTrigger.ATTEMPT_UNKNOWN,
        attempt_no=attempt.attempt_no,
        detail=clip(message),
    )
    await publish_event(
        conn, ex, payment, _P.PROCESSING, PaymentTrigger.ATTEMPT_UNKNOWN, attempt_no=attempt.attempt_no
    )
    return Outcome.UNKNOWN


async def _record_processing(
    ex: Executor, conn: Connection, payment: store.PaymentRow, attempt: _Attempt, answer: ProcessorPayment
) -> Outcome:
    """The processor works on it (attempt stays PENDING): keep its reference, schedule a lookup."""
    due = ex.clock() + timedelta(seconds=ex.policy.lookup_delay_s(attempt.lookups))
    await conn.execute(
        """UPDATE payment_attempts SET processor_reference = $4, next_lookup_at = $5, lookups = lookups + 1,
                                       updated_at = now()
            WHERE payment_id = $1 AND tenant_id = $2 AND attempt_no = $3""",
        payment.id,
        payment.tenant_id,
        attempt.attempt_no,
        answer.processor_reference,
        due,
    )
    await conn.execute(
        "UPDATE payments SET processor_reference = $2, updated_at = now() WHERE id = $1",
        payment.id,
        answer.processor_reference,
    )
    await store.notify_payment_changed(conn, payment.id)
    return Outcome.PROCESSING


_EXPECTED_PAYMENT = OPEN_ATTEMPT_PAYMENT_STATUS


async def _apply_answer(
    ex: Executor,
    conn: Connection,
    payment: store.PaymentRow,
    attempt: _Attempt,
    answer: ProcessorPayment | None,
    error: ProcessorError | None,
    *,
    proves_not_done: bool,
    usable: tuple[str, ...],
) -> _Send | Outcome:
    """Apply a processor's answer about an attempt (from a send or a lookup); see the table in the
    module docstring. ``answer`` None with ``error`` None means "no such charge" (lookup)."""
    if answer is not None:
        if answer.status in (ProcessorStatus.SUCCEEDED, ProcessorStatus.REQUIRES_CAPTURE):
            return await _apply_charged(ex, conn, payment, attempt, answer)
        if answer.status is ProcessorStatus.PROCESSING:
            return await _record_processing(ex, conn, payment, attempt, answer)
        code = answer.decline_code or answer.status.value
        return await _apply_declined(ex, conn, payment, attempt, code, answer.message or code)
    if isinstance(error, Declined):
        return await _apply_declined(ex, conn, payment, attempt, error.code or "declined", str(error))
    if error is None or proves_not_done:
        code = error.code if error is not None else "not_found_at_processor"
        message = str(error) if error is not None else "the processor has no charge for this attempt's key"
        return await _apply_not_charged(
            ex, conn, payment, attempt, code or "processor_error", message, usable
        )
    if attempt.status is _A.UNKNOWN:
        return Outcome.UNKNOWN  # already waiting for a lookup
    return await _apply_unknown(ex, conn, payment, attempt, error.code or "ambiguous", str(error))


async def _record_charge(ex: Executor, send: _Send, result: _Call[ProcessorPayment]) -> _Send | Outcome:
    tenant_id = send.payment.tenant_id
    usable = await usable_processors(ex, tenant_id)
    async with ex.pool.acquire() as conn, conn.transaction():
        payment = await store.lock_payment(conn, tenant_id, send.payment.id)
        assert payment is not None
        attempt = await _lock_attempt(conn, payment, send.attempt_no)
        assert attempt is not None
        definitive = result.answered
        ours = attempt.status is _A.PENDING and attempt.next_lookup_at == send.lease
        consistent = (
            attempt.status in _EXPECTED_PAYMENT and _EXPECTED_PAYMENT[attempt.status] is payment.status
        )
        if result.lost or not consistent or not (definitive or ours):
            if definitive and attempt.status is _A.FAILED and result.value is not None:
                log.error(
                    "payment: processor answered for an attempt already resolved as not charged",
                    payment_id=str(payment.id),
                    attempt_no=attempt.attempt_no,
                    processor_status=result.value.status.value,
                )
            return Outcome.SKIPPED
        return await _apply_answer(
            ex,
            conn,
            payment,
            attempt,
            result.value,
            result.error,
            proves_not_done=result.proves_not_done(send.fresh),
            usable=usable,
        )


async def _drive(ex: Executor, step: _Send | Outcome) -> Outcome:
    """Send attempts until one has an outcome (each failover goes to a processor not tried yet)."""
    for _ in range(MAX_ATTEMPTS_PER_CALL):
        if not isinstance(step, _Send):
            return step
        result, sent = await _send_charge(ex, step)
        step = await _record_charge(ex, sent, result)
    raise RuntimeError(f"more than {MAX_ATTEMPTS_PER_CALL} attempts in one call")


async def execute_charge(ex: Executor, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> Outcome:
    """Execute a CREATE command: charge (or authorize) the payment at its route's processors.

    Starts the first attempt of a REQUIRES_PROCESSING payment, or sends a PENDING
    attempt again (same key) when its command is redelivered; anything else is
    SKIPPED. Returns the outcome (module docstring). Raises asyncpg errors
    (nothing after the last commit is lost: the command is redelivered).
    """
    return await _drive(ex, await _begin_charge(ex, tenant_id, payment_id))


async def resolve_attempt(
    ex: Executor, tenant_id: uuid.UUID, payment_id: uuid.UUID, attempt_no: int, lease: datetime
) -> Outcome:
    """The janitor's lookup of an attempt (PENDING past its lease, or UNKNOWN) claimed with ``lease``.

    Calls ``lookup_charge`` with the attempt's request at its processor. Found charged or
    authorized: resolved as such (journal, event). Found declined: FAILED, no failover.
    Definitively absent (None): FAILED and, in the same transaction, a failover attempt
    that is then sent. Cannot tell (an error, or still processing): the next lookup
    waits the next schedule step. SKIPPED when someone else changed the attempt since
    the claim (its ``next_lookup_at`` is no longer ``lease``).
    """
    async with ex.pool.acquire() as conn, conn.transaction():
        snapshot = await store.lock_payment(conn, tenant_id, payment_id)
        row = await conn.fetchrow(
            """SELECT processor, next_lookup_at FROM payment_attempts
                WHERE payment_id = $1 AND tenant_id = $2 AND attempt_no = $3""",
            payment_id,
            tenant_id,
            attempt_no,
        )
    if row is None or snapshot is None or row["next_lookup_at"] != lease:
        return Outcome.SKIPPED
    answer: ProcessorPayment | None = None
    error: ProcessorError | None = None
    try:
        processor = await ex.processors.get_processor(tenant_id, row["processor"])
        answer = await processor.lookup_charge(charge_request(snapshot, attempt_no))
    except ProcessorError as exc:
        error = exc
    usable = await usable_processors(ex, tenant_id)
    async with ex.pool.acquire() as conn, conn.transaction():
        payment = await store.lock_payment(conn, tenant_id, payment_id)
        assert payment is not None
        attempt = await _lock_attempt(conn, payment, attempt_no)
        assert attempt is not None
        if attempt.next_lookup_at != lease or attempt.status not in _EXPECTED_PAYMENT:
            return Outcome.SKIPPED
        if _EXPECTED_PAYMENT[attempt.status] is not payment.status:
            log.error(
                "payment: attempt and payment statuses disagree; lookup not applied",
                payment_id=str(payment_id),
                attempt_status=attempt.status.value,
                payment_status=payment.status.value,
            )
            return Outcome.SKIPPED
        if error is not None or (answer is not None and answer.status is ProcessorStatus.PROCESSING):
            due = ex.clock() + timedelta(seconds=ex.policy.lookup_delay_s(attempt.lookups))
            await _set_attempt_lease(conn, payment, attempt_no, due, lookups=attempt.lookups + 1)
            log.info(
                "payment lookup: cannot tell yet",
                payment_id=str(payment_id),
                attempt_no=attempt_no,
                error=type(error).__name__ if error else "processing",
                next_lookup_at=due.isoformat(),
            )
            return Outcome.RETRY_SCHEDULED
        step = await _apply_answer(
            ex, conn, payment, attempt, answer, None, proves_not_done=True, usable=usable
        )
    return await _drive(ex, step)


# --- captures and refunds -------------------------------------------------------------------------

# Table names are the constants of payments.outcomes.OPERATION_TABLES; every value is a bind parameter.
_OP_SELECT: Final = {
    kind: f"""SELECT status, amount_minor, next_lookup_at, lookups, created_at, processor_reference
                FROM {table} WHERE id = $1 AND payment_id = $2 AND tenant_id = $3 FOR UPDATE"""  # noqa: S608
    for kind, table in OPERATION_TABLES.items()
}
_OP_RENEW: Final = {
    kind: f"""UPDATE {table} SET next_lookup_at = $5
               WHERE id = $1 AND payment_id = $2 AND tenant_id = $3 AND next_lookup_at = $4
           RETURNING true"""  # noqa: S608
    for kind, table in OPERATION_TABLES.items()
}


@dataclass(frozen=True)
class _Op(Operation):
    next_lookup_at: datetime | None
    lookups: int
    created_at: datetime


def _status_of(kind: OperationKind, value: str) -> CaptureStatus | RefundStatus:
    return CaptureStatus(value) if kind == "capture" else RefundStatus(value)


async def _lock_op(
    conn: Connection, payment: store.PaymentRow, kind: OperationKind, op_id: uuid.UUID
) -> _Op | None:
    row = await conn.fetchrow(_OP_SELECT[kind], op_id, payment.id, payment.tenant_id)
    if row is None:
        return None
    return _Op(
        kind=kind,
        id=op_id,
        status=_status_of(kind, row["status"]),
        amount_minor=row["amount_minor"],
        next_lookup_at=row["next_lookup_at"],
        lookups=row["lookups"],
        created_at=row["created_at"],
    )


async def _refuse_op(
    ex: Executor, conn: Connection, payment: store.PaymentRow, op: _Op, code: str, message: str
) -> Outcome:
    """Fail a PENDING capture or refund without sending it (PENDING -> PROCESSING -> FAILED), with
    its ``payment.capture_failed`` / ``payment.refund_failed``."""
    started = await move_operation(conn, payment, op, _O.STARTED, next_lookup_at=None)
    await record_operation_failed(conn, ex, payment, replace(op, status=started), code, message)
    return Outcome.FAILED


@dataclass(frozen=True)
class _OpSend:
    payment: store.PaymentRow
    op: _Op
    lease: datetime
    fresh: bool


_IN_FLIGHT = {"pending", "processing", "unknown"}


async def _begin_op(
    ex: Executor,
    tenant_id: uuid.UUID,
    payment_id: uuid.UUID,
    kind: OperationKind,
    op_id: uuid.UUID,
    claimed: datetime | None,
) -> _OpSend | Outcome:
    needs = _P.REQUIRES_CAPTURE if kind == "capture" else _P.SUCCEEDED
    async with ex.pool.acquire() as conn, conn.transaction():
        payment = await store.lock_payment(conn, tenant_id, payment_id)
        if payment is None:
            return Outcome.SKIPPED
        op = await _lock_op(conn, payment, kind, op_id)
        if op is None or op.status.value not in _IN_FLIGHT:
            return Outcome.SKIPPED
        now = ex.clock()
        if claimed is None:
            # A command: only a fresh PENDING operation (a scheduled retry is the janitor's).
            if op.status.value != "pending" or op.next_lookup_at is not None:
                return Outcome.SKIPPED
        else:
            if op.next_lookup_at != claimed:
                return Outcome.SKIPPED
            if (now - op.created_at).total_seconds() > ex.policy.replay_window_s:
                await move_operation(conn, payment, op, None, next_lookup_at=None)
                log.error(
                    "payment operation past the replay window: resolve it by hand (webhook, report)",
                    payment_id=str(payment_id),
                    kind=kind,
                    operation_id=str(op_id),
                    status=op.status.value,
                )
                return Outcome.NEEDS_OPERATOR
        fresh = claimed is None or (op.status.value == "pending")
        lease = now + timedelta(seconds=ex.policy.lookup_after_s)
        if payment.status is not needs:
            if op.status.value == "pending":
                code = f"payment_not_{'capturable' if kind == 'capture' else 'refundable'}"
                return await _refuse_op(ex, conn, payment, op, code, f"the payment is {payment.status.value}")
            return Outcome.SKIPPED
        if kind == "refund" and op.status.value == "pending":
            sent = await conn.fetchval(
                """SELECT coalesce(sum(amount_minor), 0) FROM payment_refunds
                    WHERE payment_id = $1 AND tenant_id = $2 AND id <> $3
                      AND status IN ('processing', 'unknown', 'succeeded')""",
                payment.id,
                tenant_id,
                op_id,
            )
            if int(sent) + op.amount_minor > payment.amount_captured_minor:
                message = (
                    f"refunds sent or done ({int(sent)}) plus this one ({op.amount_minor}) exceed the "
                    f"captured {payment.amount_captured_minor} minor units"
                )
                outcome = await _refuse_op(ex, conn, payment, op, "refund_exceeds_captured", message)
                log.error(
                    "refund refused at execution: would exceed the captured amount", refund_id=str(op_id)
                )
                return outcome
        event = _O.STARTED if op.status.value == "pending" else None
        status = await move_operation(conn, payment, op, event, next_lookup_at=lease)
        return _OpSend(payment, replace(op, status=status, next_lookup_at=lease), lease, fresh)


async def _send_op(ex: Executor, send: _OpSend) -> tuple[_Call[ProcessorPayment | ProcessorRefund], _OpSend]:
    payment, op = send.payment, send.op
    try:
        processor = await ex.processors.get_processor(payment.tenant_id, payment.processor)
    except ProcessorError as exc:
        return _Call(error=exc, errors=[exc]), send
    key = str(op.id)

    async def call() -> ProcessorPayment | ProcessorRefund:
        if op.kind == "capture":
            return await processor.capture(
                payment.processor_reference, op.amount_minor, payment.currency, key
            )
        return await processor.refund(payment.processor_reference, op.amount_minor, payment.currency, key)

    lease = [send.lease]

    async def renew() -> bool:
        return await _renew(ex, _OP_RENEW[op.kind], op.id, payment.id, payment.tenant_id, lease=lease)

    result = await _call_with_retries(ex, call, renew)
    return result, replace(send, lease=lease[0])


async def _record_op(
    ex: Executor, send: _OpSend, result: _Call[ProcessorPayment | ProcessorRefund]
) -> Outcome:
    async with ex.pool.acquire() as conn, conn.transaction():
        payment = await store.lock_payment(conn, send.payment.tenant_id, send.payment.id)
        assert payment is not None
        op = await _lock_op(conn, payment, send.op.kind, send.op.id)
        assert op is not None
        needs = _P.REQUIRES_CAPTURE if op.kind == "capture" else _P.SUCCEEDED
        ours = op.next_lookup_at == send.lease
        open_status = op.status.value in ("processing", "unknown")
        if result.lost or not open_status or payment.status is not needs or not (ours or result.answered):
            return Outcome.SKIPPED
        now = ex.clock()
        answer = result.value
        if answer is not None:
            if isinstance(answer, ProcessorRefund):
                done = answer.status is ProcessorRefundStatus.SUCCEEDED
                processing = answer.status is ProcessorRefundStatus.PENDING
                reference = answer.processor_reference
            else:
                done = answer.status is ProcessorStatus.SUCCEEDED
                processing = answer.status is ProcessorStatus.PROCESSING
                reference = answer.processor_reference
            if done:
                await record_operation_succeeded(conn, ex, payment, op, processor_reference=reference)
                return Outcome.SUCCEEDED
            if processing:
                # Accepted; the processor's webhook reports the outcome (refund: keep its id).
                keep = reference if op.kind == "refund" else None
                await move_operation(conn, payment, op, None, next_lookup_at=None, processor_reference=keep)
                return Outcome.PROCESSING
            if op.kind == "capture" and answer.status is ProcessorStatus.REQUIRES_CAPTURE:
                result = _Call(error=AmbiguousProcessorError("capture answered but still requires capture"))
            else:
                code = f"processor_{answer.status.value}"
                message = f"the processor reports the {op.kind} {answer.status.value}"
                await record_operation_failed(conn, ex, payment, op, code, message)
                return Outcome.FAILED
        error = result.error
        assert error is not None
        not_done = isinstance(error, Declined) or result.proves_not_done(send.fresh)
        if not_done and not isinstance(error, RetryableProcessorError):  # refused: final
            await record_operation_failed(conn, ex, payment, op, error.code or "processor_error", str(error))
            return Outcome.FAILED
        due = now + timedelta(seconds=ex.policy.lookup_delay_s(op.lookups))
        if not_done:  # retries exhausted, every answer "not processed": back to PENDING, retried later
            await move_operation(
                conn, payment, op, _O.RETRY_SCHEDULED, next_lookup_at=due, lookups=op.lookups + 1
            )
            return Outcome.RETRY_SCHEDULED
        event = _O.AMBIGUOUS if op.status.value == "processing" else None
        await move_operation(
            conn,
            payment,
            op,
            event,
            next_lookup_at=due,
            lookups=op.lookups + 1,
            failure_code=clip(error.code or "ambiguous"),
            failure_message=clip(error),
        )
        return Outcome.UNKNOWN


async def _execute_op(
    ex: Executor,
    tenant_id: uuid.UUID,
    payment_id: uuid.UUID,
    kind: OperationKind,
    op_id: uuid.UUID,
    claimed: datetime | None,
) -> Outcome:
    step = await _begin_op(ex, tenant_id, payment_id, kind, op_id, claimed)
    if not isinstance(step, _OpSend):
        return step
    result, sent = await _send_op(ex, step)
    return await _record_op(ex, sent, result)


async def execute_capture(
    ex: Executor,
    tenant_id: uuid.UUID,
    payment_id: uuid.UUID,
    capture_id: uuid.UUID,
    *,
    claimed: datetime | None = None,
) -> Outcome:
    """Send capture ``capture_id`` (key: the capture id) and record the outcome.

    Without ``claimed`` (a CAPTURE command) only a PENDING capture never scheduled is
    sent; with it (the janitor) a PENDING, PROCESSING or UNKNOWN capture whose
    ``next_lookup_at`` equals ``claimed`` is sent again with the same key. Success:
    capture SUCCEEDED, payment SUCCEEDED with ``amount_captured_minor``, journal
    ``capture:<capture id>``, event ``payment.captured``. See the module docstring.
    """
    return await _execute_op(ex, tenant_id, payment_id, "capture", capture_id, claimed)


async def execute_refund(
    ex: Executor,
    tenant_id: uuid.UUID,
    payment_id: uuid.UUID,
    refund_id: uuid.UUID,
    *,
    claimed: datetime | None = None,
) -> Outcome:
    """Send refund ``refund_id`` (key: the refund id) and record the outcome.

    As :func:`execute_capture`; success adds the amount to ``amount_refunded_minor``,
    posts journal ``refund:<refund id>`` (reference: the processor's refund id) and
    publishes ``payment.refunded``. A refund that would take the refunds sent or done
    past the captured amount is FAILED without calling the processor.
    """
    return await _execute_op(ex, tenant_id, payment_id, "refund", refund_id, claimed)


# --- cancels --------------------------------------------------------------------------------------


def cancel_key(payment_id: uuid.UUID, requested_at: datetime) -> str:
    """The processor idempotency key of a payment's cancel (release of its authorization):
    ``{payment_id}_cancel_{microseconds since the epoch of cancel_request_time}`` (60 characters,
    within Adyen's 64). One key per CancelPayment: a cancel refused and requested again is a new
    request, not a replay of the refusal."""
    micros = (requested_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return f"{payment_id}_cancel_{micros}"


_RENEW_CANCEL_SQL = """UPDATE payments SET cancel_next_lookup_at = $4
                        WHERE id = $1 AND tenant_id = $2 AND cancel_next_lookup_at = $3
                    RETURNING true"""


async def _cancel_state(conn: Connection, payment: store.PaymentRow) -> tuple[datetime | None, int]:
    row = await conn.fetchrow(
        "SELECT cancel_next_lookup_at, cancel_lookups FROM payments WHERE id = $1", payment.id
    )
    assert row is not None
    return row["cancel_next_lookup_at"], int(row["cancel_lookups"])


async def _set_cancel_lookup(
    conn: Connection, payment: store.PaymentRow, at: datetime | None, lookups: int | None = None
) -> None:
    await conn.execute(
        """UPDATE payments SET cancel_next_lookup_at = $2, cancel_lookups = coalesce($3, cancel_lookups),
                               updated_at = now()
            WHERE id = $1""",
        payment.id,
        at,
        lookups,
    )


async def execute_cancel(
    ex: Executor, tenant_id: uuid.UUID, payment_id: uuid.UUID, *, claimed: datetime | None = None
) -> Outcome:
    """Release the authorization of a REQUIRES_CAPTURE payment whose cancel was requested.

    Key: :func:`cancel_key`. Released: payment CANCELED, ``payment.canceled``.
    Accepted for later (Adyen): the webhook finishes it. Refused (a decline or a
    permanent error, on a first send): the cancel request is withdrawn
    (``cancel_request_time`` cleared, the failure on the payment) so the payment can be
    captured or canceled again. Ambiguous / retries exhausted: sent again with the same
    key by the janitor on the lookup schedule (``claimed`` = the claimed
    ``cancel_next_lookup_at``). A payment already CANCELED at accept time (nothing had
    reached a processor) gets its ``payment.canceled`` event here (deterministic event
    id: a redelivered command repeats it harmlessly).
    """
    async with ex.pool.acquire() as conn, conn.transaction():
        payment = await store.lock_payment(conn, tenant_id, payment_id)
        if payment is None:
            return Outcome.SKIPPED
        if payment.status is _P.CANCELED and claimed is None:
            if not await _tried(conn, payment):
                await publish_event(
                    conn, ex, payment, _P.REQUIRES_PROCESSING, PaymentTrigger.CANCEL_REQUESTED
                )
                return Outcome.SUCCEEDED
            return Outcome.SKIPPED
        if payment.status is not _P.REQUIRES_CAPTURE or payment.cancel_requested_at is None:
            return Outcome.SKIPPED
        at, lookups = await _cancel_state(conn, payment)
        now = ex.clock()
        if claimed is None and at is not None:
            return Outcome.SKIPPED  # in flight, or a retry is scheduled (the janitor's)
        if claimed is not None:
            if at != claimed:
                return Outcome.SKIPPED
            if (now - payment.cancel_requested_at).total_seconds() > ex.policy.replay_window_s:
                await _set_cancel_lookup(conn, payment, None)
                log.error(
                    "payment cancel past the replay window: resolve it by hand", payment_id=str(payment_id)
                )
                return Outcome.NEEDS_OPERATOR
        fresh = claimed is None and lookups == 0
        requested_at = payment.cancel_requested_at
        lease = now + timedelta(seconds=ex.policy.lookup_after_s)
        await _set_cancel_lookup(conn, payment, lease)
    try:
        processor = await ex.processors.get_processor(tenant_id, payment.processor)
    except ProcessorError as exc:
        result: _Call[ProcessorPayment] = _Call(error=exc, errors=[exc])
    else:
        leases = [lease]

        async def renew() -> bool:
            return await _renew(ex, _RENEW_CANCEL_SQL, payment_id, tenant_id, lease=leases)

        result = await _call_with_retries(
            ex,
            lambda: processor.cancel(payment.processor_reference, cancel_key(payment_id, requested_at)),
            renew,
        )
        lease = leases[0]
    async with ex.pool.acquire() as conn, conn.transaction():
        current = await store.lock_payment(conn, tenant_id, payment_id)
        assert current is not None
        at, lookups = await _cancel_state(conn, current)
        same_request = current.cancel_requested_at == requested_at
        if result.lost or current.status is not _P.REQUIRES_CAPTURE or not same_request:
            return Outcome.SKIPPED
        if not (at == lease or result.answered):
            return Outcome.SKIPPED
        answer = result.value
        if answer is not None and answer.status is ProcessorStatus.CANCELED:
            await record_canceled(conn, ex, current, current.cancellation_reason)
            return Outcome.SUCCEEDED
        if answer is not None and answer.status is ProcessorStatus.PROCESSING:
            # In the processor's hands (its webhook reports the outcome): no lookup, and the
            # payment sweeper leaves it (cancel_accepted_at, migration 0018).
            await _set_cancel_lookup(conn, current, None)
            await conn.execute("UPDATE payments SET cancel_accepted_at = now() WHERE id = $1", payment_id)
            return Outcome.PROCESSING
        error = result.error
        not_done = answer is not None or isinstance(error, Declined) or result.proves_not_done(fresh)
        if not_done and not isinstance(error, RetryableProcessorError):  # refused: withdraw the request
            code = (
                error.code if error is not None else f"processor_{answer.status.value if answer else 'error'}"
            )
            message = str(error) if error is not None else "the processor did not release the authorization"
            await conn.execute(
                """UPDATE payments
                      SET cancel_requested_at = NULL, cancel_next_lookup_at = NULL, cancel_lookups = 0,
                          failure_code = $2, failure_message = $3, updated_at = now()
                    WHERE id = $1""",
                payment_id,
                clip(code or "cancel_refused"),
                clip(f"cancel refused: {message}"),
            )
            await store.notify_payment_changed(conn, payment_id)
            return Outcome.FAILED
        due = ex.clock() + timedelta(seconds=ex.policy.lookup_delay_s(lookups))
        await _set_cancel_lookup(conn, current, due, lookups + 1)
        return Outcome.RETRY_SCHEDULED if not_done else Outcome.UNKNOWN


# --- worker entry ---------------------------------------------------------------------------------


async def execute_command(ex: Executor, command: events_pb2.PaymentCommand) -> Outcome:
    """Execute one decoded ``PaymentCommand`` (CREATE, CAPTURE, CANCEL, REFUND).

    Raises ``ValueError`` for ids that are not UUIDs or an unknown kind (the caller
    logs and skips the command) and whatever execution raises (database errors).
    """
    tenant_id = uuid.UUID(command.tenant_id)
    payment_id = uuid.UUID(command.payment_id)
    kind = command.kind
    if kind == events_pb2.PAYMENT_COMMAND_KIND_CREATE:
        return await execute_charge(ex, tenant_id, payment_id)
    if kind == events_pb2.PAYMENT_COMMAND_KIND_CAPTURE:
        return await execute_capture(ex, tenant_id, payment_id, uuid.UUID(command.capture_id))
    if kind == events_pb2.PAYMENT_COMMAND_KIND_CANCEL:
        return await execute_cancel(ex, tenant_id, payment_id)
    if kind == events_pb2.PAYMENT_COMMAND_KIND_REFUND:
        return await execute_refund(ex, tenant_id, payment_id, uuid.UUID(command.refund_id))
    raise ValueError(f"unknown payment command kind {kind}")
