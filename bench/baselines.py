"""Raw baselines measured in the same run: asyncpg inserts and aiokafka produce.

- :func:`asyncpg_inserts`: the rows one accepted notification writes (its
  idempotency key, the notification, one delivery, one outbox row) inserted
  with plain asyncpg, committed durably, either one notification per
  transaction (the ceiling for unary accepts) or ``batch`` per transaction with
  ``executemany`` (the ceiling for batch accepts). Same pool size as the
  gateway's. No validation, no protobuf, no gRPC.
- :func:`kafka_produce`: ``count`` messages of the delivery event's size, sent
  by an ``AIOKafkaProducer`` built exactly like the relay's (``make_producer``:
  acks=all, same linger and batch size), in chunks of the relay's batch size,
  each chunk's acknowledgements awaited: the ceiling for the relay.
- :func:`relay_throughput`: the real relay publishing ``count`` outbox rows.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from switchboard.kafka import make_producer
from switchboard.settings import Settings

KEY_INSERT = (
    "INSERT INTO idempotency_keys (tenant_id, request_id, request_hash, response) VALUES ($1, $2, $3, $4)"
)
Rows = list[tuple[object, ...]]
#: A delivery event's size on the wire, bytes (measured from the write path: about 330).
EVENT_BYTES = 330


def _rows(tenant_id: uuid.UUID, n: int) -> tuple[Rows, Rows, Rows, Rows]:
    now = datetime.now(UTC)
    keys: Rows = []
    notifications: Rows = []
    deliveries: Rows = []
    outbox: Rows = []
    payload = b"x" * EVENT_BYTES
    for _ in range(n):
        notification_id, delivery_id = uuid.uuid4(), uuid.uuid4()
        request_id = uuid.uuid4().hex
        keys.append((tenant_id, request_id, b"h" * 32, b"r" * 80))
        notifications.append((notification_id, tenant_id, request_id, json.dumps({"source": "bench"}), now))
        deliveries.append(
            (delivery_id, notification_id, tenant_id, "email", "user@example.com", payload, now)
        )
        outbox.append(("bench.notify.email", str(tenant_id).encode(), payload, delivery_id, now))
    return keys, notifications, deliveries, outbox


async def _insert(conn: asyncpg.pool.PoolConnectionProxy, tenant_id: uuid.UUID, n: int) -> None:
    keys, notifications, deliveries, outbox = _rows(tenant_id, n)
    async with conn.transaction():
        if n == 1:
            await conn.execute(
                KEY_INSERT,
                *keys[0],
            )
            await conn.execute(
                "INSERT INTO notifications (id, tenant_id, request_id, metadata, created_at)"
                " VALUES ($1,$2,$3,$4::jsonb,$5)",
                *notifications[0],
            )
            await conn.execute(
                "INSERT INTO deliveries (id, notification_id, tenant_id, channel, recipient, event,"
                " created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$7)",
                *deliveries[0],
            )
            await conn.execute(
                "INSERT INTO outbox (topic, key, payload, delivery_id, created_at) VALUES ($1,$2,$3,$4,$5)",
                *outbox[0],
            )
            return
        await conn.executemany(
            KEY_INSERT,
            keys,
        )
        await conn.executemany(
            "INSERT INTO notifications (id, tenant_id, request_id, metadata, created_at)"
            " VALUES ($1,$2,$3,$4::jsonb,$5)",
            notifications,
        )
        await conn.executemany(
            "INSERT INTO deliveries (id, notification_id, tenant_id, channel, recipient, event,"
            " created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$7)",
            deliveries,
        )
        await conn.executemany(
            "INSERT INTO outbox (topic, key, payload, delivery_id, created_at) VALUES ($1,$2,$3,$4,$5)",
            outbox,
        )


async def asyncpg_inserts(
    dsn: str, tenant_id: str, *, concurrency: int, batch: int, duration_s: float, pool_size: int = 10
) -> float:
    """Insert accepted-notification rows for ``duration_s`` s; return notifications committed per second.

    ``batch`` notifications per transaction, ``concurrency`` transactions in
    flight over a pool of ``pool_size`` connections. The bench outbox topic is
    ``bench.notify.email`` (no worker reads it) and the rows are never published.
    """
    tenant = uuid.UUID(tenant_id)
    done = 0
    async with asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size) as pool:
        end = time.perf_counter() + duration_s

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < end:
                async with pool.acquire() as conn:
                    await _insert(conn, tenant, batch)
                done += batch

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return done / elapsed


async def kafka_produce(settings: Settings, topic: str, count: int, chunk: int) -> float:
    """Produce ``count`` messages the relay's way; return messages acknowledged per second."""
    producer = make_producer(settings)
    await producer.start()
    try:
        payload = b"x" * EVENT_BYTES
        key = str(uuid.uuid4()).encode()
        await (await producer.send(topic, value=payload, key=key))  # connect + metadata first
        started = time.perf_counter()
        for first in range(0, count, chunk):
            futures = [
                await producer.send(topic, value=payload, key=key) for _ in range(min(chunk, count - first))
            ]
            await asyncio.gather(*futures)
        return count / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def fill_outbox(dsn: str, tenant_id: str, topic: str, count: int) -> None:
    """Insert ``count`` unpublished outbox rows for ``topic`` (event-sized payloads)."""
    conn = await asyncpg.connect(dsn)
    try:
        key = tenant_id.encode()
        payload = b"x" * EVENT_BYTES
        await conn.copy_records_to_table(
            "outbox",
            records=[(topic, key, payload) for _ in range(count)],
            columns=["topic", "key", "payload"],
        )
    finally:
        await conn.close()


async def relay_throughput(
    dsn: str, topic: str, count: int, resume: Callable[[], None], timeout_s: float = 300.0
) -> float:
    """Call ``resume`` (un-pausing the relay) and time until ``count`` rows of ``topic``
    are published; return rows per second. Raises ``TimeoutError`` after ``timeout_s``."""
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        resume()
        async with asyncio.timeout(timeout_s):
            while True:
                left = await conn.fetchval(
                    "SELECT count(*) FROM outbox WHERE topic = $1 AND published_at IS NULL", topic
                )
                if left == 0:
                    break
                await asyncio.sleep(0.02)
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()
