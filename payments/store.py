"""Payments in PostgreSQL: the gateway's accept path, reads, and the worker's primitives.

Tables: migration 0008_payments.sql. Statuses are stored as the values of the
:mod:`payments.state_machine` enums; every status change goes through
:func:`payments.state_machine.next_status` and is recorded in the append-only
``payment_transitions`` (the creation too: ``None -> requires_processing``,
cause ``created``).

**Gateway mutations** (:func:`create_payment`, :func:`capture_payment`,
:func:`cancel_payment`, :func:`refund_payment`) each run ONE transaction that
writes the idempotency record, the change (payment, capture or refund row) and
one outbox row carrying a ``PaymentCommand`` for the payment worker (topic
``<prefix>payments.commands``, key = tenant id), then ``NOTIFY`` the relay
(:data:`gateway.write_path.OUTBOX_NOTIFY_CHANNEL`) and the watchers
(:data:`PAYMENT_STATUS_CHANNEL`). They return the response, or a
``google.rpc.Status`` for an answer that is an error.

Idempotency follows Stripe (https://docs.stripe.com/api/idempotent_requests)
and AIP-155: the first answer to a tenant's ``request_id`` is stored with a
SHA-256 of the method and the request, *error answers included* (NOT_FOUND, a
payment in the wrong status, a refund exceeding what is left); the same request
again within the retention window replays it and writes nothing; a different
request (or another method) with the same key is FAILED_PRECONDITION
``IDEMPOTENCY_KEY_REUSED``. Requests that fail validation store nothing. The
records live in ``idempotency_keys`` under ``"payments " + request_id``
(:data:`IDEMPOTENCY_KEY_PREFIX`): notification keys never contain a space, so
the two key spaces cannot collide, and the relay's reaper expires both.
A second request with a key whose first request is still in its transaction
waits on the key's row (the primary key) and then replays the committed answer;
if the wait exceeds ``lock_timeout_ms`` it is ABORTED with ``RetryInfo``.

**Money rules under the row lock**: capture, cancel and refund lock the payment
row (``SELECT ... FOR UPDATE``) before checking its status and amounts with
:mod:`payments.state_machine`, in the transaction that inserts the capture or
refund. Concurrent refunds are therefore serialized and each sees the ones
committed before it: together they never exceed the captured amount.

**Worker primitives** (all take a connection inside a transaction that holds the
payment row lock from :func:`lock_payment`): :func:`record_transition`,
:func:`start_attempt` (the attempt row is written, PENDING, before the
processor is called), :func:`finish_attempt`, :func:`notify_payment_changed`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, TypeAlias, TypeVar

import asyncpg
import uuid6
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from channels.catalog import payment_commands_topic
from gateway.errors import error_info, idempotency_key_reused, invalid_argument, key_in_flux, not_found
from gateway.idempotency import decode_outcome, encode_outcome, request_fingerprint
from gateway.validation import FieldViolation
from gateway.write_path import DEFAULT_IDEMPOTENCY_RETENTION_S, OUTBOX_NOTIFY_CHANNEL
from payments.state_machine import (
    AttemptStatus,
    CancelNotAllowed,
    CaptureExceedsAuthorized,
    CaptureNotAllowed,
    CaptureStatus,
    IllegalTransition,
    OperationTrigger,
    PaymentStateError,
    PaymentStatus,
    PaymentTrigger,
    RefundExceedsCaptured,
    RefundStatus,
    check_cancel,
    check_capture,
    check_failover,
    check_refund,
    next_status,
    reserved_refunds_minor,
)
from payments.validation import CreatePlan, PaymentListQuery, encode_page_token
from switchboard.db.pool import Connection
from switchboard.payments.v1 import events_pb2, payments_pb2

M = TypeVar("M", bound=Message)

#: The LISTEN/NOTIFY channel announcing payment changes; the payload is the payment id.
PAYMENT_STATUS_CHANNEL: Final = "switchboard_payment_status"
#: Payment idempotency records are stored in ``idempotency_keys`` as this prefix + request_id.
IDEMPOTENCY_KEY_PREFIX: Final = "payments "
#: How long a mutation waits for a lock (the key of a concurrent same-key request, or the
#: payment row) before answering ABORTED with RetryInfo, in milliseconds.
DEFAULT_LOCK_TIMEOUT_MS: Final = 5_000
#: What a client is told to wait before retrying an ABORTED mutation, in milliseconds.
BUSY_RETRY_AFTER_MS: Final = 200
#: A PENDING attempt not finished this long after it started is looked up by the janitor.
DEFAULT_ATTEMPT_LOOKUP_AFTER_S: Final = 60.0

_P = PaymentStatus

#: Proto enum values by state-machine status.
PAYMENT_STATUS_PROTO: Final[Mapping[PaymentStatus, payments_pb2.PaymentStatus.ValueType]] = MappingProxyType(
    {s: payments_pb2.PaymentStatus.Value(f"PAYMENT_STATUS_{s.name}") for s in PaymentStatus}
)
ATTEMPT_STATUS_PROTO: Final[Mapping[AttemptStatus, payments_pb2.AttemptStatus.ValueType]] = MappingProxyType(
    {s: payments_pb2.AttemptStatus.Value(f"ATTEMPT_STATUS_{s.name}") for s in AttemptStatus}
)
CAPTURE_STATUS_PROTO: Final[Mapping[CaptureStatus, payments_pb2.CaptureStatus.ValueType]] = MappingProxyType(
    {s: payments_pb2.CaptureStatus.Value(f"CAPTURE_STATUS_{s.name}") for s in CaptureStatus}
)
REFUND_STATUS_PROTO: Final[Mapping[RefundStatus, payments_pb2.RefundStatus.ValueType]] = MappingProxyType(
    {s: payments_pb2.RefundStatus.Value(f"REFUND_STATUS_{s.name}") for s in RefundStatus}
)
CAPTURE_METHOD_PROTO: Final[Mapping[str, payments_pb2.CaptureMethod.ValueType]] = MappingProxyType(
    {"automatic": payments_pb2.CAPTURE_METHOD_AUTOMATIC, "manual": payments_pb2.CAPTURE_METHOD_MANUAL}
)


def stored_request_id(request_id: str) -> str:
    """The ``idempotency_keys.request_id`` of a payment RPC's ``request_id``."""
    return IDEMPOTENCY_KEY_PREFIX + request_id


def _pack(*details: Message) -> list[any_pb2.Any]:
    packed = []
    for detail in details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)
        packed.append(wrapper)
    return packed


def payment_precondition_failed(
    reason: str,
    message: str,
    payment: PaymentRow,
    violation_type: str,
    extra: Mapping[str, str] | None = None,
) -> status_pb2.Status:
    """FAILED_PRECONDITION (AIP-193) for a payment whose state forbids the request:
    ``ErrorInfo`` (``reason``; metadata: payment id, status and ``extra``) and a
    ``PreconditionFailure`` of ``violation_type`` on ``payments/<id>``."""
    payment_id = payment.id
    metadata = {"payment_id": str(payment_id), "status": payment.status.value, **(extra or {})}
    return status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION,
        message=message,
        details=_pack(
            error_info(reason, metadata),
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=violation_type, subject=f"payments/{payment_id}", description=message
                    )
                ]
            ),
        ),
    )


def payment_busy(payment_id: uuid.UUID, retry_after_ms: int = BUSY_RETRY_AFTER_MS) -> status_pb2.Status:
    """ABORTED with ``RetryInfo``: the payment row stayed locked by another change longer
    than the lock timeout (or a deadlock was broken); nothing was written, retrying with
    the same request_id is safe."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(retry_after_ms)
    return status_pb2.Status(
        code=code_pb2.ABORTED,
        message=(
            f"payment {str(payment_id)!r} is being changed by another request; retry with the same request_id"
        ),
        details=_pack(
            error_details_pb2.RetryInfo(retry_delay=delay),
            error_info("PAYMENT_BUSY", {"payment_id": str(payment_id)}),
        ),
    )


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


# --- Rows and messages ----------------------------------------------------------------------------

_PAYMENT_COLUMNS = """id, tenant_id, request_id, status, amount_minor, currency, amount_captured_minor,
    amount_refunded_minor, capture_method, customer_reference, customer_email, customer_phone,
    payment_method, description, metadata, processor, processor_reference, failure_code,
    failure_message, cancellation_reason, cancel_requested_at, created_at, updated_at"""
_ATTEMPT_COLUMNS = """payment_id, attempt_no, status, processor, idempotency_key, processor_reference,
    failure_code, failure_message, started_at, updated_at"""
_CAPTURE_COLUMNS = """id, payment_id, request_id, status, amount_minor, processor_reference, failure_code,
    failure_message, created_at, updated_at"""
_REFUND_COLUMNS = """id, payment_id, request_id, status, amount_minor, reason, processor_reference,
    failure_code, failure_message, created_at, updated_at"""
_TRANSITION_COLUMNS = "payment_id, occurred_at, from_status, to_status, cause, attempt_no, detail"
_OPERATION_TRANSITION_COLUMNS = (
    "payment_id, kind, attempt_no, operation_id, occurred_at, from_status, to_status, cause, detail"
)

#: A selected row, or a dict with the same keys (for answers built before they are written).
Row: TypeAlias = "asyncpg.Record | Mapping[str, Any]"


@dataclass(frozen=True)
class PaymentRow:
    """One ``payments`` row. Amounts in minor units of ``currency``; ``capture_method`` is
    ``"automatic"`` or ``"manual"``; ``cancel_requested_at`` is set once CancelPayment was
    accepted."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    request_id: str
    status: PaymentStatus
    amount_minor: int
    currency: str
    amount_captured_minor: int
    amount_refunded_minor: int
    capture_method: str
    customer_reference: str
    customer_email: str
    customer_phone: str
    payment_method: str
    description: str
    metadata: dict[str, str]
    processor: str
    processor_reference: str
    failure_code: str
    failure_message: str
    cancellation_reason: str
    cancel_requested_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> PaymentRow:
        """Build from a row selected with the payment columns of this module."""
        values = dict(record)
        values["status"] = PaymentStatus(values["status"])
        values["metadata"] = json.loads(values["metadata"])
        return cls(**values)


def _payment_message(
    row: PaymentRow,
    attempts: Sequence[Row] = (),
    captures: Sequence[Row] = (),
    refunds: Sequence[Row] = (),
    transitions: Sequence[Row] = (),
    operation_transitions: Sequence[Row] = (),
) -> payments_pb2.Payment:
    payment = payments_pb2.Payment(
        payment_id=str(row.id),
        request_id=row.request_id,
        status=PAYMENT_STATUS_PROTO[row.status],
        amount_minor=row.amount_minor,
        currency=row.currency,
        amount_captured_minor=row.amount_captured_minor,
        amount_refunded_minor=row.amount_refunded_minor,
        capture_method=CAPTURE_METHOD_PROTO[row.capture_method],
        customer_reference=row.customer_reference,
        customer=payments_pb2.CustomerContact(email=row.customer_email, phone_number=row.customer_phone),
        payment_method=row.payment_method,
        description=row.description,
        metadata=row.metadata,
        processor=row.processor,
        processor_reference=row.processor_reference,
        failure_code=row.failure_code,
        failure_message=row.failure_message,
        cancellation_reason=row.cancellation_reason,
        create_time=_timestamp(row.created_at),
        update_time=_timestamp(row.updated_at),
    )
    if row.cancel_requested_at is not None:
        payment.cancel_request_time.CopyFrom(_timestamp(row.cancel_requested_at))
    history: dict[tuple[str, object], list[Row]] = {}
    for t in operation_transitions:
        key = ("attempt", t["attempt_no"]) if t["kind"] == "attempt" else (t["kind"], t["operation_id"])
        history.setdefault(key, []).append(t)
    for a in attempts:
        payment.attempts.add(
            attempt_no=a["attempt_no"],
            status=ATTEMPT_STATUS_PROTO[AttemptStatus(a["status"])],
            processor=a["processor"],
            processor_reference=a["processor_reference"],
            idempotency_key=a["idempotency_key"],
            failure_code=a["failure_code"],
            failure_message=a["failure_message"],
            start_time=_timestamp(a["started_at"]),
            update_time=_timestamp(a["updated_at"]),
            transitions=[
                payments_pb2.AttemptTransition(
                    **_operation_transition_fields(t, ATTEMPT_STATUS_PROTO, AttemptStatus)
                )
                for t in history.get(("attempt", a["attempt_no"]), [])
            ],
        )
    payment.captures.extend(_capture_message(c, history.get(("capture", c["id"]), [])) for c in captures)
    payment.refunds.extend(_refund_message(r, history.get(("refund", r["id"]), [])) for r in refunds)
    payment.transitions.extend(_transition_message(t) for t in transitions)
    return payment


_S = TypeVar("_S", AttemptStatus, CaptureStatus, RefundStatus)


def _operation_transition_fields(t: Row, protos: Mapping[_S, int], status_type: type[_S]) -> dict[str, Any]:
    """The fields of an ``AttemptTransition`` / ``CaptureTransition`` / ``RefundTransition``."""
    from_status = t["from_status"]
    return {
        "time": _timestamp(t["occurred_at"]),
        "from_status": protos[status_type(from_status)] if from_status is not None else 0,
        "to_status": protos[status_type(t["to_status"])],
        "cause": str(t["cause"]),
        "detail": str(t["detail"]),
    }


def _created_transition(status: CaptureStatus | RefundStatus, at: datetime) -> dict[str, Any]:
    """The first history row of an operation created now (for answers built before the read)."""
    return {
        "occurred_at": at,
        "from_status": None,
        "to_status": status.value,
        "cause": "created",
        "detail": "",
    }


def _capture_message(c: Row, transitions: Sequence[Row] = ()) -> payments_pb2.Capture:
    return payments_pb2.Capture(
        capture_id=str(c["id"]),
        payment_id=str(c["payment_id"]),
        request_id=str(c["request_id"]),
        status=CAPTURE_STATUS_PROTO[CaptureStatus(c["status"])],
        amount_minor=int(c["amount_minor"]),
        processor_reference=str(c["processor_reference"]),
        failure_code=str(c["failure_code"]),
        failure_message=str(c["failure_message"]),
        create_time=_timestamp(c["created_at"]),
        update_time=_timestamp(c["updated_at"]),
        transitions=[
            payments_pb2.CaptureTransition(
                **_operation_transition_fields(t, CAPTURE_STATUS_PROTO, CaptureStatus)
            )
            for t in transitions
        ],
    )


def _refund_message(r: Row, transitions: Sequence[Row] = ()) -> payments_pb2.Refund:
    return payments_pb2.Refund(
        refund_id=str(r["id"]),
        payment_id=str(r["payment_id"]),
        request_id=str(r["request_id"]),
        status=REFUND_STATUS_PROTO[RefundStatus(r["status"])],
        amount_minor=int(r["amount_minor"]),
        reason=str(r["reason"]),
        processor_reference=str(r["processor_reference"]),
        failure_code=str(r["failure_code"]),
        failure_message=str(r["failure_message"]),
        create_time=_timestamp(r["created_at"]),
        update_time=_timestamp(r["updated_at"]),
        transitions=[
            payments_pb2.RefundTransition(
                **_operation_transition_fields(t, REFUND_STATUS_PROTO, RefundStatus)
            )
            for t in transitions
        ],
    )


def _transition_message(t: Row) -> payments_pb2.PaymentTransition:
    from_status = t["from_status"]
    return payments_pb2.PaymentTransition(
        time=_timestamp(t["occurred_at"]),
        from_status=(
            PAYMENT_STATUS_PROTO[PaymentStatus(from_status)]
            if from_status is not None
            else payments_pb2.PAYMENT_STATUS_UNSPECIFIED
        ),
        to_status=PAYMENT_STATUS_PROTO[PaymentStatus(t["to_status"])],
        cause=str(t["cause"]),
        attempt_no=int(t["attempt_no"]),
        detail=str(t["detail"]),
    )


# --- Reads ----------------------------------------------------------------------------------------


async def _children(
    conn: asyncpg.Pool | Connection, tenant_id: uuid.UUID, payment_ids: list[uuid.UUID]
) -> dict[str, dict[uuid.UUID, list[asyncpg.Record]]]:
    """attempts, captures, refunds, transitions and operation transitions of ``payment_ids``,
    each oldest first."""
    where = "WHERE payment_id = ANY ($1::uuid[]) AND tenant_id = $2"
    # Column lists and table names are constants of this module; the values are bound.
    queries = {
        "attempts": f"SELECT {_ATTEMPT_COLUMNS} FROM payment_attempts {where} ORDER BY attempt_no",  # noqa: S608
        "captures": f"SELECT {_CAPTURE_COLUMNS} FROM payment_captures {where} ORDER BY created_at, id",  # noqa: S608
        "refunds": f"SELECT {_REFUND_COLUMNS} FROM payment_refunds {where} ORDER BY created_at, id",  # noqa: S608
        "transitions": f"SELECT {_TRANSITION_COLUMNS} FROM payment_transitions {where} ORDER BY id",  # noqa: S608
        "operation_transitions": (
            f"SELECT {_OPERATION_TRANSITION_COLUMNS} FROM payment_operation_transitions {where} ORDER BY id"  # noqa: S608
        ),
    }
    found: dict[str, dict[uuid.UUID, list[asyncpg.Record]]] = {}
    for name, sql in queries.items():
        by_payment: dict[uuid.UUID, list[asyncpg.Record]] = {p: [] for p in payment_ids}
        for record in await conn.fetch(sql, payment_ids, tenant_id):
            by_payment[record["payment_id"]].append(record)
        found[name] = by_payment
    return found


async def _messages(
    conn: asyncpg.Pool | Connection, tenant_id: uuid.UUID, rows: list[PaymentRow]
) -> list[payments_pb2.Payment]:
    if not rows:
        return []
    children = await _children(conn, tenant_id, [r.id for r in rows])
    return [
        _payment_message(
            r,
            children["attempts"][r.id],
            children["captures"][r.id],
            children["refunds"][r.id],
            children["transitions"][r.id],
            children["operation_transitions"][r.id],
        )
        for r in rows
    ]


async def get_payment(
    conn: asyncpg.Pool | Connection, tenant_id: uuid.UUID, payment_id: uuid.UUID
) -> payments_pb2.Payment | None:
    """Payment ``payment_id`` of ``tenant_id`` with its attempts, captures, refunds and
    transitions (each oldest first; attempts, captures and refunds with their own status
    history), or ``None``; another tenant's payment is ``None`` too."""
    record = await conn.fetchrow(
        f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE id = $1 AND tenant_id = $2",  # noqa: S608
        payment_id,
        tenant_id,
    )
    if record is None:
        return None
    (payment,) = await _messages(conn, tenant_id, [PaymentRow.from_record(record)])
    return payment


async def list_payments(
    conn: asyncpg.Pool | Connection, tenant_id: uuid.UUID, query: PaymentListQuery
) -> tuple[list[payments_pb2.Payment], str]:
    """One page of ``tenant_id``'s payments matching ``query``, newest first (``created_at
    DESC, id DESC``), and the next page token (``""`` on the last page). Keyset pagination
    over ``payments_tenant_created_id_idx``."""
    conditions = ["tenant_id = $1"]
    args: list[object] = [tenant_id]

    def bind(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    if query.status is not None:
        conditions.append(f"status = {bind(query.status.value)}")
    if query.currency is not None:
        conditions.append(f"currency = {bind(query.currency)}")
    if query.customer_reference is not None:
        conditions.append(f"customer_reference = {bind(query.customer_reference)}")
    if query.created_after is not None:
        conditions.append(f"created_at > {bind(query.created_after)}")
    if query.created_before is not None:
        conditions.append(f"created_at < {bind(query.created_before)}")
    if query.after is not None:
        conditions.append(f"(created_at, id) < ({bind(query.after[0])}, {bind(query.after[1])})")
    # Every interpolated piece is a constant of this module; every value is a bind parameter.
    sql = f"""SELECT {_PAYMENT_COLUMNS} FROM payments WHERE {" AND ".join(conditions)}
              ORDER BY created_at DESC, id DESC LIMIT {bind(query.page_size + 1)}"""  # noqa: S608
    records = await conn.fetch(sql, *args)
    rows = [PaymentRow.from_record(r) for r in records[: query.page_size]]
    next_token = ""
    if len(records) > query.page_size:
        next_token = encode_page_token(query, rows[-1].created_at, rows[-1].id)
    return await _messages(conn, tenant_id, rows), next_token


# --- Worker primitives ----------------------------------------------------------------------------


class StaleStatus(PaymentStateError):
    """The payment was not in the status the caller believed (the row lock was not held)."""


async def notify_payment_changed(conn: Connection, payment_id: uuid.UUID) -> None:
    """Announce a change of ``payment_id`` to WatchPayment streams; call it inside the
    changing transaction (PostgreSQL delivers the NOTIFY only if it commits)."""
    await conn.execute("SELECT pg_notify($1, $2)", PAYMENT_STATUS_CHANNEL, str(payment_id))


async def lock_payment(conn: Connection, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> PaymentRow | None:
    """Lock payment ``payment_id`` of ``tenant_id`` (``SELECT ... FOR UPDATE``) and return it;
    ``None`` if there is no such payment for this tenant.

    Call inside a transaction: the lock is held until it ends, so every change the
    caller then makes is checked against the status it read. Lock order: payment row
    first, then its attempts, captures or refunds.
    """
    record = await conn.fetchrow(
        f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE id = $1 AND tenant_id = $2 FOR UPDATE",  # noqa: S608
        payment_id,
        tenant_id,
    )
    return None if record is None else PaymentRow.from_record(record)


async def record_transition(
    conn: Connection,
    tenant_id: uuid.UUID,
    payment_id: uuid.UUID,
    from_status: PaymentStatus,
    to_status: PaymentStatus,
    cause: PaymentTrigger,
    *,
    attempt_no: int = 0,
    detail: str = "",
    amount_captured_minor: int | None = None,
    failure_code: str | None = None,
    failure_message: str | None = None,
) -> None:
    """Move payment ``payment_id`` from ``from_status`` to ``to_status`` because of ``cause``;
    record the transition and notify watchers. The caller holds the row lock.

    ``to_status`` must be what :func:`payments.state_machine.next_status` gives for
    ``(from_status, cause)`` and differ from ``from_status`` (self-loops record
    nothing: do not call this for them). A change to SUCCEEDED needs
    ``amount_captured_minor`` (> 0, at most the amount: the database checks both);
    ``failure_code`` / ``failure_message`` replace the payment's when given.

    Raises :class:`payments.state_machine.IllegalTransition` (not in the table),
    ``ValueError`` (wrong ``to_status``, a self-loop, SUCCEEDED without a captured
    amount) and :class:`StaleStatus` (the payment is not in ``from_status``).
    """
    expected = next_status(from_status, cause)
    if expected is not to_status:
        raise ValueError(
            f"{cause.value} leads from {from_status.value} to {expected.value}, not {to_status.value}"
        )
    if to_status is from_status:
        raise ValueError(
            f"{cause.value} in {from_status.value} changes nothing: there is no transition to record"
        )
    if to_status is _P.SUCCEEDED and amount_captured_minor is None:
        raise ValueError("a change to succeeded needs amount_captured_minor")
    changed = await conn.fetchval(
        """UPDATE payments
              SET status = $3, updated_at = now(),
                  amount_captured_minor = coalesce($4, amount_captured_minor),
                  failure_code = coalesce($5, failure_code),
                  failure_message = coalesce($6, failure_message)
            WHERE id = $1 AND tenant_id = $2 AND status = $7
        RETURNING true""",
        payment_id,
        tenant_id,
        to_status.value,
        amount_captured_minor,
        failure_code,
        failure_message,
        from_status.value,
    )
    if not changed:
        raise StaleStatus(f"payment {payment_id} is not {from_status.value} (or does not exist)")
    await conn.execute(
        """INSERT INTO payment_transitions (tenant_id, payment_id, from_status, to_status, cause,
                                            attempt_no, detail)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        tenant_id,
        payment_id,
        from_status.value,
        to_status.value,
        cause.value,
        attempt_no,
        detail,
    )
    await notify_payment_changed(conn, payment_id)


#: The ``cause`` of an operation's first transition (``None`` -> PENDING).
CREATED_CAUSE: Final = "created"

OperationStatus: TypeAlias = AttemptStatus | CaptureStatus | RefundStatus


async def record_operation_transition(
    conn: Connection,
    tenant_id: uuid.UUID,
    payment_id: uuid.UUID,
    from_status: OperationStatus | None,
    to_status: OperationStatus,
    cause: OperationTrigger | None,
    *,
    attempt_no: int = 0,
    operation_id: uuid.UUID | None = None,
    detail: str = "",
    occurred_at: datetime | None = None,
) -> None:
    """Append one status change of an attempt, capture or refund to ``payment_operation_transitions``
    (migration 0017), in the caller's transaction (which changes the operation under the payment's
    row lock).

    An attempt is named by ``attempt_no`` (>= 1), a capture or refund by ``operation_id``; the
    kind follows from the status type. ``from_status`` None with ``cause`` None records the
    creation (cause ``created``); otherwise ``to_status`` must be what
    :func:`payments.state_machine.next_status` gives for ``(from_status, cause)`` and differ from
    it. ``detail`` is clipped to 1,000 characters; ``occurred_at`` defaults to the transaction's
    ``now()``. Raises ``ValueError`` for an inconsistent
    change (and ``IllegalTransition`` for one the state machine refuses).
    """
    kind = {AttemptStatus: "attempt", CaptureStatus: "capture", RefundStatus: "refund"}[type(to_status)]
    if (kind == "attempt") != (operation_id is None) or (kind == "attempt") != (attempt_no >= 1):
        raise ValueError("an attempt is named by attempt_no, a capture or refund by operation_id")
    if from_status is None:
        if cause is not None:
            raise ValueError("an operation's creation has no trigger")
    else:
        if cause is None or type(from_status) is not type(to_status):
            raise ValueError("a status change needs a trigger and statuses of one machine")
        expected = next_status(from_status, cause)
        if expected is not to_status or to_status is from_status:
            raise ValueError(
                f"{cause.value} leads from {from_status.value} to {expected.value}, not {to_status}"
            )
    await conn.execute(
        """INSERT INTO payment_operation_transitions
               (tenant_id, payment_id, kind, attempt_no, operation_id, from_status, to_status, cause, detail,
                occurred_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, coalesce($10, now()))""",
        tenant_id,
        payment_id,
        kind,
        attempt_no,
        operation_id,
        None if from_status is None else from_status.value,
        to_status.value,
        CREATED_CAUSE if cause is None else cause.value,
        detail[:1000],
        occurred_at,
    )


async def start_attempt(
    conn: Connection,
    payment: PaymentRow,
    processor: str,
    *,
    detail: str = "",
    lookup_after_s: float = DEFAULT_ATTEMPT_LOOKUP_AFTER_S,
) -> int:
    """Start the next charge attempt of ``payment`` (locked by :func:`lock_payment`) at
    ``processor`` and return its ``attempt_no`` (1, 2, ...).

    Writes the PENDING attempt row (its processor idempotency key is
    ``{payment_id}_{attempt_no}``, generated by the database) BEFORE the processor
    is called, and moves the payment to PROCESSING: ``attempt_started`` from
    REQUIRES_PROCESSING, ``failover_attempt_started`` from FAILED, the latter only
    when every earlier attempt is FAILED (:func:`payments.state_machine.check_failover`).
    Sets the payment's processor and clears its processor reference and failure.
    The attempt's ``next_lookup_at`` is ``lookup_after_s`` seconds ahead, so the
    janitor finds it if the worker dies before finishing it.

    Raises ``IllegalTransition`` (any other status, e.g. UNKNOWN or CANCELED) and
    ``FailoverNotAllowed``. Commit before calling the processor.
    """
    trigger = PaymentTrigger.ATTEMPT_STARTED
    if payment.status is _P.FAILED:
        trigger = PaymentTrigger.FAILOVER_ATTEMPT_STARTED
    to_status = next_status(payment.status, trigger)
    earlier = [
        AttemptStatus(r["status"])
        for r in await conn.fetch(
            """SELECT status FROM payment_attempts
                WHERE payment_id = $1 AND tenant_id = $2 ORDER BY attempt_no""",
            payment.id,
            payment.tenant_id,
        )
    ]
    if earlier or trigger is PaymentTrigger.FAILOVER_ATTEMPT_STARTED:
        check_failover(earlier)
    attempt_no = len(earlier) + 1
    await conn.execute(
        """INSERT INTO payment_attempts (tenant_id, payment_id, attempt_no, processor, next_lookup_at)
           VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))""",
        payment.tenant_id,
        payment.id,
        attempt_no,
        processor,
        lookup_after_s,
    )
    await record_operation_transition(
        conn,
        payment.tenant_id,
        payment.id,
        None,
        AttemptStatus.PENDING,
        None,
        attempt_no=attempt_no,
        detail=detail,
    )
    await conn.execute(
        """UPDATE payments SET processor = $3, processor_reference = '', failure_code = '',
                               failure_message = ''
            WHERE id = $1 AND tenant_id = $2""",
        payment.id,
        payment.tenant_id,
        processor,
    )
    await record_transition(
        conn,
        payment.tenant_id,
        payment.id,
        payment.status,
        to_status,
        trigger,
        attempt_no=attempt_no,
        detail=detail,
    )
    return attempt_no


async def finish_attempt(
    conn: Connection,
    tenant_id: uuid.UUID,
    payment_id: uuid.UUID,
    attempt_no: int,
    event: OperationTrigger,
    *,
    processor_reference: str | None = None,
    failure_code: str = "",
    failure_message: str = "",
    next_lookup_at: datetime | None = None,
) -> AttemptStatus:
    """Apply ``event`` (``succeeded``, ``failed``, ``ambiguous``, ``resolved_*``) to the
    attempt and return its new status; the caller holds the payment row lock.

    The attempt's status follows :data:`payments.state_machine.ATTEMPT_TRANSITIONS`.
    ``processor_reference`` (when given) and the failure fields are stored on the
    attempt and mirrored on the payment. An UNKNOWN attempt gets ``next_lookup_at``
    (default: now) for the janitor; any other status clears it. The payment's own
    status is NOT changed here: call :func:`record_transition` with the matching
    :class:`PaymentTrigger` in the same transaction.

    Raises ``LookupError`` (no such attempt) and ``IllegalTransition``.
    """
    current = await conn.fetchval(
        """SELECT status FROM payment_attempts
            WHERE payment_id = $1 AND tenant_id = $2 AND attempt_no = $3 FOR UPDATE""",
        payment_id,
        tenant_id,
        attempt_no,
    )
    if current is None:
        raise LookupError(f"payment {payment_id} has no attempt {attempt_no}")
    before = AttemptStatus(current)
    status = next_status(before, event)
    lookup = (next_lookup_at or datetime.now(UTC)) if status is AttemptStatus.UNKNOWN else None
    if status is not before:
        await record_operation_transition(
            conn, tenant_id, payment_id, before, status, event, attempt_no=attempt_no, detail=failure_message
        )
    await conn.execute(
        """UPDATE payment_attempts
              SET status = $4, processor_reference = coalesce($5, processor_reference),
                  failure_code = $6, failure_message = $7, next_lookup_at = $8, updated_at = now()
            WHERE payment_id = $1 AND tenant_id = $2 AND attempt_no = $3""",
        payment_id,
        tenant_id,
        attempt_no,
        status.value,
        processor_reference,
        failure_code,
        failure_message,
        lookup,
    )
    await conn.execute(
        """UPDATE payments
              SET processor_reference = coalesce($3, processor_reference), failure_code = $4,
                  failure_message = $5, updated_at = now()
            WHERE id = $1 AND tenant_id = $2""",
        payment_id,
        tenant_id,
        processor_reference,
        failure_code,
        failure_message,
    )
    await notify_payment_changed(conn, payment_id)
    return status


# --- Gateway mutations ----------------------------------------------------------------------------

_KEY_SQL = """
INSERT INTO idempotency_keys AS ik (tenant_id, request_id, request_hash, response)
VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, request_id) DO UPDATE
   SET request_hash = excluded.request_hash, response = excluded.response, created_at = now()
 WHERE ik.created_at < now() - make_interval(secs => $5)
RETURNING true AS fresh"""

#: CreatePayment as ONE statement: the idempotency key first; only if it was inserted
#: (new, or taken over after the retention window) the payment, its first transition and
#: the CREATE command in the outbox; the relay is NOTIFYed when anything was written.
#: Foreign keys are checked at the end of the statement, after every CTE has inserted.
_CREATE_SQL = f"""
WITH k AS ({_KEY_SQL}),
p AS (
    INSERT INTO payments (id, tenant_id, request_id, amount_minor, currency, capture_method,
                          customer_reference, customer_email, customer_phone, payment_method,
                          description, metadata, created_at, updated_at)
    SELECT $6, $1, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16::jsonb, $17, $17 FROM k
    RETURNING id
),
t AS (
    INSERT INTO payment_transitions (tenant_id, payment_id, occurred_at, from_status, to_status, cause)
    SELECT $1, p.id, $17, NULL, 'requires_processing', 'created' FROM p
),
o AS (
    INSERT INTO outbox (topic, key, payload, created_at, payment_operation_id)
    SELECT $18, $19, $20, $17, p.id FROM p
)
SELECT EXISTS (SELECT 1 FROM k) AS inserted,
       CASE WHEN EXISTS (SELECT 1 FROM k) THEN pg_notify($21, '') END AS notified"""  # noqa: S608


def payment_command(
    kind: events_pb2.PaymentCommandKind.ValueType,
    tenant_id: uuid.UUID,
    payment_id: uuid.UUID,
    request_id: str,
    requested_at: datetime,
    *,
    capture_id: uuid.UUID | None = None,
    refund_id: uuid.UUID | None = None,
) -> events_pb2.PaymentCommand:
    """A new ``PaymentCommand`` (fresh UUIDv7 ``command_id``) asking the payment worker to do ``kind``
    for ``payment_id`` (and ``capture_id`` / ``refund_id`` for CAPTURE / REFUND); ``request_id`` and
    ``requested_at`` (timezone-aware) name the request that asked for it."""
    return events_pb2.PaymentCommand(
        command_id=str(uuid6.uuid7()),
        kind=kind,
        tenant_id=str(tenant_id),
        payment_id=str(payment_id),
        capture_id=str(capture_id) if capture_id else "",
        refund_id=str(refund_id) if refund_id else "",
        request_id=request_id,
        request_time=_timestamp(requested_at),
    )


def command_operation_id(command: events_pb2.PaymentCommand) -> uuid.UUID:
    """The operation ``command`` asks for, stored as ``outbox.payment_operation_id`` (migration 0018):
    the capture id (CAPTURE), the refund id (REFUND), else the payment id (CREATE, CANCEL).
    Raises ``ValueError`` for an id that is not a UUID."""
    if command.kind == events_pb2.PAYMENT_COMMAND_KIND_CAPTURE:
        return uuid.UUID(command.capture_id)
    if command.kind == events_pb2.PAYMENT_COMMAND_KIND_REFUND:
        return uuid.UUID(command.refund_id)
    return uuid.UUID(command.payment_id)


#: Writes one PaymentCommand outbox row and wakes the relay. Columns: topic, key, payload,
#: available_at (NULL: now), payment_operation_id.
ENQUEUE_COMMAND_SQL: Final = """
WITH o AS (INSERT INTO outbox (topic, key, payload, available_at, payment_operation_id)
           VALUES ($1, $2, $3, coalesce($4, now()), $5) RETURNING 1)
SELECT pg_notify($6, '') FROM o"""


async def enqueue_command(
    conn: Connection,
    topic_prefix: str,
    command: events_pb2.PaymentCommand,
    *,
    available_at: datetime | None = None,
) -> None:
    """Write ``command`` to the transactional outbox in the caller's transaction: topic
    ``<prefix>payments.commands``, key = the tenant id, ``payment_operation_id`` =
    :func:`command_operation_id` (what the payment sweeper looks at), due at ``available_at``
    (default now; the relay publishes it then). NOTIFYs the relay."""
    await conn.execute(
        ENQUEUE_COMMAND_SQL,
        payment_commands_topic(topic_prefix),
        command.tenant_id.encode("ascii"),
        command.SerializeToString(),
        available_at,
        command_operation_id(command),
        OUTBOX_NOTIFY_CHANNEL,
    )


async def _replay(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, request_id: str, fingerprint: bytes, response_type: type[M]
) -> M | status_pb2.Status:
    """The answer for a key that was already used: the stored one, or the reuse error."""
    existing = await pool.fetchrow(
        "SELECT request_hash, response FROM idempotency_keys WHERE tenant_id = $1 AND request_id = $2",
        tenant_id,
        stored_request_id(request_id),
    )
    if existing is None:
        # Reaped between our conflict and our read: the key is free again.
        return key_in_flux(request_id)
    if existing["request_hash"] != fingerprint:
        return idempotency_key_reused(request_id)
    try:
        return decode_outcome(existing["response"], response_type)
    except ValueError:
        return idempotency_key_reused(request_id)


async def create_payment(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    request: payments_pb2.CreatePaymentRequest,
    plan: CreatePlan,
    *,
    topic_prefix: str = "",
    retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
) -> payments_pb2.CreatePaymentResponse | status_pb2.Status:
    """Accept a validated CreatePayment in one statement (:data:`_CREATE_SQL`): idempotency
    record, payment (REQUIRES_PROCESSING), its ``created`` transition and a CREATE
    PaymentCommand in the outbox. Returns the response (new or replayed) or the reuse error.
    Raises asyncpg's exceptions on database errors (then nothing was written).
    """
    now = datetime.now(UTC)
    payment_id = uuid6.uuid7()
    row = PaymentRow(
        id=payment_id,
        tenant_id=tenant_id,
        request_id=request.request_id,
        status=_P.REQUIRES_PROCESSING,
        amount_minor=request.amount_minor,
        currency=request.currency,
        amount_captured_minor=0,
        amount_refunded_minor=0,
        capture_method=plan.capture_method,
        customer_reference=request.customer_reference,
        customer_email=plan.customer_email,
        customer_phone=plan.customer_phone,
        payment_method=request.payment_method,
        description=request.description,
        metadata=plan.metadata,
        processor="",
        processor_reference="",
        failure_code="",
        failure_message="",
        cancellation_reason="",
        cancel_requested_at=None,
        created_at=now,
        updated_at=now,
    )
    created = {
        "occurred_at": now,
        "from_status": None,
        "to_status": "requires_processing",
        "cause": "created",
    }
    payment = _payment_message(row, transitions=[{**created, "attempt_no": 0, "detail": ""}])
    response = payments_pb2.CreatePaymentResponse(payment=payment)
    fingerprint = request_fingerprint("CreatePayment", request)
    kind = events_pb2.PAYMENT_COMMAND_KIND_CREATE
    command = payment_command(kind, tenant_id, payment_id, request.request_id, now).SerializeToString()
    record = await pool.fetchrow(
        _CREATE_SQL,
        tenant_id,
        stored_request_id(request.request_id),
        fingerprint,
        encode_outcome(response),
        retention_s,
        payment_id,
        request.request_id,
        request.amount_minor,
        request.currency,
        plan.capture_method,
        request.customer_reference,
        plan.customer_email,
        plan.customer_phone,
        request.payment_method,
        request.description,
        json.dumps(plan.metadata),
        now,
        payment_commands_topic(topic_prefix),
        str(tenant_id).encode("ascii"),
        command,
        OUTBOX_NOTIFY_CHANNEL,
    )
    assert record is not None
    if record["inserted"]:
        return response
    return await _replay(pool, tenant_id, request.request_id, fingerprint, payments_pb2.CreatePaymentResponse)


Work = Callable[[Connection, PaymentRow, datetime], Awaitable[M | status_pb2.Status]]


async def _mutate(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    method: str,
    request: payments_pb2.CapturePaymentRequest
    | payments_pb2.CancelPaymentRequest
    | payments_pb2.RefundPaymentRequest,
    payment_id: uuid.UUID,
    response_type: type[M],
    work: Work[M],
    *,
    retention_s: float,
    lock_timeout_ms: int,
) -> M | status_pb2.Status:
    """Run ``work`` on the locked payment under the request's idempotency key, in one
    transaction; store its answer (response or error) with the key.

    ``work`` must check everything before writing anything: when it returns an error
    only the key (with that error) is committed. A key already used is answered from
    its record (:func:`_replay`) and nothing else happens.
    """
    fingerprint = request_fingerprint(method, request)
    key = stored_request_id(request.request_id)
    locking = "key"
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{lock_timeout_ms}ms")
            fresh = await conn.fetchval(_KEY_SQL, tenant_id, key, fingerprint, b"", retention_s)
            if fresh:
                locking = "payment"
                payment = await lock_payment(conn, tenant_id, payment_id)
                locking = "done"
                outcome: M | status_pb2.Status
                if payment is None:
                    outcome = not_found("payment", str(payment_id))
                else:
                    outcome = await work(conn, payment, datetime.now(UTC))
                await conn.execute(
                    "UPDATE idempotency_keys SET response = $3 WHERE tenant_id = $1 AND request_id = $2",
                    tenant_id,
                    key,
                    encode_outcome(outcome),
                )
                return outcome
    except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
        # Rolled back: nothing was written, the request may be sent again as it is.
        return key_in_flux(request.request_id) if locking == "key" else payment_busy(payment_id)
    return await _replay(pool, tenant_id, request.request_id, fingerprint, response_type)


def _status_refusal(payment: PaymentRow, operation: str, reason: str, needs: str) -> status_pb2.Status:
    """FAILED_PRECONDITION for ``operation`` on a payment in a status that does not allow it:
    ``PAYMENT_STATUS_UNKNOWN`` while UNKNOWN, else ``reason``."""
    if payment.status is _P.UNKNOWN:
        return payment_precondition_failed(
            "PAYMENT_STATUS_UNKNOWN",
            f"cannot {operation} payment {payment.id}: its status is UNKNOWN (the processor's answer was "
            "lost); nothing can be done until a processor lookup or webhook resolves it",
            payment,
            "PAYMENT_STATUS",
        )
    return payment_precondition_failed(
        reason,
        f"cannot {operation} payment {payment.id}: its status is {payment.status.value.upper()}, "
        f"{operation} needs {needs}",
        payment,
        "PAYMENT_STATUS",
    )


async def capture_payment(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    request: payments_pb2.CapturePaymentRequest,
    payment_id: uuid.UUID,
    *,
    topic_prefix: str = "",
    retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
) -> payments_pb2.CapturePaymentResponse | status_pb2.Status:
    """Accept a CapturePayment: under the payment's row lock, check it is REQUIRES_CAPTURE
    with no open or done capture and no pending cancel, and that ``amount_minor`` (0: all)
    is at most the authorized amount; then write the PENDING capture and a CAPTURE command.

    Errors (stored with the key and replayed): NOT_FOUND; FAILED_PRECONDITION
    (``PAYMENT_STATUS_UNKNOWN``, ``PAYMENT_NOT_CAPTURABLE``, ``CAPTURE_NOT_ALLOWED``);
    INVALID_ARGUMENT for an amount above the authorized one. ABORTED with RetryInfo
    when a lock is not obtained within ``lock_timeout_ms`` (not stored).
    """

    async def work(
        conn: Connection, payment: PaymentRow, now: datetime
    ) -> payments_pb2.CapturePaymentResponse | status_pb2.Status:
        try:
            next_status(payment.status, PaymentTrigger.CAPTURE_REQUESTED)
        except IllegalTransition:
            return _status_refusal(
                payment,
                "capture",
                "PAYMENT_NOT_CAPTURABLE",
                "REQUIRES_CAPTURE (created with CAPTURE_METHOD_MANUAL)",
            )
        captures = [
            CaptureStatus(r["status"])
            for r in await conn.fetch(
                "SELECT status FROM payment_captures WHERE payment_id = $1 AND tenant_id = $2",
                payment.id,
                tenant_id,
            )
        ]
        try:
            amount = check_capture(
                request.amount_minor,
                payment.amount_minor,
                captures,
                cancel_requested=payment.cancel_requested_at is not None,
            )
        except CaptureExceedsAuthorized as exc:
            return invalid_argument([FieldViolation(field="amount_minor", description=str(exc))])
        except CaptureNotAllowed as exc:
            return payment_precondition_failed(
                "CAPTURE_NOT_ALLOWED",
                f"cannot capture payment {payment.id}: {exc}",
                payment,
                "PAYMENT_CAPTURE",
            )
        capture_id = uuid6.uuid7()
        await conn.execute(
            """INSERT INTO payment_captures (id, tenant_id, payment_id, request_id, amount_minor,
                                             created_at, updated_at)
               VALUES ($1, $2, $3, $4, $5, $6, $6)""",
            capture_id,
            tenant_id,
            payment.id,
            request.request_id,
            amount,
            now,
        )
        await record_operation_transition(
            conn,
            tenant_id,
            payment.id,
            None,
            CaptureStatus.PENDING,
            None,
            operation_id=capture_id,
            occurred_at=now,
        )
        await conn.execute("UPDATE payments SET updated_at = $2 WHERE id = $1", payment.id, now)
        kind = events_pb2.PAYMENT_COMMAND_KIND_CAPTURE
        command = payment_command(kind, tenant_id, payment.id, request.request_id, now, capture_id=capture_id)
        await enqueue_command(conn, topic_prefix, command)
        await notify_payment_changed(conn, payment.id)
        capture = _capture_message(
            {
                "id": capture_id,
                "payment_id": payment.id,
                "request_id": request.request_id,
                "status": CaptureStatus.PENDING.value,
                "amount_minor": amount,
                "processor_reference": "",
                "failure_code": "",
                "failure_message": "",
                "created_at": now,
                "updated_at": now,
            },
            [_created_transition(CaptureStatus.PENDING, now)],
        )
        return payments_pb2.CapturePaymentResponse(capture=capture)

    return await _mutate(
        pool,
        tenant_id,
        "CapturePayment",
        request,
        payment_id,
        payments_pb2.CapturePaymentResponse,
        work,
        retention_s=retention_s,
        lock_timeout_ms=lock_timeout_ms,
    )


async def cancel_payment(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    request: payments_pb2.CancelPaymentRequest,
    payment_id: uuid.UUID,
    *,
    topic_prefix: str = "",
    retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
) -> payments_pb2.CancelPaymentResponse | status_pb2.Status:
    """Accept a CancelPayment under the payment's row lock.

    REQUIRES_PROCESSING: CANCELED at once (transition ``cancel_requested``; nothing
    reached a processor, and the worker skips the payment's CREATE command).
    REQUIRES_CAPTURE with no open or done capture: ``cancel_request_time`` is set and
    a CANCEL command asks the worker to release the authorization (the status stays
    until the processor confirms). Both write a CANCEL command to the outbox.

    Errors (stored and replayed): NOT_FOUND; FAILED_PRECONDITION
    (``PAYMENT_STATUS_UNKNOWN``, ``PAYMENT_NOT_CANCELABLE``, ``CANCEL_NOT_ALLOWED``
    while a capture is open or done, ``CANCEL_ALREADY_REQUESTED``). ABORTED as in
    :func:`capture_payment`.
    """

    async def work(
        conn: Connection, payment: PaymentRow, now: datetime
    ) -> payments_pb2.CancelPaymentResponse | status_pb2.Status:
        try:
            to_status = next_status(payment.status, PaymentTrigger.CANCEL_REQUESTED)
        except IllegalTransition:
            return _status_refusal(
                payment, "cancel", "PAYMENT_NOT_CANCELABLE", "REQUIRES_PROCESSING or REQUIRES_CAPTURE"
            )
        if payment.cancel_requested_at is not None:
            return payment_precondition_failed(
                "CANCEL_ALREADY_REQUESTED",
                f"payment {payment.id} is already being canceled "
                f"(requested {payment.cancel_requested_at.isoformat()})",
                payment,
                "PAYMENT_CANCEL",
            )
        captures = [
            CaptureStatus(r["status"])
            for r in await conn.fetch(
                "SELECT status FROM payment_captures WHERE payment_id = $1 AND tenant_id = $2",
                payment.id,
                tenant_id,
            )
        ]
        try:
            check_cancel(captures)
        except CancelNotAllowed as exc:
            return payment_precondition_failed(
                "CANCEL_NOT_ALLOWED", f"cannot cancel payment {payment.id}: {exc}", payment, "PAYMENT_CAPTURE"
            )
        await conn.execute(
            """UPDATE payments SET cancellation_reason = $2, cancel_requested_at = $3, updated_at = $3
                WHERE id = $1""",
            payment.id,
            request.reason,
            now,
        )
        if to_status is not payment.status:
            trigger = PaymentTrigger.CANCEL_REQUESTED
            await record_transition(
                conn, tenant_id, payment.id, payment.status, to_status, trigger, detail=request.reason
            )
        command = payment_command(
            events_pb2.PAYMENT_COMMAND_KIND_CANCEL, tenant_id, payment.id, request.request_id, now
        )
        await enqueue_command(conn, topic_prefix, command)
        await notify_payment_changed(conn, payment.id)
        current = await get_payment(conn, tenant_id, payment.id)
        assert current is not None
        return payments_pb2.CancelPaymentResponse(payment=current)

    return await _mutate(
        pool,
        tenant_id,
        "CancelPayment",
        request,
        payment_id,
        payments_pb2.CancelPaymentResponse,
        work,
        retention_s=retention_s,
        lock_timeout_ms=lock_timeout_ms,
    )


async def refund_payment(
    pool: asyncpg.Pool,
    tenant_id: uuid.UUID,
    request: payments_pb2.RefundPaymentRequest,
    payment_id: uuid.UUID,
    *,
    topic_prefix: str = "",
    retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
) -> payments_pb2.RefundPaymentResponse | status_pb2.Status:
    """Accept a RefundPayment under the payment's row lock: the payment must be SUCCEEDED
    and ``amount_minor`` (0: all that remains) at most the captured amount minus every
    refund that is not FAILED (:func:`payments.state_machine.check_refund`); then write the
    PENDING refund and a REFUND command. Because the check and the insert happen under the
    row lock, concurrent refunds never exceed the captured amount together.

    Errors (stored and replayed): NOT_FOUND; FAILED_PRECONDITION
    (``PAYMENT_STATUS_UNKNOWN``, ``PAYMENT_NOT_REFUNDABLE``, ``REFUND_EXCEEDS_CAPTURED``).
    ABORTED as in :func:`capture_payment`.
    """

    async def work(
        conn: Connection, payment: PaymentRow, now: datetime
    ) -> payments_pb2.RefundPaymentResponse | status_pb2.Status:
        try:
            next_status(payment.status, PaymentTrigger.REFUND_REQUESTED)
        except IllegalTransition:
            return _status_refusal(payment, "refund", "PAYMENT_NOT_REFUNDABLE", "SUCCEEDED")
        refunds = [
            (RefundStatus(r["status"]), int(r["amount_minor"]))
            for r in await conn.fetch(
                "SELECT status, amount_minor FROM payment_refunds WHERE payment_id = $1 AND tenant_id = $2",
                payment.id,
                tenant_id,
            )
        ]
        try:
            amount = check_refund(
                request.amount_minor, payment.amount_captured_minor, reserved_refunds_minor(refunds)
            )
        except RefundExceedsCaptured as exc:
            return payment_precondition_failed(
                "REFUND_EXCEEDS_CAPTURED",
                f"cannot refund payment {payment.id}: {exc}",
                payment,
                "REFUNDABLE_AMOUNT",
                {"refundable_minor": str(exc.refundable_minor), "captured_minor": str(exc.captured_minor)},
            )
        refund_id = uuid6.uuid7()
        await conn.execute(
            """INSERT INTO payment_refunds (id, tenant_id, payment_id, request_id, amount_minor, reason,
                                            created_at, updated_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $7)""",
            refund_id,
            tenant_id,
            payment.id,
            request.request_id,
            amount,
            request.reason,
            now,
        )
        await record_operation_transition(
            conn,
            tenant_id,
            payment.id,
            None,
            RefundStatus.PENDING,
            None,
            operation_id=refund_id,
            occurred_at=now,
        )
        await conn.execute("UPDATE payments SET updated_at = $2 WHERE id = $1", payment.id, now)
        kind = events_pb2.PAYMENT_COMMAND_KIND_REFUND
        command = payment_command(kind, tenant_id, payment.id, request.request_id, now, refund_id=refund_id)
        await enqueue_command(conn, topic_prefix, command)
        await notify_payment_changed(conn, payment.id)
        refund = _refund_message(
            {
                "id": refund_id,
                "payment_id": payment.id,
                "request_id": request.request_id,
                "status": RefundStatus.PENDING.value,
                "amount_minor": amount,
                "reason": request.reason,
                "processor_reference": "",
                "failure_code": "",
                "failure_message": "",
                "created_at": now,
                "updated_at": now,
            },
            [_created_transition(RefundStatus.PENDING, now)],
        )
        return payments_pb2.RefundPaymentResponse(refund=refund)

    return await _mutate(
        pool,
        tenant_id,
        "RefundPayment",
        request,
        payment_id,
        payments_pb2.RefundPaymentResponse,
        work,
        retention_s=retention_s,
        lock_timeout_ms=lock_timeout_ms,
    )
