"""On-demand cache of per-tenant provider clients.

The first ``get(tenant_id, channel)`` builds the provider with the loader (which
loads and decrypts the tenant's configuration from PostgreSQL and builds the
client); later calls return the same object. At most ``max_tenants`` tenants are
kept; a tenant unused for ``idle_ttl_s`` seconds is dropped, and so is the least
recently used tenant when a new one does not fit. Whatever leaves the cache
(size eviction, idle expiry, ``invalidate``, ``invalidate_all``, ``close``) is
released: its providers' ``close()`` runs in a background task, so the caller's
event loop is never held up by a slow close (``drain_releases`` waits for them).

Storage is a :class:`cachetools.TTLCache` keyed by tenant id (one value holds that
tenant's providers by channel). TTLCache expires items a fixed ``ttl`` after they
were *set* and keeps them in LRU order; every hit re-sets the item, so the TTL
measures idle time. TTLCache drops items through ``popitem()`` (size) and
``expire()`` (time), which the subclass below overrides to release what they drop
(https://cachetools.readthedocs.io/en/stable/#cachetools.TTLCache).

Everything here runs on one event loop thread; ``invalidate`` is synchronous so a
PostgreSQL LISTEN/NOTIFY callback (asyncpg runs those on the loop) can call it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import structlog
from cachetools import TTLCache

from channels.provider import Provider

log = structlog.get_logger(__name__)

Loader = Callable[[uuid.UUID, str], Awaitable[Provider]]
"""Builds the provider for ``(tenant_id, channel)``; may raise (nothing is cached then)."""

RELEASE_TIMEOUT_S = 30.0
"""Longest wait for one provider's ``close()`` before it is abandoned (logged)."""


@dataclass
class CacheStats:
    """Counters since the cache was created.

    ``hits + misses`` is the number of ``get`` calls (a miss is a call that had to
    wait for a load, its own or a concurrent caller's); ``loads + load_failures``
    is the number of loader calls; ``evictions`` counts tenants dropped for size or
    idle time (not explicit invalidations).
    """

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0


class CacheClosed(RuntimeError):
    """Raised by ``get`` on a cache that was closed (also to callers waiting on a load)."""


@dataclass
class _TenantProviders:
    """The cached value for one tenant: its built providers by channel name."""

    providers: dict[str, Provider] = field(default_factory=dict)


@dataclass
class _Load:
    """A load in flight for one ``(tenant, channel)``, shared by every concurrent caller."""

    task: asyncio.Task[Provider] | None = None
    stale: bool = False


class _ReleasingTTLCache(TTLCache[uuid.UUID, _TenantProviders, float]):
    """A TTLCache that reports every item it drops on its own (size or time) to ``on_drop``."""

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        timer: Callable[[], float],
        on_drop: Callable[[uuid.UUID, _TenantProviders], None],
    ) -> None:
        super().__init__(maxsize, ttl, timer)
        self._on_drop = on_drop

    def popitem(self) -> tuple[uuid.UUID, _TenantProviders]:
        """Drop the least recently used tenant (cachetools calls this when full)."""
        key, value = super().popitem()
        self._on_drop(key, value)
        return key, value

    def expire(self, time: float | None = None) -> list[tuple[uuid.UUID, _TenantProviders]]:
        """Drop every tenant idle for ``ttl`` seconds or more; returns the dropped pairs."""
        expired = super().expire(time)
        for key, value in expired:
            self._on_drop(key, value)
        return expired


class ProviderCache:
    """Built provider objects per tenant and channel, loaded on first use.

    ``loader(tenant_id, channel)`` builds a provider (an object satisfying
    :class:`channels.provider.Provider`). ``max_tenants`` (>= 1) bounds the number of
    tenants held; ``idle_ttl_s`` (seconds, > 0) is how long a tenant may go unused
    before its providers are released; ``timer`` returns seconds on a monotonic
    clock (injectable for tests).

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
        if max_tenants < 1:
            raise ValueError(f"max_tenants must be at least 1, not {max_tenants}")
        if not idle_ttl_s > 0:
            raise ValueError(f"idle_ttl_s must be positive, not {idle_ttl_s}")
        self._loader = loader
        self._cache = _ReleasingTTLCache(max_tenants, idle_ttl_s, timer, self._on_drop)
        self._stats = CacheStats()
        self._loads: dict[tuple[uuid.UUID, str], _Load] = {}
        self._releases: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters (see :class:`CacheStats`)."""
        return dataclasses.replace(self._stats)

    def __len__(self) -> int:
        """The number of tenants currently cached (idle-expired ones are dropped first)."""
        self._cache.expire()
        return len(self._cache)

    async def get(self, tenant_id: uuid.UUID, channel: str) -> Provider:
        """The provider for ``tenant_id``'s ``channel``, built by the loader on a miss.

        A hit pushes the tenant's idle expiry forward and makes it the most recently
        used. Concurrent misses for the same ``(tenant_id, channel)`` share one loader
        call. Raises whatever the loader raised (nothing is cached then; the next
        ``get`` calls the loader again) and :class:`CacheClosed` after ``close()``.
        """
        if self._closed:
            raise CacheClosed("the provider cache is closed")
        provider = self._lookup(tenant_id, channel)
        if provider is not None:
            self._stats.hits += 1
            return provider
        self._stats.misses += 1
        key = (tenant_id, channel)
        load = self._loads.get(key)
        if load is None:
            load = _Load()
            load.task = asyncio.create_task(self._run_load(key, load), name=f"provider-load-{channel}")
            # A load whose every caller was cancelled must not log "exception never retrieved".
            load.task.add_done_callback(_retrieve_exception)
            self._loads[key] = load
        assert load.task is not None
        # shield: a cancelled caller must not cancel the load other callers wait for.
        return await asyncio.shield(load.task)

    def expire(self) -> int:
        """Release every tenant idle for ``idle_ttl_s`` or more now; returns how many.

        ``get`` does this on every call; call it periodically to release idle
        tenants of a process that gets no traffic.
        """
        return len(self._cache.expire())

    def invalidate(self, tenant_id: uuid.UUID) -> None:
        """Drop ``tenant_id``'s providers (its configuration changed) and release them.

        Synchronous, for LISTEN/NOTIFY callbacks; must run on the event loop thread
        (raises ``RuntimeError`` without a running loop). A load of this tenant in
        flight is redone, so no provider built from the old configuration is cached.
        """
        asyncio.get_running_loop()  # fail before dropping anything we could not release
        for key, load in self._loads.items():
            if key[0] == tenant_id:
                load.stale = True
        with self._cache.timer:
            self._cache.expire()
            entry = self._cache.pop(tenant_id, None)
        if entry is not None:
            self._release(entry.providers.values())

    def invalidate_all(self) -> None:
        """Drop and release every tenant's providers, and redo every load in flight.

        Same rules as :meth:`invalidate`.
        """
        asyncio.get_running_loop()
        for load in self._loads.values():
            load.stale = True
        with self._cache.timer:
            self._cache.expire()
            entries = [self._cache.pop(tenant_id) for tenant_id in list(self._cache)]
        for entry in entries:
            self._release(entry.providers.values())

    async def drain_releases(self) -> None:
        """Wait until every scheduled ``close()`` of a released provider has finished.

        Never raises for a failed close (those are logged).
        """
        while self._releases:
            await asyncio.wait(list(self._releases))

    async def close(self) -> None:
        """Release everything and wait for it: later ``get`` calls raise :class:`CacheClosed`.

        Loads in flight are awaited; what they build is released and their callers
        get :class:`CacheClosed`.
        """
        self._closed = True
        tasks = [load.task for load in self._loads.values() if load.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        self.invalidate_all()
        await self.drain_releases()

    # -- internals -------------------------------------------------------------

    def _lookup(self, tenant_id: uuid.UUID, channel: str) -> Provider | None:
        cache = self._cache
        with cache.timer:  # one frozen "now" for expire, lookup and the idle-expiry refresh
            cache.expire()
            entry = cache.get(tenant_id)
            if entry is None:
                return None
            cache[tenant_id] = entry  # re-set: expiry = now + ttl, most recently used
            return entry.providers.get(channel)

    async def _run_load(self, key: tuple[uuid.UUID, str], load: _Load) -> Provider:
        tenant_id, channel = key
        try:
            while True:
                try:
                    provider = await self._loader(tenant_id, channel)
                except Exception:
                    self._stats.load_failures += 1
                    raise
                self._stats.loads += 1
                if self._closed:
                    self._release([provider])
                    raise CacheClosed("the provider cache was closed while loading")
                if not load.stale:
                    break
                # Invalidated while loading: this may be built from the old configuration.
                load.stale = False
                self._release([provider])
            self._store(tenant_id, channel, provider)
            return provider
        finally:
            if self._loads.get(key) is load:
                del self._loads[key]

    def _store(self, tenant_id: uuid.UUID, channel: str, provider: Provider) -> None:
        cache = self._cache
        with cache.timer:
            cache.expire()
            entry = cache.get(tenant_id)
            if entry is None:
                entry = _TenantProviders()
            replaced = entry.providers.get(channel)
            entry.providers[channel] = provider
            cache[tenant_id] = entry  # a new tenant may evict the least recently used one
        if replaced is not None and replaced is not provider:
            self._release([replaced])

    def _on_drop(self, tenant_id: uuid.UUID, entry: _TenantProviders) -> None:
        self._stats.evictions += 1
        log.debug("provider cache evicted tenant", tenant_id=str(tenant_id), channels=sorted(entry.providers))
        self._release(entry.providers.values())

    def _release(self, providers: Iterable[Provider]) -> None:
        loop = asyncio.get_running_loop()
        for provider in list(providers):
            task = loop.create_task(_close_provider(provider), name="provider-release")
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)


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


def _retrieve_exception(task: asyncio.Task[Provider]) -> None:
    if not task.cancelled():
        task.exception()
