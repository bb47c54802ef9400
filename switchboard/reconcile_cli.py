"""``switchboard reconcile``: import a settlement report and reconcile it with the ledger.

::

    switchboard reconcile --tenant acme --processor stripe --report balance.csv
    switchboard reconcile --tenant acme --processor adyen --report settlement_detail_report_batch_4.csv \\
        --format json

Reads the report (a progress bar on stderr follows the bytes read), loads the
tenant's journals on ``processor_clearing:<processor>`` from PostgreSQL
(``SWITCHBOARD_DATABASE_URL``), matches them (payments/reconciliation.py
documents the rules), stores the run in ``reconciliation_runs`` /
``reconciliation_items``, posts the report's fees as ledger fee journals (once
per fee reference: importing a report again posts nothing more; they commit
with the run) and prints a summary: counts per outcome, fees per currency
(compared with the fee journals the ledger had before this run), the fee
journals posted, skipped row types, and the discrepancies (``--limit`` of
them; all are stored). ``--format json`` prints one JSON document on stdout
instead.

Exit codes: 0 everything matched and the fees agree, 1 discrepancies (the run
is stored), 2 bad input: unreadable or malformed report (the message names
the line and column), unknown tenant, bad option, database URL not set; also
2 when the database cannot be reached (nothing is stored in every case of 2).
Messages for exit 2 go to stderr.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from payments.ledger import InvalidPosting, processor_clearing, resolve_tenant
from payments.reconciliation import (
    Outcome,
    ParsedReport,
    ReconciliationItem,
    ReconciliationResult,
    ReportError,
    ReportFormat,
    ReportSource,
    StoredRun,
    format_amounts,
    parse_report,
    reconcile_and_store,
)
from switchboard.settings import get_settings

console = Console()
err_console = Console(stderr=True)

EXIT_OK = 0
EXIT_DISCREPANCIES = 1
EXIT_BAD_INPUT = 2

_DATE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]


class OutputFormat(enum.StrEnum):
    """How ``switchboard reconcile`` prints its result."""

    TABLE = "table"
    JSON = "json"


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]{escape(message)}[/red]", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _read_report(
    path: Path, report_format: ReportFormat, *, show_progress: bool
) -> tuple[ParsedReport, bytes]:
    """Parse ``path`` (UTF-8, BOM allowed) with a byte-based progress bar; return it and its SHA-256."""
    with (
        Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            disable=not (show_progress and err_console.is_terminal),
        ) as progress,
        progress.open(
            path, "rt", encoding="utf-8-sig", newline="", description=f"reading {path.name}"
        ) as handle,
    ):
        parsed = parse_report(report_format, handle)
    with path.open("rb") as raw:
        digest = hashlib.file_digest(raw, "sha256").digest()
    return parsed, digest


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _item_json(item: ReconciliationItem) -> dict[str, Any]:
    return {
        "outcome": item.outcome.value,
        "kind": item.kind.value,
        "reference": item.reference,
        "report": dict(item.report),
        "ledger": dict(item.ledger),
        "lines": list(item.lines),
        "journal_ids": [str(j) for j in item.journal_ids],
        "detail": item.detail,
    }


def result_json(run: StoredRun, tenant_name: str, processor: str) -> dict[str, Any]:
    """The ``--format json`` document: summary, fees, skipped counts and every non-matched item."""
    result = run.result
    return {
        "run_id": str(run.run_id),
        "tenant": tenant_name,
        "processor": processor,
        "format": result.format.value,
        "rows": result.rows,
        "period_start": None if result.period_start is None else result.period_start.isoformat(),
        "period_end": None if result.period_end is None else result.period_end.isoformat(),
        "ok": result.ok,
        "counts": {outcome.value: count for outcome, count in result.counts.items()},
        "fees": [
            {
                "currency": fee.currency,
                "report_minor": fee.report_minor,
                "ledger_minor": fee.ledger_minor,
                "ok": fee.ok,
            }
            for fee in result.fees
        ],
        "fee_journals": {
            "posted": run.fee_journals.posted,
            "posted_minor": dict(run.fee_journals.posted_minor),
            "already_posted": run.fee_journals.already_posted,
            "conflicting": run.fee_journals.conflicting,
            "without_reference": run.fee_journals.without_reference,
        },
        "skipped": dict(result.skipped),
        "discrepancies": [_item_json(i) for i in result.items if i.outcome is not Outcome.MATCHED],
    }


def _print_tables(run: StoredRun, tenant_name: str, processor: str, limit: int) -> None:
    result: ReconciliationResult = run.result
    period = (
        "empty report"
        if result.period_start is None or result.period_end is None
        else f"{result.period_start.isoformat()} to {result.period_end.isoformat()}"
    )
    console.print(
        f"{escape(tenant_name)} / {processor}: {result.rows} report row(s), {period}",
        highlight=False,
        soft_wrap=True,
    )
    summary = Table()
    summary.add_column("outcome")
    summary.add_column("count", justify="right")
    for outcome, count in result.counts.items():
        style = "green" if outcome is Outcome.MATCHED or count == 0 else "red"
        summary.add_row(outcome.value, f"[{style}]{count}[/{style}]")
    for category, count in result.skipped:
        summary.add_row(f"skipped: {escape(category)}", str(count))
    console.print(summary)

    if result.fees:
        fees = Table(title="fees (minor units)", title_justify="left")
        for column in ("currency", "report", "ledger", "difference"):
            fees.add_column(column, justify="left" if column == "currency" else "right")
        for fee in result.fees:
            ledger = "not booked" if fee.ledger_minor is None else str(fee.ledger_minor)
            difference = "" if fee.ok else f"[red]{fee.difference_minor:+d}[/red]"
            fees.add_row(fee.currency, str(fee.report_minor), ledger, difference)
        console.print(fees)
    posted = run.fee_journals
    if posted.posted or posted.already_posted or posted.conflicting or posted.without_reference:
        amounts = ", ".join(f"{amount} {currency}" for currency, amount in posted.posted_minor) or "nothing"
        console.print(
            f"fee journals: {posted.posted} posted ({amounts}), {posted.already_posted} already posted, "
            f"{posted.conflicting} conflicting, {posted.without_reference} without a reference (not posted)",
            highlight=False,
            soft_wrap=True,
        )

    problems = [i for i in result.items if i.outcome is not Outcome.MATCHED]
    if problems and limit > 0:
        table = Table(
            title=f"discrepancies ({min(limit, len(problems))} of {len(problems)}; amounts in minor units)",
            title_justify="left",
        )
        for column in ("outcome", "kind", "reference", "report", "ledger", "lines", "detail"):
            table.add_column(column, overflow="fold")
        for item in problems[:limit]:
            table.add_row(
                item.outcome.value,
                item.kind.value,
                escape(item.reference),
                format_amounts(item.report) if item.report else "-",
                format_amounts(item.ledger) if item.ledger else "-",
                ",".join(str(n) for n in item.lines) or "-",
                escape(item.detail),
            )
        console.print(table)
    verdict = (
        "[green]OK: everything matched[/green]"
        if result.ok
        else f"[red]{result.discrepancies} discrepancy(ies)[/red]"
    )
    console.print(f"run {run.run_id} stored; {verdict}", highlight=False, soft_wrap=True)


def reconcile(
    tenant: Annotated[str, typer.Option("--tenant", help="tenant name or id", show_default=False)],
    processor: Annotated[
        str,
        typer.Option(
            "--processor", help="the ledger's processor name (journals on processor_clearing:<name>)"
        ),
    ],
    report: Annotated[
        Path,
        typer.Option("--report", help="the settlement report CSV file", dir_okay=False, show_default=False),
    ],
    report_format: Annotated[
        ReportFormat | None,
        typer.Option(
            "--report-format", help="report format (default: the processor's name)", show_default=False
        ),
    ] = None,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="output: a table, or JSON")
    ] = OutputFormat.TABLE,
    since: Annotated[
        datetime | None,
        typer.Option(
            formats=_DATE_FORMATS,
            help="period start (UTC unless an offset is given; default: the report's first row)",
            show_default=False,
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(
            formats=_DATE_FORMATS,
            help="period end, exclusive (default: one second after the report's last row)",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="discrepancies to print (all are stored)")] = 50,
) -> None:
    """Reconcile a settlement report with the ledger; exit 0 all matched, 1 discrepancies, 2 bad input."""
    try:
        processor_clearing(processor)
    except InvalidPosting as exc:
        raise _fail(str(exc)) from None
    if report_format is None:
        try:
            report_format = ReportFormat(processor)
        except ValueError:
            raise _fail(
                f"no report format for processor {processor!r}: pass --report-format "
                f"({', '.join(f.value for f in ReportFormat)})"
            ) from None
    if not report.is_file():
        raise _fail(f"no such report file: {report}")
    start, end = _utc(since), _utc(until)
    try:
        parsed, digest = _read_report(report, report_format, show_progress=output is OutputFormat.TABLE)
    except ReportError as exc:
        raise _fail(f"{report.name}: {exc}") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise _fail(f"{report.name}: cannot read the report: {exc}") from None
    start = start or parsed.period_start
    end = end or parsed.period_end
    if start is not None and end is not None and not start < end:
        raise _fail(f"the period is empty: {start.isoformat()} is not before {end.isoformat()}")
    period = None if start is None or end is None else (start, end)

    async def work() -> tuple[StoredRun, str]:
        conn = await asyncpg.connect(get_settings().require_database_url())
        try:
            who = await resolve_tenant(conn, tenant)
            stored = await reconcile_and_store(
                conn, who.id, processor, parsed, ReportSource(report.name, digest), period=period
            )
            return stored, who.name
        finally:
            await conn.close()

    try:
        run, tenant_name = asyncio.run(work())
    except (RuntimeError, LookupError) as exc:
        raise _fail(str(exc)) from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise _fail(f"the run could not be done, nothing was stored: {type(exc).__name__}: {exc}") from None
    if output is OutputFormat.JSON:
        sys.stdout.write(json.dumps(result_json(run, tenant_name, processor), indent=2) + "\n")
    else:
        _print_tables(run, tenant_name, processor, limit)
    raise typer.Exit(EXIT_OK if run.result.ok else EXIT_DISCREPANCIES)


reconcile_app = typer.Typer(add_completion=False, help="Reconcile a settlement report with the ledger.")
reconcile_app.command()(reconcile)

if __name__ == "__main__":
    reconcile_app()
