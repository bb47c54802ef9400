"""Per-request cost of authentication and of the provider cache, hit and cold.

Measured on an embedded PostgreSQL started here (or ``SWITCHBOARD_DATABASE_URL``):

- auth, cache hit: ``Authenticator.tenant_id`` for a cached key;
- auth, cold: the same after ``invalidate_all`` (one indexed PostgreSQL read + a
  ``last_used_at`` write at most once a minute);
- provider, cache hit: ``TenantProviders.provider_for`` for a cached tenant;
- provider, cold load: after ``invalidate`` (tenant + config read, AES-GCM open,
  client construction);

each against a baseline from the same run: a dict lookup for the hits, a
``SELECT 1`` round trip on the same pool for the cold paths. Reported as
microseconds per operation and as ratios to the baseline.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from pydantic import SecretStr

from channels.registry import TenantProviders
from gateway.auth import Authenticator
from switchboard.db.migrate import migrate
from switchboard.embedded import EmbeddedPostgres, free_port
from switchboard.settings import Settings
from tenants import store
from tenants.sealing import MasterKeyRing, generate_master_key, secrets_associated_data


async def _per_op_us(operation: Callable[[], Awaitable[object]], count: int, repeats: int = 5) -> float:
    """Median over ``repeats`` runs of the mean microseconds per call."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(count):
            await operation()
        samples.append((time.perf_counter() - started) / count * 1e6)
    return statistics.median(samples)


async def _measure(dsn: str) -> list[tuple[str, float, str, float]]:
    ring = MasterKeyRing.parse(generate_master_key("bench"))
    settings = Settings(database_url=SecretStr(dsn), master_key=SecretStr(""), default_providers=False)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            tenant = await store.create_tenant(conn, f"bench-{free_port()}")
            key = await store.create_api_key(conn, tenant.id)
            secrets = b'{"password": "bench-password"}'
            sealed = ring.seal(secrets, secrets_associated_data(tenant.id, "email"))
            await store.upsert_provider_config(
                conn,
                store.StoredProviderConfig(
                    tenant_id=tenant.id,
                    channel="email",
                    provider="smtp",
                    settings={
                        "host": "127.0.0.1",
                        "port": 2525,
                        "tls_mode": "none",
                        "username": "bench",
                        "from_address": "bench@example.com",
                    },
                    secret_fields=["password"],
                    key_id=sealed.key_id,
                    nonce=sealed.nonce,
                    ciphertext=sealed.ciphertext,
                    secret_fingerprint=ring.fingerprint(secrets),
                    updated_at=None,  # type: ignore[arg-type]
                ),
            )
        metadata = (("authorization", f"Bearer {key.token}"),)
        auth = Authenticator(pool)
        providers = TenantProviders(pool, settings, ring)
        lookup = {tenant.id: object()}

        async def dict_hit() -> object:
            return lookup.get(tenant.id)

        async def select_one() -> object:
            return await pool.fetchval("SELECT 1")

        async def auth_hit() -> object:
            return await auth.tenant_id(metadata)

        async def auth_cold() -> object:
            auth.invalidate_all()
            return await auth.tenant_id(metadata)

        async def provider_hit() -> object:
            return await providers.provider_for(tenant.id, "email")

        async def provider_cold() -> object:
            providers.invalidate(tenant.id)
            return await providers.provider_for(tenant.id, "email")

        await auth_hit()
        await provider_hit()
        dict_us = await _per_op_us(dict_hit, 100_000)
        select_us = await _per_op_us(select_one, 2_000)
        rows = [
            ("auth, cache hit", await _per_op_us(auth_hit, 50_000), "dict lookup", dict_us),
            ("provider, cache hit", await _per_op_us(provider_hit, 50_000), "dict lookup", dict_us),
            ("auth, cold (cache miss)", await _per_op_us(auth_cold, 2_000), "SELECT 1 round trip", select_us),
            ("provider, cold load", await _per_op_us(provider_cold, 2_000), "SELECT 1 round trip", select_us),
        ]
        await providers.close()
        stats = providers.cache.stats
        print(
            f"provider cache counters: hits={stats.hits} misses={stats.misses} loads={stats.loads} "
            f"evictions={stats.evictions}"
        )
        return rows
    finally:
        await pool.close()


async def run() -> None:
    """Run against SWITCHBOARD_DATABASE_URL, or an embedded PostgreSQL started for the run."""
    import os

    dsn = os.environ.get("SWITCHBOARD_DATABASE_URL")
    server = None
    if not dsn:
        folder = Path(tempfile.mkdtemp(prefix="sb-bench-"))
        server = EmbeddedPostgres(folder / "data", free_port())
        server.start()
        dsn = server.dsn()
    try:
        await migrate(dsn)
        rows = await _measure(dsn)
    finally:
        if server is not None:
            server.stop()
    print(f"{'operation':<26} {'us/op':>9}   {'baseline':<20} {'us/op':>8} {'ratio':>7}")
    for name, value, baseline, base_value in rows:
        print(f"{name:<26} {value:>9.2f}   {baseline:<20} {base_value:>8.2f} {value / base_value:>7.1f}x")
