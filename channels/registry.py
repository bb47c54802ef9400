"""Which provider handles a tenant's channel: the tenant's own, built on demand.

:class:`TenantProviders` answers ``provider_for(tenant_id, channel)`` from the
provider cache (tenants/provider_cache.py). On a miss it loads the tenant and
its configuration for the channel from PostgreSQL, opens the sealed secrets
with the master key ring and builds the provider client. A disabled tenant,
or a channel without configuration (unless the process-wide default
providers are enabled), is a permanent failure with a clear reason.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
from cachetools import TTLCache

from channels.brevo import DEFAULT_BASE_URL as BREVO_BASE_URL
from channels.brevo import BrevoProvider
from channels.delivery import RetryPolicy
from channels.fcm import FcmProvider, InvalidTokenStore
from channels.invalid_tokens import PostgresInvalidTokenStore
from channels.provider import PermanentDeliveryError, Provider
from channels.sandbox import SandboxProvider
from channels.smtp import SmtpProvider
from channels.twilio import DEFAULT_BASE_URL as TWILIO_BASE_URL
from channels.twilio import TwilioProvider
from channels.two_factor import DEFAULT_BASE_URL as TWO_FACTOR_BASE_URL
from channels.two_factor import TwoFactorProvider
from switchboard.settings import Settings
from tenants import store
from tenants.provider_cache import ProviderCache
from tenants.sealing import MasterKeyRing, SealedSecret, secrets_associated_data


class _Shared:
    """A provider shared by every tenant: closing one tenant's entry must not close it."""

    def __init__(self, inner: Provider) -> None:
        self._inner = inner

    @property
    def name(self) -> str:
        return self._inner.name

    async def send(self, event: Any) -> Any:
        return await self._inner.send(event)

    async def close(self) -> None:
        """Nothing: the shared provider lives as long as the process."""


def default_providers(settings: Settings) -> dict[str, Provider]:
    """The process-wide defaults: SMTP from settings for email, the sandbox for SMS and push."""
    sandbox = settings.resolved_sandbox_dir()
    return {
        "email": SmtpProvider(
            settings.smtp_host,
            settings.smtp_port,
            settings.smtp_from,
            timeout_s=settings.worker_provider_timeout_s,
        ),
        "sms": SandboxProvider(sandbox, "sms"),
        "push": SandboxProvider(sandbox, "push"),
    }


def build_provider(
    config: store.StoredProviderConfig,
    secrets: dict[str, str],
    settings: Settings,
    invalid_tokens: InvalidTokenStore | None = None,
) -> Provider:
    """The provider client for one stored configuration and its opened secrets.

    Raises ``PermanentDeliveryError`` for a provider this build cannot speak.
    """
    s = config.settings
    timeout_s = settings.worker_provider_timeout_s
    if config.provider == "brevo":
        return BrevoProvider(
            secrets["api_key"],
            s["sender_email"],
            s.get("sender_name", ""),
            base_url=s.get("base_url") or BREVO_BASE_URL,
            timeout_s=timeout_s,
        )
    if config.provider == "two_factor":
        return TwoFactorProvider(
            secrets["api_key"],
            s["sender_id"],
            base_url=s.get("base_url") or TWO_FACTOR_BASE_URL,
            timeout_s=timeout_s,
        )
    if config.provider == "twilio":
        return TwilioProvider(
            s["account_sid"],
            secrets["auth_token"],
            from_number=s.get("from_number", ""),
            messaging_service_sid=s.get("messaging_service_sid", ""),
            base_url=s.get("base_url") or TWILIO_BASE_URL,
            status_callback_url=s.get("status_callback_url") or None,
            timeout_s=timeout_s,
        )
    if config.provider == "fcm":
        return FcmProvider(
            config.tenant_id,
            json.loads(secrets["service_account_json"]),
            endpoint_base=s.get("endpoint_base", ""),
            timeout_s=timeout_s,
            invalid_tokens=invalid_tokens,
        )
    if config.provider == "smtp":
        return SmtpProvider(
            s["host"],
            int(s["port"]),
            s["from_address"],
            username=s.get("username") or None,
            password=secrets.get("password") or None,
            start_tls=s.get("tls_mode") == "starttls",
            use_tls=s.get("tls_mode") == "implicit",
            timeout_s=settings.worker_provider_timeout_s,
        )
    raise PermanentDeliveryError(f"provider {config.provider!r} is not supported by this worker")


class TenantProviders:
    """Per-tenant providers through the cache; see the module docstring."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, key_ring: MasterKeyRing | None) -> None:
        self._pool = pool
        self._settings = settings
        self._key_ring = key_ring
        self._defaults = (
            {c: _Shared(p) for c, p in default_providers(settings).items()}
            if settings.default_providers
            else {}
        )
        self._invalid_tokens = PostgresInvalidTokenStore(pool)
        self._limits: TTLCache[uuid.UUID, store.TenantLimits] = TTLCache(maxsize=10_000, ttl=60.0)
        self.cache = ProviderCache(
            self._load,
            max_tenants=settings.provider_cache_max_tenants,
            idle_ttl_s=settings.provider_cache_idle_ttl_s,
        )

    async def _load(self, tenant_id: uuid.UUID, channel: str) -> Provider:
        tenant = await store.get_tenant(self._pool, tenant_id)
        if tenant is None:
            raise PermanentDeliveryError(f"tenant {tenant_id} does not exist")
        if tenant.disabled_at is not None:
            raise PermanentDeliveryError("the tenant is disabled")
        config = await store.get_provider_config(self._pool, tenant_id, channel)
        if config is None:
            if channel in self._defaults:
                return self._defaults[channel]
            raise PermanentDeliveryError(f"the tenant has no {channel} provider configured")
        if self._key_ring is None:
            raise PermanentDeliveryError(
                "SWITCHBOARD_MASTER_KEY is not set: provider secrets cannot be opened"
            )
        plaintext = self._key_ring.open(
            SealedSecret(config.key_id, config.nonce, config.ciphertext),
            secrets_associated_data(tenant_id, channel),
        )
        return build_provider(config, json.loads(plaintext), self._settings, self._invalid_tokens)

    async def provider_for(self, tenant_id: uuid.UUID, channel: str) -> Provider:
        """The tenant's provider for ``channel``; raises ``PermanentDeliveryError`` as described above."""
        return await self.cache.get(tenant_id, channel)

    async def retry_policy(self, tenant_id: uuid.UUID) -> RetryPolicy:
        """The tenant's retry policy: its limits, or the worker defaults where they are 0.

        Limits are cached for 60 s and dropped on every tenant change notification.
        """
        limits = self._limits.get(tenant_id)
        if limits is None:
            tenant = await store.get_tenant(self._pool, tenant_id)
            limits = tenant.limits if tenant is not None else store.TenantLimits()
            self._limits[tenant_id] = limits
        s = self._settings
        return RetryPolicy(
            max_attempts=limits.max_delivery_attempts or s.worker_max_attempts,
            max_age_s=float(limits.max_delivery_age_seconds or s.worker_max_age_s),
            base_s=s.worker_retry_base_ms / 1000,
            cap_s=s.worker_retry_max_ms / 1000,
        )

    def invalidate(self, tenant_id: uuid.UUID) -> None:
        """Forget (and release) the tenant's providers and limits; the next use reloads them."""
        self._limits.pop(tenant_id, None)
        self.cache.invalidate(tenant_id)

    def invalidate_all(self) -> None:
        """Forget every tenant's providers and limits."""
        self._limits.clear()
        self.cache.invalidate_all()

    async def close(self) -> None:
        """Release every cached provider."""
        await self.cache.close()
