"""Apply a verified processor notification to the payment it is about; schedule lookups otherwise.

Called by payments/webhooks.py inside the transaction that records the
webhook event (so "recorded" and "applied" commit together), only for events
whose signature verified. Everything is scoped to the tenant whose secrets
verified the event and to the processor that sent it.

The rules are the payment worker's (payments/execution.py, "Outcome rules"),
applied under the payment row lock (:func:`payments.store.lock_payment`) and
recorded by the same functions (payments/outcomes.py: state machine, ledger
journals and idempotency keys, ``PaymentEvent`` ids), so whichever of the
worker, the janitor and a webhook records an outcome first wins and the
others find nothing left to do (the worker's record step skips an operation
that is no longer open). The checks before recording are this module's:

======================  ===============================  ============================================
notification            state found                      effect
======================  ===============================  ============================================
AUTHORISATION success   attempt PENDING (payment         attempt SUCCEEDED; payment SUCCEEDED with
                        PROCESSING) or UNKNOWN           the captured amount, journal
                        (payment UNKNOWN)                ``capture:<payment id>``, ``payment.succeeded``
                                                         -- or REQUIRES_CAPTURE
                                                         (``payment.requires_capture``) if authorized
AUTHORISATION failure   same                             attempt FAILED, payment FAILED,
                                                         ``payment.failed`` (a decline: no failover)
AUTHORISATION success,  payment REQUIRES_CAPTURE         Stripe reports a capture as
captured                                                 payment_intent.succeeded: see CAPTURE
CAPTURE success         capture PROCESSING or UNKNOWN    capture SUCCEEDED, payment SUCCEEDED,
                                                         journal ``capture:<capture id>``,
                                                         ``payment.captured``
CAPTURE failure         same                             capture FAILED (payment stays
                                                         REQUIRES_CAPTURE)
CANCELLATION success    payment REQUIRES_CAPTURE, no     payment CANCELED, ``payment.canceled`` (a
                        capture open or done             cancel we asked for, or an expiry)
CANCELLATION success    attempt open                     canceled before it charged: as a decline
                                                         (code ``canceled``)
CANCELLATION failure    cancel requested                 the request is withdrawn (as execution does)
REFUND success          refund PROCESSING or UNKNOWN     refund SUCCEEDED, ``amount_refunded_minor``
                                                         grows, journal ``refund:<refund id>``,
                                                         ``payment.refunded``
REFUND failure          same                             refund FAILED
======================  ===============================  ============================================

Amounts and currencies are checked against the records (the amount captured
at most the payment's, a capture's or refund's exactly its own); a
notification that does not fit the records, or that finds the operation in a
state it cannot move from (a capture or refund waiting for a retry), is not
applied: the payment's open operations are looked up at the processor
instead (:func:`schedule_lookups`, outcome ``lookup_scheduled``). A
notification that contradicts a final state -- a charge for an attempt
recorded as not charged (a possible double charge), a refund or capture
failing after it succeeded (Adyen CAPTURE_FAILED / REFUND_FAILED, a Stripe
refund turning ``failed``) -- changes nothing and is logged as an error for an
operator (outcome ``needs_operator``): reversing money already journaled is
not automatic. One that the records already reflect is ``already_applied``.

**Lookups** (:func:`schedule_lookups`): the janitor (payments/janitor.py)
picks operations whose ``next_lookup_at`` has passed and asks the processor.
A lookup is brought forward to now, but never into the window in which the
operation's own request may still be executing: not before ``updated_at +
lookup_after_s`` (``SWITCHBOARD_PAYMENT_LOOKUP_AFTER_S``, the lease of a call
in flight, longer than the processor timeout). A lookup in that window could
miss a charge still being made and fail the attempt over to a second
processor. It also bounds how often a flood of forged webhooks can make the
janitor call the processor: once per operation per ``lookup_after_s``.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import structlog

from payments import store
from payments.outcomes import (
    OPEN_ATTEMPT_PAYMENT_STATUS,
    ChargeAttempt,
    Operation,
    clip,
    record_canceled,
    record_charged,
    record_declined,
    record_operation_failed,
    record_operation_succeeded,
)
from payments.state_machine import (
    AttemptStatus,
    CaptureStatus,
    IllegalTransition,
    OperationTrigger,
    PaymentStatus,
    PaymentTrigger,
    RefundStatus,
    next_status,
)
from payments.webhook_events import ClaimedReferences, NotificationKind, ProcessorNotification
from switchboard.db.pool import Connection

log = structlog.get_logger(__name__)

_P = PaymentStatus
_A = AttemptStatus
_O = OperationTrigger

#: At most this many payments are looked up for one delivery.
MAX_LOOKUP_PAYMENTS: Final = 20
#: The default of ``lookup_after_s`` (``SWITCHBOARD_PAYMENT_LOOKUP_AFTER_S``), seconds.
DEFAULT_LOOKUP_AFTER_S: Final = 60.0


class ApplyOutcome(enum.StrEnum):
    """What a notification did (``webhook_events.outcome``)."""

    #: The payment (or its capture, cancel, refund) moved.
    APPLIED = "applied"
    #: The records already say so (the worker, the janitor or an earlier event got there first).
    ALREADY_APPLIED = "already_applied"
    #: Not applied as it is: the payment's open operations are looked up at the processor.
    LOOKUP_SCHEDULED = "lookup_scheduled"
    #: No payment of this tenant at this processor matches it.
    UNMATCHED = "unmatched"
    #: An event Switchboard does not act on.
    IGNORED = "ignored"
    #: It contradicts a final state; nothing changed, an operator must look (logged as an error).
    NEEDS_OPERATOR = "needs_operator"


@dataclass(frozen=True)
class Applied:
    """The outcome of one notification, the payment it concerned (if any) and a short reason."""

    outcome: ApplyOutcome
    payment_id: uuid.UUID | None = None
    detail: str = ""


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class ApplyContext:
    """What applying needs besides the connection.

    ``topic_prefix``: Kafka topic prefix of the ``PaymentEvent`` outbox rows.
    ``lookup_after_s``: seconds; see the module docstring ("Lookups").
    ``clock``: timezone-aware now for event times.
    """

    topic_prefix: str = ""
    lookup_after_s: float = DEFAULT_LOOKUP_AFTER_S
    clock: Callable[[], datetime] = field(default=utc_now)


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text) if text else None
    except ValueError:
        return None


# --- lookups ----------------------------------------------------------------------------------------

_CLAIMED_PAYMENTS_SQL = """
SELECT DISTINCT payment_id FROM (
    SELECT payment_id FROM payment_attempts
     WHERE tenant_id = $1 AND processor = $2
       AND (processor_reference = ANY ($3::text[]) OR idempotency_key = ANY ($4::text[]))
    UNION ALL
    SELECT id FROM payments WHERE tenant_id = $1 AND processor = $2 AND processor_reference = ANY ($3::text[])
    UNION ALL
    SELECT r.payment_id FROM payment_refunds r JOIN payments p ON p.id = r.payment_id
     WHERE r.tenant_id = $1 AND p.processor = $2
       AND (r.processor_reference = ANY ($3::text[]) OR r.id = ANY ($5::uuid[]))
    UNION ALL
    SELECT c.payment_id FROM payment_captures c JOIN payments p ON p.id = c.payment_id
     WHERE c.tenant_id = $1 AND p.processor = $2
       AND (c.processor_reference = ANY ($3::text[]) OR c.id = ANY ($5::uuid[]))
) claimed
LIMIT $6"""


async def find_claimed_payments(
    conn: Connection, tenant_id: uuid.UUID, processor: str, claimed: ClaimedReferences
) -> list[uuid.UUID]:
    """The tenant's payments at ``processor`` that ``claimed`` references name (at most
    :data:`MAX_LOOKUP_PAYMENTS`): by an attempt's processor reference or idempotency key,
    the payment's processor reference, a capture's or refund's reference or id."""
    if not claimed:
        return []
    references = [r for r in claimed.processor_references if r]
    keys = [k for k in claimed.merchant_references if k]
    ids = [u for u in (_uuid(k) for k in keys) if u is not None]
    rows = await conn.fetch(
        _CLAIMED_PAYMENTS_SQL, tenant_id, processor, references, keys, ids, MAX_LOOKUP_PAYMENTS
    )
    return sorted(r["payment_id"] for r in rows)


# The target time of a lookup: now, but not before updated_at + lookup_after_s ($3); never later
# than it already is (LEAST ignores NULL, so an unscheduled row gets the target).
_SCHEDULE_SQL: Final = (
    """UPDATE payment_attempts
          SET next_lookup_at = LEAST(next_lookup_at, GREATEST(now(), updated_at + make_interval(secs => $3)))
        WHERE tenant_id = $1 AND payment_id = ANY ($2::uuid[])
          AND (status = 'unknown' OR (status = 'pending' AND lookups > 0))
    RETURNING 1""",
    """UPDATE payment_captures
          SET next_lookup_at = LEAST(next_lookup_at, GREATEST(now(), updated_at + make_interval(secs => $3)))
        WHERE tenant_id = $1 AND payment_id = ANY ($2::uuid[])
          AND (status IN ('processing', 'unknown') OR (status = 'pending' AND next_lookup_at IS NOT NULL))
    RETURNING 1""",
    """UPDATE payment_refunds
          SET next_lookup_at = LEAST(next_lookup_at, GREATEST(now(), updated_at + make_interval(secs => $3)))
        WHERE tenant_id = $1 AND payment_id = ANY ($2::uuid[])
          AND (status IN ('processing', 'unknown') OR (status = 'pending' AND next_lookup_at IS NOT NULL))
    RETURNING 1""",
    """UPDATE payments
          SET cancel_next_lookup_at = LEAST(cancel_next_lookup_at,
                                            GREATEST(now(), updated_at + make_interval(secs => $3)))
        WHERE tenant_id = $1 AND id = ANY ($2::uuid[])
          AND status = 'requires_capture' AND cancel_requested_at IS NOT NULL
    RETURNING 1""",
)


async def schedule_lookups(
    conn: Connection, tenant_id: uuid.UUID, payment_ids: Sequence[uuid.UUID], lookup_after_s: float
) -> int:
    """Bring the janitor's lookup of every open operation of ``payment_ids`` forward to now
    (within the rule of the module docstring, "Lookups"); returns how many operations.

    Open operations: an attempt UNKNOWN, or PENDING with the processor working on it
    (``lookups`` > 0: an attempt in its first call is the worker's and its lease brings
    the janitor anyway); a capture or refund PROCESSING, UNKNOWN or PENDING with a
    retry scheduled; a cancel requested of a REQUIRES_CAPTURE payment. Statuses are
    never changed (clients see nothing: lookup times are not in the API). Locks the
    payment rows first (id order), like every payment change.
    Call inside a transaction. ``lookup_after_s``: seconds.
    """
    if not payment_ids:
        return 0
    ids = sorted(set(payment_ids))
    await conn.fetch(
        "SELECT id FROM payments WHERE tenant_id = $1 AND id = ANY ($2::uuid[]) ORDER BY id FOR UPDATE",
        tenant_id,
        ids,
    )
    scheduled = 0
    for sql in _SCHEDULE_SQL:
        scheduled += len(await conn.fetch(sql, tenant_id, ids, float(lookup_after_s)))
    return scheduled


async def _lookup_instead(
    conn: Connection, ctx: ApplyContext, payment: store.PaymentRow, n: ProcessorNotification, why: str
) -> Applied:
    count = await schedule_lookups(conn, payment.tenant_id, [payment.id], ctx.lookup_after_s)
    log.warning(
        "webhook not applied: looking the payment up at the processor",
        payment_id=str(payment.id),
        processor=n.processor,
        event_id=n.event_id,
        reason=why,
        operations=count,
    )
    return Applied(ApplyOutcome.LOOKUP_SCHEDULED, payment.id, clip(f"{why}; {count} lookup(s) scheduled"))


def _operator(payment: store.PaymentRow, n: ProcessorNotification, why: str) -> Applied:
    log.error(
        "webhook contradicts a final payment state: an operator must check it",
        payment_id=str(payment.id),
        tenant_id=str(payment.tenant_id),
        processor=n.processor,
        event_id=n.event_id,
        event_type=n.event_type,
        reason=why,
    )
    return Applied(ApplyOutcome.NEEDS_OPERATOR, payment.id, clip(why))


def _already(payment: store.PaymentRow, why: str) -> Applied:
    return Applied(ApplyOutcome.ALREADY_APPLIED, payment.id, clip(why))


# --- finding what a notification is about ----------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    payment_id: uuid.UUID
    attempt_no: int | None = None
    operation_id: uuid.UUID | None = None


async def _find_target(conn: Connection, tenant_id: uuid.UUID, n: ProcessorNotification) -> _Target | None:
    if n.kind in (NotificationKind.AUTHORISATION, NotificationKind.CANCELLATION):
        row = await conn.fetchrow(
            """SELECT payment_id, attempt_no FROM payment_attempts
                WHERE tenant_id = $1 AND processor = $2
                  AND ((processor_reference <> '' AND processor_reference = $3) OR idempotency_key = $4)
                ORDER BY attempt_no DESC LIMIT 1""",
            tenant_id,
            n.processor,
            n.payment_reference,
            n.merchant_reference,
        )
        if row is not None:
            return _Target(row["payment_id"], attempt_no=row["attempt_no"])
    operation_id = _uuid(n.merchant_reference)
    if n.kind is NotificationKind.CAPTURE and operation_id is not None:
        row = await conn.fetchrow(
            """SELECT c.payment_id FROM payment_captures c JOIN payments p ON p.id = c.payment_id
                WHERE c.tenant_id = $1 AND c.id = $2 AND p.processor = $3""",
            tenant_id,
            operation_id,
            n.processor,
        )
        if row is not None:
            return _Target(row["payment_id"], operation_id=operation_id)
    if n.kind is NotificationKind.REFUND and not n.amount_is_total:
        row = await conn.fetchrow(
            """SELECT r.payment_id, r.id FROM payment_refunds r JOIN payments p ON p.id = r.payment_id
                WHERE r.tenant_id = $1 AND p.processor = $2
                  AND ((r.processor_reference <> '' AND r.processor_reference = $3) OR r.id = $4)
                LIMIT 1""",
            tenant_id,
            n.processor,
            n.processor_reference,
            operation_id,
        )
        if row is not None:
            return _Target(row["payment_id"], operation_id=row["id"])
    if not n.payment_reference:
        return None
    payment_id = await conn.fetchval(
        """SELECT id FROM payments WHERE tenant_id = $1 AND processor = $2 AND processor_reference = $3
            LIMIT 1""",
        tenant_id,
        n.processor,
        n.payment_reference,
    )
    return None if payment_id is None else _Target(payment_id)


async def apply_notification(
    conn: Connection, tenant_id: uuid.UUID, n: ProcessorNotification, ctx: ApplyContext
) -> Applied:
    """Apply verified notification ``n`` to tenant ``tenant_id``'s payment (module docstring).

    Runs inside the caller's transaction (READ COMMITTED) and takes the payment row
    lock. Returns what happened. Raises asyncpg errors (the caller's transaction is
    then rolled back and the processor's retry brings the event again) and
    :class:`payments.ledger.IdempotencyConflict` if a journal with the same key but
    different content exists (a bug; rolled back likewise).
    """
    target = await _find_target(conn, tenant_id, n)
    if target is None:
        return Applied(ApplyOutcome.UNMATCHED, None, "no payment of this tenant matches its references")
    payment = await store.lock_payment(conn, tenant_id, target.payment_id)
    if payment is None:
        return Applied(ApplyOutcome.UNMATCHED, None, "the payment disappeared")
    if n.kind is NotificationKind.AUTHORISATION:
        return await _authorisation(conn, ctx, payment, target.attempt_no, n)
    if n.kind is NotificationKind.CAPTURE:
        return await _capture(conn, ctx, payment, target.operation_id, n)
    if n.kind is NotificationKind.CANCELLATION:
        return await _cancellation(conn, ctx, payment, target.attempt_no, n)
    return await _refund(conn, ctx, payment, target.operation_id, n)


# --- charge attempts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attempt(ChargeAttempt):
    processor_reference: str


async def _lock_attempt(conn: Connection, payment: store.PaymentRow, attempt_no: int) -> _Attempt | None:
    row = await conn.fetchrow(
        """SELECT attempt_no, status, processor, processor_reference FROM payment_attempts
            WHERE payment_id = $1 AND tenant_id = $2 AND attempt_no = $3 FOR UPDATE""",
        payment.id,
        payment.tenant_id,
        attempt_no,
    )
    if row is None:
        return None
    return _Attempt(
        row["attempt_no"], AttemptStatus(row["status"]), row["processor"], row["processor_reference"]
    )


_OPEN_ATTEMPT: Final = OPEN_ATTEMPT_PAYMENT_STATUS


def _captured(payment: store.PaymentRow, n: ProcessorNotification) -> bool:
    """Whether a successful AUTHORISATION also captured: the processor says so, or (Adyen) the
    payment's capture method does (automatic capture is immediate, payments/adyen.py)."""
    return n.captured if n.captured is not None else payment.capture_method == "automatic"


async def _authorisation(
    conn: Connection,
    ctx: ApplyContext,
    payment: store.PaymentRow,
    attempt_no: int | None,
    n: ProcessorNotification,
) -> Applied:
    attempt = None if attempt_no is None else await _lock_attempt(conn, payment, attempt_no)
    if attempt is None:
        if n.success and n.captured and payment.status is _P.REQUIRES_CAPTURE:
            return await _capture(conn, ctx, payment, None, n)
        return Applied(ApplyOutcome.UNMATCHED, payment.id, "no charge attempt matches it")
    if (
        attempt.processor_reference
        and n.payment_reference
        and attempt.processor_reference != n.payment_reference
    ):
        return await _lookup_instead(conn, ctx, payment, n, "the attempt has another processor reference")
    if attempt.status in _OPEN_ATTEMPT:
        if payment.status is not _OPEN_ATTEMPT[attempt.status]:
            return _operator(payment, n, f"attempt {attempt.status.value} but payment {payment.status.value}")
        if not n.success:
            return await _declined(conn, ctx, payment, attempt, n.failure_code, n.failure_message)
        return await _charged(conn, ctx, payment, attempt, n)
    if attempt.status is _A.SUCCEEDED:
        if not n.success:
            return _operator(payment, n, "the processor reports a failure of a charge recorded as done")
        if n.captured and payment.status is _P.REQUIRES_CAPTURE:
            return await _capture(conn, ctx, payment, None, n)
        return _already(payment, f"attempt {attempt.attempt_no} already succeeded")
    # FAILED
    if n.success:
        return _operator(
            payment,
            n,
            f"the processor reports a charge for attempt {attempt.attempt_no}, recorded as not charged "
            "(possible double charge: reconcile and refund one)",
        )
    return _already(payment, f"attempt {attempt.attempt_no} already failed")


async def _charged(
    conn: Connection,
    ctx: ApplyContext,
    payment: store.PaymentRow,
    attempt: _Attempt,
    n: ProcessorNotification,
) -> Applied:
    if n.currency and n.currency != payment.currency:
        return await _lookup_instead(
            conn, ctx, payment, n, f"currency {n.currency} is not {payment.currency}"
        )
    captured = _captured(payment, n)
    amount = n.amount_minor
    # Stripe reports what it captured (at most the payment's amount); an authorization (and
    # Adyen's AUTHORISATION, captured in full when automatic) is for the payment's amount.
    partial_allowed = n.captured is True
    if amount is None or not (
        0 < amount <= payment.amount_minor if partial_allowed else amount == payment.amount_minor
    ):
        return await _lookup_instead(
            conn, ctx, payment, n, f"amount {amount} does not fit the payment's {payment.amount_minor}"
        )
    trigger = await record_charged(
        conn,
        ctx,
        payment,
        attempt,
        processor_reference=n.payment_reference or None,
        amount_captured_minor=amount if captured else None,
        detail=f"{n.processor} webhook {n.event_type} {n.event_id}",
    )
    return Applied(ApplyOutcome.APPLIED, payment.id, f"attempt {attempt.attempt_no}: {trigger.value}")


async def _declined(
    conn: Connection,
    ctx: ApplyContext,
    payment: store.PaymentRow,
    attempt: _Attempt,
    code: str,
    message: str,
) -> Applied:
    trigger = await record_declined(
        conn,
        ctx,
        payment,
        attempt,
        code or "declined",
        message or "the processor reports the charge failed",
    )
    return Applied(ApplyOutcome.APPLIED, payment.id, f"attempt {attempt.attempt_no}: {trigger.value}")


# --- captures and refunds ---------------------------------------------------------------------------


async def _lock_capture(
    conn: Connection, payment: store.PaymentRow, capture_id: uuid.UUID | None
) -> Operation | None:
    """Capture ``capture_id`` of the payment, else its one capture that is not FAILED; locked."""
    if capture_id is not None:
        row = await conn.fetchrow(
            """SELECT id, status, amount_minor FROM payment_captures
                WHERE id = $1 AND payment_id = $2 AND tenant_id = $3 FOR UPDATE""",
            capture_id,
            payment.id,
            payment.tenant_id,
        )
    else:
        row = await conn.fetchrow(
            """SELECT id, status, amount_minor FROM payment_captures
                WHERE payment_id = $1 AND tenant_id = $2 AND status <> 'failed' FOR UPDATE""",
            payment.id,
            payment.tenant_id,
        )
    if row is None:
        return None
    return Operation("capture", row["id"], CaptureStatus(row["status"]), row["amount_minor"])


async def _lock_refund(conn: Connection, payment: store.PaymentRow, refund_id: uuid.UUID) -> Operation | None:
    row = await conn.fetchrow(
        """SELECT id, status, amount_minor FROM payment_refunds
            WHERE id = $1 AND payment_id = $2 AND tenant_id = $3 FOR UPDATE""",
        refund_id,
        payment.id,
        payment.tenant_id,
    )
    if row is None:
        return None
    return Operation("refund", row["id"], RefundStatus(row["status"]), row["amount_minor"])


async def _op_failed(
    conn: Connection, ctx: ApplyContext, payment: store.PaymentRow, op: Operation, n: ProcessorNotification
) -> Applied:
    """The open (PROCESSING or UNKNOWN) capture or refund ``op`` failed at the processor."""
    await record_operation_failed(
        conn,
        ctx,
        payment,
        op,
        n.failure_code or f"{op.kind}_failed",
        n.failure_message or f"the processor reports the {op.kind} failed",
        processor_reference=n.processor_reference or None,
    )
    return Applied(ApplyOutcome.APPLIED, payment.id, f"{op.kind} {op.id} failed")


async def _op_succeeded(
    conn: Connection, ctx: ApplyContext, payment: store.PaymentRow, op: Operation, n: ProcessorNotification
) -> Applied:
    """The open (PROCESSING or UNKNOWN) capture or refund ``op`` succeeded at the processor:
    recorded if its amount and currency are the recorded ones, else looked up instead."""
    problem = _amount_problem(op, payment, n)
    if problem is not None:
        return await _lookup_instead(conn, ctx, payment, n, problem)
    await record_operation_succeeded(
        conn,
        ctx,
        payment,
        op,
        processor_reference=n.processor_reference or None,
        source=f"{n.processor} webhook {n.event_id}",
    )
    return Applied(ApplyOutcome.APPLIED, payment.id, f"{op.kind} {op.id} succeeded")


async def _op_not_open(
    conn: Connection, ctx: ApplyContext, payment: store.PaymentRow, op: Operation, n: ProcessorNotification
) -> Applied:
    """A success or failure of capture or refund ``op`` that is not open: PENDING (waiting for a
    retry: looked up instead), or already SUCCEEDED or FAILED (as reported, or contradicted)."""
    status = op.status.value
    if status == "pending":
        return await _lookup_instead(conn, ctx, payment, n, f"{op.kind} {op.id} is waiting for a retry")
    if (status == "succeeded") == bool(n.success):
        return _already(payment, f"{op.kind} {op.id} already {status}")
    return _operator(payment, n, f"{op.kind} {op.id} is {status}; the processor reports success={n.success}")


_OPEN_OPS: Final = frozenset({"processing", "unknown"})


def _amount_problem(op: Operation, payment: store.PaymentRow, n: ProcessorNotification) -> str | None:
    if n.currency and n.currency != payment.currency:
        return f"currency {n.currency} is not {payment.currency}"
    if n.amount_minor != op.amount_minor:
        return f"amount {n.amount_minor} is not the {op.amount_minor} recorded"
    return None


async def _capture(
    conn: Connection,
    ctx: ApplyContext,
    payment: store.PaymentRow,
    capture_id: uuid.UUID | None,
    n: ProcessorNotification,
) -> Applied:
    op = await _lock_capture(conn, payment, capture_id)
    if op is None:
        if payment.capture_method == "automatic" and payment.status is _P.SUCCEEDED:
            # Adyen can report the capture of an automatic-capture payment too.
            if n.success:
                return _already(payment, "the automatic capture is confirmed")
            return _operator(payment, n, "the processor reports the automatic capture failed")
        if n.success:
            return _operator(payment, n, "the processor reports a capture Switchboard has no record of")
        return Applied(ApplyOutcome.UNMATCHED, payment.id, "no capture matches it")
    status = op.status.value
    if status in _OPEN_OPS:
        if payment.status is not _P.REQUIRES_CAPTURE:
            return _operator(payment, n, f"capture {status} but payment {payment.status.value}")
        if not n.success:
            return await _op_failed(conn, ctx, payment, op, n)
        return await _op_succeeded(conn, ctx, payment, op, n)
    return await _op_not_open(conn, ctx, payment, op, n)


async def _refund(
    conn: Connection,
    ctx: ApplyContext,
    payment: store.PaymentRow,
    refund_id: uuid.UUID | None,
    n: ProcessorNotification,
) -> Applied:
    if n.amount_is_total:
        if n.amount_minor == payment.amount_refunded_minor:
            return _already(payment, f"{n.amount_minor} refunded, as recorded")
        if await schedule_lookups(conn, payment.tenant_id, [payment.id], ctx.lookup_after_s):
            return Applied(
                ApplyOutcome.LOOKUP_SCHEDULED,
                payment.id,
                f"{n.amount_minor} refunded at the processor; the open refunds are looked up",
            )
        return _operator(
            payment,
            n,
            f"the processor has refunded {n.amount_minor}, Switchboard {payment.amount_refunded_minor} "
            "with no refund open (refunded outside Switchboard?)",
        )
    op = None if refund_id is None else await _lock_refund(conn, payment, refund_id)
    if op is None:
        # Not identifiable (the processor's refund id is not recorded yet and the event does not
        # carry our refund id): if refunds are open, the processor answers for them.
        if await schedule_lookups(conn, payment.tenant_id, [payment.id], ctx.lookup_after_s):
            return Applied(
                ApplyOutcome.LOOKUP_SCHEDULED, payment.id, "refund not identified; open refunds looked up"
            )
        if n.success:
            return _operator(payment, n, "the processor reports a refund Switchboard has no record of")
        return Applied(ApplyOutcome.UNMATCHED, payment.id, "no refund matches it")
    status = op.status.value
    if n.success is None:
        if not n.processor_reference:
            return _already(payment, f"refund {op.id} still pending at the processor")
        await conn.execute(
            """UPDATE payment_refunds SET processor_reference = $3
                WHERE id = $1 AND tenant_id = $2 AND processor_reference = ''""",
            op.id,
            payment.tenant_id,
            n.processor_reference,
        )
        return _already(payment, f"refund {op.id} still pending at the processor")
    if status in _OPEN_OPS:
        if not n.success:
            return await _op_failed(conn, ctx, payment, op, n)
        try:
            next_status(payment.status, PaymentTrigger.REFUND_SUCCEEDED)
        except IllegalTransition:
            return _operator(payment, n, f"refund {status} but payment {payment.status.value}")
        return await _op_succeeded(conn, ctx, payment, op, n)
    return await _op_not_open(conn, ctx, payment, op, n)


# --- cancels ----------------------------------------------------------------------------------------


async def _cancellation(
    conn: Connection,
    ctx: ApplyContext,
    payment: store.PaymentRow,
    attempt_no: int | None,
    n: ProcessorNotification,
) -> Applied:
    attempt = None if attempt_no is None else await _lock_attempt(conn, payment, attempt_no)
    if attempt is not None and attempt.status is _A.FAILED:
        return _already(payment, f"attempt {attempt.attempt_no} (the one canceled) had failed")
    if not n.success:
        if payment.status is _P.REQUIRES_CAPTURE and payment.cancel_requested_at is not None:
            await conn.execute(
                """UPDATE payments SET cancel_requested_at = NULL, cancel_next_lookup_at = NULL,
                                       failure_code = 'cancel_refused', failure_message = $2,
                                       updated_at = now()
                    WHERE id = $1""",
                payment.id,
                clip(f"cancel refused: {n.failure_message or 'the processor did not release it'}"),
            )
            await store.notify_payment_changed(conn, payment.id)
            return Applied(ApplyOutcome.APPLIED, payment.id, "cancel refused: request withdrawn")
        return _already(payment, f"no cancel pending (payment {payment.status.value})")
    if payment.status is _P.REQUIRES_CAPTURE:
        busy = await conn.fetchval(
            "SELECT count(*) FROM payment_captures WHERE payment_id = $1 AND status <> 'failed'", payment.id
        )
        if busy:
            return await _lookup_instead(conn, ctx, payment, n, "a capture is open or done")
        detail = payment.cancellation_reason or f"released at the processor ({n.event_type})"
        await record_canceled(conn, ctx, payment, detail)
        return Applied(ApplyOutcome.APPLIED, payment.id, "authorization released: canceled")
    if attempt is not None and _OPEN_ATTEMPT.get(attempt.status) is payment.status:
        return await _declined(
            conn,
            ctx,
            payment,
            attempt,
            "canceled",
            "the processor canceled the payment before it charged",
        )
    if payment.status in (_P.CANCELED, _P.FAILED):
        return _already(payment, f"payment already {payment.status.value}")
    return _operator(payment, n, f"a cancellation for a payment {payment.status.value}")
