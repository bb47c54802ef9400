"""``switchboard ledger verify|balance``: check the payments ledger and show its balances.

Both commands read PostgreSQL directly (``SWITCHBOARD_DATABASE_URL``) and
write nothing. ``--tenant`` takes a tenant's name or id; without it every
tenant is shown.

Exit codes: 0 success (every chain verified), 1 at least one chain is broken
(``verify``), 2 a usage error (unknown tenant, database URL not set).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from itertools import groupby
from typing import Annotated, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from payments.ledger import AccountBalance, account_balances, resolve_tenant
from payments.ledger_verify import TenantChain, VerifyResult, verify_chain
from switchboard.cli_support import run_with_pool

T = TypeVar("T")
console = Console()
ledger_app = typer.Typer(
    help="The payments ledger: verify the hash chains, show balances (reads SWITCHBOARD_DATABASE_URL).",
    no_args_is_help=True,
)

TenantOpt = Annotated[
    str | None, typer.Option("--tenant", help="tenant name or id (default: every tenant)", show_default=False)
]


def _with_pool(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run ``work`` with a small pool on the configured database; usage errors exit 2."""
    return run_with_pool(work, console)


async def _tenant_id(pool: asyncpg.Pool, tenant: str | None) -> uuid.UUID | None:
    return None if tenant is None else (await resolve_tenant(pool, tenant)).id


def _chain_line(chain: TenantChain) -> str:
    who = f"{chain.tenant_name} ({chain.tenant_id})"
    if chain.broken is None:
        return (
            f"[green]OK[/green] {who}: {chain.journals} journal(s), {chain.postings} posting(s), "
            f"head sequence {chain.head_sequence} hash {chain.head_hash.hex()}"
        )
    b = chain.broken
    return (
        f"[red]BROKEN[/red] {who}: first broken link at sequence {b.sequence}, journal {b.journal_id}: "
        f"{', '.join(b.reasons)}\n"
        f"  {b.detail}\n"
        f"  expected hash {b.expected_hash.hex()}\n"
        f"  stored hash   {b.stored_hash.hex()}\n"
        f"  last good: sequence {chain.head_sequence} hash {chain.head_hash.hex()}"
    )


@ledger_app.command("verify")
def verify(tenant: TenantOpt = None) -> None:
    """Recompute each tenant's hash chain; print OK with counts or the first broken link (exit 1)."""

    async def work(pool: asyncpg.Pool) -> VerifyResult:
        return await verify_chain(pool, await _tenant_id(pool, tenant))

    result = _with_pool(work)
    for chain in result.tenants:
        console.print(_chain_line(chain), highlight=False, soft_wrap=True)
    journals = sum(chain.journals for chain in result.tenants)
    if result.ok:
        console.print(
            f"ledger OK: {len(result.tenants)} tenant(s), {journals} journal(s) verified",
            highlight=False,
            soft_wrap=True,
        )
        return
    console.print(
        f"[red]ledger BROKEN: {len(result.broken)} of {len(result.tenants)} tenant chain(s)[/red]",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(1)


def _side(amount: int) -> str:
    if amount == 0:
        return "0"
    return f"{abs(amount)} {'Dr' if amount > 0 else 'Cr'}"


def _balance_table(tenant_name: str, tenant_id: uuid.UUID, rows: list[AccountBalance]) -> Table:
    table = Table(title=f"{tenant_name} ({tenant_id}): balances in minor units", title_justify="left")
    for column in ("account", "kind", "currency"):
        table.add_column(column, overflow="fold")
    for column in ("debits", "credits", "balance", "postings"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.account,
            row.kind.value,
            row.currency,
            str(row.debits_minor),
            str(row.credits_minor),
            _side(row.balance_minor),
            str(row.postings),
        )
    trial: dict[str, int] = defaultdict(int)
    for row in rows:
        trial[row.currency] += row.balance_minor
    table.caption = "trial balance: " + ", ".join(
        f"{currency} {total}{'' if total == 0 else ' (NOT BALANCED)'}"
        for currency, total in sorted(trial.items())
    )
    table.caption_justify = "left"
    return table


@ledger_app.command("balance")
def balance(tenant: TenantOpt = None) -> None:
    """Print each account's debits, credits and balance per currency (Dr/Cr, minor units)."""

    async def work(pool: asyncpg.Pool) -> list[AccountBalance]:
        return await account_balances(pool, await _tenant_id(pool, tenant))

    balances = _with_pool(work)
    if not balances:
        console.print("no ledger postings", highlight=False)
        return
    for (tenant_id, tenant_name), rows in groupby(balances, key=lambda b: (b.tenant_id, b.tenant_name)):
        console.print(_balance_table(tenant_name, tenant_id, list(rows)))


if __name__ == "__main__":
    ledger_app()
