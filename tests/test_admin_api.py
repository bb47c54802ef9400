"""TenantAdminService: operator-only access, tenants, keys, provider configs, invalidation."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import typing
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import code_pb2, error_details_pb2

from gateway.admin_idempotency import AdminIdempotency, AdminMutation
from gateway.errors import RpcError
from gateway.idempotency import request_fingerprint
from gateway.relay import reap_idempotency_keys
from gateway.server import Gateway
from switchboard.db.pool import Connection
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tenants import store
from tenants.sealing import MasterKeyRing, generate_master_key
from tests.conftest import ADMIN_TOKEN, TenantCredentials
from tests.helpers import new_request_id, send_request
from tests.test_gateway import error_reason, rich_status, violations

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
    reply = await admin.CreateTenant(
        tenants_pb2.CreateTenantRequest(request_id=new_request_id(), name=name), metadata=OPERATOR
    )
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
            request_id=new_request_id(),
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
        (tenants_pb2.CreateTenantRequest(request_id=new_request_id(), name="Bad Name"), "name"),
        (
            tenants_pb2.CreateTenantRequest(request_id=new_request_id(), name="ok", display_name="x" * 201),
            "display_name",
        ),
        (
            tenants_pb2.CreateTenantRequest(
                request_id=new_request_id(),
                name="ok",
                limits=tenants_pb2.TenantLimits(max_delivery_attempts=-1),
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
        await code_of(
            admin.CreateTenant(
                tenants_pb2.CreateTenantRequest(request_id=new_request_id(), name="dup"), metadata=OPERATOR
            )
        )
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
        tenants_pb2.CreateApiKeyRequest(request_id=new_request_id(), tenant_id=tenant.tenant_id),
        metadata=OPERATOR,
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
        tenants_pb2.RevokeApiKeyRequest(
            request_id=new_request_id(), tenant_id=tenant.tenant_id, key_id=created.api_key.key_id
        ),
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
        tenants_pb2.DisableTenantRequest(request_id=new_request_id(), tenant_id=str(tenant.tenant_id)),
        metadata=OPERATOR,
    )
    await wait_for_code(
        lambda: stub.SendNotification(send_request(), metadata=tenant.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        1.0,
    )
    enabled = await admin.EnableTenant(
        tenants_pb2.EnableTenantRequest(request_id=new_request_id(), tenant_id=str(tenant.tenant_id)),
        metadata=OPERATOR,
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
            request_id=new_request_id(),
            tenant_id=tenant_id,
            channel=notify_pb2.CHANNEL_EMAIL,
            config=smtp_config(),
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
            request_id=new_request_id(),
            tenant_id=tenant_id,
            channel=notify_pb2.CHANNEL_EMAIL,
            config=smtp_config(password="another-one"),
        ),
        metadata=OPERATOR,
    )
    assert changed.config.secret_fingerprint != view.secret_fingerprint

    await admin.DeleteProviderConfig(
        tenants_pb2.DeleteProviderConfigRequest(
            request_id=new_request_id(), tenant_id=tenant_id, channel=notify_pb2.CHANNEL_EMAIL
        ),
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
                request_id=new_request_id(),
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
            request_id=new_request_id(),
            tenant_id=str(tenant.tenant_id),
            channel=notify_pb2.CHANNEL_PUSH,
            config=tenants_pb2.ProviderConfig(fcm=tenants_pb2.FcmConfig(service_account_json=account)),
        ),
        metadata=OPERATOR,
    )
    assert stored.config.settings["project_id"] == "demo-project"
    assert b"PRIVATE KEY" not in stored.SerializeToString()


# --- idempotency (AIP-155 request_id, Stripe's semantics, operator scope) ----------------------

ADMIN_SERVICE = tenants_pb2.DESCRIPTOR.services_by_name["TenantAdminService"]
MUTATING_METHODS = [m.name for m in ADMIN_SERVICE.methods if not m.name.startswith(("Get", "List"))]


async def admin_keys(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM admin_idempotency_keys ORDER BY created_at")


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def test_every_mutating_admin_rpc_takes_a_request_id() -> None:
    assert len(MUTATING_METHODS) == 12
    assert set(typing.get_args(AdminMutation)) == {
        getattr(tenants_pb2, ADMIN_SERVICE.methods_by_name[m].input_type.name) for m in MUTATING_METHODS
    }
    for method in MUTATING_METHODS:
        fields = ADMIN_SERVICE.methods_by_name[method].input_type.fields_by_name
        assert fields["request_id"].type == fields["request_id"].TYPE_STRING, method


@pytest.mark.parametrize("method", MUTATING_METHODS)
@pytest.mark.parametrize("request_id", ["", "has space", "x" * 129])
async def test_a_mutation_without_a_valid_request_id_is_refused_and_stores_nothing(
    admin: Admin, tenant: TenantCredentials, pool: asyncpg.Pool, method: str, request_id: str
) -> None:
    request_class = getattr(tenants_pb2, ADMIN_SERVICE.methods_by_name[method].input_type.name)
    request = request_class(request_id=request_id)
    if "tenant_id" in request_class.DESCRIPTOR.fields_by_name:
        request.tenant_id = str(tenant.tenant_id)
    error = await rpc_error(getattr(admin, method)(request, metadata=OPERATOR))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in violations(rich_status(error))
    assert await admin_keys(pool) == []


async def test_the_same_key_and_request_replays_the_first_answer_and_changes_nothing(
    admin: Admin, pool: asyncpg.Pool
) -> None:
    create = tenants_pb2.CreateTenantRequest(request_id=new_request_id(), name="replayed")
    first = await admin.CreateTenant(create, metadata=OPERATOR)
    assert await admin.CreateTenant(create, metadata=OPERATOR) == first
    assert await pool.fetchval("SELECT count(*) FROM tenants WHERE name = 'replayed'") == 1

    def rename(display_name: str) -> tenants_pb2.UpdateTenantRequest:
        return tenants_pb2.UpdateTenantRequest(
            request_id=new_request_id(),
            tenant=tenants_pb2.Tenant(tenant_id=first.tenant.tenant_id, display_name=display_name),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )

    to_a, to_b = rename("A"), rename("B")
    answer_a = await admin.UpdateTenant(to_a, metadata=OPERATOR)
    await admin.UpdateTenant(to_b, metadata=OPERATOR)
    # The replay is the stored first answer, not a second execution: B stays.
    assert await admin.UpdateTenant(to_a, metadata=OPERATOR) == answer_a
    assert await pool.fetchval("SELECT display_name FROM tenants WHERE name = 'replayed'") == "B"
    assert len(await admin_keys(pool)) == 3


async def test_an_error_answer_is_replayed_with_its_details(
    admin: Admin, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    delete = tenants_pb2.DeleteProviderConfigRequest(
        request_id=new_request_id(), tenant_id=str(tenant.tenant_id), channel=notify_pb2.CHANNEL_EMAIL
    )
    first = await rpc_error(admin.DeleteProviderConfig(delete, metadata=OPERATOR))
    assert first.code() == grpc.StatusCode.NOT_FOUND
    await admin.SetProviderConfig(
        tenants_pb2.SetProviderConfigRequest(
            request_id=new_request_id(),
            tenant_id=str(tenant.tenant_id),
            channel=notify_pb2.CHANNEL_EMAIL,
            config=smtp_config(),
        ),
        metadata=OPERATOR,
    )
    # Now a delete would succeed, but the key's answer was NOT_FOUND: that is replayed.
    again = await rpc_error(admin.DeleteProviderConfig(delete, metadata=OPERATOR))
    assert again.code() == grpc.StatusCode.NOT_FOUND
    assert rich_status(again) == rich_status(first)
    assert await pool.fetchval("SELECT count(*) FROM provider_configs") == 1

    # A change that fails commits nothing but its key: ALREADY_EXISTS leaves no tenant behind.
    taken = tenants_pb2.CreateTenantRequest(request_id=new_request_id(), name="taken")
    await create_tenant(admin, "taken")
    for _ in range(2):
        error = await rpc_error(admin.CreateTenant(taken, metadata=OPERATOR))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await pool.fetchval("SELECT count(*) FROM tenants WHERE name = 'taken'") == 1


async def test_the_same_key_with_another_request_is_failed_precondition(
    admin: Admin, pool: asyncpg.Pool
) -> None:
    key = new_request_id()
    created = await admin.CreateTenant(
        tenants_pb2.CreateTenantRequest(request_id=key, name="first"), metadata=OPERATOR
    )
    other_values = admin.CreateTenant(
        tenants_pb2.CreateTenantRequest(request_id=key, name="second"), metadata=OPERATOR
    )
    other_method = admin.DisableTenant(
        tenants_pb2.DisableTenantRequest(request_id=key, tenant_id=created.tenant.tenant_id),
        metadata=OPERATOR,
    )
    for call in (other_values, other_method):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(rich_status(error)) == "IDEMPOTENCY_KEY_REUSED"
        assert "was already used for a different request" in (error.details() or "")
    assert await pool.fetchval("SELECT count(*) FROM tenants WHERE name = 'second'") == 0
    assert await pool.fetchval("SELECT disabled_at FROM tenants WHERE name = 'first'") is None


async def test_twenty_concurrent_calls_with_one_key_create_exactly_one_tenant_and_one_key(
    admin: Admin, pool: asyncpg.Pool
) -> None:
    create = tenants_pb2.CreateTenantRequest(request_id=new_request_id(), name="raced")
    tenants = await asyncio.gather(*(admin.CreateTenant(create, metadata=OPERATOR) for _ in range(20)))
    assert {t.tenant.tenant_id for t in tenants} == {tenants[0].tenant.tenant_id}
    assert await pool.fetchval("SELECT count(*) FROM tenants WHERE name = 'raced'") == 1

    key_request = tenants_pb2.CreateApiKeyRequest(
        request_id=new_request_id(), tenant_id=tenants[0].tenant.tenant_id
    )
    keys = await asyncio.gather(*(admin.CreateApiKey(key_request, metadata=OPERATOR) for _ in range(20)))
    assert {k.api_key.key_id for k in keys} == {keys[0].api_key.key_id}
    assert await pool.fetchval("SELECT count(*) FROM api_keys") == 1
    # The first answer carries the secret; the 19 replays withhold it.
    assert sorted(k.secret_withheld for k in keys) == [False] + [True] * 19
    assert len({k.secret for k in keys if not k.secret_withheld}) == 1


async def all_rows_as_text(pool: asyncpg.Pool) -> str:
    """Every row of every table in the database, as text (bytea columns as hex)."""
    tables = await pool.fetch(
        "SELECT quote_ident(tablename) AS name FROM pg_tables WHERE schemaname = 'public'"
    )
    texts = []
    for row in tables:
        texts += [r[0] for r in await pool.fetch(f"SELECT t::text FROM {row['name']} t")]  # noqa: S608
    return "\n".join(texts)


async def test_a_replayed_api_key_withholds_the_secret_which_is_nowhere_at_rest_or_in_logs(
    admin: Admin,
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    request = tenants_pb2.CreateApiKeyRequest(request_id=new_request_id(), tenant_id=str(tenant.tenant_id))
    first = await admin.CreateApiKey(request, metadata=OPERATOR)
    replay = await admin.CreateApiKey(request, metadata=OPERATOR)
    assert first.secret.startswith(f"sb_{first.api_key.key_id}_")
    assert not first.secret_withheld
    assert replay.api_key == first.api_key
    assert replay.secret == ""
    assert replay.secret_withheld
    # The first answer's key works (it is the key stored as a hash).
    await stub.SendNotification(send_request(), metadata=(("authorization", f"Bearer {first.secret}"),))

    secret_part = first.secret.split("_", 2)[2]
    at_rest = await all_rows_as_text(pool)
    [stored] = await admin_keys(pool)
    for needle in (first.secret, secret_part):
        assert needle not in at_rest
        assert needle.encode().hex() not in at_rest
        assert needle.encode() not in stored["response"]
    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err, repr(stored)):
        assert secret_part not in text


async def test_a_replayed_status_callback_withholds_its_signing_secret(
    admin: Admin, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = tenants_pb2.SetStatusCallbackRequest(
        request_id=new_request_id(), tenant_id=str(tenant.tenant_id), url="https://hooks.example.com/sb"
    )
    first = await admin.SetStatusCallback(request, metadata=OPERATOR)
    replay = await admin.SetStatusCallback(request, metadata=OPERATOR)
    assert len(first.signing_secret) == 64
    assert not first.signing_secret_withheld
    assert replay.callback == first.callback
    assert (replay.signing_secret, replay.signing_secret_withheld) == ("", True)
    # Replayed, not executed again: the secret in force is still the first one.
    signing = await pool.fetchval("SELECT signing_secret FROM tenant_callbacks")
    assert signing.hex() == first.signing_secret
    [stored] = await admin_keys(pool)
    assert bytes.fromhex(first.signing_secret) not in stored["response"]
    assert first.signing_secret.encode() not in stored["response"]


async def test_requests_with_provider_secrets_are_compared_by_a_keyed_hash(
    admin: Admin, tenant: TenantCredentials, pool: asyncpg.Pool, key_ring: MasterKeyRing
) -> None:
    request = tenants_pb2.SetProviderConfigRequest(
        request_id=new_request_id(),
        tenant_id=str(tenant.tenant_id),
        channel=notify_pb2.CHANNEL_EMAIL,
        config=smtp_config(),
    )
    first = await admin.SetProviderConfig(request, metadata=OPERATOR)
    assert await admin.SetProviderConfig(request, metadata=OPERATOR) == first
    [stored] = await admin_keys(pool)
    plain = request_fingerprint(request.DESCRIPTOR.full_name, request)
    assert stored["hash_key_id"] == key_ring.current_key_id
    assert stored["request_hash"] == key_ring.keyed_digest(plain)
    assert stored["request_hash"] != plain  # an unkeyed hash would let guesses of the password be tested
    assert SMTP_PASSWORD not in await all_rows_as_text(pool)
    assert SMTP_PASSWORD.encode().hex() not in await all_rows_as_text(pool)

    changed = tenants_pb2.SetProviderConfigRequest()
    changed.CopyFrom(request)
    changed.config.smtp.password = "another-password"
    error = await rpc_error(admin.SetProviderConfig(changed, metadata=OPERATOR))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(rich_status(error)) == "IDEMPOTENCY_KEY_REUSED"


async def test_a_keyed_hash_is_compared_under_its_own_master_key_after_a_rotation(
    pool: asyncpg.Pool, master_key: str, tenant: TenantCredentials
) -> None:
    request = tenants_pb2.SetProviderConfigRequest(
        request_id=new_request_id(), tenant_id=str(tenant.tenant_id), config=smtp_config()
    )
    writes = 0

    async def write(conn: Connection) -> tenants_pb2.SetProviderConfigResponse:
        nonlocal writes
        writes += 1
        return tenants_pb2.SetProviderConfigResponse(config=tenants_pb2.ProviderConfigView(provider="smtp"))

    async def run(ring: MasterKeyRing) -> tenants_pb2.SetProviderConfigResponse:
        return await AdminIdempotency(pool, ring).run(
            request, tenants_pb2.SetProviderConfigResponse, write, keyed=True
        )

    answer = await run(MasterKeyRing.parse(master_key))
    new_key = generate_master_key("test2")
    # A new current key, the old one still in the ring: the record is compared under the old one.
    assert await run(MasterKeyRing.parse(f"{new_key},{master_key}")) == answer
    assert writes == 1
    # The old key removed within the retention window: the record can no longer be compared.
    with pytest.raises(RpcError) as caught:
        await run(MasterKeyRing.parse(new_key))
    assert caught.value.status.code == code_pb2.FAILED_PRECONDITION
    assert error_reason(caught.value.status) == "IDEMPOTENCY_KEY_UNVERIFIABLE"
    assert writes == 1


async def test_a_caller_waiting_too_long_for_a_concurrent_key_is_aborted_and_may_retry(
    pool: asyncpg.Pool, key_ring: MasterKeyRing
) -> None:
    request = tenants_pb2.CreateTenantRequest(request_id=new_request_id(), name="waited")

    async def write(conn: Connection) -> tenants_pb2.CreateTenantResponse:
        tenant = await store.create_tenant(conn, request.name)
        return tenants_pb2.CreateTenantResponse(tenant=tenants_pb2.Tenant(tenant_id=str(tenant.id)))

    once = AdminIdempotency(pool, key_ring, lock_timeout_ms=100)
    holder = await pool.acquire()
    try:
        transaction = holder.transaction()
        await transaction.start()
        # Another call's transaction holds the key, uncommitted.
        await holder.execute(
            "INSERT INTO admin_idempotency_keys (request_id, request_hash, response) VALUES ($1, $2, '')",
            request.request_id,
            bytes(32),
        )
        with pytest.raises(RpcError) as caught:
            await once.run(request, tenants_pb2.CreateTenantResponse, write)
        await transaction.rollback()  # that call failed: the key is free again
    finally:
        await pool.release(holder)
    status = caught.value.status
    assert status.code == code_pb2.ABORTED
    assert error_reason(status) == "IDEMPOTENCY_KEY_IN_FLUX"
    assert any(d.Unpack(error_details_pb2.RetryInfo()) for d in status.details)
    assert await pool.fetchval("SELECT count(*) FROM tenants WHERE name = 'waited'") == 0
    # Retrying with the same request_id is safe: it runs once.
    created = await once.run(request, tenants_pb2.CreateTenantResponse, write)
    assert await once.run(request, tenants_pb2.CreateTenantResponse, write) == created
    assert await pool.fetchval("SELECT count(*) FROM tenants WHERE name = 'waited'") == 1


async def age_admin_keys(pool: asyncpg.Pool, hours: float) -> None:
    await pool.execute(
        "UPDATE admin_idempotency_keys SET created_at = now() - make_interval(hours => $1)", hours
    )


async def test_an_expired_admin_key_is_a_new_request_and_the_reaper_deletes_it(
    admin: Admin, pool: asyncpg.Pool
) -> None:
    key = new_request_id()
    await admin.CreateTenant(tenants_pb2.CreateTenantRequest(request_id=key, name="old"), metadata=OPERATOR)
    await age_admin_keys(pool, 25)  # the default retention is 24 h
    taken_over = await admin.CreateTenant(
        tenants_pb2.CreateTenantRequest(request_id=key, name="new"), metadata=OPERATOR
    )
    assert taken_over.tenant.name == "new"
    for name in ("a", "b"):
        await create_tenant(admin, f"expired-{name}")
    await age_admin_keys(pool, 25)
    await create_tenant(admin, "fresh")
    assert await reap_idempotency_keys(pool, retention_s=24 * 3600) == 3
    assert await reap_idempotency_keys(pool, retention_s=24 * 3600) == 0
    assert len(await admin_keys(pool)) == 1
