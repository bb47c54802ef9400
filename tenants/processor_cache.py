"""On-demand cache of per-tenant payment processor clients (Stripe, Adyen) and webhook secrets.

The first use of a tenant's processors (:meth:`ProcessorCache.get_processor`,
:meth:`~ProcessorCache.processors_for` or :meth:`~ProcessorCache.webhook_secrets`)
runs the loader once for that tenant: :class:`PostgresProcessorLoader` reads
every ``processor_configs`` row of the tenant, opens each sealed secret with
the master key ring (associated data ``"<tenant id>/processor:<name>"``) and
builds the connector (:class:`payments.stripe.StripeProcessor`,
:class:`payments.adyen.AdyenProcessor`). Concurrent first uses of one tenant
share that single load (one in-flight task per tenant, awaited through
``asyncio.shield`` so a cancelled caller does not cancel it for the others);
a loader failure is raised to every waiting caller and nothing is cached.

Storage, idle expiry, release and the single load are
:class:`tenants.tenant_cache.TenantCache`'s, the same machinery, policy and
settings as the notification provider cache (tenants/provider_cache.py): at
most ``provider_cache_max_tenants`` tenants, a tenant unused for
``provider_cache_idle_ttl_s`` seconds is dropped (every hit re-sets the item,
so the TTL measures idle time). Whatever leaves the cache (size eviction,
idle expiry, :meth:`~ProcessorCache.invalidate`,
:meth:`~ProcessorCache.invalidate_all`, :meth:`~ProcessorCache.close`) is
released: each processor's ``aclose()`` runs in a background task (at most
``RELEASE_TIMEOUT_S``), so the caller's event loop is not held up.

A configuration change reaches every process through the tenant change
notification (``NOTIFY switchboard_tenant_changes``, sent by
tenants/processor_store.py at commit): wire
:class:`tenants.invalidation.TenantChangeListener` to :meth:`~ProcessorCache.invalidate`
and :meth:`~ProcessorCache.invalidate_all`. A load in flight when its tenant
is invalidated is redone, so nothing built from the old configuration is cached.

One processor whose configuration cannot be used (its secret does not open,
its connector refuses the settings) does not make the tenant's other
processors unavailable: it is left out of :meth:`~ProcessorCache.processors_for`
and :meth:`~ProcessorCache.get_processor` raises
:class:`ProcessorConfigUnusable` for it (logged once per load, without secrets).

The cache does not check whether the tenant is disabled: payments already
accepted must still be captured, refunded, looked up and resolved by webhooks.
Refusing new payments of a disabled tenant is the payment API's job.

Secrets (API keys, webhook secrets) are never logged, put in exception
messages or shown in reprs. Everything runs on one event loop thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import asyncpg
import structlog

from payments.adyen import DEFAULT_BASE_URL as ADYEN_BASE_URL
from payments.adyen import DEFAULT_RECURRING_MODEL, DEFAULT_RETURN_URL, AdyenProcessor
from payments.processor import PaymentProcessor, PermanentProcessorError, ProcessorError
from payments.stripe import DEFAULT_BASE_URL as STRIPE_BASE_URL
from payments.stripe import StripeProcessor
from switchboard.settings import Settings
from tenants.processor_config import ProcessorSecrets
from tenants.processor_store import StoredProcessorConfig, list_processor_configs
from tenants.sealing import MasterKeyError, MasterKeyRing, SealedSecret, processor_secrets_associated_data
from tenants.tenant_cache import CacheClosed, CacheStats, TenantCache

log = structlog.get_logger(__name__)

RELEASE_TIMEOUT_S = 30.0
"""Longest wait for one processor's ``aclose()`` before it is abandoned (logged)."""

__all__ = [
    "RELEASE_TIMEOUT_S",
    "CacheClosed",
    "CacheStats",
    "LoadedProcessor",
    "PostgresProcessorLoader",
    "ProcessorCache",
    "ProcessorConfigUnusable",
    "ProcessorHandle",
    "ProcessorNotConfigured",
    "TenantProcessors",
    "build_processor",
    "processor_cache_for",
]


class ProcessorNotConfigured(PermanentProcessorError):
    """The tenant has no configuration for this processor (code ``processor_not_configured``).

    Nothing was sent anywhere: a payment may fail over to another processor.
    """

    def __init__(self, tenant_id: uuid.UUID, name: str) -> None:
        super().__init__(
            f"tenant {tenant_id} has no {name!r} payment processor configured",
            code="processor_not_configured",
        )
        self.tenant_id = tenant_id
        self.processor = name


class ProcessorConfigUnusable(PermanentProcessorError):
    """The tenant's configuration of this processor exists but cannot be used (code
    ``processor_config_unusable``): its secret does not open with the master keys, or the
    connector refuses its settings. The message says why and never contains a secret."""

    def __init__(self, tenant_id: uuid.UUID, name: str, reason: str) -> None:
        super().__init__(
            f"the {name!r} payment processor configuration of tenant {tenant_id} cannot be used: {reason}",
            code="processor_config_unusable",
        )
        self.tenant_id = tenant_id
        self.processor = name


@dataclass(frozen=True)
class ProcessorHandle:
    """One of a tenant's processors, as :meth:`ProcessorCache.processors_for` lists them.

    ``name``: ``"stripe"`` or ``"adyen"``. ``priority``: 0-1000, lower is tried
    first. ``processor``: the connector (its repr hides the credentials).
    """

    name: str
    priority: int
    processor: PaymentProcessor


@dataclass(frozen=True)
class LoadedProcessor:
    """A built processor with its configuration's priority and webhook verification secrets.

    ``webhook_secrets``: Stripe ``whsec_...`` endpoint secrets or Adyen hex HMAC
    keys, in the configured order (possibly empty); left out of the repr.
    """

    name: str
    priority: int
    processor: PaymentProcessor
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class TenantProcessors:
    """What the loader returns for one tenant (the cached value).

    ``processors``: the usable processors by name. ``unusable``: processor
    names whose configuration exists but could not be used, with the reason
    (no secrets in it).
    """

    processors: Mapping[str, LoadedProcessor] = field(default_factory=dict)
    unusable: Mapping[str, str] = field(default_factory=dict)


ProcessorLoader = Callable[[uuid.UUID], Awaitable[TenantProcessors]]
"""Loads and builds every processor of a tenant; may raise (nothing is cached then)."""

ProcessorBuilder = Callable[[StoredProcessorConfig, ProcessorSecrets], PaymentProcessor]
"""Builds the connector of one stored configuration and its opened secrets."""


def build_processor(config: StoredProcessorConfig, secrets: ProcessorSecrets) -> PaymentProcessor:
    """The connector for one stored configuration and its opened secrets.

    Stripe: ``StripeProcessor(secret_key, base_url=settings.base_url or
    https://api.stripe.com)``. Adyen: ``AdyenProcessor(api_key,
    merchant_account, base_url=... or the Checkout v71 test endpoint,
    return_url=..., recurring_processing_model=...)``. Raises
    :class:`PermanentProcessorError` (code ``processor_unsupported``) for a
    processor this build cannot speak, and ``ValueError`` (never quoting a
    secret) when the connector refuses the settings.
    """
    s = config.settings
    if config.processor == "stripe":
        return StripeProcessor(secrets.api_key, base_url=s.get("base_url") or STRIPE_BASE_URL)
    if config.processor == "adyen":
        return AdyenProcessor(
            secrets.api_key,
            s.get("merchant_account", ""),
            base_url=s.get("base_url") or ADYEN_BASE_URL,
            return_url=s.get("return_url") or DEFAULT_RETURN_URL,
            recurring_processing_model=s.get("recurring_processing_model") or DEFAULT_RECURRING_MODEL,
        )
    raise PermanentProcessorError(
        f"payment processor {config.processor!r} is not supported by this build", code="processor_unsupported"
    )


def _safe_reason(exc: Exception) -> str:
    """A reason for a failed build that cannot carry a secret.

    Messages of our own errors and of the connectors' ``ValueError`` are
    written never to quote secrets; anything else is reduced to its type.
    """
    if isinstance(exc, MasterKeyError | ProcessorError | ValueError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


class PostgresProcessorLoader:
    """Loads a tenant's processors from ``processor_configs`` (a :data:`ProcessorLoader`).

    ``key_ring`` opens the sealed secrets (``None``: no master key configured,
    every configured processor is unusable). ``build`` makes the connector
    (default :func:`build_processor`; tests wrap it). Raises asyncpg errors
    when PostgreSQL fails (nothing is cached then).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        key_ring: MasterKeyRing | None,
        *,
        build: ProcessorBuilder = build_processor,
    ) -> None:
        self._pool = pool
        self._key_ring = key_ring
        self._build = build

    async def __call__(self, tenant_id: uuid.UUID) -> TenantProcessors:
        """Every processor of ``tenant_id``, built; unusable ones listed with the reason."""
        configs = await list_processor_configs(self._pool, tenant_id)
        processors: dict[str, LoadedProcessor] = {}
        unusable: dict[str, str] = {}
        for config in configs:
            try:
                loaded = self._load_one(tenant_id, config)
            except Exception as exc:
                reason = _safe_reason(exc)
                unusable[config.processor] = reason
                log.warning(
                    "payment processor configuration unusable",
                    tenant_id=str(tenant_id),
                    processor=config.processor,
                    reason=reason,
                )
                continue
            processors[config.processor] = loaded
        return TenantProcessors(processors=processors, unusable=unusable)

    def _load_one(self, tenant_id: uuid.UUID, config: StoredProcessorConfig) -> LoadedProcessor:
        if self._key_ring is None:
            raise MasterKeyError("SWITCHBOARD_MASTER_KEY is not set: processor secrets cannot be opened")
        plaintext = self._key_ring.open(
            SealedSecret(config.key_id, config.nonce, config.ciphertext),
            processor_secrets_associated_data(tenant_id, config.processor),
        )
        secrets = ProcessorSecrets.from_json(plaintext)
        return LoadedProcessor(
            name=config.processor,
            priority=config.priority,
            processor=self._build(config, secrets),
            webhook_secrets=secrets.webhook_secrets,
        )


class ProcessorCache(TenantCache[uuid.UUID, TenantProcessors, PaymentProcessor]):
    """Built payment processors per tenant, loaded on first use; see the module docstring.

    ``loader(tenant_id)`` returns the tenant's :class:`TenantProcessors`.
    ``max_tenants`` (>= 1) bounds the tenants held; ``idle_ttl_s`` (seconds,
    > 0) is how long a tenant may go unused before its processors are
    released; ``timer`` returns seconds on a monotonic clock (injectable for
    tests). Raises ``ValueError`` for bad limits.

    Counters (:attr:`stats`): every public lookup is one hit or one miss (a
    miss waited for a load, its own or a concurrent caller's); ``loads`` /
    ``load_failures`` count loader calls; ``evictions`` counts tenants dropped
    for size or idle time (not explicit invalidations).

    A processor returned here may be released (``aclose()``) later by
    eviction or invalidation while a caller still uses it; such a caller sees
    a connection error classified retryable by the connector and should look
    the processor up again.
    """

    def __init__(
        self,
        loader: ProcessorLoader,
        *,
        max_tenants: int = 200,
        idle_ttl_s: float = 3600.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            kind="processor",
            release=_close_processor,
            max_tenants=max_tenants,
            idle_ttl_s=idle_ttl_s,
            timer=timer,
        )
        self._loader = loader

    # -- lookups -----------------------------------------------------------------------------

    async def get_processor(self, tenant_id: uuid.UUID, name: str) -> PaymentProcessor:
        """The tenant's ``name`` processor (``"stripe"``, ``"adyen"``), built on first use.

        Raises :class:`ProcessorNotConfigured` if the tenant has no such
        configuration, :class:`ProcessorConfigUnusable` if it cannot be used,
        whatever the loader raised (e.g. asyncpg errors; nothing cached), and
        :class:`CacheClosed` after :meth:`close`.
        """
        return self._loaded(await self._entry(tenant_id), tenant_id, name).processor

    async def processors_for(self, tenant_id: uuid.UUID) -> list[ProcessorHandle]:
        """The tenant's usable processors in failover order: priority ascending, then name.

        Empty if the tenant has none. Raises like :meth:`get_processor`
        (except the two configuration errors).
        """
        entry = await self._entry(tenant_id)
        loaded = sorted(entry.processors.values(), key=lambda p: (p.priority, p.name))
        return [ProcessorHandle(name=p.name, priority=p.priority, processor=p.processor) for p in loaded]

    async def webhook_secrets(self, tenant_id: uuid.UUID, name: str) -> list[str]:
        """The webhook verification secrets of the tenant's ``name`` processor, in configured order.

        Stripe: ``whsec_...`` endpoint secrets (for payments/stripe_signature.py);
        Adyen: hex HMAC keys (for payments/adyen_signature.py). Empty when none
        are configured: the caller must then refuse the webhook. Never log
        them. Raises like :meth:`get_processor`.
        """
        return list(self._loaded(await self._entry(tenant_id), tenant_id, name).webhook_secrets)

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _loaded(entry: TenantProcessors, tenant_id: uuid.UUID, name: str) -> LoadedProcessor:
        loaded = entry.processors.get(name)
        if loaded is not None:
            return loaded
        reason = entry.unusable.get(name)
        if reason is not None:
            raise ProcessorConfigUnusable(tenant_id, name, reason)
        raise ProcessorNotConfigured(tenant_id, name)

    async def _entry(self, tenant_id: uuid.UUID) -> TenantProcessors:
        entry = self._cached(tenant_id)
        if entry is not None:
            self._stats.hits += 1
            return entry
        return await self._load(tenant_id, tenant_id, "processor-load")

    # -- the TenantCache hooks ---------------------------------------------------------------------

    async def _build(self, key: uuid.UUID) -> TenantProcessors:
        return await self._loader(key)

    def _merge(
        self, current: TenantProcessors | None, loaded: TenantProcessors
    ) -> tuple[TenantProcessors, Iterable[PaymentProcessor]]:
        return loaded, (() if current is None else self._contents(current))

    def _contents(self, entry: TenantProcessors) -> Iterable[PaymentProcessor]:
        return (p.processor for p in entry.processors.values())

    def _describe(self, entry: TenantProcessors) -> dict[str, object]:
        return {"processors": sorted(entry.processors)}


def processor_cache_for(
    pool: asyncpg.Pool,
    settings: Settings,
    key_ring: MasterKeyRing | None,
    *,
    build: ProcessorBuilder = build_processor,
) -> ProcessorCache:
    """A :class:`ProcessorCache` over PostgreSQL with the provider cache's size and idle settings.

    ``settings.provider_cache_max_tenants`` tenants at most, released after
    ``settings.provider_cache_idle_ttl_s`` seconds unused.
    """
    return ProcessorCache(
        PostgresProcessorLoader(pool, key_ring, build=build),
        max_tenants=settings.provider_cache_max_tenants,
        idle_ttl_s=settings.provider_cache_idle_ttl_s,
    )


async def _close_processor(processor: PaymentProcessor) -> None:
    try:
        async with asyncio.timeout(RELEASE_TIMEOUT_S):
            await processor.aclose()
    except Exception as exc:
        # The exception text is not logged: a client library's message could quote a header.
        log.warning(
            "closing a released payment processor failed",
            processor=_name(processor),
            error=type(exc).__name__,
        )


def _name(processor: PaymentProcessor) -> str:
    try:
        return str(processor.name)
    except Exception:
        return type(processor).__name__
