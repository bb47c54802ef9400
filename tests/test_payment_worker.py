"""Payment execution and the payment worker: charges, failover, captures, cancels, refunds, the
money invariants, and the end-to-end path gateway -> relay -> Kafka -> worker -> FakeStripe.

Processors are the real connectors (payments/stripe.py, payments/adyen.py) built by the real
processor cache from sealed configurations, talking HTTP to FakeStripe / FakeAdyen.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from aiokafka import AIOKafkaConsumer

from channels.catalog import payment_events_topic
from gateway.relay import OutboxRelay
from gateway.server import Gateway
from payments import store
from payments.execution import (
    ExecutionPolicy,
    Executor,
    Outcome,
    execute_cancel,
    execute_capture,
    execute_charge,
    execute_refund,
)
from payments.janitor import PaymentJanitor
from payments.ledger import account_balances, payment_journals
from payments.ledger_verify import verify_chain
from payments.routing import CircuitBreakers
from payments.validation import validate_create_request
from payments.worker import PaymentWorker
from switchboard.fakes.adyen import MAGIC_METHODS, FakeAdyen
from switchboard.fakes.adyen import Outcome as AdyenOutcome
from switchboard.fakes.http import Fault
from switchboard.fakes.stripe import FakeStripe
from switchboard.payments.v1 import events_pb2, payments_pb2, payments_pb2_grpc
from switchboard.settings import Settings
from tenants.processor_cache import ProcessorCache, processor_cache_for
from tenants.sealing import MasterKeyRing
from tests.conftest import TenantCredentials
from tests.helpers import wait_for
from tests.test_payment_service import create_request
from tests.test_processor_config import (
    ADYEN_KEY,
    ADYEN_MERCHANT,
    STRIPE_KEY,
    adyen_config,
    store_config,
    stripe_config,
)
from tests.test_tenant_providers import gateway_env

OTHER_STRIPE_KEY = "sk_test_51NzOtherAccount0123456789abcdefABCDEFwrongKey"
#: A payment-method token both fakes accept (stands for a network token in real life).
SHARED_TOKEN = "pm_card_visa"


# --- support (also used by test_payment_janitor.py and test_payment_routing.py) ---------------------


class FakeClock:
    """Wall time (``now``) and monotonic time (``monotonic``) that only move when told to."""

    def __init__(self) -> None:
        self._wall = datetime.now(UTC)
        self._mono = 1_000.0

    def now(self) -> datetime:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += timedelta(seconds=seconds)
        self._mono += seconds


@dataclass
class RecordingSleep:
    """Stands in for asyncio.sleep between retries: records the waits, returns at once."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@dataclass
class Rig:
    """An executor over the test database, the real processor cache and a fake clock."""

    pool: asyncpg.Pool
    settings: Settings
    tenant_id: uuid.UUID
    clock: FakeClock
    sleep: RecordingSleep
    processors: ProcessorCache
    breakers: CircuitBreakers
    executor: Executor

    async def create(self, **overrides: Any) -> uuid.UUID:
        """Accept a payment like CreatePayment does (one transaction, CREATE command in the outbox)."""
        request = create_request(**overrides)
        plan = validate_create_request(request)
        response = await store.create_payment(
            self.pool, self.tenant_id, request, plan, topic_prefix=self.settings.kafka_topic_prefix
        )
        assert isinstance(response, payments_pb2.CreatePaymentResponse)
        return uuid.UUID(response.payment.payment_id)

    async def charge(self, **overrides: Any) -> tuple[uuid.UUID, Outcome]:
        payment_id = await self.create(**overrides)
        return payment_id, await execute_charge(self.executor, self.tenant_id, payment_id)

    async def payment(self, payment_id: uuid.UUID) -> payments_pb2.Payment:
        found = await store.get_payment(self.pool, self.tenant_id, payment_id)
        assert found is not None
        return found

    async def capture(self, payment_id: uuid.UUID, amount_minor: int = 0) -> uuid.UUID:
        request = payments_pb2.CapturePaymentRequest(
            request_id=str(uuid.uuid4()), payment_id=str(payment_id), amount_minor=amount_minor
        )
        response = await store.capture_payment(
            self.pool, self.tenant_id, request, payment_id, topic_prefix=self.settings.kafka_topic_prefix
        )
        assert isinstance(response, payments_pb2.CapturePaymentResponse), response
        return uuid.UUID(response.capture.capture_id)

    async def refund(self, payment_id: uuid.UUID, amount_minor: int = 0) -> uuid.UUID:
        request = payments_pb2.RefundPaymentRequest(
            request_id=str(uuid.uuid4()), payment_id=str(payment_id), amount_minor=amount_minor
        )
        response = await store.refund_payment(
            self.pool, self.tenant_id, request, payment_id, topic_prefix=self.settings.kafka_topic_prefix
        )
        assert isinstance(response, payments_pb2.RefundPaymentResponse), response
        return uuid.UUID(response.refund.refund_id)

    async def cancel(self, payment_id: uuid.UUID) -> None:
        request = payments_pb2.CancelPaymentRequest(request_id=str(uuid.uuid4()), payment_id=str(payment_id))
        response = await store.cancel_payment(
            self.pool, self.tenant_id, request, payment_id, topic_prefix=self.settings.kafka_topic_prefix
        )
        assert isinstance(response, payments_pb2.CancelPaymentResponse), response

    def janitor(self) -> PaymentJanitor:
        return PaymentJanitor(self.executor, interval_s=1.0, batch_size=100)


async def make_rig(
    pool: asyncpg.Pool,
    settings: Settings,
    tenant_id: uuid.UUID,
    *,
    failure_threshold: int = 5,
    cool_down_s: float = 30.0,
    policy: ExecutionPolicy | None = None,
) -> Rig:
    clock = FakeClock()
    sleep = RecordingSleep()
    ring = MasterKeyRing.parse(settings.master_key.get_secret_value() if settings.master_key else None)
    processors = processor_cache_for(pool, settings, ring)
    breakers = CircuitBreakers(failure_threshold, cool_down_s, clock=clock.monotonic)
    executor = Executor(
        pool=pool,
        processors=processors,
        breakers=breakers,
        policy=policy or ExecutionPolicy(),
        topic_prefix=settings.kafka_topic_prefix,
        clock=clock.now,
        sleep=sleep,
    )
    return Rig(pool, settings, tenant_id, clock, sleep, processors, breakers, executor)


async def use_stripe(
    pool: asyncpg.Pool, key_ring: MasterKeyRing, tenant_id: uuid.UUID, fake: FakeStripe, **options: Any
) -> None:
    await store_config(pool, key_ring, tenant_id, stripe_config(base_url=fake.base_url, **options))


async def use_adyen(
    pool: asyncpg.Pool, key_ring: MasterKeyRing, tenant_id: uuid.UUID, fake: FakeAdyen, **options: Any
) -> None:
    await store_config(pool, key_ring, tenant_id, adyen_config(base_url=fake.checkout_url, **options))


async def outbox_events(
    pool: asyncpg.Pool, payment_id: uuid.UUID | None = None
) -> list[events_pb2.PaymentEvent]:
    """Every PaymentEvent written to the outbox (oldest first), optionally of one payment."""
    rows = await pool.fetch("SELECT payload FROM outbox WHERE topic LIKE '%payments.events' ORDER BY id")
    events = [events_pb2.PaymentEvent.FromString(r["payload"]) for r in rows]
    return [e for e in events if payment_id is None or e.payment_id == str(payment_id)]


async def outbox_commands(
    pool: asyncpg.Pool, payment_id: uuid.UUID
) -> list[tuple[events_pb2.PaymentCommand, Any]]:
    rows = await pool.fetch(
        "SELECT payload, available_at FROM outbox WHERE topic LIKE '%payments.commands' ORDER BY id"
    )
    commands = [(events_pb2.PaymentCommand.FromString(r["payload"]), r["available_at"]) for r in rows]
    return [(c, at) for c, at in commands if c.payment_id == str(payment_id)]


def attempt_states(payment: payments_pb2.Payment) -> list[tuple[str, str]]:
    return [(a.processor, payments_pb2.AttemptStatus.Name(a.status)) for a in payment.attempts]


def causes(payment: payments_pb2.Payment) -> list[str]:
    return [t.cause for t in payment.transitions]


def status_name(payment: payments_pb2.Payment) -> str:
    return payments_pb2.PaymentStatus.Name(payment.status)


async def assert_ledger_sound(pool: asyncpg.Pool, tenant_id: uuid.UUID) -> None:
    """Every journal balances per currency and the tenant's hash chain verifies."""
    unbalanced = await pool.fetch(
        """SELECT journal_id, currency, sum(amount_minor) AS total FROM ledger_postings
            WHERE tenant_id = $1 GROUP BY journal_id, currency HAVING sum(amount_minor) <> 0""",
        tenant_id,
    )
    assert unbalanced == []
    result = await verify_chain(pool, tenant_id)
    assert result.ok, result


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    server = FakeStripe(STRIPE_KEY)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def fake_adyen() -> AsyncIterator[FakeAdyen]:
    server = FakeAdyen(ADYEN_KEY, ADYEN_MERCHANT)
    await server.start()
    yield server
    server.release()
    await server.stop()


@pytest.fixture
def shared_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make FakeAdyen accept the Stripe test token too, so a failover can charge it."""
    monkeypatch.setitem(MAGIC_METHODS, SHARED_TOKEN, AdyenOutcome("Authorised"))
    return SHARED_TOKEN


@pytest.fixture
async def rig(pool: asyncpg.Pool, settings: Settings, tenant: TenantCredentials) -> AsyncIterator[Rig]:
    made = await make_rig(pool, settings, tenant.tenant_id)
    yield made
    await made.processors.close()


# --- charges --------------------------------------------------------------------------------------


async def test_automatic_charge_succeeds_with_capture_journal_and_event(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, outcome = await rig.charge()
    assert outcome is Outcome.SUCCEEDED
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_SUCCEEDED"
    assert payment.amount_captured_minor == 1050
    assert payment.processor == "stripe"
    assert payment.processor_reference.startswith("pi_")
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_SUCCEEDED")]
    assert causes(payment) == ["created", "attempt_started", "attempt_succeeded"]
    # The processor got the attempt's key, and charged once.
    assert [r.headers["Idempotency-Key"] for r in fake_stripe.received if r.method == "POST"] == [
        f"{payment_id}_1"
    ]
    assert len(fake_stripe.captured_charges()) == 1
    (journal,) = await payment_journals(rig.pool, rig.tenant_id, payment_id)
    assert journal.idempotency_key == f"capture:{payment_id}"
    assert journal.reference == payment.processor_reference
    assert {(p.account, p.amount_minor) for p in journal.postings} == {
        ("customer_receivable", 1050),
        ("merchant_balance", -1050),
        ("processor_clearing:stripe", 1050),
        ("customer_receivable", -1050),
    }
    started, event = await outbox_events(rig.pool, payment_id)
    assert (started.event_type, started.attempt_no, started.processor) == ("payment.processing", 1, "stripe")
    assert started.status == payments_pb2.PAYMENT_STATUS_PROCESSING
    assert started.previous_status == payments_pb2.PAYMENT_STATUS_REQUIRES_PROCESSING
    assert event.event_type == "payment.succeeded"
    assert event.status == payments_pb2.PAYMENT_STATUS_SUCCEEDED
    assert event.previous_status == payments_pb2.PAYMENT_STATUS_PROCESSING
    assert event.tenant_id == str(rig.tenant_id)
    assert event.amount_captured_minor == 1050
    assert event.attempt_no == 1
    assert event.customer.email == "ada@example.com"
    # A redelivered command finds the payment past its step: nothing is sent or written.
    assert await execute_charge(rig.executor, rig.tenant_id, payment_id) is Outcome.SKIPPED
    assert len([r for r in fake_stripe.received if r.method == "POST"]) == 1
    assert len(await outbox_events(rig.pool, payment_id)) == 2
    await assert_ledger_sound(rig.pool, rig.tenant_id)


async def test_decline_fails_the_payment_without_failover(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    payment_id, outcome = await rig.charge(payment_method="pm_card_chargeDeclinedInsufficientFunds")
    assert outcome is Outcome.FAILED
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_FAILED"
    assert payment.failure_code == "insufficient_funds"
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_FAILED")]
    assert fake_adyen.requests_seen == 0  # the customer's bank said no: another processor would ask it again
    _, event = await outbox_events(rig.pool, payment_id)
    assert event.event_type == "payment.failed"
    assert event.failure_code == "insufficient_funds"
    assert await payment_journals(rig.pool, rig.tenant_id, payment_id) == []
    assert rig.breakers.breaker(rig.tenant_id, "stripe").consecutive_failures == 0  # a decline is an answer


async def test_permanent_error_fails_over_to_the_next_processor_which_charges_once(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    # Stripe is configured with a key the account does not know: 401, nothing charged.
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, key=OTHER_STRIPE_KEY, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    payment_id, outcome = await rig.charge(payment_method=shared_token)
    assert outcome is Outcome.SUCCEEDED
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_SUCCEEDED"
    assert attempt_states(payment) == [
        ("stripe", "ATTEMPT_STATUS_FAILED"),
        ("adyen", "ATTEMPT_STATUS_SUCCEEDED"),
    ]
    assert payment.attempts[0].failure_code == "invalid_request_error"
    assert "HTTP 401" in payment.attempts[0].failure_message
    assert OTHER_STRIPE_KEY not in payment.attempts[0].failure_message  # the connector scrubs the key
    assert payment.attempts[1].idempotency_key == f"{payment_id}_2"
    assert causes(payment) == [
        "created",
        "attempt_started",
        "attempt_failed",
        "failover_attempt_started",
        "attempt_succeeded",
    ]
    assert fake_stripe.charges == []
    assert len(fake_adyen.charges) == 1
    assert fake_adyen.received[0].headers["Idempotency-Key"] == f"{payment_id}_2"
    # No payment.failed: the failover followed in the same transaction; its attempt is announced.
    events = await outbox_events(rig.pool, payment_id)
    assert [(e.event_type, e.attempt_no) for e in events] == [
        ("payment.processing", 1),
        ("payment.processing", 2),
        ("payment.succeeded", 2),
    ]
    assert events[1].previous_status == payments_pb2.PAYMENT_STATUS_FAILED
    assert events[1].processor == "adyen"
    (journal,) = await payment_journals(rig.pool, rig.tenant_id, payment_id)
    assert "processor_clearing:adyen" in {p.account for p in journal.postings}
    assert rig.breakers.breaker(rig.tenant_id, "stripe").consecutive_failures == 1


async def test_lost_response_never_charges_twice_across_redelivery_and_the_janitor(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    fake_stripe.inject(Fault.lost_response())  # Stripe charges, the answer never arrives
    payment_id, outcome = await rig.charge(payment_method=shared_token)
    assert outcome is Outcome.UNKNOWN
    assert len(fake_stripe.captured_charges()) == 1
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_UNKNOWN"
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_UNKNOWN")]
    assert [e.event_type for e in await outbox_events(rig.pool, payment_id)] == [
        "payment.processing",
        "payment.unknown",
    ]
    lookup_at = await rig.pool.fetchval(
        "SELECT next_lookup_at FROM payment_attempts WHERE payment_id = $1", payment_id
    )
    assert lookup_at == rig.clock.now() + timedelta(seconds=300)

    # Redelivered command: nothing may happen to an UNKNOWN payment (no resend, no new attempt, no failover).
    assert await execute_charge(rig.executor, rig.tenant_id, payment_id) is Outcome.SKIPPED
    assert fake_adyen.requests_seen == 0
    assert len([r for r in fake_stripe.received if r.method == "POST"]) == 1
    # Nor does the janitor before the first schedule step.
    rig.clock.advance(299)
    assert (await rig.janitor().run_once()).claimed == 0

    rig.clock.advance(2)
    report = await rig.janitor().run_once()
    assert report.attempts == Counter({Outcome.SUCCEEDED: 1})
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_SUCCEEDED"
    assert causes(payment)[-2:] == ["attempt_unknown", "resolved_succeeded"]
    assert len(fake_stripe.captured_charges()) == 1
    assert fake_adyen.requests_seen == 0
    assert [e.event_type for e in await outbox_events(rig.pool, payment_id)] == [
        "payment.processing",
        "payment.unknown",
        "payment.succeeded",
    ]
    assert len(await payment_journals(rig.pool, rig.tenant_id, payment_id)) == 1
    # And another command or janitor round changes nothing.
    assert await execute_charge(rig.executor, rig.tenant_id, payment_id) is Outcome.SKIPPED
    rig.clock.advance(86_400)
    assert (await rig.janitor().run_once()).claimed == 0
    assert len(fake_stripe.captured_charges()) == 1


async def test_a_worker_dying_mid_call_and_its_redelivered_command_charge_once(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id = await rig.create()
    hold = fake_stripe.hold_execution()
    first = asyncio.create_task(execute_charge(rig.executor, rig.tenant_id, payment_id))
    await asyncio.wait_for(hold.reached.wait(), 10)
    first.cancel()  # the worker dies with the request at Stripe: the attempt row stays PENDING
    with pytest.raises(asyncio.CancelledError):
        await first
    hold.release()
    await fake_stripe.wait_for(lambda: len(fake_stripe.charges) == 1)
    payment = await rig.payment(payment_id)
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_PENDING")]

    # The command is redelivered: the attempt is sent again with the SAME key and Stripe replays it.
    assert await execute_charge(rig.executor, rig.tenant_id, payment_id) is Outcome.SUCCEEDED
    assert fake_stripe.replays == [f"{payment_id}_1"]
    assert len(fake_stripe.captured_charges()) == 1
    payment = await rig.payment(payment_id)
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_SUCCEEDED")]
    sends = await rig.pool.fetchval("SELECT sends FROM payment_attempts WHERE payment_id = $1", payment_id)
    assert sends == 2


async def test_the_same_command_executed_twice_at_once_charges_once(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id = await rig.create()
    outcomes = await asyncio.gather(
        execute_charge(rig.executor, rig.tenant_id, payment_id),
        execute_charge(rig.executor, rig.tenant_id, payment_id),
    )
    assert Outcome.SUCCEEDED in outcomes
    assert len(fake_stripe.captured_charges()) == 1
    payment = await rig.payment(payment_id)
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_SUCCEEDED")]
    assert len(await payment_journals(rig.pool, rig.tenant_id, payment_id)) == 1


async def test_ambiguous_answer_means_unknown_and_no_failover(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    fake_stripe.inject(FakeStripe.error(500, "api_error", message="boom"))
    payment_id, outcome = await rig.charge(payment_method=shared_token)
    assert outcome is Outcome.UNKNOWN
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_UNKNOWN"
    assert attempt_states(payment) == [("stripe", "ATTEMPT_STATUS_UNKNOWN")]
    assert fake_adyen.requests_seen == 0
    for _ in range(3):  # however often the command comes back
        assert await execute_charge(rig.executor, rig.tenant_id, payment_id) is Outcome.SKIPPED
    assert fake_adyen.requests_seen == 0
    assert len((await rig.payment(payment_id)).attempts) == 1


async def test_retryable_error_is_retried_with_the_same_key(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    fake_stripe.inject(Fault.rate_limited(retry_after_s=1))
    payment_id, outcome = await rig.charge()
    assert outcome is Outcome.SUCCEEDED
    assert rig.sleep.delays == [1.0]  # Retry-After honoured, in this payment's lane only
    posts = [r for r in fake_stripe.received if r.method == "POST"]
    assert [r.headers["Idempotency-Key"] for r in posts] == [f"{payment_id}_1"]
    assert fake_stripe.requests_seen == 2
    assert len(fake_stripe.captured_charges()) == 1
    assert len((await rig.payment(payment_id)).attempts) == 1


async def test_retries_exhausted_on_not_processed_fail_over(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    fake_stripe.inject(*[FakeStripe.error(429, "rate_limit_error") for _ in range(3)])
    payment_id, outcome = await rig.charge(payment_method=shared_token)
    assert outcome is Outcome.SUCCEEDED
    assert rig.sleep.delays == [0.2, 0.4]
    payment = await rig.payment(payment_id)
    assert attempt_states(payment) == [
        ("stripe", "ATTEMPT_STATUS_FAILED"),
        ("adyen", "ATTEMPT_STATUS_SUCCEEDED"),
    ]
    assert fake_stripe.charges == []
    assert len(fake_adyen.charges) == 1


async def test_retries_exhausted_while_the_key_is_in_use_go_to_the_janitor(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    in_use = FakeStripe.error(409, "idempotency_error", code="idempotency_key_in_use")
    fake_stripe.inject(in_use, in_use, in_use)
    payment_id, outcome = await rig.charge(payment_method=shared_token)
    # Another request with this key may be charging: not "definitely not charged".
    assert outcome is Outcome.UNKNOWN
    assert fake_adyen.requests_seen == 0
    assert status_name(await rig.payment(payment_id)) == "PAYMENT_STATUS_UNKNOWN"


async def test_a_resent_attempt_answered_401_is_not_assumed_uncharged(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    payment_id = await rig.create(payment_method=shared_token)
    async with rig.pool.acquire() as conn, conn.transaction():  # a worker sent attempt 1 and died
        locked = await store.lock_payment(conn, rig.tenant_id, payment_id)
        assert locked is not None
        await store.start_attempt(conn, locked, "stripe")
        await conn.execute("UPDATE payment_attempts SET sends = 1 WHERE payment_id = $1", payment_id)
    fake_stripe.inject(FakeStripe.error(401, "invalid_request_error"))
    assert await execute_charge(rig.executor, rig.tenant_id, payment_id) is Outcome.UNKNOWN
    assert fake_adyen.requests_seen == 0  # the first send may have charged: the janitor decides


async def test_manual_capture_authorizes_then_captures_once(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, outcome = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    assert outcome is Outcome.REQUIRES_CAPTURE
    assert (
        await payment_journals(rig.pool, rig.tenant_id, payment_id) == []
    )  # an authorization moves no money
    capture_id = await rig.capture(payment_id, 800)
    assert await execute_capture(rig.executor, rig.tenant_id, payment_id, capture_id) is Outcome.SUCCEEDED
    assert await execute_capture(rig.executor, rig.tenant_id, payment_id, capture_id) is Outcome.SKIPPED
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_SUCCEEDED"
    assert payment.amount_captured_minor == 800
    assert [payments_pb2.CaptureStatus.Name(c.status) for c in payment.captures] == [
        "CAPTURE_STATUS_SUCCEEDED"
    ]
    capture_posts = [r for r in fake_stripe.received if r.path.endswith("/capture")]
    assert [r.headers["Idempotency-Key"] for r in capture_posts] == [str(capture_id)]
    (charge,) = fake_stripe.charges
    assert charge["amount_captured"] == 800
    (journal,) = await payment_journals(rig.pool, rig.tenant_id, payment_id)
    assert journal.idempotency_key == f"capture:{capture_id}"
    assert [e.event_type for e in await outbox_events(rig.pool, payment_id)] == [
        "payment.processing",
        "payment.requires_capture",
        "payment.captured",
    ]
    captured = (await outbox_events(rig.pool, payment_id))[-1]
    assert captured.capture.capture_id == str(capture_id)
    assert captured.previous_status == payments_pb2.PAYMENT_STATUS_REQUIRES_CAPTURE


async def test_capture_at_adyen_waits_for_the_webhook(
    rig: Rig, fake_adyen: FakeAdyen, key_ring: MasterKeyRing
) -> None:
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen)
    payment_id, outcome = await rig.charge(
        payment_method="stored_succeed", capture_method=payments_pb2.CAPTURE_METHOD_MANUAL
    )
    assert outcome is Outcome.REQUIRES_CAPTURE
    capture_id = await rig.capture(payment_id)
    assert await execute_capture(rig.executor, rig.tenant_id, payment_id, capture_id) is Outcome.PROCESSING
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_REQUIRES_CAPTURE"
    assert [payments_pb2.CaptureStatus.Name(c.status) for c in payment.captures] == [
        "CAPTURE_STATUS_PROCESSING"
    ]
    assert await rig.pool.fetchval("SELECT next_lookup_at FROM payment_captures") is None
    assert fake_adyen.modifications[0]["reference"] == str(capture_id)


async def test_cancel_releases_the_authorization(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    await rig.cancel(payment_id)
    assert await execute_cancel(rig.executor, rig.tenant_id, payment_id) is Outcome.SUCCEEDED
    assert await execute_cancel(rig.executor, rig.tenant_id, payment_id) is Outcome.SKIPPED
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_CANCELED"
    assert causes(payment)[-1] == "cancel_succeeded"
    cancels = [r for r in fake_stripe.received if r.path.endswith("/cancel")]
    (key,) = [r.headers["Idempotency-Key"] for r in cancels]
    assert key.startswith(f"{payment_id}_cancel_")
    assert len(key) <= 64
    assert [e.event_type for e in await outbox_events(rig.pool, payment_id)][-1] == "payment.canceled"


async def test_a_refused_cancel_is_withdrawn_and_can_be_requested_again(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    await rig.cancel(payment_id)
    fake_stripe.inject(FakeStripe.error(400, "invalid_request_error", message="cannot cancel now"))
    assert await execute_cancel(rig.executor, rig.tenant_id, payment_id) is Outcome.FAILED
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_REQUIRES_CAPTURE"
    assert not payment.HasField("cancel_request_time")  # withdrawn: capture or cancel may be asked again
    assert "cancel refused" in payment.failure_message
    await rig.cancel(payment_id)
    assert await execute_cancel(rig.executor, rig.tenant_id, payment_id) is Outcome.SUCCEEDED
    assert status_name(await rig.payment(payment_id)) == "PAYMENT_STATUS_CANCELED"
    keys = [r.headers["Idempotency-Key"] for r in fake_stripe.received if r.path.endswith("/cancel")]
    assert len(keys) == 1  # the refused one was answered before the idempotency layer
    assert fake_stripe.replays == []  # the second request has a key of its own


async def test_a_refused_refund_releases_its_amount(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge()
    refund_id = await rig.refund(payment_id)
    fake_stripe.inject(FakeStripe.error(400, "invalid_request_error", code="charge_disputed"))
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, refund_id) is Outcome.FAILED
    payment = await rig.payment(payment_id)
    assert [(r.failure_code, r.status) for r in payment.refunds] == [
        ("charge_disputed", payments_pb2.REFUND_STATUS_FAILED)
    ]
    assert payment.amount_refunded_minor == 0
    # The failure is published (the payment itself stays SUCCEEDED): the customer can be told.
    failed = [e for e in await outbox_events(rig.pool, payment_id) if e.event_type == "payment.refund_failed"]
    (event,) = failed
    assert (event.refund.refund_id, event.failure_code) == (str(refund_id), "charge_disputed")
    assert event.status == event.previous_status == payments_pb2.PAYMENT_STATUS_SUCCEEDED
    again = await rig.refund(payment_id)  # the whole amount is refundable again
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, again) is Outcome.SUCCEEDED
    assert (await rig.payment(payment_id)).amount_refunded_minor == 1050
    assert len(fake_stripe.refunds) == 1
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, refund_id) is Outcome.SKIPPED
    # processing, succeeded, refund_failed, refunded: the copy of the failed refund's command adds nothing
    assert len(await outbox_events(rig.pool, payment_id)) == 4


async def test_a_refused_capture_is_published_and_can_be_requested_again(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    capture_id = await rig.capture(payment_id)
    fake_stripe.inject(FakeStripe.error(400, "invalid_request_error", code="amount_too_large", message="no"))
    assert await execute_capture(rig.executor, rig.tenant_id, payment_id, capture_id) is Outcome.FAILED
    events = await outbox_events(rig.pool, payment_id)
    assert [e.event_type for e in events] == [
        "payment.processing",
        "payment.requires_capture",
        "payment.capture_failed",
    ]
    failed = events[-1]
    assert failed.capture.capture_id == str(capture_id)
    assert failed.capture.status == payments_pb2.CAPTURE_STATUS_FAILED
    assert failed.failure_code == "amount_too_large"
    assert failed.status == payments_pb2.PAYMENT_STATUS_REQUIRES_CAPTURE
    again = await rig.capture(payment_id)
    assert await execute_capture(rig.executor, rig.tenant_id, payment_id, again) is Outcome.SUCCEEDED
    assert [e.event_type for e in await outbox_events(rig.pool, payment_id)][-1] == "payment.captured"


async def test_cancel_before_processing_is_announced_and_never_charged(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id = await rig.create()
    await rig.cancel(payment_id)  # CANCELED at once: nothing reached a processor
    assert await execute_charge(rig.executor, rig.tenant_id, payment_id) is Outcome.SKIPPED
    assert await execute_cancel(rig.executor, rig.tenant_id, payment_id) is Outcome.SUCCEEDED
    assert await execute_cancel(rig.executor, rig.tenant_id, payment_id) is Outcome.SUCCEEDED  # redelivered
    events = await outbox_events(rig.pool, payment_id)
    assert [e.event_type for e in events] == ["payment.canceled", "payment.canceled"]
    assert events[0].event_id == events[1].event_id  # same change, same id: consumers deduplicate
    assert fake_stripe.requests_seen == 0


async def test_refunds_update_amounts_post_journals_and_publish(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge()
    first = await rig.refund(payment_id, 300)
    second = await rig.refund(payment_id)  # the rest: 750
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, first) is Outcome.SUCCEEDED
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, second) is Outcome.SUCCEEDED
    assert await execute_refund(rig.executor, rig.tenant_id, payment_id, first) is Outcome.SKIPPED
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_SUCCEEDED"
    assert payment.amount_refunded_minor == 1050
    assert sorted(r["amount"] for r in fake_stripe.refunds.values()) == [300, 750]
    journals = await payment_journals(rig.pool, rig.tenant_id, payment_id)
    assert [j.idempotency_key for j in journals] == [
        f"capture:{payment_id}",
        f"refund:{first}",
        f"refund:{second}",
    ]
    assert {j.reference for j in journals[1:]} == set(fake_stripe.refunds)
    refunded = [e for e in await outbox_events(rig.pool, payment_id) if e.event_type == "payment.refunded"]
    assert [(e.refund.refund_id, e.amount_refunded_minor) for e in refunded] == [
        (str(first), 300),
        (str(second), 1050),
    ]
    balances = {
        (b.account, b.currency): b.balance_minor for b in await account_balances(rig.pool, rig.tenant_id)
    }
    assert balances[("processor_clearing:stripe", "EUR")] == 0
    assert balances[("refunds", "EUR")] == 1050
    await assert_ledger_sound(rig.pool, rig.tenant_id)


async def test_racing_refund_commands_never_refund_more_than_captured(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge(amount_minor=1000)
    # Two refunds of 700 each, written around the gateway's check (a bug, a manual insert):
    # execution itself must keep the processor from being asked for more than was captured.
    refunds = [uuid.uuid4(), uuid.uuid4()]
    for refund_id in refunds:
        await rig.pool.execute(
            """INSERT INTO payment_refunds (id, tenant_id, payment_id, request_id, amount_minor)
               VALUES ($1, $2, $3, $4, 700)""",
            refund_id,
            rig.tenant_id,
            payment_id,
            str(refund_id),
        )
    # Each command delivered twice, all four at once.
    outcomes = await asyncio.gather(
        *(execute_refund(rig.executor, rig.tenant_id, payment_id, r) for r in refunds for _ in range(2))
    )
    assert Counter(outcomes) == Counter({Outcome.SUCCEEDED: 1, Outcome.FAILED: 1, Outcome.SKIPPED: 2})
    assert sum(r["amount"] for r in fake_stripe.refunds.values()) == 700
    payment = await rig.payment(payment_id)
    assert payment.amount_refunded_minor == 700
    failed = [r for r in payment.refunds if r.status == payments_pb2.REFUND_STATUS_FAILED]
    assert [r.failure_code for r in failed] == ["refund_exceeds_captured"]
    # Refused before it was sent, and published like any failed refund.
    events = await outbox_events(rig.pool, payment_id)
    assert [e.refund.refund_id for e in events if e.event_type == "payment.refund_failed"] == [
        failed[0].refund_id
    ]
    await assert_ledger_sound(rig.pool, rig.tenant_id)


async def test_racing_refunds_accepted_through_the_gateway_stay_within_the_capture(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id, _ = await rig.charge(amount_minor=1000)
    accepted = await asyncio.gather(*(rig.refund(payment_id, 250) for _ in range(4)))
    outcomes = await asyncio.gather(
        *(execute_refund(rig.executor, rig.tenant_id, payment_id, r) for r in accepted for _ in range(2))
    )
    assert Counter(outcomes) == Counter({Outcome.SUCCEEDED: 4, Outcome.SKIPPED: 4})
    assert sum(r["amount"] for r in fake_stripe.refunds.values()) == 1000
    assert len(fake_stripe.refunds) == 4
    assert (await rig.payment(payment_id)).amount_refunded_minor == 1000


async def test_no_processor_configured_fails_the_payment(rig: Rig) -> None:
    payment_id, outcome = await rig.charge()
    assert outcome is Outcome.FAILED
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_FAILED"
    assert payment.failure_code == "no_processor"
    # Never sent, so no payment.processing.
    assert [e.event_type for e in await outbox_events(rig.pool, payment_id)] == ["payment.failed"]


async def test_many_payments_keep_every_journal_balanced_and_the_chain_valid(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    expected_net = 0
    for n in range(30):
        amount = 500 + 37 * n
        kind = n % 5
        if kind == 0:  # automatic capture
            await rig.charge(amount_minor=amount)
            expected_net += amount
        elif kind == 1:  # manual capture, partial
            payment_id, _ = await rig.charge(
                amount_minor=amount, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL
            )
            capture_id = await rig.capture(payment_id, amount - 100)
            assert (
                await execute_capture(rig.executor, rig.tenant_id, payment_id, capture_id)
                is Outcome.SUCCEEDED
            )
            expected_net += amount - 100
        elif kind == 2:  # captured then partly refunded
            payment_id, _ = await rig.charge(amount_minor=amount)
            refund_id = await rig.refund(payment_id, 200)
            assert (
                await execute_refund(rig.executor, rig.tenant_id, payment_id, refund_id) is Outcome.SUCCEEDED
            )
            expected_net += amount - 200
        elif kind == 3:  # declined
            await rig.charge(amount_minor=amount, payment_method="pm_card_chargeDeclined")
        else:  # answer lost, resolved by the janitor
            fake_stripe.inject(Fault.lost_response())
            await rig.charge(amount_minor=amount)
            expected_net += amount
    rig.clock.advance(301)
    report = await rig.janitor().run_once()
    assert report.attempts == Counter({Outcome.SUCCEEDED: 6})
    statuses = Counter(
        r["status"]
        for r in await rig.pool.fetch("SELECT status FROM payments WHERE tenant_id = $1", rig.tenant_id)
    )
    assert statuses == Counter({"succeeded": 24, "failed": 6})
    assert len(fake_stripe.captured_charges()) == 24
    await assert_ledger_sound(rig.pool, rig.tenant_id)
    balances = {
        (b.account, b.currency): b.balance_minor for b in await account_balances(rig.pool, rig.tenant_id)
    }
    assert balances[("processor_clearing:stripe", "EUR")] == expected_net
    assert balances[("customer_receivable", "EUR")] == 0
    journals = await rig.pool.fetchval(
        "SELECT count(*) FROM ledger_journals WHERE tenant_id = $1", rig.tenant_id
    )
    assert journals == 24 + 6  # one capture per charged payment, one per refund


# --- the worker -----------------------------------------------------------------------------------


async def test_end_to_end_gateway_relay_kafka_worker_stripe(
    gateway: Gateway,
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: TenantCredentials,
    fake_stripe: FakeStripe,
    key_ring: MasterKeyRing,
) -> None:
    await use_stripe(pool, key_ring, tenant.tenant_id, fake_stripe)
    made = await make_rig(pool, settings, tenant.tenant_id)
    relay = OutboxRelay(pool, settings)
    worker = PaymentWorker(made.executor, settings)
    tasks = [asyncio.create_task(relay.run())]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = payments_pb2_grpc.PaymentServiceStub(channel)
            created = await stub.CreatePayment(create_request(), metadata=tenant.metadata)
            payment_id = created.payment.payment_id
            request = payments_pb2.WatchPaymentRequest(payment_id=payment_id)
            watch = stub.WatchPayment(request, metadata=tenant.metadata)
            first = await watch.read()  # REQUIRES_PROCESSING: the worker is not running yet
            assert isinstance(first, payments_pb2.WatchPaymentResponse)
            assert first.payment.status == payments_pb2.PAYMENT_STATUS_REQUIRES_PROCESSING
            watched: list[payments_pb2.WatchPaymentResponse] = [first]
            tasks.append(asyncio.create_task(worker.run()))
            async with asyncio.timeout(60):
                while True:  # the stream ends (OK) after the final status
                    message = await watch.read()
                    if not isinstance(message, payments_pb2.WatchPaymentResponse):
                        break
                    watched.append(message)
            got = await stub.GetPayment(
                payments_pb2.GetPaymentRequest(payment_id=payment_id), metadata=tenant.metadata
            )
        assert got.payment.status == payments_pb2.PAYMENT_STATUS_SUCCEEDED
        assert watched[-1].payment.status == payments_pb2.PAYMENT_STATUS_SUCCEEDED
        assert watched[-1].transition.to_status == payments_pb2.PAYMENT_STATUS_SUCCEEDED
        assert watched[-1].transition.cause == "attempt_succeeded"
        assert len(fake_stripe.captured_charges()) == 1
        (journal,) = await payment_journals(pool, tenant.tenant_id, uuid.UUID(payment_id))
        assert journal.kind.value == "capture"
        # The PaymentEvent reaches Kafka (through the outbox and the relay), keyed by tenant.
        consumer = AIOKafkaConsumer(
            payment_events_topic(settings.kafka_topic_prefix),
            bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            async with asyncio.timeout(30):
                records = [await consumer.getone(), await consumer.getone()]
        finally:
            await consumer.stop()
        events = [events_pb2.PaymentEvent.FromString(r.value or b"") for r in records]
        assert {r.key for r in records} == {str(tenant.tenant_id).encode()}
        assert [(e.event_type, e.payment_id) for e in events] == [
            ("payment.processing", payment_id),
            ("payment.succeeded", payment_id),
        ]
        await wait_for(lambda: _committed(worker))
        assert worker.outcomes[Outcome.SUCCEEDED] == 1
    finally:
        relay.stop()
        worker.stop()
        await asyncio.gather(*tasks)
        await made.processors.close()


async def _committed(worker: PaymentWorker) -> bool:
    return worker.batches >= 1


async def test_worker_runs_a_payments_commands_in_order_and_skips_what_it_cannot_decode(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing, settings: Settings
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe)
    payment_id = await rig.create(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    worker = PaymentWorker(rig.executor, settings)
    create = events_pb2.PaymentCommand(
        kind=events_pb2.PAYMENT_COMMAND_KIND_CREATE, tenant_id=str(rig.tenant_id), payment_id=str(payment_id)
    )

    @dataclass
    class Record:
        value: bytes
        partition: int = 0
        topic: str = "t"
        offset: int = 0

    records: list[Any] = [
        Record(b"\xff not a command"),
        Record(create.SerializeToString()),
        Record(create.SerializeToString()),
    ]
    await worker.handle_records(records)
    assert worker.skipped_undecodable == 1
    assert worker.outcomes == Counter({Outcome.REQUIRES_CAPTURE: 1, Outcome.SKIPPED: 1})
    assert len(fake_stripe.charges) == 1


async def test_the_payment_worker_command_charges_and_stops_cleanly_on_sigterm(
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: TenantCredentials,
    fake_stripe: FakeStripe,
    key_ring: MasterKeyRing,
) -> None:
    await use_stripe(pool, key_ring, tenant.tenant_id, fake_stripe)
    made = await make_rig(pool, settings, tenant.tenant_id)
    payment_id = await made.create()
    await made.processors.close()
    env = gateway_env(settings, SWITCHBOARD_PAYMENT_JANITOR_INTERVAL_S="0.2")
    relay = OutboxRelay(pool, settings)
    relaying = asyncio.create_task(relay.run())
    process = subprocess.Popen(  # noqa: ASYNC220 (started once; waited for in a thread)
        [sys.executable, "-m", "switchboard.cli", "payment-worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        async def succeeded() -> bool:
            status = await pool.fetchval("SELECT status FROM payments WHERE id = $1", payment_id)
            return bool(status == "succeeded")

        await wait_for(succeeded, timeout_s=60)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
        relay.stop()
        await relaying
    assert code == 0
    assert len(fake_stripe.captured_charges()) == 1
    assert process.stderr is not None
    assert STRIPE_KEY not in process.stderr.read().decode()
