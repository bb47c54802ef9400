"""The channel worker runtime: consume, deliver, commit.

One consumer group per channel (``switchboard.worker.<channel>``). Each poll
returns a batch; messages with the same partition and key (the tenant) are
handled in order, different tenants concurrently. Offsets are committed only
after every message of the batch has its outcome recorded in PostgreSQL. On
any unexpected error the consumer is closed without committing and rebuilt,
so it resumes from the last committed offset (at-least-once; the idempotent
``deliver`` absorbs the repeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import Iterable

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from google.protobuf.message import DecodeError

from channels.catalog import CHANNEL_NAMES, all_topics, delivery_topic
from channels.delivery import Outcome, deliver
from channels.registry import TenantProviders
from switchboard.kafka import ensure_topics
from switchboard.notify.v1 import events_pb2
from switchboard.settings import Settings

log = structlog.get_logger(__name__)

MAX_RECORDS_PER_POLL = 500


def consumer_group(channel: str, prefix: str = "") -> str:
    """The consumer group of ``channel``'s workers."""
    return f"{prefix}switchboard.worker.{channel}"


class ChannelWorker:
    """Consumes ``notify.<channel>`` for one channel and delivers each event."""

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, channel: str, providers: TenantProviders
    ) -> None:
        self._pool = pool
        self._settings = settings
        self.channel = channel
        self._providers = providers
        self._stopping = asyncio.Event()
        self.outcomes: dict[Outcome, int] = defaultdict(int)

    def stop(self) -> None:
        """Finish the current batch, commit, and return from :meth:`run`."""
        self._stopping.set()

    def _make_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        return AIOKafkaConsumer(
            delivery_topic(self.channel, s.kafka_topic_prefix),
            bootstrap_servers=s.require_kafka_bootstrap(),
            group_id=consumer_group(self.channel, s.kafka_topic_prefix),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=MAX_RECORDS_PER_POLL,
            fetch_max_wait_ms=s.worker_fetch_max_wait_ms,
            request_timeout_ms=s.kafka_request_timeout_ms + 30_000,
        )

    async def run(self) -> None:
        """Consume until :meth:`stop`; rebuild the consumer after failures."""
        backoff_s = self._settings.relay_error_backoff_ms / 1000
        while not self._stopping.is_set():
            consumer: AIOKafkaConsumer | None = None
            # Joining a consumer group takes a few seconds even when all is well.
            startup_s = max(30.0, 3 * self._settings.kafka_request_timeout_ms / 1000)
            try:
                async with asyncio.timeout(startup_s):
                    await ensure_topics(self._settings, all_topics(self._settings.kafka_topic_prefix))
                    consumer = self._make_consumer()
                    await consumer.start()
                await self._consume(consumer)
            except Exception as exc:
                log.warning("worker: restarting consumer", channel=self.channel, error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self._settings.kafka_request_timeout_ms / 1000):
                            await consumer.stop()

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set():
            self._providers.cache.expire()  # release tenants idle past the TTL even when traffic is quiet
            batches = await consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS_PER_POLL)
            records = [r for rs in batches.values() for r in rs]
            if not records:
                continue
            await self.handle_records(records)
            offsets = {tp: OffsetAndMetadata(rs[-1].offset + 1, "") for tp, rs in batches.items() if rs}
            await self.commit_offsets(consumer, offsets)

    async def commit_offsets(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        """Commit ``offsets``; called only after every outcome of the batch is recorded."""
        async with asyncio.timeout(self._settings.kafka_request_timeout_ms / 1000):
            await consumer.commit(offsets)

    async def handle_records(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        """Deliver ``records``: in order per (partition, key), concurrently across them."""
        lanes: dict[tuple[int, bytes | None], list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
        for record in records:
            lanes[(record.partition, record.key)].append(record)

        async def run_lane(lane: list[ConsumerRecord[bytes, bytes]]) -> None:
            for record in lane:
                await self.handle_record(record)

        async with asyncio.TaskGroup() as group:
            for lane in lanes.values():
                group.create_task(run_lane(lane))

    async def handle_record(self, record: ConsumerRecord[bytes, bytes]) -> Outcome:
        """Decode and deliver one record; a record that cannot be decoded is logged and skipped."""
        try:
            event = events_pb2.DeliveryRequested.FromString(record.value or b"")
            if CHANNEL_NAMES.get(event.channel) != self.channel:
                raise ValueError(f"event for channel {event.channel} on {self.channel} topic")
            tenant_id = uuid.UUID(event.tenant_id)
            uuid.UUID(event.delivery_id)
        except (ValueError, DecodeError) as exc:
            log.error(
                "worker: undecodable event skipped", topic=record.topic, offset=record.offset, error=repr(exc)
            )
            self.outcomes[Outcome.SKIPPED] += 1
            return Outcome.SKIPPED
        outcome = await deliver(
            self._pool,
            event,
            lambda: self._providers.provider_for(tenant_id, self.channel),
            policy=await self._providers.retry_policy(tenant_id),
            topic_prefix=self._settings.kafka_topic_prefix,
        )
        self.outcomes[outcome] += 1
        log.debug("delivery handled", delivery_id=event.delivery_id, outcome=outcome.value)
        return outcome


async def run_worker_process(settings: Settings, channels: list[str]) -> None:
    """Run one worker per channel in ``channels`` until SIGTERM/SIGINT."""
    from switchboard.db.pool import create_pool
    from switchboard.signals import drain, wait_for_shutdown_signal
    from tenants.invalidation import TenantChangeListener
    from tenants.key_ring import load_verified_key_ring

    pool = await create_pool(settings)
    ring = await load_verified_key_ring(settings, pool)
    providers = TenantProviders(pool, settings, ring)
    listener = TenantChangeListener(
        settings.require_database_url(), providers.invalidate, providers.invalidate_all
    )
    workers = [ChannelWorker(pool, settings, channel, providers) for channel in channels]
    tasks = [asyncio.create_task(listener.run())] + [asyncio.create_task(w.run()) for w in workers]
    log.info("workers running", channels=channels)
    await wait_for_shutdown_signal()
    listener.stop()
    for worker in workers:
        worker.stop()

    async def shut_down() -> None:
        await asyncio.gather(*tasks)  # each worker finishes its batch and commits its offsets
        await providers.close()
        await pool.close()

    await drain(shut_down(), settings.shutdown_grace_s)
    log.info("workers stopped", outcomes={w.channel: dict(w.outcomes) for w in workers})
