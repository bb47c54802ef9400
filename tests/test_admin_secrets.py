"""Operator-only access and secrets kept secret: no admin API without SWITCHBOARD_ADMIN_TOKEN,
API keys stored as hashes only, provider secrets never read back, keys and the operator
token never logged."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from structlog.testing import capture_logs

from gateway.server import Gateway, start_gateway
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tenants.sealing import MasterKeyRing
from tests.conftest import ADMIN_TOKEN
from tests.helpers import new_request_id, send_request

if TYPE_CHECKING:
    Admin = tenants_pb2_grpc.TenantAdminServiceAsyncStub

OPERATOR = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
ADMIN_SERVICE = tenants_pb2.DESCRIPTOR.services_by_name["TenantAdminService"]


@pytest.fixture
async def admin(gateway: Gateway) -> AsyncIterator[Admin]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield tenants_pb2_grpc.TenantAdminServiceStub(channel)


@pytest.fixture
async def tokenless_admin(
    pool: asyncpg.Pool, settings: Settings, key_ring: MasterKeyRing
) -> AsyncIterator[Admin]:
    """The admin API of a gateway started without SWITCHBOARD_ADMIN_TOKEN."""
    without_token = settings.model_copy(update={"admin_token": None})
    started = await start_gateway(pool, without_token, key_ring, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{started.port}") as channel:
            yield tenants_pb2_grpc.TenantAdminServiceStub(channel)
    finally:
        await started.stop(grace_s=1)


async def create_tenant(admin: Admin, name: str) -> str:
    reply = await admin.CreateTenant(
        tenants_pb2.CreateTenantRequest(request_id=new_request_id(), name=name), metadata=OPERATOR
    )
    return reply.tenant.tenant_id


# -- no token, no admin API ------------------------------------------------------------------


@pytest.mark.parametrize("method", [m.name for m in ADMIN_SERVICE.methods])
@pytest.mark.parametrize(
    "metadata",
    [(), OPERATOR, (("authorization", "Bearer "),)],
    ids=["no-credentials", "the-test-operator-token", "empty-bearer"],
)
async def test_without_an_admin_token_the_admin_api_refuses_every_call(
    method: str, metadata: tuple[tuple[str, str], ...], tokenless_admin: Admin, pool: asyncpg.Pool
) -> None:
    descriptor = ADMIN_SERVICE.methods_by_name[method]
    request: Any = getattr(tenants_pb2, descriptor.input_type.name)()
    if method == "CreateTenant":
        request.name = "sneaky"
    tenants_before = await pool.fetchval("SELECT count(*) FROM tenants")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(tokenless_admin, method)(request, metadata=metadata)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "SWITCHBOARD_ADMIN_TOKEN is not set" in (caught.value.details() or "")
    assert await pool.fetchval("SELECT count(*) FROM tenants") == tenants_before


# -- API keys: only the hash -----------------------------------------------------------------


async def every_row_as_text(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Every row of every table of the database, each as PostgreSQL's text form of the row
    (bytea as hex)."""
    tables = await pool.fetch(
        "SELECT table_name::text AS name FROM information_schema.tables"
        " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    )
    return {
        t["name"]: [r[0] for r in await pool.fetch(f'SELECT t::text FROM "{t["name"]}" t')]  # noqa: S608
        for t in tables
    }


async def test_api_keys_store_only_the_sha256_of_the_secret(admin: Admin, pool: asyncpg.Pool) -> None:
    tenant_id = await create_tenant(admin, "hashed")
    reply = await admin.CreateApiKey(
        tenants_pb2.CreateApiKeyRequest(request_id=new_request_id(), tenant_id=tenant_id), metadata=OPERATOR
    )
    token = reply.secret  # sb_<key id>_<secret>, shown once
    key_id, secret = token.removeprefix("sb_").split("_", 1)
    assert key_id == reply.api_key.key_id

    row = await pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
    assert row is not None
    assert row["secret_sha256"] == hashlib.sha256(secret.encode()).digest()
    for column, value in row.items():
        text = value.hex() if isinstance(value, bytes) else str(value)
        assert secret not in text, column
        assert token not in text, column
    for table, rows in (await every_row_as_text(pool)).items():
        assert not [r for r in rows if secret in r], f"the API key secret is stored in {table}"
    listed = await admin.ListApiKeys(tenants_pb2.ListApiKeysRequest(tenant_id=tenant_id), metadata=OPERATOR)
    assert secret not in str(listed)


# -- provider secrets are never read back ----------------------------------------------------

#: provider -> (channel, its configuration with a given secret, the name of that secret field)
SECRET_CONFIGS: dict[
    str, tuple[notify_pb2.Channel.ValueType, Callable[[str], tenants_pb2.ProviderConfig], str]
] = {
    "brevo": (
        notify_pb2.CHANNEL_EMAIL,
        lambda secret: tenants_pb2.ProviderConfig(
            brevo=tenants_pb2.BrevoConfig(api_key=secret, sender_email="news@acme.example")
        ),
        "api_key",
    ),
    "twilio": (
        notify_pb2.CHANNEL_SMS,
        lambda secret: tenants_pb2.ProviderConfig(
            twilio=tenants_pb2.TwilioConfig(
                account_sid="AC" + "0123456789abcdef" * 2, auth_token=secret, from_number="+14155550100"
            )
        ),
        "auth_token",
    ),
    "two_factor": (
        notify_pb2.CHANNEL_SMS,
        lambda secret: tenants_pb2.ProviderConfig(
            two_factor=tenants_pb2.TwoFactorConfig(api_key=secret, sender_id="ACMEIN")
        ),
        "api_key",
    ),
}


@pytest.mark.parametrize("provider", sorted(SECRET_CONFIGS))
async def test_provider_config_reads_hide_the_secret(provider: str, admin: Admin) -> None:
    channel, make_config, secret_field = SECRET_CONFIGS[provider]
    tenant_id = await create_tenant(admin, f"reads-{provider.replace('_', '-')}")
    secret = f"{provider}-secret-{uuid.uuid4().hex}"

    set_reply = await admin.SetProviderConfig(
        tenants_pb2.SetProviderConfigRequest(
            request_id=new_request_id(), tenant_id=tenant_id, channel=channel, config=make_config(secret)
        ),
        metadata=OPERATOR,
    )
    got = await admin.GetProviderConfig(
        tenants_pb2.GetProviderConfigRequest(tenant_id=tenant_id, channel=channel), metadata=OPERATOR
    )
    listed = await admin.ListProviderConfigs(
        tenants_pb2.ListProviderConfigsRequest(tenant_id=tenant_id), metadata=OPERATOR
    )

    assert got.config.provider == provider
    assert list(got.config.secret_fields) == [secret_field]  # which secret is set...
    assert got.config.secret_fingerprint  # ...and a fingerprint to compare, never the value
    assert set_reply.config == got.config
    assert list(listed.configs) == [got.config]
    for reply in (set_reply, got, listed):
        assert secret not in str(reply)
        assert secret.encode() not in reply.SerializeToString()


# -- keys and the operator token stay out of logs --------------------------------------------


async def test_api_keys_and_the_operator_token_never_appear_in_logs(
    admin: Admin,
    gateway: Gateway,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = notify_pb2_grpc.NotificationServiceStub(channel)
        with capture_logs() as structlog_events:
            tenant_id = await create_tenant(admin, "logged")
            created = await admin.CreateApiKey(
                tenants_pb2.CreateApiKeyRequest(request_id=new_request_id(), tenant_id=tenant_id),
                metadata=OPERATOR,
            )
            tenant_key = (("authorization", f"Bearer {created.secret}"),)
            await stub.SendNotification(send_request(), metadata=tenant_key)
            refusals = []
            for call in (
                # a tenant key on the admin API, the operator token on the tenant API
                admin.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=tenant_key),
                stub.SendNotification(send_request(), metadata=OPERATOR),
                # a near miss of the operator token; the tenant key after it is revoked
                admin.ListTenants(
                    tenants_pb2.ListTenantsRequest(), metadata=(("authorization", f"Bearer {ADMIN_TOKEN}x"),)
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                refusals.append(caught.value)
            await admin.RevokeApiKey(
                tenants_pb2.RevokeApiKeyRequest(
                    request_id=new_request_id(), tenant_id=tenant_id, key_id=created.api_key.key_id
                ),
                metadata=OPERATOR,
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SendNotification(send_request(), metadata=tenant_key)
            refusals.append(caught.value)

    assert [r.code() for r in refusals] == [grpc.StatusCode.UNAUTHENTICATED] * 4
    key_secret = created.secret.split("_", 2)[2]
    out, err = capfd.readouterr()
    texts = {
        "structlog": repr(structlog_events),
        "stdlib logging": caplog.text,
        "stdout/stderr": out + err,
        "error details": " ".join(f"{r.details()} {r.trailing_metadata()}" for r in refusals),
    }
    for where, text in texts.items():
        assert key_secret not in text, f"the tenant API key appears in {where}"
        assert ADMIN_TOKEN not in text, f"the operator token appears in {where}"
