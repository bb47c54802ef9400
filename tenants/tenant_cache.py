"""Per-tenant cache of built clients: loaded on first use, released when they leave.

The machinery shared by the notification provider cache
(tenants/provider_cache.py) and the payment processor cache
(tenants/processor_cache.py). A subclass says how a load builds a tenant's
value, how a loaded value joins what the tenant already has, and which
resources a value holds; :class:`TenantCache` does the rest:

- **Storage**: a :class:`cachetools.TTLCache` keyed by tenant id. At most
  ``max_tenants`` tenants are kept; a tenant unused for ``idle_ttl_s`` seconds
  is dropped, and so is the least recently used tenant when a new one does
  not fit. TTLCache expires items a fixed ``ttl`` after they were *set* and
  keeps them in LRU order; every hit re-sets the item, so the TTL measures
  idle time. TTLCache drops items through ``popitem()`` (size) and
  ``expire()`` (time), which the subclass below overrides to release what
  they drop (https://cachetools.readthedocs.io/en/stable/#cachetools.TTLCache).
- **Release**: whatever leaves the cache (size eviction, idle expiry, a value
  replaced, ``invalidate``, ``invalidate_all``, ``close``) is released: the
  release coroutine runs for each of its resources in a background task, so
  the caller's event loop is never held up by a slow close
  (``drain_releases`` waits for them).
- **Single load**: concurrent misses for one load key share one load (one
  in-flight task per key, awaited through ``asyncio.shield`` so a cancelled
  caller does not cancel it for the others); a load failure is raised to
  every waiting caller and nothing is cached. A load in flight when its
  tenant is invalidated is redone, so nothing built from an old
  configuration is cached.
- **Counters**: :class:`CacheStats`.

Everything here runs on one event loop thread; ``invalidate`` is synchronous
so a PostgreSQL LISTEN/NOTIFY callback (asyncpg runs those on the loop) can
call it.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import uuid
from collections.abc import Callable, Coroutine, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from cachetools import TTLCache

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)
"""The key of one load: a tenant id, or a tenant id with what is loaded of it."""
E = TypeVar("E")
"""What one tenant's cache entry holds (and what one load returns)."""
R = TypeVar("R")
"""A resource held by an entry, released (closed) when it leaves the cache."""


@dataclass
class CacheStats:
    """Counters since the cache was created.

    ``hits + misses`` is the number of lookups (a miss is a lookup that had to
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
    """Raised by a lookup on a cache that was closed (also to callers waiting on a load)."""


@dataclass
class _Load(Generic[E]):
    """A load in flight for one key of ``tenant_id``, shared by every concurrent caller."""

    tenant_id: uuid.UUID
    task: asyncio.Task[E] | None = None
    stale: bool = False


class _ReleasingTTLCache(TTLCache[uuid.UUID, E, float]):
    """A TTLCache that reports every item it drops on its own (size or time) to ``on_drop``."""

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        timer: Callable[[], float],
        on_drop: Callable[[uuid.UUID, E], None],
    ) -> None:
        super().__init__(maxsize, ttl, timer)
        self._on_drop = on_drop

    def popitem(self) -> tuple[uuid.UUID, E]:
        """Drop the least recently used tenant (cachetools calls this when full)."""
        key, value = super().popitem()
        self._on_drop(key, value)
        return key, value

    def expire(self, time: float | None = None) -> list[tuple[uuid.UUID, E]]:
        """Drop every tenant idle for ``ttl`` seconds or more; returns the dropped pairs."""
        expired = super().expire(time)
        for key, value in expired:
            self._on_drop(key, value)
        return expired


class TenantCache(abc.ABC, Generic[K, E, R]):
    """Entries ``E`` per tenant, loaded on first use by key ``K``, holding resources ``R``.

    ``kind`` names what is cached in messages and task names (``"provider"``,
    ``"processor"``). ``release`` closes one resource; it must not raise (log
    instead) and should bound its own duration. ``max_tenants`` (>= 1) bounds
    the tenants held; ``idle_ttl_s`` (seconds, > 0) is how long a tenant may go
    unused before its resources are released; ``timer`` returns seconds on a
    monotonic clock (injectable for tests). Raises ``ValueError`` for bad limits.

    A subclass implements :meth:`_build`, :meth:`_merge`, :meth:`_contents` and
    :meth:`_describe`, and its lookups call :meth:`_cached` (counting a hit
    when it finds what it wants) and, on a miss, :meth:`_load`. Must be used
    from a single event loop thread. A resource handed out may be released
    later by eviction or invalidation while a caller still uses it.
    """

    def __init__(
        self,
        *,
        kind: str,
        release: Callable[[R], Coroutine[Any, Any, None]],
        max_tenants: int,
        idle_ttl_s: float,
        timer: Callable[[], float],
    ) -> None:
        if max_tenants < 1:
            raise ValueError(f"max_tenants must be at least 1, not {max_tenants}")
        if not idle_ttl_s > 0:
            raise ValueError(f"idle_ttl_s must be positive, not {idle_ttl_s}")
        self._kind = kind
        self._release_one = release
        self._cache: _ReleasingTTLCache[E] = _ReleasingTTLCache(max_tenants, idle_ttl_s, timer, self._on_drop)
        self._stats = CacheStats()
        self._loads: dict[K, _Load[E]] = {}
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

    def expire(self) -> int:
        """Release every tenant idle for ``idle_ttl_s`` or more now; returns how many.

        Every lookup does this; call it periodically to release idle tenants of a
        process that gets no traffic.
        """
        return len(self._cache.expire())

    def invalidate(self, tenant_id: uuid.UUID) -> None:
        """Drop ``tenant_id``'s entry (its configuration changed) and release it.

        Synchronous, for LISTEN/NOTIFY callbacks; must run on the event loop thread
        (raises ``RuntimeError`` without a running loop). A load of this tenant in
        flight is redone, so nothing built from the old configuration is cached.
        """
        asyncio.get_running_loop()  # fail before dropping anything we could not release
        for load in self._loads.values():
            if load.tenant_id == tenant_id:
                load.stale = True
        with self._cache.timer:
            self._cache.expire()
            entry = self._cache.pop(tenant_id, None)
        if entry is not None:
            self._release(self._contents(entry))

    def invalidate_all(self) -> None:
        """Drop and release every tenant's entry, and redo every load in flight.

        Same rules as :meth:`invalidate`.
        """
        asyncio.get_running_loop()
        for load in self._loads.values():
            load.stale = True
        with self._cache.timer:
            self._cache.expire()
            entries = [self._cache.pop(tenant_id) for tenant_id in list(self._cache)]
        for entry in entries:
            self._release(self._contents(entry))

    async def drain_releases(self) -> None:
        """Wait until every scheduled release has finished (failures are logged, not raised)."""
        while self._releases:
            await asyncio.wait(list(self._releases))

    async def close(self) -> None:
        """Release everything and wait for it: later lookups raise :class:`CacheClosed`.

        Loads in flight are awaited; what they build is released and their callers
        get :class:`CacheClosed`. Logs the counters (:class:`CacheStats`) at INFO as
        ``"<kind> cache closed"``: a worker's figures for its whole run.
        """
        self._closed = True
        tasks = [load.task for load in self._loads.values() if load.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        self.invalidate_all()
        await self.drain_releases()
        log.info(f"{self._kind} cache closed", **dataclasses.asdict(self._stats))

    # -- what a subclass provides ---------------------------------------------------------------

    @abc.abstractmethod
    async def _build(self, key: K) -> E:
        """Load and build what ``key`` names (an entry, or the part of one that ``key`` names);
        may raise (nothing is cached then)."""

    @abc.abstractmethod
    def _merge(self, current: E | None, loaded: E) -> tuple[E, Iterable[R]]:
        """The tenant's entry once ``loaded`` joins ``current`` (None: nothing cached), and the
        resources of ``current`` that it replaces (released). Must not change ``loaded``."""

    @abc.abstractmethod
    def _contents(self, entry: E) -> Iterable[R]:
        """The resources ``entry`` holds (released when it leaves the cache)."""

    @abc.abstractmethod
    def _describe(self, entry: E) -> dict[str, object]:
        """Log fields naming what ``entry`` holds (never secrets)."""

    # -- for lookups -------------------------------------------------------------------------------

    def _cached(self, tenant_id: uuid.UUID) -> E | None:
        """The tenant's entry, made the most recently used with its idle expiry pushed forward;
        None when it is not cached. Counts nothing. Raises :class:`CacheClosed` after
        :meth:`close`."""
        if self._closed:
            raise CacheClosed(f"the {self._kind} cache is closed")
        cache = self._cache
        with cache.timer:  # one frozen "now" for expire, lookup and the idle-expiry refresh
            cache.expire()
            entry = cache.get(tenant_id)
            if entry is not None:
                cache[tenant_id] = entry  # re-set: expiry = now + ttl, most recently used
        return entry

    async def _load(self, tenant_id: uuid.UUID, key: K, task_name: str) -> E:
        """Count a miss and wait for the one load of ``key`` (of ``tenant_id``), starting it when
        none is in flight; returns what it built (already merged into the cache). Raises what
        the load raised and :class:`CacheClosed` when the cache closed meanwhile."""
        self._stats.misses += 1
        load = self._loads.get(key)
        if load is None:
            load = _Load(tenant_id)
            load.task = asyncio.create_task(self._run_load(key, load), name=task_name)
            # A load whose every caller was cancelled must not log "exception never retrieved".
            load.task.add_done_callback(_retrieve_exception)
            self._loads[key] = load
        assert load.task is not None
        # shield: a cancelled caller must not cancel the load other callers wait for.
        return await asyncio.shield(load.task)

    # -- internals ---------------------------------------------------------------------------------

    async def _run_load(self, key: K, load: _Load[E]) -> E:
        try:
            while True:
                try:
                    loaded = await self._build(key)
                except Exception:
                    self._stats.load_failures += 1
                    raise
                self._stats.loads += 1
                if self._closed:
                    self._release(self._contents(loaded))
                    raise CacheClosed(f"the {self._kind} cache was closed while loading")
                if not load.stale:
                    break
                # Invalidated while loading: this may be built from the old configuration.
                load.stale = False
                self._release(self._contents(loaded))
            cache = self._cache
            with cache.timer:
                cache.expire()
                entry, replaced = self._merge(cache.get(load.tenant_id), loaded)
                cache[load.tenant_id] = entry  # a new tenant may evict the least recently used one
            self._release(replaced)
            return loaded
        finally:
            if self._loads.get(key) is load:
                del self._loads[key]

    def _on_drop(self, tenant_id: uuid.UUID, entry: E) -> None:
        self._stats.evictions += 1
        log.debug(f"{self._kind} cache evicted tenant", tenant_id=str(tenant_id), **self._describe(entry))
        self._release(self._contents(entry))

    def _release(self, resources: Iterable[R]) -> None:
        loop = asyncio.get_running_loop()
        for resource in list(resources):
            task = loop.create_task(self._release_one(resource), name=f"{self._kind}-release")
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)


def _retrieve_exception(task: asyncio.Task[E]) -> None:
    if not task.cancelled():
        task.exception()
