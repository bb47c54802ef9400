"""Tenant authentication from ``authorization: Bearer <api key>`` metadata.

Resolved keys are cached (``cachetools.TTLCache``) so the hot path does not
read PostgreSQL per request. Admin changes (key revoked, tenant disabled)
clear the cache in every gateway through the tenant change listener
(tenants/invalidation.py) within about a second; the TTL bounds staleness if
that listener is cut off. A key's ``last_used_at`` is written on cache misses,
at most once a minute.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

import asyncpg
from cachetools import TTLCache

from gateway.errors import RpcError, permission_denied, rate_limited, unauthenticated
from gateway.rate_limit import TenantRateLimiter
from tenants.api_keys import parse_api_key
from tenants.store import KeyLookup, lookup_api_key, touch_api_key

AUTH_CACHE_TTL_S = 30.0
AUTH_CACHE_MAX_KEYS = 10_000


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` entry (RFC 6750), or ``None``."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


class Authenticator:
    """Resolves request metadata to a tenant id, or raises ``RpcError``.

    UNAUTHENTICATED for a missing, malformed, unknown or revoked key;
    PERMISSION_DENIED for a valid key of a disabled tenant (AIP-193).
    """

    def __init__(self, pool: asyncpg.Pool, ttl_s: float = AUTH_CACHE_TTL_S) -> None:
        self._pool = pool
        self._cache: TTLCache[bytes, KeyLookup] = TTLCache(maxsize=AUTH_CACHE_MAX_KEYS, ttl=ttl_s)
        self._limiter = TenantRateLimiter()

    async def admit(self, metadata: Iterable[tuple[str, str | bytes]] | None, cost: int) -> uuid.UUID:
        """Authenticate, then charge ``cost`` notifications to the tenant's rate limit
        (gateway/rate_limit.py); RESOURCE_EXHAUSTED with RetryInfo when over it."""
        lookup = await self._lookup(metadata)
        assert lookup.tenant_id is not None
        wait_s = self._limiter.admit(lookup.tenant_id, lookup.requests_per_second, lookup.burst, cost)
        if wait_s > 0:
            raise RpcError(rate_limited(wait_s, lookup.requests_per_second))
        return lookup.tenant_id

    async def tenant_id(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> uuid.UUID:
        """The authenticated tenant's id for this request's metadata."""
        lookup = await self._lookup(metadata)
        assert lookup.tenant_id is not None
        return lookup.tenant_id

    async def _lookup(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> KeyLookup:
        token = bearer_token(metadata)
        if token is None:
            raise RpcError(unauthenticated("missing metadata 'authorization: Bearer <api key>'"))
        parsed = parse_api_key(token)
        if parsed is None:
            raise RpcError(unauthenticated("malformed API key"))
        cache_key = hashlib.sha256(token.encode("utf-8", errors="surrogatepass")).digest()
        lookup = self._cache.get(cache_key)
        if lookup is None:
            lookup = await lookup_api_key(self._pool, parsed)
            self._cache[cache_key] = lookup
            if lookup.key_id is not None:
                await touch_api_key(self._pool, lookup.key_id)
        if lookup.tenant_id is None:
            raise RpcError(unauthenticated("unknown or revoked API key"))
        if lookup.tenant_disabled:
            raise RpcError(permission_denied("this tenant is disabled", "TENANT_DISABLED"))
        return lookup

    def invalidate_tenant(self, tenant_id: uuid.UUID) -> None:
        """Forget cached lookups of ``tenant_id``'s keys (and unknown keys, which may now exist)."""
        for key, lookup in list(self._cache.items()):
            if lookup.tenant_id in (tenant_id, None):
                self._cache.pop(key, None)

    def invalidate_all(self) -> None:
        """Forget every cached lookup."""
        self._cache.clear()
