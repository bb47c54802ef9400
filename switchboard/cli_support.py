"""What the commands that work on the database directly share (ledger, reconcile, payments)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import typer
from rich.console import Console

from switchboard.settings import get_settings

T = TypeVar("T")


def run_with_pool(work: Callable[[asyncpg.Pool], Awaitable[T]], console: Console) -> T:
    """Run ``work`` with a small pool (1-2 connections) on ``SWITCHBOARD_DATABASE_URL``.

    Usage errors (no database URL: ``RuntimeError``; an unknown tenant:
    ``LookupError``) are printed to ``console`` and exit with code 2; other
    exceptions propagate.
    """

    async def run() -> T:
        pool = await asyncpg.create_pool(get_settings().require_database_url(), min_size=1, max_size=2)
        assert pool is not None
        try:
            return await work(pool)
        finally:
            await pool.close()

    try:
        return asyncio.run(run())
    except (RuntimeError, LookupError) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
