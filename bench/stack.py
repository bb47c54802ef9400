"""The benchmark's stack: the whole of Switchboard on one machine, as separate processes.

Built on the crash suite's :class:`tests.chaos_harness.ChaosStack` (PostgreSQL,
the Tansu broker, journaling fake providers, gateway, relay, one worker per
channel), with what a benchmark needs instead of what a crash test needs:

- PostgreSQL with its defaults (``fsync`` and ``synchronous_commit`` on): every
  ACCEPTED is a durable commit, as in production;
- production settings for the services (sweeper after 120 s, default retry
  policy), logs at ``warning`` so that log I/O is not what we measure;
- relay and workers can be paused (SIGSTOP) while the accept path alone is
  measured, and resumed for the end-to-end runs;
- extra gateway processes on the same port (``switchboard gateway
  --processes N`` forks them; the kernel spreads connections, SO_REUSEPORT).

This process never imports gRPC (it starts processes, and gRPC is not fork-safe);
tenants are created from a spawned process.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from switchboard.embedded import wait_for_port
from tests.chaos_harness import (
    CHANNELS,
    ChaosStack,
    FakesSpec,
    ServiceProcess,
    make_fakes_spec,
)

#: Production defaults, except log level (log I/O is not what we measure).
BENCH_SETTINGS = {
    "SWITCHBOARD_RELAY_SWEEP_AFTER_S": "120",
    "SWITCHBOARD_RELAY_SWEEP_INTERVAL_S": "10",
    "SWITCHBOARD_RELAY_POLL_INTERVAL_MS": "200",
    "SWITCHBOARD_RELAY_ERROR_BACKOFF_MS": "500",
    "SWITCHBOARD_WORKER_RETRY_BASE_MS": "1000",
    "SWITCHBOARD_WORKER_RETRY_MAX_MS": "300000",
    "SWITCHBOARD_WORKER_MAX_ATTEMPTS": "5",
    "SWITCHBOARD_WORKER_PROVIDER_TIMEOUT_S": "15",
    "SWITCHBOARD_DB_COMMAND_TIMEOUT_S": "10",
    "SWITCHBOARD_LOG_LEVEL": "warning",
}
BENCH_POSTGRES_OPTIONS = {"max_connections": "300"}
TENANTS = ("bench", *(f"bench-{i}" for i in range(1, 8)))
BACKGROUND = ("relay", *(f"worker-{c}" for c in CHANNELS))


def _create_tenant(grpc_addr: str, spec_path: str, queue: Any) -> None:
    from tests.chaos_client import create_tenants

    spec = FakesSpec.read(Path(spec_path))
    try:
        queue.put([(a.tenant_id, a.api_key) for a in asyncio.run(create_tenants(grpc_addr, spec))])
    except BaseException as exc:
        queue.put(exc)
        raise


class BenchStack:
    """Start, pause and resume the stack; ``api_key`` / ``tenant_id`` of the first bench tenant.

    Eight tenants, each with its own SMTP server, Twilio account and Firebase
    project on the fakes. Accept runs use the first; the end-to-end run spreads
    over all of them, because a worker delivers one tenant's messages on a
    channel in order, one at a time (DESIGN.md: order per tenant), so a single
    tenant's delivery rate per channel is bounded by 1 / (time per delivery).
    """

    def __init__(self, root: Path, gateway_processes: int = 1) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.spec = make_fakes_spec(list(TENANTS))
        self.spec_path = root / "fakes-spec.json"
        self.spec.write(self.spec_path)
        self.stack = ChaosStack(root, self.spec, self.spec_path, postgres_options=BENCH_POSTGRES_OPTIONS)
        gateway = self.stack.services["gateway"]
        gateway.env.update(BENCH_SETTINGS)  # one dict shared by every service
        self._gateway_argv = list(gateway.argv)
        self.gateway_processes = 1
        self._set_gateway_processes(gateway_processes)
        self.tenant_id = ""
        self.api_key = ""
        #: The other tenants' keys (the end-to-end run spreads its traffic over every tenant).
        self.other_api_keys: tuple[str, ...] = ()

    def _set_gateway_processes(self, processes: int) -> None:
        extra = ["--processes", str(processes)] if processes > 1 else []
        self.stack.services["gateway"].argv = [*self._gateway_argv, *extra]
        self.gateway_processes = processes

    @property
    def grpc_addr(self) -> str:
        """host:port of the gateway(s)."""
        return self.stack.grpc_addr

    @property
    def database_url(self) -> str:
        """DSN of the bench database."""
        return self.stack.database_url

    @property
    def kafka_bootstrap(self) -> str:
        """host:port of the broker."""
        return self.stack.kafka.broker.bootstrap

    @property
    def journal_path(self) -> Path:
        """The fake providers' journal (JSON lines: t, channel, tenant, marker)."""
        return self.stack.journal_path

    def start(self) -> None:
        """Start everything and create the bench tenant (its SMTP, Twilio and FCM on the fakes)."""
        self.stack.start()
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        process = ctx.Process(target=_create_tenant, args=(self.grpc_addr, str(self.spec_path), queue))
        process.start()
        got = queue.get(timeout=120)
        process.join(10)
        if isinstance(got, BaseException):
            raise RuntimeError(f"creating the bench tenant failed: {got!r}")
        self.tenant_id, self.api_key = got[0]
        self.other_api_keys = tuple(key for _, key in got[1:])

    def restart_gateway(self, processes: int) -> None:
        """Stop the gateway(s) and start ``processes`` of them on the same port."""
        gateway = self.stack.services["gateway"]
        gateway.stop()
        self._set_gateway_processes(processes)
        gateway.start()
        port = int(self.grpc_addr.rpartition(":")[2])
        wait_for_port("127.0.0.1", port, 60, gateway.process)

    def gateway_rss_bytes(self) -> int:
        """Resident memory of the gateway process tree, bytes (summed over processes)."""
        process = self.stack.services["gateway"].process
        if process is None:
            return 0
        try:
            root = psutil.Process(process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0

    def gateway_pids(self) -> list[int]:
        """Pids of the gateway process and its forked children."""
        process = self.stack.services["gateway"].process
        if process is None:
            return []
        root = psutil.Process(process.pid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system, seconds) used so far by each component's process tree.

        Keys: ``postgres`` (the postmaster and its backends), ``kafka``, ``fakes``,
        ``gateway``, ``relay``, ``worker-<channel>``. A component that is not
        running counts 0; a process that exits between two readings loses what it
        used, so compare readings taken while nothing restarts.
        """
        pids: dict[str, int | None] = {
            "postgres": self.stack.postgres.server.pid,
            "kafka": self.stack.kafka.broker.pid,
            "fakes": self.stack.fakes.process.pid if self.stack.fakes.process else None,
        }
        for name, service in self.stack.services.items():
            pids[name] = service.process.pid if service.process else None
        used: dict[str, float] = {}
        for name, pid in pids.items():
            total = 0.0
            if pid is not None:
                try:
                    root = psutil.Process(pid)
                    for process in (root, *root.children(recursive=True)):
                        times = process.cpu_times()
                        total += times.user + times.system
                except psutil.Error:
                    pass
            used[name] = total
        return used

    def _background(self) -> list[ServiceProcess]:
        return [self.stack.services[name] for name in BACKGROUND]

    def pause(self, names: tuple[str, ...] = BACKGROUND) -> None:
        """SIGSTOP the relay and the workers (or ``names``)."""
        for name in names:
            process = self.stack.services[name].process
            if process is not None:
                psutil.Process(process.pid).suspend()

    def resume(self, names: tuple[str, ...] = BACKGROUND) -> None:
        """SIGCONT what :meth:`pause` stopped."""
        for name in names:
            process = self.stack.services[name].process
            if process is not None:
                psutil.Process(process.pid).resume()

    async def reset_data(self) -> None:
        """Empty the notification tables (between phases: a clean outbox for the next one)."""
        conn = await asyncpg.connect(self.database_url)
        try:
            await conn.execute(
                "TRUNCATE idempotency_keys, notifications, deliveries, outbox RESTART IDENTITY CASCADE"
            )
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()

    def stop(self) -> None:
        """Stop and clean up every process."""
        self.resume()
        self.stack.shutdown()
