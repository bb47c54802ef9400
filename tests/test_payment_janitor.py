"""The payment janitor: lookups on the 5 min / 1 h / daily schedule, resolution, failover after a
definitive "not charged", same-key retries of captures, refunds and cancels, and leases.

The janitor runs on a fake clock (no sleeps): each test moves it past the next step.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import timedelta

import asyncpg
import pytest

from payments.execution import (
    ExecutionPolicy,
    Outcome,
    execute_cancel,
    execute_capture,
    execute_charge,
    execute_refund,
    resolve_attempt,
)
from payments.janitor import JANITOR_LEASE_S, PaymentJanitor
from payments.ledger import payment_journals
from switchboard.fakes.adyen import FakeAdyen
from switchboard.fakes.http import Fault
from switchboard.fakes.stripe import FakeStripe
from switchboard.payments.v1 import payments_pb2
from switchboard.settings import Settings
from tenants.sealing import MasterKeyRing
from tests.conftest import TenantCredentials
from tests.helpers import wait_for
from tests.test_payment_worker import (
    Rig,
    assert_ledger_sound,
    attempt_states,
    causes,
    fake_adyen,
    fake_stripe,
    make_rig,
    outbox_events,
    rig,
    shared_token,
    status_name,
    use_adyen,
    use_stripe,
)

__all__ = ["fake_adyen", "fake_stripe", "rig", "shared_token"]  # fixtures shared with test_payment_worker


async def next_lookup(pool: asyncpg.Pool, payment_id: uuid.UUID) -> tuple[object, int]:
    row = await pool.fetchrow(
        """SELECT next_lookup_at, lookups FROM payment_attempts
            WHERE payment_id = $1 ORDER BY attempt_no DESC LIMIT 1""",
        payment_id,
    )
    assert row is not None
    return row["next_lookup_at"], row["lookups"]


def stripe_read_failure() -> Fault:
    """A 500 on the lookup's first read: the janitor cannot tell."""
    return FakeStripe.error(500, "api_error", message="search unavailable")


async def test_lookups_follow_the_schedule_five_minutes_one_hour_then_daily(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    fake_stripe.inject(FakeStripe.error(503, "api_error"))  # answered before anything executed
    payment_id, outcome = await rig.charge()
    assert outcome is Outcome.UNKNOWN
    assert await next_lookup(rig.pool, payment_id) == (rig.clock.now() + timedelta(seconds=300), 1)
    janitor = rig.janitor()

    for wait_s, next_wait_s in ((300, 3600), (3600, 86_400), (86_400, 86_400), (86_400, 86_400)):
        rig.clock.advance(wait_s - 1)
        assert (await janitor.run_once()).claimed == 0
        rig.clock.advance(1)
        fake_stripe.inject(stripe_read_failure())
        report = await janitor.run_once()
        assert report.attempts == Counter({Outcome.RETRY_SCHEDULED: 1})
        due, _ = await next_lookup(rig.pool, payment_id)
        assert due == rig.clock.now() + timedelta(seconds=next_wait_s)
        assert status_name(await rig.payment(payment_id)) == "PAYMENT_STATUS_UNKNOWN"

    # The processor can finally tell: it has no charge for the key. Only now is the payment FAILED.
    rig.clock.advance(86_400)
    report = await janitor.run_once()
    assert report.attempts == Counter({Outcome.FAILED: 1})
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_FAILED"
    assert payment.failure_code == "not_found_at_processor"
    assert causes(payment)[-2:] == ["attempt_unknown", "resolved_failed"]
    assert [e.event_type for e in await outbox_events(rig.pool, payment_id)] == [
        "payment.processing",
        "payment.unknown",
        "payment.failed",
    ]
    assert fake_stripe.charges == []
    assert await next_lookup(rig.pool, payment_id) == (None, 5)


async def test_a_charge_the_processor_never_got_fails_over_after_the_lookup(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    fake_stripe.inject(Fault.reset())  # the connection drops: we cannot know it was not executed
    payment_id, outcome = await rig.charge(payment_method=shared_token)
    assert outcome is Outcome.UNKNOWN
    assert fake_adyen.requests_seen == 0  # no failover while UNKNOWN
    rig.clock.advance(300)
    report = await rig.janitor().run_once()
    assert report.attempts == Counter({Outcome.SUCCEEDED: 1})
    payment = await rig.payment(payment_id)
    assert attempt_states(payment) == [
        ("stripe", "ATTEMPT_STATUS_FAILED"),
        ("adyen", "ATTEMPT_STATUS_SUCCEEDED"),
    ]
    assert causes(payment) == [
        "created",
        "attempt_started",
        "attempt_unknown",
        "resolved_failed",
        "failover_attempt_started",
        "attempt_succeeded",
    ]
    assert fake_stripe.charges == []
    assert len(fake_adyen.charges) == 1
    assert [e.event_type for e in await outbox_events(rig.pool, payment_id)] == [
        "payment.processing",
        "payment.unknown",
        "payment.processing",  # the failover attempt, after the lookup found nothing
        "payment.succeeded",
    ]
    await assert_ledger_sound(rig.pool, rig.tenant_id)


async def test_the_attempt_of_a_worker_that_died_mid_call_is_resolved_after_its_lease(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id = await rig.create()
    hold = fake_stripe.hold_execution()
    worker = asyncio.create_task(execute_charge(rig.executor, rig.tenant_id, payment_id))
    await asyncio.wait_for(hold.reached.wait(), 10)
    worker.cancel()  # killed; its command is not redelivered (say the offset was lost with the broker)
    with pytest.raises(asyncio.CancelledError):
        await worker
    hold.release()
    await fake_stripe.wait_for(lambda: len(fake_stripe.charges) == 1)

    rig.clock.advance(59)  # the lease (60 s) covers the call that may still be running
    assert (await rig.janitor().run_once()).claimed == 0
    rig.clock.advance(1)
    assert (await rig.janitor().run_once()).attempts == Counter({Outcome.SUCCEEDED: 1})
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_SUCCEEDED"
    assert causes(payment) == ["created", "attempt_started", "attempt_succeeded"]
    assert len(fake_stripe.captured_charges()) == 1
    assert len(await payment_journals(rig.pool, rig.tenant_id, payment_id)) == 1


async def test_adyen_lookup_replays_the_request_and_charges_once(
    rig: Rig, fake_adyen: FakeAdyen, key_ring: MasterKeyRing
) -> None:
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen)
    fake_adyen.inject(Fault.lost_response())
    payment_id, outcome = await rig.charge(payment_method="stored_succeed")
    assert outcome is Outcome.UNKNOWN
    rig.clock.advance(300)
    assert (await rig.janitor().run_once()).attempts == Counter({Outcome.SUCCEEDED: 1})
    assert len(fake_adyen.charges) == 1
    assert fake_adyen.replays == 1
    assert status_name(await rig.payment(payment_id)) == "PAYMENT_STATUS_SUCCEEDED"


async def test_a_lost_refund_answer_is_retried_with_the_same_key_and_refunds_once(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge()
    refund_id = await rig.refund(payment_id, 400)
    fake_stripe.inject(Fault.lost_response())
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, refund_id) is Outcome.UNKNOWN
    payment = await rig.payment(payment_id)
    assert [payments_pb2.RefundStatus.Name(r.status) for r in payment.refunds] == ["REFUND_STATUS_UNKNOWN"]
    assert payment.amount_refunded_minor == 0
    assert len(fake_stripe.refunds) == 1  # it happened; we just do not know yet
    # A redelivered command does not send it again: the UNKNOWN refund is the janitor's.
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, refund_id) is Outcome.SKIPPED

    rig.clock.advance(300)
    assert (await rig.janitor().run_once()).refunds == Counter({Outcome.SUCCEEDED: 1})
    assert fake_stripe.replays == [str(refund_id)]
    assert len(fake_stripe.refunds) == 1
    payment = await rig.payment(payment_id)
    assert payment.amount_refunded_minor == 400
    assert [payments_pb2.RefundStatus.Name(r.status) for r in payment.refunds] == ["REFUND_STATUS_SUCCEEDED"]
    assert payment.refunds[0].failure_code == ""
    refunded = [e for e in await outbox_events(rig.pool, payment_id) if e.event_type == "payment.refunded"]
    assert len(refunded) == 1
    await assert_ledger_sound(rig.pool, rig.tenant_id)


async def test_a_capture_that_failed_ambiguously_is_sent_again_and_captures_once(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    capture_id = await rig.capture(payment_id)
    fake_stripe.inject(FakeStripe.error(502, "api_error"))
    assert await execute_capture(rig.executor, rig.tenant_id, payment_id, capture_id) is Outcome.UNKNOWN
    assert status_name(await rig.payment(payment_id)) == "PAYMENT_STATUS_REQUIRES_CAPTURE"
    rig.clock.advance(300)
    assert (await rig.janitor().run_once()).captures == Counter({Outcome.SUCCEEDED: 1})
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_SUCCEEDED"
    assert payment.amount_captured_minor == 1050
    assert [e.event_type for e in await outbox_events(rig.pool, payment_id)] == [
        "payment.processing",
        "payment.requires_capture",
        "payment.captured",
    ]
    assert len(await payment_journals(rig.pool, rig.tenant_id, payment_id)) == 1


async def test_a_lost_cancel_answer_is_sent_again(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    await rig.cancel(payment_id)
    fake_stripe.inject(Fault.lost_response())
    assert await execute_cancel(rig.executor, rig.tenant_id, payment_id) is Outcome.UNKNOWN
    assert status_name(await rig.payment(payment_id)) == "PAYMENT_STATUS_REQUIRES_CAPTURE"
    rig.clock.advance(300)
    assert (await rig.janitor().run_once()).cancels == Counter({Outcome.SUCCEEDED: 1})
    assert status_name(await rig.payment(payment_id)) == "PAYMENT_STATUS_CANCELED"
    (replayed,) = fake_stripe.replays
    assert replayed.startswith(f"{payment_id}_cancel_")


async def test_a_refund_past_the_replay_window_is_left_to_an_operator(
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: TenantCredentials,
    fake_stripe: FakeStripe,
    key_ring: MasterKeyRing,
) -> None:
    made = await make_rig(pool, settings, tenant.tenant_id, policy=ExecutionPolicy(replay_window_s=1000))
    try:
        await use_stripe(pool, key_ring, tenant.tenant_id, fake_stripe)
        payment_id, _ = await made.charge()
        refund_id = await made.refund(payment_id)
        fake_stripe.inject(FakeStripe.error(500, "api_error"))
        assert await execute_refund(made.executor, tenant.tenant_id, payment_id, refund_id) is Outcome.UNKNOWN
        made.clock.advance(300)
        fake_stripe.inject(FakeStripe.error(500, "api_error"))
        assert (await made.janitor().run_once()).refunds == Counter({Outcome.UNKNOWN: 1})
        seen = fake_stripe.requests_seen
        made.clock.advance(3600)  # past the window: a key the processor may have forgotten is never reused
        assert (await made.janitor().run_once()).refunds == Counter({Outcome.NEEDS_OPERATOR: 1})
        assert fake_stripe.requests_seen == seen
        assert (
            await pool.fetchval("SELECT next_lookup_at FROM payment_refunds WHERE id = $1", refund_id) is None
        )
        payment = await made.payment(payment_id)
        assert [payments_pb2.RefundStatus.Name(r.status) for r in payment.refunds] == [
            "REFUND_STATUS_UNKNOWN"
        ]
        made.clock.advance(86_400)
        assert (await made.janitor().run_once()).claimed == 0
    finally:
        await made.processors.close()


async def test_two_janitors_never_look_up_the_same_attempt(
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: TenantCredentials,
    fake_stripe: FakeStripe,
    key_ring: MasterKeyRing,
) -> None:
    # Twelve lost answers in a row would open the breaker (a processor fault each): not this test's point.
    rig = await make_rig(pool, settings, tenant.tenant_id, failure_threshold=100)
    try:
        await use_stripe(pool, key_ring, tenant.tenant_id, fake_stripe)
        for _ in range(12):
            fake_stripe.inject(Fault.lost_response())
            _, outcome = await rig.charge()
            assert outcome is Outcome.UNKNOWN
        rig.clock.advance(300)
        one, two = PaymentJanitor(rig.executor, batch_size=7), PaymentJanitor(rig.executor, batch_size=7)
        reports = await asyncio.gather(one.run_once(), two.run_once(), one.run_once())
        assert sum(r.attempts[Outcome.SUCCEEDED] for r in reports) == 12
        assert sum(r.claimed for r in reports) == 12
        assert len(fake_stripe.captured_charges()) == 12
        searches = [r for r in fake_stripe.received if r.path == "/v1/payment_intents/search"]
        assert len(searches) == 12  # each attempt looked up once
        await assert_ledger_sound(pool, tenant.tenant_id)
    finally:
        await rig.processors.close()


async def test_a_stale_claim_is_dropped_without_calling_the_processor(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    fake_stripe.inject(FakeStripe.error(500, "api_error"))
    payment_id, _ = await rig.charge()
    seen = fake_stripe.requests_seen
    wrong_lease = rig.clock.now() + timedelta(seconds=JANITOR_LEASE_S)
    assert await resolve_attempt(rig.executor, rig.tenant_id, payment_id, 1, wrong_lease) is Outcome.SKIPPED
    assert fake_stripe.requests_seen == seen
    assert status_name(await rig.payment(payment_id)) == "PAYMENT_STATUS_UNKNOWN"


async def test_a_processing_charge_is_looked_up_until_it_settles(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, outcome = await rig.charge(payment_method="pm_fake_processing")
    assert outcome is Outcome.PROCESSING
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_PROCESSING"
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_PENDING")]
    rig.clock.advance(300)
    assert (await rig.janitor().run_once()).attempts == Counter({Outcome.RETRY_SCHEDULED: 1})
    fake_stripe.finish_processing(payment.processor_reference)
    rig.clock.advance(3600)
    assert (await rig.janitor().run_once()).attempts == Counter({Outcome.SUCCEEDED: 1})
    assert status_name(await rig.payment(payment_id)) == "PAYMENT_STATUS_SUCCEEDED"
    assert len(fake_stripe.captured_charges()) == 1


async def test_the_janitor_runs_rounds_until_stopped(rig: Rig) -> None:
    janitor = PaymentJanitor(rig.executor, interval_s=0.01)
    task = asyncio.create_task(janitor.run())

    async def two_rounds() -> bool:
        return janitor.rounds >= 2

    await wait_for(two_rounds, timeout_s=10)
    janitor.stop()
    await asyncio.wait_for(task, 10)
    assert janitor.rounds >= 2
