"""On-demand cache of per-tenant provider clients.

The first ``get(tenant_id, channel)`` builds the provider with the loader (which
loads and decrypts the tenant's configuration from PostgreSQL and builds the
client); later calls return the same object. At most ``max_tenants`` tenants are
kept; a tenant unused for ``idle_ttl_s`` seconds is dropped, and so is the least
recently used tenant when a new one does not fit. Whatever leaves the cache
(size eviction, idle expiry, ``invalidate``, ``invalidate_all``, ``close``) is
released: its providers' ``close()`` runs in a background task, so the caller's
event loop is never held up by a slow close (``drain_releases`` waits for them).

One cache entry per tenant holds that tenant's providers by channel; each
``(tenant, channel)`` is loaded on its own (concurrent misses for it share one
load). The storage, idle expiry, release, single load and counters are
:class:`tenants.tenant_cache.TenantCache`'s (shared with the payment processor
cache).

Everything here runs on one event loop thread; ``invalidate`` is synchronous so a
PostgreSQL LISTEN/NOTIFY callback (asyncpg runs those on the loop) can call it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import structlog

from channels.provider import Provider
from tenants.tenant_cache import CacheClosed, CacheStats, TenantCache

log = structlog.get_logger(__name__)

__all__ = ["RELEASE_TIMEOUT_S", "CacheClosed", "CacheStats", "Loader", "ProviderCache"]

Loader = Callable[[uuid.UUID, str], Awaitable[Provider]]
"""Builds the provider for ``(tenant_id, channel)``; may raise (nothing is cached then)."""

RELEASE_TIMEOUT_S = 30.0
"""Longest wait for one provider's ``close()`` before it is abandoned (logged)."""


@dataclass
class _TenantProviders:
    """The cached value for one tenant: its built providers by channel name (what one load
    returns: the one provider it built)."""

    providers: dict[str, Provider] = field(default_factory=dict)


class ProviderCache(TenantCache[tuple[uuid.UUID, str], _TenantProviders, Provider]):
    """Built provider objects per tenant and channel, loaded on first use.

    ``loader(tenant_id, channel)`` builds a provider (an object satisfying
    :class:`channels.provider.Provider`). ``max_tenants`` (>= 1) bounds the number of
    tenants held; ``idle_ttl_s`` (seconds, > 0) is how long a tenant may go unused
    before its providers are released; ``timer`` returns seconds on a monotonic
    clock (injectable for tests).

    Counters (:attr:`stats`): every ``get`` is one hit or one miss; see
    :class:`tenants.tenant_cache.CacheStats`.

    Must be used from a single event loop thread. A provider returned by ``get``
    may be released (closed) later by eviction or invalidation while a caller is
    still using it; callers should treat a failure from a closed client as
    retryable and call ``get`` again.
    """

    def __init__(
        self,
        loader: Loader,
        *,
        max_tenants: int = 200,
        idle_ttl_s: float = 3600.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            kind="provider",
            release=_close_provider,
            max_tenants=max_tenants,
            idle_ttl_s=idle_ttl_s,
            timer=timer,
        )
        self._loader = loader

    async def get(self, tenant_id: uuid.UUID, channel: str) -> Provider:
        """The provider for ``tenant_id``'s ``channel``, built by the loader on a miss.

        A hit pushes the tenant's idle expiry forward and makes it the most recently
        used. Concurrent misses for the same ``(tenant_id, channel)`` share one loader
        call. Raises whatever the loader raised (nothing is cached then; the next
        ``get`` calls the loader again) and :class:`CacheClosed` after ``close()``.
        """
        entry = self._cached(tenant_id)
        if entry is not None:
            provider = entry.providers.get(channel)
            if provider is not None:
                self._stats.hits += 1
                return provider
        loaded = await self._load(tenant_id, (tenant_id, channel), f"provider-load-{channel}")
        return loaded.providers[channel]

    # -- the TenantCache hooks ---------------------------------------------------------------------

    async def _build(self, key: tuple[uuid.UUID, str]) -> _TenantProviders:
        tenant_id, channel = key
        return _TenantProviders({channel: await self._loader(tenant_id, channel)})

    def _merge(
        self, current: _TenantProviders | None, loaded: _TenantProviders
    ) -> tuple[_TenantProviders, list[Provider]]:
        entry = current if current is not None else _TenantProviders()
        replaced = [
            old
            for channel, provider in loaded.providers.items()
            if (old := entry.providers.get(channel)) is not None and old is not provider
        ]
        entry.providers.update(loaded.providers)
        return entry, replaced

    def _contents(self, entry: _TenantProviders) -> Iterable[Provider]:
        return entry.providers.values()

    def _describe(self, entry: _TenantProviders) -> dict[str, object]:
        return {"channels": sorted(entry.providers)}


async def _close_provider(provider: Provider) -> None:
    try:
        async with asyncio.timeout(RELEASE_TIMEOUT_S):
            await provider.close()
    except Exception:
        log.warning("closing a released provider failed", provider=_provider_name(provider), exc_info=True)


def _provider_name(provider: Provider) -> str:
    try:
        return provider.name
    except Exception:
        return type(provider).__name__
