"""The payment sweeper (payments/sweeper.py): a PaymentCommand lost by the broker is published again once
its operation stays unfinished past the deadline, and the idempotent payment worker absorbs the copies.

"Lost" is made exactly as a broker losing an acknowledged message looks from PostgreSQL: the command's
outbox row is marked published, but nothing was ever published.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg

from gateway.relay import OutboxRelay
from payments.execution import Outcome, execute_cancel, execute_charge
from payments.sweeper import PaymentSweep, sweep_unfinished_payment_commands
from payments.worker import PaymentWorker
from switchboard.fakes.adyen import FakeAdyen
from switchboard.fakes.http import Fault
from switchboard.fakes.stripe import FakeStripe
from switchboard.payments.v1 import events_pb2, payments_pb2
from switchboard.settings import Settings
from tenants.sealing import MasterKeyRing
from tests.helpers import wait_for
from tests.test_payment_worker import (
    Rig,
    attempt_states,
    fake_adyen,
    fake_stripe,
    make_rig,
    rig,
    status_name,
    use_adyen,
    use_stripe,
)

__all__ = ["fake_adyen", "fake_stripe", "rig"]  # fixtures shared with test_payment_worker

AFTER_S = 120.0
Kind = events_pb2.PaymentCommandKind


async def lose_every_command(pool: asyncpg.Pool) -> int:
    """What a broker that lost acknowledged messages leaves behind: the commands' outbox rows are
    marked published, yet no consumer will ever see them. Returns how many rows."""
    result = await pool.execute(
        """UPDATE outbox SET published_at = now()
            WHERE topic LIKE '%payments.commands' AND published_at IS NULL"""
    )
    return int(result.split()[-1])


async def pending_commands(pool: asyncpg.Pool) -> list[events_pb2.PaymentCommand]:
    """The PaymentCommands waiting in the outbox (unpublished), oldest first."""
    rows = await pool.fetch(
        """SELECT payload FROM outbox
            WHERE topic LIKE '%payments.commands' AND published_at IS NULL ORDER BY id"""
    )
    return [events_pb2.PaymentCommand.FromString(r["payload"]) for r in rows]


async def sweep(rig: Rig, *, after: float) -> PaymentSweep:
    """One sweep as if ``after`` seconds had passed since now (deadline ``AFTER_S``)."""
    return await sweep_unfinished_payment_commands(
        rig.pool,
        after_s=AFTER_S,
        topic_prefix=rig.settings.kafka_topic_prefix,
        now=datetime.now(UTC) + timedelta(seconds=after),
    )


async def test_lost_commands_of_every_kind_are_swept_after_the_deadline_and_executed_once(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    worker = PaymentWorker(rig.executor, rig.settings)
    # Payments ready for a capture, a refund and a cancel (their own commands consumed normally).
    to_capture, _ = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    to_cancel, _ = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    to_refund, _ = await rig.charge(amount_minor=2000)
    await lose_every_command(rig.pool)  # already executed: the lost copies do not matter
    # Now one command of each kind is lost by the broker.
    to_charge = await rig.create(amount_minor=777)
    capture_id = await rig.capture(to_capture)
    refund_id = await rig.refund(to_refund, 500)
    await rig.cancel(to_cancel)
    assert await lose_every_command(rig.pool) == 4
    charges_before = len(fake_stripe.charges)

    # Before the deadline nothing is swept (the operations may simply be queued at a slow worker).
    assert await sweep(rig, after=AFTER_S - 5) == PaymentSweep()
    assert await pending_commands(rig.pool) == []
    # After it, each lost operation gets its command again, exactly once.
    assert await sweep(rig, after=AFTER_S + 1) == PaymentSweep(creates=1, captures=1, refunds=1, cancels=1)
    commands = await pending_commands(rig.pool)
    assert sorted((Kind.Name(c.kind), c.payment_id, c.capture_id, c.refund_id) for c in commands) == sorted(
        [
            ("PAYMENT_COMMAND_KIND_CREATE", str(to_charge), "", ""),
            ("PAYMENT_COMMAND_KIND_CAPTURE", str(to_capture), str(capture_id), ""),
            ("PAYMENT_COMMAND_KIND_REFUND", str(to_refund), "", str(refund_id)),
            ("PAYMENT_COMMAND_KIND_CANCEL", str(to_cancel), "", ""),
        ]
    )
    assert all(c.tenant_id == str(rig.tenant_id) for c in commands)
    # While those copies wait in the outbox, or right after they are published, nothing more is swept.
    assert await sweep(rig, after=AFTER_S + 1) == PaymentSweep()
    await rig.pool.execute("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
    assert await sweep(rig, after=AFTER_S - 5) == PaymentSweep()

    # The payment worker executes them: every operation finishes, each exactly once at Stripe.
    outcomes = [await worker.handle_command(c) for c in commands]
    assert Counter(outcomes) == Counter({Outcome.SUCCEEDED: 4})
    assert status_name(await rig.payment(to_charge)) == "PAYMENT_STATUS_SUCCEEDED"
    assert status_name(await rig.payment(to_capture)) == "PAYMENT_STATUS_SUCCEEDED"
    assert status_name(await rig.payment(to_cancel)) == "PAYMENT_STATUS_CANCELED"
    assert (await rig.payment(to_refund)).amount_refunded_minor == 500
    assert len(fake_stripe.charges) == charges_before + 1
    assert len(fake_stripe.refunds) == 1
    # Copies of the same commands (another sweep's, a redelivery) change nothing and call no one.
    requests = fake_stripe.requests_seen
    again = [await worker.handle_command(c) for c in commands]
    assert again == [Outcome.SKIPPED] * 4
    assert fake_stripe.requests_seen == requests
    # And finished operations are never swept, however late.
    await lose_every_command(rig.pool)
    assert await sweep(rig, after=10 * AFTER_S) == PaymentSweep()


async def test_operations_that_are_covered_elsewhere_are_not_swept(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    # A command still waiting for the relay (the broker is down): its row is unpublished.
    waiting = await rig.create()
    # A charge deferred while every breaker is open: its CREATE is due later.
    deferred = await rig.create()
    later = datetime.now(UTC) + timedelta(hours=1)
    await rig.pool.execute(
        "UPDATE outbox SET available_at = $2 WHERE payment_operation_id = $1", deferred, later
    )
    # A command published a moment ago (the worker may be about to take it).
    fresh = await rig.create()
    await rig.pool.execute(
        "UPDATE outbox SET published_at = $2 WHERE payment_operation_id = $1",
        fresh,
        datetime.now(UTC) + timedelta(seconds=AFTER_S),
    )
    # A charge started (PENDING attempt, lease): the janitor's, not the sweeper's.
    started = await rig.create()
    hold = fake_stripe.hold_execution()
    in_flight = asyncio.create_task(execute_charge(rig.executor, rig.tenant_id, started))
    await asyncio.wait_for(hold.reached.wait(), 10)
    await rig.pool.execute(
        "UPDATE outbox SET published_at = now() WHERE payment_operation_id = ANY($1::uuid[])", [started]
    )
    try:
        assert await sweep(rig, after=AFTER_S + 1) == PaymentSweep()
    finally:
        hold.release()
    assert await in_flight is Outcome.SUCCEEDED
    assert {c.payment_id for c in await pending_commands(rig.pool)} == {str(waiting), str(deferred)}


async def test_a_cancel_the_processor_accepted_for_later_is_not_swept(
    rig: Rig, fake_adyen: FakeAdyen, key_ring: MasterKeyRing
) -> None:
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen)
    payment_id, outcome = await rig.charge(
        payment_method="stored_succeed", capture_method=payments_pb2.CAPTURE_METHOD_MANUAL
    )
    assert outcome is Outcome.REQUIRES_CAPTURE
    await rig.cancel(payment_id)
    await lose_every_command(rig.pool)
    assert await sweep(rig, after=AFTER_S + 1) == PaymentSweep(cancels=1)  # lost before it was sent
    await lose_every_command(rig.pool)
    # Adyen answers a cancel "received": the outcome comes by webhook. That is not a lost command.
    assert await execute_cancel(rig.executor, rig.tenant_id, payment_id) is Outcome.PROCESSING
    assert await sweep(rig, after=10 * AFTER_S) == PaymentSweep()
    assert len(fake_adyen.modifications) == 1


async def test_duplicates_of_a_create_never_start_a_second_attempt_or_charge_twice(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    worker = PaymentWorker(rig.executor, rig.settings)
    payment_id = await rig.create()
    await lose_every_command(rig.pool)
    assert await sweep(rig, after=AFTER_S + 1) == PaymentSweep(creates=1)
    (swept,) = await pending_commands(rig.pool)

    # In flight: the original command's request is executing at Stripe when the swept copy arrives.
    hold = fake_stripe.hold_execution()
    first = asyncio.create_task(execute_charge(rig.executor, rig.tenant_id, payment_id))
    await asyncio.wait_for(hold.reached.wait(), 10)
    copy_outcome = await worker.handle_command(swept)  # the same key is "in use" at Stripe
    hold.release()
    first_outcome = await first
    assert Outcome.SUCCEEDED in (copy_outcome, first_outcome)
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_SUCCEEDED"
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_SUCCEEDED")]  # one attempt, one key
    assert {r.headers["Idempotency-Key"] for r in fake_stripe.received if r.method == "POST"} == {
        f"{payment_id}_1"
    }
    assert len(fake_stripe.charges) == 1
    # Finished: more copies are skipped without a request.
    requests = fake_stripe.requests_seen
    assert await worker.handle_command(swept) is Outcome.SKIPPED
    assert fake_stripe.requests_seen == requests


async def test_a_duplicate_create_for_an_unknown_payment_changes_nothing(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    worker = PaymentWorker(rig.executor, rig.settings)
    fake_stripe.inject(Fault.lost_response())
    payment_id, outcome = await rig.charge()
    assert outcome is Outcome.UNKNOWN
    requests = fake_stripe.requests_seen
    duplicate = events_pb2.PaymentCommand(
        kind=events_pb2.PAYMENT_COMMAND_KIND_CREATE, tenant_id=str(rig.tenant_id), payment_id=str(payment_id)
    )
    assert await worker.handle_command(duplicate) is Outcome.SKIPPED
    assert fake_stripe.requests_seen == requests
    payment = await rig.payment(payment_id)
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_UNKNOWN")]
    # An UNKNOWN payment is the janitor's: the sweeper never re-publishes its CREATE.
    await lose_every_command(rig.pool)
    assert await sweep(rig, after=10 * AFTER_S) == PaymentSweep()


async def test_the_relay_sweeps_a_command_the_broker_lost_and_the_payment_succeeds_once(
    pool: asyncpg.Pool, settings: Settings, fake_stripe: FakeStripe, key_ring: MasterKeyRing, rig: Rig
) -> None:
    """End to end through Kafka: the relay's sweeper re-publishes the lost CREATE, the worker charges."""
    quick = settings.model_copy(update={"payment_sweep_after_s": 0.5, "relay_sweep_interval_s": 0.2})
    await use_stripe(pool, key_ring, rig.tenant_id, fake_stripe)
    made = await make_rig(pool, quick, rig.tenant_id)
    payment_id = await made.create()
    await lose_every_command(pool)
    relay = OutboxRelay(pool, quick)
    worker = PaymentWorker(made.executor, quick)
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(worker.run())]
    try:

        async def succeeded() -> bool:
            status = await pool.fetchval("SELECT status FROM payments WHERE id = $1", payment_id)
            return bool(status == "succeeded")

        await wait_for(succeeded, timeout_s=60)
    finally:
        relay.stop()
        worker.stop()
        await asyncio.gather(*tasks)
        await made.processors.close()
    assert relay.swept_payment_commands >= 1
    assert len(fake_stripe.captured_charges()) == 1
    assert {r.headers["Idempotency-Key"] for r in fake_stripe.received if r.method == "POST"} == {
        f"{payment_id}_1"
    }
