"""Payment processor configurations: the admin API, sealing, rotation, and the processor cache."""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
import uuid6
from structlog.testing import capture_logs

from gateway.server import Gateway
from payments.adyen import AdyenProcessor
from payments.adyen_signature import AdyenWebhookVerifier
from payments.adyen_signature import compute_signature as adyen_signature
from payments.processor import (
    CaptureMethod,
    ChargeRequest,
    PaymentProcessor,
    PermanentProcessorError,
    ProcessorPayment,
    ProcessorRefund,
    ProcessorStatus,
)
from payments.stripe import StripeProcessor
from payments.stripe_signature import signature_header, verify_signature
from switchboard.fakes.adyen import FakeAdyen
from switchboard.fakes.stripe import FakeStripe
from switchboard.settings import Settings
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tenants.invalidation import TenantChangeListener
from tenants.master_keys import rotate_master_key, verify_master_keys
from tenants.processor_cache import (
    CacheClosed,
    PostgresProcessorLoader,
    ProcessorCache,
    ProcessorConfigUnusable,
    ProcessorNotConfigured,
    TenantProcessors,
    build_processor,
    processor_cache_for,
)
from tenants.processor_config import ProcessorSecrets, split_processor_config
from tenants.processor_store import StoredProcessorConfig, get_processor_config, upsert_processor_config
from tenants.sealing import (
    MasterKeyError,
    MasterKeyRing,
    SealedSecret,
    SecretUnreadable,
    generate_master_key,
    processor_secrets_associated_data,
    secrets_associated_data,
)
from tests.conftest import ADMIN_TOKEN, TenantCredentials, make_tenant
from tests.helpers import new_request_id
from tests.test_admin_cli import cli
from tests.test_gateway import rich_status, violations

if TYPE_CHECKING:
    Admin = tenants_pb2_grpc.TenantAdminServiceAsyncStub

OPERATOR = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
STRIPE_KEY = "sk_test_51NzProcessorCfg0123456789abcdefABCDEFneverShown"
STRIPE_WHSEC = "whsec_procfgOld0123456789abcdefNeverShown"
STRIPE_WHSEC_NEW = "whsec_procfgNew0123456789abcdefNeverShown"
ADYEN_KEY = "AQEyhmfxK4_procfg_api_key_5f9c7e1d2b3a4c5d6e7f8091a2b3c4d5"
ADYEN_MERCHANT = "SwitchboardTestECOM"
ADYEN_HMAC = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
ADYEN_HMAC_NEW = "74F490DD33F7327BAECC88B2947C011FC02D014A473AAA33A8EC93E4DC069174"
SECRETS = (STRIPE_KEY, STRIPE_WHSEC, STRIPE_WHSEC_NEW, ADYEN_KEY, ADYEN_HMAC, ADYEN_HMAC_NEW)
HOUR = 3600.0


@pytest.fixture
async def admin(gateway: Gateway) -> AsyncIterator[Admin]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield tenants_pb2_grpc.TenantAdminServiceStub(channel)


def stripe_config(
    *,
    key: str = STRIPE_KEY,
    webhook_secrets: tuple[str, ...] = (STRIPE_WHSEC,),
    base_url: str = "",
    priority: int = 0,
) -> tenants_pb2.ProcessorConfig:
    return tenants_pb2.ProcessorConfig(
        priority=priority,
        stripe=tenants_pb2.StripeConfig(secret_key=key, webhook_secrets=webhook_secrets, base_url=base_url),
    )


def adyen_config(
    *,
    key: str = ADYEN_KEY,
    merchant: str = ADYEN_MERCHANT,
    hmac_keys: tuple[str, ...] = (ADYEN_HMAC,),
    base_url: str = "",
    return_url: str = "",
    model: str = "",
    priority: int = 0,
) -> tenants_pb2.ProcessorConfig:
    return tenants_pb2.ProcessorConfig(
        priority=priority,
        adyen=tenants_pb2.AdyenConfig(
            api_key=key,
            merchant_account=merchant,
            hmac_keys=hmac_keys,
            base_url=base_url,
            return_url=return_url,
            recurring_processing_model=model,
        ),
    )


async def set_config(admin: Admin, tenant_id: uuid.UUID, config: tenants_pb2.ProcessorConfig) -> Any:
    reply = await admin.SetProcessorConfig(
        tenants_pb2.SetProcessorConfigRequest(
            request_id=new_request_id(), tenant_id=str(tenant_id), config=config
        ),
        metadata=OPERATOR,
    )
    return reply.config


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def assert_no_secret(*texts: str | bytes) -> None:
    for text in texts:
        data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        for secret in SECRETS:
            assert secret.encode() not in data
            assert secret.lower().encode() not in data


def assert_exception_secret_free(exc: BaseException) -> None:
    assert_no_secret(str(exc), repr(exc), "".join(traceback.format_exception(exc)))


# --- the admin API ----------------------------------------------------------------------------------


async def test_processor_configs_are_set_read_listed_and_deleted_without_secrets(
    admin: Admin, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    tid = tenant.tenant_id
    stripe = await set_config(admin, tid, stripe_config(priority=5, base_url="http://127.0.0.1:9/"))
    assert (stripe.processor, stripe.priority) == ("stripe", 5)
    assert dict(stripe.settings) == {
        "base_url": "http://127.0.0.1:9/",
        "mode": "test",
        "key_type": "secret",
    }
    assert list(stripe.secret_fields) == ["secret_key", "webhook_secrets"]
    assert len(stripe.secret_fingerprint) == 16
    assert len(stripe.webhook_secret_fingerprints) == 1
    assert stripe.HasField("update_time")

    adyen = await set_config(
        admin, tid, adyen_config(priority=1, hmac_keys=(ADYEN_HMAC.lower(),), model="Subscription")
    )
    assert adyen.settings["merchant_account"] == ADYEN_MERCHANT
    assert adyen.settings["recurring_processing_model"] == "Subscription"
    assert list(adyen.secret_fields) == ["api_key", "hmac_keys"]

    got = await admin.GetProcessorConfig(
        tenants_pb2.GetProcessorConfigRequest(tenant_id=str(tid), processor="stripe"), metadata=OPERATOR
    )
    assert got.config == stripe
    listed = await admin.ListProcessorConfigs(
        tenants_pb2.ListProcessorConfigsRequest(tenant_id=str(tid)), metadata=OPERATOR
    )
    assert [c.processor for c in listed.configs] == ["adyen", "stripe"]  # failover order: priority
    for message in (stripe, adyen, got, listed):
        assert_no_secret(message.SerializeToString(), str(message))

    rows = await pool.fetch("SELECT settings::text AS settings, ciphertext FROM processor_configs")
    assert len(rows) == 2
    for row in rows:
        assert_no_secret(row["settings"], row["ciphertext"])

    # Rolling the webhook secret: the old one's fingerprint stays, a new one appears.
    rolled = await set_config(
        admin, tid, stripe_config(priority=5, webhook_secrets=(STRIPE_WHSEC_NEW, STRIPE_WHSEC))
    )
    assert rolled.webhook_secret_fingerprints[1] == stripe.webhook_secret_fingerprints[0]
    assert rolled.webhook_secret_fingerprints[0] != stripe.webhook_secret_fingerprints[0]
    assert rolled.secret_fingerprint != stripe.secret_fingerprint
    live = await set_config(admin, tid, stripe_config(key="rk_live_" + "a1" * 12, webhook_secrets=()))
    assert (live.settings["mode"], live.settings["key_type"]) == ("live", "restricted")
    assert list(live.secret_fields) == ["secret_key"]
    assert list(live.webhook_secret_fingerprints) == []

    delete = tenants_pb2.DeleteProcessorConfigRequest(
        request_id=new_request_id(), tenant_id=str(tid), processor="stripe"
    )
    await admin.DeleteProcessorConfig(delete, metadata=OPERATOR)
    delete.request_id = new_request_id()  # a new request: the same request_id would replay the answer
    assert await code_of(admin.DeleteProcessorConfig(delete, metadata=OPERATOR)) == grpc.StatusCode.NOT_FOUND
    get = tenants_pb2.GetProcessorConfigRequest(tenant_id=str(tid), processor="stripe")
    assert await code_of(admin.GetProcessorConfig(get, metadata=OPERATOR)) == grpc.StatusCode.NOT_FOUND
    assert await pool.fetchval("SELECT array_agg(processor) FROM processor_configs") == ["adyen"]


INVALID = [
    pytest.param(tenants_pb2.ProcessorConfig(), ["config"], id="no-processor"),
    pytest.param(stripe_config(key=""), ["config.stripe.secret_key"], id="stripe-no-key"),
    pytest.param(
        stripe_config(key="pk_test_" + "a" * 24), ["config.stripe.secret_key"], id="stripe-publishable"
    ),
    pytest.param(stripe_config(key="sk_prod_" + "a" * 24), ["config.stripe.secret_key"], id="stripe-mode"),
    pytest.param(stripe_config(key="sk_test_a b"), ["config.stripe.secret_key"], id="stripe-chars"),
    pytest.param(
        stripe_config(webhook_secrets=("sk_wrong_kind_0123456789",)),
        ["config.stripe.webhook_secrets[0]"],
        id="stripe-whsec-prefix",
    ),
    pytest.param(
        stripe_config(webhook_secrets=(STRIPE_WHSEC, STRIPE_WHSEC)),
        ["config.stripe.webhook_secrets[1]"],
        id="stripe-whsec-twice",
    ),
    pytest.param(
        stripe_config(webhook_secrets=tuple(f"whsec_{i}abcdefgh12345" for i in range(6))),
        ["config.stripe.webhook_secrets"],
        id="stripe-whsec-too-many",
    ),
    pytest.param(
        stripe_config(webhook_secrets=("",)), ["config.stripe.webhook_secrets[0]"], id="whsec-empty"
    ),
    pytest.param(stripe_config(base_url="ftp://x"), ["config.stripe.base_url"], id="stripe-base-url"),
    pytest.param(
        stripe_config(base_url="https://user:pw@api.example"),
        ["config.stripe.base_url"],
        id="url-credentials",
    ),
    pytest.param(stripe_config(priority=1001), ["config.priority"], id="priority-high"),
    pytest.param(stripe_config(priority=-1), ["config.priority"], id="priority-negative"),
    pytest.param(adyen_config(key=""), ["config.adyen.api_key"], id="adyen-no-key"),
    pytest.param(adyen_config(merchant=""), ["config.adyen.merchant_account"], id="adyen-no-merchant"),
    pytest.param(adyen_config(merchant="Acme ECOM"), ["config.adyen.merchant_account"], id="merchant-space"),
    pytest.param(adyen_config(hmac_keys=(ADYEN_HMAC[:-1],)), ["config.adyen.hmac_keys[0]"], id="hmac-odd"),
    pytest.param(
        adyen_config(hmac_keys=("ZZ" + ADYEN_HMAC[2:],)), ["config.adyen.hmac_keys[0]"], id="hmac-not-hex"
    ),
    pytest.param(adyen_config(hmac_keys=("ABCD",)), ["config.adyen.hmac_keys[0]"], id="hmac-short"),
    pytest.param(
        adyen_config(hmac_keys=(ADYEN_HMAC, ADYEN_HMAC.lower())),
        ["config.adyen.hmac_keys[1]"],
        id="hmac-twice",
    ),
    pytest.param(adyen_config(return_url="not a url"), ["config.adyen.return_url"], id="adyen-return-url"),
    pytest.param(adyen_config(model="Sometimes"), ["config.adyen.recurring_processing_model"], id="model"),
    pytest.param(
        adyen_config(key="", merchant="", hmac_keys=("xyz",), priority=2000),
        [
            "config.priority",
            "config.adyen.api_key",
            "config.adyen.merchant_account",
            "config.adyen.hmac_keys[0]",
        ],
        id="every-violation-at-once",
    ),
]


@pytest.mark.parametrize(("config", "fields"), INVALID)
async def test_invalid_processor_config_names_every_field_quotes_no_secret_and_stores_nothing(
    admin: Admin,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    config: tenants_pb2.ProcessorConfig,
    fields: list[str],
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_config(admin, tenant.tenant_id, config)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(rich_status(caught.value))
    assert sorted(found) == sorted(fields)
    assert_no_secret(str(caught.value), rich_status(caught.value).SerializeToString())
    assert await pool.fetchval("SELECT count(*) FROM processor_configs") == 0


async def test_publishable_key_is_refused_with_the_reason(admin: Admin, tenant: TenantCredentials) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_config(admin, tenant.tenant_id, stripe_config(key="pk_live_" + "b" * 24))
    assert "publishable" in violations(rich_status(caught.value))["config.stripe.secret_key"]
    assert "pk_live_" + "b" * 24 not in str(caught.value)


async def test_ids_names_tenants_and_the_operator_token_are_checked(
    admin: Admin, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    tid = str(tenant.tenant_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.SetProcessorConfig(
            tenants_pb2.SetProcessorConfigRequest(
                request_id=new_request_id(), tenant_id="nope", config=stripe_config(priority=-3)
            ),
            metadata=OPERATOR,
        )
    assert sorted(violations(rich_status(caught.value))) == ["config.priority", "tenant_id"]
    missing = "00000000-0000-4000-8000-000000000000"
    set_missing = admin.SetProcessorConfig(
        tenants_pb2.SetProcessorConfigRequest(
            request_id=new_request_id(), tenant_id=missing, config=stripe_config()
        ),
        metadata=OPERATOR,
    )
    assert await code_of(set_missing) == grpc.StatusCode.NOT_FOUND
    list_missing = admin.ListProcessorConfigs(
        tenants_pb2.ListProcessorConfigsRequest(tenant_id=missing), metadata=OPERATOR
    )
    assert await code_of(list_missing) == grpc.StatusCode.NOT_FOUND
    for processor in ("", "paypal", "STRIPE"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.GetProcessorConfig(
                tenants_pb2.GetProcessorConfigRequest(tenant_id=tid, processor=processor), metadata=OPERATOR
            )
        assert violations(rich_status(caught.value)) == {"processor": "one of stripe, adyen"}
        delete = admin.DeleteProcessorConfig(
            tenants_pb2.DeleteProcessorConfigRequest(
                request_id=new_request_id(), tenant_id=tid, processor=processor
            ),
            metadata=OPERATOR,
        )
        assert await code_of(delete) == grpc.StatusCode.INVALID_ARGUMENT

    # Only the operator token opens these RPCs; a tenant's own API key does not.
    request = tenants_pb2.SetProcessorConfigRequest(
        request_id=new_request_id(), tenant_id=tid, config=stripe_config()
    )
    for metadata in (tenant.metadata, (), (("authorization", "Bearer wrong"),)):
        assert await code_of(admin.SetProcessorConfig(request, metadata=metadata)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    get = tenants_pb2.GetProcessorConfigRequest(tenant_id=tid, processor="stripe")
    assert await code_of(admin.GetProcessorConfig(get, metadata=tenant.metadata)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )

    # One tenant's configuration is not another's.
    await set_config(admin, tenant.tenant_id, stripe_config())
    other = tenants_pb2.GetProcessorConfigRequest(tenant_id=str(other_tenant.tenant_id), processor="stripe")
    assert await code_of(admin.GetProcessorConfig(other, metadata=OPERATOR)) == grpc.StatusCode.NOT_FOUND
    listed = await admin.ListProcessorConfigs(
        tenants_pb2.ListProcessorConfigsRequest(tenant_id=str(other_tenant.tenant_id)), metadata=OPERATOR
    )
    assert list(listed.configs) == []


def test_validated_values_and_reprs_hold_no_secret() -> None:
    split = split_processor_config(adyen_config(hmac_keys=(ADYEN_HMAC.lower(), ADYEN_HMAC_NEW)))
    assert split.secrets.webhook_secrets == (ADYEN_HMAC, ADYEN_HMAC_NEW)  # normalized to upper case
    assert split.secret_fields == ["api_key", "hmac_keys"]
    assert ProcessorSecrets.from_json(split.secrets.to_json()) == split.secrets
    assert repr(split.secrets) == "ProcessorSecrets(api_key=<redacted>, webhook_secrets=<2 redacted>)"
    assert_no_secret(repr(split), str(split.secrets), split.settings.__repr__())
    for garbage in (b"not json", b"[]", b'{"api_key": ""}', b'{"api_key": "k", "webhook_secrets": [1]}'):
        with pytest.raises(ValueError, match="opened processor secrets") as info:
            ProcessorSecrets.from_json(garbage)
        assert "not json" not in str(info.value)


# --- sealing -------------------------------------------------------------------------------------


def test_processor_associated_data_binds_tenant_and_processor() -> None:
    tenant = uuid.UUID("5f0c8a2e-1d4b-4c6e-9e1a-000000000001")
    assert processor_secrets_associated_data(tenant, "stripe") == f"{tenant}/processor:stripe".encode()
    ring = MasterKeyRing.parse(generate_master_key("k1"))
    sealed = ring.seal(b'{"api_key": "x"}', processor_secrets_associated_data(tenant, "stripe"))
    assert ring.open(sealed, processor_secrets_associated_data(tenant, "stripe")) == b'{"api_key": "x"}'
    for wrong in (
        processor_secrets_associated_data(uuid.uuid4(), "stripe"),
        processor_secrets_associated_data(tenant, "adyen"),
        secrets_associated_data(tenant, "stripe"),
        secrets_associated_data(tenant, "email"),
    ):
        with pytest.raises(SecretUnreadable, match="another tenant, channel or processor"):
            ring.open(sealed, wrong)


async def test_a_ciphertext_moved_to_another_tenant_or_processor_does_not_open(
    admin: Admin, pool: asyncpg.Pool, key_ring: MasterKeyRing, tenant: TenantCredentials
) -> None:
    victim = await make_tenant(pool, "victim")
    await set_config(admin, tenant.tenant_id, stripe_config())
    await set_config(admin, victim.tenant_id, stripe_config(key="sk_test_" + "v" * 30, webhook_secrets=()))
    await set_config(admin, victim.tenant_id, adyen_config())
    # Copy acme's sealed Stripe secret over the victim's Stripe and Adyen rows.
    await pool.execute(
        """UPDATE processor_configs p SET key_id = s.key_id, nonce = s.nonce, ciphertext = s.ciphertext
             FROM processor_configs s
            WHERE s.tenant_id = $1 AND s.processor = 'stripe' AND p.tenant_id = $2""",
        tenant.tenant_id,
        victim.tenant_id,
    )
    moved = await get_processor_config(pool, victim.tenant_id, "stripe")
    assert moved is not None
    sealed = SealedSecret(moved.key_id, moved.nonce, moved.ciphertext)
    with pytest.raises(SecretUnreadable):
        key_ring.open(sealed, processor_secrets_associated_data(victim.tenant_id, "stripe"))
    assert key_ring.open(sealed, processor_secrets_associated_data(tenant.tenant_id, "stripe"))

    cache = ProcessorCache(PostgresProcessorLoader(pool, key_ring))
    try:
        with capture_logs() as logs:
            for name in ("stripe", "adyen"):
                with pytest.raises(ProcessorConfigUnusable, match="failed authentication") as info:
                    await cache.get_processor(victim.tenant_id, name)
                assert info.value.code == "processor_config_unusable"
                assert_exception_secret_free(info.value)
        assert await cache.processors_for(victim.tenant_id) == []
        unusable = [e["processor"] for e in logs if e["event"] == "payment processor configuration unusable"]
        assert unusable == ["adyen", "stripe"]  # logged once, at the load, in failover order
        assert_no_secret(repr(logs))
        # The owner's configuration is untouched.
        assert await cache.webhook_secrets(tenant.tenant_id, "stripe") == [STRIPE_WHSEC]
    finally:
        await cache.close()


# --- master key rotation --------------------------------------------------------------------------


async def store_config(
    pool: asyncpg.Pool, ring: MasterKeyRing, tenant_id: uuid.UUID, config: tenants_pb2.ProcessorConfig
) -> bytes:
    """Store ``config`` for the tenant sealed under ``ring``'s current key; return the plaintext."""
    split = split_processor_config(config)
    plaintext = split.secrets.to_json()
    sealed = ring.seal(plaintext, processor_secrets_associated_data(tenant_id, split.processor))
    async with pool.acquire() as conn, conn.transaction():
        await upsert_processor_config(
            conn,
            StoredProcessorConfig(
                tenant_id=tenant_id,
                processor=split.processor,
                priority=split.priority,
                settings=split.settings,
                secret_fields=split.secret_fields,
                key_id=sealed.key_id,
                nonce=sealed.nonce,
                ciphertext=sealed.ciphertext,
                secret_fingerprint=ring.fingerprint(plaintext),
                webhook_secret_fingerprints=[],
            ),
        )
    return plaintext


async def store_provider_row(pool: asyncpg.Pool, ring: MasterKeyRing, tenant_id: uuid.UUID) -> None:
    sealed = ring.seal(b'{"password": "pw"}', secrets_associated_data(tenant_id, "email"))
    await pool.execute(
        """INSERT INTO provider_configs (tenant_id, channel, provider, settings, secret_fields, key_id, nonce,
                                         ciphertext, secret_fingerprint)
           VALUES ($1, 'email', 'smtp', '{}', '{password}', $2, $3, $4, 'x')""",
        tenant_id,
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
    )


async def test_rotation_reencrypts_processor_secrets_too(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    old_entry, new_entry = generate_master_key("old"), generate_master_key("new")
    old_only, new_only = MasterKeyRing.parse(old_entry), MasterKeyRing.parse(new_entry)
    rotating = MasterKeyRing.parse(f"{new_entry},{old_entry}")
    tenants = [tenant.tenant_id] + [(await make_tenant(pool, f"rot{i}")).tenant_id for i in range(2)]
    expected: dict[tuple[uuid.UUID, str], bytes] = {}
    for tenant_id in tenants:
        await store_provider_row(pool, old_only, tenant_id)
        expected[(tenant_id, "stripe")] = await store_config(pool, old_only, tenant_id, stripe_config())
        expected[(tenant_id, "adyen")] = await store_config(pool, old_only, tenant_id, adyen_config())
    async with pool.acquire() as conn:
        await verify_master_keys(conn, old_only)
        # A ring without the old key is refused: processor rows count as rows under 'old'.
        with pytest.raises(MasterKeyError, match=r"'old' \(9 rows\)"):
            await verify_master_keys(conn, new_only)

    progress: list[tuple[int, int]] = []
    done = await rotate_master_key(
        pool, rotating, batch_size=4, progress=lambda d, t: progress.append((d, t))
    )
    assert done == 9
    assert progress == [(0, 9), (4, 9), (8, 9), (9, 9)]  # batches span both tables
    assert {r["key_id"] for r in await pool.fetch("SELECT key_id FROM processor_configs")} == {"new"}
    assert {r["key_id"] for r in await pool.fetch("SELECT key_id FROM provider_configs")} == {"new"}
    assert await rotate_master_key(pool, rotating) == 0

    rows = await pool.fetch("SELECT tenant_id, processor, key_id, nonce, ciphertext FROM processor_configs")
    opened = {
        (r["tenant_id"], r["processor"]): new_only.open(
            SealedSecret(r["key_id"], r["nonce"], r["ciphertext"]),
            processor_secrets_associated_data(r["tenant_id"], r["processor"]),
        )
        for r in rows
    }
    assert opened == expected
    # A process holding only the new key builds the processors.
    cache = ProcessorCache(PostgresProcessorLoader(pool, new_only))
    try:
        handles = await cache.processors_for(tenant.tenant_id)
        assert [h.name for h in handles] == ["adyen", "stripe"]
        assert await cache.webhook_secrets(tenant.tenant_id, "adyen") == [ADYEN_HMAC]
    finally:
        await cache.close()


async def test_rotation_names_the_processor_row_that_does_not_open(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    old_entry = generate_master_key("old")
    old = MasterKeyRing.parse(old_entry)
    await store_config(pool, old, tenant.tenant_id, stripe_config())
    await store_config(pool, old, tenant.tenant_id, adyen_config())
    async with pool.acquire() as conn:
        await verify_master_keys(conn, old)
    await pool.execute(
        """UPDATE processor_configs SET nonce = s.nonce, ciphertext = s.ciphertext
             FROM processor_configs s
            WHERE s.processor = 'stripe' AND processor_configs.processor = 'adyen'"""
    )
    rotating = MasterKeyRing.parse(f"{generate_master_key('new')},{old_entry}")
    with pytest.raises(
        SecretUnreadable, match=f"processor config of tenant {tenant.tenant_id} processor 'adyen'"
    ):
        await rotate_master_key(pool, rotating)
    assert {r["key_id"] for r in await pool.fetch("SELECT key_id FROM processor_configs")} == {"old"}


# --- the processor cache ---------------------------------------------------------------------------


class Spy:
    """A PaymentProcessor wrapping a real connector, counting ``aclose`` calls."""

    def __init__(self, inner: PaymentProcessor) -> None:
        self.inner = inner
        self.name = inner.name
        self.closes = 0

    async def create_charge(self, request: ChargeRequest) -> ProcessorPayment:
        return await self.inner.create_charge(request)

    async def capture(self, reference: str, amount_minor: int, currency: str, key: str) -> ProcessorPayment:
        return await self.inner.capture(reference, amount_minor, currency, key)

    async def cancel(self, reference: str, key: str) -> ProcessorPayment:
        return await self.inner.cancel(reference, key)

    async def refund(self, reference: str, amount_minor: int, currency: str, key: str) -> ProcessorRefund:
        return await self.inner.refund(reference, amount_minor, currency, key)

    async def lookup_charge(self, request: ChargeRequest) -> ProcessorPayment | None:
        return await self.inner.lookup_charge(request)

    async def aclose(self) -> None:
        self.closes += 1
        await self.inner.aclose()


class Builds:
    """A builder recording every processor it builds (as :class:`Spy` objects)."""

    def __init__(self) -> None:
        self.built: list[Spy] = []

    def __call__(self, config: StoredProcessorConfig, secrets: ProcessorSecrets) -> PaymentProcessor:
        spy = Spy(build_processor(config, secrets))
        self.built.append(spy)
        return spy


class FakeClock:
    """A monotonic clock moved by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spy(processor: PaymentProcessor) -> Spy:
    assert isinstance(processor, Spy)
    return processor


async def test_fifty_concurrent_first_uses_load_and_build_once(
    admin: Admin, pool: asyncpg.Pool, key_ring: MasterKeyRing, tenant: TenantCredentials
) -> None:
    await set_config(admin, tenant.tenant_id, stripe_config(priority=2))
    await set_config(admin, tenant.tenant_id, adyen_config(priority=2))
    builds = Builds()
    cache = ProcessorCache(PostgresProcessorLoader(pool, key_ring, build=builds))
    try:
        calls = [cache.get_processor(tenant.tenant_id, "stripe") for _ in range(25)]
        calls += [cache.get_processor(tenant.tenant_id, "adyen") for _ in range(25)]
        results = await asyncio.gather(*calls)
        assert len(builds.built) == 2
        assert len({id(p) for p in results[:25]}) == 1
        assert len({id(p) for p in results[25:]}) == 1
        assert {id(results[0]), id(results[25])} == {id(p) for p in builds.built}
        assert isinstance(spy(results[0]).inner, StripeProcessor)
        assert isinstance(spy(results[25]).inner, AdyenProcessor)
        stats = cache.stats
        assert (stats.loads, stats.misses, stats.hits, stats.load_failures) == (1, 50, 0, 0)

        handles = await cache.processors_for(tenant.tenant_id)
        assert [(h.name, h.priority) for h in handles] == [("adyen", 2), ("stripe", 2)]  # ties: by name
        assert handles[1].processor is results[0]
        assert await cache.webhook_secrets(tenant.tenant_id, "stripe") == [STRIPE_WHSEC]
        assert cache.stats.hits == 2
        assert len(builds.built) == 2
    finally:
        await cache.close()
    assert [p.closes for p in builds.built] == [1, 1]


async def test_idle_tenants_are_evicted_and_their_clients_closed(
    admin: Admin, pool: asyncpg.Pool, key_ring: MasterKeyRing, tenant: TenantCredentials
) -> None:
    await set_config(admin, tenant.tenant_id, stripe_config())
    builds = Builds()
    clock = FakeClock()
    cache = ProcessorCache(
        PostgresProcessorLoader(pool, key_ring, build=builds), idle_ttl_s=HOUR, timer=clock
    )
    try:
        first = spy(await cache.get_processor(tenant.tenant_id, "stripe"))
        clock.now += HOUR - 1
        assert await cache.get_processor(tenant.tenant_id, "stripe") is first  # used: idle time restarts
        clock.now += HOUR - 1
        assert cache.expire() == 0
        assert first.closes == 0
        clock.now += 1
        assert cache.expire() == 1  # an hour unused, without any lookup
        await cache.drain_releases()
        assert first.closes == 1
        assert cache.stats.evictions == 1
        assert len(cache) == 0

        second = spy(await cache.get_processor(tenant.tenant_id, "stripe"))
        assert second is not first
        assert cache.stats.loads == 2
    finally:
        await cache.close()
    assert second.closes == 1


async def test_the_least_recently_used_tenant_is_evicted_when_full(
    admin: Admin, pool: asyncpg.Pool, key_ring: MasterKeyRing, tenant: TenantCredentials
) -> None:
    other = await make_tenant(pool, "second")
    for tenant_id in (tenant.tenant_id, other.tenant_id):
        await set_config(admin, tenant_id, stripe_config())
    builds = Builds()
    cache = ProcessorCache(PostgresProcessorLoader(pool, key_ring, build=builds), max_tenants=1)
    try:
        first = spy(await cache.get_processor(tenant.tenant_id, "stripe"))
        second = spy(await cache.get_processor(other.tenant_id, "stripe"))
        await cache.drain_releases()
        assert (first.closes, second.closes) == (1, 0)
        assert cache.stats.evictions == 1
        assert len(cache) == 1
    finally:
        await cache.close()


async def test_a_configuration_change_invalidates_the_cache_through_listen_notify(
    admin: Admin, pool: asyncpg.Pool, settings: Settings, key_ring: MasterKeyRing, tenant: TenantCredentials
) -> None:
    await set_config(admin, tenant.tenant_id, stripe_config())
    builds = Builds()
    cache = processor_cache_for(pool, settings, key_ring, build=builds)
    changed = asyncio.Event()

    def on_change(tenant_id: uuid.UUID) -> None:
        cache.invalidate(tenant_id)
        changed.set()

    listener = TenantChangeListener(settings.require_database_url(), on_change, cache.invalidate_all)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        old = spy(await cache.get_processor(tenant.tenant_id, "stripe"))
        assert await cache.webhook_secrets(tenant.tenant_id, "stripe") == [STRIPE_WHSEC]

        await set_config(
            admin, tenant.tenant_id, stripe_config(webhook_secrets=(STRIPE_WHSEC_NEW, STRIPE_WHSEC))
        )
        await asyncio.wait_for(changed.wait(), 5)
        await cache.drain_releases()
        assert old.closes == 1
        assert await cache.webhook_secrets(tenant.tenant_id, "stripe") == [STRIPE_WHSEC_NEW, STRIPE_WHSEC]
        assert await cache.get_processor(tenant.tenant_id, "stripe") is not old

        changed.clear()
        await admin.DeleteProcessorConfig(
            tenants_pb2.DeleteProcessorConfigRequest(
                request_id=new_request_id(), tenant_id=str(tenant.tenant_id), processor="stripe"
            ),
            metadata=OPERATOR,
        )
        await asyncio.wait_for(changed.wait(), 5)
        with pytest.raises(ProcessorNotConfigured) as info:
            await cache.get_processor(tenant.tenant_id, "stripe")
        assert info.value.code == "processor_not_configured"
        assert isinstance(info.value, PermanentProcessorError)
        with pytest.raises(ProcessorNotConfigured):
            await cache.webhook_secrets(tenant.tenant_id, "stripe")
        assert await cache.processors_for(tenant.tenant_id) == []
        assert cache.stats.loads == 3
    finally:
        listener.stop()
        await asyncio.wait_for(task, 10)
        await cache.close()
    assert all(p.closes == 1 for p in builds.built)


class GatedLoader:
    """A loader whose calls wait for a gate; it can fail its next call."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_next: Exception | None = None
        self.built: list[Spy] = []

    async def __call__(self, tenant_id: uuid.UUID) -> TenantProcessors:
        from tenants.processor_cache import LoadedProcessor

        self.calls += 1
        self.started.set()
        await self.gate.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        processor = Spy(StripeProcessor(STRIPE_KEY, base_url="http://127.0.0.1:9"))
        self.built.append(processor)
        loaded = LoadedProcessor("stripe", 0, processor, (STRIPE_WHSEC,))
        return TenantProcessors(processors={"stripe": loaded})


async def test_invalidation_during_a_load_reloads_and_releases_the_stale_build() -> None:
    loader = GatedLoader()
    cache = ProcessorCache(loader)
    tenant_id = uuid.uuid4()
    waiting = asyncio.create_task(cache.get_processor(tenant_id, "stripe"))
    await loader.started.wait()
    cache.invalidate(tenant_id)
    loader.gate.set()
    got = spy(await waiting)
    assert loader.calls == 2
    await cache.drain_releases()
    assert [p.closes for p in loader.built] == [1, 0]
    assert got is loader.built[1]
    await cache.close()
    assert got.closes == 1
    with pytest.raises(CacheClosed):
        await cache.get_processor(tenant_id, "stripe")


async def test_a_failed_load_is_raised_to_every_caller_and_not_cached() -> None:
    loader = GatedLoader()
    loader.fail_next = OSError("database unreachable")
    cache = ProcessorCache(loader)
    tenant_id = uuid.uuid4()
    callers = [asyncio.create_task(cache.processors_for(tenant_id)) for _ in range(5)]
    await loader.started.wait()
    loader.gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, OSError) for o in outcomes)
    assert (loader.calls, cache.stats.load_failures) == (1, 1)
    assert [h.name for h in await cache.processors_for(tenant_id)] == ["stripe"]
    assert loader.calls == 2
    await cache.close()


def test_cache_rejects_bad_limits() -> None:
    loader = GatedLoader()
    with pytest.raises(ValueError, match="max_tenants"):
        ProcessorCache(loader, max_tenants=0)
    with pytest.raises(ValueError, match="idle_ttl_s"):
        ProcessorCache(loader, idle_ttl_s=0)


# --- end to end: configured through the API, used through the cache ---------------------------------


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    server = FakeStripe(STRIPE_KEY)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def fake_adyen() -> AsyncIterator[FakeAdyen]:
    server = FakeAdyen(ADYEN_KEY, ADYEN_MERCHANT, hmac_key=ADYEN_HMAC)
    await server.start()
    yield server
    server.release()
    await server.stop()


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


async def test_processors_configured_through_the_api_charge_and_verify_webhooks_without_leaking_secrets(
    admin: Admin,
    pool: asyncpg.Pool,
    settings: Settings,
    key_ring: MasterKeyRing,
    tenant: TenantCredentials,
    fake_stripe: FakeStripe,
    fake_adyen: FakeAdyen,
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    await set_config(admin, tenant.tenant_id, stripe_config(base_url=fake_stripe.base_url, priority=1))
    await set_config(
        admin,
        tenant.tenant_id,
        adyen_config(base_url=fake_adyen.checkout_url, hmac_keys=(ADYEN_HMAC_NEW, ADYEN_HMAC)),
    )
    cache = processor_cache_for(pool, settings, key_ring)
    try:
        with capture_logs() as logs:
            handles = await cache.processors_for(tenant.tenant_id)
            assert [h.name for h in handles] == ["adyen", "stripe"]
            stripe = await cache.get_processor(tenant.tenant_id, "stripe")
            paid = await stripe.create_charge(
                ChargeRequest(
                    payment_id=uuid.uuid4(),
                    attempt_no=1,
                    amount_minor=1050,
                    currency="EUR",
                    payment_method="pm_card_visa",
                    capture_method=CaptureMethod.AUTOMATIC,
                )
            )
            assert paid.status == ProcessorStatus.SUCCEEDED
            adyen = await cache.get_processor(tenant.tenant_id, "adyen")
            authorised = await adyen.create_charge(
                ChargeRequest(
                    payment_id=uuid6.uuid7(),
                    attempt_no=1,
                    amount_minor=1050,
                    currency="EUR",
                    payment_method="stored_succeed",
                    capture_method=CaptureMethod.AUTOMATIC,
                    customer_reference="customer-42",
                )
            )
            assert authorised.status == ProcessorStatus.SUCCEEDED

            payload = json.dumps({"id": "evt_1", "type": "payment_intent.succeeded"})
            header = signature_header(payload, STRIPE_WHSEC)
            secrets = await cache.webhook_secrets(tenant.tenant_id, "stripe")
            verify_signature(payload, header, secrets)
            item = {
                "pspReference": authorised.processor_reference,
                "merchantAccountCode": ADYEN_MERCHANT,
                "merchantReference": "ref-1",
                "amount": {"value": 1050, "currency": "EUR"},
                "eventCode": "AUTHORISATION",
                "success": "true",
            }
            item["additionalData"] = {"hmacSignature": adyen_signature(item, ADYEN_HMAC)}
            keys = await cache.webhook_secrets(tenant.tenant_id, "adyen")
            assert keys == [ADYEN_HMAC_NEW, ADYEN_HMAC]
            assert AdyenWebhookVerifier(keys).verify_item(item) == 1  # matched the second (older) key

            for handle in handles:
                assert_no_secret(repr(handle), str(handle.processor))
            assert_no_secret(repr(cache.stats), repr(cache))
            for name in ("paypal",):
                with pytest.raises(ProcessorNotConfigured) as info:
                    await cache.get_processor(tenant.tenant_id, name)
                assert_exception_secret_free(info.value)
        assert_no_secret(repr(logs))
    finally:
        await cache.close()
    out, err = capfd.readouterr()
    assert_no_secret(out, err, debug_logs.text)
    for record in debug_logs.records:
        assert_no_secret(record.getMessage())


async def test_operator_manages_processors_from_the_cli(gateway: Gateway, tenant: TenantCredentials) -> None:
    tid = str(tenant.tenant_id)
    config = {"priority": 3, "stripe": {"secretKey": STRIPE_KEY, "webhookSecrets": [STRIPE_WHSEC]}}
    base = ("providers", "processors")
    set_result = await cli(gateway, *base, "set", tid, "--config", "-", stdin=json.dumps(config))
    assert set_result.returncode == 0, set_result.stderr
    got = await cli(gateway, *base, "get", tid, "stripe")
    assert got.returncode == 0, got.stderr
    assert "stripe" in got.stdout
    assert "secret_key" in got.stdout  # which secret fields are set
    listed = await cli(gateway, *base, "list", tid)
    assert "stripe" in listed.stdout

    refused = await cli(
        gateway,
        *base,
        "set",
        tid,
        "--config",
        "-",
        stdin=json.dumps({"stripe": {"secretKey": "pk_test_" + "c" * 24}}),
    )
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT" in refused.stdout
    garbage = await cli(
        gateway, *base, "set", tid, "--config", "-", stdin='{"stripe": {"secretKey": 1' + STRIPE_KEY
    )
    assert garbage.returncode != 0
    assert "not a ProcessorConfig" in garbage.stdout + garbage.stderr

    deleted = await cli(gateway, *base, "delete", tid, "stripe")
    assert deleted.returncode == 0, deleted.stderr
    missing = await cli(gateway, *base, "get", tid, "stripe")
    assert "NOT_FOUND" in missing.stdout
    for output in (set_result, got, listed, refused, garbage, deleted, missing):
        assert_no_secret(output.stdout, output.stderr)
        assert "pk_test_" + "c" * 24 not in output.stdout + output.stderr
