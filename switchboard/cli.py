"""The ``switchboard`` command line (typer)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from switchboard.admin_cli import dlq_app, keys_app, providers_app, tenants_app
from switchboard.ledger_cli import ledger_app
from switchboard.logs import configure_logging
from switchboard.payment_routes_cli import routes_app
from switchboard.payments_cli import notify_rules_app
from switchboard.reconcile_cli import reconcile
from switchboard.settings import get_settings

app = typer.Typer(
    help="Switchboard: multi-tenant gRPC gateway for notifications and payments.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(providers_app, name="providers")
app.add_typer(dlq_app, name="dlq")
app.add_typer(ledger_app, name="ledger")
app.command("reconcile")(reconcile)
payments_app = typer.Typer(
    help="Payments administration (reads and writes SWITCHBOARD_DATABASE_URL).", no_args_is_help=True
)
payments_app.add_typer(routes_app, name="routes")
payments_app.add_typer(notify_rules_app, name="notify-rules")
app.add_typer(payments_app, name="payments")
console = Console()


def _setup() -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


@app.command()
def migrate() -> None:
    """Apply pending database migrations (safe to run from several processes at once)."""
    from switchboard.db.migrate import migrate as apply

    _setup()
    applied = asyncio.run(apply(get_settings().require_database_url()))
    console.print(f"applied migrations: {applied or 'none (up to date)'}")


@app.command()
def gateway(
    processes: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="processes sharing the port (SWITCHBOARD_GATEWAY_PROCESSES)"),
    ] = None,
) -> None:
    """Run the gRPC gateway (SWITCHBOARD_GRPC_ADDR), in one or several processes."""
    from gateway.processes import run_processes
    from gateway.server import run_gateway

    _setup()
    settings = get_settings()
    count = processes or settings.gateway_processes
    if count == 1:
        _run(run_gateway(settings))
        return
    raise typer.Exit(run_processes(count, lambda: _run(run_gateway(settings))))


@app.command()
def relay() -> None:
    """Run the outbox relay (PostgreSQL outbox -> Kafka)."""
    from gateway.relay import run_relay_process

    _setup()
    _run(run_relay_process(get_settings()))


@app.command()
def worker(
    channel: Annotated[list[str] | None, typer.Option(help="channel to consume (repeatable)")] = None,
) -> None:
    """Run channel workers (default: SWITCHBOARD_WORKER_CHANNELS)."""
    from channels.catalog import ALL_CHANNELS
    from channels.worker import run_worker_process

    _setup()
    settings = get_settings()
    channels = channel or [c.strip() for c in settings.worker_channels.split(",") if c.strip()]
    unknown = [c for c in channels if c not in ALL_CHANNELS]
    if unknown:
        raise typer.BadParameter(f"unknown channel(s) {unknown}; choose from {list(ALL_CHANNELS)}")
    _run(run_worker_process(settings, channels))


@app.command("payment-worker")
def payment_worker() -> None:
    """Run the payment worker (payments.commands -> processors) and the payment janitor."""
    from payments.worker import run_payment_worker_process

    _setup()
    _run(run_payment_worker_process(get_settings()))


@app.command()
def webhooks() -> None:
    """Run the processor webhook endpoint (SWITCHBOARD_WEBHOOK_ADDR): Stripe and Adyen events in."""
    from payments.webhooks import run_webhook_server

    _setup()
    _run(run_webhook_server(get_settings()))


@app.command("payment-notifier")
def payment_notifier() -> None:
    """Run the payment event notifier (payments.events -> tenant rules -> notifications)."""
    from payments.event_notifier import run_event_notifier

    _setup()
    _run(run_event_notifier(get_settings()))


@app.command("smtp-sink")
def smtp_sink(
    maildir: Annotated[Path, typer.Option(help="Maildir folder")],
    host: str = "127.0.0.1",
    port: int = 2525,
) -> None:
    """Run a local SMTP server that stores every message in a Maildir."""
    from switchboard.embedded import run_smtp_sink

    run_smtp_sink(maildir, host, port)


@app.command()
def fakes(
    twilio_port: Annotated[int, typer.Option()],
    fcm_port: Annotated[int, typer.Option()],
    twilio_token_file: Annotated[Path, typer.Option(help="file holding the fake Twilio auth token")],
    service_account: Annotated[Path, typer.Option(help="service-account JSON the fake FCM accepts")],
    journal_dir: Annotated[Path, typer.Option(help="where accepted requests are appended")],
    stripe_port: Annotated[int, typer.Option(help="fake Stripe port (0: none)")] = 0,
    stripe_key_file: Annotated[
        Path | None, typer.Option(help="file holding the fake Stripe secret key")
    ] = None,
) -> None:
    """Run the dev stack's fake Twilio, FCM (+ OAuth2) and Stripe on loopback."""
    from switchboard.fakes.dev import DevFakes, run_dev_fakes

    _setup()
    run_dev_fakes(
        DevFakes(
            twilio_port=twilio_port,
            fcm_port=fcm_port,
            twilio_auth_token=twilio_token_file.read_text(encoding="utf-8").strip(),
            service_account_path=service_account,
            journal_dir=journal_dir,
            stripe_port=stripe_port,
            stripe_secret_key=stripe_key_file.read_text(encoding="utf-8").strip() if stripe_key_file else "",
        )
    )


@app.command()
def dev() -> None:
    """Run the whole stack locally on embedded defaults until Ctrl-C."""
    from switchboard.dev import DevStack, run_until_signal

    _setup()

    def banner(stack: DevStack) -> None:
        table = Table(title="Switchboard dev stack", show_header=False)
        table.add_column("what")
        table.add_column("where", overflow="fold")
        for what, where in stack.describe():
            table.add_row(what, where)
        console.print(table)
        console.print("Ctrl-C stops everything.")

    console.print("starting the dev stack ...")
    raise typer.Exit(run_until_signal(DevStack(get_settings()), on_started=banner))


@app.command()
def demo(
    timeout: Annotated[float, typer.Option(help="seconds to wait for every delivery")] = 60.0,
) -> None:
    """Start the dev stack, send one notification on every channel, take one payment
    (fake Stripe) with its receipt email, and print where everything landed."""
    from switchboard.demo import demo_api_key, print_result, send_and_wait
    from switchboard.demo_payment import configure_payments, print_payment, take_payment
    from switchboard.dev import DevStack
    from switchboard.notify.v1 import notify_pb2

    _setup()
    stack = DevStack(get_settings())
    console.print("starting the dev stack ...")
    try:
        stack.start()
        for what, where in stack.describe():
            console.print(f"  {what}: {where}")
        tenant_id, api_key = asyncio.run(demo_api_key(stack))
        asyncio.run(configure_payments(stack, tenant_id))
        result = asyncio.run(send_and_wait(stack, api_key, timeout))
        payment = asyncio.run(take_payment(stack, api_key, tenant_id, timeout))
    finally:
        stack.stop()
    print_result(console, result)
    print_payment(console, payment)
    ok = True
    if result.ok:
        console.print(f"[green]every delivery DELIVERED in {result.elapsed_s:.2f} s[/green]")
    else:
        ok = False
        failed = [
            d for d in result.notification.deliveries if d.status != notify_pb2.DELIVERY_STATUS_DELIVERED
        ]
        reasons = "; ".join(
            f"{d.delivery_id}: {d.last_error or 'not final before the timeout'}" for d in failed
        )
        console.print(f"[red]not every delivery was DELIVERED: {reasons}[/red]", highlight=False)
    if payment.ok:
        console.print(
            f"[green]payment SUCCEEDED, receipt sent, ledger balanced and verified in "
            f"{payment.elapsed_s:.2f} s[/green]"
        )
    else:
        ok = False
        console.print(
            f"[red]the payment demo did not complete: {payment.payment.failure_message or payment}[/red]"
        )
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    """Entry point for ``python -m switchboard.cli``."""
    app(prog_name="switchboard")


if __name__ == "__main__":
    main()
