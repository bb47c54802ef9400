"""TenantAdminService: operator-only access, tenants, keys, provider configs, invalidation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from gateway.server import Gateway
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tests.conftest import ADMIN_TOKEN, TenantCredentials
from tests.helpers import send_request
from tests.test_gateway import rich_status, violations

if TYPE_CHECKING:
    Admin = tenants_pb2_grpc.TenantAdminServiceAsyncStub
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub

OPERATOR = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
SMTP_PASSWORD = "smtp-pass-7f3a9c1e-never-shown"


@pytest.fixture
async def admin(gateway: Gateway) -> AsyncIterator[Admin]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield tenants_pb2_grpc.TenantAdminServiceStub(channel)


def smtp_config(
    port: int = 2525, password: str = SMTP_PASSWORD, username: str = "acme"
) -> tenants_pb2.ProviderConfig:
    return tenants_pb2.ProviderConfig(
        smtp=tenants_pb2.SmtpConfig(
            host="127.0.0.1",
            port=port,
            tls_mode=tenants_pb2.SMTP_TLS_MODE_NONE,
            username=username,
            password=password,
            from_address="Acme <no-reply@acme.example>",
        )
    )


async def create_tenant(admin: Admin, name: str) -> tenants_pb2.Tenant:
    reply = await admin.CreateTenant(tenants_pb2.CreateTenantRequest(name=name), metadata=OPERATOR)
    return reply.tenant


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong-token"),), (("authorization", f"Basic {ADMIN_TOKEN}"),)],
)
async def test_admin_api_refuses_anything_but_the_operator_token(
    admin: Admin, metadata: tuple[tuple[str, str], ...]
) -> None:
    assert await code_of(admin.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=metadata)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


async def test_admin_api_refuses_a_tenant_api_key(admin: Admin, tenant: TenantCredentials) -> None:
    request = tenants_pb2.GetTenantRequest(tenant_id=str(tenant.tenant_id))
    assert (
        await code_of(admin.GetTenant(request, metadata=tenant.metadata)) == grpc.StatusCode.UNAUTHENTICATED
    )


async def test_tenant_lifecycle_and_pagination(admin: Admin) -> None:
    created = [await create_tenant(admin, f"tenant-{i}") for i in range(5)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await admin.ListTenants(
            tenants_pb2.ListTenantsRequest(page_size=2, page_token=token), metadata=OPERATOR
        )
        seen += [t.tenant_id for t in page.tenants]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == [t.tenant_id for t in created]
    assert pages == 3

    updated = await admin.UpdateTenant(
        tenants_pb2.UpdateTenantRequest(
            tenant=tenants_pb2.Tenant(
                tenant_id=created[0].tenant_id,
                display_name="Tenant Zero",
                limits=tenants_pb2.TenantLimits(max_delivery_attempts=3),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name", "limits.max_delivery_attempts"]),
        ),
        metadata=OPERATOR,
    )
    assert updated.tenant.display_name == "Tenant Zero"
    assert updated.tenant.limits.max_delivery_attempts == 3
    got = await admin.GetTenant(
        tenants_pb2.GetTenantRequest(tenant_id=created[0].tenant_id), metadata=OPERATOR
    )
    assert got.tenant == updated.tenant


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (tenants_pb2.CreateTenantRequest(name="Bad Name"), "name"),
        (tenants_pb2.CreateTenantRequest(name="ok", display_name="x" * 201), "display_name"),
        (
            tenants_pb2.CreateTenantRequest(
                name="ok", limits=tenants_pb2.TenantLimits(max_delivery_attempts=-1)
            ),
            "limits.max_delivery_attempts",
        ),
    ],
)
async def test_create_tenant_validation(
    admin: Admin, request_: tenants_pb2.CreateTenantRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTenant(request_, metadata=OPERATOR)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(rich_status(caught.value))


async def test_duplicate_name_and_unknown_ids(admin: Admin) -> None:
    await create_tenant(admin, "dup")
    assert (
        await code_of(admin.CreateTenant(tenants_pb2.CreateTenantRequest(name="dup"), metadata=OPERATOR))
        == grpc.StatusCode.ALREADY_EXISTS
    )
    missing = "00000000-0000-4000-8000-000000000000"
    assert (
        await code_of(admin.GetTenant(tenants_pb2.GetTenantRequest(tenant_id=missing), metadata=OPERATOR))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        await code_of(admin.GetTenant(tenants_pb2.GetTenantRequest(tenant_id="nope"), metadata=OPERATOR))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.ListTenants(tenants_pb2.ListTenantsRequest(page_token="garbage!"), metadata=OPERATOR)
    assert "page_token" in violations(rich_status(caught.value))


async def wait_for_code(call_factory: object, code: grpc.StatusCode, within_s: float) -> float:
    """Seconds until the call answers ``code``; fails after ``within_s``."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if await code_of(call_factory()) == code:  # type: ignore[operator]
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {code} within {within_s} s")


async def test_keys_created_listed_and_revoked_everywhere_within_a_second(admin: Admin, stub: Stub) -> None:
    tenant = await create_tenant(admin, "keyed")
    created = await admin.CreateApiKey(
        tenants_pb2.CreateApiKeyRequest(tenant_id=tenant.tenant_id), metadata=OPERATOR
    )
    assert created.secret.startswith(f"sb_{created.api_key.key_id}_")
    key_metadata = (("authorization", f"Bearer {created.secret}"),)
    await stub.SendNotification(send_request(), metadata=key_metadata)  # the gateway now caches this key

    listed = await admin.ListApiKeys(
        tenants_pb2.ListApiKeysRequest(tenant_id=tenant.tenant_id), metadata=OPERATOR
    )
    assert [k.key_id for k in listed.api_keys] == [created.api_key.key_id]
    assert created.secret.split("_", 2)[2].encode() not in listed.SerializeToString()
    assert listed.api_keys[0].HasField("last_use_time")

    await admin.RevokeApiKey(
        tenants_pb2.RevokeApiKeyRequest(tenant_id=tenant.tenant_id, key_id=created.api_key.key_id),
        metadata=OPERATOR,
    )
    took = await wait_for_code(
        lambda: stub.SendNotification(send_request(), metadata=key_metadata),
        grpc.StatusCode.UNAUTHENTICATED,
        1.0,
    )
    assert took < 1.0


async def test_disabled_tenant_is_refused_and_enabled_again(
    admin: Admin, stub: Stub, tenant: TenantCredentials
) -> None:
    await stub.SendNotification(send_request(), metadata=tenant.metadata)
    await admin.DisableTenant(
        tenants_pb2.DisableTenantRequest(tenant_id=str(tenant.tenant_id)), metadata=OPERATOR
    )
    await wait_for_code(
        lambda: stub.SendNotification(send_request(), metadata=tenant.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        1.0,
    )
    enabled = await admin.EnableTenant(
        tenants_pb2.EnableTenantRequest(tenant_id=str(tenant.tenant_id)), metadata=OPERATOR
    )
    assert not enabled.tenant.disabled
    await wait_for_code(
        lambda: stub.SendNotification(send_request(), metadata=tenant.metadata), grpc.StatusCode.OK, 1.0
    )


async def test_provider_config_is_validated_stored_sealed_and_never_returned(
    admin: Admin, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    tenant_id = str(tenant.tenant_id)
    stored = await admin.SetProviderConfig(
        tenants_pb2.SetProviderConfigRequest(
            tenant_id=tenant_id, channel=notify_pb2.CHANNEL_EMAIL, config=smtp_config()
        ),
        metadata=OPERATOR,
    )
    view = stored.config
    assert (view.provider, view.settings["host"], view.settings["port"]) == ("smtp", "127.0.0.1", "2525")
    assert list(view.secret_fields) == ["password"]
    assert len(view.secret_fingerprint) == 16
    got = await admin.GetProviderConfig(
        tenants_pb2.GetProviderConfigRequest(tenant_id=tenant_id, channel=notify_pb2.CHANNEL_EMAIL),
        metadata=OPERATOR,
    )
    listed = await admin.ListProviderConfigs(
        tenants_pb2.ListProviderConfigsRequest(tenant_id=tenant_id), metadata=OPERATOR
    )
    for message in (stored, got, listed):
        assert SMTP_PASSWORD.encode() not in message.SerializeToString()
    row = await pool.fetchrow("SELECT settings::text AS settings, ciphertext FROM provider_configs")
    assert row is not None
    assert SMTP_PASSWORD not in row["settings"]
    assert SMTP_PASSWORD.encode() not in row["ciphertext"]

    changed = await admin.SetProviderConfig(
        tenants_pb2.SetProviderConfigRequest(
            tenant_id=tenant_id, channel=notify_pb2.CHANNEL_EMAIL, config=smtp_config(password="another-one")
        ),
        metadata=OPERATOR,
    )
    assert changed.config.secret_fingerprint != view.secret_fingerprint

    await admin.DeleteProviderConfig(
        tenants_pb2.DeleteProviderConfigRequest(tenant_id=tenant_id, channel=notify_pb2.CHANNEL_EMAIL),
        metadata=OPERATOR,
    )
    assert (
        await code_of(
            admin.GetProviderConfig(
                tenants_pb2.GetProviderConfigRequest(tenant_id=tenant_id, channel=notify_pb2.CHANNEL_EMAIL),
                metadata=OPERATOR,
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )


def _service_account(**overrides: object) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info: dict[str, object] = {
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "sa@demo-project.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    info.update(overrides)
    return json.dumps({k: v for k, v in info.items() if v is not None})


INVALID_CONFIGS = [
    (notify_pb2.CHANNEL_EMAIL, tenants_pb2.ProviderConfig(), "config"),
    (notify_pb2.CHANNEL_UNSPECIFIED, smtp_config(), "channel"),
    (notify_pb2.CHANNEL_SMS, smtp_config(), "config.smtp"),
    (notify_pb2.CHANNEL_EMAIL, smtp_config(port=0), "config.smtp.port"),
    (
        notify_pb2.CHANNEL_EMAIL,
        tenants_pb2.ProviderConfig(
            smtp=tenants_pb2.SmtpConfig(
                port=25, tls_mode=tenants_pb2.SMTP_TLS_MODE_NONE, from_address="a@b.example"
            )
        ),
        "config.smtp.host",
    ),
    (
        notify_pb2.CHANNEL_EMAIL,
        tenants_pb2.ProviderConfig(brevo=tenants_pb2.BrevoConfig(api_key="k", sender_email="not an address")),
        "config.brevo.sender_email",
    ),
    (
        notify_pb2.CHANNEL_SMS,
        tenants_pb2.ProviderConfig(
            two_factor=tenants_pb2.TwoFactorConfig(api_key="k", sender_id="TOOLONGID")
        ),
        "config.two_factor.sender_id",
    ),
    (
        notify_pb2.CHANNEL_SMS,
        tenants_pb2.ProviderConfig(twilio=tenants_pb2.TwilioConfig(account_sid="AC123", auth_token="t")),
        "config.twilio.account_sid",
    ),
    (
        notify_pb2.CHANNEL_PUSH,
        tenants_pb2.ProviderConfig(fcm=tenants_pb2.FcmConfig(service_account_json="{not json")),
        "config.fcm.service_account_json",
    ),
    (
        notify_pb2.CHANNEL_PUSH,
        tenants_pb2.ProviderConfig(
            fcm=tenants_pb2.FcmConfig(service_account_json=_service_account(private_key=None))
        ),
        "config.fcm.service_account_json",
    ),
    (
        notify_pb2.CHANNEL_PUSH,
        tenants_pb2.ProviderConfig(
            fcm=tenants_pb2.FcmConfig(service_account_json=_service_account(project_id=None))
        ),
        "config.fcm.service_account_json",
    ),
]


@pytest.mark.parametrize(("channel", "config", "field"), INVALID_CONFIGS)
async def test_invalid_provider_config_names_the_field_and_stores_nothing(
    admin: Admin,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    channel: int,
    config: tenants_pb2.ProviderConfig,
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.SetProviderConfig(
            tenants_pb2.SetProviderConfigRequest(
                tenant_id=str(tenant.tenant_id),
                channel=channel,  # type: ignore[arg-type]
                config=config,
            ),
            metadata=OPERATOR,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(rich_status(caught.value))
    assert await pool.fetchval("SELECT count(*) FROM provider_configs") == 0


async def test_valid_fcm_config_is_accepted_without_echoing_the_key(
    admin: Admin, tenant: TenantCredentials
) -> None:
    account = _service_account()
    stored = await admin.SetProviderConfig(
        tenants_pb2.SetProviderConfigRequest(
            tenant_id=str(tenant.tenant_id),
            channel=notify_pb2.CHANNEL_PUSH,
            config=tenants_pb2.ProviderConfig(fcm=tenants_pb2.FcmConfig(service_account_json=account)),
        ),
        metadata=OPERATOR,
    )
    assert stored.config.settings["project_id"] == "demo-project"
    assert b"PRIVATE KEY" not in stored.SerializeToString()
