"""Several gateway processes on one port: fork first, then each starts its own loop and server.

gRPC's Python server runs on one core (one event loop, plus the GIL), so a
gateway scales across cores with processes. They share the listening port
through ``SO_REUSEPORT``, which grpc-core sets by default on Linux
(``grpc.so_reuseport``): the kernel spreads new connections over the
processes' sockets. Forking happens before any event loop, gRPC server or
database pool exists (gRPC and asyncio are not fork-safe once running).

The parent only supervises: SIGTERM/SIGINT are forwarded to every child (each
drains as a single gateway does); a second signal kills them. If a child
exits on its own, the others are stopped too and the parent exits with that
child's code, so a process supervisor restarts the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from types import FrameType

from switchboard.embedded import child_preexec


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def run_processes(count: int, serve: Callable[[], None]) -> int:
    """Fork ``count`` children that each call ``serve()``; supervise them; return the exit code.

    ``serve`` runs a complete gateway (event loop included) and returns when it
    has drained. Returns 0 when every child exited 0 after a signal, else the
    first non-zero child exit code (128 + signal number for a child killed by a signal).
    """
    children: set[int] = set()
    signals_seen = 0

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum if signals_seen == 1 else signal.SIGKILL)

    die_with_parent = child_preexec()
    for _ in range(count):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                if die_with_parent is not None:
                    die_with_parent()
                serve()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children.add(pid)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    result = 0
    try:
        while children:
            pid, status = os.wait()
            children.discard(pid)
            code = _exit_code(status)
            if code != 0 and result == 0:
                result = code
            if signals_seen == 0 and children:
                # A child died without being asked to: take the group down.
                signals_seen = 1
                for other in list(children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(other, signal.SIGTERM)
                result = result or 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return result
