"""The process side of the crash-and-fault suite (tests/test_chaos.py).

Nothing here imports gRPC: gRPC's fork handlers make forking a process that
uses gRPC unsafe (children of such a process crashed with SIGSEGV/SIGABRT
before exec in our runs), so every process of the stack is started by a
**driver** process of its own (``python -m tests.chaos_harness driver``), and
the test process, which speaks gRPC, only starts the driver (vfork + exec).

- **Fake providers** (``python -m tests.chaos_harness fakes --spec FILE --journal FILE``):
  per tenant its own SMTP server, its own fake Twilio account (own port, SID and
  auth token) and its own Firebase project on one fake FCM. Every accepted
  message is appended, as it is accepted, to one JSON-lines journal: time,
  channel, tenant, the notification marker (the request_id, carried in the email
  subject, the SMS body and ``push.data["chaos"]``) and, for email, the
  ``X-Switchboard-Delivery-Id`` header. The fakes are never killed: the journal
  is the providers' record of what they received.
- :class:`ChaosStack`: PostgreSQL, the Tansu broker, the fakes, one gateway,
  one relay and one worker per channel, each a separate OS process that can be
  SIGKILLed and started again. A supervisor restarts a service that exited on
  its own (e.g. one started while PostgreSQL was down), as systemd or
  Kubernetes would, and counts it. Every child gets its own session, so
  :meth:`ChaosStack.shutdown` finds and kills anything left of it, PostgreSQL
  backends included.
- :func:`plan_kills` / :class:`ChaosMonkey`: a seeded schedule of SIGKILLs with
  short downtimes; every killable component at least once.
- :func:`run_driver`: the driver. It prints JSON-lines events on stdout
  (``ready``, ``kill``, ``restart``, ``exited``, ``plan_done``, ``stopped``,
  ``error``) and reads commands on stdin (``{"cmd": "chaos", "plan": [...]}``,
  ``{"cmd": "shutdown"}``); end of input (the test process died) also shuts
  everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import psutil
from aiohttp import web

from switchboard.db.migrate import migrate
from switchboard.embedded import EmbeddedKafka, EmbeddedPostgres, child_preexec, free_port, wait_for_port
from switchboard.fakes.fcm import FakeFcm, make_service_account
from switchboard.fakes.twilio import FakeTwilio
from switchboard.signals import wait_for_shutdown_signal
from tenants.sealing import generate_master_key

REPO_ROOT = Path(__file__).resolve().parent.parent
CHANNELS = ("email", "sms", "push")
MARKER_PREFIX = "chaos "
PUSH_MARKER_KEY = "chaos"
DATABASE = "chaos"
ADMIN_TOKEN = "chaos-operator-token-0123456789"
#: Components the monkey may kill; each is killed at least once per run.
KILLABLE = ("gateway", "relay", "worker-email", "worker-sms", "worker-push", "kafka", "postgres")
WORKERS = tuple(f"worker-{c}" for c in CHANNELS)

#: Settings of the stack's processes: short deadlines so a run takes a few minutes.
#: fsync off: a SIGKILLed server keeps everything the OS has (only an OS crash would
#: lose committed data); room for the pools refilled after restarts.
CHAOS_POSTGRES_OPTIONS = {"fsync": "off", "max_connections": "300"}
STACK_SETTINGS = {
    "SWITCHBOARD_KAFKA_IDEMPOTENCE": "false",  # Tansu has no InitProducerId
    "SWITCHBOARD_KAFKA_REQUEST_TIMEOUT_MS": "2000",
    "SWITCHBOARD_KAFKA_PARTITIONS": "3",
    # Re-publish deliveries unfinished this long after their last publish. Lower values
    # re-publish most of the backlog every sweep while a killed worker catches up
    # (absorbed by the idempotent consumer, but it slows the catch-up down).
    "SWITCHBOARD_RELAY_SWEEP_AFTER_S": os.environ.get("CHAOS_SWEEP_AFTER_S", "15"),
    "SWITCHBOARD_RELAY_SWEEP_INTERVAL_S": "1",
    "SWITCHBOARD_RELAY_POLL_INTERVAL_MS": "100",
    "SWITCHBOARD_RELAY_ERROR_BACKOFF_MS": "200",
    "SWITCHBOARD_WORKER_RETRY_BASE_MS": "100",
    "SWITCHBOARD_WORKER_RETRY_MAX_MS": "1000",
    "SWITCHBOARD_WORKER_MAX_ATTEMPTS": "10",
    "SWITCHBOARD_WORKER_PROVIDER_TIMEOUT_S": "5",
    "SWITCHBOARD_DB_COMMAND_TIMEOUT_S": "5",
    "SWITCHBOARD_DEFAULT_PROVIDERS": "false",
    "SWITCHBOARD_LOG_LEVEL": "info",
    "PYTHONUNBUFFERED": "1",
}


def marker_of(text: str) -> str:
    """The request_id carried in an email subject or an SMS body ('' if none)."""
    return text[len(MARKER_PREFIX) :].strip() if text.startswith(MARKER_PREFIX) else ""


# -- the fake providers (a separate process) -----------------------------------------------


@dataclass(frozen=True)
class TenantFakes:
    """One tenant's fake provider endpoints and credentials."""

    name: str
    smtp_port: int
    twilio_port: int
    twilio_account_sid: str
    twilio_auth_token: str
    fcm_project: str
    service_account: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class FakesSpec:
    """Everything the fakes process serves."""

    fcm_port: int
    tenants: list[TenantFakes]

    @property
    def fcm_base_url(self) -> str:
        """FCM endpoint base (and OAuth2 token host) of the fake FCM."""
        return f"http://127.0.0.1:{self.fcm_port}"

    def write(self, path: Path) -> None:
        """Save as JSON (mode 0600: it holds the fake credentials)."""
        path.touch(mode=0o600)
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> FakesSpec:
        """Load what :meth:`write` saved."""
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(fcm_port=raw["fcm_port"], tenants=[TenantFakes(**t) for t in raw["tenants"]])


def make_fakes_spec(tenant_names: list[str]) -> FakesSpec:
    """Free ports and fresh credentials for every tenant's fakes."""
    fcm_port = free_port()
    tenants = []
    for name in tenant_names:
        project = f"chaos-{name}"
        tenants.append(
            TenantFakes(
                name=name,
                smtp_port=free_port(),
                twilio_port=free_port(),
                twilio_account_sid="AC" + uuid.uuid4().hex,
                twilio_auth_token=uuid.uuid4().hex,
                fcm_project=project,
                service_account=make_service_account(f"http://127.0.0.1:{fcm_port}/token", project),
            )
        )
    return FakesSpec(fcm_port=fcm_port, tenants=tenants)


class Journal:
    """A thread-safe, line-buffered JSON-lines file of received messages."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._handle = path.open("a", encoding="utf-8", buffering=1)

    def write(self, channel: str, tenant: str, marker: str, **extra: str) -> None:
        """Append one received message."""
        line = json.dumps({"t": time.time(), "channel": channel, "tenant": tenant, "marker": marker, **extra})
        with self._lock:
            self._handle.write(line + "\n")

    def close(self) -> None:
        """Flush and close."""
        with self._lock:
            self._handle.close()


class JournalingTwilio(FakeTwilio):
    """FakeTwilio for one tenant's account that journals each accepted SMS."""

    def __init__(self, tenant: TenantFakes, journal: Journal) -> None:
        super().__init__(tenant.twilio_account_sid, tenant.twilio_auth_token, port=tenant.twilio_port)
        self._tenant = tenant.name
        self._journal = journal

    def record(self, request: web.Request, body: Any) -> None:
        """Journal instead of keeping the request in memory."""
        self._journal.write("sms", self._tenant, marker_of(str(body.get("Body", ""))))


class JournalingFcm(FakeFcm):
    """FakeFcm serving every tenant's project; journals each accepted push."""

    def __init__(self, port: int, tenants_by_project: dict[str, str], journal: Journal) -> None:
        super().__init__(port=port)
        self._tenants_by_project = tenants_by_project
        self._journal = journal

    def record(self, request: web.Request, body: Any) -> None:
        """Journal instead of keeping the request in memory."""
        project = request.match_info.get("project_id", "")
        data = body.get("message", {}).get("data", {}) if isinstance(body, dict) else {}
        self._journal.write(
            "push", self._tenants_by_project.get(project, f"?{project}"), str(data.get(PUSH_MARKER_KEY, ""))
        )
        self.attempts.clear()  # the base class keeps every attempt; nothing here reads them


class JournalingSmtpHandler:
    """aiosmtpd handler for one tenant's SMTP server: journal each message, answer 250."""

    def __init__(self, tenant: str, journal: Journal) -> None:
        self._tenant = tenant
        self._journal = journal

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        headers = BytesHeaderParser().parsebytes(envelope.original_content or envelope.content or b"")
        self._journal.write(
            "email",
            self._tenant,
            marker_of(str(headers.get("Subject", ""))),
            delivery_id=str(headers.get("X-Switchboard-Delivery-Id", "")),
        )
        return "250 2.0.0 OK: queued"


async def serve_fakes(spec: FakesSpec, journal_path: Path) -> None:
    """Serve every tenant's fakes until SIGTERM/SIGINT."""
    from aiosmtpd.controller import Controller

    journal = Journal(journal_path)
    fcm = JournalingFcm(spec.fcm_port, {t.fcm_project: t.name for t in spec.tenants}, journal)
    twilios = [JournalingTwilio(t, journal) for t in spec.tenants]
    smtps = [
        Controller(JournalingSmtpHandler(t.name, journal), hostname="127.0.0.1", port=t.smtp_port)
        for t in spec.tenants
    ]
    for tenant in spec.tenants:
        fcm.register_service_account(tenant.service_account)
    try:
        await fcm.start()
        for twilio in twilios:
            await twilio.start()
        for smtp in smtps:
            smtp.start()
        await wait_for_shutdown_signal()
    finally:
        for smtp in smtps:
            with contextlib.suppress(Exception):
                smtp.stop()
        for twilio in twilios:
            await twilio.stop()
        await fcm.stop()
        journal.close()


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Every journal entry (a torn last line, impossible unless the fakes died, is skipped)."""
    entries: list[dict[str, Any]] = []
    if not path.exists():
        return entries
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


# -- the stack: killable processes ---------------------------------------------------------


@dataclass
class ComponentStats:
    """What happened to one component during the run."""

    kills: int = 0
    restarts: int = 0
    #: Exit codes of exits nobody asked for (the supervisor restarted the process).
    unexpected_exits: list[int] = field(default_factory=list)


class Component:
    """A part of the stack that can be SIGKILLed and started again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = ComponentStats()
        #: Set while it is meant to be down (the supervisor leaves it alone).
        self.held_down = False
        #: Session ids of every process started for it (each child leads its own session).
        self.sessions: set[int] = set()

    def start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def kill(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def exit_code(self) -> int | None:  # pragma: no cover - abstract
        """The exit code once the process is no longer running, else ``None``."""
        raise NotImplementedError

    def stop(self) -> None:
        """Graceful stop; SIGKILL unless overridden."""
        self.kill()


class ServiceProcess(Component):
    """``python <argv>`` from the repository root, with the stack's environment."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        super().__init__(name)
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, *self.argv],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=child_preexec(),
                start_new_session=True,
            )
        self.sessions.add(self.process.pid)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()


class PostgresComponent(Component):
    """EmbeddedPostgres: SIGKILL of the postmaster, restart on the same data dir."""

    def __init__(self, server: EmbeddedPostgres) -> None:
        super().__init__("postgres")
        self.server = server

    def start(self) -> None:
        # Backends of a killed postmaster exit when they notice; a start racing them is
        # refused ("pre-existing shared memory block is still in use"): try again.
        for attempt in range(20):
            try:
                self.server.start()
                break
            except RuntimeError:
                if attempt == 19:
                    raise
                time.sleep(0.5)
        if self.server.pid is not None:
            self.sessions.add(self.server.pid)

    def kill(self) -> None:
        self.server.kill()

    def stop(self) -> None:
        self.server.stop()

    def exit_code(self) -> int | None:
        process = self.server.process
        return -1 if process is None else process.poll()


class KafkaComponent(Component):
    """EmbeddedKafka (Tansu, memory storage: a restart loses topics, offsets and messages)."""

    def __init__(self, broker: EmbeddedKafka) -> None:
        super().__init__("kafka")
        self.broker = broker

    def start(self) -> None:
        for attempt in range(20):
            try:
                self.broker.start()
                break
            except (RuntimeError, TimeoutError):
                if attempt == 19:
                    raise
                time.sleep(0.5)
        if self.broker.pid is not None:
            self.sessions.add(self.broker.pid)

    def kill(self) -> None:
        self.broker.kill()

    def stop(self) -> None:
        self.broker.stop()

    def exit_code(self) -> int | None:
        process = self.broker.process
        return -1 if process is None else process.poll()


class ChaosStack:
    """The whole pipeline as separate OS processes under ``root``; see the module docstring."""

    def __init__(
        self,
        root: Path,
        fakes_spec: FakesSpec,
        fakes_spec_path: Path,
        postgres_options: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.log_dir = root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.journal_path = root / "received.jsonl"
        self.grpc_addr = f"127.0.0.1:{free_port()}"
        self.fakes_spec = fakes_spec
        self.postgres = PostgresComponent(
            EmbeddedPostgres(
                root / "postgres",
                free_port(),
                options=CHAOS_POSTGRES_OPTIONS if postgres_options is None else postgres_options,
                log_file=self.log_dir / "postgres.log",
            )
        )
        self.kafka = KafkaComponent(EmbeddedKafka(free_port(), log_file=self.log_dir / "kafka.log"))
        self.database_url = self.postgres.server.dsn(DATABASE)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update(STACK_SETTINGS)
        env.update(
            SWITCHBOARD_DATABASE_URL=self.database_url,
            SWITCHBOARD_KAFKA_BOOTSTRAP=self.kafka.broker.bootstrap,
            SWITCHBOARD_GRPC_ADDR=self.grpc_addr,
            SWITCHBOARD_MASTER_KEY=generate_master_key("chaos1"),
            SWITCHBOARD_ADMIN_TOKEN=ADMIN_TOKEN,
            SWITCHBOARD_DATA_DIR=str(root / "data"),
        )
        cli = ["-m", "switchboard.cli"]
        fakes_argv = ["-m", "tests.chaos_harness", "fakes", "--spec", str(fakes_spec_path)]
        self.fakes = ServiceProcess(
            "fakes", [*fakes_argv, "--journal", str(self.journal_path)], env, self.log_dir / "fakes.log"
        )
        self.services: dict[str, ServiceProcess] = {
            "gateway": ServiceProcess("gateway", [*cli, "gateway"], env, self.log_dir / "gateway.log"),
            "relay": ServiceProcess("relay", [*cli, "relay"], env, self.log_dir / "relay.log"),
        }
        for channel in CHANNELS:
            name = f"worker-{channel}"
            self.services[name] = ServiceProcess(
                name, [*cli, "worker", "--channel", channel], env, self.log_dir / f"{name}.log"
            )
        self.components: dict[str, Component] = {
            "postgres": self.postgres,
            "kafka": self.kafka,
            "fakes": self.fakes,
            **self.services,
        }

    def start(self) -> None:
        """Start everything in dependency order; return once the gateway listens."""
        self.postgres.start()
        asyncio.run(self._create_database())
        asyncio.run(migrate(self.database_url))
        self.kafka.start()
        self.fakes.start()
        ports = [self.fakes_spec.fcm_port]
        ports += [p for t in self.fakes_spec.tenants for p in (t.smtp_port, t.twilio_port)]
        for port in ports:
            wait_for_port("127.0.0.1", port, 30, self.fakes.process)
        for service in self.services.values():
            service.start()
        gateway = self.services["gateway"]
        wait_for_port("127.0.0.1", int(self.grpc_addr.rpartition(":")[2]), 60, gateway.process)

    async def _create_database(self) -> None:
        conn = await asyncpg.connect(self.postgres.server.dsn())
        try:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` and keep it down until :meth:`restart`."""
        component = self.components[name]
        component.held_down = True
        component.kill()
        component.stats.kills += 1

    def restart(self, name: str) -> None:
        """Start ``name`` again after :meth:`kill`."""
        component = self.components[name]
        component.start()
        component.stats.restarts += 1
        component.held_down = False

    def supervise(self) -> list[tuple[str, int]]:
        """Restart components that exited on their own; return (name, exit code) of each."""
        restarted = []
        for name, component in self.components.items():
            if component.held_down:
                continue
            code = component.exit_code()
            if code is None:
                continue
            component.stats.unexpected_exits.append(code)
            component.start()
            restarted.append((name, code))
        return restarted

    def shutdown(self) -> None:
        """Stop the services, then the fakes, the broker and PostgreSQL; then SIGKILL whatever is
        left in any session we started (backends of a killed PostgreSQL included)."""
        for component in self.components.values():
            component.held_down = True
        for service in self.services.values():
            with contextlib.suppress(Exception):
                service.kill()
        for component in (self.fakes, self.kafka, self.postgres):
            with contextlib.suppress(Exception):
                component.stop()
        for proc in self.leftovers():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(self.leftovers(), timeout=10)

    @property
    def sessions(self) -> set[int]:
        """Session ids of every process we started."""
        return set().union(*(c.sessions for c in self.components.values()))

    def leftovers(self) -> list[psutil.Process]:
        """Live processes in any session one of our children started."""
        return processes_in_sessions(self.sessions)


def processes_in_sessions(sessions: set[int]) -> list[psutil.Process]:
    """Live (not zombie) processes whose session id is in ``sessions``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


# -- the monkey ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedKill:
    """Wait ``gap_s``, SIGKILL ``component``, keep it down ``downtime_s``, start it again."""

    component: str
    gap_s: float
    downtime_s: float


def plan_kills(rng: random.Random, total: int) -> list[PlannedKill]:
    """``total`` kills: every killable component once, the rest drawn at random
    (workers twice as likely: their deaths are what can duplicate a send)."""
    names = list(KILLABLE)
    weighted = [n for n in KILLABLE for _ in range(2 if n in WORKERS else 1)]
    names += [rng.choice(weighted) for _ in range(max(0, total - len(names)))]
    rng.shuffle(names)
    plan = []
    for name in names:
        downtime = rng.uniform(0.3, 3.0) if name in ("postgres", "kafka") else rng.uniform(0.2, 4.0)
        plan.append(PlannedKill(name, rng.uniform(1.0, 3.5), downtime))
    return plan


class Stopped(Exception):
    """The driver was told to shut down (or lost its input) while running the plan."""


class ChaosMonkey:
    """Executes a kill plan on a :class:`ChaosStack`, supervising between the steps."""

    def __init__(
        self,
        stack: ChaosStack,
        emit: Callable[..., None],
        poll_stop: Callable[[], bool],
    ) -> None:
        self._stack = stack
        self._emit = emit
        self._poll_stop = poll_stop

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, restarting anything that exited on its own; raise
        :class:`Stopped` if a shutdown arrives meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            for name, code in self._stack.supervise():
                self._emit("exited", component=name, code=code, t=time.time())
            if self._poll_stop():
                raise Stopped
            if time.monotonic() >= deadline:
                return

    def run(self, plan: list[PlannedKill]) -> None:
        """Execute ``plan`` step by step."""
        for step in plan:
            self.wait(step.gap_s)
            self._stack.kill(step.component)
            self._emit("kill", component=step.component, t=time.time(), downtime_s=step.downtime_s)
            self.wait(step.downtime_s)
            self._stack.restart(step.component)
            self._emit("restart", component=step.component, t=time.time())


# -- the driver ----------------------------------------------------------------------------


class CommandReader:
    """Non-blocking JSON-lines commands from a file descriptor (stdin)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self.closed = False

    def poll(self, timeout_s: float) -> list[dict[str, Any]]:
        """Commands that arrived within ``timeout_s``; sets :attr:`closed` at end of input."""
        if self.closed:
            time.sleep(timeout_s)
            return []
        readable, _, _ = select.select([self._fd], [], [], timeout_s)
        if not readable:
            return []
        chunk = os.read(self._fd, 65536)
        if not chunk:
            self.closed = True
            return []
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def run_driver(root: Path, fakes_spec_path: Path, out: TextIO) -> int:
    """Start the stack, report ``ready``, run kill plans on command, shut down on
    ``shutdown`` or end of input; return the exit code."""

    def emit(event: str, **fields: Any) -> None:
        out.write(json.dumps({"event": event, **fields}) + "\n")
        out.flush()

    def on_sigterm(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    commands = CommandReader(sys.stdin.fileno())
    shutdown = False

    def poll_stop() -> bool:
        nonlocal shutdown
        for command in commands.poll(0.1):
            if command.get("cmd") == "shutdown":
                shutdown = True
        return shutdown or commands.closed

    stack = ChaosStack(root, FakesSpec.read(fakes_spec_path), fakes_spec_path)
    monkey = ChaosMonkey(stack, emit, poll_stop)
    code = 0
    try:
        stack.start()
        emit(
            "ready",
            grpc_addr=stack.grpc_addr,
            database_url=stack.database_url,
            journal=str(stack.journal_path),
            log_dir=str(stack.log_dir),
        )
        while not (shutdown or commands.closed):
            for name, exit_code in stack.supervise():
                emit("exited", component=name, code=exit_code, t=time.time())
            for command in commands.poll(0.1):
                if command.get("cmd") == "shutdown":
                    shutdown = True
                elif command.get("cmd") == "chaos":
                    monkey.run([PlannedKill(**step) for step in command["plan"]])
                    emit("plan_done", t=time.time())
    except Stopped:
        pass
    except Exception:
        emit("error", message=traceback.format_exc())
        code = 1
    finally:
        stack.shutdown()
        emit(
            "stopped",
            stats={name: asdict(c.stats) for name, c in stack.components.items()},
            sessions=sorted(stack.sessions),
            leftovers=[f"{p.pid}: {' '.join(p.cmdline())}" for p in stack.leftovers()],
        )
    return code


# -- entry point ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.chaos_harness fakes|driver ...``."""
    parser = argparse.ArgumentParser(prog="python -m tests.chaos_harness")
    sub = parser.add_subparsers(dest="command", required=True)
    fakes = sub.add_parser("fakes", help="serve every tenant's fake SMTP, Twilio and FCM")
    fakes.add_argument("--spec", type=Path, required=True)
    fakes.add_argument("--journal", type=Path, required=True)
    driver = sub.add_parser("driver", help="run the stack and the kill plans (JSON lines on stdio)")
    driver.add_argument("--root", type=Path, required=True)
    driver.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "fakes":
        asyncio.run(serve_fakes(FakesSpec.read(args.spec), args.journal))
        return
    sys.exit(run_driver(args.root, args.spec, sys.stdout))


if __name__ == "__main__":
    main()
