"""Gateway server assembly: NotificationService, health and reflection on grpc.aio."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import asyncpg
import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gateway.admin_service import TenantAdminService
from gateway.auth import Authenticator
from gateway.drain import DrainInterceptor
from gateway.payment_service import PAYMENT_SERVICE_NAME, PaymentService, add_payment_service_to_server
from gateway.service import NotificationService, add_notification_service_to_server
from gateway.status_stream import close_status_hubs
from switchboard.db.pool import create_pool
from switchboard.notify.v1 import notify_pb2
from switchboard.settings import Settings
from switchboard.signals import drain, wait_for_shutdown_signal
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tenants.invalidation import TenantChangeListener
from tenants.key_ring import load_verified_key_ring
from tenants.sealing import MasterKeyRing

log = structlog.get_logger(__name__)

NOTIFICATION_SERVICE_NAME = notify_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name
ADMIN_SERVICE_NAME = tenants_pb2.DESCRIPTOR.services_by_name["TenantAdminService"].full_name
#: How often the health watcher probes PostgreSQL (seconds).
HEALTH_PROBE_INTERVAL_S = 1.0
#: After the drain, late calls are still refused UNAVAILABLE this long before the port closes (seconds).
DRAIN_LINGER_S = 0.5
#: How long in-flight RPCs may take to finish after SIGTERM.
SHUTDOWN_GRACE_S = 10.0


@dataclass
class Gateway:
    """A started gateway: the server, its health servicer, the bound port and the
    tenant change listener that keeps its auth cache current."""

    server: grpc.aio.Server
    health: HealthServicer
    port: int
    listener: TenantChangeListener
    listener_task: asyncio.Task[None]
    drain: DrainInterceptor | None = None
    health_task: asyncio.Task[None] | None = None
    stopping: bool = False

    async def set_serving(self, serving: bool) -> None:
        """Flip the overall, the NotificationService and the PaymentService health status."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", NOTIFICATION_SERVICE_NAME, PAYMENT_SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Report NOT_SERVING, refuse new RPCs and let in-flight ones finish within ``grace_s``."""
        self.stopping = True
        if self.health_task is not None:
            self.health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.health_task
        await self.set_serving(False)
        if self.drain is not None:
            # New calls get UNAVAILABLE; in-flight ones finish (gRPC's own grace would CANCEL them).
            self.drain.start_draining()
            await close_status_hubs()  # open Watch streams end UNAVAILABLE: clients re-watch elsewhere
            await self.drain.wait_idle(grace_s)
            # Keep answering late arrivals UNAVAILABLE a moment, so clients and load
            # balancers see health NOT_SERVING / GOAWAY before the port closes.
            await asyncio.sleep(min(grace_s, DRAIN_LINGER_S))
        await self.server.stop(min(grace_s, 1.0))
        self.listener.stop()
        await self.listener_task


async def start_gateway(
    pool: asyncpg.Pool, settings: Settings, key_ring: MasterKeyRing | None, address: str | None = None
) -> Gateway:
    """Build and start the gRPC server on ``address`` (default ``settings.grpc_addr``).

    Serves NotificationService, PaymentService, TenantAdminService (operator token), health
    and reflection. Port 0 picks a free port; the bound one is in
    ``Gateway.port``. Raises ``RuntimeError`` if the address cannot be bound.
    """
    drain = DrainInterceptor()
    server = grpc.aio.server(interceptors=[drain])
    authenticator = Authenticator(pool)
    add_notification_service_to_server(
        NotificationService(
            pool,
            authenticator,
            topic_prefix=settings.kafka_topic_prefix,
            idempotency_retention_s=settings.idempotency_retention_s,
            write_concurrency=settings.db_write_concurrency,
        ),
        server,
    )
    add_payment_service_to_server(
        PaymentService(
            pool,
            authenticator,
            topic_prefix=settings.kafka_topic_prefix,
            idempotency_retention_s=settings.idempotency_retention_s,
        ),
        server,
    )
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    tenants_pb2_grpc.add_TenantAdminServiceServicer_to_server(
        TenantAdminService(
            pool, admin_token, key_ring, idempotency_retention_s=settings.idempotency_retention_s
        ),
        server,
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            NOTIFICATION_SERVICE_NAME,
            PAYMENT_SERVICE_NAME,
            ADMIN_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_insecure_port(address or settings.grpc_addr)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC address {address or settings.grpc_addr}")
    listener = TenantChangeListener(
        settings.require_database_url(), authenticator.invalidate_tenant, authenticator.invalidate_all
    )
    listener_task = asyncio.create_task(listener.run())
    await server.start()
    gateway = Gateway(
        server=server, health=health, port=port, listener=listener, listener_task=listener_task, drain=drain
    )
    await gateway.set_serving(True)
    gateway.health_task = asyncio.create_task(watch_database(pool, gateway))
    return gateway


async def watch_database(
    pool: asyncpg.Pool, gateway: Gateway, interval_s: float = HEALTH_PROBE_INTERVAL_S
) -> None:
    """Probe PostgreSQL every ``interval_s`` s (``SELECT 1``, bounded by the same
    time) and report NOT_SERVING while it cannot answer: the gateway cannot accept then."""
    serving = True
    while not gateway.stopping:
        try:
            async with asyncio.timeout(interval_s):
                await pool.fetchval("SELECT 1")
            healthy = True
        except Exception as exc:  # any failure to answer means we cannot accept
            healthy = False
            if serving:
                log.warning("database unreachable: health NOT_SERVING", error=type(exc).__name__)
        if healthy != serving:
            serving = healthy
            if healthy:
                log.info("database reachable again: health SERVING")
            await gateway.set_serving(healthy)
        await asyncio.sleep(interval_s)


async def run_gateway(settings: Settings) -> None:
    """Run the gateway process until SIGTERM/SIGINT, then drain and exit."""
    pool = await create_pool(settings)
    key_ring = await load_verified_key_ring(settings, pool)
    gateway = await start_gateway(pool, settings, key_ring)
    log.info("gateway serving", address=settings.grpc_addr, port=gateway.port)
    await wait_for_shutdown_signal()
    log.info("gateway draining", grace_s=settings.shutdown_grace_s)

    async def shut_down() -> None:
        await gateway.stop(grace_s=settings.shutdown_grace_s * 0.8)
        await pool.close()

    await drain(shut_down(), settings.shutdown_grace_s)
    log.info("gateway stopped")
