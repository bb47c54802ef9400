"""The payment state machine: every allowed status change, as explicit tables.

Plain Python, no I/O. The gateway and the payment worker apply every change
through :func:`next_status` while holding the payment row lock
(``SELECT ... FOR UPDATE``), in the same transaction that records the change,
so two racing changes are serialized and the loser sees the winner's status.

Four machines, one table each (``(from_status, event) -> to_status``):

- :data:`PAYMENT_TRANSITIONS`: a payment (:class:`PaymentStatus`, driven by
  :class:`PaymentTrigger`). Statuses mirror ``switchboard.payments.v1.PaymentStatus``.
- :data:`ATTEMPT_TRANSITIONS`: one charge attempt (``{payment_id}_{attempt_no}``
  idempotency key at the processor, see :mod:`payments.processor`).
- :data:`CAPTURE_TRANSITIONS` and :data:`REFUND_TRANSITIONS`: one capture, one refund.

Attempts, captures and refunds are all "operations at a processor" and share
the events :class:`OperationTrigger`.

The payment rules::

    REQUIRES_PROCESSING --attempt_started--> PROCESSING
    REQUIRES_PROCESSING --cancel_requested--> CANCELED        (nothing reached a processor)
    PROCESSING --attempt_succeeded--> SUCCEEDED               (automatic capture)
    PROCESSING --attempt_authorized--> REQUIRES_CAPTURE       (manual capture)
    PROCESSING --attempt_failed--> FAILED                     (definitely not charged)
    PROCESSING --attempt_unknown--> UNKNOWN                   (answer lost: money may have moved)
    UNKNOWN --resolved_succeeded--> SUCCEEDED                 (janitor lookup or webhook only;
    UNKNOWN --resolved_requires_capture--> REQUIRES_CAPTURE    nothing else is allowed while
    UNKNOWN --resolved_failed--> FAILED                        UNKNOWN)
    FAILED --failover_attempt_started--> PROCESSING           (see below)
    REQUIRES_CAPTURE --capture_requested--> REQUIRES_CAPTURE  (a capture is recorded)
    REQUIRES_CAPTURE --capture_succeeded--> SUCCEEDED
    REQUIRES_CAPTURE --cancel_requested--> REQUIRES_CAPTURE   (the release is sent to the processor)
    REQUIRES_CAPTURE --cancel_succeeded--> CANCELED           (released, or the authorization expired)
    SUCCEEDED --refund_requested--> SUCCEEDED
    SUCCEEDED --refund_succeeded--> SUCCEEDED

Refunds: decided here, a refunded payment stays SUCCEEDED; its refunds are
their own records and ``amount_refunded_minor`` grows (fully refunded when it
equals ``amount_captured_minor``). There is no PARTIALLY_REFUNDED / REFUNDED
status, so a status never has to be recomputed from a refund that later fails,
and the payment's status answers one question only: did the charge happen.

Self-loops (``from == to``) are events a status *accepts* without changing:
they encode which status allows which request (refunds only on SUCCEEDED,
captures only on REQUIRES_CAPTURE) and record no transition.

Failover: a FAILED payment was definitely not charged (it got there by
``attempt_failed`` or ``resolved_failed``), so a new attempt, possibly at
another processor, cannot double-charge; :func:`check_failover` verifies
that every earlier attempt is FAILED. The worker applies ``attempt_failed``
and ``failover_attempt_started`` in one transaction, so a committed FAILED
status is final to every client (Watch streams end on it, ``payment.failed``
is published only when no failover follows).

Amounts are integers in minor units of the payment's ISO 4217 currency.
:func:`check_refund` counts every refund that is not FAILED (PENDING,
PROCESSING, UNKNOWN, SUCCEEDED): under the payment row lock, two concurrent
refunds can therefore never exceed the captured amount together.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, overload


class PaymentStatus(enum.StrEnum):
    """A payment's status; mirrors ``switchboard.payments.v1.PaymentStatus`` (``PAYMENT_STATUS_<NAME>``)."""

    REQUIRES_PROCESSING = "requires_processing"
    PROCESSING = "processing"
    REQUIRES_CAPTURE = "requires_capture"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    CANCELED = "canceled"


class AttemptStatus(enum.StrEnum):
    """One charge attempt's status; mirrors ``switchboard.payments.v1.AttemptStatus``."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


class CaptureStatus(enum.StrEnum):
    """One capture's status; mirrors ``switchboard.payments.v1.CaptureStatus``."""

    PENDING = "pending"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


class RefundStatus(enum.StrEnum):
    """One refund's status; mirrors ``switchboard.payments.v1.RefundStatus``."""

    PENDING = "pending"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


class PaymentTrigger(enum.StrEnum):
    """The events that drive a payment (its value is ``PaymentTransition.cause`` in the API).

    Called triggers so they are not confused with the Kafka ``PaymentEvent`` message.
    """

    #: The worker starts the first attempt.
    ATTEMPT_STARTED = "attempt_started"
    #: The processor charged (automatic capture).
    ATTEMPT_SUCCEEDED = "attempt_succeeded"
    #: The processor authorized (manual capture).
    ATTEMPT_AUTHORIZED = "attempt_authorized"
    #: The processor definitely did not charge (declined, permanent error, retries exhausted
    #: on errors that said "not processed").
    ATTEMPT_FAILED = "attempt_failed"
    #: The processor's answer was lost (timeout after sending, reset, 5xx, malformed answer).
    ATTEMPT_UNKNOWN = "attempt_unknown"
    #: Lookup/webhook: the UNKNOWN attempt did charge.
    RESOLVED_SUCCEEDED = "resolved_succeeded"
    #: Lookup/webhook: the UNKNOWN attempt authorized (manual capture).
    RESOLVED_REQUIRES_CAPTURE = "resolved_requires_capture"
    #: Lookup/webhook: the UNKNOWN attempt definitely did not charge.
    RESOLVED_FAILED = "resolved_failed"
    #: A new attempt after a FAILED one (every earlier attempt definitely did not charge).
    FAILOVER_ATTEMPT_STARTED = "failover_attempt_started"
    #: CapturePayment accepted (a capture record is created).
    CAPTURE_REQUESTED = "capture_requested"
    #: The capture succeeded at the processor.
    CAPTURE_SUCCEEDED = "capture_succeeded"
    #: CancelPayment accepted.
    CANCEL_REQUESTED = "cancel_requested"
    #: The processor released the authorization (after a cancel, or because it expired).
    CANCEL_SUCCEEDED = "cancel_succeeded"
    #: RefundPayment accepted (a refund record is created).
    REFUND_REQUESTED = "refund_requested"
    #: A refund succeeded at the processor.
    REFUND_SUCCEEDED = "refund_succeeded"


class OperationTrigger(enum.StrEnum):
    """The events that drive one operation at a processor: an attempt, a capture or a refund."""

    #: The worker begins the processor call (PENDING -> PROCESSING; captures and refunds).
    STARTED = "started"
    #: The processor said it did NOT process the call (429, lock timeout, refused connection):
    #: back to PENDING, retried later with the same idempotency key (captures and refunds).
    RETRY_SCHEDULED = "retry_scheduled"
    #: The processor did it.
    SUCCEEDED = "succeeded"
    #: The processor definitely did not do it.
    FAILED = "failed"
    #: The answer was lost: it may or may not have happened.
    AMBIGUOUS = "ambiguous"
    #: Lookup/webhook: the UNKNOWN operation happened.
    RESOLVED_SUCCEEDED = "resolved_succeeded"
    #: Lookup/webhook: the UNKNOWN operation definitely did not happen.
    RESOLVED_FAILED = "resolved_failed"


class PaymentEventType(enum.StrEnum):
    """The ``event_type`` of a ``switchboard.payments.v1.PaymentEvent`` on topic ``payments.events``."""

    PROCESSING = "payment.processing"
    REQUIRES_CAPTURE = "payment.requires_capture"
    SUCCEEDED = "payment.succeeded"
    CAPTURED = "payment.captured"
    CAPTURE_FAILED = "payment.capture_failed"
    FAILED = "payment.failed"
    UNKNOWN = "payment.unknown"
    CANCELED = "payment.canceled"
    REFUNDED = "payment.refunded"
    REFUND_FAILED = "payment.refund_failed"


_P = PaymentStatus
_PT = PaymentTrigger
_A = AttemptStatus
_C = CaptureStatus
_R = RefundStatus
_O = OperationTrigger

#: The payment table: ``(from_status, event) -> to_status``; any other pair is illegal.
PAYMENT_TRANSITIONS: Final[Mapping[tuple[PaymentStatus, PaymentTrigger], PaymentStatus]] = MappingProxyType(
    {
        (_P.REQUIRES_PROCESSING, _PT.ATTEMPT_STARTED): _P.PROCESSING,
        (_P.REQUIRES_PROCESSING, _PT.CANCEL_REQUESTED): _P.CANCELED,
        (_P.PROCESSING, _PT.ATTEMPT_SUCCEEDED): _P.SUCCEEDED,
        (_P.PROCESSING, _PT.ATTEMPT_AUTHORIZED): _P.REQUIRES_CAPTURE,
        (_P.PROCESSING, _PT.ATTEMPT_FAILED): _P.FAILED,
        (_P.PROCESSING, _PT.ATTEMPT_UNKNOWN): _P.UNKNOWN,
        (_P.UNKNOWN, _PT.RESOLVED_SUCCEEDED): _P.SUCCEEDED,
        (_P.UNKNOWN, _PT.RESOLVED_REQUIRES_CAPTURE): _P.REQUIRES_CAPTURE,
        (_P.UNKNOWN, _PT.RESOLVED_FAILED): _P.FAILED,
        (_P.FAILED, _PT.FAILOVER_ATTEMPT_STARTED): _P.PROCESSING,
        (_P.REQUIRES_CAPTURE, _PT.CAPTURE_REQUESTED): _P.REQUIRES_CAPTURE,
        (_P.REQUIRES_CAPTURE, _PT.CAPTURE_SUCCEEDED): _P.SUCCEEDED,
        (_P.REQUIRES_CAPTURE, _PT.CANCEL_REQUESTED): _P.REQUIRES_CAPTURE,
        (_P.REQUIRES_CAPTURE, _PT.CANCEL_SUCCEEDED): _P.CANCELED,
        (_P.SUCCEEDED, _PT.REFUND_REQUESTED): _P.SUCCEEDED,
        (_P.SUCCEEDED, _PT.REFUND_SUCCEEDED): _P.SUCCEEDED,
    }
)

#: One charge attempt. PENDING covers "at the processor" (including an outcome the
#: processor reports later); a retryable error keeps it PENDING under the same key.
ATTEMPT_TRANSITIONS: Final[Mapping[tuple[AttemptStatus, OperationTrigger], AttemptStatus]] = MappingProxyType(
    {
        (_A.PENDING, _O.SUCCEEDED): _A.SUCCEEDED,
        (_A.PENDING, _O.FAILED): _A.FAILED,
        (_A.PENDING, _O.AMBIGUOUS): _A.UNKNOWN,
        (_A.UNKNOWN, _O.RESOLVED_SUCCEEDED): _A.SUCCEEDED,
        (_A.UNKNOWN, _O.RESOLVED_FAILED): _A.FAILED,
    }
)

#: One capture.
CAPTURE_TRANSITIONS: Final[Mapping[tuple[CaptureStatus, OperationTrigger], CaptureStatus]] = MappingProxyType(
    {
        (_C.PENDING, _O.STARTED): _C.PROCESSING,
        (_C.PROCESSING, _O.RETRY_SCHEDULED): _C.PENDING,
        (_C.PROCESSING, _O.SUCCEEDED): _C.SUCCEEDED,
        (_C.PROCESSING, _O.FAILED): _C.FAILED,
        (_C.PROCESSING, _O.AMBIGUOUS): _C.UNKNOWN,
        (_C.UNKNOWN, _O.RESOLVED_SUCCEEDED): _C.SUCCEEDED,
        (_C.UNKNOWN, _O.RESOLVED_FAILED): _C.FAILED,
    }
)

#: One refund. PROCESSING also covers refunds the processor completes asynchronously.
REFUND_TRANSITIONS: Final[Mapping[tuple[RefundStatus, OperationTrigger], RefundStatus]] = MappingProxyType(
    {
        (_R.PENDING, _O.STARTED): _R.PROCESSING,
        (_R.PROCESSING, _O.RETRY_SCHEDULED): _R.PENDING,
        (_R.PROCESSING, _O.SUCCEEDED): _R.SUCCEEDED,
        (_R.PROCESSING, _O.FAILED): _R.FAILED,
        (_R.PROCESSING, _O.AMBIGUOUS): _R.UNKNOWN,
        (_R.UNKNOWN, _O.RESOLVED_SUCCEEDED): _R.SUCCEEDED,
        (_R.UNKNOWN, _O.RESOLVED_FAILED): _R.FAILED,
    }
)

#: Payment statuses final to clients: Watch streams end on them. SUCCEEDED still accepts
#: refunds (without changing); FAILED is left only by a failover applied in the same
#: transaction as the failure (see the module docstring); CANCELED accepts nothing.
FINAL_PAYMENT_STATUSES: Final[frozenset[PaymentStatus]] = frozenset({_P.SUCCEEDED, _P.FAILED, _P.CANCELED})
#: Attempt statuses that never change again.
FINAL_ATTEMPT_STATUSES: Final[frozenset[AttemptStatus]] = frozenset({_A.SUCCEEDED, _A.FAILED})
#: Capture statuses that never change again.
FINAL_CAPTURE_STATUSES: Final[frozenset[CaptureStatus]] = frozenset({_C.SUCCEEDED, _C.FAILED})
#: Refund statuses that never change again.
FINAL_REFUND_STATUSES: Final[frozenset[RefundStatus]] = frozenset({_R.SUCCEEDED, _R.FAILED})

#: Refund statuses whose amount counts against what remains refundable: all but FAILED
#: (an UNKNOWN refund may have moved money, so its amount stays reserved).
RESERVING_REFUND_STATUSES: Final[frozenset[RefundStatus]] = frozenset(
    {_R.PENDING, _R.PROCESSING, _R.UNKNOWN, _R.SUCCEEDED}
)

Status = PaymentStatus | AttemptStatus | CaptureStatus | RefundStatus
Trigger = PaymentTrigger | OperationTrigger

_MACHINES: Final[Mapping[type[Status], tuple[str, type[Trigger], Mapping[Any, Status]]]] = MappingProxyType(
    {
        PaymentStatus: ("payment", PaymentTrigger, PAYMENT_TRANSITIONS),
        AttemptStatus: ("attempt", OperationTrigger, ATTEMPT_TRANSITIONS),
        CaptureStatus: ("capture", OperationTrigger, CAPTURE_TRANSITIONS),
        RefundStatus: ("refund", OperationTrigger, REFUND_TRANSITIONS),
    }
)


class PaymentStateError(Exception):
    """Base of every error raised by this module: a request the payment's state does not allow."""


class IllegalTransition(PaymentStateError):
    """``event`` is not allowed in status ``current`` of the ``machine`` ("payment", "attempt",
    "capture" or "refund"); ``allowed`` lists the events that are (empty when none)."""

    def __init__(self, machine: str, current: Status, event: Trigger, allowed: tuple[Trigger, ...]) -> None:
        self.machine = machine
        self.current = current
        self.event = event
        self.allowed = allowed
        allowed_text = ", ".join(str(a) for a in allowed) if allowed else "none"
        super().__init__(
            f"illegal {machine} transition: status {current.value!r} does not accept event "
            f"{event.value!r} (allowed in {current.value!r}: {allowed_text})"
        )


class FailoverNotAllowed(PaymentStateError):
    """A failover attempt was asked for while an earlier attempt may have charged."""


class CaptureNotAllowed(PaymentStateError):
    """A capture was asked for while another capture is open or done, or a cancel is pending."""


class CancelNotAllowed(PaymentStateError):
    """A cancel was asked for while a capture is open or done."""


class AmountError(PaymentStateError, ValueError):
    """An amount (minor units) breaks a money rule."""


class InvalidAmount(AmountError):
    """An amount is negative, or the recorded amounts contradict each other."""


class CaptureExceedsAuthorized(AmountError):
    """A capture of ``requested_minor`` exceeds the ``authorized_minor`` amount."""

    def __init__(self, requested_minor: int, authorized_minor: int) -> None:
        self.requested_minor = requested_minor
        self.authorized_minor = authorized_minor
        super().__init__(
            f"capture of {requested_minor} minor units exceeds the authorized {authorized_minor}"
        )


class RefundExceedsCaptured(AmountError):
    """A refund of ``requested_minor`` exceeds ``refundable_minor`` (captured minus the
    refunds that are not FAILED); ``requested_minor`` is 0 for "the rest" when nothing is left."""

    def __init__(self, requested_minor: int, refundable_minor: int, captured_minor: int) -> None:
        self.requested_minor = requested_minor
        self.refundable_minor = refundable_minor
        self.captured_minor = captured_minor
        if requested_minor == 0:
            text = (
                f"nothing left to refund: all {captured_minor} captured minor units are refunded or pending"
            )
        else:
            text = (
                f"refund of {requested_minor} minor units exceeds the {refundable_minor} still refundable "
                f"({captured_minor} captured, counting pending refunds)"
            )
        super().__init__(text)


def _machine(current: Status, event: Trigger) -> tuple[str, Mapping[Any, Status]]:
    entry = _MACHINES.get(type(current))
    if entry is None:
        raise TypeError(f"not a status of this module: {current!r}")
    name, trigger_type, table = entry
    if type(event) is not trigger_type:
        raise TypeError(f"{name} events are {trigger_type.__name__}, not {event!r}")
    return name, table


@overload
def allowed_events(current: PaymentStatus) -> tuple[PaymentTrigger, ...]: ...
@overload
def allowed_events(current: AttemptStatus | CaptureStatus | RefundStatus) -> tuple[OperationTrigger, ...]: ...
def allowed_events(current: Status) -> tuple[Trigger, ...]:
    """The events ``current`` accepts, in declaration order (empty for a dead end like CANCELED).

    Raises ``TypeError`` if ``current`` is not one of this module's status enums.
    """
    entry = _MACHINES.get(type(current))
    if entry is None:
        raise TypeError(f"not a status of this module: {current!r}")
    _, trigger_type, table = entry
    return tuple(t for t in trigger_type if (current, t) in table)


@overload
def next_status(current: PaymentStatus, event: PaymentTrigger) -> PaymentStatus: ...
@overload
def next_status(current: AttemptStatus, event: OperationTrigger) -> AttemptStatus: ...
@overload
def next_status(current: CaptureStatus, event: OperationTrigger) -> CaptureStatus: ...
@overload
def next_status(current: RefundStatus, event: OperationTrigger) -> RefundStatus: ...
def next_status(current: Status, event: Trigger) -> Status:
    """The status after ``event`` in status ``current``, from the machine's table.

    The machine is chosen by the type of ``current`` (payment, attempt, capture or refund).
    Returns ``current`` itself for an accepted self-loop (nothing to record).
    Raises :class:`IllegalTransition` (naming the status, the event and what is allowed)
    when the pair is not in the table, ``TypeError`` when ``event`` belongs to another machine.
    """
    name, table = _machine(current, event)
    try:
        return table[(current, event)]
    except KeyError:
        raise IllegalTransition(name, current, event, allowed_events(current)) from None


def is_final(status: Status) -> bool:
    """Whether ``status`` is final (see :data:`FINAL_PAYMENT_STATUSES` and the other final sets)."""
    if isinstance(status, PaymentStatus):
        return status in FINAL_PAYMENT_STATUSES
    if isinstance(status, AttemptStatus):
        return status in FINAL_ATTEMPT_STATUSES
    if isinstance(status, CaptureStatus):
        return status in FINAL_CAPTURE_STATUSES
    return status in FINAL_REFUND_STATUSES


def event_type_for(current: PaymentStatus, event: PaymentTrigger) -> PaymentEventType | None:
    """The ``payments.events`` event type to publish for ``event`` in ``current``, or None.

    ``payment.captured`` for a capture, ``payment.refunded`` for a refund, otherwise
    one per status reached: every payment status change is published
    (``payment.processing`` when an attempt starts, the failover's included,
    ``payment.succeeded``, ``payment.requires_capture``, ``payment.failed``,
    ``payment.unknown``, ``payment.canceled``); None only for accepted requests that
    change nothing (the self-loops). The worker does not publish ``payment.failed`` when
    a failover attempt follows in the same transaction (the payment never rests in
    FAILED: ``payment.processing`` of the new attempt says what happened). A capture or
    refund that fails leaves the payment as it is: :func:`operation_failed_event_type`.
    Raises :class:`IllegalTransition` like :func:`next_status`.
    """
    to = next_status(current, event)
    if event is PaymentTrigger.CAPTURE_SUCCEEDED:
        return PaymentEventType.CAPTURED
    if event is PaymentTrigger.REFUND_SUCCEEDED:
        return PaymentEventType.REFUNDED
    if to is current:
        return None
    return _EVENT_TYPE_BY_STATUS.get(to)


def operation_failed_event_type(kind: str) -> PaymentEventType:
    """The event published when a capture (``kind`` ``"capture"``) or refund (``"refund"``) ends
    FAILED: ``payment.capture_failed`` / ``payment.refund_failed``. The payment's status does not
    change (a capture may be requested again; the refund's amount is refundable again), but the
    caller's customer may need to hear about it. Raises ``ValueError`` for another kind."""
    if kind == "capture":
        return PaymentEventType.CAPTURE_FAILED
    if kind == "refund":
        return PaymentEventType.REFUND_FAILED
    raise ValueError(f"not an operation kind: {kind!r}")


_EVENT_TYPE_BY_STATUS: Final[Mapping[PaymentStatus, PaymentEventType]] = MappingProxyType(
    {
        _P.PROCESSING: PaymentEventType.PROCESSING,
        _P.REQUIRES_CAPTURE: PaymentEventType.REQUIRES_CAPTURE,
        _P.SUCCEEDED: PaymentEventType.SUCCEEDED,
        _P.FAILED: PaymentEventType.FAILED,
        _P.UNKNOWN: PaymentEventType.UNKNOWN,
        _P.CANCELED: PaymentEventType.CANCELED,
    }
)


def check_failover(attempts: Iterable[AttemptStatus]) -> None:
    """Allow a failover attempt only if there are attempts and every one is FAILED.

    FAILED means the processor definitely did not charge (declined, refused, or an
    UNKNOWN resolved as not charged), so a new attempt cannot make a second charge.
    Raises :class:`FailoverNotAllowed` naming the attempts that may have charged.
    """
    statuses = list(attempts)
    if not statuses:
        raise FailoverNotAllowed("failover needs a failed attempt: this payment has no attempt yet")
    risky = [f"#{no}: {s.value}" for no, s in enumerate(statuses, start=1) if s is not AttemptStatus.FAILED]
    if risky:
        raise FailoverNotAllowed(
            "failover only after attempts that definitely did not charge; these may have: " + ", ".join(risky)
        )


def check_capture(
    requested_minor: int,
    authorized_minor: int,
    captures: Iterable[CaptureStatus] = (),
    *,
    cancel_requested: bool = False,
) -> int:
    """Validate a capture and return the amount to capture, in minor units.

    ``requested_minor`` 0 means the whole ``authorized_minor``; otherwise
    0 < ``requested_minor`` <= ``authorized_minor`` (a partial capture; the processor
    releases the rest). ``captures`` are the statuses of the payment's existing captures:
    one capture per payment, so any capture not FAILED blocks a new one. The payment's
    status (REQUIRES_CAPTURE) is checked separately with :func:`next_status`.

    Raises :class:`InvalidAmount` (negative amount, authorized <= 0),
    :class:`CaptureNotAllowed` (open or done capture, or ``cancel_requested``),
    :class:`CaptureExceedsAuthorized`.
    """
    if requested_minor < 0:
        raise InvalidAmount(f"capture amount must not be negative, got {requested_minor}")
    if authorized_minor <= 0:
        raise InvalidAmount(f"authorized amount must be positive, got {authorized_minor}")
    if cancel_requested:
        raise CaptureNotAllowed("a cancel is pending for this payment")
    open_or_done = [c.value for c in captures if c is not CaptureStatus.FAILED]
    if open_or_done:
        raise CaptureNotAllowed("one capture per payment: a capture is already " + ", ".join(open_or_done))
    amount = requested_minor or authorized_minor
    if amount > authorized_minor:
        raise CaptureExceedsAuthorized(amount, authorized_minor)
    return amount


def check_cancel(captures: Iterable[CaptureStatus]) -> None:
    """Allow CancelPayment only when no capture is open or done (every capture FAILED, or none).

    The payment's status (REQUIRES_PROCESSING or REQUIRES_CAPTURE) is checked separately
    with :func:`next_status`. Raises :class:`CancelNotAllowed`.
    """
    open_or_done = [c.value for c in captures if c is not CaptureStatus.FAILED]
    if open_or_done:
        raise CancelNotAllowed("cannot cancel: a capture is " + ", ".join(open_or_done))


def reserved_refunds_minor(refunds: Iterable[tuple[RefundStatus, int]]) -> int:
    """Sum, in minor units, of the refunds (``(status, amount_minor)``) that are not FAILED.

    This is the ``refunds_succeeded_or_pending`` argument of :func:`refundable_minor`
    and :func:`check_refund`. Raises :class:`InvalidAmount` for a negative amount.
    """
    total = 0
    for status, amount in refunds:
        if amount < 0:
            raise InvalidAmount(f"refund amount must not be negative, got {amount}")
        if status in RESERVING_REFUND_STATUSES:
            total += amount
    return total


def refundable_minor(captured: int, refunds_succeeded_or_pending: int) -> int:
    """What can still be refunded, in minor units: ``captured`` minus the refunds not FAILED.

    Raises :class:`InvalidAmount` if either input is negative or the refunds exceed
    ``captured`` (recorded amounts that contradict each other).
    """
    if captured < 0 or refunds_succeeded_or_pending < 0:
        raise InvalidAmount(
            f"amounts must not be negative (captured {captured}, refunds {refunds_succeeded_or_pending})"
        )
    if refunds_succeeded_or_pending > captured:
        raise InvalidAmount(
            f"recorded refunds ({refunds_succeeded_or_pending}) exceed the captured amount ({captured})"
        )
    return captured - refunds_succeeded_or_pending


def check_refund(requested_minor: int, captured: int, refunds_succeeded_or_pending: int) -> int:
    """Validate a refund and return the amount to refund, in minor units.

    ``requested_minor`` 0 means everything still refundable. Pending refunds count
    (PENDING, PROCESSING, UNKNOWN, SUCCEEDED: see :func:`reserved_refunds_minor`), so
    refunds checked and recorded one after another under the payment row lock never
    exceed ``captured`` together. The payment's status (SUCCEEDED) is checked separately
    with :func:`next_status`.

    Raises :class:`InvalidAmount` (negative input, contradicting records) and
    :class:`RefundExceedsCaptured` (more than is refundable, or nothing is left).
    """
    if requested_minor < 0:
        raise InvalidAmount(f"refund amount must not be negative, got {requested_minor}")
    remaining = refundable_minor(captured, refunds_succeeded_or_pending)
    amount = requested_minor or remaining
    if amount == 0 or amount > remaining:
        raise RefundExceedsCaptured(requested_minor, remaining, captured)
    return amount
