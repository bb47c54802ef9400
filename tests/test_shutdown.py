"""Graceful shutdown on SIGTERM: drain within the deadline; a stuck drain or a
second signal forces exit."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import asyncpg
import grpc
import psutil
import pytest

from switchboard.embedded import wait_for_port
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from tests.conftest import TenantCredentials
from tests.helpers import send_request, wait_for
from tests.test_tenant_providers import gateway_env

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub

pytestmark = pytest.mark.slow


def start(kind: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "switchboard.cli", kind],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_gateway_drains_in_flight_requests_and_exits_cleanly(
    settings: Settings, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    env = gateway_env(settings, SWITCHBOARD_SHUTDOWN_GRACE_S="10")
    process = start("gateway", env)
    try:
        host, _, port = env["SWITCHBOARD_GRPC_ADDR"].rpartition(":")
        await asyncio.to_thread(wait_for_port, host, int(port), 30, process)
        async with grpc.aio.insecure_channel(env["SWITCHBOARD_GRPC_ADDR"]) as channel:
            stub = notify_pb2_grpc.NotificationServiceStub(channel)
            await stub.SendNotification(send_request(), metadata=tenant.metadata)  # warm: auth cached
            calls = [
                asyncio.ensure_future(
                    stub.SendNotification(send_request(), metadata=tenant.metadata, timeout=20)
                )
                for _ in range(40)
            ]
            await asyncio.sleep(0.05)  # let them reach the server (bounded; no event to wait on)
            process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*calls, return_exceptions=True)
        code = await asyncio.to_thread(process.wait, 20)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0
    accepted = [r for r in results if isinstance(r, notify_pb2.SendNotificationResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) + len(refused) == len(results)
    # Requests already in flight finished; later ones were refused as unavailable, never failed half-way.
    assert accepted
    assert all(r.code() == grpc.StatusCode.UNAVAILABLE for r in refused), {
        (r.code(), r.details()) for r in refused
    }
    stored = await pool.fetchval(
        "SELECT count(*) FROM notifications WHERE id = ANY($1::uuid[])",
        [uuid.UUID(r.notification_id) for r in accepted],
    )
    assert stored == len(accepted)


@pytest.fixture
def silent_smtp() -> Iterator[int]:
    """A TCP port that accepts connections and never says anything (a stuck provider)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield int(server.getsockname()[1])
    server.close()


@pytest.mark.parametrize("how", ["deadline", "second-signal"])
async def test_a_stuck_drain_is_cut_short(
    settings: Settings, tenant: TenantCredentials, pool: asyncpg.Pool, stub: Stub, silent_smtp: int, how: str
) -> None:
    """A worker stuck on a provider that never answers: SIGTERM starts the drain;
    the deadline (or a second SIGTERM) ends the process with exit code 1."""
    env = gateway_env(
        settings,
        SWITCHBOARD_SHUTDOWN_GRACE_S="2" if how == "deadline" else "60",
        SWITCHBOARD_SMTP_PORT=str(silent_smtp),
        SWITCHBOARD_DEFAULT_PROVIDERS="true",
        SWITCHBOARD_WORKER_PROVIDER_TIMEOUT_S="120",
        SWITCHBOARD_KAFKA_PARTITIONS="2",
    )
    relay = start("relay", env)
    worker = start("worker", {**env, "SWITCHBOARD_WORKER_CHANNELS": "email"})
    try:
        accepted = await stub.SendNotification(
            send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
        )

        async def sending() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT status = 'sending' FROM deliveries WHERE notification_id = $1",
                    uuid.UUID(accepted.notification_id),
                )
            )

        try:
            await wait_for(sending, timeout_s=60)  # the worker is now stuck in the provider call
        except AssertionError:
            for process in (worker, relay):
                process.kill()
                print(process.stderr.read().decode()[-3000:] if process.stderr else "")
            raise
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        if how == "second-signal":
            await asyncio.sleep(0.5)  # bounded: let the drain begin
            assert worker.poll() is None
            worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 30)
        elapsed = time.monotonic() - started
    finally:
        for process in (worker, relay):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert code == 1
    assert elapsed < 10


async def test_gateway_processes_share_the_port_and_stop_together(
    settings: Settings, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    env = gateway_env(settings, SWITCHBOARD_GATEWAY_PROCESSES="2")
    process = start("gateway", env)
    try:
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
        code = await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert await pool.fetchval("SELECT count(*) FROM notifications") == 6
