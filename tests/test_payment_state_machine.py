"""The payment state machine: every (status, event) pair, property tests, and the money checks.

The expected tables below restate the rules independently of payments/state_machine.py
(as "status: event -> status" lists) so a slip in either shows up as a difference.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payments.state_machine import (
    ATTEMPT_TRANSITIONS,
    CAPTURE_TRANSITIONS,
    FINAL_ATTEMPT_STATUSES,
    FINAL_CAPTURE_STATUSES,
    FINAL_PAYMENT_STATUSES,
    FINAL_REFUND_STATUSES,
    PAYMENT_TRANSITIONS,
    REFUND_TRANSITIONS,
    RESERVING_REFUND_STATUSES,
    AmountError,
    AttemptStatus,
    CancelNotAllowed,
    CaptureExceedsAuthorized,
    CaptureNotAllowed,
    CaptureStatus,
    FailoverNotAllowed,
    IllegalTransition,
    InvalidAmount,
    OperationTrigger,
    PaymentEventType,
    PaymentStateError,
    PaymentStatus,
    PaymentTrigger,
    RefundExceedsCaptured,
    RefundStatus,
    allowed_events,
    check_cancel,
    check_capture,
    check_failover,
    check_refund,
    event_type_for,
    is_final,
    next_status,
    operation_failed_event_type,
    refundable_minor,
    reserved_refunds_minor,
)
from switchboard.payments.v1 import payments_pb2
from switchboard.protogen import PROTO_ROOT

P = PaymentStatus
T = PaymentTrigger
O = OperationTrigger  # noqa: E741 - short alias for the operation events
A = AttemptStatus
C = CaptureStatus
R = RefundStatus

EXPECTED_PAYMENT: dict[tuple[PaymentStatus, PaymentTrigger], PaymentStatus] = {
    # waiting for the worker: start, or cancel before anything reached a processor
    (P.REQUIRES_PROCESSING, T.ATTEMPT_STARTED): P.PROCESSING,
    (P.REQUIRES_PROCESSING, T.CANCEL_REQUESTED): P.CANCELED,
    # an attempt at the processor ends in one of four ways
    (P.PROCESSING, T.ATTEMPT_SUCCEEDED): P.SUCCEEDED,
    (P.PROCESSING, T.ATTEMPT_AUTHORIZED): P.REQUIRES_CAPTURE,
    (P.PROCESSING, T.ATTEMPT_FAILED): P.FAILED,
    (P.PROCESSING, T.ATTEMPT_UNKNOWN): P.UNKNOWN,
    # only resolution leaves UNKNOWN
    (P.UNKNOWN, T.RESOLVED_SUCCEEDED): P.SUCCEEDED,
    (P.UNKNOWN, T.RESOLVED_REQUIRES_CAPTURE): P.REQUIRES_CAPTURE,
    (P.UNKNOWN, T.RESOLVED_FAILED): P.FAILED,
    # failover after a definite failure
    (P.FAILED, T.FAILOVER_ATTEMPT_STARTED): P.PROCESSING,
    # manual capture
    (P.REQUIRES_CAPTURE, T.CAPTURE_REQUESTED): P.REQUIRES_CAPTURE,
    (P.REQUIRES_CAPTURE, T.CAPTURE_SUCCEEDED): P.SUCCEEDED,
    (P.REQUIRES_CAPTURE, T.CANCEL_REQUESTED): P.REQUIRES_CAPTURE,
    (P.REQUIRES_CAPTURE, T.CANCEL_SUCCEEDED): P.CANCELED,
    # refunds keep SUCCEEDED
    (P.SUCCEEDED, T.REFUND_REQUESTED): P.SUCCEEDED,
    (P.SUCCEEDED, T.REFUND_SUCCEEDED): P.SUCCEEDED,
}

EXPECTED_ATTEMPT: dict[tuple[AttemptStatus, OperationTrigger], AttemptStatus] = {
    (A.PENDING, O.SUCCEEDED): A.SUCCEEDED,
    (A.PENDING, O.FAILED): A.FAILED,
    (A.PENDING, O.AMBIGUOUS): A.UNKNOWN,
    (A.UNKNOWN, O.RESOLVED_SUCCEEDED): A.SUCCEEDED,
    (A.UNKNOWN, O.RESOLVED_FAILED): A.FAILED,
}


def _operation_rules(status: type[Any]) -> dict[tuple[Any, OperationTrigger], Any]:
    return {
        (status.PENDING, O.STARTED): status.PROCESSING,
        (status.PROCESSING, O.RETRY_SCHEDULED): status.PENDING,
        (status.PROCESSING, O.SUCCEEDED): status.SUCCEEDED,
        (status.PROCESSING, O.FAILED): status.FAILED,
        (status.PROCESSING, O.AMBIGUOUS): status.UNKNOWN,
        (status.UNKNOWN, O.RESOLVED_SUCCEEDED): status.SUCCEEDED,
        (status.UNKNOWN, O.RESOLVED_FAILED): status.FAILED,
    }


EXPECTED_CAPTURE: dict[tuple[CaptureStatus, OperationTrigger], CaptureStatus] = _operation_rules(
    CaptureStatus
)
EXPECTED_REFUND: dict[tuple[RefundStatus, OperationTrigger], RefundStatus] = _operation_rules(RefundStatus)

MACHINES: list[tuple[str, type[StrEnum], type[StrEnum], Mapping[Any, Any], dict[Any, Any]]] = [
    ("payment", PaymentStatus, PaymentTrigger, PAYMENT_TRANSITIONS, EXPECTED_PAYMENT),
    ("attempt", AttemptStatus, OperationTrigger, ATTEMPT_TRANSITIONS, EXPECTED_ATTEMPT),
    ("capture", CaptureStatus, OperationTrigger, CAPTURE_TRANSITIONS, EXPECTED_CAPTURE),
    ("refund", RefundStatus, OperationTrigger, REFUND_TRANSITIONS, EXPECTED_REFUND),
]

CROSS_PRODUCT = [
    pytest.param(name, status, event, expected, id=f"{name}-{status.value}-{event.value}")
    for name, statuses, triggers, _, expected in MACHINES
    for status, event in itertools.product(statuses, triggers)
]


# ---------------------------------------------------------------------------
# The tables, exhaustively


@pytest.mark.parametrize(("name", "table", "expected"), [(m[0], m[3], m[4]) for m in MACHINES])
def test_table_is_exactly_the_rules(name: str, table: Mapping[Any, Any], expected: dict[Any, Any]) -> None:
    assert dict(table) == expected, name


@pytest.mark.parametrize(("name", "status", "event", "expected"), CROSS_PRODUCT)
def test_every_status_event_pair(name: str, status: Any, event: Any, expected: dict[Any, Any]) -> None:
    if (status, event) in expected:
        result = next_status(status, event)
        assert result is expected[(status, event)]
        assert type(result) is type(status)
    else:
        with pytest.raises(IllegalTransition) as caught:
            next_status(status, event)
        error = caught.value
        assert error.machine == name
        assert error.current is status
        assert error.event is event
        assert f"{status.value!r}" in str(error)
        assert f"{event.value!r}" in str(error)
        assert event not in error.allowed


def test_tables_are_read_only() -> None:
    with pytest.raises(TypeError):
        PAYMENT_TRANSITIONS[(P.CANCELED, T.ATTEMPT_STARTED)] = P.PROCESSING  # type: ignore[index]


def test_unknown_accepts_only_resolution() -> None:
    assert allowed_events(P.UNKNOWN) == (
        T.RESOLVED_SUCCEEDED,
        T.RESOLVED_REQUIRES_CAPTURE,
        T.RESOLVED_FAILED,
    )
    for event in (
        T.ATTEMPT_STARTED,
        T.FAILOVER_ATTEMPT_STARTED,
        T.CAPTURE_REQUESTED,
        T.CANCEL_REQUESTED,
        T.REFUND_REQUESTED,
    ):
        with pytest.raises(IllegalTransition, match="'unknown' does not accept"):
            next_status(P.UNKNOWN, event)


def test_resolution_events_are_accepted_only_in_unknown() -> None:
    resolutions = {T.RESOLVED_SUCCEEDED, T.RESOLVED_REQUIRES_CAPTURE, T.RESOLVED_FAILED}
    assert {s for (s, e) in PAYMENT_TRANSITIONS if e in resolutions} == {P.UNKNOWN}


def test_refunds_only_on_succeeded_captures_only_on_requires_capture() -> None:
    assert {s for (s, e) in PAYMENT_TRANSITIONS if e is T.REFUND_REQUESTED} == {P.SUCCEEDED}
    assert {s for (s, e) in PAYMENT_TRANSITIONS if e is T.CAPTURE_REQUESTED} == {P.REQUIRES_CAPTURE}
    assert {s for (s, e) in PAYMENT_TRANSITIONS if e is T.CANCEL_REQUESTED} == {
        P.REQUIRES_PROCESSING,
        P.REQUIRES_CAPTURE,
    }


def test_final_payment_statuses() -> None:
    assert {P.SUCCEEDED, P.FAILED, P.CANCELED} == FINAL_PAYMENT_STATUSES
    assert allowed_events(P.CANCELED) == ()
    # SUCCEEDED accepts refunds but never leaves SUCCEEDED.
    assert {next_status(P.SUCCEEDED, e) for e in allowed_events(P.SUCCEEDED)} == {P.SUCCEEDED}
    # FAILED is left only by an explicit failover.
    assert allowed_events(P.FAILED) == (T.FAILOVER_ATTEMPT_STARTED,)
    for status in PaymentStatus:
        assert is_final(status) is (status in FINAL_PAYMENT_STATUSES)


@pytest.mark.parametrize(
    ("final", "table"),
    [
        (FINAL_ATTEMPT_STATUSES, ATTEMPT_TRANSITIONS),
        (FINAL_CAPTURE_STATUSES, CAPTURE_TRANSITIONS),
        (FINAL_REFUND_STATUSES, REFUND_TRANSITIONS),
    ],
)
def test_final_operation_statuses_are_dead_ends(final: frozenset[Any], table: Mapping[Any, Any]) -> None:
    assert {s.value for s in final} == {"succeeded", "failed"}
    assert not [key for key in table if key[0] in final]
    for status in final:
        assert is_final(status)
        assert allowed_events(status) == ()


def _reachable(start: Any, table: Mapping[Any, Any]) -> set[Any]:
    seen = {start}
    todo = deque([start])
    while todo:
        current = todo.popleft()
        for (source, _), target in table.items():
            if source is current and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize(
    ("start", "statuses", "table"),
    [
        (P.REQUIRES_PROCESSING, PaymentStatus, PAYMENT_TRANSITIONS),
        (A.PENDING, AttemptStatus, ATTEMPT_TRANSITIONS),
        (C.PENDING, CaptureStatus, CAPTURE_TRANSITIONS),
        (R.PENDING, RefundStatus, REFUND_TRANSITIONS),
    ],
)
def test_every_status_is_reachable_and_can_end(start: Any, statuses: Any, table: Mapping[Any, Any]) -> None:
    assert _reachable(start, table) == set(statuses)
    for status in statuses:
        assert _reachable(status, table) & {s for s in statuses if is_final(s)}, status


def test_events_of_another_machine_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="payment events are PaymentTrigger"):
        next_status(P.PROCESSING, O.SUCCEEDED)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="refund events are OperationTrigger"):
        next_status(R.PROCESSING, T.REFUND_SUCCEEDED)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="not a status"):
        next_status("processing", "attempt_succeeded")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="not a status"):
        allowed_events("unknown")  # type: ignore[call-overload]


def test_illegal_transition_message_lists_what_is_allowed() -> None:
    with pytest.raises(IllegalTransition) as caught:
        next_status(P.REQUIRES_CAPTURE, T.REFUND_REQUESTED)
    assert str(caught.value) == (
        "illegal payment transition: status 'requires_capture' does not accept event "
        "'refund_requested' (allowed in 'requires_capture': capture_requested, capture_succeeded, "
        "cancel_requested, cancel_succeeded)"
    )
    assert isinstance(caught.value, PaymentStateError)
    with pytest.raises(IllegalTransition, match=r"allowed in 'canceled': none"):
        next_status(P.CANCELED, T.REFUND_REQUESTED)


# ---------------------------------------------------------------------------
# The API mirrors the enums, and event types


@pytest.mark.parametrize(
    ("python_enum", "proto_enum", "prefix"),
    [
        (PaymentStatus, payments_pb2.PaymentStatus, "PAYMENT_STATUS_"),
        (AttemptStatus, payments_pb2.AttemptStatus, "ATTEMPT_STATUS_"),
        (CaptureStatus, payments_pb2.CaptureStatus, "CAPTURE_STATUS_"),
        (RefundStatus, payments_pb2.RefundStatus, "REFUND_STATUS_"),
    ],
)
def test_statuses_mirror_the_proto_enums(python_enum: type[StrEnum], proto_enum: Any, prefix: str) -> None:
    # An EnumTypeWrapper, not a dict: keys() lists the value names.
    names = proto_enum.keys()
    proto_names = {name.removeprefix(prefix) for name in names} - {"UNSPECIFIED"}
    assert proto_names == {member.name for member in python_enum}
    for member in python_enum:
        assert member.value == member.name.lower()


def test_event_types_are_the_ones_documented_in_events_proto() -> None:
    text = (PROTO_ROOT / "switchboard" / "payments" / "v1" / "events.proto").read_text()
    for event_type in PaymentEventType:
        assert f'"{event_type.value}"' in text


EXPECTED_EVENT_TYPES: dict[tuple[PaymentStatus, PaymentTrigger], PaymentEventType | None] = {
    (P.REQUIRES_PROCESSING, T.ATTEMPT_STARTED): PaymentEventType.PROCESSING,
    (P.REQUIRES_PROCESSING, T.CANCEL_REQUESTED): PaymentEventType.CANCELED,
    (P.PROCESSING, T.ATTEMPT_SUCCEEDED): PaymentEventType.SUCCEEDED,
    (P.PROCESSING, T.ATTEMPT_AUTHORIZED): PaymentEventType.REQUIRES_CAPTURE,
    (P.PROCESSING, T.ATTEMPT_FAILED): PaymentEventType.FAILED,
    (P.PROCESSING, T.ATTEMPT_UNKNOWN): PaymentEventType.UNKNOWN,
    (P.UNKNOWN, T.RESOLVED_SUCCEEDED): PaymentEventType.SUCCEEDED,
    (P.UNKNOWN, T.RESOLVED_REQUIRES_CAPTURE): PaymentEventType.REQUIRES_CAPTURE,
    (P.UNKNOWN, T.RESOLVED_FAILED): PaymentEventType.FAILED,
    (P.FAILED, T.FAILOVER_ATTEMPT_STARTED): PaymentEventType.PROCESSING,
    (P.REQUIRES_CAPTURE, T.CAPTURE_REQUESTED): None,
    (P.REQUIRES_CAPTURE, T.CAPTURE_SUCCEEDED): PaymentEventType.CAPTURED,
    (P.REQUIRES_CAPTURE, T.CANCEL_REQUESTED): None,
    (P.REQUIRES_CAPTURE, T.CANCEL_SUCCEEDED): PaymentEventType.CANCELED,
    (P.SUCCEEDED, T.REFUND_REQUESTED): None,
    (P.SUCCEEDED, T.REFUND_SUCCEEDED): PaymentEventType.REFUNDED,
}


def test_event_type_for_every_transition() -> None:
    assert set(EXPECTED_EVENT_TYPES) == set(PAYMENT_TRANSITIONS)
    for (status, event), expected in EXPECTED_EVENT_TYPES.items():
        assert event_type_for(status, event) is expected, (status, event)
    operation_failures = {operation_failed_event_type("capture"), operation_failed_event_type("refund")}
    assert operation_failures == {PaymentEventType.CAPTURE_FAILED, PaymentEventType.REFUND_FAILED}
    assert {t for t in EXPECTED_EVENT_TYPES.values() if t is not None} | operation_failures == set(
        PaymentEventType
    )
    with pytest.raises(IllegalTransition):
        event_type_for(P.UNKNOWN, T.REFUND_SUCCEEDED)
    with pytest.raises(ValueError, match="not an operation kind"):
        operation_failed_event_type("attempt")


def test_every_payment_status_change_is_published() -> None:
    # Issue "Payments" item 9: every payment state change is published on payments.events.
    for (status, event), to_status in PAYMENT_TRANSITIONS.items():
        if to_status is not status:
            assert event_type_for(status, event) is not None, (status, event)


# ---------------------------------------------------------------------------
# Property tests: random event sequences

# What each payment event does to the attempts (the worker applies both in one transaction).
_ATTEMPT_EFFECT: dict[PaymentTrigger, OperationTrigger] = {
    T.ATTEMPT_SUCCEEDED: O.SUCCEEDED,
    T.ATTEMPT_AUTHORIZED: O.SUCCEEDED,
    T.ATTEMPT_FAILED: O.FAILED,
    T.ATTEMPT_UNKNOWN: O.AMBIGUOUS,
    T.RESOLVED_SUCCEEDED: O.RESOLVED_SUCCEEDED,
    T.RESOLVED_REQUIRES_CAPTURE: O.RESOLVED_SUCCEEDED,
    T.RESOLVED_FAILED: O.RESOLVED_FAILED,
}

PAYMENT_STATUSES_IN_TABLE = {s for (s, _) in PAYMENT_TRANSITIONS} | set(PAYMENT_TRANSITIONS.values())


@settings(max_examples=500)
@given(st.data())
def test_random_payment_event_sequences_stay_in_the_table(data: st.DataObject) -> None:
    """Random walks: each step is an allowed event or, as often, any event at all."""
    status = P.REQUIRES_PROCESSING
    attempts: list[AttemptStatus] = []
    path = [status]
    for _ in range(data.draw(st.integers(min_value=0, max_value=40), label="steps")):
        allowed = allowed_events(status)
        pick_allowed: bool = data.draw(st.booleans(), label="pick an allowed event")
        if allowed and pick_allowed:
            event = data.draw(st.sampled_from(allowed), label="allowed event")
        else:
            event = data.draw(st.sampled_from(list(PaymentTrigger)), label="any event")
        before = status
        try:
            status = next_status(status, event)
        except IllegalTransition:
            assert (before, event) not in PAYMENT_TRANSITIONS
            assert status is before
            continue
        assert (before, event) in PAYMENT_TRANSITIONS
        assert status in PAYMENT_STATUSES_IN_TABLE
        # Leaving UNKNOWN happens only through a resolution event.
        if before is P.UNKNOWN:
            assert event.value.startswith("resolved_")
        # Nothing leaves SUCCEEDED or CANCELED.
        if before in (P.SUCCEEDED, P.CANCELED):
            assert status is before
        # The attempts move with the payment.
        if event in (T.ATTEMPT_STARTED, T.FAILOVER_ATTEMPT_STARTED):
            if event is T.FAILOVER_ATTEMPT_STARTED:
                check_failover(attempts)
            attempts.append(A.PENDING)
        elif event in _ATTEMPT_EFFECT:
            attempts[-1] = next_status(attempts[-1], _ATTEMPT_EFFECT[event])
        # Never two charges: at most one attempt that is not definitely not-charged.
        assert sum(1 for a in attempts if a is not A.FAILED) <= 1
        path.append(status)
    assert path[0] is P.REQUIRES_PROCESSING
    assert P.REQUIRES_PROCESSING not in path[1:]


_OP_STATUS_STRATEGY = st.sampled_from([CaptureStatus, RefundStatus])


@settings(max_examples=300)
@given(_OP_STATUS_STRATEGY, st.lists(st.sampled_from(list(OperationTrigger)), max_size=30))
def test_random_operation_sequences_stay_in_the_table(
    status_type: type[CaptureStatus] | type[RefundStatus], events: list[OperationTrigger]
) -> None:
    table: Mapping[Any, Any] = CAPTURE_TRANSITIONS if status_type is CaptureStatus else REFUND_TRANSITIONS
    status: Any = status_type.PENDING
    for event in events:
        before = status
        try:
            status = next_status(status, event)
        except IllegalTransition:
            assert (before, event) not in table
            continue
        assert table[(before, event)] is status
        if before.value == "unknown":
            assert event in (O.RESOLVED_SUCCEEDED, O.RESOLVED_FAILED)
        assert not is_final(before)


# A refund scenario step: request an amount (0 = the rest), or drive refund number i.
_REFUND_STEP = st.one_of(
    st.tuples(st.just("request"), st.integers(min_value=0, max_value=2_000)),
    st.tuples(
        st.just("drive"), st.integers(min_value=0, max_value=50), st.sampled_from(list(OperationTrigger))
    ),
)


@settings(max_examples=500)
@given(st.integers(min_value=1, max_value=1_000), st.lists(_REFUND_STEP, max_size=60))
def test_refunds_never_exceed_captured(captured: int, steps: list[tuple[Any, ...]]) -> None:
    refunds: list[tuple[RefundStatus, int]] = []
    for step in steps:
        if step[0] == "request":
            requested = step[1]
            remaining = captured - sum(amount for status, amount in refunds if status is not R.FAILED)
            try:
                amount = check_refund(requested, captured, reserved_refunds_minor(refunds))
            except RefundExceedsCaptured:
                assert requested > remaining or (requested == 0 and remaining == 0)
                continue
            assert 0 < amount <= remaining
            assert amount == (requested or remaining)
            refunds.append((R.PENDING, amount))
        elif refunds:
            index = step[1] % len(refunds)
            status, amount = refunds[index]
            if (status, step[2]) in REFUND_TRANSITIONS:
                refunds[index] = (next_status(status, step[2]), amount)
        reserved_now = reserved_refunds_minor(refunds)
        assert reserved_now <= captured
        assert sum(a for s, a in refunds if s is R.SUCCEEDED) <= captured
        assert refundable_minor(captured, reserved_now) == captured - reserved_now


@given(
    st.integers(min_value=1, max_value=10**12),
    st.integers(min_value=0, max_value=2 * 10**12),
)
def test_capture_amount_is_within_the_authorization(authorized: int, requested: int) -> None:
    if requested > authorized:
        with pytest.raises(CaptureExceedsAuthorized) as caught:
            check_capture(requested, authorized)
        assert (caught.value.requested_minor, caught.value.authorized_minor) == (requested, authorized)
        return
    amount = check_capture(requested, authorized)
    assert 0 < amount <= authorized
    assert amount == (requested or authorized)


# ---------------------------------------------------------------------------
# Amount checks


def test_check_capture() -> None:
    assert check_capture(0, 1050) == 1050  # 0 = the whole authorization
    assert check_capture(400, 1050) == 400  # partial
    assert check_capture(1050, 1050) == 1050
    assert check_capture(400, 1050, [C.FAILED]) == 400  # a failed capture may be retried
    with pytest.raises(
        CaptureExceedsAuthorized, match="capture of 1051 minor units exceeds the authorized 1050"
    ):
        check_capture(1051, 1050)
    with pytest.raises(InvalidAmount, match="must not be negative"):
        check_capture(-1, 1050)
    with pytest.raises(InvalidAmount, match="must be positive"):
        check_capture(0, 0)
    for open_or_done in (C.PENDING, C.PROCESSING, C.UNKNOWN, C.SUCCEEDED):
        with pytest.raises(CaptureNotAllowed, match=f"one capture per payment.*{open_or_done.value}"):
            check_capture(100, 1050, [C.FAILED, open_or_done])
    with pytest.raises(CaptureNotAllowed, match="cancel is pending"):
        check_capture(100, 1050, cancel_requested=True)


def test_check_cancel() -> None:
    check_cancel([])
    check_cancel([C.FAILED, C.FAILED])
    for open_or_done in (C.PENDING, C.PROCESSING, C.UNKNOWN, C.SUCCEEDED):
        with pytest.raises(CancelNotAllowed, match=open_or_done.value):
            check_cancel([open_or_done])


def test_check_failover() -> None:
    check_failover([A.FAILED])
    check_failover([A.FAILED, A.FAILED])
    with pytest.raises(FailoverNotAllowed, match="no attempt yet"):
        check_failover([])
    for risky in (A.PENDING, A.SUCCEEDED, A.UNKNOWN):
        with pytest.raises(FailoverNotAllowed, match=f"#2: {risky.value}"):
            check_failover([A.FAILED, risky])


def test_reserved_refunds_count_everything_but_failed() -> None:
    assert frozenset({R.PENDING, R.PROCESSING, R.UNKNOWN, R.SUCCEEDED}) == RESERVING_REFUND_STATUSES
    refunds = [(R.PENDING, 10), (R.PROCESSING, 20), (R.UNKNOWN, 40), (R.SUCCEEDED, 80), (R.FAILED, 160)]
    assert reserved_refunds_minor(refunds) == 150
    assert reserved_refunds_minor([]) == 0
    with pytest.raises(InvalidAmount):
        reserved_refunds_minor([(R.PENDING, -1)])


def test_refundable_minor() -> None:
    assert refundable_minor(1050, 0) == 1050
    assert refundable_minor(1050, 50) == 1000
    assert refundable_minor(1050, 1050) == 0
    with pytest.raises(InvalidAmount, match="exceed the captured amount"):
        refundable_minor(1050, 1051)
    with pytest.raises(InvalidAmount, match="must not be negative"):
        refundable_minor(-1, 0)
    with pytest.raises(InvalidAmount, match="must not be negative"):
        refundable_minor(10, -1)


def test_check_refund() -> None:
    assert check_refund(0, 1050, 0) == 1050  # 0 = the rest
    assert check_refund(0, 1050, 50) == 1000
    assert check_refund(300, 1050, 50) == 300
    assert check_refund(1000, 1050, 50) == 1000
    with pytest.raises(
        RefundExceedsCaptured, match="1001 minor units exceeds the 1000 still refundable"
    ) as caught:
        check_refund(1001, 1050, 50)
    assert (caught.value.requested_minor, caught.value.refundable_minor) == (1001, 1000)
    with pytest.raises(RefundExceedsCaptured, match="nothing left to refund"):
        check_refund(0, 1050, 1050)
    with pytest.raises(RefundExceedsCaptured):
        check_refund(1, 1050, 1050)
    with pytest.raises(InvalidAmount, match="must not be negative"):
        check_refund(-5, 1050, 0)
    with pytest.raises(RefundExceedsCaptured):
        check_refund(1, 0, 0)  # nothing captured


def test_two_concurrent_refunds_cannot_exceed_the_captured_amount_together() -> None:
    captured = 100
    refunds: list[tuple[RefundStatus, int]] = []
    first = check_refund(60, captured, reserved_refunds_minor(refunds))
    refunds.append((R.PENDING, first))  # not final yet, but it already counts
    with pytest.raises(RefundExceedsCaptured, match="exceeds the 40 still refundable"):
        check_refund(60, captured, reserved_refunds_minor(refunds))
    # Once the first one fails, its amount is refundable again.
    refunds[0] = (next_status(next_status(R.PENDING, O.STARTED), O.FAILED), first)
    assert check_refund(60, captured, reserved_refunds_minor(refunds)) == 60


def test_amount_errors_are_value_errors() -> None:
    for error in (InvalidAmount, CaptureExceedsAuthorized, RefundExceedsCaptured):
        assert issubclass(error, AmountError)
        assert issubclass(error, ValueError)
        assert issubclass(error, PaymentStateError)
