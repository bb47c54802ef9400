"""``switchboard payments notify-rules set|list|delete``: tenants' payment notification rules.

The commands read and write PostgreSQL directly (``SWITCHBOARD_DATABASE_URL``),
like ``switchboard ledger``; the payment event notifier picks a change up
with the next event (it reads the rules per event). ``--tenant`` takes a
tenant's name or id. A template option whose value starts with ``@`` is read
from that file (UTF-8), e.g. ``--email-html @receipt.html``. Rules,
placeholders and escaping: docs/payments.md, "Payment events and
notification rules".

Exit codes: 0 success, 1 ``delete`` of a rule that does not exist, 2 a usage
error (invalid rule: every bad field is printed; unknown tenant; database URL
not set; unreadable template file).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from payments.ledger import resolve_tenant
from payments.notification_rules import (
    EVENT_TYPES,
    PLACEHOLDERS,
    NotificationRule,
    RuleInvalid,
    RuleSpec,
    RuleTemplates,
    delete_rule,
    list_rules,
    set_rule,
)
from switchboard.cli_support import run_with_pool

T = TypeVar("T")
console = Console()
notify_rules_app = typer.Typer(
    help="Payment notification rules: on a payment event, notify the customer (SWITCHBOARD_DATABASE_URL).",
    no_args_is_help=True,
)

TenantOpt = Annotated[str, typer.Option("--tenant", help="tenant name or id", show_default=False)]
_TEMPLATE_HELP = "template ($amount, $currency, ...; '@file' reads a file)"


def _with_pool(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run ``work`` with a small pool on the configured database; usage errors and
    invalid rules exit 2."""
    try:
        return run_with_pool(work, console)
    except RuleInvalid as exc:
        console.print("[red]invalid rule:[/red]", highlight=False)
        for violation in exc.violations:
            console.print(f"  {violation.field}: {violation.description}", highlight=False, soft_wrap=True)
        console.print(f"placeholders: {', '.join('$' + p for p in PLACEHOLDERS)}", highlight=False)
        raise typer.Exit(2) from None


def _template(value: str, option: str) -> str:
    """``value``, or the content of the file it names after ``@``."""
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text(encoding="utf-8")
    except OSError as exc:
        console.print(f"[red]{option}: cannot read {value[1:]!r}: {exc.strerror}[/red]", highlight=False)
        raise typer.Exit(2) from None


def _rule_json(rule: NotificationRule) -> dict[str, object]:
    return {
        "id": str(rule.id),
        "tenant_id": str(rule.tenant_id),
        "name": rule.spec.name,
        "event_type": rule.spec.event_type,
        "channels": list(rule.spec.channels),
        "enabled": rule.spec.enabled,
        **rule.spec.templates.as_dict(),
        "created_at": rule.created_at.isoformat(),
        "updated_at": rule.updated_at.isoformat(),
    }


def _rules_table(rules: list[NotificationRule]) -> Table:
    table = Table()
    for column in ("name", "event type", "channels", "enabled", "templates set", "rule id", "updated"):
        table.add_column(column, overflow="fold")
    for rule in rules:
        table.add_row(
            rule.spec.name,
            rule.spec.event_type,
            ", ".join(rule.spec.channels),
            "yes" if rule.spec.enabled else "no",
            ", ".join(k for k, v in rule.spec.templates.as_dict().items() if v),
            str(rule.id),
            rule.updated_at.isoformat(timespec="seconds"),
        )
    return table


@notify_rules_app.command("set")
def set_command(
    name: Annotated[str, typer.Argument(help="rule name: a-z 0-9 _ -")],
    tenant: TenantOpt,
    event_type: Annotated[
        str, typer.Option("--event-type", help=f"one of {', '.join(EVENT_TYPES)}", show_default=False)
    ],
    channel: Annotated[
        list[str], typer.Option("--channel", help="email, sms or push (repeatable)", show_default=False)
    ],
    email_subject: Annotated[str, typer.Option(help=_TEMPLATE_HELP)] = "",
    email_text: Annotated[str, typer.Option(help=_TEMPLATE_HELP)] = "",
    email_html: Annotated[str, typer.Option(help=_TEMPLATE_HELP + "; values are HTML-escaped")] = "",
    sms_text: Annotated[str, typer.Option(help=_TEMPLATE_HELP)] = "",
    push_title: Annotated[str, typer.Option(help=_TEMPLATE_HELP)] = "",
    push_body: Annotated[str, typer.Option(help=_TEMPLATE_HELP)] = "",
    enabled: Annotated[
        bool, typer.Option("--enabled/--disabled", help="fire the rule or keep it idle")
    ] = True,
) -> None:
    """Create or replace (by name) a tenant's rule; templates left out become empty."""
    templates = RuleTemplates(
        email_subject=_template(email_subject, "--email-subject"),
        email_text=_template(email_text, "--email-text"),
        email_html=_template(email_html, "--email-html"),
        sms_text=_template(sms_text, "--sms-text"),
        push_title=_template(push_title, "--push-title"),
        push_body=_template(push_body, "--push-body"),
    )
    spec = RuleSpec(name, event_type, tuple(channel), templates, enabled)

    async def work(pool: asyncpg.Pool) -> NotificationRule:
        return await set_rule(pool, (await resolve_tenant(pool, tenant)).id, spec)

    rule = _with_pool(work)
    console.print(_rules_table([rule]))


@notify_rules_app.command("list")
def list_command(
    tenant: TenantOpt,
    event_type: Annotated[
        str | None, typer.Option("--event-type", help="only rules for this event type", show_default=False)
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per rule, templates included")
    ] = False,
) -> None:
    """List a tenant's rules (a table, or JSON lines with the templates)."""

    async def work(pool: asyncpg.Pool) -> list[NotificationRule]:
        return await list_rules(pool, (await resolve_tenant(pool, tenant)).id, event_type)

    rules = _with_pool(work)
    if as_json:
        for rule in rules:
            typer.echo(json.dumps(_rule_json(rule), ensure_ascii=False))
        return
    if not rules:
        console.print("no notification rules", highlight=False)
        return
    console.print(_rules_table(rules))


@notify_rules_app.command("delete")
def delete_command(
    name: Annotated[str, typer.Argument(help="rule name")],
    tenant: TenantOpt,
) -> None:
    """Delete a tenant's rule; exit 1 if there is none of that name."""

    async def work(pool: asyncpg.Pool) -> tuple[uuid.UUID, bool]:
        tenant_id = (await resolve_tenant(pool, tenant)).id
        return tenant_id, await delete_rule(pool, tenant_id, name)

    tenant_id, deleted = _with_pool(work)
    if not deleted:
        console.print(f"[red]no rule {name!r} for tenant {tenant_id}[/red]", highlight=False)
        raise typer.Exit(1)
    console.print(f"deleted rule {name!r} of tenant {tenant_id}", highlight=False)


if __name__ == "__main__":
    notify_rules_app()
