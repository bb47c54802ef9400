"""The issue's "Done when" for the DLQ, through the real CLI: a Brevo account out of credits
dead-letters an email, the operator finds it with `switchboard dlq list`, tops up, and
`switchboard dlq replay` delivers it exactly once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from channels.catalog import dead_letter_topic
from gateway.server import Gateway
from switchboard.fakes.brevo import FakeBrevo
from switchboard.notify.v1 import events_pb2, notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from switchboard.tenants.v1 import tenants_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import running_pipeline, send_request, wait_for
from tests.test_admin_api import admin  # noqa: F401 (fixture)
from tests.test_admin_cli import cli
from tests.test_brevo import API_KEY as BREVO_KEY
from tests.test_brevo import brevo  # noqa: F401 (fixture)
from tests.test_failure_handling import use_brevo
from tests.test_worker import read_one

if TYPE_CHECKING:
    Admin = tenants_pb2_grpc.TenantAdminServiceAsyncStub
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub


async def delivery_state(pool: asyncpg.Pool, delivery_id: uuid.UUID) -> tuple[str, int]:
    row = await pool.fetchrow("SELECT status, attempts FROM deliveries WHERE id = $1", delivery_id)
    assert row is not None
    return row["status"], row["attempts"]


async def test_brevo_out_of_credits_dead_letter_replays_once_through_the_cli(
    gateway: Gateway,
    stub: Stub,
    admin: Admin,  # noqa: F811
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    brevo: FakeBrevo,  # noqa: F811
) -> None:
    await use_brevo(admin, tenant.tenant_id, brevo)
    brevo.credits_exhausted = True
    accepted = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
    )
    delivery_id = uuid.UUID(accepted.deliveries[0].delivery_id)
    env = {
        "SWITCHBOARD_DATABASE_URL": settings.require_database_url(),
        "SWITCHBOARD_KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix,
    }

    async def dlq(*args: str) -> str:
        done = await cli(gateway, "dlq", *args, extra_env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert BREVO_KEY not in done.stdout + done.stderr
        return done.stdout

    async def delivered() -> bool:
        return (await delivery_state(pool, delivery_id))[0] == "delivered"

    async with running_pipeline(pool, settings, channels=("email",)):
        # 402 not_enough_credits is permanent: FAILED after one attempt, and a dead letter on Kafka.
        await wait_for(lambda: _failed(pool, delivery_id), timeout_s=60)
        dead = events_pb2.DeliveryDeadLettered.FromString(
            await read_one(settings, dead_letter_topic("email", settings.kafka_topic_prefix))
        )
        assert dead.delivery.delivery_id == str(delivery_id)
        assert "Brevo HTTP 402" in dead.reason
        assert [(a.attempt_number, a.outcome) for a in dead.attempts] == [(1, "permanent")]
        assert brevo.received == []

        brevo.credits_exhausted = False  # the account is topped up

        hour = timedelta(hours=1)
        now = datetime.now(UTC)
        tid = str(tenant.tenant_id)
        listed = await dlq(
            "list",
            *("--tenant", tid, "--channel", "email", "--reason", "NOT_ENOUGH_CREDITS"),
            *("--since", (now - hour).isoformat(), "--until", (now + hour).isoformat()),
        )
        assert str(delivery_id) in listed
        assert "1 dead letter(s)" in listed
        excluding = [
            ("--tenant", str(uuid.uuid4())),
            ("--tenant", tid, "--channel", "sms"),
            ("--tenant", tid, "--reason", "mailbox unavailable"),
            ("--tenant", tid, "--since", (now + hour).isoformat()),
            ("--tenant", tid, "--until", (now - hour).isoformat()),
        ]
        excluded = await asyncio.gather(*(dlq("list", *args) for args in excluding))
        assert ["0 dead letter(s)" in output for output in excluded] == [True] * len(excluding)

        outbox_before = await pool.fetchval("SELECT count(*) FROM outbox")
        assert "would replay 1 dead letter(s)" in await dlq("replay", "--tenant", tid, "--dry-run")
        assert await pool.fetchval("SELECT count(*) FROM outbox") == outbox_before
        assert await delivery_state(pool, delivery_id) == ("failed", 1)
        assert str(delivery_id) in await dlq("list", "--tenant", tid)  # still pending

        assert "replayed 1 dead letter(s)" in await dlq("replay", "--tenant", tid)
        await wait_for(delivered, timeout_s=60)
        assert "replayed 0 dead letter(s)" in await dlq("replay", "--tenant", tid)
        outbox_after = await pool.fetchval("SELECT count(*) FROM outbox")

    # Exactly one email reached Brevo, under the delivery id as its idempotency key, and
    # the second replay wrote nothing that could send another.
    assert [r.body["headers"]["idempotencyKey"] for r in brevo.received] == [str(delivery_id)]
    assert await delivery_state(pool, delivery_id) == ("delivered", 2)
    assert await pool.fetchval("SELECT count(*) FROM outbox") == outbox_after
    assert "0 dead letter(s)" in await dlq("list", "--tenant", tid)


async def _failed(pool: asyncpg.Pool, delivery_id: uuid.UUID) -> bool:
    return (await delivery_state(pool, delivery_id))[0] == "failed"
