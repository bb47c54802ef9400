"""The outbox relay: exactly-once publication with two relays, and broker outages."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from channels.catalog import ALL_CHANNELS, delivery_topic
from gateway.relay import OutboxRelay
from gateway.server import Gateway
from gateway.validation import validate_send_request
from gateway.write_path import AcceptRequest, accept_notifications
from switchboard.embedded import EmbeddedKafka, free_port
from switchboard.notify.v1 import events_pb2, notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from tests.conftest import TenantCredentials
from tests.helpers import running_pipeline, send_request, wait_for

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub


async def accept_many(pool: asyncpg.Pool, tenant_id: uuid.UUID, count: int, settings: Settings) -> set[str]:
    """Accept ``count`` all-channel notifications in batches; return every delivery id."""
    delivery_ids: set[str] = set()
    for start in range(0, count, 100):
        items = []
        for _ in range(min(100, count - start)):
            request = send_request()
            items.append(AcceptRequest(request, validate_send_request(request)))
        for outcome in await accept_notifications(
            pool, tenant_id, items, topic_prefix=settings.kafka_topic_prefix
        ):
            delivery_ids.update(d.delivery_id for d in outcome.deliveries)  # type: ignore[union-attr]
    return delivery_ids


async def unpublished(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))


async def read_all_deliveries(settings: Settings) -> Counter[str]:
    """Every DeliveryRequested on the delivery topics, read partition by partition
    until a poll comes back empty.

    Partitions come from the broker's metadata (a restarted Tansu auto-creates
    topics on produce with its own partition count), and the end of each is
    found by reading: Tansu's ListOffsets(latest) answered the last batch's base
    offset in our runs.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(
            [delivery_topic(c, settings.kafka_topic_prefix) for c in ALL_CHANNELS]
        )
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: Counter[str] = Counter()
    try:
        for topic in described:
            for partition in topic["partitions"]:
                tp = TopicPartition(topic["topic"], partition["partition"])
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                while records := (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    for record in records:
                        seen[events_pb2.DeliveryRequested.FromString(record.value).delivery_id] += 1
        return seen
    finally:
        await consumer.stop()


async def test_two_relays_publish_every_row_exactly_once(
    pool: asyncpg.Pool, settings: Settings, tenant: TenantCredentials
) -> None:
    settings.relay_batch_size = 50
    expected = await accept_many(pool, tenant.tenant_id, 400, settings)
    relays = [OutboxRelay(pool, settings) for _ in range(2)]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        await wait_for(lambda: _none_left(pool), timeout_s=60)
    finally:
        for relay in relays:
            relay.stop()
        await asyncio.gather(*tasks)
    assert all(r.published > 0 for r in relays), [r.published for r in relays]
    assert sum(r.published for r in relays) == len(expected) == 1200
    seen = await read_all_deliveries(settings)
    assert set(seen) == expected
    assert max(seen.values()) == 1


async def _none_left(pool: asyncpg.Pool) -> bool:
    return await unpublished(pool) == 0


@pytest.fixture
def own_broker() -> Iterator[EmbeddedKafka]:
    """A broker this test may stop and restart."""
    broker = EmbeddedKafka(free_port())
    broker.start()
    yield broker
    broker.stop()


async def delivered_count(pool: asyncpg.Pool, delivery_ids: set[str]) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE status = 'delivered' AND id = ANY($1::uuid[])",
            [uuid.UUID(d) for d in delivery_ids],
        )
    )


async def test_rows_written_while_the_broker_is_down_are_published_and_delivered_after_it_returns(
    pool: asyncpg.Pool, settings: Settings, tenant: TenantCredentials, own_broker: EmbeddedKafka
) -> None:
    """The gateway keeps accepting while the broker is away; nothing is marked
    published until the broker acknowledges; after it returns (empty: memory
    storage) everything accepted is delivered.

    Tansu sometimes acknowledges a produce retried across its restart without
    storing it; the relay's sweeper re-publishes such deliveries, so this test
    also covers that path.
    """
    settings.kafka_bootstrap = own_broker.bootstrap
    settings.kafka_request_timeout_ms = 1000
    settings.relay_sweep_after_s = 3.0
    settings.relay_sweep_interval_s = 0.5
    async with running_pipeline(pool, settings):
        before = await accept_many(pool, tenant.tenant_id, 10, settings)
        await wait_for(lambda: _all_delivered(pool, before), timeout_s=60)

        own_broker.stop()
        during = await accept_many(pool, tenant.tenant_id, 20, settings)
        # Bounded wait: several publish attempts fail meanwhile (no event marks them).
        await asyncio.sleep(1.0)
        assert await unpublished(pool) == len(during)

        own_broker.start()
        await wait_for(lambda: _all_delivered(pool, during), timeout_s=90)
    assert await unpublished(pool) == 0


async def _all_delivered(pool: asyncpg.Pool, delivery_ids: set[str]) -> bool:
    return await delivered_count(pool, delivery_ids) == len(delivery_ids)


async def test_with_the_broker_down_grpc_still_accepts_health_stays_serving_and_the_backlog_drains(
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: TenantCredentials,
    own_broker: EmbeddedKafka,
    gateway: Gateway,
    stub: Stub,
) -> None:
    """Issue 5 item 3 through the front door: while the broker is stopped (and the relay
    has failed to reach it), SendNotification still answers ACCEPTED, the gateway's health
    stays SERVING (only PostgreSQL decides it), nothing is marked published; once the broker
    is back every accepted delivery is delivered."""
    settings.kafka_bootstrap = own_broker.bootstrap
    settings.kafka_request_timeout_ms = 1000
    settings.relay_sweep_after_s = 3.0
    settings.relay_sweep_interval_s = 0.5
    async with running_pipeline(pool, settings):
        first = await stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=5)
        await wait_for(lambda: _all_delivered(pool, {d.delivery_id for d in first.deliveries}), timeout_s=60)

        own_broker.stop()
        with capture_logs() as logs:

            async def relay_failed() -> bool:
                return any(e["event"].startswith("relay: round failed") for e in logs)

            during: set[str] = set()
            for _ in range(10):
                reply = await stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=5)
                assert reply.status == notify_pb2.NOTIFICATION_STATUS_ACCEPTED
                during.update(d.delivery_id for d in reply.deliveries)
            await wait_for(relay_failed, timeout_s=30)
            # Accepted after the relay failed too.
            reply = await stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=5)
            during.update(d.delivery_id for d in reply.deliveries)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert await unpublished(pool) == len(during) == 33

        own_broker.start()
        await wait_for(lambda: _all_delivered(pool, during), timeout_s=90)
    assert await unpublished(pool) == 0


async def test_a_pipelined_relay_keeps_outbox_order_per_tenant(
    pool: asyncpg.Pool, settings: Settings, tenant: TenantCredentials
) -> None:
    # Several batches in flight at once: claims are serialized, so each tenant's rows
    # (one key, one partition) still reach the broker in outbox order.
    settings.relay_batch_size = 40
    settings.relay_pipeline_depth = 4
    await accept_many(pool, tenant.tenant_id, 300, settings)
    outbox_order = [
        str(r["delivery_id"])
        for r in await pool.fetch(
            "SELECT delivery_id FROM outbox WHERE topic LIKE '%notify.email' ORDER BY id"
        )
    ]
    relay = OutboxRelay(pool, settings)
    task = asyncio.create_task(relay.run())
    try:
        await wait_for(lambda: _none_left(pool), timeout_s=60)
    finally:
        relay.stop()
        await task
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    received: list[str] = []
    keys: set[bytes | None] = set()
    try:
        topic = delivery_topic("email", settings.kafka_topic_prefix)
        await consumer.topics()  # fetches the cluster metadata
        partitions = consumer.partitions_for_topic(topic) or set()
        for partition in sorted(partitions):
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while records := (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                received += [events_pb2.DeliveryRequested.FromString(r.value).delivery_id for r in records]
                keys |= {r.key for r in records}
    finally:
        await consumer.stop()
    assert len(partitions) == settings.kafka_partitions  # topics are created with the setting's count
    assert keys == {str(tenant.tenant_id).encode()}  # the Kafka key is the tenant id
    assert received == outbox_order  # one tenant: one key, one partition, outbox order
