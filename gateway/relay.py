"""The outbox relay: publishes committed outbox rows to Kafka, and sweeps lost deliveries and payment
commands back (payments/sweeper.py).

Each round claims up to ``relay_batch_size`` due, unpublished rows with
``FOR UPDATE SKIP LOCKED`` (so several relays share the work without
publishing a row twice), sends them with ``acks=all``, waits for every
acknowledgement and only then marks them published and commits. A failure
before the commit leaves the rows unpublished for the next round: delivery to
Kafka is at-least-once and consumers are idempotent.

The relay sleeps until a ``NOTIFY`` from the write path or the poll interval,
whichever comes first. When the broker cannot be reached it backs off and
re-creates the topics before trying again (an empty broker after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer

from channels.callbacks import CallbackDispatcher
from channels.catalog import all_topics
from gateway.write_path import OUTBOX_NOTIFY_CHANNEL
from payments.sweeper import sweep_unfinished_payment_commands
from switchboard.kafka import ensure_topics, make_producer
from switchboard.settings import Settings

log = structlog.get_logger(__name__)


async def publish_batch(
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    batch_size: int,
    claim_lock: asyncio.Lock | None = None,
) -> int:
    """Claim, publish and mark one batch of due outbox rows; return how many were published.

    With ``claim_lock`` shared by several concurrent calls (:func:`publish_pipelined`),
    claiming and handing the rows to the producer happen under the lock, so
    rows enter the producer in outbox order; waiting for the broker's acks,
    marking and committing overlap with the next batch's claim.
    Raises the producer's error (and rolls the claim back) if any send fails.
    """
    async with pool.acquire() as conn, conn.transaction():
        async with claim_lock or contextlib.nullcontext():
            rows = await conn.fetch(
                """SELECT id, topic, key, payload FROM outbox
                    WHERE published_at IS NULL AND available_at <= now()
                    ORDER BY available_at, id
                    LIMIT $1
                    FOR UPDATE SKIP LOCKED""",
                batch_size,
            )
            if not rows:
                return 0
            futures = [await producer.send(r["topic"], value=r["payload"], key=r["key"]) for r in rows]
        acks = await asyncio.gather(*futures)
        log.debug("acknowledged", first=str(acks[0].topic_partition), offset=acks[0].offset, count=len(acks))
        await conn.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
        )
        return len(rows)


async def publish_pipelined(
    pool: asyncpg.Pool, producer: AIOKafkaProducer, batch_size: int, depth: int
) -> int:
    """Publish up to ``depth`` batches with their broker round trips and commits overlapped;
    return how many rows were published.

    Rows still reach the producer in outbox order (claims are serialized). If
    an earlier batch fails after a later one was sent, the earlier rows are
    published again later, after the later ones: the same reordering any
    retry causes, and the idempotent consumer absorbs the duplicates.
    Raises the first batch error after every batch has finished.
    """
    if depth <= 1:
        return await publish_batch(pool, producer, batch_size)
    lock = asyncio.Lock()
    results = await asyncio.gather(
        *(publish_batch(pool, producer, batch_size, lock) for _ in range(depth)), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return sum(r for r in results if isinstance(r, int))


async def sweep_unfinished_deliveries(
    pool: asyncpg.Pool, *, after_s: float, topic_prefix: str, limit: int = 1000
) -> int:
    """Re-publish deliveries still QUEUED or SENDING ``after_s`` s after their last
    outbox row was written (and whose retry, if any, was due that long ago);
    return how many.

    This is what makes "nothing accepted is lost" hold when the broker loses
    messages it acknowledged (a memory-only broker restarting, unclean leader
    election, retention expiry) or a worker dies mid-send. The duplicates it may
    create are absorbed by the idempotent consumer. Rows with an unpublished
    outbox row are skipped; ``FOR UPDATE SKIP LOCKED`` lets several relays sweep.
    """
    async with pool.acquire() as conn, conn.transaction():
        swept = await conn.fetchval(
            """WITH due AS (
                   SELECT d.id FROM deliveries d
                    WHERE d.status IN ('queued', 'sending')
                      AND d.last_enqueued_at < now() - make_interval(secs => $2)
                      AND (d.next_attempt_at IS NULL OR d.next_attempt_at < now() - make_interval(secs => $2))
                      AND NOT EXISTS (SELECT 1 FROM outbox o
                                       WHERE o.delivery_id = d.id AND o.published_at IS NULL)
                    ORDER BY d.last_enqueued_at
                    LIMIT $3
                    FOR UPDATE SKIP LOCKED),
               touched AS (
                   UPDATE deliveries d SET last_enqueued_at = now()
                     FROM due WHERE d.id = due.id
                   RETURNING d.id, d.tenant_id, d.channel, d.event),
               inserted AS (
                   INSERT INTO outbox (topic, key, payload, delivery_id)
                   SELECT $1 || 'notify.' || channel, convert_to(tenant_id::text, 'UTF8'), event, id
                     FROM touched
                   RETURNING 1)
               SELECT count(*) FROM inserted""",
            topic_prefix,
            after_s,
            limit,
        )
        if swept:
            await conn.execute("SELECT pg_notify($1, '')", OUTBOX_NOTIFY_CHANNEL)
    return int(swept or 0)


async def reap_idempotency_keys(pool: asyncpg.Pool, *, retention_s: float, limit: int = 10_000) -> int:
    """Delete request_id records older than ``retention_s`` seconds; return how many.

    Both key spaces: the tenants' (``idempotency_keys``: notifications and
    payments) and the operator's (``admin_idempotency_keys``: TenantAdminService),
    up to ``limit`` rows of each per call. Rows locked by a request taking the
    key over are skipped.
    """
    deleted = await pool.fetchval(
        """WITH old AS (
               SELECT tenant_id, request_id FROM idempotency_keys
                WHERE created_at < now() - make_interval(secs => $1)
                LIMIT $2 FOR UPDATE SKIP LOCKED),
           gone AS (
               DELETE FROM idempotency_keys k USING old
                WHERE k.tenant_id = old.tenant_id AND k.request_id = old.request_id
               RETURNING 1),
           old_admin AS (
               SELECT request_id FROM admin_idempotency_keys
                WHERE created_at < now() - make_interval(secs => $1)
                LIMIT $2 FOR UPDATE SKIP LOCKED),
           gone_admin AS (
               DELETE FROM admin_idempotency_keys k USING old_admin
                WHERE k.request_id = old_admin.request_id
               RETURNING 1)
           SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM gone_admin)""",
        retention_s,
        limit,
    )
    return int(deleted or 0)


class OutboxRelay:
    """A relay loop over ``pool`` publishing with a producer built from ``settings``.

    Every round (sweep, connect, ensure topics, publish one batch) runs under
    one deadline, so a broker or database that stops answering can delay the
    relay but never wedge it: on any failure it drops its clients, backs off
    and starts over.
    """

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._listener: asyncpg.Connection | None = None
        self._topics_ready = False
        self._next_sweep = 0.0
        self.published = 0
        self.swept = 0
        self.swept_payment_commands = 0

    @property
    def _round_timeout_s(self) -> float:
        return 3 * self._settings.kafka_request_timeout_ms / 1000 + self._settings.db_command_timeout_s

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Ask the loop to finish its current batch and return."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; survives broker and database outages."""
        try:
            while not self._stopping.is_set():
                try:
                    async with asyncio.timeout(self._round_timeout_s):
                        sent = await self._round()
                    if not sent:
                        await self._idle()
                except Exception as exc:  # aiokafka and asyncpg raise many types; all mean "start over"
                    log.warning("relay: round failed, backing off", error=repr(exc))
                    await self._drop_clients()
                    await self._backoff()
        finally:
            await self._drop_clients()

    async def _round(self) -> int:
        settings = self._settings
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_sweep:
            self._next_sweep = loop.time() + settings.relay_sweep_interval_s
            swept = await sweep_unfinished_deliveries(
                self._pool, after_s=settings.relay_sweep_after_s, topic_prefix=settings.kafka_topic_prefix
            )
            if swept:
                self.swept += swept
                log.warning("swept unfinished deliveries back to the outbox", count=swept)
            commands = await sweep_unfinished_payment_commands(
                self._pool, after_s=settings.payment_sweep_after_s, topic_prefix=settings.kafka_topic_prefix
            )
            if commands.total:
                self.swept_payment_commands += commands.total
                log.warning(
                    "swept unfinished payment operations: their commands go out again",
                    creates=commands.creates,
                    captures=commands.captures,
                    refunds=commands.refunds,
                    cancels=commands.cancels,
                )
            reaped = await reap_idempotency_keys(self._pool, retention_s=settings.idempotency_retention_s)
            if reaped:
                log.info("reaped expired idempotency keys", count=reaped)
        if self._listener is None or self._listener.is_closed():
            self._listener = await asyncpg.connect(settings.require_database_url())
            await self._listener.add_listener(OUTBOX_NOTIFY_CHANNEL, self._on_notify)
        if not self._topics_ready:
            await ensure_topics(settings, all_topics(settings.kafka_topic_prefix))
            self._topics_ready = True
        if self._producer is None:
            self._producer = make_producer(settings)
            await self._producer.start()
        self._wake.clear()
        sent = await publish_pipelined(
            self._pool, self._producer, settings.relay_batch_size, settings.relay_pipeline_depth
        )
        self.published += sent
        return sent

    async def _idle(self) -> None:
        """Wait for a NOTIFY, the poll interval or the next sweep, whichever is first."""
        loop = asyncio.get_running_loop()
        wait_s = min(self._settings.relay_poll_interval_ms / 1000, max(0.0, self._next_sweep - loop.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), wait_s)

    async def _drop_clients(self) -> None:
        """Close the producer and the LISTEN connection (bounded: a dead broker
        must not keep us waiting); the next round rebuilds them."""
        producer, listener = self._producer, self._listener
        self._producer, self._listener, self._topics_ready = None, None, False
        if producer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._settings.kafka_request_timeout_ms / 1000):
                    await producer.stop()
        if listener is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._settings.db_command_timeout_s):
                    await listener.close()

    async def _backoff(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self._settings.relay_error_backoff_ms / 1000)


def make_callback_dispatcher(pool: asyncpg.Pool, settings: Settings) -> CallbackDispatcher:
    """The status-callback dispatcher configured from the ``callback_*`` settings."""
    return CallbackDispatcher(
        pool,
        batch_size=settings.callback_batch_size,
        max_attempts=settings.callback_max_attempts,
        base_backoff_s=settings.callback_retry_base_s,
        max_backoff_s=settings.callback_retry_max_s,
        timeout_s=settings.callback_timeout_s,
        poll_interval_s=settings.callback_poll_interval_ms / 1000,
        max_concurrency=settings.callback_max_concurrency,
    )


async def run_relay_process(settings: Settings) -> None:
    """Run one relay until SIGTERM/SIGINT; the current batch finishes first."""
    from switchboard.db.pool import create_pool
    from switchboard.signals import drain, wait_for_shutdown_signal

    pool = await create_pool(settings)
    relay = OutboxRelay(pool, settings)
    task = asyncio.create_task(relay.run())
    # Status callbacks get their own small pool, away from the connections the outbox uses.
    callback_pool = await asyncpg.create_pool(
        settings.require_database_url(), min_size=1, max_size=2, command_timeout=settings.db_command_timeout_s
    )
    assert callback_pool is not None
    dispatcher = make_callback_dispatcher(callback_pool, settings)
    stop_callbacks = asyncio.Event()
    callback_task = asyncio.create_task(dispatcher.run(stop_callbacks))
    log.info("relay running")
    await wait_for_shutdown_signal()
    relay.stop()
    stop_callbacks.set()

    async def shut_down() -> None:
        await task  # the batch in flight is published and marked first
        await callback_task
        await dispatcher.aclose()
        await callback_pool.close()
        await pool.close()

    await drain(shut_down(), settings.shutdown_grace_s)
    log.info("relay stopped", published=relay.published)
