"""The channel worker runtime: consume, deliver, commit.

One consumer group per channel (``switchboard.worker.<channel>``). Records
go to lanes, one per (partition, key = tenant): a lane delivers in order,
lanes run concurrently. A partition's offset is committed only up to the
first record whose outcome is not recorded in PostgreSQL yet. On any
unexpected error the consumer is closed without committing and rebuilt, so it
resumes from the last committed offset (at-least-once; the idempotent
``deliver`` absorbs the repeats).

Fairness between tenants: a lane holds at most
``worker_max_in_flight_per_tenant`` records. A record that would go beyond
is not taken: its partition is rewound to it (``seek``) and paused (Kafka
``pause``), and resumed once the lane is down to half, so one tenant's flood
stops only its own partition while the others keep flowing. Tenants sharing
that partition wait too: Kafka order within a partition (docs/operations.md,
"Known limits"). ``worker_max_in_flight`` bounds all lanes together.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable

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
        self._lanes: _Lanes | None = None
        self.outcomes: dict[Outcome, int] = defaultdict(int)

    @property
    def in_flight(self) -> int:
        """Records fetched whose outcome is not recorded yet (0 while no consumer runs)."""
        return 0 if self._lanes is None else self._lanes.in_flight

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
        """Poll and deliver continuously; commit each partition's offset up to the first
        record whose outcome is not recorded yet.

        Records go to lanes, one per (partition, key = tenant): a lane delivers in
        order, lanes run concurrently, and polling goes on while they work (a slow
        delivery holds up only its own lane). A lane takes at most
        ``worker_max_in_flight_per_tenant`` records: the partition of a record
        that would go beyond is rewound to it and paused until the lane is down
        to half (other partitions keep flowing); all lanes together hold at most
        ``worker_max_in_flight`` records (every partition paused beyond). A record's offset
        is committed only once it and every earlier record of its partition have
        their outcome recorded (at-least-once; the idempotent ``deliver`` absorbs
        what a restart consumes again). Partitions that were revoked are not
        committed by us; their new owner consumes them again.
        """
        lanes = self._lanes = _Lanes(self.handle_record)
        lane_limit = self._settings.worker_max_in_flight_per_tenant
        #: Partitions paused because one of their lanes is full.
        full: set[TopicPartition] = set()
        try:
            while not self._stopping.is_set():
                self._providers.cache.expire()  # release tenants idle past the TTL even when quiet
                lanes.raise_failure()
                assigned = consumer.assignment()
                full = {tp for tp in full if tp in assigned and lanes.longest_lane(tp) > lane_limit // 2}
                # At the global bound every partition is paused, but polling goes on: a consumer
                # that stops calling poll for max_poll_interval_ms is put out of its group.
                room = self._settings.worker_max_in_flight - lanes.in_flight
                _pause_only(consumer, assigned if room <= 0 else full)
                wait_ms = 50 if lanes.in_flight else 500
                batches = await consumer.getmany(
                    timeout_ms=wait_ms, max_records=max(1, min(MAX_RECORDS_PER_POLL, room))
                )
                for tp, records in batches.items():
                    held = lanes.add(records, lane_limit=lane_limit)
                    if held is not None:
                        # Fetch this partition again from the record not taken, once its lane drains.
                        consumer.seek(tp, held)
                        consumer.pause(tp)
                        full.add(tp)
                await self._commit_done(consumer, lanes)
            await lanes.finish()  # stop(): let every lane finish, then commit
            lanes.raise_failure()
            await self._commit_done(consumer, lanes)
        finally:
            await lanes.cancel()
            self._lanes = None

    async def _commit_done(self, consumer: AIOKafkaConsumer, lanes: _Lanes) -> None:
        assigned = consumer.assignment()
        lanes.forget_unassigned(assigned)
        offsets = lanes.committable()
        if offsets:
            await self.commit_offsets(consumer, {tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
            lanes.committed(offsets)

    async def commit_offsets(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        """Commit ``offsets``; called only after every outcome before them is recorded."""
        async with asyncio.timeout(self._settings.kafka_request_timeout_ms / 1000):
            await consumer.commit(offsets)

    async def handle_records(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        """Deliver ``records``: in order per (partition, key), concurrently across them."""
        lanes = _Lanes(self.handle_record)
        lanes.add(list(records))
        await lanes.finish()
        lanes.raise_failure()

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


def _pause_only(consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
    """Pause ``partitions`` and resume every other paused one (aiokafka drops records it
    fetched for a paused partition without moving its position: nothing is skipped)."""
    paused = consumer.paused()
    if partitions - paused:
        consumer.pause(*(partitions - paused))
    if paused - partitions:
        consumer.resume(*(paused - partitions))


class _Lanes:
    """Records in flight: a queue and a task per (partition, key), and per partition
    which offsets are done, so the committable offset is known at any moment."""

    def __init__(self, handle: Callable[[ConsumerRecord[bytes, bytes]], Awaitable[Outcome]]) -> None:
        self._handle = handle
        self._queues: dict[
            tuple[TopicPartition, bytes | None], deque[tuple[ConsumerRecord[bytes, bytes], int]]
        ] = {}
        self._tasks: dict[tuple[TopicPartition, bytes | None], asyncio.Task[None]] = {}
        #: Per partition: offsets handed out, in order, with whether their outcome is recorded.
        self._pending: dict[TopicPartition, deque[list[int | bool]]] = defaultdict(deque)
        self._next: dict[TopicPartition, int] = {}
        #: Bumped when a partition is revoked: outcomes of records handed out before no
        #: longer move its offset (its new owner consumes them again).
        self._generation: dict[TopicPartition, int] = defaultdict(int)
        self._failure: BaseException | None = None
        self.in_flight = 0

    def add(self, records: list[ConsumerRecord[bytes, bytes]], lane_limit: int | None = None) -> int | None:
        """Queue ``records`` (one partition's, in offset order) on their lanes.

        With ``lane_limit``, stop at the first record whose lane already holds
        that many records and return its offset: neither it nor any later record
        is taken (the caller fetches them again from that offset), so offsets
        stay contiguous. ``None`` when every record was queued.
        """
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            lane = (tp, record.key)
            queue = self._queues.get(lane)
            if lane_limit is not None and queue is not None and len(queue) >= lane_limit:
                return int(record.offset)
            entry: list[int | bool] = [record.offset, False]
            self._pending[tp].append(entry)
            self._queues.setdefault(lane, deque()).append((record, self._generation[tp]))
            self.in_flight += 1
            if lane not in self._tasks:
                self._tasks[lane] = asyncio.create_task(self._run(lane))
        return None

    def longest_lane(self, tp: TopicPartition) -> int:
        """Records held by the fullest lane of partition ``tp`` (0 if none)."""
        return max((len(queue) for (lane_tp, _), queue in self._queues.items() if lane_tp == tp), default=0)

    async def _run(self, lane: tuple[TopicPartition, bytes | None]) -> None:
        queue = self._queues[lane]
        try:
            while queue:
                record, generation = queue[0]
                await self._handle(record)
                queue.popleft()
                self._mark_done(lane[0], generation, record.offset)
        except BaseException as exc:
            if self._failure is None and not isinstance(exc, asyncio.CancelledError):
                self._failure = exc
            raise
        finally:
            if not queue or self._failure is not None:
                self._tasks.pop(lane, None)
                self._queues.pop(lane, None)

    def _mark_done(self, tp: TopicPartition, generation: int, offset: int) -> None:
        self.in_flight -= 1
        if generation != self._generation[tp]:
            return  # handed out before the partition was revoked
        for entry in self._pending[tp]:
            if entry[0] == offset:
                entry[1] = True
                break
        pending = self._pending[tp]
        while pending and pending[0][1]:
            self._next[tp] = int(pending.popleft()[0]) + 1

    def forget_unassigned(self, assigned: set[TopicPartition]) -> None:
        """Drop what we track of partitions no longer assigned to us (revoked)."""
        for tp in [tp for tp in self._pending if tp not in assigned]:
            del self._pending[tp]
            self._next.pop(tp, None)
            self._generation[tp] += 1

    def committable(self) -> dict[TopicPartition, int]:
        """Per partition, the offset to commit (one past the last contiguous done record)."""
        return dict(self._next)

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Forget offsets that were committed (unless a later one arrived meanwhile)."""
        for tp, offset in offsets.items():
            if self._next.get(tp) == offset:
                del self._next[tp]

    def raise_failure(self) -> None:
        """Re-raise the first unexpected error of a lane (the consumer is then rebuilt)."""
        if self._failure is not None:
            raise self._failure

    async def finish(self) -> None:
        """Wait for every lane to deliver what it holds (or fail)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()), return_when=asyncio.ALL_COMPLETED)

    async def cancel(self) -> None:
        """Cancel what is still running (after a failure, or when the consumer is torn down)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


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
