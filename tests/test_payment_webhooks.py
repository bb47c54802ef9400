"""Processor webhooks in (payments/webhooks.py): verification, deduplication, the state machine,
and what happens to a delivery that does not verify.

Everything runs for real: PostgreSQL, the webhook endpoint on a loopback port, the tenants'
sealed processor configurations read through the processor cache, and the fake processors
(switchboard/fakes/stripe.py, switchboard/fakes/adyen.py) creating the payments with the real
connectors and delivering their events signed as Stripe and Adyen do. Payment rows are put in
the state under test (PROCESSING, UNKNOWN, ...) with the store's own functions.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import asyncpg
import httpx
import pytest
from structlog.testing import capture_logs

from payments import store
from payments.adyen import AdyenProcessor
from payments.ledger import payment_journals
from payments.ledger_verify import verify_chain
from payments.processor import CaptureMethod, ChargeRequest, ProcessorStatus
from payments.state_machine import OperationTrigger, PaymentStatus, PaymentTrigger
from payments.stripe import StripeProcessor
from payments.stripe_signature import SIGNATURE_HEADER, signature_header
from payments.validation import validate_create_request
from payments.webhooks import ADYEN_ACCEPTED, WebhookServer, start_webhook_server
from switchboard.embedded import free_port, wait_for_port
from switchboard.fakes.adyen import FakeAdyen
from switchboard.fakes.stripe import PROCESSING_TOKEN, FakeStripe
from switchboard.payments.v1 import events_pb2, payments_pb2
from switchboard.settings import Settings
from tenants.processor_cache import ProcessorCache, processor_cache_for
from tenants.sealing import MasterKeyRing
from tests.conftest import TenantCredentials
from tests.test_payment_service import create_request
from tests.test_processor_config import (
    ADYEN_HMAC,
    ADYEN_HMAC_NEW,
    ADYEN_KEY,
    ADYEN_MERCHANT,
    STRIPE_KEY,
    STRIPE_WHSEC,
    STRIPE_WHSEC_NEW,
    adyen_config,
    store_config,
    stripe_config,
)

#: Another tenant's Stripe endpoint secret.
OTHER_WHSEC = "whsec_otherTenant0123456789abcdefNeverShown"
#: A webhook secret no tenant has.
FORGED_WHSEC = "whsec_forger0123456789abcdefghijNeverShown"
SECRETS = (STRIPE_KEY, STRIPE_WHSEC, STRIPE_WHSEC_NEW, ADYEN_KEY, ADYEN_HMAC, ADYEN_HMAC_NEW, OTHER_WHSEC)
#: The endpoint's body limit in these tests, bytes.
BODY_LIMIT = 16 * 1024


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
        assert secret.lower() not in text.lower()


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
async def processors(
    pool: asyncpg.Pool, settings: Settings, key_ring: MasterKeyRing
) -> AsyncIterator[ProcessorCache]:
    cache = processor_cache_for(pool, settings, key_ring)
    yield cache
    await cache.close()


@pytest.fixture
async def webhooks(
    pool: asyncpg.Pool, settings: Settings, processors: ProcessorCache
) -> AsyncIterator[WebhookServer]:
    server = await start_webhook_server(pool, processors, settings, "127.0.0.1:0", max_body_bytes=BODY_LIMIT)
    yield server
    await server.stop()


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    fake = FakeStripe(STRIPE_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def stripe(fake_stripe: FakeStripe) -> AsyncIterator[StripeProcessor]:
    client = StripeProcessor(STRIPE_KEY, base_url=fake_stripe.base_url, timeout_s=5.0)
    yield client
    await client.aclose()


@pytest.fixture
async def fake_adyen() -> AsyncIterator[FakeAdyen]:
    fake = FakeAdyen(ADYEN_KEY, ADYEN_MERCHANT, hmac_key=ADYEN_HMAC)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def adyen(fake_adyen: FakeAdyen) -> AsyncIterator[AdyenProcessor]:
    client = AdyenProcessor(ADYEN_KEY, ADYEN_MERCHANT, base_url=fake_adyen.checkout_url, timeout_s=5.0)
    yield client
    await client.aclose()


@pytest.fixture
async def stripe_tenant(pool: asyncpg.Pool, key_ring: MasterKeyRing, tenant: TenantCredentials) -> uuid.UUID:
    """``acme`` with Stripe configured and one endpoint signing secret."""
    await store_config(pool, key_ring, tenant.tenant_id, stripe_config(webhook_secrets=(STRIPE_WHSEC,)))
    return tenant.tenant_id


@pytest.fixture
async def adyen_tenant(
    pool: asyncpg.Pool, key_ring: MasterKeyRing, tenant: TenantCredentials, fake_adyen: FakeAdyen
) -> uuid.UUID:
    """``acme`` with Adyen configured (the fake's merchant account) and one HMAC key."""
    await store_config(
        pool,
        key_ring,
        tenant.tenant_id,
        adyen_config(base_url=fake_adyen.checkout_url, hmac_keys=(ADYEN_HMAC,)),
    )
    return tenant.tenant_id


@pytest.fixture(autouse=True)
def logs_without_secrets() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every log event of the test; none may contain a secret."""
    with capture_logs() as captured:
        yield captured
    assert_no_secret(repr(captured))


# --- helpers ----------------------------------------------------------------------------------------


def stripe_url(server: WebhookServer, tenant_id: uuid.UUID) -> str:
    return f"{server.base_url}/webhooks/stripe/{tenant_id}"


def adyen_url(server: WebhookServer, tenant_id: uuid.UUID) -> str:
    return f"{server.base_url}/webhooks/adyen/{tenant_id}"


async def new_payment(pool: asyncpg.Pool, tenant_id: uuid.UUID, **overrides: Any) -> uuid.UUID:
    """A payment accepted as CreatePayment does (REQUIRES_PROCESSING)."""
    request = create_request(**overrides)
    response = await store.create_payment(pool, tenant_id, request, validate_create_request(request))
    assert isinstance(response, payments_pb2.CreatePaymentResponse)
    return uuid.UUID(response.payment.payment_id)


async def start_attempt(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, payment_id: uuid.UUID, processor: str
) -> int:
    """The worker's first step: the PENDING attempt, the payment PROCESSING."""
    async with pool.acquire() as conn, conn.transaction():
        payment = await store.lock_payment(conn, tenant_id, payment_id)
        assert payment is not None
        return await store.start_attempt(conn, payment, processor)


def charge_request(
    payment_id: uuid.UUID, attempt_no: int, payment_method: str, *, manual: bool = False
) -> ChargeRequest:
    """What the worker sends for the payment of :func:`create_request` (10.50 EUR)."""
    return ChargeRequest(
        payment_id=payment_id,
        attempt_no=attempt_no,
        amount_minor=1050,
        currency="EUR",
        payment_method=payment_method,
        capture_method=CaptureMethod.MANUAL if manual else CaptureMethod.AUTOMATIC,
        customer_reference="cust-42",
        description="Order 42",
        metadata={"order": "42"},
    )


async def answer_lost(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, payment_id: uuid.UUID, attempt_no: int
) -> None:
    """The worker's record of a lost answer: attempt and payment UNKNOWN, the janitor's next lookup an
    hour away; the answer was lost 10 minutes ago (outside the in-flight window)."""
    async with pool.acquire() as conn, conn.transaction():
        await store.finish_attempt(
            conn,
            tenant_id,
            payment_id,
            attempt_no,
            OperationTrigger.AMBIGUOUS,
            failure_code="timeout",
            failure_message="read timeout after sending",
            next_lookup_at=await conn.fetchval("SELECT now() + interval '1 hour'"),
        )
        await store.record_transition(
            conn,
            tenant_id,
            payment_id,
            PaymentStatus.PROCESSING,
            PaymentStatus.UNKNOWN,
            PaymentTrigger.ATTEMPT_UNKNOWN,
            attempt_no=attempt_no,
        )
        await conn.execute(
            "UPDATE payment_attempts SET updated_at = now() - interval '10 minutes' WHERE payment_id = $1",
            payment_id,
        )


async def processor_working(
    pool: asyncpg.Pool, payment_id: uuid.UUID, attempt_no: int, reference: str
) -> None:
    """The worker's record of a PROCESSING answer: attempt PENDING with the processor's reference,
    a lookup scheduled an hour away; recorded 10 minutes ago."""
    await pool.execute(
        """UPDATE payment_attempts SET processor_reference = $3, lookups = 1,
                  next_lookup_at = now() + interval '1 hour', updated_at = now() - interval '10 minutes'
            WHERE payment_id = $1 AND attempt_no = $2""",
        payment_id,
        attempt_no,
        reference,
    )
    await pool.execute("UPDATE payments SET processor_reference = $2 WHERE id = $1", payment_id, reference)


async def payment(pool: asyncpg.Pool, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> payments_pb2.Payment:
    found = await store.get_payment(pool, tenant_id, payment_id)
    assert found is not None
    return found


def status(p: payments_pb2.Payment) -> str:
    return payments_pb2.PaymentStatus.Name(p.status)


async def payment_events(pool: asyncpg.Pool, payment_id: uuid.UUID) -> list[events_pb2.PaymentEvent]:
    rows = await pool.fetch("SELECT payload FROM outbox WHERE topic LIKE '%payments.events' ORDER BY id")
    events = [events_pb2.PaymentEvent.FromString(r["payload"]) for r in rows]
    return [e for e in events if e.payment_id == str(payment_id)]


async def webhook_rows(pool: asyncpg.Pool, tenant_id: uuid.UUID) -> list[asyncpg.Record]:
    return await pool.fetch(
        """SELECT processor, event_id, event_type, verified, deliveries, outcome, detail, payment_id,
                  payload::text AS payload
             FROM webhook_events WHERE tenant_id = $1 ORDER BY id""",
        tenant_id,
    )


async def lookup_due(pool: asyncpg.Pool, payment_id: uuid.UUID) -> bool:
    """Whether the janitor would look the payment's attempt up now."""
    due = await pool.fetchval(
        "SELECT bool_or(next_lookup_at <= now()) FROM payment_attempts WHERE payment_id = $1", payment_id
    )
    return bool(due)


def events_of(fake: FakeStripe, event_type: str, object_id: str) -> list[dict[str, Any]]:
    return [e for e in fake.events if e["type"] == event_type and e["data"]["object"]["id"] == object_id]


async def assert_balanced_capture(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, payment_id: uuid.UUID, amount: int
) -> None:
    journals = await payment_journals(pool, tenant_id, payment_id)
    assert [j.kind.value for j in journals] == ["capture"]
    (journal,) = journals
    assert sum(p.amount_minor for p in journal.postings) == 0
    assert sum(p.amount_minor for p in journal.postings if p.amount_minor > 0) == 2 * amount
    assert (await verify_chain(pool, tenant_id)).ok


async def post_raw(url: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0) as client:
        return await client.post(
            url, content=body, headers={"Content-Type": "application/json", **(headers or {})}
        )


async def stripe_unknown_payment(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, stripe: StripeProcessor, fake: FakeStripe
) -> tuple[uuid.UUID, dict[str, Any]]:
    """A payment charged at Stripe whose answer was lost (UNKNOWN, no processor reference recorded)
    and the ``payment_intent.succeeded`` event Stripe emitted for it."""
    payment_id = await new_payment(pool, tenant_id)
    attempt = await start_attempt(pool, tenant_id, payment_id, "stripe")
    charged = await stripe.create_charge(charge_request(payment_id, attempt, "pm_card_visa"))
    assert charged.status is ProcessorStatus.SUCCEEDED
    await answer_lost(pool, tenant_id, payment_id, attempt)
    (event,) = events_of(fake, "payment_intent.succeeded", charged.processor_reference)
    return payment_id, event


# --- Stripe: verified events move the state machine -------------------------------------------------


@pytest.mark.parametrize("state", ["processing", "unknown"])
async def test_stripe_event_advances_payment_to_succeeded_with_balanced_capture_journal(
    state: str,
    pool: asyncpg.Pool,
    stripe_tenant: uuid.UUID,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    payment_id = await new_payment(pool, stripe_tenant, payment_method=PROCESSING_TOKEN)
    attempt = await start_attempt(pool, stripe_tenant, payment_id, "stripe")
    answer = await stripe.create_charge(charge_request(payment_id, attempt, PROCESSING_TOKEN))
    assert answer.status is ProcessorStatus.PROCESSING
    if state == "processing":
        await processor_working(pool, payment_id, attempt, answer.processor_reference)
    else:
        await answer_lost(pool, stripe_tenant, payment_id, attempt)
    before = status(await payment(pool, stripe_tenant, payment_id))
    assert before == f"PAYMENT_STATUS_{state.upper()}"
    fake_stripe.finish_processing(answer.processor_reference)
    (event,) = events_of(fake_stripe, "payment_intent.succeeded", answer.processor_reference)

    response = await fake_stripe.send_event(stripe_url(webhooks, stripe_tenant), event, STRIPE_WHSEC)

    assert response.status_code == 200, response.text
    assert response.json() == {"received": True, "duplicate": False, "outcome": "applied"}
    after = await payment(pool, stripe_tenant, payment_id)
    assert status(after) == "PAYMENT_STATUS_SUCCEEDED"
    assert after.amount_captured_minor == 1050
    assert after.processor_reference == answer.processor_reference
    assert [payments_pb2.AttemptStatus.Name(a.status) for a in after.attempts] == ["ATTEMPT_STATUS_SUCCEEDED"]
    cause = "attempt_succeeded" if state == "processing" else "resolved_succeeded"
    assert after.transitions[-1].cause == cause
    assert not await lookup_due(pool, payment_id)
    await assert_balanced_capture(pool, stripe_tenant, payment_id, 1050)
    assert [e.event_type for e in await payment_events(pool, payment_id)] == ["payment.succeeded"]
    (row,) = await webhook_rows(pool, stripe_tenant)
    assert (row["processor"], row["event_id"], row["verified"], row["outcome"]) == (
        "stripe",
        event["id"],
        True,
        "applied",
    )
    assert row["payment_id"] == payment_id
    assert "client_secret" not in row["payload"]  # Stripe: never stored
    assert event["data"]["object"]["client_secret"] not in row["payload"]


async def test_stripe_payment_failed_event_fails_the_payment_without_failover(
    pool: asyncpg.Pool,
    stripe_tenant: uuid.UUID,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    payment_id = await new_payment(pool, stripe_tenant, payment_method=PROCESSING_TOKEN)
    attempt = await start_attempt(pool, stripe_tenant, payment_id, "stripe")
    answer = await stripe.create_charge(charge_request(payment_id, attempt, PROCESSING_TOKEN))
    await answer_lost(pool, stripe_tenant, payment_id, attempt)
    fake_stripe.finish_processing(answer.processor_reference, succeed=False)
    (event,) = events_of(fake_stripe, "payment_intent.payment_failed", answer.processor_reference)

    response = await fake_stripe.send_event(stripe_url(webhooks, stripe_tenant), event, STRIPE_WHSEC)

    assert response.status_code == 200
    after = await payment(pool, stripe_tenant, payment_id)
    assert status(after) == "PAYMENT_STATUS_FAILED"
    assert after.failure_code == "generic_decline"
    assert len(after.attempts) == 1  # a decline is the bank's answer: no failover
    assert await payment_journals(pool, stripe_tenant, payment_id) == []
    assert [e.event_type for e in await payment_events(pool, payment_id)] == ["payment.failed"]


async def test_duplicate_event_id_is_acknowledged_and_has_no_second_effect(
    pool: asyncpg.Pool,
    stripe_tenant: uuid.UUID,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    payment_id, event = await stripe_unknown_payment(pool, stripe_tenant, stripe, fake_stripe)
    url = stripe_url(webhooks, stripe_tenant)

    first = await fake_stripe.send_event(url, event, STRIPE_WHSEC)
    again = await fake_stripe.send_event(url, event, STRIPE_WHSEC)  # Stripe retries: same event id
    later = await fake_stripe.send_event(url, event, STRIPE_WHSEC, timestamp=int(time.time()) + 1)

    assert [r.status_code for r in (first, again, later)] == [200, 200, 200]
    assert [r.json()["duplicate"] for r in (first, again, later)] == [False, True, True]
    after = await payment(pool, stripe_tenant, payment_id)
    assert status(after) == "PAYMENT_STATUS_SUCCEEDED"
    assert [t.cause for t in after.transitions].count("resolved_succeeded") == 1
    await assert_balanced_capture(pool, stripe_tenant, payment_id, 1050)
    assert len(await payment_events(pool, payment_id)) == 1
    (row,) = await webhook_rows(pool, stripe_tenant)
    assert (row["deliveries"], row["outcome"]) == (3, "applied")


async def test_event_already_recorded_by_the_worker_changes_nothing(
    pool: asyncpg.Pool,
    stripe_tenant: uuid.UUID,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    payment_id = await new_payment(pool, stripe_tenant)
    attempt = await start_attempt(pool, stripe_tenant, payment_id, "stripe")
    charged = await stripe.create_charge(charge_request(payment_id, attempt, "pm_card_visa"))
    async with pool.acquire() as conn, conn.transaction():  # the worker got the answer first
        await store.finish_attempt(
            conn, stripe_tenant, payment_id, attempt, OperationTrigger.SUCCEEDED,
            processor_reference=charged.processor_reference,
        )  # fmt: skip
        await store.record_transition(
            conn, stripe_tenant, payment_id, PaymentStatus.PROCESSING, PaymentStatus.SUCCEEDED,
            PaymentTrigger.ATTEMPT_SUCCEEDED, attempt_no=attempt, amount_captured_minor=1050,
        )  # fmt: skip
    (event,) = events_of(fake_stripe, "payment_intent.succeeded", charged.processor_reference)

    response = await fake_stripe.send_event(stripe_url(webhooks, stripe_tenant), event, STRIPE_WHSEC)

    assert response.status_code == 200
    assert response.json()["outcome"] == "already_applied"
    assert await payment_journals(pool, stripe_tenant, payment_id) == []  # the worker's record stands
    assert await payment_events(pool, payment_id) == []


async def test_success_for_an_attempt_recorded_as_not_charged_is_left_to_an_operator(
    pool: asyncpg.Pool,
    stripe_tenant: uuid.UUID,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
    logs_without_secrets: list[MutableMapping[str, Any]],
) -> None:
    payment_id = await new_payment(pool, stripe_tenant)
    attempt = await start_attempt(pool, stripe_tenant, payment_id, "stripe")
    charged = await stripe.create_charge(charge_request(payment_id, attempt, "pm_card_visa"))
    async with pool.acquire() as conn, conn.transaction():  # wrongly resolved as not charged
        await store.finish_attempt(
            conn,
            stripe_tenant,
            payment_id,
            attempt,
            OperationTrigger.FAILED,
            failure_code="not_found_at_processor",
        )
        await store.record_transition(
            conn, stripe_tenant, payment_id, PaymentStatus.PROCESSING, PaymentStatus.FAILED,
            PaymentTrigger.ATTEMPT_FAILED, attempt_no=attempt,
        )  # fmt: skip
    (event,) = events_of(fake_stripe, "payment_intent.succeeded", charged.processor_reference)

    response = await fake_stripe.send_event(stripe_url(webhooks, stripe_tenant), event, STRIPE_WHSEC)

    assert response.status_code == 200
    assert response.json()["outcome"] == "needs_operator"
    assert status(await payment(pool, stripe_tenant, payment_id)) == "PAYMENT_STATUS_FAILED"
    assert await payment_journals(pool, stripe_tenant, payment_id) == []
    errors = [e for e in logs_without_secrets if e["log_level"] == "error"]
    assert errors
    assert "possible double charge" in errors[0]["reason"]


async def test_stripe_capture_and_refund_events_settle_open_operations(
    pool: asyncpg.Pool,
    stripe_tenant: uuid.UUID,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    url = stripe_url(webhooks, stripe_tenant)
    payment_id = await new_payment(pool, stripe_tenant, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    attempt = await start_attempt(pool, stripe_tenant, payment_id, "stripe")
    authorized = await stripe.create_charge(charge_request(payment_id, attempt, "pm_card_visa", manual=True))
    assert authorized.status is ProcessorStatus.REQUIRES_CAPTURE
    intent = authorized.processor_reference
    await answer_lost(pool, stripe_tenant, payment_id, attempt)
    (authorization,) = events_of(fake_stripe, "payment_intent.amount_capturable_updated", intent)
    assert (await fake_stripe.send_event(url, authorization, STRIPE_WHSEC)).json()["outcome"] == "applied"
    assert status(await payment(pool, stripe_tenant, payment_id)) == "PAYMENT_STATUS_REQUIRES_CAPTURE"
    assert await payment_journals(pool, stripe_tenant, payment_id) == []  # an authorization moves no money

    # CapturePayment, sent by the worker (capture PROCESSING); its answer is lost, the webhook tells.
    capture_request = payments_pb2.CapturePaymentRequest(request_id="cap-1", payment_id=str(payment_id))
    accepted = await store.capture_payment(pool, stripe_tenant, capture_request, payment_id)
    assert isinstance(accepted, payments_pb2.CapturePaymentResponse)
    capture_id = uuid.UUID(accepted.capture.capture_id)
    await pool.execute("UPDATE payment_captures SET status = 'processing' WHERE id = $1", capture_id)
    await stripe.capture(intent, 1050, "EUR", str(capture_id))
    (captured,) = events_of(fake_stripe, "payment_intent.succeeded", intent)
    assert (await fake_stripe.send_event(url, captured, STRIPE_WHSEC)).json()["outcome"] == "applied"
    after_capture = await payment(pool, stripe_tenant, payment_id)
    assert status(after_capture) == "PAYMENT_STATUS_SUCCEEDED"
    assert after_capture.captures[0].status == payments_pb2.CAPTURE_STATUS_SUCCEEDED
    journals = await payment_journals(pool, stripe_tenant, payment_id)
    assert [j.idempotency_key for j in journals] == [f"capture:{capture_id}"]

    # RefundPayment of 300, sent (refund PROCESSING); Stripe's refund event settles it.
    refund_request = payments_pb2.RefundPaymentRequest(
        request_id="ref-1", payment_id=str(payment_id), amount_minor=300
    )
    refunded = await store.refund_payment(pool, stripe_tenant, refund_request, payment_id)
    assert isinstance(refunded, payments_pb2.RefundPaymentResponse)
    refund_id = uuid.UUID(refunded.refund.refund_id)
    await pool.execute("UPDATE payment_refunds SET status = 'processing' WHERE id = $1", refund_id)
    at_stripe = await stripe.refund(intent, 300, "EUR", str(refund_id))
    refund_event = fake_stripe.event("refund.updated", fake_stripe.refunds[at_stripe.processor_reference])
    assert (await fake_stripe.send_event(url, refund_event, STRIPE_WHSEC)).json()["outcome"] == "applied"
    # charge.refunded only repeats the total, already recorded.
    (charge_refunded,) = [e for e in fake_stripe.events if e["type"] == "charge.refunded"]
    assert (await fake_stripe.send_event(url, charge_refunded, STRIPE_WHSEC)).json()[
        "outcome"
    ] == "already_applied"

    final = await payment(pool, stripe_tenant, payment_id)
    assert final.amount_refunded_minor == 300
    assert final.refunds[0].status == payments_pb2.REFUND_STATUS_SUCCEEDED
    assert final.refunds[0].processor_reference == at_stripe.processor_reference
    journals = await payment_journals(pool, stripe_tenant, payment_id)
    assert [j.idempotency_key for j in journals] == [f"capture:{capture_id}", f"refund:{refund_id}"]
    assert all(sum(p.amount_minor for p in j.postings) == 0 for j in journals)
    assert (await verify_chain(pool, stripe_tenant)).ok
    kinds = [e.event_type for e in await payment_events(pool, payment_id)]
    assert kinds == ["payment.requires_capture", "payment.captured", "payment.refunded"]


# --- Stripe: deliveries that do not verify are never trusted ------------------------------------------


def _tampered(event: dict[str, Any]) -> tuple[bytes, str]:
    """Signed for the genuine body, delivered with another amount."""
    genuine = json.dumps(event, separators=(",", ":")).encode()
    forged = json.loads(genuine)
    forged["data"]["object"]["amount_received"] = 1
    return json.dumps(forged, separators=(",", ":")).encode(), signature_header(genuine, STRIPE_WHSEC)


def _signed(event: dict[str, Any], secret: str, timestamp: int) -> tuple[bytes, str]:
    body = json.dumps(event, separators=(",", ":")).encode()
    return body, signature_header(body, secret, timestamp=timestamp)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered", "matches the payload"),
        ("wrong_secret", "matches the payload"),
        ("expired", "possible replay"),
        ("future", "in the future"),
        ("no_header", "no Stripe-Signature header"),
    ],
)
async def test_unverified_stripe_delivery_is_refused_untrusted_and_looked_up(
    case: str,
    reason: str,
    pool: asyncpg.Pool,
    stripe_tenant: uuid.UUID,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    payment_id, event = await stripe_unknown_payment(pool, stripe_tenant, stripe, fake_stripe)
    assert not await lookup_due(pool, payment_id)
    now = int(time.time())
    if case == "tampered":
        body, header = _tampered(event)
    elif case == "wrong_secret":
        body, header = _signed(event, FORGED_WHSEC, now)
    elif case == "expired":
        body, header = _signed(event, STRIPE_WHSEC, now - 301)  # tolerance: 300 s
    elif case == "future":
        body, header = _signed(event, STRIPE_WHSEC, now + 301)
    else:
        body, header = _signed(event, STRIPE_WHSEC, now)
    headers = {} if case == "no_header" else {SIGNATURE_HEADER: header}

    response = await post_raw(stripe_url(webhooks, stripe_tenant), body, headers)

    assert response.status_code == 400
    assert response.json() == {"error": "signature verification failed"}
    after = await payment(pool, stripe_tenant, payment_id)
    assert status(after) == "PAYMENT_STATUS_UNKNOWN"  # nothing trusted
    assert after.amount_captured_minor == 0
    assert await payment_journals(pool, stripe_tenant, payment_id) == []
    assert await payment_events(pool, payment_id) == []
    assert await lookup_due(pool, payment_id)  # the janitor asks Stripe itself, now
    (row,) = await webhook_rows(pool, stripe_tenant)
    assert (row["verified"], row["outcome"], row["payment_id"]) == (False, "rejected", payment_id)
    assert reason in row["detail"]
    assert "1 lookup(s) scheduled" in row["detail"]
    assert_no_secret(response.text + repr(dict(row)))

    # The genuine event still gets through afterwards: a forged copy never blocks it as a "duplicate".
    genuine = await fake_stripe.send_event(stripe_url(webhooks, stripe_tenant), event, STRIPE_WHSEC)
    assert genuine.json() == {"received": True, "duplicate": False, "outcome": "applied"}
    assert status(await payment(pool, stripe_tenant, payment_id)) == "PAYMENT_STATUS_SUCCEEDED"


async def test_lookup_is_not_brought_into_the_in_flight_window(
    pool: asyncpg.Pool,
    stripe_tenant: uuid.UUID,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    payment_id, event = await stripe_unknown_payment(pool, stripe_tenant, stripe, fake_stripe)
    # The answer was lost just now: the request may still be executing at Stripe.
    await pool.execute("UPDATE payment_attempts SET updated_at = now() WHERE payment_id = $1", payment_id)
    body, header = _signed(event, FORGED_WHSEC, int(time.time()))

    response = await post_raw(stripe_url(webhooks, stripe_tenant), body, {SIGNATURE_HEADER: header})

    assert response.status_code == 400
    row = await pool.fetchrow(
        "SELECT next_lookup_at, updated_at, now() AS now FROM payment_attempts WHERE payment_id = $1",
        payment_id,
    )
    assert row is not None
    lead_s = (row["next_lookup_at"] - row["updated_at"]).total_seconds()
    assert lead_s == pytest.approx(60.0, abs=1.0)  # SWITCHBOARD_PAYMENT_LOOKUP_AFTER_S, not now
    assert row["next_lookup_at"] > row["now"]


async def test_rotated_endpoint_secrets_both_verify(
    pool: asyncpg.Pool,
    key_ring: MasterKeyRing,
    tenant: TenantCredentials,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    await store_config(
        pool, key_ring, tenant.tenant_id, stripe_config(webhook_secrets=(STRIPE_WHSEC_NEW, STRIPE_WHSEC))
    )
    url = stripe_url(webhooks, tenant.tenant_id)
    outcomes = []
    for secrets in ([STRIPE_WHSEC], [STRIPE_WHSEC_NEW], [STRIPE_WHSEC_NEW, STRIPE_WHSEC]):
        payment_id, event = await stripe_unknown_payment(pool, tenant.tenant_id, stripe, fake_stripe)
        response = await fake_stripe.send_event(url, event, secrets)
        outcomes.append((response.status_code, response.json()["outcome"]))
        assert status(await payment(pool, tenant.tenant_id, payment_id)) == "PAYMENT_STATUS_SUCCEEDED"
    assert outcomes == [(200, "applied")] * 3


async def test_another_tenants_path_cannot_verify_this_tenants_event(
    pool: asyncpg.Pool,
    key_ring: MasterKeyRing,
    stripe_tenant: uuid.UUID,
    other_tenant: TenantCredentials,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    await store_config(pool, key_ring, other_tenant.tenant_id, stripe_config(webhook_secrets=(OTHER_WHSEC,)))
    payment_id, event = await stripe_unknown_payment(pool, stripe_tenant, stripe, fake_stripe)
    other_url = stripe_url(webhooks, other_tenant.tenant_id)

    # acme's event, signed with acme's secret, at globex's path: globex's secrets do not verify it.
    refused = await fake_stripe.send_event(other_url, event, STRIPE_WHSEC)
    # Signed with globex's own secret: verified for globex, but globex has no such payment.
    unmatched = await fake_stripe.send_event(other_url, event, OTHER_WHSEC)

    assert refused.status_code == 400
    assert unmatched.json() == {"received": True, "duplicate": False, "outcome": "unmatched"}
    assert status(await payment(pool, stripe_tenant, payment_id)) == "PAYMENT_STATUS_UNKNOWN"
    assert not await lookup_due(pool, payment_id)  # globex's deliveries cannot touch acme's payment
    assert await webhook_rows(pool, stripe_tenant) == []
    assert [(r["verified"], r["outcome"]) for r in await webhook_rows(pool, other_tenant.tenant_id)] == [
        (False, "rejected"),
        (True, "unmatched"),
    ]


async def test_tenant_without_a_signing_secret_trusts_nothing(
    pool: asyncpg.Pool,
    key_ring: MasterKeyRing,
    tenant: TenantCredentials,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    await store_config(pool, key_ring, tenant.tenant_id, stripe_config(webhook_secrets=()))
    payment_id, event = await stripe_unknown_payment(pool, tenant.tenant_id, stripe, fake_stripe)

    response = await fake_stripe.send_event(stripe_url(webhooks, tenant.tenant_id), event, STRIPE_WHSEC)

    assert response.status_code == 400
    assert status(await payment(pool, tenant.tenant_id, payment_id)) == "PAYMENT_STATUS_UNKNOWN"
    assert await lookup_due(pool, payment_id)
    (row,) = await webhook_rows(pool, tenant.tenant_id)
    assert "no webhook signing secret" in row["detail"]


async def test_body_too_large_malformed_and_unknown_tenant(
    pool: asyncpg.Pool, stripe_tenant: uuid.UUID, webhooks: WebhookServer
) -> None:
    url = stripe_url(webhooks, stripe_tenant)
    big = b'{"pad": "' + b"x" * BODY_LIMIT + b'"}'
    too_large = await post_raw(url, big, {SIGNATURE_HEADER: signature_header(big, STRIPE_WHSEC)})
    adyen_too_large = await post_raw(adyen_url(webhooks, stripe_tenant), big)
    not_json = b"this is not json"
    malformed = await post_raw(url, not_json, {SIGNATURE_HEADER: signature_header(not_json, STRIPE_WHSEC)})
    no_id = b'{"object": "event", "type": "payment_intent.succeeded"}'
    envelope = await post_raw(url, no_id, {SIGNATURE_HEADER: signature_header(no_id, STRIPE_WHSEC)})
    unknown = await post_raw(stripe_url(webhooks, uuid.uuid4()), not_json)
    not_uuid = await post_raw(f"{webhooks.base_url}/webhooks/stripe/acme", not_json)

    assert (too_large.status_code, adyen_too_large.status_code) == (413, 413)
    assert (malformed.status_code, envelope.status_code) == (400, 400)
    assert (unknown.status_code, not_uuid.status_code) == (404, 404)
    assert await webhook_rows(pool, stripe_tenant) == []


async def test_unhandled_event_type_is_recorded_and_acknowledged(
    pool: asyncpg.Pool, stripe_tenant: uuid.UUID, webhooks: WebhookServer, fake_stripe: FakeStripe
) -> None:
    event = fake_stripe.event("customer.created", {"id": "cus_123", "object": "customer"})

    response = await fake_stripe.send_event(stripe_url(webhooks, stripe_tenant), event, STRIPE_WHSEC)

    assert response.json() == {"received": True, "duplicate": False, "outcome": "ignored"}
    (row,) = await webhook_rows(pool, stripe_tenant)
    assert (row["verified"], row["event_type"], row["outcome"]) == (True, "customer.created", "ignored")


# --- Adyen ------------------------------------------------------------------------------------------


async def adyen_unknown_payment(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, adyen: AdyenProcessor, **overrides: Any
) -> uuid.UUID:
    """A payment authorised at Adyen (automatic capture) whose answer was lost (UNKNOWN)."""
    payment_id = await new_payment(pool, tenant_id, payment_method="stored_succeed", **overrides)
    attempt = await start_attempt(pool, tenant_id, payment_id, "adyen")
    charged = await adyen.create_charge(charge_request(payment_id, attempt, "stored_succeed"))
    assert charged.status is ProcessorStatus.SUCCEEDED
    await answer_lost(pool, tenant_id, payment_id, attempt)
    return payment_id


async def test_adyen_signed_authorisation_resolves_the_payment_and_answers_accepted(
    pool: asyncpg.Pool,
    adyen_tenant: uuid.UUID,
    webhooks: WebhookServer,
    adyen: AdyenProcessor,
    fake_adyen: FakeAdyen,
) -> None:
    payment_id = await adyen_unknown_payment(pool, adyen_tenant, adyen)
    url = adyen_url(webhooks, adyen_tenant)

    response = await fake_adyen.deliver_notifications(url)
    assert response is not None
    fake_adyen.delivered_notifications = 0
    again = await fake_adyen.deliver_notifications(url)  # Adyen retries: recognised as a repeat
    assert again is not None

    assert (response.status_code, response.text) == (200, ADYEN_ACCEPTED)
    assert (again.status_code, again.text) == (200, ADYEN_ACCEPTED)
    after = await payment(pool, adyen_tenant, payment_id)
    assert status(after) == "PAYMENT_STATUS_SUCCEEDED"
    assert after.processor_reference == fake_adyen.charges[0].psp_reference
    await assert_balanced_capture(pool, adyen_tenant, payment_id, 1050)
    assert [e.event_type for e in await payment_events(pool, payment_id)] == ["payment.succeeded"]
    (row,) = await webhook_rows(pool, adyen_tenant)
    psp = fake_adyen.charges[0].psp_reference
    assert (row["event_id"], row["verified"], row["deliveries"], row["outcome"]) == (
        f"AUTHORISATION:{psp}:true",
        True,
        2,
        "applied",
    )


@pytest.mark.parametrize("case", ["wrong_key", "tampered", "unsigned"])
async def test_adyen_item_that_fails_hmac_is_refused_untrusted_and_looked_up(
    case: str,
    pool: asyncpg.Pool,
    adyen_tenant: uuid.UUID,
    webhooks: WebhookServer,
    adyen: AdyenProcessor,
    fake_adyen: FakeAdyen,
) -> None:
    payment_id = await adyen_unknown_payment(pool, adyen_tenant, adyen)
    (item,) = fake_adyen.notifications
    if case == "wrong_key":
        forged = FakeAdyen(ADYEN_KEY, ADYEN_MERCHANT, hmac_key=ADYEN_HMAC_NEW).sign(item)
    elif case == "tampered":
        forged = {**item, "amount": {"currency": "EUR", "value": 1}}
    else:
        forged = {**item, "additionalData": {}}
    body = json.dumps(FakeAdyen.notification_request([forged])).encode()

    response = await post_raw(adyen_url(webhooks, adyen_tenant), body)

    assert response.status_code == 400
    assert ADYEN_ACCEPTED not in response.text
    assert status(await payment(pool, adyen_tenant, payment_id)) == "PAYMENT_STATUS_UNKNOWN"
    assert await payment_journals(pool, adyen_tenant, payment_id) == []
    assert await lookup_due(pool, payment_id)
    (row,) = await webhook_rows(pool, adyen_tenant)
    assert (row["verified"], row["outcome"], row["payment_id"]) == (False, "rejected", payment_id)
    assert_no_secret(response.text + repr(dict(row)))


async def test_adyen_rotated_hmac_keys_and_mixed_batches(
    pool: asyncpg.Pool,
    key_ring: MasterKeyRing,
    tenant: TenantCredentials,
    webhooks: WebhookServer,
    adyen: AdyenProcessor,
    fake_adyen: FakeAdyen,
) -> None:
    await store_config(
        pool,
        key_ring,
        tenant.tenant_id,
        adyen_config(base_url=fake_adyen.checkout_url, hmac_keys=(ADYEN_HMAC_NEW, ADYEN_HMAC)),
    )
    old_signed = await adyen_unknown_payment(pool, tenant.tenant_id, adyen)
    new_signed = await adyen_unknown_payment(pool, tenant.tenant_id, adyen)
    forged_one = await adyen_unknown_payment(pool, tenant.tenant_id, adyen)
    first, second, third = fake_adyen.notifications
    second = FakeAdyen(ADYEN_KEY, ADYEN_MERCHANT, hmac_key=ADYEN_HMAC_NEW).sign(second)
    third = FakeAdyen(ADYEN_KEY, ADYEN_MERCHANT, hmac_key="AB" * 32).sign(third)
    body = json.dumps(FakeAdyen.notification_request([first, second, third])).encode()

    response = await post_raw(adyen_url(webhooks, tenant.tenant_id), body)

    assert response.status_code == 400  # one item failed: Adyen sends the batch again
    assert response.json() == {"error": "1 of 3 notification item(s) failed verification"}
    statuses = [
        status(await payment(pool, tenant.tenant_id, p)) for p in (old_signed, new_signed, forged_one)
    ]
    assert statuses == ["PAYMENT_STATUS_SUCCEEDED", "PAYMENT_STATUS_SUCCEEDED", "PAYMENT_STATUS_UNKNOWN"]
    assert await lookup_due(pool, forged_one)


async def test_adyen_capture_and_refund_notifications_settle_open_operations(
    pool: asyncpg.Pool,
    adyen_tenant: uuid.UUID,
    webhooks: WebhookServer,
    adyen: AdyenProcessor,
    fake_adyen: FakeAdyen,
) -> None:
    url = adyen_url(webhooks, adyen_tenant)
    payment_id = await new_payment(
        pool, adyen_tenant, payment_method="stored_succeed", capture_method=payments_pb2.CAPTURE_METHOD_MANUAL
    )
    attempt = await start_attempt(pool, adyen_tenant, payment_id, "adyen")
    await adyen.create_charge(charge_request(payment_id, attempt, "stored_succeed", manual=True))
    await answer_lost(pool, adyen_tenant, payment_id, attempt)
    assert (await fake_adyen.deliver_notifications(url)) is not None
    assert status(await payment(pool, adyen_tenant, payment_id)) == "PAYMENT_STATUS_REQUIRES_CAPTURE"
    psp = fake_adyen.charges[0].psp_reference

    capture_request = payments_pb2.CapturePaymentRequest(request_id="cap-1", payment_id=str(payment_id))
    accepted = await store.capture_payment(pool, adyen_tenant, capture_request, payment_id)
    assert isinstance(accepted, payments_pb2.CapturePaymentResponse)
    capture_id = uuid.UUID(accepted.capture.capture_id)
    received = await adyen.capture(psp, 1050, "EUR", str(capture_id))
    assert received.status is ProcessorStatus.PROCESSING  # Adyen: "received", the webhook follows
    await pool.execute("UPDATE payment_captures SET status = 'processing' WHERE id = $1", capture_id)
    response = await fake_adyen.deliver_notifications(url)
    assert response is not None
    assert response.text == ADYEN_ACCEPTED
    assert status(await payment(pool, adyen_tenant, payment_id)) == "PAYMENT_STATUS_SUCCEEDED"

    refund_request = payments_pb2.RefundPaymentRequest(
        request_id="ref-1", payment_id=str(payment_id), amount_minor=50
    )
    refunded = await store.refund_payment(pool, adyen_tenant, refund_request, payment_id)
    assert isinstance(refunded, payments_pb2.RefundPaymentResponse)
    refund_id = uuid.UUID(refunded.refund.refund_id)
    at_adyen = await adyen.refund(psp, 50, "EUR", str(refund_id))
    await pool.execute(
        "UPDATE payment_refunds SET status = 'processing', processor_reference = $2 WHERE id = $1",
        refund_id,
        at_adyen.processor_reference,
    )
    response = await fake_adyen.deliver_notifications(url)
    assert response is not None
    assert response.text == ADYEN_ACCEPTED

    final = await payment(pool, adyen_tenant, payment_id)
    assert (final.amount_captured_minor, final.amount_refunded_minor) == (1050, 50)
    journals = await payment_journals(pool, adyen_tenant, payment_id)
    assert [j.idempotency_key for j in journals] == [f"capture:{capture_id}", f"refund:{refund_id}"]
    assert all(sum(p.amount_minor for p in j.postings) == 0 for j in journals)
    outcomes = [(r["event_type"], r["outcome"]) for r in await webhook_rows(pool, adyen_tenant)]
    assert outcomes == [("AUTHORISATION", "applied"), ("CAPTURE", "applied"), ("REFUND", "applied")]


async def test_stripe_canceled_intent_cancels_a_requested_cancel(
    pool: asyncpg.Pool,
    stripe_tenant: uuid.UUID,
    webhooks: WebhookServer,
    stripe: StripeProcessor,
    fake_stripe: FakeStripe,
) -> None:
    payment_id = await new_payment(pool, stripe_tenant, capture_method=payments_pb2.CAPTURE_METHOD_MANUAL)
    attempt = await start_attempt(pool, stripe_tenant, payment_id, "stripe")
    authorized = await stripe.create_charge(charge_request(payment_id, attempt, "pm_card_visa", manual=True))
    async with pool.acquire() as conn, conn.transaction():  # the worker recorded the authorization
        await store.finish_attempt(
            conn,
            stripe_tenant,
            payment_id,
            attempt,
            OperationTrigger.SUCCEEDED,
            processor_reference=authorized.processor_reference,
        )
        await store.record_transition(
            conn,
            stripe_tenant,
            payment_id,
            PaymentStatus.PROCESSING,
            PaymentStatus.REQUIRES_CAPTURE,
            PaymentTrigger.ATTEMPT_AUTHORIZED,
            attempt_no=attempt,
        )
    cancel_request = payments_pb2.CancelPaymentRequest(
        request_id="cancel-1", payment_id=str(payment_id), reason="out of stock"
    )
    assert isinstance(
        await store.cancel_payment(pool, stripe_tenant, cancel_request, payment_id),
        payments_pb2.CancelPaymentResponse,
    )
    await stripe.cancel(authorized.processor_reference, f"{payment_id}_cancel")  # its answer is lost
    (event,) = events_of(fake_stripe, "payment_intent.canceled", authorized.processor_reference)

    response = await fake_stripe.send_event(stripe_url(webhooks, stripe_tenant), event, STRIPE_WHSEC)

    assert response.json()["outcome"] == "applied"
    after = await payment(pool, stripe_tenant, payment_id)
    assert status(after) == "PAYMENT_STATUS_CANCELED"
    assert after.transitions[-1].cause == "cancel_succeeded"
    assert after.transitions[-1].detail == "out of stock"
    assert await payment_journals(pool, stripe_tenant, payment_id) == []  # nothing was captured
    kinds = [e.event_type for e in await payment_events(pool, payment_id)]
    assert kinds == ["payment.canceled"]


# --- the process entry point ------------------------------------------------------------------------

RUN_SERVER = "import asyncio; from payments.webhooks import run_webhook_server; " + (
    "from switchboard.settings import Settings; asyncio.run(run_webhook_server(Settings()))"
)


async def test_run_webhook_server_serves_until_sigterm(
    settings: Settings, stripe_tenant: uuid.UUID, fake_stripe: FakeStripe, pool: asyncpg.Pool
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_DATABASE_URL=settings.require_database_url(),
        SWITCHBOARD_MASTER_KEY=settings.master_key.get_secret_value() if settings.master_key else "",
        SWITCHBOARD_WEBHOOK_ADDR=f"127.0.0.1:{port}",
        SWITCHBOARD_KAFKA_TOPIC_PREFIX=settings.kafka_topic_prefix,
    )
    process = subprocess.Popen(  # noqa: ASYNC220 (started once, waited for in a thread)
        [sys.executable, "-c", RUN_SERVER], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 30, process)
        event = fake_stripe.event("customer.created", {"id": "cus_1", "object": "customer"})
        url = f"http://127.0.0.1:{port}/webhooks/stripe/{stripe_tenant}"
        accepted = await fake_stripe.send_event(url, event, STRIPE_WHSEC)
        refused = await fake_stripe.send_event(url, event, FORGED_WHSEC)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 20)
        output = process.stdout.read().decode() if process.stdout else ""
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0, output
    assert (accepted.status_code, refused.status_code) == (200, 400)
    assert "webhook endpoint stopped" in output
    assert_no_secret(output)
    assert [(r["verified"], r["outcome"]) for r in await webhook_rows(pool, stripe_tenant)] == [
        (True, "ignored"),
        (False, "rejected"),
    ]


async def test_unverified_body_jsonb_cannot_hold_is_recorded_without_payload(
    pool: asyncpg.Pool, stripe_tenant: uuid.UUID, webhooks: WebhookServer
) -> None:
    bodies = [b'{"id": "evt_nul\\u0000", "data": {"object": {"id": "pi_\\ud800"}}}', b"\xff\xfe not utf-8"]

    responses = [await post_raw(stripe_url(webhooks, stripe_tenant), body) for body in bodies]

    assert [r.status_code for r in responses] == [400, 400]
    rows = await webhook_rows(pool, stripe_tenant)
    assert [(r["verified"], r["outcome"], r["payload"], r["event_id"]) for r in rows] == [
        (False, "rejected", None, ""),
        (False, "rejected", None, ""),
    ]
