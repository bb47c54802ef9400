"""TenantAdminService: the operator's API for tenants, API keys, provider and processor configurations.

Reachable only with the operator token (``SWITCHBOARD_ADMIN_TOKEN``) in
``authorization: Bearer`` metadata; a tenant API key never opens it. Secrets
are sealed with the master key before they reach PostgreSQL and never leave
it again: reads show which secret fields are set and a fingerprint.

Every mutating RPC carries a required ``request_id`` (AIP-155), validated with
the other fields, and runs once per operator key through
:class:`gateway.admin_idempotency.AdminIdempotency` (Stripe's semantics; the
scope and the handling of secrets are described there and in docs/idempotency.md).
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from channels import callbacks
from channels.catalog import CHANNEL_NAMES, CHANNEL_VALUES
from gateway.admin_idempotency import AdminIdempotency
from gateway.auth import bearer_token
from gateway.errors import (
    RpcError,
    already_exists,
    invalid_argument,
    not_found,
    unauthenticated,
)
from gateway.rpc import answer, database_errors_as_unavailable
from gateway.validation import FieldViolation, RequestInvalid, validate_request_id
from gateway.write_path import DEFAULT_IDEMPOTENCY_RETENTION_S
from switchboard.db.pool import Connection
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tenants import processor_store, store
from tenants.processor_config import PROCESSORS, parse_processor_name, split_processor_config
from tenants.provider_config import split_provider_config
from tenants.sealing import MasterKeyRing, processor_secrets_associated_data, secrets_associated_data

T = TypeVar("T")
R = TypeVar("R", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]

DISPLAY_NAME_MAX_CHARS = 200
PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 1000
#: Upper bounds of each limit (0 = the gateway default).
LIMIT_MAXIMA = {
    "max_delivery_attempts": 100,
    "max_delivery_age_seconds": 30 * 24 * 3600,
    "requests_per_second": 1_000_000,
    "burst": 1_000_000,
}


def _timestamp(value: Any) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def tenant_message(tenant: store.Tenant) -> tenants_pb2.Tenant:
    """The API form of a tenant row."""
    return tenants_pb2.Tenant(
        tenant_id=str(tenant.id),
        name=tenant.name,
        display_name=tenant.display_name,
        limits=tenants_pb2.TenantLimits(
            max_delivery_attempts=tenant.limits.max_delivery_attempts,
            max_delivery_age_seconds=tenant.limits.max_delivery_age_seconds,
            requests_per_second=tenant.limits.requests_per_second,
            burst=tenant.limits.burst,
        ),
        disabled=tenant.disabled_at is not None,
        create_time=_timestamp(tenant.created_at),
        update_time=_timestamp(tenant.updated_at),
    )


def api_key_message(key: store.ApiKeyRecord) -> tenants_pb2.ApiKey:
    """The API form of a key row (no secret: none is stored)."""
    return tenants_pb2.ApiKey(
        key_id=key.id,
        tenant_id=str(key.tenant_id),
        prefix=key.prefix,
        create_time=_timestamp(key.created_at),
        last_use_time=_timestamp(key.last_used_at),
        revoke_time=_timestamp(key.revoked_at),
    )


def provider_config_view(config: store.StoredProviderConfig) -> tenants_pb2.ProviderConfigView:
    """The read form of a configuration: settings, which secrets are set, their fingerprint."""
    return tenants_pb2.ProviderConfigView(
        tenant_id=str(config.tenant_id),
        channel=CHANNEL_VALUES[config.channel],  # type: ignore[arg-type]
        provider=config.provider,
        settings={k: str(v) for k, v in config.settings.items()},
        secret_fields=config.secret_fields,
        secret_fingerprint=config.secret_fingerprint,
        update_time=_timestamp(config.updated_at),
    )


def processor_config_view(config: processor_store.StoredProcessorConfig) -> tenants_pb2.ProcessorConfigView:
    """The read form of a processor configuration: settings, which secrets are set, fingerprints."""
    return tenants_pb2.ProcessorConfigView(
        tenant_id=str(config.tenant_id),
        processor=config.processor,
        priority=config.priority,
        settings={k: str(v) for k, v in config.settings.items()},
        secret_fields=config.secret_fields,
        secret_fingerprint=config.secret_fingerprint,
        webhook_secret_fingerprints=config.webhook_secret_fingerprints,
        update_time=_timestamp(config.updated_at),
    )


def status_callback_message(stored: callbacks.TenantCallback) -> tenants_pb2.StatusCallback:
    """The API form of a tenant's callback endpoint (no secret)."""
    return tenants_pb2.StatusCallback(
        tenant_id=str(stored.tenant_id),
        url=stored.url,
        create_time=_timestamp(stored.created_at),
        update_time=_timestamp(stored.updated_at),
        previous_secret_expire_time=_timestamp(stored.previous_secret_expires_at),
    )


def _invalid(field: str, description: str) -> RpcError:
    return RpcError(invalid_argument([FieldViolation(field=field, description=description)]))


class FieldChecks:
    """Collects the field violations of a request; a mutating request's ``request_id`` first.

    Each parse method returns the parsed value, or, for a bad value, records
    a violation naming the field and returns a placeholder (the nil UUID, or
    ``""``); :meth:`raise_if_any` then raises before a placeholder is used, so
    a client sees every bad field at once (AIP-193 ``BadRequest``).
    ``request_id``: the AIP-155 key of a mutating request, checked with
    :func:`gateway.validation.validate_request_id`; ``None`` for a read.
    """

    def __init__(self, request_id: str | None = None) -> None:
        self.violations: list[FieldViolation] = [] if request_id is None else validate_request_id(request_id)

    def tenant_id(self, value: str, field: str = "tenant_id") -> uuid.UUID:
        """``value`` as a tenant id (UUID)."""
        try:
            return uuid.UUID(value)
        except ValueError:
            self.violations.append(FieldViolation(field=field, description="must be a tenant id (UUID)"))
            return uuid.UUID(int=0)

    def channel(self, value: int, field: str = "channel") -> str:
        """``value`` as a concrete channel name."""
        if value not in CHANNEL_NAMES:
            self.violations.append(
                FieldViolation(field=field, description="one of CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_PUSH")
            )
            return ""
        return CHANNEL_NAMES[value]

    def processor(self, value: str, field: str = "processor") -> str:
        """``value`` as a processor name (``stripe``, ``adyen``)."""
        name = parse_processor_name(value)
        if name is None:
            self.violations.append(FieldViolation(field=field, description=f"one of {', '.join(PROCESSORS)}"))
            return ""
        return name

    def raise_if_any(self) -> None:
        """Raise ``RpcError`` (INVALID_ARGUMENT naming every bad field) if anything was bad."""
        if self.violations:
            raise RpcError(invalid_argument(self.violations))


def parse_tenant_id(value: str, field: str = "tenant_id") -> uuid.UUID:
    """The tenant id as a UUID, or INVALID_ARGUMENT naming ``field``."""
    checks = FieldChecks()
    tenant_id = checks.tenant_id(value, field)
    checks.raise_if_any()
    return tenant_id


def parse_channel(value: int, field: str = "channel") -> str:
    """A concrete channel name, or INVALID_ARGUMENT naming ``field``."""
    checks = FieldChecks()
    channel = checks.channel(value, field)
    checks.raise_if_any()
    return channel


def parse_processor(value: str, field: str = "processor") -> str:
    """A processor name (``stripe``, ``adyen``), or INVALID_ARGUMENT naming ``field``."""
    checks = FieldChecks()
    processor = checks.processor(value, field)
    checks.raise_if_any()
    return processor


def validate_limits(
    limits: tenants_pb2.TenantLimits, fields: Iterable[str], prefix: str
) -> list[FieldViolation]:
    """Each named limit must be within 0..its maximum."""
    violations = []
    for name in fields:
        value = getattr(limits, name)
        if not 0 <= value <= LIMIT_MAXIMA[name]:
            violations.append(
                FieldViolation(field=f"{prefix}.{name}", description=f"0 (default) to {LIMIT_MAXIMA[name]}")
            )
    return violations


def validate_display_name(value: str, field: str) -> list[FieldViolation]:
    """At most 200 characters, no control characters."""
    if len(value) > DISPLAY_NAME_MAX_CHARS or any(ord(c) < 32 for c in value):
        return [
            FieldViolation(field=field, description=f"at most {DISPLAY_NAME_MAX_CHARS} printable characters")
        ]
    return []


class TenantAdminService(tenants_pb2_grpc.TenantAdminServiceServicer):
    """Implements ``switchboard.tenants.v1.TenantAdminService``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        admin_token: str | None,
        key_ring: MasterKeyRing | None,
        *,
        idempotency_retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
    ) -> None:
        self._pool = pool
        self._admin_token = admin_token.encode() if admin_token else None
        self._once = AdminIdempotency(pool, key_ring, retention_s=idempotency_retention_s)

    def _authorize(self, context: Context) -> None:
        if self._admin_token is None:
            raise RpcError(unauthenticated("the admin API is disabled: SWITCHBOARD_ADMIN_TOKEN is not set"))
        token = bearer_token(context.invocation_metadata())
        if token is None or not hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), self._admin_token
        ):
            raise RpcError(unauthenticated("the admin API needs the operator token"))

    async def _call(self, context: Context, work: Callable[[], Awaitable[T]]) -> T:
        async def guarded() -> T:
            self._authorize(context)
            async with database_errors_as_unavailable():
                return await work()

        return await answer(context, guarded)

    async def _tenant_or_404(self, conn: Any, value: str) -> store.Tenant:
        tenant = await store.get_tenant(conn, parse_tenant_id(value))
        if tenant is None:
            raise RpcError(not_found("tenant", value))
        return tenant

    async def CreateTenant(
        self, request: tenants_pb2.CreateTenantRequest, context: Context
    ) -> tenants_pb2.CreateTenantResponse:
        async def work() -> tenants_pb2.CreateTenantResponse:
            checks = FieldChecks(request.request_id)
            if not store.TENANT_NAME_RE.fullmatch(request.name):
                checks.violations.append(FieldViolation(field="name", description=store.TENANT_NAME_RULE))
            checks.violations += validate_display_name(request.display_name, "display_name")
            checks.violations += validate_limits(request.limits, LIMIT_MAXIMA, "limits")
            checks.raise_if_any()
            limits = store.TenantLimits(**{n: getattr(request.limits, n) for n in LIMIT_MAXIMA})

            async def write(conn: Connection) -> tenants_pb2.CreateTenantResponse:
                try:
                    tenant = await store.create_tenant(conn, request.name, request.display_name, limits)
                except store.TenantExists as exc:
                    raise RpcError(already_exists("tenant", request.name, str(exc))) from None
                return tenants_pb2.CreateTenantResponse(tenant=tenant_message(tenant))

            return await self._once.run(request, tenants_pb2.CreateTenantResponse, write)

        return await self._call(context, work)

    async def GetTenant(
        self, request: tenants_pb2.GetTenantRequest, context: Context
    ) -> tenants_pb2.GetTenantResponse:
        async def work() -> tenants_pb2.GetTenantResponse:
            return tenants_pb2.GetTenantResponse(
                tenant=tenant_message(await self._tenant_or_404(self._pool, request.tenant_id))
            )

        return await self._call(context, work)

    async def ListTenants(
        self, request: tenants_pb2.ListTenantsRequest, context: Context
    ) -> tenants_pb2.ListTenantsResponse:
        async def work() -> tenants_pb2.ListTenantsResponse:
            if not 0 <= request.page_size <= PAGE_SIZE_MAX:
                raise _invalid("page_size", f"0 (default {PAGE_SIZE_DEFAULT}) to {PAGE_SIZE_MAX}")
            after = None
            if request.page_token:
                try:
                    after = store.decode_page_token(request.page_token)
                except ValueError as exc:
                    raise _invalid("page_token", str(exc)) from None
            tenants, cursor = await store.list_tenants(
                self._pool, request.page_size or PAGE_SIZE_DEFAULT, after
            )
            return tenants_pb2.ListTenantsResponse(
                tenants=[tenant_message(t) for t in tenants],
                next_page_token=store.encode_page_token(*cursor) if cursor else "",
            )

        return await self._call(context, work)

    async def UpdateTenant(
        self, request: tenants_pb2.UpdateTenantRequest, context: Context
    ) -> tenants_pb2.UpdateTenantResponse:
        async def work() -> tenants_pb2.UpdateTenantResponse:
            checks = FieldChecks(request.request_id)
            tenant_id = checks.tenant_id(request.tenant.tenant_id, "tenant.tenant_id")
            paths = list(request.update_mask.paths) or ["display_name", "limits"]
            display_name: str | None = None
            limit_names: list[str] = []
            violations = checks.violations
            for path in paths:
                if path == "display_name":
                    display_name = request.tenant.display_name
                    violations += validate_display_name(display_name, "tenant.display_name")
                elif path == "limits":
                    limit_names += list(LIMIT_MAXIMA)
                elif path.startswith("limits.") and path.removeprefix("limits.") in LIMIT_MAXIMA:
                    limit_names.append(path.removeprefix("limits."))
                else:
                    violations.append(
                        FieldViolation(
                            field="update_mask",
                            description=f"cannot update {path!r}: use display_name, limits or limits.<name>",
                        )
                    )
            violations += validate_limits(request.tenant.limits, limit_names, "tenant.limits")
            checks.raise_if_any()
            limits = {name: getattr(request.tenant.limits, name) for name in limit_names}

            async def write(conn: Connection) -> tenants_pb2.UpdateTenantResponse:
                tenant = await store.update_tenant(conn, tenant_id, display_name=display_name, limits=limits)
                if tenant is None:
                    raise RpcError(not_found("tenant", request.tenant.tenant_id))
                return tenants_pb2.UpdateTenantResponse(tenant=tenant_message(tenant))

            return await self._once.run(request, tenants_pb2.UpdateTenantResponse, write)

        return await self._call(context, work)

    async def _set_disabled(
        self,
        request: tenants_pb2.DisableTenantRequest | tenants_pb2.EnableTenantRequest,
        response_type: type[R],
        respond: Callable[[tenants_pb2.Tenant], R],
    ) -> R:
        checks = FieldChecks(request.request_id)
        tenant_id = checks.tenant_id(request.tenant_id)
        checks.raise_if_any()
        disabled = isinstance(request, tenants_pb2.DisableTenantRequest)

        async def write(conn: Connection) -> R:
            tenant = await store.set_tenant_disabled(conn, tenant_id, disabled)
            if tenant is None:
                raise RpcError(not_found("tenant", request.tenant_id))
            return respond(tenant_message(tenant))

        return await self._once.run(request, response_type, write)

    async def DisableTenant(
        self, request: tenants_pb2.DisableTenantRequest, context: Context
    ) -> tenants_pb2.DisableTenantResponse:
        async def work() -> tenants_pb2.DisableTenantResponse:
            return await self._set_disabled(
                request,
                tenants_pb2.DisableTenantResponse,
                lambda tenant: tenants_pb2.DisableTenantResponse(tenant=tenant),
            )

        return await self._call(context, work)

    async def EnableTenant(
        self, request: tenants_pb2.EnableTenantRequest, context: Context
    ) -> tenants_pb2.EnableTenantResponse:
        async def work() -> tenants_pb2.EnableTenantResponse:
            return await self._set_disabled(
                request,
                tenants_pb2.EnableTenantResponse,
                lambda tenant: tenants_pb2.EnableTenantResponse(tenant=tenant),
            )

        return await self._call(context, work)

    async def CreateApiKey(
        self, request: tenants_pb2.CreateApiKeyRequest, context: Context
    ) -> tenants_pb2.CreateApiKeyResponse:
        async def work() -> tenants_pb2.CreateApiKeyResponse:
            checks = FieldChecks(request.request_id)
            tenant_id = checks.tenant_id(request.tenant_id)
            checks.raise_if_any()

            async def write(conn: Connection) -> tenants_pb2.CreateApiKeyResponse:
                tenant = await self._tenant_or_404(conn, str(tenant_id))
                key = await store.create_api_key(conn, tenant.id)
                record = await store.get_api_key(conn, tenant.id, key.key_id)
                assert record is not None
                return tenants_pb2.CreateApiKeyResponse(api_key=api_key_message(record), secret=key.token)

            return await self._once.run(
                request,
                tenants_pb2.CreateApiKeyResponse,
                write,
                # Only a hash of the key is ever stored: a replay shows the key without its secret.
                stored_form=lambda r: tenants_pb2.CreateApiKeyResponse(
                    api_key=r.api_key, secret_withheld=True
                ),
            )

        return await self._call(context, work)

    async def ListApiKeys(
        self, request: tenants_pb2.ListApiKeysRequest, context: Context
    ) -> tenants_pb2.ListApiKeysResponse:
        async def work() -> tenants_pb2.ListApiKeysResponse:
            tenant = await self._tenant_or_404(self._pool, request.tenant_id)
            keys = await store.list_api_keys(self._pool, tenant.id)
            return tenants_pb2.ListApiKeysResponse(api_keys=[api_key_message(k) for k in keys])

        return await self._call(context, work)

    async def RevokeApiKey(
        self, request: tenants_pb2.RevokeApiKeyRequest, context: Context
    ) -> tenants_pb2.RevokeApiKeyResponse:
        async def work() -> tenants_pb2.RevokeApiKeyResponse:
            checks = FieldChecks(request.request_id)
            tenant_id = checks.tenant_id(request.tenant_id)
            checks.raise_if_any()

            async def write(conn: Connection) -> tenants_pb2.RevokeApiKeyResponse:
                record = await store.revoke_api_key(conn, tenant_id, request.key_id)
                if record is None:
                    raise RpcError(not_found("api key", request.key_id))
                return tenants_pb2.RevokeApiKeyResponse(api_key=api_key_message(record))

            return await self._once.run(request, tenants_pb2.RevokeApiKeyResponse, write)

        return await self._call(context, work)

    async def SetProviderConfig(
        self, request: tenants_pb2.SetProviderConfigRequest, context: Context
    ) -> tenants_pb2.SetProviderConfigResponse:
        async def work() -> tenants_pb2.SetProviderConfigResponse:
            checks = FieldChecks(request.request_id)
            tenant_id = checks.tenant_id(request.tenant_id)
            channel = checks.channel(request.channel)
            try:
                split = split_provider_config(channel or None, request.config)
            except RequestInvalid as exc:
                checks.violations += exc.violations
            checks.raise_if_any()
            ring = self._once.require_key_ring()
            secrets_json = json.dumps(split.secrets, sort_keys=True).encode("utf-8")
            sealed = ring.seal(secrets_json, secrets_associated_data(tenant_id, channel))

            async def write(conn: Connection) -> tenants_pb2.SetProviderConfigResponse:
                await self._tenant_or_404(conn, request.tenant_id)
                stored = await store.upsert_provider_config(
                    conn,
                    store.StoredProviderConfig(
                        tenant_id=tenant_id,
                        channel=channel,
                        provider=split.provider,
                        settings=split.settings,
                        secret_fields=split.secret_fields,
                        key_id=sealed.key_id,
                        nonce=sealed.nonce,
                        ciphertext=sealed.ciphertext,
                        secret_fingerprint=ring.fingerprint(secrets_json),
                        updated_at=None,  # type: ignore[arg-type]
                    ),
                )
                return tenants_pb2.SetProviderConfigResponse(config=provider_config_view(stored))

            return await self._once.run(request, tenants_pb2.SetProviderConfigResponse, write, keyed=True)

        return await self._call(context, work)

    async def GetProviderConfig(
        self, request: tenants_pb2.GetProviderConfigRequest, context: Context
    ) -> tenants_pb2.GetProviderConfigResponse:
        async def work() -> tenants_pb2.GetProviderConfigResponse:
            tenant_id = parse_tenant_id(request.tenant_id)
            channel = parse_channel(request.channel)
            config = await store.get_provider_config(self._pool, tenant_id, channel)
            if config is None:
                raise RpcError(not_found("provider config", f"{request.tenant_id}/{channel}"))
            return tenants_pb2.GetProviderConfigResponse(config=provider_config_view(config))

        return await self._call(context, work)

    async def ListProviderConfigs(
        self, request: tenants_pb2.ListProviderConfigsRequest, context: Context
    ) -> tenants_pb2.ListProviderConfigsResponse:
        async def work() -> tenants_pb2.ListProviderConfigsResponse:
            tenant = await self._tenant_or_404(self._pool, request.tenant_id)
            configs = await store.list_provider_configs(self._pool, tenant.id)
            return tenants_pb2.ListProviderConfigsResponse(configs=[provider_config_view(c) for c in configs])

        return await self._call(context, work)

    async def DeleteProviderConfig(
        self, request: tenants_pb2.DeleteProviderConfigRequest, context: Context
    ) -> tenants_pb2.DeleteProviderConfigResponse:
        async def work() -> tenants_pb2.DeleteProviderConfigResponse:
            checks = FieldChecks(request.request_id)
            tenant_id = checks.tenant_id(request.tenant_id)
            channel = checks.channel(request.channel)
            checks.raise_if_any()

            async def write(conn: Connection) -> tenants_pb2.DeleteProviderConfigResponse:
                if not await store.delete_provider_config(conn, tenant_id, channel):
                    raise RpcError(not_found("provider config", f"{request.tenant_id}/{channel}"))
                return tenants_pb2.DeleteProviderConfigResponse()

            return await self._once.run(request, tenants_pb2.DeleteProviderConfigResponse, write)

        return await self._call(context, work)

    async def SetProcessorConfig(
        self, request: tenants_pb2.SetProcessorConfigRequest, context: Context
    ) -> tenants_pb2.SetProcessorConfigResponse:
        async def work() -> tenants_pb2.SetProcessorConfigResponse:
            checks = FieldChecks(request.request_id)
            tenant_id = checks.tenant_id(request.tenant_id)
            try:
                split = split_processor_config(request.config)
            except RequestInvalid as exc:
                checks.violations += exc.violations
            checks.raise_if_any()
            ring = self._once.require_key_ring()
            plaintext = split.secrets.to_json()
            sealed = ring.seal(plaintext, processor_secrets_associated_data(tenant_id, split.processor))

            async def write(conn: Connection) -> tenants_pb2.SetProcessorConfigResponse:
                await self._tenant_or_404(conn, request.tenant_id)
                stored = await processor_store.upsert_processor_config(
                    conn,
                    processor_store.StoredProcessorConfig(
                        tenant_id=tenant_id,
                        processor=split.processor,
                        priority=split.priority,
                        settings=split.settings,
                        secret_fields=split.secret_fields,
                        key_id=sealed.key_id,
                        nonce=sealed.nonce,
                        ciphertext=sealed.ciphertext,
                        secret_fingerprint=ring.fingerprint(plaintext),
                        webhook_secret_fingerprints=[
                            ring.fingerprint(secret.encode("utf-8"))
                            for secret in split.secrets.webhook_secrets
                        ],
                    ),
                )
                return tenants_pb2.SetProcessorConfigResponse(config=processor_config_view(stored))

            return await self._once.run(request, tenants_pb2.SetProcessorConfigResponse, write, keyed=True)

        return await self._call(context, work)

    async def GetProcessorConfig(
        self, request: tenants_pb2.GetProcessorConfigRequest, context: Context
    ) -> tenants_pb2.GetProcessorConfigResponse:
        async def work() -> tenants_pb2.GetProcessorConfigResponse:
            tenant_id = parse_tenant_id(request.tenant_id)
            processor = parse_processor(request.processor)
            config = await processor_store.get_processor_config(self._pool, tenant_id, processor)
            if config is None:
                raise RpcError(not_found("processor config", f"{request.tenant_id}/{processor}"))
            return tenants_pb2.GetProcessorConfigResponse(config=processor_config_view(config))

        return await self._call(context, work)

    async def ListProcessorConfigs(
        self, request: tenants_pb2.ListProcessorConfigsRequest, context: Context
    ) -> tenants_pb2.ListProcessorConfigsResponse:
        async def work() -> tenants_pb2.ListProcessorConfigsResponse:
            tenant = await self._tenant_or_404(self._pool, request.tenant_id)
            configs = await processor_store.list_processor_configs(self._pool, tenant.id)
            return tenants_pb2.ListProcessorConfigsResponse(
                configs=[processor_config_view(c) for c in configs]
            )

        return await self._call(context, work)

    async def DeleteProcessorConfig(
        self, request: tenants_pb2.DeleteProcessorConfigRequest, context: Context
    ) -> tenants_pb2.DeleteProcessorConfigResponse:
        async def work() -> tenants_pb2.DeleteProcessorConfigResponse:
            checks = FieldChecks(request.request_id)
            tenant_id = checks.tenant_id(request.tenant_id)
            processor = checks.processor(request.processor)
            checks.raise_if_any()

            async def write(conn: Connection) -> tenants_pb2.DeleteProcessorConfigResponse:
                if not await processor_store.delete_processor_config(conn, tenant_id, processor):
                    raise RpcError(not_found("processor config", f"{request.tenant_id}/{processor}"))
                return tenants_pb2.DeleteProcessorConfigResponse()

            return await self._once.run(request, tenants_pb2.DeleteProcessorConfigResponse, write)

        return await self._call(context, work)

    async def SetStatusCallback(
        self, request: tenants_pb2.SetStatusCallbackRequest, context: Context
    ) -> tenants_pb2.SetStatusCallbackResponse:
        async def work() -> tenants_pb2.SetStatusCallbackResponse:
            checks = FieldChecks(request.request_id)
            tenant_id = checks.tenant_id(request.tenant_id)
            try:
                callbacks.validate_callback_url(request.url)
            except callbacks.CallbackUrlError as exc:
                checks.violations.append(FieldViolation(field="url", description=str(exc)))
            checks.raise_if_any()

            async def write(conn: Connection) -> tenants_pb2.SetStatusCallbackResponse:
                try:
                    secret = await callbacks.set_tenant_callback(
                        conn,
                        tenant_id,
                        request.url,
                        previous_secret_valid_s=float(request.previous_secret_valid_seconds),
                    )
                except LookupError:
                    raise RpcError(not_found("tenant", request.tenant_id)) from None
                stored = await callbacks.get_tenant_callback(conn, tenant_id)
                assert stored is not None
                return tenants_pb2.SetStatusCallbackResponse(
                    callback=status_callback_message(stored), signing_secret=secret.hex()
                )

            return await self._once.run(
                request,
                tenants_pb2.SetStatusCallbackResponse,
                write,
                # The idempotency record keeps no secret: a replay shows the endpoint without it.
                stored_form=lambda r: tenants_pb2.SetStatusCallbackResponse(
                    callback=r.callback, signing_secret_withheld=True
                ),
            )

        return await self._call(context, work)

    async def GetStatusCallback(
        self, request: tenants_pb2.GetStatusCallbackRequest, context: Context
    ) -> tenants_pb2.GetStatusCallbackResponse:
        async def work() -> tenants_pb2.GetStatusCallbackResponse:
            stored = await callbacks.get_tenant_callback(self._pool, parse_tenant_id(request.tenant_id))
            if stored is None:
                raise RpcError(not_found("status callback", request.tenant_id))
            return tenants_pb2.GetStatusCallbackResponse(callback=status_callback_message(stored))

        return await self._call(context, work)

    async def DeleteStatusCallback(
        self, request: tenants_pb2.DeleteStatusCallbackRequest, context: Context
    ) -> tenants_pb2.DeleteStatusCallbackResponse:
        async def work() -> tenants_pb2.DeleteStatusCallbackResponse:
            checks = FieldChecks(request.request_id)
            tenant_id = checks.tenant_id(request.tenant_id)
            checks.raise_if_any()

            async def write(conn: Connection) -> tenants_pb2.DeleteStatusCallbackResponse:
                if not await callbacks.delete_tenant_callback(conn, tenant_id):
                    raise RpcError(not_found("status callback", request.tenant_id))
                return tenants_pb2.DeleteStatusCallbackResponse()

            return await self._once.run(request, tenants_pb2.DeleteStatusCallbackResponse, write)

        return await self._call(context, work)
