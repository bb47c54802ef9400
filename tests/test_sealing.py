"""Encryption at rest: AES-256-GCM sealing, the master key ring, the start-up check, rotation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import uuid

import asyncpg
import pytest

from tenants.master_keys import CANARY_ASSOCIATED_DATA, rotate_master_key, verify_master_keys
from tenants.sealing import (
    DEFAULT_KEY_ID,
    MasterKeyError,
    MasterKeyRing,
    SealedSecret,
    SecretUnreadable,
    generate_master_key,
    secrets_associated_data,
)
from tests.conftest import TenantCredentials, make_tenant

TENANT = uuid.UUID("5f0c2a8e-1d3b-4c5a-9e7f-0a1b2c3d4e5f")
OTHER_TENANT = uuid.UUID("9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
SECRET = b'{"password":"hunter2-smtp"}'


def b64_key(n: int = 32) -> str:
    return base64.b64encode(secrets.token_bytes(n)).decode()


def ring_of(*entries: str) -> MasterKeyRing:
    return MasterKeyRing.parse(",".join(entries))


def assert_no_key_material(exc: BaseException, *keys: str) -> None:
    for text in (str(exc), repr(exc)):
        for key in keys:
            assert key not in text
            assert key.rstrip("=") not in text


# --- sealing --------------------------------------------------------------------------------------------


def test_round_trip() -> None:
    ring = MasterKeyRing.parse(f"k1:{b64_key()}")
    ad = secrets_associated_data(TENANT, "email")
    sealed = ring.seal(SECRET, ad)
    assert sealed.key_id == "k1"
    assert len(sealed.nonce) == 12
    assert len(sealed.ciphertext) == len(SECRET) + 16
    assert SECRET not in sealed.ciphertext
    assert ring.open(sealed, ad) == SECRET


def test_each_seal_uses_a_fresh_nonce() -> None:
    ring = MasterKeyRing.parse(f"k1:{b64_key()}")
    ad = secrets_associated_data(TENANT, "email")
    first, second = ring.seal(SECRET, ad), ring.seal(SECRET, ad)
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext


def test_associated_data_format() -> None:
    assert secrets_associated_data(TENANT, "sms") == f"{TENANT}/sms".encode()


@pytest.mark.parametrize("bit", [0, 7, 8 * len(SECRET) + 127])
def test_flipped_ciphertext_bit_is_unreadable(bit: int) -> None:
    ring = MasterKeyRing.parse(f"k1:{b64_key()}")
    ad = secrets_associated_data(TENANT, "email")
    sealed = ring.seal(SECRET, ad)
    data = bytearray(sealed.ciphertext)
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SecretUnreadable, match="failed authentication"):
        ring.open(SealedSecret(sealed.key_id, sealed.nonce, bytes(data)), ad)


def test_flipped_nonce_bit_is_unreadable() -> None:
    ring = MasterKeyRing.parse(f"k1:{b64_key()}")
    ad = secrets_associated_data(TENANT, "email")
    sealed = ring.seal(SECRET, ad)
    nonce = bytes([sealed.nonce[0] ^ 1]) + sealed.nonce[1:]
    with pytest.raises(SecretUnreadable):
        ring.open(SealedSecret(sealed.key_id, nonce, sealed.ciphertext), ad)


@pytest.mark.parametrize(("tenant_id", "channel"), [(OTHER_TENANT, "email"), (TENANT, "sms")])
def test_wrong_associated_data_is_unreadable(tenant_id: uuid.UUID, channel: str) -> None:
    ring = MasterKeyRing.parse(f"k1:{b64_key()}")
    sealed = ring.seal(SECRET, secrets_associated_data(TENANT, "email"))
    with pytest.raises(SecretUnreadable, match="another tenant, channel or processor"):
        ring.open(sealed, secrets_associated_data(tenant_id, channel))


def test_wrong_key_under_the_same_id_is_unreadable() -> None:
    right, wrong = MasterKeyRing.parse(f"k1:{b64_key()}"), MasterKeyRing.parse(f"k1:{b64_key()}")
    ad = secrets_associated_data(TENANT, "email")
    with pytest.raises(SecretUnreadable, match="'k1'"):
        wrong.open(right.seal(SECRET, ad), ad)


def test_unknown_key_id_is_unreadable() -> None:
    ring = MasterKeyRing.parse(f"k2:{b64_key()},k3:{b64_key()}")
    other = MasterKeyRing.parse(f"k1:{b64_key()}")
    ad = secrets_associated_data(TENANT, "email")
    with pytest.raises(SecretUnreadable, match="'k1', which is not in SWITCHBOARD_MASTER_KEY") as info:
        ring.open(other.seal(SECRET, ad), ad)
    assert "k2, k3" in str(info.value)


def test_malformed_sealed_secret_is_unreadable() -> None:
    ring = MasterKeyRing.parse(f"k1:{b64_key()}")
    ad = secrets_associated_data(TENANT, "email")
    with pytest.raises(SecretUnreadable, match="malformed"):
        ring.open(SealedSecret("k1", b"short", b"x" * 32), ad)
    with pytest.raises(SecretUnreadable, match="malformed"):
        ring.open(SealedSecret("k1", b"n" * 12, b"x" * 15), ad)


def test_secret_unreadable_is_a_master_key_error() -> None:
    assert issubclass(SecretUnreadable, MasterKeyError)


# --- the ring -------------------------------------------------------------------------------------------


def test_first_entry_seals_and_others_open() -> None:
    old_key, new_key = b64_key(), b64_key()
    old = MasterKeyRing.parse(f"old:{old_key}")
    both = MasterKeyRing.parse(f" new:{new_key} , old:{old_key} ")
    assert both.current_key_id == "new"
    assert both.key_ids == ("new", "old")
    assert "old" in both
    assert "gone" not in both
    ad = secrets_associated_data(TENANT, "push")
    assert both.open(old.seal(SECRET, ad), ad) == SECRET
    assert both.seal(SECRET, ad).key_id == "new"


def test_bare_key_gets_the_default_id() -> None:
    ring = MasterKeyRing.parse(b64_key())
    assert ring.key_ids == (DEFAULT_KEY_ID,) == ("default",)


def test_url_safe_and_unpadded_base64_are_accepted() -> None:
    raw = secrets.token_bytes(32)
    standard = base64.b64encode(raw).decode()
    url_safe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    ad = secrets_associated_data(TENANT, "email")
    sealed = MasterKeyRing.parse(f"k1:{standard}").seal(SECRET, ad)
    assert MasterKeyRing.parse(f"k1:{url_safe}").open(sealed, ad) == SECRET


def test_key_ids_allow_the_documented_characters() -> None:
    key_id = "Key_1.2-" + "x" * 24
    assert MasterKeyRing.parse(f"{key_id}:{b64_key()}").current_key_id == key_id


def test_generate_master_key() -> None:
    entry = generate_master_key()
    key_id, _, encoded = entry.partition(":")
    assert len(base64.b64decode(encoded)) == 32
    assert MasterKeyRing.parse(entry).current_key_id == key_id
    assert generate_master_key() != entry
    assert generate_master_key("k9").startswith("k9:")
    with pytest.raises(MasterKeyError, match="key id"):
        generate_master_key("no spaces")


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_or_empty_value(value: str | None) -> None:
    with pytest.raises(MasterKeyError, match="SWITCHBOARD_MASTER_KEY is not set or empty"):
        MasterKeyRing.parse(value)


def test_bad_base64_does_not_leak_the_value() -> None:
    bad = b64_key()[:-2] + "*!"
    with pytest.raises(MasterKeyError, match="not valid base64") as info:
        MasterKeyRing.parse(f"k1:{bad}")
    assert_no_key_material(info.value, bad)
    assert info.value.__cause__ is None


def test_mixed_base64_alphabets_are_rejected() -> None:
    bad = "+" + "-" + b64_key()[2:]
    with pytest.raises(MasterKeyError, match="mixes standard and URL-safe") as info:
        MasterKeyRing.parse(f"k1:{bad}")
    assert_no_key_material(info.value, bad)


@pytest.mark.parametrize("length", [31, 33, 16, 0])
def test_wrong_key_length(length: int) -> None:
    key = b64_key(length)
    with pytest.raises(MasterKeyError, match=f"decodes to {length} bytes; AES-256 needs exactly 32") as info:
        MasterKeyRing.parse(f"k1:{key}")
    if key:
        assert_no_key_material(info.value, key)


def test_bare_31_byte_key() -> None:
    key = b64_key(31)
    with pytest.raises(MasterKeyError, match="31 bytes") as info:
        MasterKeyRing.parse(key)
    assert_no_key_material(info.value, key)


def test_duplicate_key_id() -> None:
    first, second = b64_key(), b64_key()
    with pytest.raises(MasterKeyError, match="'k1' appears more than once") as info:
        MasterKeyRing.parse(f"k1:{first},k2:{b64_key()},k1:{second}")
    assert_no_key_material(info.value, first, second)


@pytest.mark.parametrize("key_id", ["", "has space", "x" * 33, "k/1", "ключ"])
def test_malformed_key_id(key_id: str) -> None:
    key = b64_key()
    with pytest.raises(MasterKeyError, match="the key id must be 1-32 characters") as info:
        MasterKeyRing.parse(f"{key_id}:{key}")
    assert_no_key_material(info.value, key)


def test_swapped_entry_does_not_echo_the_key() -> None:
    # "base64:id" instead of "id:base64": the would-be id is the key and must not be echoed.
    key = b64_key()
    with pytest.raises(MasterKeyError) as info:
        MasterKeyRing.parse(f"{key}:k1")
    assert_no_key_material(info.value, key)


def test_several_entries_need_ids_and_no_empty_entries() -> None:
    first, second = b64_key(), b64_key()
    with pytest.raises(MasterKeyError, match="entry 2 has no key id") as info:
        MasterKeyRing.parse(f"k1:{first},{second}")
    assert_no_key_material(info.value, first, second)
    with pytest.raises(MasterKeyError, match="entry 2 is empty"):
        MasterKeyRing.parse(f"k1:{first},")


def test_constructor_validates_pairs() -> None:
    with pytest.raises(MasterKeyError, match="empty"):
        MasterKeyRing([])
    with pytest.raises(MasterKeyError, match="31 bytes"):
        MasterKeyRing([("k1", b"\x00" * 31)])
    assert MasterKeyRing([("k1", b"\x01" * 32)]).key_ids == ("k1",)


def test_reprs_hold_no_key_material() -> None:
    raw_new, raw_old = secrets.token_bytes(32), secrets.token_bytes(32)
    new, old = base64.b64encode(raw_new).decode(), base64.b64encode(raw_old).decode()
    ring = MasterKeyRing.parse(f"new:{new},old:{old}")
    text = repr(ring) + str(ring)
    assert text == "MasterKeyRing(current_key_id='new', key_ids=['new', 'old'])" * 2
    for key in (new, old, raw_new.hex(), raw_old.hex(), repr(raw_new), repr(raw_old)):
        assert key not in text
    sealed = ring.seal(SECRET, b"ad")
    shown = repr(sealed)
    assert shown == "SealedSecret(key_id='new', nonce=<12 bytes>, ciphertext=<43 bytes>)"
    assert repr(sealed.ciphertext) not in shown
    assert sealed.ciphertext.hex() not in shown
    assert repr(sealed.nonce) not in shown


def test_fingerprint() -> None:
    key = b64_key()
    ring = MasterKeyRing.parse(f"k1:{key}")
    fingerprint = ring.fingerprint(SECRET)
    assert len(fingerprint) == 16
    assert int(fingerprint, 16) >= 0
    assert ring.fingerprint(SECRET) == fingerprint
    assert MasterKeyRing.parse(f"k1:{key},k0:{b64_key()}").fingerprint(SECRET) == fingerprint
    assert ring.fingerprint(SECRET + b" ") != fingerprint
    assert ring.fingerprint(b"") != fingerprint
    # Keyed: another master key gives another fingerprint.
    assert MasterKeyRing.parse(f"k1:{b64_key()}").fingerprint(SECRET) != fingerprint


def test_fingerprint_known_answer() -> None:
    # HKDF-SHA256 (RFC 5869: no salt = 32 zero bytes, one output block) then HMAC-SHA256, by hand.
    ikm = b"\x00" * 32
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm = hmac.new(prk, b"switchboard secret fingerprint" + b"\x01", hashlib.sha256).digest()
    expected = hmac.new(okm, b"data", hashlib.sha256).hexdigest()[:16]
    assert MasterKeyRing([("k1", ikm)]).fingerprint(b"data") == expected


# --- the database: start-up check and rotation ----------------------------------------------------------


async def insert_config(
    pool: asyncpg.Pool, ring: MasterKeyRing, tenant_id: uuid.UUID, channel: str = "email"
) -> bytes:
    """Insert a provider_configs row sealed under ``ring``'s current key; return its plaintext."""
    plaintext = json.dumps({"password": f"pw-{tenant_id}-{channel}"}).encode()
    sealed = ring.seal(plaintext, secrets_associated_data(tenant_id, channel))
    await pool.execute(
        """INSERT INTO provider_configs
               (tenant_id, channel, provider, settings, secret_fields, key_id, nonce, ciphertext,
                secret_fingerprint)
           VALUES ($1, $2, 'smtp', '{}', '{password}', $3, $4, $5, 'x')""",
        tenant_id,
        channel,
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
    )
    return plaintext


async def open_all(pool: asyncpg.Pool, ring: MasterKeyRing) -> dict[tuple[uuid.UUID, str], bytes]:
    rows = await pool.fetch("SELECT tenant_id, channel, key_id, nonce, ciphertext FROM provider_configs")
    return {
        (r["tenant_id"], r["channel"]): ring.open(
            SealedSecret(r["key_id"], r["nonce"], r["ciphertext"]),
            secrets_associated_data(r["tenant_id"], r["channel"]),
        )
        for r in rows
    }


async def test_verify_passes_and_writes_the_canary(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    ring = MasterKeyRing.parse(generate_master_key("k1"))
    await insert_config(pool, ring, tenant.tenant_id)
    async with pool.acquire() as conn:
        await verify_master_keys(conn, ring)
        await verify_master_keys(conn, ring)  # idempotent: the canary is written once
    rows = await pool.fetch("SELECT key_id, nonce, ciphertext FROM master_key_canaries")
    assert [r["key_id"] for r in rows] == ["k1"]
    canary = SealedSecret(rows[0]["key_id"], rows[0]["nonce"], rows[0]["ciphertext"])
    assert ring.open(canary, CANARY_ASSOCIATED_DATA)


async def test_verify_on_an_empty_database(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await verify_master_keys(conn, MasterKeyRing.parse(generate_master_key("k1")))
    assert await pool.fetchval("SELECT count(*) FROM master_key_canaries") == 1


async def test_verify_rejects_a_wrong_key_under_the_same_id(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    right = MasterKeyRing.parse(generate_master_key("k1"))
    await insert_config(pool, right, tenant.tenant_id)
    async with pool.acquire() as conn:
        await verify_master_keys(conn, right)
    wrong_entry = generate_master_key("k1")
    wrong = MasterKeyRing.parse(wrong_entry)
    async with pool.acquire() as conn:
        with pytest.raises(MasterKeyError, match=r"'k1' .*do not match the key that wrote data") as info:
            await verify_master_keys(conn, wrong)
    assert "wrong SWITCHBOARD_MASTER_KEY?" in str(info.value)
    assert_no_key_material(info.value, wrong_entry.partition(":")[2])
    assert not isinstance(info.value, SecretUnreadable)


async def test_verify_rejects_a_wrong_old_key(pool: asyncpg.Pool) -> None:
    old_entry = generate_master_key("old")
    async with pool.acquire() as conn:
        await verify_master_keys(conn, MasterKeyRing.parse(old_entry))
        bad = ring_of(generate_master_key("new"), generate_master_key("old"))
        with pytest.raises(MasterKeyError, match="'old'"):
            await verify_master_keys(conn, bad)
        # A failed check writes no canary for the new key.
        assert await conn.fetchval("SELECT count(*) FROM master_key_canaries WHERE key_id = 'new'") == 0
        await verify_master_keys(conn, ring_of(generate_master_key("new"), old_entry))


async def test_verify_lists_missing_key_ids(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    other = await make_tenant(pool, "globex")
    k1, k2 = MasterKeyRing.parse(generate_master_key("k1")), MasterKeyRing.parse(generate_master_key("k2"))
    await insert_config(pool, k1, tenant.tenant_id, "email")
    await insert_config(pool, k1, other.tenant_id, "email")
    await insert_config(pool, k2, tenant.tenant_id, "sms")
    k3_entry = generate_master_key("k3")
    async with pool.acquire() as conn:
        with pytest.raises(MasterKeyError, match="missing from SWITCHBOARD_MASTER_KEY") as info:
            await verify_master_keys(conn, MasterKeyRing.parse(k3_entry))
        assert "'k1' (2 rows), 'k2' (1 row)" in str(info.value)
        assert_no_key_material(info.value, k3_entry.partition(":")[2])
        with pytest.raises(MasterKeyError, match=r"'k2' \(1 row\)") as info:
            await verify_master_keys(conn, k1)
        assert "'k1'" not in str(info.value).split("missing from")[1].split(".")[0]
        assert await conn.fetchval("SELECT count(*) FROM master_key_canaries") == 0


async def test_rotation_reencrypts_every_row(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    old_entry, new_entry = generate_master_key("old"), generate_master_key("new")
    old_only, new_only = MasterKeyRing.parse(old_entry), MasterKeyRing.parse(new_entry)
    rotating = ring_of(new_entry, old_entry)
    tenants = [tenant.tenant_id] + [(await make_tenant(pool, f"t{i}")).tenant_id for i in range(4)]
    expected: dict[tuple[uuid.UUID, str], bytes] = {}
    for tenant_id in tenants:
        for channel in ("email", "sms", "push"):
            expected[(tenant_id, channel)] = await insert_config(pool, old_only, tenant_id, channel)
    async with pool.acquire() as conn:
        await verify_master_keys(conn, old_only)

    calls: list[tuple[int, int]] = []
    done = await rotate_master_key(pool, rotating, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert done == 15
    assert calls == [(0, 15), (4, 15), (8, 15), (12, 15), (15, 15)]
    assert {r["key_id"] for r in await pool.fetch("SELECT key_id FROM provider_configs")} == {"new"}
    assert {r["key_id"] for r in await pool.fetch("SELECT key_id FROM master_key_canaries")} == {"old", "new"}
    fingerprints = {r["secret_fingerprint"] for r in await pool.fetch("SELECT * FROM provider_configs")}
    assert fingerprints == {"x"}

    assert await rotate_master_key(pool, rotating) == 0

    assert await open_all(pool, new_only) == expected
    with pytest.raises(SecretUnreadable, match="'new', which is not in"):
        await open_all(pool, old_only)
    async with pool.acquire() as conn:
        await verify_master_keys(conn, new_only)
        with pytest.raises(MasterKeyError, match=r"'new' \(15 rows\)"):
            await verify_master_keys(conn, old_only)


async def test_concurrent_rotations_reencrypt_each_row_once(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    old_entry, new_entry = generate_master_key("old"), generate_master_key("new")
    old_only = MasterKeyRing.parse(old_entry)
    tenants = [tenant.tenant_id] + [(await make_tenant(pool, f"c{i}")).tenant_id for i in range(9)]
    for tenant_id in tenants:
        for channel in ("email", "sms", "push"):
            await insert_config(pool, old_only, tenant_id, channel)
    rotating = ring_of(new_entry, old_entry)
    counts = await asyncio.gather(*[rotate_master_key(pool, rotating, batch_size=2) for _ in range(3)])
    assert sum(counts) == 30
    assert len(await open_all(pool, MasterKeyRing.parse(new_entry))) == 30


async def test_rotation_refuses_rows_under_keys_missing_from_the_ring(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    old = MasterKeyRing.parse(generate_master_key("old"))
    await insert_config(pool, old, tenant.tenant_id)
    with pytest.raises(MasterKeyError, match=r"'old' \(1 row\)"):
        await rotate_master_key(pool, MasterKeyRing.parse(generate_master_key("new")))
    assert await pool.fetchval("SELECT key_id FROM provider_configs") == "old"


async def test_rotation_names_a_row_that_does_not_open(pool: asyncpg.Pool, tenant: TenantCredentials) -> None:
    old_entry = generate_master_key("old")
    old = MasterKeyRing.parse(old_entry)
    await insert_config(pool, old, tenant.tenant_id, "email")
    await insert_config(pool, old, tenant.tenant_id, "sms")
    async with pool.acquire() as conn:
        await verify_master_keys(conn, old)  # writes the canary of "old" while every row still opens
    # Move the sms ciphertext onto the email row: its associated data no longer matches.
    await pool.execute(
        """UPDATE provider_configs SET nonce = s.nonce, ciphertext = s.ciphertext
             FROM provider_configs s WHERE s.channel = 'sms' AND provider_configs.channel = 'email'"""
    )
    rotating = ring_of(generate_master_key("new"), old_entry)
    with pytest.raises(SecretUnreadable, match=f"tenant {tenant.tenant_id} channel 'email'"):
        await rotate_master_key(pool, rotating)
    assert {r["key_id"] for r in await pool.fetch("SELECT key_id FROM provider_configs")} == {"old"}


async def test_rotation_rejects_a_bad_batch_size(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        await rotate_master_key(pool, MasterKeyRing.parse(generate_master_key("k1")), batch_size=0)
