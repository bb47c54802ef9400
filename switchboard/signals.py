"""Shutdown signals and the drain deadline for long-running asyncio processes.

Graceful shutdown, the same in every process: the first SIGTERM/SIGINT starts
the drain (stop taking new work, finish what is in flight, flush, commit); the
drain must finish within ``shutdown_grace_s`` (a setting); a second signal or
the deadline ends the process at once with exit code 1 — nothing is lost by
that, because everything acknowledged is already in PostgreSQL and uncommitted
Kafka offsets are simply consumed again.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable

import structlog

log = structlog.get_logger(__name__)

#: Exit code when the drain is cut short (second signal or deadline).
FORCED_EXIT_CODE = 1


def _force_exit(reason: str) -> None:
    log.error("shutdown forced", reason=reason)
    os._exit(FORCED_EXIT_CODE)


#: Logged (info) when the first signal arrives and the drain starts; tests wait for it.
DRAINING_EVENT = "shutdown signal received: draining"


async def wait_for_shutdown_signal() -> None:
    """Return on the first SIGTERM or SIGINT, after logging :data:`DRAINING_EVENT`;
    from then on a second one forces exit."""
    received: list[signal.Signals] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _force_exit, "second signal during the drain")
    log.info(DRAINING_EVENT, signal=received[0].name)


async def drain(work: Awaitable[None], deadline_s: float) -> None:
    """Await the drain ``work``; past ``deadline_s`` seconds, exit the process at once."""
    try:
        async with asyncio.timeout(deadline_s):
            await work
    except TimeoutError:
        _force_exit(f"drain took longer than {deadline_s} s")
