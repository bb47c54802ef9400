"""Graceful shutdown on SIGTERM, per process: the gateway finishes in-flight RPCs (health
NOT_SERVING meanwhile, new RPCs UNAVAILABLE), the relay flushes its batch in flight, a
worker finishes its delivery and commits its offset, the payment notifier finishes its
event and commits; a stuck drain or a second signal forces exit.

Each test holds the process mid-work on something it controls (a table lock, a stopped
broker, a fake provider's gate), waits for the process to log that the drain started
(:data:`switchboard.signals.DRAINING_EVENT`), and only then lets the work finish: no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from channels.catalog import delivery_topic, payment_events_topic
from channels.worker import consumer_group
from payments.event_notifier import consumer_group as notifier_group
from payments.notification_rules import notification_request_id, set_rule
from switchboard.embedded import EmbeddedKafka, wait_for_port
from switchboard.fakes.twilio import FakeTwilio
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from switchboard.signals import DRAINING_EVENT
from switchboard.tenants.v1 import tenants_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import (
    group_offsets,
    partition_of,
    running_pipeline,
    send_request,
    suspended,
    use_fake_twilio,
    wait_for,
)
from tests.test_admin_api import OPERATOR, admin  # noqa: F401 (fixture)
from tests.test_payment_notifications import RECEIPT, event_producer, payment_event, publish
from tests.test_rate_limit import held_twilio  # noqa: F401 (fixture)
from tests.test_relay import accept_many, own_broker, read_all_deliveries, unpublished  # noqa: F401
from tests.test_tenant_providers import gateway_env

if TYPE_CHECKING:
    Admin = tenants_pb2_grpc.TenantAdminServiceAsyncStub
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub

pytestmark = pytest.mark.slow


class Service:
    """A ``switchboard`` CLI process whose stderr (its log) is read as it comes."""

    def __init__(self, kind: str, env: dict[str, str]) -> None:
        self.kind = kind
        self.process = subprocess.Popen(
            [sys.executable, "-m", "switchboard.cli", kind],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._eof = False
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
                self._loop.call_soon_threadsafe(self._add, raw.decode(errors="replace").rstrip())
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._add, None)

    def _add(self, line: str | None) -> None:
        if line is None:
            self._eof = True
        else:
            self.lines.append(line)
        self._changed.set()

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log (for failure messages)."""
        return "\n".join(self.lines[-lines:])

    async def logged(self, text: str, timeout_s: float = 30.0) -> None:
        """Wait until a log line contains ``text``; fail if the process ends first."""
        async with asyncio.timeout(timeout_s):
            while not any(text in line for line in self.lines):
                if self._eof:
                    raise AssertionError(f"{self.kind} ended without logging {text!r}:\n{self.tail()}")
                self._changed.clear()
                await self._changed.wait()

    async def terminate_and_wait_for_drain(self) -> None:
        """SIGTERM, then wait until the process says its drain started."""
        self.process.send_signal(signal.SIGTERM)
        await self.logged(DRAINING_EVENT)

    async def exit_code(self, timeout_s: float = 30.0) -> int:
        """Wait for the process to end; its exit code."""
        return await asyncio.to_thread(self.process.wait, timeout_s)

    def kill(self) -> None:
        """SIGKILL it if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.asynccontextmanager
async def service(kind: str, env: dict[str, str]) -> AsyncIterator[Service]:
    """A :class:`Service`, killed on the way out if it still runs."""
    started = Service(kind, env)
    try:
        yield started
    finally:
        started.kill()


@contextlib.asynccontextmanager
async def table_locked(pool: asyncpg.Pool, table: str) -> AsyncIterator[None]:
    """Hold ``table`` in SHARE mode: reads go on, every write to it waits until the block ends."""
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(f"LOCK TABLE {table} IN SHARE MODE")
            yield
        finally:
            await transaction.rollback()


async def waiting_on_a_lock(pool: asyncpg.Pool) -> bool:
    """Whether a session of this database waits on a lock (a held write)."""
    return bool(
        await pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'"""
        )
    )


async def health_status(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=2
    )
    return int(reply.status)


async def test_gateway_drains_in_flight_requests_and_exits_cleanly(
    settings: Settings, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    """RPCs held in the database (a table lock) when SIGTERM arrives: health turns
    NOT_SERVING while they are in flight, a new RPC is refused UNAVAILABLE, and once the
    lock goes the held ones are ACCEPTED and stored (calls that had not reached a servicer yet
    are refused UNAVAILABLE, "shutting down"); the gateway then exits 0."""
    env = gateway_env(settings, SWITCHBOARD_SHUTDOWN_GRACE_S="10")
    async with service("gateway", env) as gateway:
        host, _, port = env["SWITCHBOARD_GRPC_ADDR"].rpartition(":")
        await asyncio.to_thread(wait_for_port, host, int(port), 30, gateway.process)
        async with grpc.aio.insecure_channel(env["SWITCHBOARD_GRPC_ADDR"]) as channel:
            stub = notify_pb2_grpc.NotificationServiceStub(channel)
            await stub.SendNotification(send_request(), metadata=tenant.metadata)  # warm: auth cached
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            async with table_locked(pool, "notifications"):
                calls = [
                    asyncio.ensure_future(
                        stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=20)
                    )
                    for _ in range(40)
                ]
                await wait_for(lambda: waiting_on_a_lock(pool), timeout_s=20)  # writes held in flight
                await gateway.terminate_and_wait_for_drain()

                async def not_serving() -> bool:
                    return bool(await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING)

                await wait_for(not_serving, timeout_s=10)
                held = [call for call in calls if not call.done()]
                assert held, "no RPC was in flight when health turned NOT_SERVING"
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=5)
                assert late.value.code() == grpc.StatusCode.UNAVAILABLE
            results = await asyncio.gather(*calls, return_exceptions=True)
        code = await gateway.exit_code(20)
    assert code == 0, gateway.tail()
    accepted = [r for r in results if isinstance(r, notify_pb2.SendNotificationResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) + len(refused) == len(results)
    # The RPCs held in the database when SIGTERM came finished ACCEPTED; the others were
    # refused at the door as the drain began (never started, so never half-done).
    assert accepted
    assert all(
        r.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (r.details() or "") for r in refused
    ), {(r.code(), r.details()) for r in refused}
    stored = await pool.fetchval(
        "SELECT count(*) FROM notifications WHERE id = ANY($1::uuid[])",
        [uuid.UUID(r.notification_id) for r in accepted],
    )
    assert stored == len(accepted)


async def test_the_relay_flushes_its_batch_in_flight_on_sigterm(
    settings: Settings,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    own_broker: EmbeddedKafka,  # noqa: F811
) -> None:
    """A batch claimed and sent, its acknowledgements held by a stopped broker, when SIGTERM
    arrives: once the broker answers, the relay marks the batch published and exits 0, and
    every row of it is in Kafka."""
    settings.kafka_bootstrap = own_broker.bootstrap
    env = gateway_env(
        settings,
        SWITCHBOARD_SHUTDOWN_GRACE_S="60",
        SWITCHBOARD_KAFKA_REQUEST_TIMEOUT_MS="30000",  # the held batch must not time out meanwhile
        SWITCHBOARD_KAFKA_PARTITIONS=str(settings.kafka_partitions),
    )
    async with service("relay", env) as relay:
        first = await accept_many(pool, tenant.tenant_id, 1, settings)

        async def none_unpublished() -> bool:
            return await unpublished(pool) == 0

        await wait_for(none_unpublished, timeout_s=60)  # the relay's producer is connected

        async def batch_in_flight() -> bool:
            return bool(
                await pool.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                        WHERE datname = current_database() AND state = 'idle in transaction'
                          AND query LIKE '%FROM outbox%FOR UPDATE SKIP LOCKED%'"""
                )
            )

        with suspended(own_broker.pid):  # the broker takes requests but answers none
            batch = await accept_many(pool, tenant.tenant_id, 5, settings)
            await wait_for(batch_in_flight, timeout_s=30)  # claimed and sent; acks pending
            await relay.terminate_and_wait_for_drain()
            assert await unpublished(pool) == len(batch)
        code = await relay.exit_code(60)
    assert code == 0, relay.tail()
    assert await unpublished(pool) == 0
    seen = await read_all_deliveries(settings)
    assert first | batch <= set(seen)


async def test_a_worker_finishes_its_delivery_and_commits_its_offset_on_sigterm(
    settings: Settings,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    stub: Stub,
    admin: Admin,  # noqa: F811
    held_twilio: FakeTwilio,  # noqa: F811
) -> None:
    """The SMS worker's send is held at the provider when SIGTERM arrives; released, it is
    recorded DELIVERED, the offset past it is committed, and the worker exits 0."""
    await use_fake_twilio(admin, OPERATOR, tenant.tenant_id, held_twilio)
    gate = held_twilio.hold_requests()
    env = gateway_env(
        settings,
        SWITCHBOARD_SHUTDOWN_GRACE_S="60",
        SWITCHBOARD_WORKER_CHANNELS="sms",
        SWITCHBOARD_KAFKA_PARTITIONS=str(settings.kafka_partitions),
    )
    async with running_pipeline(pool, settings, channels=()), service("worker", env) as worker:
        reply = await stub.SendNotification(
            send_request(channels=[notify_pb2.CHANNEL_SMS]), metadata=tenant.metadata
        )
        try:
            await asyncio.wait_for(gate.reached.wait(), 60)  # the send is at the provider
            await worker.terminate_and_wait_for_drain()
            assert held_twilio.received == []
        finally:
            gate.open()
        code = await worker.exit_code(60)
    assert code == 0, worker.tail()
    status = await pool.fetchval(
        "SELECT status FROM deliveries WHERE notification_id = $1", uuid.UUID(reply.notification_id)
    )
    assert status == "delivered"
    assert len(held_twilio.received) == 1
    committed = await group_offsets(
        settings,
        delivery_topic("sms", settings.kafka_topic_prefix),
        consumer_group("sms", settings.kafka_topic_prefix),
    )
    # Past the only record: it is not consumed again.
    assert committed == {partition_of(tenant.tenant_id, settings.kafka_partitions): 1}


async def test_the_payment_notifier_finishes_its_event_and_commits_its_offset_on_sigterm(
    settings: Settings, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    """The notifier's write of a receipt is held (a table lock) when SIGTERM arrives;
    released, the notification is stored, the offset past the event committed, exit 0."""
    rule = await set_rule(pool, tenant.tenant_id, RECEIPT)
    event = payment_event(tenant.tenant_id)
    env = gateway_env(
        settings,
        SWITCHBOARD_SHUTDOWN_GRACE_S="60",
        SWITCHBOARD_KAFKA_PARTITIONS=str(settings.kafka_partitions),
    )
    async with service("payment-notifier", env) as notifier:
        async with table_locked(pool, "notifications"), event_producer(settings) as producer:
            await publish(producer, settings, event)
            await wait_for(lambda: waiting_on_a_lock(pool), timeout_s=60)  # its write is held
            await notifier.terminate_and_wait_for_drain()
        code = await notifier.exit_code(60)
    assert code == 0, notifier.tail()
    request_id = notification_request_id(rule.id, uuid.UUID(event.event_id))
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM notifications WHERE tenant_id = $1 AND request_id = $2",
            tenant.tenant_id,
            request_id,
        )
        == 1
    )
    committed = await group_offsets(
        settings,
        payment_events_topic(settings.kafka_topic_prefix),
        notifier_group(settings.kafka_topic_prefix),
    )
    assert committed == {partition_of(tenant.tenant_id, settings.kafka_partitions): 1}


@dataclass
class SilentSmtp:
    """A TCP server that accepts connections and never says anything (a stuck provider);
    ``reached`` is set once a client has connected."""

    port: int
    reached: asyncio.Event


@pytest.fixture
async def silent_smtp() -> AsyncIterator[SilentSmtp]:
    reached = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        reached.set()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield SilentSmtp(int(server.sockets[0].getsockname()[1]), reached)
    server.close()
    for writer in writers:
        writer.close()


@pytest.mark.parametrize("how", ["deadline", "second-signal"])
async def test_a_stuck_drain_is_cut_short(
    settings: Settings,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    stub: Stub,
    silent_smtp: SilentSmtp,
    how: str,
) -> None:
    """A worker stuck on a provider that never answers: SIGTERM starts the drain;
    the deadline (or a second SIGTERM) ends the process with exit code 1."""
    env = gateway_env(
        settings,
        SWITCHBOARD_SHUTDOWN_GRACE_S="2" if how == "deadline" else "60",
        SWITCHBOARD_SMTP_PORT=str(silent_smtp.port),
        SWITCHBOARD_DEFAULT_PROVIDERS="true",
        SWITCHBOARD_WORKER_PROVIDER_TIMEOUT_S="120",
        SWITCHBOARD_WORKER_CHANNELS="email",
        SWITCHBOARD_KAFKA_PARTITIONS=str(settings.kafka_partitions),
    )
    async with running_pipeline(pool, settings, channels=()), service("worker", env) as worker:
        await stub.SendNotification(
            send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
        )
        try:
            await asyncio.wait_for(silent_smtp.reached.wait(), 60)  # stuck in the provider call
        except TimeoutError:
            raise AssertionError(f"the worker never reached the provider:\n{worker.tail()}") from None
        started = time.monotonic()
        await worker.terminate_and_wait_for_drain()
        if how == "second-signal":
            assert worker.process.poll() is None
            worker.process.send_signal(signal.SIGTERM)
        code = await worker.exit_code(30)
        elapsed = time.monotonic() - started
    assert code == 1, worker.tail()
    assert elapsed < 10
    assert any("shutdown forced" in line for line in worker.lines)


async def test_gateway_processes_share_the_port_and_stop_together(
    settings: Settings, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    env = gateway_env(settings, SWITCHBOARD_GATEWAY_PROCESSES="2")
    async with service("gateway", env) as gateway:
        process = gateway.process
        host, _, port = env["SWITCHBOARD_GRPC_ADDR"].rpartition(":")
        await asyncio.to_thread(wait_for_port, host, int(port), 30, process)
        parent = psutil.Process(process.pid)

        async def listening_children() -> set[int]:
            # SO_REUSEPORT: each child has its own listening socket on the one port.
            children = parent.children()
            pids = {
                c.pid
                for c in children
                for conn in c.net_connections("tcp")
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == int(port)
            }
            return pids if len(children) == 2 and pids == {c.pid for c in children} else set()

        await wait_for(listening_children, timeout_s=30)
        children = parent.children()
        # Separate connections land on either process; each accepts.
        for _ in range(6):
            async with grpc.aio.insecure_channel(
                env["SWITCHBOARD_GRPC_ADDR"], options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                stub = notify_pb2_grpc.NotificationServiceStub(channel)
                reply = await stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=20)
                assert reply.status == notify_pb2.NOTIFICATION_STATUS_ACCEPTED
        process.send_signal(signal.SIGTERM)
        code = await gateway.exit_code(30)
    assert code == 0, gateway.tail()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert await pool.fetchval("SELECT count(*) FROM notifications") == 6
