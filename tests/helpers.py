"""Test helpers: request builders, polling with a deadline, row counts."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import firebase_admin  # type: ignore[import-untyped]
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from channels.registry import TenantProviders
from channels.worker import ChannelWorker
from gateway.relay import OutboxRelay
from switchboard.fakes.twilio import FakeTwilio
from switchboard.notify.v1 import notify_pb2
from switchboard.settings import Settings
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tenants.invalidation import TenantChangeListener
from tenants.sealing import MasterKeyRing

T = TypeVar("T")
#: The From number of the tenants' fake Twilio accounts (Twilio's magic test number).
TWILIO_FROM = "+15005550006"
TABLES = ("notifications", "deliveries", "delivery_attempts", "outbox", "idempotency_keys")


def new_request_id() -> str:
    """A fresh AIP-155 request_id (a UUID4), as a well-behaved client sends per new request."""
    return str(uuid.uuid4())


def send_request(**overrides: object) -> notify_pb2.SendNotificationRequest:
    """A valid all-channel request; keyword arguments replace top-level fields."""
    request = notify_pb2.SendNotificationRequest(
        request_id=str(uuid.uuid4()),
        channels=[notify_pb2.CHANNEL_ALL],
        recipient=notify_pb2.Recipient(
            email="ada@example.com", phone_number="+14155550123", fcm_token="tok:APA91b-test_token"
        ),
        email=notify_pb2.EmailContent(subject="Hello", text="Plain body", html="<p>HTML body</p>"),
        sms=notify_pb2.SmsContent(text="Hello by SMS"),
        push=notify_pb2.PushContent(title="Hello", body="By push", data={"k": "v"}),
        metadata={"order": "42"},
    )
    for name, value in overrides.items():
        field = getattr(request, name)
        if hasattr(field, "CopyFrom") and not isinstance(value, list | dict):
            field.CopyFrom(value)
        elif isinstance(value, list):
            del field[:]
            field.extend(value)
        elif isinstance(value, dict):
            field.clear()
            field.update(value)
        else:
            setattr(request, name, value)
    return request


async def wait_for(
    check: Callable[[], Awaitable[T | None]], timeout_s: float = 20.0, interval_s: float = 0.05
) -> T:
    """Poll ``check`` until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def max_loop_gap(work: Callable[[], Awaitable[T]], tick_s: float = 0.01) -> tuple[T, float]:
    """Await ``work()`` while a ticker sleeps ``tick_s`` at a time on the same event loop.

    Returns what ``work()`` returned and the longest time between two ticks, in seconds:
    about ``tick_s`` when the loop kept running, at least the blocking time when
    something held the loop (a blocking call in a coroutine, a long CPU stretch).
    """
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(tick_s)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if stop.is_set():
                return

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the ticker's first sleep has begun
    try:
        result = await work()
    finally:
        stop.set()
        await task
    return result, max(gaps)


def record_firebase_app_names(monkeypatch: pytest.MonkeyPatch, function: str) -> list[str]:
    """Wrap ``firebase_admin.<function>`` (``initialize_app`` or ``delete_app``) for the test.

    Returns the list the wrapper appends to: the name of each app it initialized or deleted,
    in order (from any thread). Calls that raise are not recorded.
    """
    names: list[str] = []
    original = getattr(firebase_admin, function)

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        names.append((result if function == "initialize_app" else args[0]).name)
        return result

    monkeypatch.setattr(firebase_admin, function, recording)
    return names


async def row_counts(pool: asyncpg.Pool) -> dict[str, int]:
    """Row count of every table the write path touches."""
    counts = {}
    async with pool.acquire() as conn:
        for table in TABLES:
            counts[table] = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
    return counts


async def tenant_row_counts(pool: asyncpg.Pool, tenant_id: uuid.UUID) -> dict[str, int]:
    """For every table of the database (schema ``public``): how many of its rows belong to
    ``tenant_id`` when it has a ``tenant_id`` column, else how many rows it has (the outbox,
    the tenants themselves, ...). Unchanged counts mean nothing of the tenant's was added or
    removed, and nothing untenanted either."""
    async with pool.acquire() as conn:
        tables = await conn.fetch(
            """SELECT t.table_name::text AS name,
                      EXISTS (SELECT 1 FROM information_schema.columns c
                               WHERE c.table_schema = t.table_schema AND c.table_name = t.table_name
                                 AND c.column_name = 'tenant_id') AS tenanted
                 FROM information_schema.tables t
                WHERE t.table_schema = 'public' AND t.table_type = 'BASE TABLE'
                ORDER BY 1"""
        )
        assert tables, "no tables in schema public"
        counts = {}
        for table in tables:
            query = f'SELECT count(*) FROM "{table["name"]}"'  # noqa: S608
            if table["tenanted"]:
                counts[table["name"]] = await conn.fetchval(f"{query} WHERE tenant_id = $1", tenant_id)
            else:
                counts[table["name"]] = await conn.fetchval(query)
    return counts


async def delivery_statuses(pool: asyncpg.Pool, notification_id: str) -> dict[str, str]:
    """channel -> status for one notification."""
    rows = await pool.fetch(
        "SELECT channel, status FROM deliveries WHERE notification_id = $1", uuid.UUID(notification_id)
    )
    return {r["channel"]: r["status"] for r in rows}


def tenant_providers(pool: asyncpg.Pool, settings: Settings) -> TenantProviders:
    """Per-tenant providers with the settings' master key ring."""
    ring = MasterKeyRing.parse(settings.master_key.get_secret_value() if settings.master_key else None)
    return TenantProviders(pool, settings, ring)


class Pipeline(list[ChannelWorker]):
    """The workers of :func:`running_pipeline` (a list of them) and the tenant change listener
    they share (``listener``)."""

    def __init__(self, workers: list[ChannelWorker], listener: TenantChangeListener) -> None:
        super().__init__(workers)
        self.listener = listener


@contextlib.asynccontextmanager
async def running_pipeline(
    pool: asyncpg.Pool,
    settings: Settings,
    channels: tuple[str, ...] = ("email", "sms", "push"),
) -> AsyncIterator[Pipeline]:
    """Run a relay, a tenant change listener and one worker per channel as tasks
    for the duration of the block (like a worker and a relay process); yields the
    workers with the listener."""
    relay = OutboxRelay(pool, settings)
    providers = tenant_providers(pool, settings)
    listener = TenantChangeListener(
        settings.require_database_url(), providers.invalidate, providers.invalidate_all
    )
    workers = [ChannelWorker(pool, settings, channel, providers) for channel in channels]
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(listener.run())]
    tasks += [asyncio.create_task(w.run()) for w in workers]
    try:
        await asyncio.wait_for(listener.connected.wait(), 30)
        yield Pipeline(workers, listener)
    finally:
        relay.stop()
        listener.stop()
        for worker in workers:
            worker.stop()
        await asyncio.gather(*tasks)
        await providers.close()


def partition_of(tenant_id: uuid.UUID, partitions: int) -> int:
    """The partition a record keyed by ``tenant_id`` lands on (aiokafka's default
    partitioner: murmur2 of the key, as the relay's producer uses)."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(str(tenant_id).encode(), every, every))


async def use_fake_twilio(
    admin: tenants_pb2_grpc.TenantAdminServiceAsyncStub,
    operator: tuple[tuple[str, str], ...],
    tenant_id: uuid.UUID,
    fake: FakeTwilio,
) -> None:
    """Make ``fake`` (a started FakeTwilio) the tenant's SMS provider, through the admin API."""
    await admin.SetProviderConfig(
        tenants_pb2.SetProviderConfigRequest(
            request_id=new_request_id(),
            tenant_id=str(tenant_id),
            channel=notify_pb2.CHANNEL_SMS,
            config=tenants_pb2.ProviderConfig(
                twilio=tenants_pb2.TwilioConfig(
                    account_sid=fake.account_sid,
                    auth_token=fake.auth_token,
                    from_number=TWILIO_FROM,
                    base_url=fake.base_url,
                )
            ),
        ),
        metadata=operator,
    )


async def group_offsets(settings: Settings, topic: str, group: str) -> dict[int, int]:
    """partition -> offset consumer group ``group`` committed on ``topic`` (partitions without
    a commit left out). Reads by manual assignment: it does not join the group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka_partitions)]
        consumer.assign(partitions)
        found = {tp.partition: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()
    return {partition: offset for partition, offset in found.items() if offset is not None}


@contextlib.contextmanager
def suspended(pid: int | None) -> Iterator[None]:
    """SIGSTOP process ``pid`` and all its children (a server that hangs: connections stay
    open, requests get no answer); SIGCONT them on the way out, whatever happened."""
    assert pid is not None, "the process is not running"
    parent = psutil.Process(pid)
    processes = [parent, *parent.children(recursive=True)]
    try:
        for process in processes:
            process.suspend()
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()
