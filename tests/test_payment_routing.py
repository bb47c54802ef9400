"""Payment routing: rules (parsing, matching, storage, CLI), the circuit breaker, and how execution
uses both (rules pick the order, an open breaker sends payments to the next processor, a half-open
one lets one probe through after the cool-down, all-open defers the command)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from payments.execution import Outcome, execute_charge
from payments.routing import (
    BreakerState,
    CircuitBreaker,
    CircuitBreakers,
    RouteConfigError,
    RouteRule,
    load_route_rules,
    parse_route_config,
    replace_route_rules,
    route_for,
)
from switchboard.fakes.adyen import FakeAdyen
from switchboard.fakes.stripe import FakeStripe
from switchboard.settings import Settings
from tenants.sealing import MasterKeyRing
from tests.conftest import TenantCredentials
from tests.test_payment_worker import (
    FakeClock,
    Rig,
    attempt_states,
    fake_adyen,
    fake_stripe,
    make_rig,
    outbox_commands,
    outbox_events,
    rig,
    shared_token,
    status_name,
    use_adyen,
    use_stripe,
)

__all__ = ["fake_adyen", "fake_stripe", "rig", "shared_token"]  # fixtures shared with test_payment_worker

# --- rules ------------------------------------------------------------------------------------------


def test_a_configuration_document_parses_into_ordered_rules() -> None:
    rules = parse_route_config(
        json.dumps(
            {
                "rules": [
                    {"currency": "EUR", "max_amount_minor": 100_000, "processors": ["adyen", "stripe"]},
                    {"payment_method_prefix": "pm_", "min_amount_minor": 1, "processors": ["stripe"]},
                ]
            }
        )
    )
    assert rules == [
        RouteRule(processors=("adyen", "stripe"), currency="EUR", max_amount_minor=100_000),
        RouteRule(processors=("stripe",), min_amount_minor=1, payment_method_prefix="pm_"),
    ]
    assert parse_route_config('{"rules": []}') == []
    assert rules[0].to_json() == {
        "currency": "EUR",
        "max_amount_minor": 100_000,
        "processors": ["adyen", "stripe"],
    }


def test_every_problem_of_a_configuration_is_named() -> None:
    with pytest.raises(RouteConfigError) as caught:
        parse_route_config(
            json.dumps(
                {
                    "rules": [
                        {"currency": "eur", "processors": []},
                        {
                            "min_amount_minor": 10,
                            "max_amount_minor": 5,
                            "processors": ["Stripe"],
                            "colour": 1,
                        },
                        {"min_amount_minor": 0, "processors": ["stripe", "stripe"]},
                        "not an object",
                    ]
                }
            )
        )
    problems = caught.value.problems
    assert any(p.startswith("rules[0].currency") for p in problems)
    assert any(p.startswith("rules[0].processors") for p in problems)
    assert any("rules[1]: unknown field(s) colour" in p for p in problems)
    assert any("min_amount_minor (10) exceeds max_amount_minor (5)" in p for p in problems)
    assert any(p.startswith("rules[1].processors: not processor names") for p in problems)
    assert any(p.startswith("rules[2].min_amount_minor") for p in problems)
    assert any("listed twice" in p for p in problems)
    assert any(p == "rules[3]: must be an object" for p in problems)
    for bad in ("not json", "[]", '{"rules": {}}', '{"routes": []}'):
        with pytest.raises(RouteConfigError):
            parse_route_config(bad)


def test_the_first_matching_rule_gives_the_order_and_unusable_processors_are_skipped() -> None:
    rules = [
        RouteRule(
            processors=("adyen", "stripe"), currency="EUR", min_amount_minor=1000, max_amount_minor=5000
        ),
        RouteRule(processors=("stripe",), payment_method_prefix="pm_"),
        RouteRule(processors=("braintree",), currency="USD"),
    ]
    usable = ["stripe", "adyen"]

    def order(currency: str, amount: int, method: str) -> list[str]:
        return route_for(rules, usable, currency=currency, amount_minor=amount, payment_method=method)

    assert order("EUR", 1000, "pm_x") == ["adyen", "stripe"]  # bounds are inclusive
    assert order("EUR", 5000, "pm_x") == ["adyen", "stripe"]
    assert order("EUR", 5001, "pm_x") == ["stripe"]  # falls to the prefix rule
    assert order("EUR", 999, "stored_x") == ["stripe", "adyen"]  # no rule: priority order
    assert order("USD", 100, "stored_x") == []  # the matching rule's processor is not configured
    assert route_for([], [], currency="EUR", amount_minor=1, payment_method="pm") == []


async def test_rules_are_stored_replaced_and_cleared_per_tenant(
    pool: asyncpg.Pool, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    rules = [RouteRule(processors=("adyen",), currency="EUR"), RouteRule(processors=("stripe", "adyen"))]
    async with pool.acquire() as conn, conn.transaction():
        assert await replace_route_rules(conn, tenant.tenant_id, rules) == 2
    assert await load_route_rules(pool, tenant.tenant_id) == rules
    assert await load_route_rules(pool, other_tenant.tenant_id) == []
    async with pool.acquire() as conn, conn.transaction():
        await replace_route_rules(conn, tenant.tenant_id, rules[1:])
    assert await load_route_rules(pool, tenant.tenant_id) == rules[1:]
    with pytest.raises(asyncpg.CheckViolationError):
        async with pool.acquire() as conn, conn.transaction():
            await replace_route_rules(conn, tenant.tenant_id, [RouteRule(processors=("Not A Name",))])
    async with pool.acquire() as conn, conn.transaction():
        await replace_route_rules(conn, tenant.tenant_id, [])
    assert await load_route_rules(pool, tenant.tenant_id) == []


async def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(SWITCHBOARD_DATABASE_URL=database_url, COLUMNS="250")
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "switchboard.cli", "payments", "routes", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_routes_cli_sets_shows_and_clears(
    database_url: str, pool: asyncpg.Pool, tenant: TenantCredentials, tmp_path: Path
) -> None:
    config = tmp_path / "routes.json"
    config.write_text(json.dumps({"rules": [{"currency": "EUR", "processors": ["adyen", "stripe"]}]}))
    stored = await _cli(database_url, "set", "acme", "--config", str(config))
    assert stored.returncode == 0, stored.stderr
    assert "stored 1 routing rule(s)" in stored.stdout
    assert "not configured for this tenant" in stored.stdout
    assert "adyen, stripe" in stored.stdout
    assert await load_route_rules(pool, tenant.tenant_id) == [
        RouteRule(processors=("adyen", "stripe"), currency="EUR")
    ]
    shown = await _cli(database_url, "show", str(tenant.tenant_id))
    assert json.loads(shown.stdout) == {"rules": [{"currency": "EUR", "processors": ["adyen", "stripe"]}]}

    config.write_text(json.dumps({"rules": [{"currency": "euro", "processors": []}]}))
    refused = await _cli(database_url, "set", "acme", "--config", str(config))
    assert refused.returncode == 2
    assert "rules[0].currency" in refused.stdout
    assert "rules[0].processors" in refused.stdout
    assert len(await load_route_rules(pool, tenant.tenant_id)) == 1  # nothing changed

    unknown = await _cli(database_url, "show", "no-such-tenant")
    assert unknown.returncode == 2
    cleared = await _cli(database_url, "clear", "acme")
    assert cleared.returncode == 0, cleared.stderr
    assert await load_route_rules(pool, tenant.tenant_id) == []


# --- the circuit breaker ----------------------------------------------------------------------------


def state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh (it changes with the clock)."""
    return breaker.state


def test_breaker_opens_after_the_threshold_and_half_opens_after_the_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 30.0, clock.monotonic)
    assert state(breaker) is BreakerState.CLOSED
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # consecutive failures only
    for _ in range(2):
        breaker.record_failure()
        assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_at() == clock.monotonic() + 30.0
    clock.advance(29.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()  # the one probe
    assert not breaker.allow()  # nobody else while it is out
    breaker.record_failure()  # the probe failed: open for another cool-down
    assert state(breaker) is BreakerState.OPEN
    clock.advance(30)
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.allow()


def test_a_probe_that_never_reports_is_replaced_after_the_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock.monotonic)
    breaker.record_failure()
    clock.advance(10)
    assert breaker.allow()
    clock.advance(9)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()  # the first probe's worker died
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError, match="cool_down_s"):
        CircuitBreaker(1, 0)


def test_breakers_are_per_tenant_and_processor() -> None:
    clock = FakeClock()
    breakers = CircuitBreakers(1, 5.0, clock=clock.monotonic)
    acme, globex = uuid.uuid4(), uuid.uuid4()
    breakers.record(acme, "stripe", ok=False)
    assert not breakers.allow(acme, "stripe")
    assert breakers.allow(acme, "adyen")
    assert breakers.allow(globex, "stripe")
    assert breakers.retry_in_s(acme, "stripe") == 5.0
    assert breakers.retry_in_s(globex, "stripe") == 0.0


# --- execution with rules and breakers -------------------------------------------------------------


async def test_a_routing_rule_sends_matching_payments_to_its_processors_first(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    async with rig.pool.acquire() as conn, conn.transaction():
        await replace_route_rules(
            conn,
            rig.tenant_id,
            [
                RouteRule(processors=("adyen", "stripe"), currency="EUR", min_amount_minor=10_000),
                RouteRule(processors=("adyen",), payment_method_prefix="stored_"),
            ],
        )
    big, _ = await rig.charge(amount_minor=20_000, payment_method=shared_token)
    small, _ = await rig.charge(amount_minor=500, payment_method=shared_token)
    stored, _ = await rig.charge(amount_minor=500, payment_method="stored_succeed")
    assert attempt_states(await rig.payment(big)) == [("adyen", "ATTEMPT_STATUS_SUCCEEDED")]
    assert attempt_states(await rig.payment(small)) == [
        ("stripe", "ATTEMPT_STATUS_SUCCEEDED")
    ]  # default order
    assert attempt_states(await rig.payment(stored)) == [("adyen", "ATTEMPT_STATUS_SUCCEEDED")]
    assert len(fake_stripe.charges) == 1
    assert len(fake_adyen.charges) == 2


async def test_breaker_opens_after_failures_routes_to_the_next_processor_and_half_opens(
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: TenantCredentials,
    fake_stripe: FakeStripe,
    fake_adyen: FakeAdyen,
    key_ring: MasterKeyRing,
    shared_token: str,
) -> None:
    rig = await make_rig(pool, settings, tenant.tenant_id, failure_threshold=3, cool_down_s=60.0)
    try:
        await use_stripe(pool, key_ring, tenant.tenant_id, fake_stripe, priority=0)
        await use_adyen(pool, key_ring, tenant.tenant_id, fake_adyen, priority=1)
        # Stripe refuses three payments in a row (a broken key, say): each fails over to Adyen.
        fake_stripe.inject(*[FakeStripe.error(401, "invalid_request_error") for _ in range(3)])
        for _ in range(3):
            payment_id, outcome = await rig.charge(payment_method=shared_token)
            assert outcome is Outcome.SUCCEEDED
            assert [p for p, _ in attempt_states(await rig.payment(payment_id))] == ["stripe", "adyen"]
        assert rig.breakers.breaker(tenant.tenant_id, "stripe").state is BreakerState.OPEN
        assert fake_stripe.requests_seen == 3

        # Open: the next payments go straight to Adyen; Stripe is not called at all.
        for _ in range(2):
            payment_id, outcome = await rig.charge(payment_method=shared_token)
            assert outcome is Outcome.SUCCEEDED
            assert attempt_states(await rig.payment(payment_id)) == [("adyen", "ATTEMPT_STATUS_SUCCEEDED")]
        assert fake_stripe.requests_seen == 3

        # After the cool-down one probe goes to Stripe (now healthy) and closes the breaker.
        rig.clock.advance(60)
        payment_id, outcome = await rig.charge(payment_method=shared_token)
        assert outcome is Outcome.SUCCEEDED
        assert attempt_states(await rig.payment(payment_id)) == [("stripe", "ATTEMPT_STATUS_SUCCEEDED")]
        assert rig.breakers.breaker(tenant.tenant_id, "stripe").state is BreakerState.CLOSED
        assert len(fake_stripe.captured_charges()) == 1
        assert len(fake_adyen.charges) == 5
    finally:
        await rig.processors.close()


async def test_when_every_breaker_is_open_the_command_is_deferred_then_tried_anyway(
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: TenantCredentials,
    fake_stripe: FakeStripe,
    key_ring: MasterKeyRing,
) -> None:
    rig = await make_rig(pool, settings, tenant.tenant_id, failure_threshold=1, cool_down_s=10_000.0)
    try:
        await use_stripe(pool, key_ring, tenant.tenant_id, fake_stripe)
        fake_stripe.inject(FakeStripe.error(401, "invalid_request_error"))
        _, outcome = await rig.charge()
        assert outcome is Outcome.FAILED  # nothing to fail over to; the breaker is now open
        payment_id, outcome = await rig.charge()
        assert outcome is Outcome.DEFERRED
        payment = await rig.payment(payment_id)
        assert status_name(payment) == "PAYMENT_STATUS_REQUIRES_PROCESSING"
        assert list(payment.attempts) == []
        commands = await outbox_commands(pool, payment_id)
        assert (
            len(commands) == 2
        )  # the accepted CREATE, and the deferred one, due when the breaker half-opens
        assert commands[1][1] == rig.clock.now() + timedelta(seconds=10_000)
        seen = fake_stripe.requests_seen

        # The command comes back while the breaker is still open: deferred again, nothing sent.
        rig.clock.advance(30)
        assert await execute_charge(rig.executor, tenant.tenant_id, payment_id) is Outcome.DEFERRED
        assert fake_stripe.requests_seen == seen
        # Past the wait limit the payment is tried anyway: a real answer beats waiting longer.
        rig.clock.advance(rig.executor.policy.breaker_wait_max_s)
        assert rig.breakers.breaker(tenant.tenant_id, "stripe").state is BreakerState.OPEN
        assert await execute_charge(rig.executor, tenant.tenant_id, payment_id) is Outcome.SUCCEEDED
        assert len(fake_stripe.captured_charges()) == 1
        assert rig.breakers.breaker(tenant.tenant_id, "stripe").state is BreakerState.CLOSED
    finally:
        await rig.processors.close()


async def test_a_failover_to_a_processor_whose_breaker_is_open_waits_for_it(
    rig: Rig, fake_stripe: FakeStripe, fake_adyen: FakeAdyen, key_ring: MasterKeyRing, shared_token: str
) -> None:
    await use_stripe(rig.pool, key_ring, rig.tenant_id, fake_stripe, priority=0)
    await use_adyen(rig.pool, key_ring, rig.tenant_id, fake_adyen, priority=1)
    for _ in range(rig.breakers.failure_threshold):
        rig.breakers.record(rig.tenant_id, "adyen", ok=False)
    fake_stripe.inject(FakeStripe.error(401, "invalid_request_error"))
    payment_id, outcome = await rig.charge(payment_method=shared_token)
    # FAILED is final to clients, so the failover attempt starts at once and waits to be sent.
    assert outcome is Outcome.DEFERRED
    payment = await rig.payment(payment_id)
    assert status_name(payment) == "PAYMENT_STATUS_PROCESSING"
    assert attempt_states(payment) == [
        ("stripe", "ATTEMPT_STATUS_FAILED"),
        ("adyen", "ATTEMPT_STATUS_PENDING"),
    ]
    # No payment.failed: the failover attempt is announced instead (it waits for the breaker).
    assert [(e.event_type, e.attempt_no) for e in await outbox_events(rig.pool, payment_id)] == [
        ("payment.processing", 1),
        ("payment.processing", 2),
    ]
    assert fake_adyen.requests_seen == 0
    rig.clock.advance(rig.breakers.cool_down_s)
    assert await execute_charge(rig.executor, rig.tenant_id, payment_id) is Outcome.SUCCEEDED
    payment = await rig.payment(payment_id)
    assert attempt_states(payment) == [
        ("stripe", "ATTEMPT_STATUS_FAILED"),
        ("adyen", "ATTEMPT_STATUS_SUCCEEDED"),
    ]
    assert len(fake_adyen.charges) == 1
