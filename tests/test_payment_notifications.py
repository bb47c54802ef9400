"""Payment events -> notification rules -> notifications (payments/notification_rules.py,
payments/event_notifier.py, ``switchboard payments notify-rules``).

Rule validation and rendering are pure; the rest runs against the real
PostgreSQL and the real broker: the test produces ``PaymentEvent`` messages to
``<prefix>payments.events`` itself (keyed by tenant, as the payment worker's
outbox relay does) and the notifier, the relay and the email worker deliver
to the SMTP sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from structlog.testing import capture_logs

from channels.catalog import payment_events_topic
from gateway.validation import validate_send_request
from payments.event_notifier import Outcome, PaymentEventNotifier, consumer_group
from payments.notification_rules import (
    NotificationRule,
    RenderError,
    RuleInvalid,
    RuleSpec,
    RuleTemplates,
    delete_rule,
    format_major_units,
    list_rules,
    notification_request_id,
    render_notification,
    rules_for_event,
    set_rule,
    validate_rule,
)
from switchboard.kafka import ensure_topics
from switchboard.notify.v1 import notify_pb2
from switchboard.payments.v1 import events_pb2, payments_pb2
from switchboard.settings import Settings
from tests.conftest import SmtpSink, TenantCredentials
from tests.helpers import group_offsets, running_pipeline, wait_for

RECEIPT = RuleSpec(
    name="receipt",
    event_type="payment.succeeded",
    channels=("email",),
    templates=RuleTemplates(
        email_subject="Receipt: $amount $currency",
        email_text=(
            "Paid $amount $currency for $description (payment $payment_id, customer $customer_reference)."
        ),
        email_html="<p>Paid <b>$amount $currency</b> for $description</p>",
    ),
)


def payment_event(tenant_id: uuid.UUID, **overrides: Any) -> events_pb2.PaymentEvent:
    """A payment.succeeded event of 10.50 EUR for ada@example.com; keywords replace fields."""
    event = events_pb2.PaymentEvent(
        event_id=str(uuid.uuid4()),
        event_type="payment.succeeded",
        tenant_id=str(tenant_id),
        payment_id=str(uuid.uuid4()),
        status=payments_pb2.PAYMENT_STATUS_SUCCEEDED,
        previous_status=payments_pb2.PAYMENT_STATUS_PROCESSING,
        amount_minor=1050,
        currency="EUR",
        amount_captured_minor=1050,
        customer=payments_pb2.CustomerContact(email="ada@example.com", phone_number="+14155550123"),
        customer_reference="cus-42",
        description="Order 42",
        metadata={"order": "42"},
        processor="stripe",
        processor_reference="pi_123",
        attempt_no=1,
    )
    event.occur_time.FromDatetime(datetime(2026, 1, 31, 9, 30, tzinfo=UTC))
    for name, value in overrides.items():
        field = getattr(event, name)
        if isinstance(value, dict):
            field.clear()
            field.update(value)
        elif hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        else:
            setattr(event, name, value)
    return event


def stored(spec: RuleSpec, tenant_id: uuid.UUID | None = None) -> NotificationRule:
    """``spec`` as a stored rule (fixed id), without a database."""
    now = datetime.now(UTC)
    rule_id = uuid.UUID("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")
    return NotificationRule(rule_id, tenant_id or uuid.uuid4(), validate_rule(spec), now, now)


def fields_of(error: pytest.ExceptionInfo[RuleInvalid]) -> set[str]:
    return {v.field for v in error.value.violations}


# --- validation ------------------------------------------------------------------------------------


def test_rule_validation_names_every_bad_field() -> None:
    with pytest.raises(RuleInvalid) as bad:
        validate_rule(
            RuleSpec(
                name="Bad Name",
                event_type="payment.teleported",
                channels=("email", "fax", "email"),
                templates=RuleTemplates(email_subject="Receipt $amont"),
            )
        )
    assert fields_of(bad) == {
        "name",
        "event_type",
        "channels[1]",
        "channels[2]",
        "email_subject",
        "email_text",
    }
    by_field = {v.field: v.description for v in bad.value.violations}
    assert "unknown placeholder $amont" in by_field["email_subject"]
    assert "$amount" in by_field["email_subject"]  # the known ones are listed
    assert "payment.succeeded" in by_field["event_type"]
    assert "fax" in by_field["channels[1]"]
    assert "twice" in by_field["channels[2]"]
    assert "email_subject" in str(bad.value)


def test_rule_validation_of_templates_and_channels() -> None:
    with pytest.raises(RuleInvalid) as bad:
        validate_rule(
            RuleSpec(
                "receipt",
                "payment.succeeded",
                ("email",),
                RuleTemplates(email_subject="Hi", email_html="<p>costs $ 5</p>", sms_text="Paid $amount"),
            )
        )
    assert fields_of(bad) == {"email_html", "sms_text"}
    by_field = {v.field: v.description for v in bad.value.violations}
    assert "$$ for a literal $" in by_field["email_html"]
    assert "only used with the sms channel" in by_field["sms_text"]

    with pytest.raises(RuleInvalid) as empty:
        validate_rule(RuleSpec("r", "payment.refunded", ()))
    assert fields_of(empty) == {"channels"}

    with pytest.raises(RuleInvalid) as no_content:
        validate_rule(RuleSpec("r", "payment.refunded", ("sms", "push")))
    assert fields_of(no_content) == {"sms_text", "push_title"}

    with pytest.raises(RuleInvalid) as too_long:
        validate_rule(
            RuleSpec(
                "r",
                "payment.failed",
                ("email",),
                RuleTemplates(email_subject="x" * 999, email_text="ok\x00"),
            )
        )
    assert {v.field: v.description for v in too_long.value.violations} == {
        "email_subject": "at most 998 characters",
        "email_text": "must not contain NUL characters",
    }

    valid = validate_rule(
        RuleSpec(
            "refund_notice-2",
            "payment.refunded",
            ("push", "email"),
            RuleTemplates(
                email_subject="Refund of ${refund_amount} $currency",
                email_text="Refunded $$ $refund_amount",
                push_body="Refunded $refund_amount",
            ),
        )
    )
    assert valid.channels == ("email", "push")  # normalized order


# --- rendering -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("minor", "currency", "expected"),
    [
        (1050, "EUR", "10.50"),
        (5, "EUR", "0.05"),
        (0, "EUR", "0.00"),
        (500, "JPY", "500"),
        (1, "JPY", "1"),
        (1234, "BHD", "1.234"),
        (7, "BHD", "0.007"),
        (999_999_999_999, "BHD", "999999999.999"),
        (999_999_999_999, "USD", "9999999999.99"),
        (1050, "eur", "10.50"),
    ],
)
def test_amounts_are_major_units_with_the_iso_4217_exponent(minor: int, currency: str, expected: str) -> None:
    assert format_major_units(minor, currency) == expected


@pytest.mark.parametrize("currency", ["ZZZ", "XAU", ""])
def test_unknown_currencies_cannot_be_rendered(currency: str) -> None:
    with pytest.raises(RenderError):
        format_major_units(100, currency)


@pytest.mark.parametrize(
    ("minor", "currency", "shown"),
    [(500, "JPY", "500 JPY"), (1234, "BHD", "1.234 BHD"), (1050, "EUR", "10.50 EUR")],
)
def test_rendered_amounts_per_currency(minor: int, currency: str, shown: str) -> None:
    rule = stored(RECEIPT)
    event = payment_event(rule.tenant_id, amount_minor=minor, currency=currency)
    rendered = render_notification(rule, event, uuid.UUID(event.event_id))
    assert rendered.request is not None
    assert rendered.request.email.subject == f"Receipt: {shown}"
    assert rendered.request.email.text.startswith(f"Paid {shown} for Order 42")


def test_values_are_html_escaped_in_html_only_and_single_line_in_subjects() -> None:
    spec = RuleSpec(
        "receipt",
        "payment.succeeded",
        ("email", "push"),
        RuleTemplates(
            email_subject="Receipt for $description",
            email_text="$description ($customer_reference) costs $$$amount",
            email_html='<p>$description</p><a href="https://shop.example/c/$customer_reference">you</a>',
            push_title="$description",
            push_body="$description",
        ),
    )
    rule = stored(spec)
    description = '<script>alert("x")</script> & Co\nline 2'
    event = payment_event(
        rule.tenant_id,
        description=description,
        customer_reference='" onmouseover="x',
        metadata={"fcm_token": "tok:APA91b-test_token"},
    )
    event_id = uuid.UUID(event.event_id)
    rendered = render_notification(rule, event, event_id)
    request = rendered.request
    assert request is not None
    assert rendered.skipped == ()
    assert request.email.html == (
        "<p>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Co\nline 2</p>"
        '<a href="https://shop.example/c/&quot; onmouseover=&quot;x">you</a>'
    )
    assert request.email.text == f'{description} (" onmouseover="x) costs $10.50'
    assert request.email.subject == 'Receipt for <script>alert("x")</script> & Co line 2'
    assert request.push.title == '<script>alert("x")</script> & Co line 2'
    assert request.push.body == description
    assert request.request_id == notification_request_id(rule.id, event_id)
    assert request.request_id == f"payment-rule:{rule.id}:event:{event_id}"
    assert list(request.channels) == [notify_pb2.CHANNEL_EMAIL, notify_pb2.CHANNEL_PUSH]
    assert request.recipient.email == "ada@example.com"
    assert request.recipient.fcm_token == "tok:APA91b-test_token"
    assert dict(request.metadata) == {
        "payment_id": event.payment_id,
        "payment_event_id": str(event_id),
        "payment_event_type": "payment.succeeded",
        "payment_notification_rule": "receipt",
    }
    assert dict(request.push.data) == {"payment_id": event.payment_id, "event_type": "payment.succeeded"}
    plan = validate_send_request(request)  # what the notifier accepts passes the gateway's checks
    assert plan.channels == ("email", "push")
    assert render_notification(rule, event, event_id).request == request  # deterministic


def test_channels_without_a_recipient_are_left_out() -> None:
    spec = RuleSpec(
        "all",
        "payment.refunded",
        ("email", "sms", "push"),
        RuleTemplates(
            email_subject="Refund",
            email_text="Refunded $refund_amount of $amount $currency ($amount_refunded in total)",
            sms_text="Refunded $refund_amount $currency",
            push_body="Refunded",
        ),
    )
    rule = stored(spec)
    event = payment_event(
        rule.tenant_id,
        event_type="payment.refunded",
        amount_refunded_minor=300,
        refund=payments_pb2.Refund(refund_id=str(uuid.uuid4()), amount_minor=300),
        customer=payments_pb2.CustomerContact(phone_number="+14155550123"),
    )
    rendered = render_notification(rule, event, uuid.UUID(event.event_id))
    assert rendered.request is not None
    assert list(rendered.request.channels) == [notify_pb2.CHANNEL_SMS]
    assert rendered.request.sms.text == "Refunded 3.00 EUR"
    assert not rendered.request.HasField("email")
    assert [channel for channel, _ in rendered.skipped] == ["email", "push"]
    assert "no customer email" in rendered.skipped[0][1]

    nobody = payment_event(rule.tenant_id, customer=payments_pb2.CustomerContact())
    assert render_notification(rule, nobody, uuid.UUID(nobody.event_id)).request is None


# --- storage ---------------------------------------------------------------------------------------


async def test_rules_are_stored_per_tenant(
    pool: asyncpg.Pool, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    first = await set_rule(pool, tenant.tenant_id, RECEIPT)
    assert first.spec == RECEIPT
    replaced = await set_rule(
        pool,
        tenant.tenant_id,
        RuleSpec("receipt", "payment.succeeded", ("sms",), RuleTemplates(sms_text="x")),
    )
    assert replaced.id == first.id  # same name: same rule, so events already notified stay deduplicated
    assert replaced.spec.templates == RuleTemplates(sms_text="x")
    assert replaced.updated_at >= first.updated_at
    idle = await set_rule(
        pool,
        tenant.tenant_id,
        RuleSpec("idle", "payment.succeeded", ("sms",), RuleTemplates(sms_text="y"), enabled=False),
    )
    refund = await set_rule(
        pool, tenant.tenant_id, RuleSpec("refund", "payment.refunded", ("sms",), RuleTemplates(sms_text="z"))
    )
    theirs = await set_rule(pool, other_tenant.tenant_id, RECEIPT)

    assert [r.spec.name for r in await list_rules(pool, tenant.tenant_id)] == ["refund", "idle", "receipt"]
    assert [r.id for r in await list_rules(pool, tenant.tenant_id, "payment.refunded")] == [refund.id]
    assert [r.id for r in await rules_for_event(pool, tenant.tenant_id, "payment.succeeded")] == [first.id]
    assert idle.id not in {r.id for r in await rules_for_event(pool, tenant.tenant_id, "payment.succeeded")}
    assert [r.id for r in await rules_for_event(pool, other_tenant.tenant_id, "payment.succeeded")] == [
        theirs.id
    ]

    with pytest.raises(RuleInvalid):
        await set_rule(pool, tenant.tenant_id, RuleSpec("x", "payment.succeeded", ("email",)))
    assert len(await list_rules(pool, tenant.tenant_id)) == 3

    await pool.execute("UPDATE tenants SET disabled_at = now() WHERE id = $1", other_tenant.tenant_id)
    assert await rules_for_event(pool, other_tenant.tenant_id, "payment.succeeded") == []

    assert await delete_rule(pool, tenant.tenant_id, "receipt")
    assert not await delete_rule(pool, tenant.tenant_id, "receipt")
    assert not await delete_rule(pool, tenant.tenant_id, "refund-typo")
    assert [r.spec.name for r in await list_rules(pool, tenant.tenant_id)] == ["refund", "idle"]
    assert len(await list_rules(pool, other_tenant.tenant_id)) == 1


async def test_the_database_refuses_what_validation_refuses(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    insert = """INSERT INTO payment_notification_rules (id, tenant_id, name, event_type, channels)
                VALUES ($1, $2, $3, $4, $5)"""
    for name, event_type, channels in [
        ("Bad Name", "payment.succeeded", ["email"]),
        ("ok", "refund.succeeded", ["email"]),
        ("ok", "payment.succeeded", ["fax"]),
        ("ok", "payment.succeeded", []),
    ]:
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(insert, uuid.uuid4(), tenant.tenant_id, name, event_type, channels)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await set_rule(pool, uuid.uuid4(), RECEIPT)


# --- the notifier, over Kafka ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_notifier(pool: asyncpg.Pool, settings: Settings) -> AsyncIterator[PaymentEventNotifier]:
    """A payment event notifier running as a task for the duration of the block."""
    notifier = PaymentEventNotifier(pool, settings)
    task = asyncio.create_task(notifier.run())
    try:
        yield notifier
    finally:
        notifier.stop()
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def event_producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    """A producer for ``payments.events`` (topic created first), as the outbox relay publishes."""
    await ensure_topics(settings, [payment_events_topic(settings.kafka_topic_prefix)])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def publish(producer: AIOKafkaProducer, settings: Settings, event: events_pb2.PaymentEvent) -> None:
    """Publish ``event`` keyed by its tenant and wait for the broker's acknowledgement."""
    await producer.send_and_wait(
        payment_events_topic(settings.kafka_topic_prefix),
        value=event.SerializeToString(),
        key=event.tenant_id.encode("ascii"),
    )


async def handled(notifier: PaymentEventNotifier, count: int) -> None:
    """Wait until ``count`` events have their outcome committed and their offsets committed."""

    async def done() -> bool:
        return notifier.events_handled >= count

    await wait_for(done, timeout_s=90)


async def notification_rows(pool: asyncpg.Pool, tenant_id: uuid.UUID) -> list[asyncpg.Record]:
    return await pool.fetch(
        """SELECT n.id, n.request_id, n.metadata, d.id AS delivery_id, d.channel, d.recipient, d.status
             FROM notifications n JOIN deliveries d ON d.notification_id = n.id
            WHERE n.tenant_id = $1 ORDER BY n.created_at""",
        tenant_id,
    )


async def test_an_event_sends_one_receipt_even_when_redelivered(
    pool: asyncpg.Pool, settings: Settings, tenant: TenantCredentials, smtp_sink: SmtpSink
) -> None:
    rule = await set_rule(pool, tenant.tenant_id, RECEIPT)
    event = payment_event(tenant.tenant_id, amount_minor=1234, currency="BHD", description="Tea & <cake>")
    async with (
        running_pipeline(pool, settings, channels=("email",)),
        running_notifier(pool, settings) as notifier,
        event_producer(settings) as producer,
    ):
        for _ in range(3):  # the event and two redeliveries of it
            await publish(producer, settings, event)
        await handled(notifier, 3)

        async def delivered() -> list[asyncpg.Record] | None:
            rows = await notification_rows(pool, tenant.tenant_id)
            return rows if rows and all(r["status"] == "delivered" for r in rows) else None

        (row,) = await wait_for(delivered, timeout_s=60)
        assert notifier.outcomes[Outcome.ACCEPTED] == 3  # the two repeats replayed the first answer

        # The tenant edits the rule; a late redelivery must still not send again.
        await set_rule(
            pool,
            tenant.tenant_id,
            RuleSpec(
                "receipt",
                "payment.succeeded",
                ("email",),
                RuleTemplates(email_subject="New", email_text="New"),
            ),
        )
        with capture_logs() as logs:
            await publish(producer, settings, event)
            await handled(notifier, 4)
        assert notifier.outcomes[Outcome.ALREADY_NOTIFIED] == 1
        assert any(e["event"].startswith("payment notification already sent") for e in logs)

    assert len(await notification_rows(pool, tenant.tenant_id)) == 1
    assert row["request_id"] == f"payment-rule:{rule.id}:event:{event.event_id}"
    assert row["channel"] == "email"
    assert row["recipient"] == "ada@example.com"
    assert json.loads(row["metadata"])["payment_notification_rule"] == "receipt"
    (message,) = smtp_sink.messages_for_delivery(str(row["delivery_id"]))
    assert message["To"] == "ada@example.com"
    assert message["Subject"] == "Receipt: 1.234 BHD"
    parts = {
        p.get_content_type(): p.get_payload(decode=True).decode()
        for p in message.walk()
        if not p.is_multipart()
    }
    assert parts["text/plain"].strip() == (
        f"Paid 1.234 BHD for Tea & <cake> (payment {event.payment_id}, customer cus-42)."
    )
    assert parts["text/html"].strip() == "<p>Paid <b>1.234 BHD</b> for Tea &amp; &lt;cake&gt;</p>"


async def test_no_rule_sends_nothing_and_other_tenants_rules_never_fire(
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: TenantCredentials,
    other_tenant: TenantCredentials,
) -> None:
    await set_rule(pool, other_tenant.tenant_id, RECEIPT)  # globex has a receipt rule, acme has none
    await set_rule(
        pool,
        tenant.tenant_id,
        RuleSpec("refund", "payment.refunded", ("email",), RuleTemplates(email_subject="R", email_text="R")),
    )
    ours = payment_event(tenant.tenant_id)
    theirs = payment_event(other_tenant.tenant_id)
    async with running_notifier(pool, settings) as notifier, event_producer(settings) as producer:
        await publish(producer, settings, ours)
        await handled(notifier, 1)
        assert notifier.outcomes == {Outcome.NO_RULE: 1}
        await publish(producer, settings, theirs)  # proves the notifier was live and globex's rule works
        await handled(notifier, 2)

    assert await notification_rows(pool, tenant.tenant_id) == []
    (row,) = await notification_rows(pool, other_tenant.tenant_id)
    assert json.loads(row["metadata"])["payment_id"] == theirs.payment_id
    assert await pool.fetchval("SELECT count(*) FROM notifications") == 1
    assert notifier.outcomes == {Outcome.NO_RULE: 1, Outcome.ACCEPTED: 1}


async def committed_offsets(settings: Settings) -> dict[int, int]:
    """partition -> committed offset of the notifier's group on ``payments.events``."""
    return await group_offsets(
        settings,
        payment_events_topic(settings.kafka_topic_prefix),
        consumer_group(settings.kafka_topic_prefix),
    )


async def test_an_event_without_customer_email_is_skipped_with_a_log_line(
    pool: asyncpg.Pool, settings: Settings, tenant: TenantCredentials
) -> None:
    await set_rule(pool, tenant.tenant_id, RECEIPT)
    no_email = payment_event(
        tenant.tenant_id, customer=payments_pb2.CustomerContact(phone_number="+14155550123")
    )
    bad_currency = payment_event(tenant.tenant_id, currency="ZZZ")
    garbage = b"\xff not a protobuf"
    later = payment_event(tenant.tenant_id)
    with capture_logs() as logs:
        async with running_notifier(pool, settings) as notifier, event_producer(settings) as producer:
            await publish(producer, settings, no_email)
            await publish(producer, settings, bad_currency)
            await producer.send_and_wait(
                payment_events_topic(settings.kafka_topic_prefix),
                value=garbage,
                key=str(tenant.tenant_id).encode(),
            )
            await handled(notifier, 3)
            assert sum((await committed_offsets(settings)).values()) == 3  # committed past all three
            await publish(producer, settings, later)  # still consuming: nothing crashed
            await handled(notifier, 4)
            assert sum((await committed_offsets(settings)).values()) == 4

    skipped = [e for e in logs if e["event"] == "payment notification skipped"]
    assert [(e["rule"], e["channel"], e["payment_id"], e["log_level"]) for e in skipped] == [
        ("receipt", "email", no_email.payment_id, "warning")
    ]
    assert skipped[0]["reason"] == "the payment has no customer email"
    assert skipped[0]["event_id"] == no_email.event_id
    (unrendered,) = [e for e in logs if e["event"] == "payment notification skipped: cannot render"]
    assert unrendered["payment_id"] == bad_currency.payment_id
    assert "ZZZ" in unrendered["reason"]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "payment notifier: undecodable event skipped"
    ]
    assert notifier.outcomes == {Outcome.SKIPPED: 2, Outcome.UNDECODABLE: 1, Outcome.ACCEPTED: 1}
    (row,) = await notification_rows(pool, tenant.tenant_id)
    assert json.loads(row["metadata"])["payment_id"] == later.payment_id


# --- the command line ------------------------------------------------------------------------------


async def rules_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m switchboard.payments_cli`` against this test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(SWITCHBOARD_DATABASE_URL=database_url, COLUMNS="250")
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "switchboard.payments_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_set_list_delete(
    pool: asyncpg.Pool, database_url: str, tenant: TenantCredentials, tmp_path: Any
) -> None:
    html = tmp_path / "receipt.html"
    html.write_text("<p>Paid $amount $currency</p>", encoding="utf-8")
    created = await rules_cli(
        database_url,
        "set",
        "receipt",
        "--tenant",
        "acme",
        "--event-type",
        "payment.succeeded",
        "--channel",
        "email",
        "--email-subject",
        "Receipt $amount $currency",
        "--email-html",
        f"@{html}",
    )
    assert created.returncode == 0, created.stdout + created.stderr
    (rule,) = await list_rules(pool, tenant.tenant_id)
    assert rule.spec.templates.email_html == "<p>Paid $amount $currency</p>"
    assert str(rule.id) in created.stdout

    invalid = await rules_cli(
        database_url,
        "set",
        "receipt",
        "--tenant",
        str(tenant.tenant_id),
        "--event-type",
        "payment.sucess",
        "--channel",
        "email",
        "--channel",
        "sms",
        "--email-subject",
        "$total",
    )
    assert invalid.returncode == 2
    for field in ("event_type:", "email_subject: unknown placeholder $total", "email_text:", "sms_text:"):
        assert field in invalid.stdout, invalid.stdout
    assert (await list_rules(pool, tenant.tenant_id))[0].spec == rule.spec  # unchanged

    listed = await rules_cli(database_url, "list", "--tenant", "acme", "--json")
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert json.loads(line)["email_subject"] == "Receipt $amount $currency"
    assert json.loads(line)["channels"] == ["email"]

    unknown = await rules_cli(database_url, "list", "--tenant", "nobody")
    assert unknown.returncode == 2
    assert "no tenant 'nobody'" in unknown.stdout

    deleted = await rules_cli(database_url, "delete", "receipt", "--tenant", "acme")
    assert deleted.returncode == 0, deleted.stderr
    again = await rules_cli(database_url, "delete", "receipt", "--tenant", "acme")
    assert again.returncode == 1
    assert await list_rules(pool, tenant.tenant_id) == []
