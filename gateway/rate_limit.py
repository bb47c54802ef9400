"""Per-tenant rate limits: a token bucket per tenant, in each gateway process.

A tenant with ``requests_per_second = r`` and ``burst = b`` (tenant limits;
0 = unlimited, burst 0 = ``r``) may send ``b`` notifications at once and ``r``
per second sustained. A batch costs one token per item. Over the limit the
gateway answers RESOURCE_EXHAUSTED with ``google.rpc.RetryInfo`` saying when
enough tokens will be there (AIP-193). Buckets are per process: with N gateway
processes behind one address a tenant gets up to N times its limit, so set
limits per process.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from cachetools import TTLCache


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate_per_s`` tokens a second (a float clock, seconds)."""

    rate_per_s: float
    capacity: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.capacity
        self.updated = self.clock()

    def take(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if there are enough and return 0.0; otherwise take
        nothing and return the seconds until there will be. A cost above the
        capacity can never be paid: its wait is ``inf``."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if cost <= self.tokens:
            self.tokens -= cost
            return 0.0
        if cost > self.capacity:
            return float("inf")
        return (cost - self.tokens) / self.rate_per_s


class TenantRateLimiter:
    """Token buckets by tenant; buckets of tenants idle for 10 minutes are dropped."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: TTLCache[uuid.UUID, TokenBucket] = TTLCache(maxsize=100_000, ttl=600, timer=clock)

    def admit(self, tenant_id: uuid.UUID, requests_per_second: int, burst: int, cost: int = 1) -> float:
        """0.0 if the tenant may go ahead (tokens taken), else the seconds to wait."""
        if requests_per_second <= 0:
            return 0.0
        capacity = float(burst or requests_per_second)
        bucket = self._buckets.get(tenant_id)
        if bucket is None or bucket.rate_per_s != requests_per_second or bucket.capacity != capacity:
            bucket = TokenBucket(float(requests_per_second), capacity, self._clock)
        self._buckets[tenant_id] = bucket  # re-set: idle time counts from the last use
        return bucket.take(cost)
