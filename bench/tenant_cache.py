"""Per-request cost of authentication and of the provider cache, hit and cold.

Measured on an embedded PostgreSQL started here (or ``SWITCHBOARD_DATABASE_URL``),
with the fake FCM (and its OAuth2 token endpoint) on loopback in its own thread:

- auth, cache hit: ``Authenticator.tenant_id`` for a cached key;
- provider, cache hit: ``TenantProviders.provider_for`` for a cached tenant;
- auth + provider, cache hit: both, as every delivery-path request pays them;
- auth, cold: the same after ``invalidate_all`` (one indexed PostgreSQL read + a
  ``last_used_at`` write at most once a minute);
- SMTP provider, cold load: after ``invalidate`` (tenant + config read, AES-GCM open,
  client construction);
- FCM push, cold: after ``invalidate``, the first push of the tenant: the load as above,
  then the Firebase app (RSA key parsed), its messaging client (requests session, httpx
  client, SSL contexts), an OAuth2 token grant (a signed JWT) and the send. The old
  provider's release (``delete_app``) is awaited outside the timed part.

each against a baseline from the same run: a dict lookup for the hits, a ``SELECT 1``
round trip on the same pool for the auth and SMTP cold paths, a warm FCM send (same
provider, same fake) for the FCM cold path. Reported as microseconds per operation and
as ratios to the baseline, then the provider cache's counters.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
from pydantic import SecretStr

from channels.registry import TenantProviders
from gateway.auth import Authenticator
from gateway.server import start_gateway
from switchboard.db.migrate import migrate
from switchboard.embedded import EmbeddedPostgres, free_port
from switchboard.fakes.fcm import FakeFcm, serving_in_thread
from switchboard.notify.v1 import events_pb2, notify_pb2
from switchboard.settings import Settings
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tenants.sealing import MasterKeyRing, generate_master_key

Row = tuple[str, float, str, float]


async def _per_op_us(
    operation: Callable[[], Awaitable[object]],
    count: int,
    repeats: int = 5,
    untimed: Callable[[], Awaitable[object]] | None = None,
) -> float:
    """Median over ``repeats`` runs of the mean microseconds per call of ``operation``;
    ``untimed`` runs before each call, outside the measurement."""
    samples = []
    for _ in range(repeats):
        elapsed = 0.0
        if untimed is None:
            started = time.perf_counter()
            for _ in range(count):
                await operation()
            elapsed = time.perf_counter() - started
        else:
            for _ in range(count):
                await untimed()
                started = time.perf_counter()
                await operation()
                elapsed += time.perf_counter() - started
        samples.append(elapsed / count * 1e6)
    return statistics.median(samples)


async def _measure(dsn: str, fcm: FakeFcm) -> list[Row]:
    ring = MasterKeyRing.parse(generate_master_key("bench"))
    admin_token = secrets.token_urlsafe(24)
    settings = Settings(
        database_url=SecretStr(dsn),
        master_key=SecretStr(""),
        default_providers=False,
        admin_token=SecretStr(admin_token),
    )
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
    assert pool is not None
    providers = TenantProviders(pool, settings, ring)
    try:
        # The tenant, its key and its configurations come through the admin API, as in production.
        gateway = await start_gateway(pool, settings, ring, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                admin = tenants_pb2_grpc.TenantAdminServiceStub(channel)
                operator = (("authorization", f"Bearer {admin_token}"),)
                created = await admin.CreateTenant(
                    tenants_pb2.CreateTenantRequest(
                        request_id=str(uuid.uuid4()), name=f"bench-{free_port()}"
                    ),
                    metadata=operator,
                )
                tenant_id = uuid.UUID(created.tenant.tenant_id)
                key = await admin.CreateApiKey(
                    tenants_pb2.CreateApiKeyRequest(request_id=str(uuid.uuid4()), tenant_id=str(tenant_id)),
                    metadata=operator,
                )
                smtp = tenants_pb2.SmtpConfig(
                    host="127.0.0.1",
                    port=2525,
                    tls_mode=tenants_pb2.SMTP_TLS_MODE_NONE,
                    username="bench",
                    password=secrets.token_urlsafe(16),
                    from_address="bench@example.com",
                )
                fcm_config = tenants_pb2.FcmConfig(
                    service_account_json=json.dumps(fcm.service_account("bench-push")),
                    endpoint_base=fcm.base_url,
                )
                for channel_number, config in (
                    (notify_pb2.CHANNEL_EMAIL, tenants_pb2.ProviderConfig(smtp=smtp)),
                    (notify_pb2.CHANNEL_PUSH, tenants_pb2.ProviderConfig(fcm=fcm_config)),
                ):
                    await admin.SetProviderConfig(
                        tenants_pb2.SetProviderConfigRequest(
                            request_id=str(uuid.uuid4()),
                            tenant_id=str(tenant_id),
                            channel=channel_number,
                            config=config,
                        ),
                        metadata=operator,
                    )
        finally:
            await gateway.stop(grace_s=1)
        metadata = (("authorization", f"Bearer {key.secret}"),)
        auth = Authenticator(pool)
        lookup = {tenant_id: object()}

        def push() -> events_pb2.DeliveryRequested:
            return events_pb2.DeliveryRequested(
                delivery_id=str(uuid.uuid4()),
                tenant_id=str(tenant_id),
                channel=notify_pb2.CHANNEL_PUSH,
                recipient="bench-device:APA91b-bench",
                push=notify_pb2.PushContent(title="Bench", body="One push"),
            )

        async def dict_hit() -> object:
            return lookup.get(tenant_id)

        async def select_one() -> object:
            return await pool.fetchval("SELECT 1")

        async def auth_hit() -> object:
            return await auth.tenant_id(metadata)

        async def provider_hit() -> object:
            return await providers.provider_for(tenant_id, "email")

        async def auth_and_provider_hit() -> object:
            return await providers.provider_for(await auth.tenant_id(metadata), "email")

        async def auth_cold() -> object:
            auth.invalidate_all()
            return await auth.tenant_id(metadata)

        async def smtp_cold() -> object:
            providers.invalidate(tenant_id)
            return await providers.provider_for(tenant_id, "email")

        async def fcm_send() -> object:
            return await (await providers.provider_for(tenant_id, "push")).send(push())

        async def fcm_cold() -> object:
            providers.invalidate(tenant_id)
            return await fcm_send()

        await auth_hit()
        await provider_hit()
        await fcm_send()
        dict_us = await _per_op_us(dict_hit, 100_000)
        select_us = await _per_op_us(select_one, 2_000)
        warm_push_us = await _per_op_us(fcm_send, 200)
        dict_, select = ("dict lookup", dict_us), ("SELECT 1 round trip", select_us)
        return [
            ("auth, cache hit", await _per_op_us(auth_hit, 50_000), *dict_),
            ("provider, cache hit", await _per_op_us(provider_hit, 50_000), *dict_),
            ("auth + provider, cache hit", await _per_op_us(auth_and_provider_hit, 50_000), *dict_),
            ("auth, cold (cache miss)", await _per_op_us(auth_cold, 2_000), *select),
            ("SMTP provider, cold load", await _per_op_us(smtp_cold, 2_000), *select),
            (
                "FCM push, cold (first send)",
                await _per_op_us(fcm_cold, 20, untimed=providers.cache.drain_releases),
                "warm FCM send",
                warm_push_us,
            ),
        ]
    finally:
        await providers.close()
        stats = providers.cache.stats
        print(
            f"provider cache counters: hits={stats.hits} misses={stats.misses} loads={stats.loads} "
            f"load_failures={stats.load_failures} evictions={stats.evictions}"
        )
        await pool.close()


async def run() -> None:
    """Run against SWITCHBOARD_DATABASE_URL, or an embedded PostgreSQL started for the run."""
    dsn = os.environ.get("SWITCHBOARD_DATABASE_URL")
    server = None
    if not dsn:
        folder = Path(tempfile.mkdtemp(prefix="sb-bench-"))
        server = EmbeddedPostgres(folder / "data", free_port())
        server.start()
        dsn = server.dsn()
    try:
        await migrate(dsn)
        with serving_in_thread(FakeFcm()) as fcm:
            rows = await _measure(dsn, fcm)
    finally:
        if server is not None:
            server.stop()
    print(f"{'operation':<28} {'us/op':>10}   {'baseline':<20} {'us/op':>8} {'ratio':>7}")
    for name, value, baseline, base_value in rows:
        print(f"{name:<28} {value:>10.2f}   {baseline:<20} {base_value:>8.2f} {value / base_value:>7.1f}x")
