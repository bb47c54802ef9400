"""``switchboard payments routes set|show|clear``: a tenant's payment routing rules.

The commands read and write PostgreSQL directly (``SWITCHBOARD_DATABASE_URL``),
like ``switchboard ledger``. The payment worker reads the rules for every
payment, so a change applies to the next payment (no cache to invalidate).
``TENANT`` is a tenant's name or id. The configuration file is the JSON
document of :func:`payments.routing.parse_route_config`::

    {"rules": [
      {"currency": "EUR", "max_amount_minor": 100000, "processors": ["adyen", "stripe"]},
      {"payment_method_prefix": "pm_", "processors": ["stripe"]}
    ]}

``set`` replaces every rule of the tenant at once (``{"rules": []}`` or
``clear`` restores the default route: the processors in configuration
priority order) and warns about processors the tenant has not configured
(such a processor is skipped until it is).

Exit codes: 0 success, 2 a usage error (invalid configuration, every problem
printed; unknown tenant; unreadable file; database URL not set).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import asyncpg
import typer
from rich.console import Console

from payments.ledger import resolve_tenant
from payments.routing import (
    RouteConfigError,
    RouteRule,
    load_route_rules,
    parse_route_config,
    replace_route_rules,
)
from switchboard.cli_support import run_with_pool
from tenants.processor_store import list_processor_configs

T = TypeVar("T")
console = Console()
routes_app = typer.Typer(
    help="Payment routing rules: which processors a tenant's payments go to (SWITCHBOARD_DATABASE_URL).",
    no_args_is_help=True,
)

TenantArg = Annotated[str, typer.Argument(help="tenant name or id", show_default=False)]


def _with_pool(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run ``work`` with a small pool on the configured database; usage errors exit 2."""
    return run_with_pool(work, console)


def _document(rules: list[RouteRule]) -> str:
    return json.dumps({"rules": [rule.to_json() for rule in rules]}, indent=2)


@routes_app.command("set")
def set_routes(
    tenant: TenantArg,
    config: Annotated[Path, typer.Option("--config", help="JSON file {'rules': [...]}", show_default=False)],
) -> None:
    """Replace the tenant's routing rules with those of the configuration file."""
    try:
        rules = parse_route_config(config.read_bytes())
    except OSError as exc:
        console.print(f"[red]cannot read {config}: {exc.strerror}[/red]", highlight=False)
        raise typer.Exit(2) from None
    except RouteConfigError as exc:
        console.print("[red]invalid routing configuration:[/red]", highlight=False)
        for problem in exc.problems:
            console.print(f"  {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None

    async def work(pool: asyncpg.Pool) -> tuple[str, set[str]]:
        found = await resolve_tenant(pool, tenant)
        configured = {c.processor for c in await list_processor_configs(pool, found.id)}
        async with pool.acquire() as conn, conn.transaction():
            await replace_route_rules(conn, found.id, rules)
        return str(found.id), configured

    tenant_id, configured = _with_pool(work)
    missing = sorted({name for rule in rules for name in rule.processors} - configured)
    if missing:
        console.print(
            f"[yellow]not configured for this tenant (skipped until they are): {', '.join(missing)}[/yellow]",
            highlight=False,
        )
    console.print(f"stored {len(rules)} routing rule(s) for tenant {tenant_id}", highlight=False)


@routes_app.command("show")
def show_routes(tenant: TenantArg) -> None:
    """Print the tenant's routing rules as a configuration document (empty: the default route)."""

    async def work(pool: asyncpg.Pool) -> list[RouteRule]:
        found = await resolve_tenant(pool, tenant)
        return await load_route_rules(pool, found.id)

    typer.echo(_document(_with_pool(work)))


@routes_app.command("clear")
def clear_routes(tenant: TenantArg) -> None:
    """Delete the tenant's routing rules: payments follow the processors' priority order again."""

    async def work(pool: asyncpg.Pool) -> str:
        found = await resolve_tenant(pool, tenant)
        async with pool.acquire() as conn, conn.transaction():
            await replace_route_rules(conn, found.id, [])
        return str(found.id)

    console.print(f"cleared the routing rules of tenant {_with_pool(work)}", highlight=False)
