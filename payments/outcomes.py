"""Record a processor's outcome on a payment: the one place that moves money in the records.

The payment worker and the janitor (payments/execution.py) learn an outcome
from the processor's answer to a request or a lookup; a verified processor
webhook (payments/webhook_apply.py) learns it from a notification. Both decide
*whether* the outcome may be applied (state, lease, amounts, contradictions)
and then record it with these functions, so that whoever records an outcome
first writes exactly the same rows: the operation's status, the payment's
transition (:func:`payments.store.record_transition`), the ledger journal
(:func:`payments.ledger.post_journal`, one idempotency key per movement of
money) and the ``PaymentEvent`` in the outbox (:mod:`payments.events`,
deterministic event id).

=========================  ===================================================================
outcome                    what is recorded
=========================  ===================================================================
charge captured            attempt SUCCEEDED, payment SUCCEEDED with the captured amount,
(:func:`record_charged`)   journal ``capture:<payment id>`` (reference: the processor's payment
                           reference), ``payment.succeeded``
charge authorized          attempt SUCCEEDED, payment REQUIRES_CAPTURE, no journal (an
(:func:`record_charged`)   authorization moves no money), ``payment.requires_capture``
charge declined            attempt FAILED, payment FAILED, ``payment.failed``
(:func:`record_declined`)  (:func:`fail_attempt`: the same without the event, for a failover)
capture succeeded          capture SUCCEEDED, payment SUCCEEDED with the capture's amount,
(:func:`record_operation_  journal ``capture:<capture id>`` (reference: the payment's processor
succeeded`)                reference), ``payment.captured``
refund succeeded           refund SUCCEEDED, ``amount_refunded_minor`` grows by its amount,
(:func:`record_operation_  journal ``refund:<refund id>`` (reference: the processor's refund id),
succeeded`)                ``payment.refunded``
capture or refund failed   the capture or refund FAILED, the payment unchanged, no journal,
(:func:`record_operation_  ``payment.capture_failed`` / ``payment.refund_failed``
failed`)
authorization released     payment CANCELED, its cancel lookup cleared, ``payment.canceled``
(:func:`record_canceled`)
=========================  ===================================================================

An outcome for an UNKNOWN attempt, capture or refund is recorded as its
resolution (``resolved_succeeded`` / ``resolved_failed``, see
:func:`outcome_trigger`). Every function runs inside the caller's transaction,
under the payment row lock (:func:`payments.store.lock_payment`) and, for an
attempt, capture or refund, with that row locked too; it checks nothing the
state machine does not (the caller has). Raises asyncpg errors,
:class:`payments.state_machine.IllegalTransition` /
:class:`payments.store.StaleStatus` when the records are not in the state the
outcome moves from, and :class:`payments.ledger.IdempotencyConflict` when a
journal with the same key but other content exists (each rolls the
transaction back).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, Protocol

from payments import store
from payments.events import publish_payment_event
from payments.ledger import JournalKind, capture_postings, post_journal, refund_postings
from payments.state_machine import (
    AttemptStatus,
    CaptureStatus,
    OperationTrigger,
    PaymentStatus,
    PaymentTrigger,
    RefundStatus,
    event_type_for,
    next_status,
    operation_failed_event_type,
)
from switchboard.db.pool import Connection

_P = PaymentStatus

#: Longest text stored in a failure field or a transition detail (characters).
MAX_TEXT_CHARS: Final = 1000
#: Longest reference stored on a ledger journal (characters).
MAX_JOURNAL_REFERENCE_CHARS: Final = 200
#: The payment status that goes with an open charge attempt: a PENDING attempt's payment is
#: PROCESSING, an UNKNOWN attempt's payment is UNKNOWN (any other pair is inconsistent).
OPEN_ATTEMPT_PAYMENT_STATUS: Final[Mapping[AttemptStatus, PaymentStatus]] = {
    AttemptStatus.PENDING: _P.PROCESSING,
    AttemptStatus.UNKNOWN: _P.UNKNOWN,
}

OperationKind = Literal["capture", "refund"]
"""A payment operation sent after the charge (cancels live on the payment row)."""

#: The table of each operation kind.
OPERATION_TABLES: Final[Mapping[OperationKind, str]] = {
    "capture": "payment_captures",
    "refund": "payment_refunds",
}
# Table names are the two constants above; every value is a bind parameter.
_OPERATION_UPDATE: Final = {
    kind: f"""UPDATE {table}
                 SET status = $4, processor_reference = coalesce($5, processor_reference),
                     failure_code = coalesce($6, failure_code),
                     failure_message = coalesce($7, failure_message),
                     next_lookup_at = $8, lookups = coalesce($9, lookups), updated_at = now()
               WHERE id = $1 AND payment_id = $2 AND tenant_id = $3"""  # noqa: S608
    for kind, table in OPERATION_TABLES.items()
}


class EventContext(Protocol):
    """Where ``PaymentEvent`` rows go and what time they carry (an ``Executor``, an ``ApplyContext``).

    ``topic_prefix``: the Kafka topic prefix of the outbox rows. ``clock``: timezone-aware now.
    """

    @property
    def topic_prefix(self) -> str: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...


@dataclass(frozen=True)
class ChargeAttempt:
    """The charge attempt an outcome is about, as the caller locked it (callers subclass it
    with the columns they read too)."""

    attempt_no: int
    status: AttemptStatus
    processor: str


@dataclass(frozen=True)
class Operation:
    """The capture or refund an outcome is about, as the caller locked it (callers may
    subclass it with the columns they read too)."""

    kind: OperationKind
    id: uuid.UUID
    status: CaptureStatus | RefundStatus
    amount_minor: int


def clip(value: object) -> str:
    """``value`` as text of at most :data:`MAX_TEXT_CHARS` characters (failure fields, details)."""
    return str(value)[:MAX_TEXT_CHARS]


def outcome_trigger(
    status: AttemptStatus | CaptureStatus | RefundStatus, *, succeeded: bool
) -> OperationTrigger:
    """The event that records an open operation's outcome: ``succeeded`` / ``failed``, or
    ``resolved_succeeded`` / ``resolved_failed`` when it was UNKNOWN."""
    if status.value == "unknown":
        return OperationTrigger.RESOLVED_SUCCEEDED if succeeded else OperationTrigger.RESOLVED_FAILED
    return OperationTrigger.SUCCEEDED if succeeded else OperationTrigger.FAILED


async def publish_event(
    conn: Connection,
    ctx: EventContext,
    payment: store.PaymentRow,
    previous: PaymentStatus,
    trigger: PaymentTrigger,
    *,
    attempt_no: int = 0,
    capture_id: uuid.UUID | None = None,
    refund_id: uuid.UUID | None = None,
) -> None:
    """Enqueue the ``PaymentEvent`` that ``trigger`` causes in ``previous`` (if it causes one),
    in this transaction, stamped ``ctx.clock()``."""
    event_type = event_type_for(previous, trigger)
    if event_type is None:
        return
    await publish_payment_event(
        conn,
        ctx.topic_prefix,
        payment.tenant_id,
        payment.id,
        event_type,
        previous,
        ctx.clock(),
        attempt_no=attempt_no,
        capture_id=capture_id,
        refund_id=refund_id,
    )


# --- charge attempts --------------------------------------------------------------------------------


async def record_charged(
    conn: Connection,
    ctx: EventContext,
    payment: store.PaymentRow,
    attempt: ChargeAttempt,
    *,
    processor_reference: str | None,
    amount_captured_minor: int | None,
    detail: str = "",
) -> PaymentTrigger:
    """The PENDING or UNKNOWN ``attempt`` charged (``amount_captured_minor`` captured) or, with
    ``amount_captured_minor`` None, only authorized (manual capture). Returns the payment's trigger.

    Attempt SUCCEEDED (``processor_reference`` stored when given); payment SUCCEEDED with the
    captured amount, journal ``capture:<payment id>`` (reference: ``processor_reference``,
    postings at the attempt's processor) and ``payment.succeeded``; or payment
    REQUIRES_CAPTURE and ``payment.requires_capture``. ``detail``: the transition's detail.
    """
    from_unknown = attempt.status is AttemptStatus.UNKNOWN
    await store.finish_attempt(
        conn,
        payment.tenant_id,
        payment.id,
        attempt.attempt_no,
        outcome_trigger(attempt.status, succeeded=True),
        processor_reference=processor_reference,
    )
    if amount_captured_minor is not None:
        trigger = PaymentTrigger.RESOLVED_SUCCEEDED if from_unknown else PaymentTrigger.ATTEMPT_SUCCEEDED
        await store.record_transition(
            conn,
            payment.tenant_id,
            payment.id,
            payment.status,
            _P.SUCCEEDED,
            trigger,
            attempt_no=attempt.attempt_no,
            detail=clip(detail),
            amount_captured_minor=amount_captured_minor,
        )
        await post_journal(
            conn,
            payment.tenant_id,
            kind=JournalKind.CAPTURE,
            payment_id=payment.id,
            reference=(processor_reference or "")[:MAX_JOURNAL_REFERENCE_CHARS],
            idempotency_key=f"capture:{payment.id}",
            postings=capture_postings(attempt.processor, amount_captured_minor, payment.currency),
        )
    else:
        trigger = (
            PaymentTrigger.RESOLVED_REQUIRES_CAPTURE if from_unknown else PaymentTrigger.ATTEMPT_AUTHORIZED
        )
        await store.record_transition(
            conn,
            payment.tenant_id,
            payment.id,
            payment.status,
            _P.REQUIRES_CAPTURE,
            trigger,
            attempt_no=attempt.attempt_no,
            detail=clip(detail),
        )
    await publish_event(conn, ctx, payment, payment.status, trigger, attempt_no=attempt.attempt_no)
    return trigger


async def fail_attempt(
    conn: Connection, payment: store.PaymentRow, attempt: ChargeAttempt, code: str, message: str
) -> PaymentTrigger:
    """The PENDING or UNKNOWN ``attempt`` definitely did not charge: attempt FAILED, payment FAILED
    (``code`` / ``message`` on both, clipped). Publishes NO event (a failover attempt may follow
    in this transaction; see :func:`record_declined`). Returns the payment's trigger."""
    code, message = clip(code), clip(message)
    await store.finish_attempt(
        conn,
        payment.tenant_id,
        payment.id,
        attempt.attempt_no,
        outcome_trigger(attempt.status, succeeded=False),
        failure_code=code,
        failure_message=message,
    )
    from_unknown = attempt.status is AttemptStatus.UNKNOWN
    trigger = PaymentTrigger.RESOLVED_FAILED if from_unknown else PaymentTrigger.ATTEMPT_FAILED
    await store.record_transition(
        conn,
        payment.tenant_id,
        payment.id,
        payment.status,
        _P.FAILED,
        trigger,
        attempt_no=attempt.attempt_no,
        failure_code=code,
        failure_message=message,
    )
    return trigger


async def record_declined(
    conn: Connection,
    ctx: EventContext,
    payment: store.PaymentRow,
    attempt: ChargeAttempt,
    code: str,
    message: str,
) -> PaymentTrigger:
    """The PENDING or UNKNOWN ``attempt`` was declined (or otherwise failed for good, with no
    failover): :func:`fail_attempt` and ``payment.failed``. Returns the payment's trigger."""
    trigger = await fail_attempt(conn, payment, attempt, code, message)
    await publish_event(conn, ctx, payment, payment.status, trigger, attempt_no=attempt.attempt_no)
    return trigger


# --- captures, refunds, cancels ---------------------------------------------------------------------


async def move_operation(
    conn: Connection,
    payment: store.PaymentRow,
    op: Operation,
    event: OperationTrigger | None,
    *,
    next_lookup_at: datetime | None,
    processor_reference: str | None = None,
    failure_code: str | None = None,
    failure_message: str | None = None,
    lookups: int | None = None,
) -> CaptureStatus | RefundStatus:
    """Apply ``event`` (None: keep the status) to the locked capture or refund ``op``, set its
    ``next_lookup_at`` and, when given, its processor reference, failure fields and lookup count;
    record a status change in the operation's history
    (:func:`payments.store.record_operation_transition`, detail: the failure message); touch the
    payment and notify its watchers. Returns the operation's new status."""
    status = op.status if event is None else next_status(op.status, event)
    if status is not op.status:
        await store.record_operation_transition(
            conn,
            payment.tenant_id,
            payment.id,
            op.status,
            status,
            event,
            operation_id=op.id,
            detail=failure_message or "",
        )
    await conn.execute(
        _OPERATION_UPDATE[op.kind],
        op.id,
        payment.id,
        payment.tenant_id,
        status.value,
        processor_reference,
        failure_code,
        failure_message,
        next_lookup_at,
        lookups,
    )
    await conn.execute("UPDATE payments SET updated_at = now() WHERE id = $1", payment.id)
    await store.notify_payment_changed(conn, payment.id)
    return status


async def record_operation_succeeded(
    conn: Connection,
    ctx: EventContext,
    payment: store.PaymentRow,
    op: Operation,
    *,
    processor_reference: str | None,
    source: str = "",
) -> None:
    """The PROCESSING or UNKNOWN capture or refund ``op`` succeeded at the processor.

    The operation SUCCEEDED (failure fields cleared, ``processor_reference`` stored when
    given). A capture: payment REQUIRES_CAPTURE -> SUCCEEDED with the capture's amount
    (transition detail ``capture <id>``, then ``; <source>`` when given), journal
    ``capture:<capture id>``, ``payment.captured``. A refund (the payment must be SUCCEEDED,
    else ``IllegalTransition``): ``amount_refunded_minor`` grows by its amount, journal
    ``refund:<refund id>`` (reference: ``processor_reference``), ``payment.refunded``.
    """
    if op.kind == "refund":
        next_status(payment.status, PaymentTrigger.REFUND_SUCCEEDED)  # SUCCEEDED accepts it, unchanged
    await move_operation(
        conn,
        payment,
        op,
        outcome_trigger(op.status, succeeded=True),
        next_lookup_at=None,
        processor_reference=processor_reference,
        failure_code="",
        failure_message="",
    )
    if op.kind == "capture":
        await store.record_transition(
            conn,
            payment.tenant_id,
            payment.id,
            _P.REQUIRES_CAPTURE,
            _P.SUCCEEDED,
            PaymentTrigger.CAPTURE_SUCCEEDED,
            detail=clip(f"capture {op.id}; {source}" if source else f"capture {op.id}"),
            amount_captured_minor=op.amount_minor,
        )
        await post_journal(
            conn,
            payment.tenant_id,
            kind=JournalKind.CAPTURE,
            payment_id=payment.id,
            reference=payment.processor_reference[:MAX_JOURNAL_REFERENCE_CHARS],
            idempotency_key=f"capture:{op.id}",
            postings=capture_postings(payment.processor, op.amount_minor, payment.currency),
        )
        await publish_event(
            conn, ctx, payment, _P.REQUIRES_CAPTURE, PaymentTrigger.CAPTURE_SUCCEEDED, capture_id=op.id
        )
        return
    await conn.execute(
        """UPDATE payments SET amount_refunded_minor = amount_refunded_minor + $3, updated_at = now()
            WHERE id = $1 AND tenant_id = $2""",
        payment.id,
        payment.tenant_id,
        op.amount_minor,
    )
    await post_journal(
        conn,
        payment.tenant_id,
        kind=JournalKind.REFUND,
        payment_id=payment.id,
        reference=(processor_reference or "")[:MAX_JOURNAL_REFERENCE_CHARS],
        idempotency_key=f"refund:{op.id}",
        postings=refund_postings(payment.processor, op.amount_minor, payment.currency),
    )
    await publish_event(conn, ctx, payment, _P.SUCCEEDED, PaymentTrigger.REFUND_SUCCEEDED, refund_id=op.id)


async def record_operation_failed(
    conn: Connection,
    ctx: EventContext,
    payment: store.PaymentRow,
    op: Operation,
    code: str,
    message: str,
    *,
    processor_reference: str | None = None,
) -> None:
    """The PROCESSING or UNKNOWN capture or refund ``op`` definitely did not happen: FAILED (its
    lookup cleared; ``code`` / ``message`` clipped; ``processor_reference`` stored when given),
    and ``payment.capture_failed`` / ``payment.refund_failed`` carrying it. The payment's status
    does not change (REQUIRES_CAPTURE or SUCCEEDED; CANCELED when a capture is refused because
    the authorization was released meanwhile)."""
    await move_operation(
        conn,
        payment,
        op,
        outcome_trigger(op.status, succeeded=False),
        next_lookup_at=None,
        processor_reference=processor_reference,
        failure_code=clip(code),
        failure_message=clip(message),
    )
    await publish_payment_event(
        conn,
        ctx.topic_prefix,
        payment.tenant_id,
        payment.id,
        operation_failed_event_type(op.kind),
        payment.status,
        ctx.clock(),
        capture_id=op.id if op.kind == "capture" else None,
        refund_id=op.id if op.kind == "refund" else None,
    )


async def record_canceled(
    conn: Connection, ctx: EventContext, payment: store.PaymentRow, detail: str
) -> None:
    """The processor released the authorization of REQUIRES_CAPTURE ``payment``: its cancel lookup
    is cleared, payment CANCELED (``detail`` clipped), ``payment.canceled``."""
    await conn.execute(
        "UPDATE payments SET cancel_next_lookup_at = NULL, updated_at = now() WHERE id = $1", payment.id
    )
    await store.record_transition(
        conn,
        payment.tenant_id,
        payment.id,
        _P.REQUIRES_CAPTURE,
        _P.CANCELED,
        PaymentTrigger.CANCEL_SUCCEEDED,
        detail=clip(detail),
    )
    await publish_event(conn, ctx, payment, _P.REQUIRES_CAPTURE, PaymentTrigger.CANCEL_SUCCEEDED)
