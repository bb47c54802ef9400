"""The per-tenant provider cache: loading once, idle and size eviction, release of what leaves."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from channels.provider import Provider, SendResult
from switchboard.notify.v1 import events_pb2
from tenants.provider_cache import CacheClosed, CacheStats, ProviderCache

MINUTE = 60.0
T = TypeVar("T")


async def start(coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run ``coroutine`` as a task; return once it has run up to its first suspension."""
    begun = asyncio.Event()

    async def run() -> T:
        begun.set()  # wakes the caller only after this step, i.e. once ``coroutine`` waits
        return await coroutine

    task = asyncio.create_task(run())
    await begun.wait()
    return task


class FakeProvider:
    """A provider that records sends and closes."""

    def __init__(self, tenant_id: uuid.UUID, channel: str, generation: int) -> None:
        self.tenant_id = tenant_id
        self.channel = channel
        self.generation = generation
        self.sent: list[str] = []
        self.closes = 0
        self.close_gate: asyncio.Event | None = None
        self.close_error: Exception | None = None
        self.closed = asyncio.Event()

    @property
    def name(self) -> str:
        """Short provider name."""
        return f"fake-{self.channel}"

    async def send(self, event: events_pb2.DeliveryRequested) -> SendResult:
        """Record the delivery id."""
        self.sent.append(event.delivery_id)
        return SendResult(f"fake-{event.delivery_id}")

    async def close(self) -> None:
        """Record the close (optionally wait for a gate or fail)."""
        if self.close_gate is not None:
            await self.close_gate.wait()
        self.closes += 1
        self.closed.set()
        if self.close_error is not None:
            raise self.close_error


class FakeLoader:
    """Builds FakeProviders, counting calls per (tenant, channel); can block or fail."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[uuid.UUID, str]] = Counter()
        self.built: list[FakeProvider] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self, tenant_id: uuid.UUID, channel: str) -> Provider:
        self.calls[(tenant_id, channel)] += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)
        if self.fail_with is not None:
            raise self.fail_with
        provider = FakeProvider(tenant_id, channel, self.calls[(tenant_id, channel)])
        self.built.append(provider)
        return provider

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def built_for(self, tenant_id: uuid.UUID) -> list[FakeProvider]:
        return [p for p in self.built if p.tenant_id == tenant_id]


class FakeClock:
    """A monotonic clock moved by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake(provider: Provider) -> FakeProvider:
    assert isinstance(provider, FakeProvider)
    return provider


async def test_hit_miss_and_load_counters() -> None:
    loader = FakeLoader()
    cache = ProviderCache(loader)
    tenant = uuid.uuid4()

    email = await cache.get(tenant, "email")
    assert await cache.get(tenant, "email") is email
    sms = await cache.get(tenant, "sms")

    assert sms is not email
    assert loader.calls == {(tenant, "email"): 1, (tenant, "sms"): 1}
    assert cache.stats == CacheStats(hits=1, misses=2, loads=2, load_failures=0, evictions=0)
    assert len(cache) == 1  # one tenant, two channels
    await cache.close()


async def test_loader_runs_once_for_100_concurrent_gets() -> None:
    loader = FakeLoader()
    loader.gate = asyncio.Event()
    cache = ProviderCache(loader)
    tenant = uuid.uuid4()

    tasks = [await start(cache.get(tenant, "push")) for _ in range(100)]
    await loader.started.wait()
    assert cache.stats.misses == 100  # every task is waiting on the one load
    loader.gate.set()
    providers = await asyncio.gather(*tasks)

    assert loader.calls[(tenant, "push")] == 1
    assert all(p is providers[0] for p in providers)
    assert cache.stats == CacheStats(hits=0, misses=100, loads=1, load_failures=0, evictions=0)
    assert await cache.get(tenant, "push") is providers[0]
    assert cache.stats.hits == 1
    await cache.close()


async def test_a_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    loader = FakeLoader()
    loader.gate = asyncio.Event()
    cache = ProviderCache(loader)
    tenant = uuid.uuid4()

    first = asyncio.create_task(cache.get(tenant, "email"))
    second = asyncio.create_task(cache.get(tenant, "email"))
    await loader.started.wait()
    first.cancel()
    loader.gate.set()
    provider = await second

    assert first.cancelled()
    assert loader.total_calls == 1
    assert await cache.get(tenant, "email") is provider
    await cache.close()


async def test_the_201st_tenant_evicts_the_least_recently_used_and_closes_its_providers() -> None:
    loader = FakeLoader()
    cache = ProviderCache(loader, max_tenants=200)
    tenants = [uuid.uuid4() for _ in range(201)]
    for tenant in tenants[:200]:
        await cache.get(tenant, "email")
        await cache.get(tenant, "sms")
    await cache.get(tenants[0], "email")  # tenants[0] used again: tenants[1] is now least recently used

    await cache.get(tenants[200], "email")
    await cache.drain_releases()

    assert len(cache) == 200
    assert cache.stats.evictions == 1
    evicted = loader.built_for(tenants[1])
    assert [p.closes for p in evicted] == [1, 1]
    assert all(p.closes == 0 for t in tenants if t != tenants[1] for p in loader.built_for(t))
    calls = loader.total_calls
    assert fake(await cache.get(tenants[0], "sms")).closes == 0  # still cached: no load
    assert loader.total_calls == calls
    reloaded = await cache.get(tenants[1], "email")  # evicted: loads again (and evicts another)
    assert loader.total_calls == calls + 1
    assert reloaded not in evicted
    await cache.close()


async def test_idle_expiry_is_time_since_last_use_not_since_load() -> None:
    clock = FakeClock()
    loader = FakeLoader()
    cache = ProviderCache(loader, idle_ttl_s=60 * MINUTE, timer=clock)
    busy, idle = uuid.uuid4(), uuid.uuid4()
    busy_provider = await cache.get(busy, "email")
    idle_provider = fake(await cache.get(idle, "email"))

    for step in range(1, 7):  # a use every 30 minutes, for 3 hours
        clock.advance(30 * MINUTE)
        assert await cache.get(busy, "email") is busy_provider
        await cache.drain_releases()
        if step == 1:  # 30 minutes idle: still there
            assert idle_provider.closes == 0
            assert len(cache) == 2
        if step == 2:  # 60 minutes idle: gone and closed
            assert idle_provider.closes == 1
            assert len(cache) == 1

    assert loader.calls[(busy, "email")] == 1
    assert fake(busy_provider).closes == 0
    assert cache.stats.evictions == 1
    assert cache.stats.hits == 6
    again = await cache.get(idle, "email")
    assert again is not idle_provider
    assert loader.calls[(idle, "email")] == 2
    await cache.close()


async def test_an_untouched_tenant_expires_after_60_minutes_without_any_get() -> None:
    clock = FakeClock()
    loader = FakeLoader()
    cache = ProviderCache(loader, idle_ttl_s=60 * MINUTE, timer=clock)
    tenant = uuid.uuid4()
    provider = fake(await cache.get(tenant, "sms"))

    clock.advance(60 * MINUTE - 1)
    assert cache.expire() == 0
    clock.advance(1)
    assert cache.expire() == 1
    await cache.drain_releases()

    assert provider.closes == 1
    assert len(cache) == 0
    await cache.close()


async def test_invalidate_closes_and_the_next_get_reloads() -> None:
    loader = FakeLoader()
    cache = ProviderCache(loader)
    tenant, other = uuid.uuid4(), uuid.uuid4()
    old_email = fake(await cache.get(tenant, "email"))
    old_push = fake(await cache.get(tenant, "push"))
    other_provider = fake(await cache.get(other, "email"))

    cache.invalidate(tenant)
    await cache.drain_releases()

    assert (old_email.closes, old_push.closes, other_provider.closes) == (1, 1, 0)
    new_email = fake(await cache.get(tenant, "email"))
    assert new_email is not old_email
    assert new_email.generation == 2
    assert await cache.get(other, "email") is other_provider
    assert cache.stats.evictions == 0  # an invalidation is not an eviction
    cache.invalidate(uuid.uuid4())  # unknown tenant: nothing happens

    cache.invalidate_all()
    await cache.drain_releases()
    assert (new_email.closes, other_provider.closes) == (1, 1)
    assert len(cache) == 0
    await cache.close()


async def test_invalidate_during_a_load_reloads_instead_of_caching_the_old_configuration() -> None:
    loader = FakeLoader()
    loader.gate = asyncio.Event()
    cache = ProviderCache(loader)
    tenant = uuid.uuid4()

    pending = asyncio.create_task(cache.get(tenant, "email"))
    await loader.started.wait()
    cache.invalidate(tenant)  # the configuration changed while it was being loaded
    loader.gate.set()
    provider = fake(await pending)
    await cache.drain_releases()

    assert loader.calls[(tenant, "email")] == 2
    assert provider.generation == 2
    first = loader.built[0]
    assert first.generation == 1
    assert first.closes == 1
    assert await cache.get(tenant, "email") is provider
    await cache.close()


async def test_a_loader_failure_is_raised_and_not_cached() -> None:
    loader = FakeLoader()
    loader.gate = asyncio.Event()
    loader.fail_with = ConnectionError("database down")
    cache = ProviderCache(loader)
    tenant = uuid.uuid4()

    tasks = [asyncio.create_task(cache.get(tenant, "sms")) for _ in range(10)]
    await loader.started.wait()
    loader.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(r, ConnectionError) for r in results)
    assert loader.total_calls == 1  # the waiters shared the one failed load
    assert len(cache) == 0
    loader.fail_with = None
    provider = await cache.get(tenant, "sms")
    assert loader.total_calls == 2
    assert await cache.get(tenant, "sms") is provider
    assert cache.stats == CacheStats(hits=1, misses=11, loads=1, load_failures=1, evictions=0)
    await cache.close()


async def test_releases_do_not_block_the_caller_and_close_errors_are_swallowed() -> None:
    loader = FakeLoader()
    cache = ProviderCache(loader)
    slow_tenant, failing_tenant = uuid.uuid4(), uuid.uuid4()
    slow = fake(await cache.get(slow_tenant, "email"))
    slow.close_gate = asyncio.Event()
    failing = fake(await cache.get(failing_tenant, "email"))
    failing.close_error = OSError("socket already gone")

    with capture_logs() as logs:
        cache.invalidate(slow_tenant)  # returns at once although close() is still waiting
        cache.invalidate(failing_tenant)
        assert fake(await cache.get(slow_tenant, "email")) is not slow
        await failing.closed.wait()  # its release logs the failure in the same step
    assert slow.closes == 0
    assert failing.closes == 1
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["closing a released provider failed"]

    slow.close_gate.set()
    await cache.drain_releases()
    assert slow.closes == 1
    await cache.close()


async def test_close_releases_everything_and_later_gets_fail() -> None:
    loader = FakeLoader()
    cache = ProviderCache(loader)
    tenant = uuid.uuid4()
    email = fake(await cache.get(tenant, "email"))
    sms = fake(await cache.get(uuid.uuid4(), "sms"))

    loader.gate = asyncio.Event()
    loader.started.clear()
    in_flight = asyncio.create_task(cache.get(tenant, "push"))
    await loader.started.wait()  # the load is under way, held at the gate
    closing = await start(cache.close())  # close() began: it waits for that load
    loader.gate.set()
    await closing

    with pytest.raises(CacheClosed):
        await in_flight
    assert (email.closes, sms.closes) == (1, 1)
    assert loader.built[-1].channel == "push"
    assert loader.built[-1].closes == 1  # built after close began: released, not cached
    with pytest.raises(CacheClosed):
        await cache.get(tenant, "email")


async def test_close_logs_the_counters_at_info() -> None:
    loader = FakeLoader()
    cache = ProviderCache(loader, max_tenants=1)
    first, second = uuid.uuid4(), uuid.uuid4()
    await cache.get(first, "email")
    await cache.get(first, "email")
    await cache.get(second, "sms")  # evicts the first tenant

    with capture_logs() as logs:
        await cache.close()

    [closed] = [e for e in logs if e["event"] == "provider cache closed"]
    assert closed["log_level"] == "info"
    assert {k: closed[k] for k in ("hits", "misses", "loads", "load_failures", "evictions")} == {
        "hits": 1,
        "misses": 2,
        "loads": 2,
        "load_failures": 0,
        "evictions": 1,
    }


def test_rejects_bad_limits() -> None:
    loader = FakeLoader()
    with pytest.raises(ValueError, match="max_tenants"):
        ProviderCache(loader, max_tenants=0)
    with pytest.raises(ValueError, match="idle_ttl_s"):
        ProviderCache(loader, idle_ttl_s=0)
