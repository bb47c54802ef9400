"""The payment worker: consumes ``payments.commands`` and executes each command.

One consumer group (``<prefix>switchboard.payment-worker``) reads the
``PaymentCommand`` messages the outbox relay publishes on
``<prefix>payments.commands`` (key: the tenant id). Each poll returns a batch;
commands of the same payment are executed in order (a payment's CREATE before
its CAPTURE before its REFUND), different payments concurrently (at most
``concurrency`` at once), so a slow processor call or an in-lane retry only
holds up its own payment. The work itself is :mod:`payments.execution`
(claim, call the processor with the operation's idempotency key, record the
outcome with its journal and event in one transaction).

**Offsets are committed only after every command of the batch has its outcome
recorded in PostgreSQL.** On any unexpected error (PostgreSQL down, a broker
error) the consumer is closed without committing and rebuilt, so it resumes
from the last committed offset; the redelivered commands find their work done
(idempotent consumer) or send a PENDING attempt again with the same key.
A command that cannot be decoded, or that the state machine refuses (a bug,
never a transient condition), is logged and skipped so it cannot block the
partition.

``switchboard payment-worker`` (:func:`run_payment_worker_process`) runs the
worker, the janitor (payments/janitor.py) and the tenant change listener that
drops a tenant's cached processors when its configuration changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from google.protobuf.message import DecodeError

from channels.catalog import all_topics, payment_commands_topic
from payments.execution import ExecutionPolicy, Executor, Outcome, execute_command
from payments.state_machine import PaymentStateError
from switchboard.kafka import ensure_topics
from switchboard.payments.v1 import events_pb2
from switchboard.settings import Settings

log = structlog.get_logger(__name__)

MAX_RECORDS_PER_POLL = 500
#: Commands executed at once by one worker (each holds a pool connection only while recording).
DEFAULT_CONCURRENCY = 32


def consumer_group(prefix: str = "") -> str:
    """The payment workers' consumer group: ``<prefix>switchboard.payment-worker``."""
    return f"{prefix}switchboard.payment-worker"


class PaymentWorker:
    """Consumes ``<prefix>payments.commands`` and executes each command with ``executor``.

    ``on_poll`` runs before every poll (the CLI expires idle processor cache entries there).
    ``concurrency``: commands executed at once. ``outcomes`` counts what each command did;
    ``skipped_undecodable`` the commands skipped because they could not be decoded or were
    refused by the state machine.
    """

    def __init__(
        self,
        executor: Executor,
        settings: Settings,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_poll: Callable[[], object] | None = None,
    ) -> None:
        self._ex = executor
        self._on_poll = on_poll
        self._settings = settings
        self._limit = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        self.outcomes: Counter[Outcome] = Counter()
        self.skipped_undecodable = 0
        self.batches = 0

    def stop(self) -> None:
        """Finish the current batch, commit, and return from :meth:`run`."""
        self._stopping.set()

    def _make_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        return AIOKafkaConsumer(
            payment_commands_topic(s.kafka_topic_prefix),
            bootstrap_servers=s.require_kafka_bootstrap(),
            group_id=consumer_group(s.kafka_topic_prefix),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=MAX_RECORDS_PER_POLL,
            fetch_max_wait_ms=s.worker_fetch_max_wait_ms,
            request_timeout_ms=s.kafka_request_timeout_ms + 30_000,
        )

    async def run(self) -> None:
        """Consume until :meth:`stop`; rebuild the consumer after failures (nothing committed)."""
        backoff_s = self._settings.relay_error_backoff_ms / 1000
        while not self._stopping.is_set():
            consumer: AIOKafkaConsumer | None = None
            startup_s = max(30.0, 3 * self._settings.kafka_request_timeout_ms / 1000)
            try:
                async with asyncio.timeout(startup_s):
                    await ensure_topics(self._settings, all_topics(self._settings.kafka_topic_prefix))
                    consumer = self._make_consumer()
                    await consumer.start()
                await self._consume(consumer)
            except Exception as exc:
                log.warning("payment worker: restarting consumer", error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self._settings.kafka_request_timeout_ms / 1000):
                            await consumer.stop()

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set():
            if self._on_poll is not None:
                self._on_poll()
            batches = await consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS_PER_POLL)
            records = [r for rs in batches.values() for r in rs]
            if not records:
                continue
            await self.handle_records(records)
            offsets = {tp: OffsetAndMetadata(rs[-1].offset + 1, "") for tp, rs in batches.items() if rs}
            await self.commit_offsets(consumer, offsets)
            self.batches += 1

    async def commit_offsets(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        """Commit ``offsets``; called only after every outcome of the batch is recorded."""
        async with asyncio.timeout(self._settings.kafka_request_timeout_ms / 1000):
            await consumer.commit(offsets)

    async def handle_records(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        """Execute ``records``: in order per payment, concurrently across payments.

        Returns when every command has its outcome recorded; raises the first unexpected
        error (after the other lanes finished), so the caller does not commit.
        """
        lanes: dict[tuple[int, str], list[events_pb2.PaymentCommand]] = defaultdict(list)
        for record in records:
            command = self._decode(record)
            if command is not None:
                lanes[(record.partition, command.payment_id)].append(command)

        async def run_lane(lane: list[events_pb2.PaymentCommand]) -> None:
            for command in lane:
                async with self._limit:
                    await self.handle_command(command)

        async with asyncio.TaskGroup() as group:
            for lane in lanes.values():
                group.create_task(run_lane(lane))

    def _decode(self, record: ConsumerRecord[bytes, bytes]) -> events_pb2.PaymentCommand | None:
        try:
            command = events_pb2.PaymentCommand.FromString(record.value or b"")
            uuid.UUID(command.tenant_id)
            command.payment_id = str(uuid.UUID(command.payment_id))
        except (ValueError, DecodeError) as exc:
            log.error(
                "payment worker: undecodable command skipped",
                topic=record.topic,
                offset=record.offset,
                error=repr(exc),
            )
            self.skipped_undecodable += 1
            return None
        return command

    async def handle_command(self, command: events_pb2.PaymentCommand) -> Outcome:
        """Execute one command and count its outcome; a refused or malformed one is skipped."""
        try:
            outcome = await execute_command(self._ex, command)
        except (ValueError, PaymentStateError) as exc:
            # Deterministic: redelivering it would fail the same way and block the partition.
            log.error(
                "payment worker: command refused, skipped",
                payment_id=command.payment_id,
                kind=events_pb2.PaymentCommandKind.Name(command.kind),
                error=repr(exc),
            )
            self.skipped_undecodable += 1
            return Outcome.SKIPPED
        self.outcomes[outcome] += 1
        log.debug("payment command executed", payment_id=command.payment_id, outcome=outcome.value)
        return outcome


async def run_payment_worker_process(settings: Settings) -> None:
    """Run the payment worker, the janitor and the tenant change listener until SIGTERM/SIGINT."""
    from payments.janitor import PaymentJanitor
    from payments.routing import CircuitBreakers
    from switchboard.db.pool import create_pool
    from switchboard.signals import drain, wait_for_shutdown_signal
    from tenants.invalidation import TenantChangeListener
    from tenants.key_ring import load_verified_key_ring
    from tenants.processor_cache import processor_cache_for

    pool = await create_pool(settings)
    ring = await load_verified_key_ring(settings, pool)
    processors = processor_cache_for(pool, settings, ring)
    listener = TenantChangeListener(
        settings.require_database_url(), processors.invalidate, processors.invalidate_all
    )
    executor = Executor(
        pool=pool,
        processors=processors,
        breakers=CircuitBreakers(
            settings.payment_breaker_failure_threshold, settings.payment_breaker_cool_down_s
        ),
        policy=ExecutionPolicy.from_settings(settings),
        topic_prefix=settings.kafka_topic_prefix,
    )
    # Expiry releases tenants idle past the TTL even when traffic is quiet.
    worker = PaymentWorker(executor, settings, on_poll=processors.expire)
    janitor = PaymentJanitor(
        executor,
        interval_s=settings.payment_janitor_interval_s,
        batch_size=settings.payment_janitor_batch_size,
    )
    tasks = [asyncio.create_task(t) for t in (listener.run(), worker.run(), janitor.run())]
    log.info("payment worker running")
    await wait_for_shutdown_signal()
    listener.stop()
    worker.stop()
    janitor.stop()

    async def shut_down() -> None:
        await asyncio.gather(*tasks)  # the batch in hand finishes and its offsets commit
        await processors.close()
        await pool.close()

    await drain(shut_down(), settings.shutdown_grace_s)
    log.info("payment worker stopped", outcomes=dict(worker.outcomes))
