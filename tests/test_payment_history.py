"""The status history of attempts, captures and refunds (migration 0017): recorded with time, cause and
attempt in the transaction of each change, append-only, and shown by GetPayment."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import grpc
import pytest

from gateway.server import Gateway
from payments import store
from payments.execution import Outcome, execute_capture, execute_refund
from switchboard.fakes.http import Fault
from switchboard.fakes.stripe import FakeStripe
from switchboard.payments.v1 import payments_pb2, payments_pb2_grpc
from tenants.sealing import MasterKeyRing
from tests.conftest import TenantCredentials
from tests.test_payment_worker import Rig, fake_stripe, rig, use_stripe

__all__ = ["fake_stripe", "rig"]  # fixtures used here

A, C, R = payments_pb2.AttemptStatus, payments_pb2.CaptureStatus, payments_pb2.RefundStatus


def history(
    transitions: Sequence[
        payments_pb2.AttemptTransition | payments_pb2.CaptureTransition | payments_pb2.RefundTransition
    ],
    name: Callable[[Any], str],
) -> list[tuple[str, str, str]]:
    """``(from, to, cause)`` per transition, statuses by their enum names (``name``: the enum's Name)."""
    return [(name(t.from_status), name(t.to_status), t.cause) for t in transitions]


def assert_in_time_order(
    transitions: Sequence[
        payments_pb2.AttemptTransition | payments_pb2.CaptureTransition | payments_pb2.RefundTransition
    ],
) -> None:
    times = [t.time.ToDatetime() for t in transitions]
    assert times == sorted(times)


async def test_attempt_capture_and_refund_changes_are_recorded_with_cause_and_shown(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    # A charge whose answer is lost (UNKNOWN), resolved by the janitor's lookup.
    fake_stripe.inject(Fault.lost_response())
    payment_id, outcome = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    assert outcome is Outcome.UNKNOWN
    rig.clock.advance(301)
    assert (await rig.janitor().run_once()).attempts == {Outcome.REQUIRES_CAPTURE: 1}
    capture_id = await rig.capture(payment_id)
    assert await execute_capture(rig.executor, rig.tenant_id, payment_id, capture_id) is Outcome.SUCCEEDED
    refused = await rig.refund(payment_id, 300)
    fake_stripe.inject(FakeStripe.error(400, "invalid_request_error", code="charge_disputed", message="no"))
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, refused) is Outcome.FAILED
    refunded = await rig.refund(payment_id, 200)
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, refunded) is Outcome.SUCCEEDED

    payment = await rig.payment(payment_id)
    (attempt,) = payment.attempts
    assert history(attempt.transitions, A.Name) == [
        ("ATTEMPT_STATUS_UNSPECIFIED", "ATTEMPT_STATUS_PENDING", "created"),
        ("ATTEMPT_STATUS_PENDING", "ATTEMPT_STATUS_UNKNOWN", "ambiguous"),
        ("ATTEMPT_STATUS_UNKNOWN", "ATTEMPT_STATUS_SUCCEEDED", "resolved_succeeded"),
    ]
    assert attempt.transitions[0].detail == "processor stripe"
    assert attempt.transitions[1].detail  # the lost answer's explanation
    (capture,) = payment.captures
    assert history(capture.transitions, C.Name) == [
        ("CAPTURE_STATUS_UNSPECIFIED", "CAPTURE_STATUS_PENDING", "created"),
        ("CAPTURE_STATUS_PENDING", "CAPTURE_STATUS_PROCESSING", "started"),
        ("CAPTURE_STATUS_PROCESSING", "CAPTURE_STATUS_SUCCEEDED", "succeeded"),
    ]
    first, second = payment.refunds
    assert history(first.transitions, R.Name) == [
        ("REFUND_STATUS_UNSPECIFIED", "REFUND_STATUS_PENDING", "created"),
        ("REFUND_STATUS_PENDING", "REFUND_STATUS_PROCESSING", "started"),
        ("REFUND_STATUS_PROCESSING", "REFUND_STATUS_FAILED", "failed"),
    ]
    assert "charge_disputed" in first.transitions[-1].detail
    assert history(second.transitions, R.Name) == [
        ("REFUND_STATUS_UNSPECIFIED", "REFUND_STATUS_PENDING", "created"),
        ("REFUND_STATUS_PENDING", "REFUND_STATUS_PROCESSING", "started"),
        ("REFUND_STATUS_PROCESSING", "REFUND_STATUS_SUCCEEDED", "succeeded"),
    ]
    for transitions in (attempt.transitions, capture.transitions, first.transitions, second.transitions):
        assert_in_time_order(transitions)
        assert transitions[-1].to_status  # the last one is the current status
    assert attempt.transitions[-1].to_status == attempt.status
    assert capture.transitions[-1].to_status == capture.status
    assert first.transitions[-1].to_status == first.status
    # Attempt rows name their attempt; capture and refund rows their own id.
    rows = await rig.pool.fetch(
        "SELECT kind, attempt_no, operation_id FROM payment_operation_transitions WHERE payment_id = $1",
        payment_id,
    )
    assert {(r["kind"], r["attempt_no"], r["operation_id"]) for r in rows} == {
        ("attempt", 1, None),
        ("capture", 0, capture_id),
        ("refund", 0, refused),
        ("refund", 0, refunded),
    }


async def test_accept_answers_carry_the_creation_and_the_history_is_append_only(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge()
    request = payments_pb2.RefundPaymentRequest(request_id="history-refund", payment_id=str(payment_id))
    answer = await store.refund_payment(rig.pool, rig.tenant_id, request, payment_id)
    assert isinstance(answer, payments_pb2.RefundPaymentResponse)
    assert history(answer.refund.transitions, R.Name) == [
        ("REFUND_STATUS_UNSPECIFIED", "REFUND_STATUS_PENDING", "created")
    ]
    stored = (await rig.payment(payment_id)).refunds[0]
    assert stored.transitions[0].time == answer.refund.transitions[0].time
    for sql in (
        "UPDATE payment_operation_transitions SET cause = 'forged'",
        "DELETE FROM payment_operation_transitions",
        "TRUNCATE payment_operation_transitions",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await rig.pool.execute(sql)


async def test_get_payment_over_grpc_shows_operation_history(
    gateway: Gateway, rig: Rig, tenant: TenantCredentials, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = payments_pb2_grpc.PaymentServiceStub(channel)
        got = await stub.GetPayment(
            payments_pb2.GetPaymentRequest(payment_id=str(payment_id)), metadata=tenant.metadata
        )
    (attempt,) = got.payment.attempts
    assert history(attempt.transitions, A.Name) == [
        ("ATTEMPT_STATUS_UNSPECIFIED", "ATTEMPT_STATUS_PENDING", "created"),
        ("ATTEMPT_STATUS_PENDING", "ATTEMPT_STATUS_SUCCEEDED", "succeeded"),
    ]
    assert uuid.UUID(got.payment.payment_id) == payment_id
