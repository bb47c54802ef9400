"""Operator commands over TenantAdminService: ``switchboard tenants|keys|providers ...``.

They call the gateway at ``SWITCHBOARD_GRPC_ADDR`` with the operator token
``SWITCHBOARD_ADMIN_TOKEN``. Every mutating call carries a fresh UUID4
``request_id`` (AIP-155, required by the admin API; docs/idempotency.md), so
two runs of a command are two requests. Provider and payment processor secrets are read
from a JSON file or standard input (``--config -``), never from the command
line, where they would land in shell history and ``ps`` output. Payment
processors are under ``switchboard providers processors set|get|list|delete``.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from switchboard.notify.v1 import notify_pb2
from switchboard.settings import get_settings
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc

if TYPE_CHECKING:
    AdminStub = tenants_pb2_grpc.TenantAdminServiceAsyncStub
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
console = Console()
tenants_app = typer.Typer(help="Tenants (through the admin API).", no_args_is_help=True)
keys_app = typer.Typer(help="Tenant API keys (through the admin API).", no_args_is_help=True)
providers_app = typer.Typer(
    help="Tenant provider configurations (through the admin API).", no_args_is_help=True
)

processors_app = typer.Typer(
    help="Tenant payment processor configurations: Stripe, Adyen (through the admin API).",
    no_args_is_help=True,
)
providers_app.add_typer(processors_app, name="processors")

CHANNELS = {"email": notify_pb2.CHANNEL_EMAIL, "sms": notify_pb2.CHANNEL_SMS, "push": notify_pb2.CHANNEL_PUSH}


def _request_id() -> str:
    """A fresh idempotency key (UUID4) for one mutating admin call."""
    return str(uuid.uuid4())


def _call(work: Callable[[AdminStub, Metadata], Awaitable[T]]) -> T:
    """Run ``work`` with an admin stub and the operator metadata; print gRPC errors and exit 1."""
    settings = get_settings()
    if settings.admin_token is None:
        console.print("[red]SWITCHBOARD_ADMIN_TOKEN is not set[/red]")
        raise typer.Exit(2)
    metadata = (("authorization", f"Bearer {settings.admin_token.get_secret_value()}"),)

    async def run() -> T:
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            return await work(tenants_pb2_grpc.TenantAdminServiceStub(channel), metadata)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as error:
        console.print(f"[red]{error.code().name}: {error.details()}[/red]", highlight=False)
        raise typer.Exit(1) from None


def _tenant_table(tenants: list[tenants_pb2.Tenant]) -> Table:
    table = Table()
    for column in ("tenant id", "name", "display name", "disabled", "created"):
        table.add_column(column, overflow="fold")
    for t in tenants:
        table.add_row(
            t.tenant_id, t.name, t.display_name, "yes" if t.disabled else "no", t.create_time.ToJsonString()
        )
    return table


def _key_table(keys: list[tenants_pb2.ApiKey]) -> Table:
    table = Table()
    for column in ("key id", "prefix", "created", "last used", "revoked"):
        table.add_column(column, overflow="fold")
    for k in keys:
        table.add_row(
            k.key_id,
            k.prefix,
            k.create_time.ToJsonString(),
            k.last_use_time.ToJsonString() if k.HasField("last_use_time") else "-",
            k.revoke_time.ToJsonString() if k.HasField("revoke_time") else "-",
        )
    return table


def _config_table(configs: list[tenants_pb2.ProviderConfigView]) -> Table:
    table = Table()
    for column in ("channel", "provider", "settings", "secrets set", "fingerprint", "updated"):
        table.add_column(column, overflow="fold")
    for c in configs:
        table.add_row(
            notify_pb2.Channel.Name(c.channel).removeprefix("CHANNEL_").lower(),
            c.provider,
            ", ".join(f"{k}={v}" for k, v in sorted(c.settings.items()) if v),
            ", ".join(c.secret_fields),
            c.secret_fingerprint,
            c.update_time.ToJsonString(),
        )
    return table


def _processor_table(configs: list[tenants_pb2.ProcessorConfigView]) -> Table:
    table = Table()
    for column in (
        "processor",
        "priority",
        "settings",
        "secrets set",
        "fingerprint",
        "webhook keys",
        "updated",
    ):
        table.add_column(column, overflow="fold")
    for c in configs:
        table.add_row(
            c.processor,
            str(c.priority),
            ", ".join(f"{k}={v}" for k, v in sorted(c.settings.items()) if v),
            ", ".join(c.secret_fields),
            c.secret_fingerprint,
            " ".join(c.webhook_secret_fingerprints) or "-",
            c.update_time.ToJsonString(),
        )
    return table


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="tenant name: a-z 0-9 '-'")],
    display_name: Annotated[str, typer.Option(help="human-readable name")] = "",
    with_key: Annotated[bool, typer.Option(help="also create an API key and print it once")] = True,
) -> None:
    """Create a tenant (and, by default, its first API key, shown once)."""

    async def work(stub: Any, md: Any) -> tuple[tenants_pb2.Tenant, str]:
        tenant = (
            await stub.CreateTenant(
                tenants_pb2.CreateTenantRequest(
                    request_id=_request_id(), name=name, display_name=display_name
                ),
                metadata=md,
            )
        ).tenant
        secret = ""
        if with_key:
            secret = (
                await stub.CreateApiKey(
                    tenants_pb2.CreateApiKeyRequest(request_id=_request_id(), tenant_id=tenant.tenant_id),
                    metadata=md,
                )
            ).secret
        return tenant, secret

    tenant, secret = _call(work)
    console.print(_tenant_table([tenant]))
    if secret:
        console.print("API key (shown once):")
        console.print(secret, soft_wrap=True, highlight=False)


@tenants_app.command("list")
def tenants_list(page_size: int = 100) -> None:
    """List every tenant."""

    async def work(stub: Any, md: Any) -> list[tenants_pb2.Tenant]:
        found: list[tenants_pb2.Tenant] = []
        token = ""
        while True:
            page = await stub.ListTenants(
                tenants_pb2.ListTenantsRequest(page_size=page_size, page_token=token), metadata=md
            )
            found += list(page.tenants)
            token = page.next_page_token
            if not token:
                return found

    console.print(_tenant_table(_call(work)))


@tenants_app.command("disable")
def tenants_disable(tenant_id: str) -> None:
    """Disable a tenant: its keys are refused, its deliveries end FAILED."""
    tenant = _call(
        lambda s, md: s.DisableTenant(
            tenants_pb2.DisableTenantRequest(request_id=_request_id(), tenant_id=tenant_id), metadata=md
        )
    )
    console.print(_tenant_table([tenant.tenant]))


@tenants_app.command("enable")
def tenants_enable(tenant_id: str) -> None:
    """Enable a disabled tenant."""
    tenant = _call(
        lambda s, md: s.EnableTenant(
            tenants_pb2.EnableTenantRequest(request_id=_request_id(), tenant_id=tenant_id), metadata=md
        )
    )
    console.print(_tenant_table([tenant.tenant]))


@keys_app.command("create")
def keys_create(tenant_id: str) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    reply = _call(
        lambda s, md: s.CreateApiKey(
            tenants_pb2.CreateApiKeyRequest(request_id=_request_id(), tenant_id=tenant_id), metadata=md
        )
    )
    console.print(_key_table([reply.api_key]))
    console.print("API key (shown once):")
    console.print(reply.secret, soft_wrap=True, highlight=False)


@keys_app.command("list")
def keys_list(tenant_id: str) -> None:
    """List a tenant's keys (never secrets)."""
    reply = _call(
        lambda s, md: s.ListApiKeys(tenants_pb2.ListApiKeysRequest(tenant_id=tenant_id), metadata=md)
    )
    console.print(_key_table(list(reply.api_keys)))


@keys_app.command("revoke")
def keys_revoke(tenant_id: str, key_id: str) -> None:
    """Revoke a key; every gateway refuses it within about a second."""
    reply = _call(
        lambda s, md: s.RevokeApiKey(
            tenants_pb2.RevokeApiKeyRequest(request_id=_request_id(), tenant_id=tenant_id, key_id=key_id),
            metadata=md,
        )
    )
    console.print(_key_table([reply.api_key]))


def read_source(source: str) -> str:
    """The text of the file ``source``, or standard input when it is ``-``.

    Raises ``typer.BadParameter`` (exit status 2, no traceback) for a file that cannot be read
    as UTF-8 text, naming the file and the reason but never quoting its content.
    """
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise typer.BadParameter(f"cannot read {source}: {reason}", param_hint="'--config'") from None


def read_config(source: str) -> tenants_pb2.ProviderConfig:
    """A ProviderConfig from a JSON file, or from standard input when ``source`` is ``-``.

    The JSON is the protobuf JSON form, e.g.
    ``{"smtp": {"host": "smtp.example.com", "port": 587, "tlsMode": "SMTP_TLS_MODE_STARTTLS", ...}}``.
    Raises ``typer.BadParameter`` (never quoting the content) if it cannot be read or is not one.
    """
    text = read_source(source)
    try:
        return json_format.Parse(text, tenants_pb2.ProviderConfig())
    except json_format.ParseError as exc:
        # The parser's message can quote values; never echo a secret.
        raise typer.BadParameter(f"not a ProviderConfig in JSON form ({type(exc).__name__})") from None


@providers_app.command("set")
def providers_set(
    tenant_id: str,
    channel: Annotated[str, typer.Argument(help="email, sms or push")],
    config: Annotated[
        str, typer.Option("--config", help="JSON file with the ProviderConfig, or - for stdin")
    ],
) -> None:
    """Set a tenant's provider for a channel (secrets from a file or stdin, never argv)."""
    if channel not in CHANNELS:
        raise typer.BadParameter(f"channel must be one of {sorted(CHANNELS)}")
    message = read_config(config)
    reply = _call(
        lambda s, md: s.SetProviderConfig(
            tenants_pb2.SetProviderConfigRequest(
                request_id=_request_id(), tenant_id=tenant_id, channel=CHANNELS[channel], config=message
            ),
            metadata=md,
        )
    )
    console.print(_config_table([reply.config]))


@providers_app.command("get")
def providers_get(tenant_id: str, channel: str) -> None:
    """Show one provider configuration (settings, which secrets are set, fingerprint)."""
    if channel not in CHANNELS:
        raise typer.BadParameter(f"channel must be one of {sorted(CHANNELS)}")
    reply = _call(
        lambda s, md: s.GetProviderConfig(
            tenants_pb2.GetProviderConfigRequest(tenant_id=tenant_id, channel=CHANNELS[channel]), metadata=md
        )
    )
    console.print(_config_table([reply.config]))


@providers_app.command("list")
def providers_list(tenant_id: str) -> None:
    """List a tenant's provider configurations."""
    reply = _call(
        lambda s, md: s.ListProviderConfigs(
            tenants_pb2.ListProviderConfigsRequest(tenant_id=tenant_id), metadata=md
        )
    )
    console.print(_config_table(list(reply.configs)))


@providers_app.command("delete")
def providers_delete(tenant_id: str, channel: str) -> None:
    """Delete a tenant's provider configuration for a channel."""
    if channel not in CHANNELS:
        raise typer.BadParameter(f"channel must be one of {sorted(CHANNELS)}")
    _call(
        lambda s, md: s.DeleteProviderConfig(
            tenants_pb2.DeleteProviderConfigRequest(
                request_id=_request_id(), tenant_id=tenant_id, channel=CHANNELS[channel]
            ),
            metadata=md,
        )
    )
    console.print(f"deleted the {channel} provider of {tenant_id}")


def read_processor_config(source: str) -> tenants_pb2.ProcessorConfig:
    """A ProcessorConfig from a JSON file, or from standard input when ``source`` is ``-``.

    The JSON is the protobuf JSON form, e.g.
    ``{"priority": 0, "stripe": {"secretKey": "sk_live_...", "webhookSecrets": ["whsec_..."]}}`` or
    ``{"priority": 1, "adyen": {"apiKey": "...", "merchantAccount": "AcmeECOM", "hmacKeys": ["44782D..."]}}``.
    Raises ``typer.BadParameter`` (never quoting the content) if it is not one.
    """
    text = read_source(source)
    try:
        return json_format.Parse(text, tenants_pb2.ProcessorConfig())
    except json_format.ParseError as exc:
        # The parser's message can quote values; never echo a secret.
        raise typer.BadParameter(f"not a ProcessorConfig in JSON form ({type(exc).__name__})") from None


@processors_app.command("set")
def processors_set(
    tenant_id: str,
    config: Annotated[
        str, typer.Option("--config", help="JSON file with the ProcessorConfig, or - for stdin")
    ],
) -> None:
    """Set (create or replace) a tenant's Stripe or Adyen configuration; secrets from a file or stdin."""
    message = read_processor_config(config)
    reply = _call(
        lambda s, md: s.SetProcessorConfig(
            tenants_pb2.SetProcessorConfigRequest(
                request_id=_request_id(), tenant_id=tenant_id, config=message
            ),
            metadata=md,
        )
    )
    console.print(_processor_table([reply.config]))


@processors_app.command("get")
def processors_get(tenant_id: str, processor: Annotated[str, typer.Argument(help="stripe or adyen")]) -> None:
    """Show one processor configuration (settings, which secrets are set, fingerprints)."""
    reply = _call(
        lambda s, md: s.GetProcessorConfig(
            tenants_pb2.GetProcessorConfigRequest(tenant_id=tenant_id, processor=processor), metadata=md
        )
    )
    console.print(_processor_table([reply.config]))


@processors_app.command("list")
def processors_list(tenant_id: str) -> None:
    """List a tenant's processor configurations in failover order."""
    reply = _call(
        lambda s, md: s.ListProcessorConfigs(
            tenants_pb2.ListProcessorConfigsRequest(tenant_id=tenant_id), metadata=md
        )
    )
    console.print(_processor_table(list(reply.configs)))


@processors_app.command("delete")
def processors_delete(
    tenant_id: str, processor: Annotated[str, typer.Argument(help="stripe or adyen")]
) -> None:
    """Delete a tenant's configuration of one processor."""
    _call(
        lambda s, md: s.DeleteProcessorConfig(
            tenants_pb2.DeleteProcessorConfigRequest(
                request_id=_request_id(), tenant_id=tenant_id, processor=processor
            ),
            metadata=md,
        )
    )
    console.print(f"deleted the {processor} processor of {tenant_id}")


@tenants_app.command("rotate-master-key")
def rotate_master_key() -> None:
    """Re-encrypt every stored secret under the current (first) key of SWITCHBOARD_MASTER_KEY.

    Procedure: put the new key FIRST in SWITCHBOARD_MASTER_KEY of every process,
    keeping the old one after it (processes read both), run this command, then
    drop the old key. It talks to PostgreSQL directly (SWITCHBOARD_DATABASE_URL).
    """
    import asyncpg
    from rich.progress import Progress

    from tenants.master_keys import rotate_master_key as rotate
    from tenants.sealing import MasterKeyError, MasterKeyRing

    settings = get_settings()
    try:
        ring = MasterKeyRing.parse(settings.master_key.get_secret_value() if settings.master_key else None)
    except MasterKeyError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None

    async def run() -> int:
        pool = await asyncpg.create_pool(settings.require_database_url(), min_size=1, max_size=2)
        assert pool is not None
        try:
            with Progress(console=console) as progress:
                task = progress.add_task("re-encrypting", total=None)

                def report(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                return await rotate(pool, ring, progress=report)
        finally:
            await pool.close()

    try:
        count = asyncio.run(run())
    except MasterKeyError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"re-encrypted {count} provider/processor configuration(s) under key {ring.current_key_id!r}"
    )


@tenants_app.command("generate-master-key")
def generate_master_key_command() -> None:
    """Print a new master key entry (id:base64) for SWITCHBOARD_MASTER_KEY."""
    from tenants.sealing import generate_master_key

    print(generate_master_key())


dlq_app = typer.Typer(help="The dead-letter queue: deliveries that ended FAILED.", no_args_is_help=True)


def _dead_letter_filter(
    tenant: str | None, channel: str | None, since: str | None, until: str | None, reason: str | None
) -> Any:
    import uuid
    from datetime import datetime

    from channels.dead_letters import DeadLetterFilter

    if channel is not None and channel not in CHANNELS:
        raise typer.BadParameter(f"channel must be one of {sorted(CHANNELS)}")
    try:
        return DeadLetterFilter(
            tenant_id=uuid.UUID(tenant) if tenant else None,
            channel=channel,
            since=datetime.fromisoformat(since) if since else None,
            until=datetime.fromisoformat(until) if until else None,
            reason=reason,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


TenantOpt = Annotated[str | None, typer.Option(help="tenant id")]
ChannelOpt = Annotated[str | None, typer.Option(help="email, sms or push")]
SinceOpt = Annotated[str | None, typer.Option(help="dead-lettered at or after (ISO 8601, with offset)")]
UntilOpt = Annotated[str | None, typer.Option(help="dead-lettered before (ISO 8601, with offset)")]
ReasonOpt = Annotated[str | None, typer.Option(help="reason contains (case-insensitive)")]


async def _with_pool(work: Callable[[Any], Awaitable[T]]) -> T:
    import asyncpg

    pool = await asyncpg.create_pool(get_settings().require_database_url(), min_size=1, max_size=2)
    assert pool is not None
    try:
        return await work(pool)
    finally:
        await pool.close()


@dlq_app.command("list")
def dlq_list(
    tenant: TenantOpt = None,
    channel: ChannelOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    reason: ReasonOpt = None,
    limit: int = 100,
) -> None:
    """List dead letters not yet replayed (reads PostgreSQL: SWITCHBOARD_DATABASE_URL)."""
    from channels.dead_letters import list_dead_letters

    where = _dead_letter_filter(tenant, channel, since, until, reason)
    letters = asyncio.run(_with_pool(lambda pool: list_dead_letters(pool, where, limit)))
    table = Table(title=f"{len(letters)} dead letter(s)")
    for column in ("dead-lettered", "tenant", "channel", "delivery id", "attempts", "reason"):
        table.add_column(column, overflow="fold")
    for d in letters:
        table.add_row(
            d.dead_lettered_at.isoformat(timespec="seconds"),
            str(d.tenant_id),
            d.channel,
            str(d.delivery_id),
            str(d.attempts),
            d.reason,
        )
    console.print(table)


@dlq_app.command("replay")
def dlq_replay(
    tenant: TenantOpt = None,
    channel: ChannelOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    reason: ReasonOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only count what would be replayed")] = False,
) -> None:
    """Put matching dead deliveries back as new attempts (idempotent: never twice)."""
    from rich.progress import Progress

    from channels.dead_letters import replay_dead_letters

    where = _dead_letter_filter(tenant, channel, since, until, reason)
    prefix = get_settings().kafka_topic_prefix
    with Progress(console=console) as progress:
        task = progress.add_task("replaying", total=None)

        def report_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        report = asyncio.run(
            _with_pool(
                lambda pool: replay_dead_letters(
                    pool, where, topic_prefix=prefix, dry_run=dry_run, progress=report_progress
                )
            )
        )
    console.print(f"{'would replay' if dry_run else 'replayed'} {report.replayed} dead letter(s)")
    if report.skipped:
        console.print(f"{'would skip' if dry_run else 'skipped'} {len(report.skipped)} (left in the DLQ):")
        for skipped in report.skipped:
            console.print(f"  {skipped.letter.delivery_id} ({skipped.letter.channel}): {skipped.why}")
