"""Fallback chains, dead-letter replay, and per-tenant retry limits."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from aiokafka import ConsumerRecord

from channels.callbacks import set_tenant_callback
from channels.catalog import CHANNEL_VALUES
from channels.dead_letters import DeadLetterFilter, list_dead_letters, replay_dead_letters
from channels.delivery import Outcome, RetryPolicy, deliver
from channels.registry import TenantProviders
from channels.worker import ChannelWorker
from switchboard.fakes.brevo import FakeBrevo
from switchboard.fakes.smtp import FakeSmtpServer, SmtpFault
from switchboard.fakes.twilio import FakeTwilio
from switchboard.notify.v1 import events_pb2, notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import new_request_id, running_pipeline, send_request, tenant_providers, wait_for
from tests.test_admin_api import OPERATOR, admin, smtp_config  # noqa: F401 (fixture)
from tests.test_brevo import brevo  # noqa: F401 (fixture)
from tests.test_gateway import rich_status, violations
from tests.test_worker import ScriptedSmtpHandler, scripted_smtp  # noqa: F401 (fixture)

if TYPE_CHECKING:
    Admin = tenants_pb2_grpc.TenantAdminServiceAsyncStub
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub


async def notification(
    stub: Stub, tenant: TenantCredentials, notification_id: str
) -> notify_pb2.Notification:
    got = await stub.GetNotification(
        notify_pb2.GetNotificationRequest(notification_id=notification_id), metadata=tenant.metadata
    )
    return got.notification


async def test_fallback_tries_the_next_channel_after_a_permanent_failure(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    scripted_smtp.replies = ["550 5.1.1 no such mailbox"]
    request = send_request(channels=[], fallback_channels=[notify_pb2.CHANNEL_EMAIL, notify_pb2.CHANNEL_SMS])
    accepted = await stub.SendNotification(request, metadata=tenant.metadata)
    assert [d.channel for d in accepted.deliveries] == [notify_pb2.CHANNEL_EMAIL]  # only the first, for now

    async def done() -> notify_pb2.Notification | None:
        found = await notification(stub, tenant, accepted.notification_id)
        return found if found.status != notify_pb2.NOTIFICATION_STATUS_ACCEPTED else None

    async with running_pipeline(pool, settings):
        final = await wait_for(done, timeout_s=60)
    assert final.status == notify_pb2.NOTIFICATION_STATUS_DELIVERED
    assert list(final.fallback_channels) == [notify_pb2.CHANNEL_EMAIL, notify_pb2.CHANNEL_SMS]
    chain = [(d.chain_position, d.channel, d.status) for d in final.deliveries]
    assert chain == [
        (0, notify_pb2.CHANNEL_EMAIL, notify_pb2.DELIVERY_STATUS_FAILED),
        (1, notify_pb2.CHANNEL_SMS, notify_pb2.DELIVERY_STATUS_DELIVERED),
    ]
    assert final.deliveries[0].last_error.startswith("SMTP 550")


async def test_fallback_chain_validation(stub: Stub, tenant: TenantCredentials) -> None:
    request = send_request(
        fallback_channels=[notify_pb2.CHANNEL_SMS, notify_pb2.CHANNEL_SMS, notify_pb2.CHANNEL_ALL]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendNotification(request, metadata=tenant.metadata)
    named = violations(rich_status(caught.value))
    assert {"channels", "fallback_channels[1]", "fallback_channels[2]"} <= set(named)


async def test_a_permanent_failure_lands_in_the_dlq_and_replays_to_success_once(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    scripted_smtp.replies = ["554 5.7.1 rejected for policy reasons"]
    accepted = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )
    delivery_id = uuid.UUID(accepted.deliveries[0].delivery_id)
    mine = DeadLetterFilter(tenant_id=tenant.tenant_id, channel="email", reason="policy")
    async with running_pipeline(pool, settings, channels=("email",)):
        letters = await wait_for(lambda: list_dead_letters(pool, mine), timeout_s=60)
        assert [d.delivery_id for d in letters] == [delivery_id]
        assert await list_dead_letters(pool, DeadLetterFilter(reason="no such text")) == []
        dry = await replay_dead_letters(pool, mine, topic_prefix=settings.kafka_topic_prefix, dry_run=True)
        assert (dry.replayed, dry.skipped) == (1, [])

        # The fault is cleared (no scripted replies left): the replay succeeds.
        first = await replay_dead_letters(pool, mine, topic_prefix=settings.kafka_topic_prefix)
        second = await replay_dead_letters(pool, mine, topic_prefix=settings.kafka_topic_prefix)
        assert (first.replayed, second.replayed) == (1, 0)

        async def delivered() -> bool:
            return bool(
                await pool.fetchval("SELECT status = 'delivered' FROM deliveries WHERE id = $1", delivery_id)
            )

        await wait_for(delivered, timeout_s=60)
    assert len(scripted_smtp.accepted) == 1
    row = await pool.fetchrow("SELECT attempts, replays FROM deliveries WHERE id = $1", delivery_id)
    assert row is not None
    assert (row["attempts"], row["replays"]) == (2, 1)
    assert await list_dead_letters(pool, mine) == []


async def test_the_tenant_limit_on_attempts_applies(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    await pool.execute("UPDATE tenants SET max_delivery_attempts = 2 WHERE id = $1", tenant.tenant_id)
    scripted_smtp.replies = ["451 4.3.0 later"] * 10
    accepted = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )

    async def failed() -> asyncpg.Record | None:
        return await pool.fetchrow(
            "SELECT attempts, last_error FROM deliveries WHERE notification_id = $1 AND status = 'failed'",
            uuid.UUID(accepted.notification_id),
        )

    async with running_pipeline(pool, settings, channels=("email",)):
        row = await wait_for(failed, timeout_s=60)
    assert row["attempts"] == 2
    assert row["last_error"].startswith("gave up after 2 attempts")


async def test_a_delivery_older_than_the_tenant_max_age_is_not_retried(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    await pool.execute("UPDATE tenants SET max_delivery_age_seconds = 1 WHERE id = $1", tenant.tenant_id)
    settings.worker_retry_base_ms = 1500  # the second attempt comes after the notification is 1 s old
    settings.worker_retry_max_ms = 1500
    scripted_smtp.replies = ["451 4.3.0 later"] * 10
    accepted = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )

    async def failed() -> asyncpg.Record | None:
        return await pool.fetchrow(
            "SELECT attempts, last_error FROM deliveries WHERE notification_id = $1 AND status = 'failed'",
            uuid.UUID(accepted.notification_id),
        )

    async with running_pipeline(pool, settings, channels=("email",)):
        row = await wait_for(failed, timeout_s=60)
    assert "older than 1 s" in row["last_error"]
    assert row["attempts"] < settings.worker_max_attempts


async def test_a_waiting_retry_does_not_hold_up_the_partition(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    scripted_smtp: ScriptedSmtpHandler,  # noqa: F811
) -> None:
    """Same tenant (so same key and partition): the first delivery waits a long
    backoff while the second, behind it in the partition, is delivered."""
    settings.worker_retry_base_ms = settings.worker_retry_max_ms = 600_000
    scripted_smtp.replies = ["451 4.3.0 later"]
    first = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )
    second = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )

    async def status_of(reply: notify_pb2.SendNotificationResponse) -> str:
        return str(
            await pool.fetchval(
                "SELECT status FROM deliveries WHERE notification_id = $1", uuid.UUID(reply.notification_id)
            )
        )

    async def second_delivered() -> bool:
        return await status_of(second) == "delivered"

    async with running_pipeline(pool, settings, channels=("email",)):
        await wait_for(second_delivered, timeout_s=30)
    # The first one failed and waits a backoff drawn from [0, 600 s] (outbox row due
    # later), while the consumer went on: a worker sleeping through that backoff
    # would have held the second one for minutes.
    outcome = await pool.fetchval(
        """SELECT a.outcome FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
            WHERE d.notification_id = $1 AND a.attempt_number = 1""",
        uuid.UUID(first.notification_id),
    )
    assert outcome == "retryable"


# --- replay of fallback chains, replay budgets, status callbacks (delivery logic, no broker) ---------------

TWILIO_SID = "AC" + "5" * 32
TWILIO_TOKEN = "twilio-token-3e9b-never-shown"
DAY_S = 86_400.0
POLICY = RetryPolicy(max_attempts=5, max_age_s=DAY_S, base_s=0.01, cap_s=0.01)


class FakeClock:
    """Unix time that moves only when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class OwnProviders:
    """The tenant's email on a fake SMTP server and SMS on a fake Twilio, both with fault injection."""

    tenant: TenantCredentials
    smtp: FakeSmtpServer
    twilio: FakeTwilio
    providers: TenantProviders


@pytest.fixture
async def own(
    admin: Admin,  # noqa: F811
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
) -> AsyncIterator[OwnProviders]:
    twilio = FakeTwilio(TWILIO_SID, TWILIO_TOKEN)
    await twilio.start()
    providers = tenant_providers(pool, settings)
    try:
        with FakeSmtpServer() as smtp:
            configs = {
                notify_pb2.CHANNEL_EMAIL: smtp_config(port=smtp.port, password="", username=""),
                notify_pb2.CHANNEL_SMS: tenants_pb2.ProviderConfig(
                    twilio=tenants_pb2.TwilioConfig(
                        account_sid=TWILIO_SID,
                        auth_token=TWILIO_TOKEN,
                        from_number="+14155550100",
                        base_url=twilio.base_url,
                    )
                ),
            }
            for channel, config in configs.items():
                await admin.SetProviderConfig(
                    tenants_pb2.SetProviderConfigRequest(
                        request_id=new_request_id(),
                        tenant_id=str(tenant.tenant_id),
                        channel=channel,
                        config=config,
                    ),
                    metadata=OPERATOR,
                )
            yield OwnProviders(tenant, smtp, twilio, providers)
    finally:
        await providers.close()
        await twilio.stop()


async def deliver_now(
    pool: asyncpg.Pool, own: OwnProviders, delivery_id: uuid.UUID, clock: FakeClock | None = None
) -> Outcome:
    """What a worker does with the delivery's event (consumed from Kafka in production)."""
    row = await pool.fetchrow("SELECT event, channel FROM deliveries WHERE id = $1", delivery_id)
    assert row is not None
    event = events_pb2.DeliveryRequested.FromString(row["event"])
    return await deliver(
        pool,
        event,
        lambda: own.providers.provider_for(own.tenant.tenant_id, row["channel"]),
        policy=POLICY,
        clock=clock or time.time,
    )


async def chain_links(pool: asyncpg.Pool, notification_id: str) -> list[tuple[int, str, str]]:
    rows = await pool.fetch(
        """SELECT chain_position, channel, status FROM deliveries
            WHERE notification_id = $1 ORDER BY chain_position, created_at""",
        uuid.UUID(notification_id),
    )
    return [(r["chain_position"], r["channel"], r["status"]) for r in rows]


async def link_id(pool: asyncpg.Pool, notification_id: str, position: int) -> uuid.UUID:
    found = await pool.fetchval(
        "SELECT id FROM deliveries WHERE notification_id = $1 AND chain_position = $2",
        uuid.UUID(notification_id),
        position,
    )
    assert isinstance(found, uuid.UUID)
    return found


async def send_chain(stub: Stub, tenant: TenantCredentials) -> str:
    accepted = await stub.SendNotification(
        send_request(channels=[], fallback_channels=[notify_pb2.CHANNEL_EMAIL, notify_pb2.CHANNEL_SMS]),
        metadata=tenant.metadata,
    )
    return accepted.notification_id


async def dry_then_real_replay(
    pool: asyncpg.Pool, where: DeadLetterFilter
) -> tuple[int, list[tuple[str, str]]]:
    """Replay with ``--dry-run``, then for real; both must report the same: (replayed, [(channel, why)])."""
    reports = [await replay_dead_letters(pool, where, dry_run=dry_run) for dry_run in (True, False)]
    dry, real = [(r.replayed, [(s.letter.channel, s.why) for s in r.skipped]) for r in reports]
    assert dry == real
    return real


async def test_replaying_a_link_of_a_delivered_chain_is_skipped_not_sent(
    stub: Stub, pool: asyncpg.Pool, own: OwnProviders
) -> None:
    notification_id = await send_chain(stub, own.tenant)
    own.smtp.inject(SmtpFault.data_reply(554))
    assert await deliver_now(pool, own, await link_id(pool, notification_id, 0)) == Outcome.FAILED
    assert await deliver_now(pool, own, await link_id(pool, notification_id, 1)) == Outcome.DELIVERED

    mine = DeadLetterFilter(tenant_id=own.tenant.tenant_id)
    assert await dry_then_real_replay(pool, mine) == (0, [("email", "fallback chain delivered on sms")])
    assert await chain_links(pool, notification_id) == [(0, "email", "failed"), (1, "sms", "delivered")]
    assert [d.channel for d in await list_dead_letters(pool, mine)] == ["email"]  # left pending
    assert own.smtp.received == []
    assert len(own.twilio.received) == 1


async def test_a_replayed_link_that_fails_again_does_not_start_the_next_channel_twice(
    stub: Stub, pool: asyncpg.Pool, own: OwnProviders
) -> None:
    notification_id = await send_chain(stub, own.tenant)
    email_id = await link_id(pool, notification_id, 0)
    own.smtp.inject(SmtpFault.data_reply(554))
    assert await deliver_now(pool, own, email_id) == Outcome.FAILED
    sms_id = await link_id(pool, notification_id, 1)
    own.twilio.inject(FakeTwilio.error(21211))
    assert await deliver_now(pool, own, sms_id) == Outcome.FAILED

    # The whole chain is dead; the operator replays the email link, which fails again.
    email_letters = DeadLetterFilter(tenant_id=own.tenant.tenant_id, channel="email")
    report = await replay_dead_letters(pool, email_letters)
    assert (report.replayed, report.skipped) == (1, [])
    own.smtp.inject(SmtpFault.data_reply(554))
    assert await deliver_now(pool, own, email_id) == Outcome.FAILED
    assert await chain_links(pool, notification_id) == [(0, "email", "failed"), (1, "sms", "failed")]
    sms_outbox = await pool.fetchval("SELECT count(*) FROM outbox WHERE delivery_id = $1", sms_id)
    assert sms_outbox == 1  # the SMS link was not queued again either

    # Replaying everything: the SMS link (dead-lettered first) goes; the email link waits
    # behind it, so the chain never runs on two channels at once. A dry run says so first.
    assert await dry_then_real_replay(pool, DeadLetterFilter(tenant_id=own.tenant.tenant_id)) == (
        1,
        [("email", "fallback chain in progress on sms (queued)")],
    )
    assert await deliver_now(pool, own, sms_id) == Outcome.DELIVERED
    assert len(own.twilio.received) == 1
    assert own.smtp.received == []

    # And the database refuses a second delivery at a chain position outright.
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute(
            """INSERT INTO deliveries (id, notification_id, tenant_id, channel, recipient, event,
                                      chain_position)
               SELECT $1, notification_id, tenant_id, channel, recipient, event, chain_position
                 FROM deliveries WHERE id = $2""",
            uuid.uuid4(),
            sms_id,
        )


async def test_a_replay_gets_a_fresh_age_budget(stub: Stub, pool: asyncpg.Pool, own: OwnProviders) -> None:
    clock = FakeClock()
    accepted = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=own.tenant.metadata
    )
    delivery_id = uuid.UUID(accepted.deliveries[0].delivery_id)
    own.smtp.inject(SmtpFault.data_reply(554))
    assert await deliver_now(pool, own, delivery_id, clock) == Outcome.FAILED

    clock.advance(DAY_S + 3600)  # the fault is fixed a day later, past the 24 h age limit
    report = await replay_dead_letters(pool, DeadLetterFilter(tenant_id=own.tenant.tenant_id), clock=clock)
    assert report.replayed == 1
    own.smtp.inject(SmtpFault.data_reply(451))
    assert await deliver_now(pool, own, delivery_id, clock) == Outcome.RETRY_SCHEDULED
    row = await pool.fetchrow("SELECT status, last_error FROM deliveries WHERE id = $1", delivery_id)
    assert row is not None
    assert (row["status"], row["last_error"][:8]) == ("queued", "SMTP 451")

    # The fresh budget is still a budget: a day after the replay, retries end.
    clock.advance(DAY_S)
    await pool.execute("UPDATE deliveries SET next_attempt_at = NULL WHERE id = $1", delivery_id)  # due
    own.smtp.inject(SmtpFault.data_reply(451))
    assert await deliver_now(pool, own, delivery_id, clock) == Outcome.FAILED
    last_error = await pool.fetchval("SELECT last_error FROM deliveries WHERE id = $1", delivery_id)
    assert last_error.startswith("gave up: older than 86400 s: SMTP 451")


async def callback_events(pool: asyncpg.Pool, delivery_id: uuid.UUID) -> list[tuple[str, int]]:
    rows = await pool.fetch(
        "SELECT payload FROM callback_deliveries WHERE delivery_id = $1 ORDER BY id", delivery_id
    )
    payloads = [json.loads(r["payload"]) for r in rows]
    return [(p["status"], p["attempt"]) for p in payloads]


async def test_fallback_and_replay_queue_their_status_callbacks(
    stub: Stub, pool: asyncpg.Pool, own: OwnProviders
) -> None:
    async with pool.acquire() as conn:
        await set_tenant_callback(conn, own.tenant.tenant_id, "https://hooks.acme.example/switchboard")
    notification_id = await send_chain(stub, own.tenant)
    email_id = await link_id(pool, notification_id, 0)
    own.smtp.inject(SmtpFault.data_reply(554))
    assert await deliver_now(pool, own, email_id) == Outcome.FAILED
    sms_id = await link_id(pool, notification_id, 1)
    assert await callback_events(pool, sms_id) == [("queued", 0)]  # the new link, with the email failure

    own.twilio.inject(FakeTwilio.error(21211))
    assert await deliver_now(pool, own, sms_id) == Outcome.FAILED
    report = await replay_dead_letters(pool, DeadLetterFilter(tenant_id=own.tenant.tenant_id, channel="sms"))
    assert report.replayed == 1
    assert await callback_events(pool, sms_id) == [
        ("queued", 0),  # created
        ("sending", 1),
        ("failed", 1),
        ("queued", 1),  # replayed
    ]
    assert await callback_events(pool, email_id) == [("sending", 1), ("failed", 1)]


async def use_brevo(operator: Admin, tenant_id: uuid.UUID, fake: FakeBrevo) -> None:
    """Make ``fake`` the tenant's email provider (through the admin API)."""
    await operator.SetProviderConfig(
        tenants_pb2.SetProviderConfigRequest(
            request_id=new_request_id(),
            tenant_id=str(tenant_id),
            channel=notify_pb2.CHANNEL_EMAIL,
            config=tenants_pb2.ProviderConfig(
                brevo=tenants_pb2.BrevoConfig(
                    api_key=fake.api_key, sender_email="no-reply@acme.example", base_url=fake.base_url
                )
            ),
        ),
        metadata=OPERATOR,
    )


def consumed(delivery_event: bytes, channel: str, tenant_id: uuid.UUID) -> ConsumerRecord[bytes, bytes]:
    """The record a worker would have polled from ``notify.<channel>``."""
    key = str(tenant_id).encode("ascii")
    return ConsumerRecord(f"notify.{channel}", 0, 0, 0, 0, key, delivery_event, None, len(key), 0, [])


@pytest.mark.parametrize("channel", ["sms", "email"])
async def test_the_worker_waits_at_least_the_providers_retry_after(
    channel: str,
    stub: Stub,
    admin: Admin,  # noqa: F811
    pool: asyncpg.Pool,
    settings: Settings,
    own: OwnProviders,
    brevo: FakeBrevo,  # noqa: F811
) -> None:
    """Twilio 20429 / Brevo 429 with ``Retry-After: 120``: the retry's outbox row is due no
    sooner than 120 s after the attempt, though the backoff alone is at most 0.2 s here."""
    retry_after_s = 120
    assert settings.worker_retry_max_ms / 1000 < retry_after_s
    if channel == "sms":
        own.twilio.inject(FakeTwilio.error(20429, 429, headers={"Retry-After": str(retry_after_s)}))
    else:
        brevo.inject(FakeBrevo.rate_limited(reset_s=30, retry_after_s=retry_after_s))
        await use_brevo(admin, own.tenant.tenant_id, brevo)
    accepted = await stub.SendNotification(
        send_request(channels=[CHANNEL_VALUES[channel]]), metadata=own.tenant.metadata
    )
    delivery_id = uuid.UUID(accepted.deliveries[0].delivery_id)
    event = await pool.fetchval("SELECT event FROM deliveries WHERE id = $1", delivery_id)
    worker = ChannelWorker(pool, settings, channel, own.providers)
    before = datetime.now(UTC)
    outcome = await worker.handle_record(consumed(event, channel, own.tenant.tenant_id))
    after = datetime.now(UTC)
    assert outcome == Outcome.RETRY_SCHEDULED
    due = await pool.fetchval(
        "SELECT available_at FROM outbox WHERE delivery_id = $1 AND published_at IS NULL ORDER BY id DESC",
        delivery_id,
    )
    wait = timedelta(seconds=retry_after_s)
    assert before + wait <= due <= after + wait
    assert await pool.fetchval("SELECT next_attempt_at FROM deliveries WHERE id = $1", delivery_id) == due
