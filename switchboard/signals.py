"""Shutdown signals for long-running asyncio processes."""

from __future__ import annotations

import asyncio
import signal


async def wait_for_shutdown_signal() -> None:
    """Return on the first SIGTERM or SIGINT received by this process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
