"""Encryption at rest for tenant provider secrets: AES-256-GCM under a ring of master keys.

The master keys come from ``SWITCHBOARD_MASTER_KEY``: comma-separated
``key_id:base64`` entries, each key exactly 32 bytes (standard or URL-safe
base64, padding optional). The FIRST entry is the current key, the only one
used to seal; the others can only open, and are kept while a rotation
re-encrypts the rows sealed under them. A single bare base64 key is accepted
too; its id is ``default``. A key id is 1-32 characters of ``A-Z a-z 0-9 _ . -``.
Generate an entry with ``generate_master_key()`` or ``openssl rand -base64 32``.

Every seal uses a fresh random 96-bit nonce (NIST SP 800-38D, section 8.2.2)
and associated data binding the ciphertext to its tenant and channel
(``secrets_associated_data``) or its tenant and payment processor
(``processor_secrets_associated_data``), so a ciphertext copied to another row
does not open. The key id is stored next to the ciphertext to find the key again.

Nothing here ever puts key material or plaintext in an exception message, a
repr or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: The environment variable holding the master keys (named in error messages).
MASTER_KEY_ENV = "SWITCHBOARD_MASTER_KEY"
#: The id of a key given as a single bare base64 value.
DEFAULT_KEY_ID = "default"
#: AES-256: 32-byte keys.
KEY_BYTES = 32
#: GCM nonce length: 96 bits, the length NIST SP 800-38D recommends.
NONCE_BYTES = 12
#: GCM authentication tag length (the full 128 bits), appended to the ciphertext.
TAG_BYTES = 16
#: HKDF ``info`` of the subkey that keys secret fingerprints.
FINGERPRINT_INFO = b"switchboard secret fingerprint"
#: HKDF ``info`` of the subkeys that key request digests (:meth:`MasterKeyRing.keyed_digest`).
DIGEST_INFO = b"switchboard request digest"
#: Hex digits in a fingerprint (64 bits).
FINGERPRINT_HEX_DIGITS = 16

_KEY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_KEY_ID_RULE = "1-32 characters of A-Z a-z 0-9 _ . -"
_FORMAT_HINT = (
    f"{MASTER_KEY_ENV} is comma-separated 'key_id:base64' entries, the first one current, "
    f"each key exactly {KEY_BYTES} random bytes (generate one with `openssl rand -base64 32`)"
)
_STANDARD_ONLY = frozenset("+/")
_URLSAFE_ONLY = frozenset("-_")


class MasterKeyError(Exception):
    """The master keys are missing, malformed, or do not match the stored data.

    Messages name key ids (which are not secret) and say what to fix; they
    never contain key material, nonces, ciphertexts or plaintexts.
    """


class SecretUnreadable(MasterKeyError):
    """A sealed secret cannot be opened.

    Either its key id is not in the ring, or the GCM tag does not verify: the
    ciphertext or nonce was altered, the associated data (tenant and channel,
    or tenant and processor) differs from the one it was sealed with, or the
    ring holds a different key under that id.
    """


@dataclass(frozen=True, repr=False)
class SealedSecret:
    """A secret sealed with AES-256-GCM.

    ``key_id`` names the master key, ``nonce`` is the 12-byte GCM nonce and
    ``ciphertext`` is the encrypted data followed by the 16-byte tag. These are
    the ``key_id``, ``nonce`` and ``ciphertext`` columns of ``provider_configs`` and
    ``processor_configs``.
    The repr shows only the key id and the lengths.
    """

    key_id: str
    nonce: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        return (
            f"SealedSecret(key_id={self.key_id!r}, nonce=<{len(self.nonce)} bytes>, "
            f"ciphertext=<{len(self.ciphertext)} bytes>)"
        )


def secrets_associated_data(tenant_id: uuid.UUID, channel: str) -> bytes:
    """The GCM associated data binding a provider secret to its tenant and channel.

    ``b"<tenant id>/<channel>"``, e.g. ``b"5f0c...-9e1a/email"``. A ciphertext
    opened with another tenant's or channel's associated data fails
    authentication (``SecretUnreadable``).
    """
    return f"{tenant_id}/{channel}".encode()


#: The prefix of the processor part of ``processor_secrets_associated_data``.
PROCESSOR_CONTEXT_PREFIX = "processor:"


def processor_secrets_associated_data(tenant_id: uuid.UUID, processor: str) -> bytes:
    """The GCM associated data binding a payment processor secret to its tenant and processor.

    ``b"<tenant id>/processor:<processor>"``, e.g. ``b"5f0c...-9e1a/processor:stripe"``.
    It never equals a channel's ``secrets_associated_data`` (no channel name
    contains ``:``), so a ciphertext opened for another tenant, another
    processor, or as a notification provider secret fails authentication
    (``SecretUnreadable``).
    """
    return f"{tenant_id}/{PROCESSOR_CONTEXT_PREFIX}{processor}".encode()


def _check_key_id(key_id: str, where: str) -> None:
    # The rejected value is not echoed: a mangled entry may hold key material.
    if not _KEY_ID_RE.fullmatch(key_id):
        raise MasterKeyError(f"{where}: the key id must be {_KEY_ID_RULE}. {_FORMAT_HINT}")


def _decode_key(encoded: str, where: str) -> bytes:
    text = "".join(encoded.split())
    chars = set(text)
    if chars & _STANDARD_ONLY and chars & _URLSAFE_ONLY:
        raise MasterKeyError(f"{where}: the key mixes standard and URL-safe base64. {_FORMAT_HINT}")
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        # ``from None``: the decoder's message is not needed and must not travel with ours.
        raise MasterKeyError(f"{where}: the key is not valid base64. {_FORMAT_HINT}") from None
    if len(key) != KEY_BYTES:
        raise MasterKeyError(
            f"{where}: the key decodes to {len(key)} bytes; AES-256 needs exactly {KEY_BYTES}. {_FORMAT_HINT}"
        )
    return key


class MasterKeyRing:
    """The master keys of one process: the current key (seals) and older keys (open only).

    Build it with ``MasterKeyRing.parse(os.environ.get("SWITCHBOARD_MASTER_KEY"))``
    or from ``(key_id, 32-byte key)`` pairs, current first. Raises
    ``MasterKeyError`` for an empty ring, a malformed key id, a key that is not
    32 bytes, or a duplicate id. The repr shows only the key ids.

    Sealing is AES-256-GCM (NIST SP 800-38D) with random 96-bit nonces; with
    random nonces one key must not seal more than 2**32 messages (SP 800-38D,
    section 8.3), far beyond a table of provider configurations.
    """

    __slots__ = ("_aeads", "_digest_keys", "_fingerprint_key", "_key_ids")

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        aeads: dict[str, AESGCM] = {}
        digest_keys: dict[str, bytes] = {}
        current: bytes | None = None
        for position, (key_id, key) in enumerate(keys, start=1):
            where = f"{MASTER_KEY_ENV} entry {position}"
            _check_key_id(key_id, where)
            if key_id in aeads:
                raise MasterKeyError(f"{where}: key id {key_id!r} appears more than once; ids must be unique")
            if len(key) != KEY_BYTES:
                raise MasterKeyError(
                    f"{where} ({key_id!r}): the key is {len(key)} bytes; AES-256 needs exactly {KEY_BYTES}"
                )
            aeads[key_id] = AESGCM(key)
            digest_keys[key_id] = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=None, info=DIGEST_INFO
            ).derive(key)
            if current is None:
                current = key
        if current is None:
            raise MasterKeyError(f"the master key ring is empty. {_FORMAT_HINT}")
        self._aeads = aeads
        self._digest_keys = digest_keys
        self._key_ids = tuple(aeads)
        # Only the derived subkey is kept for fingerprints (RFC 5869 HKDF-SHA256, no salt).
        self._fingerprint_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=FINGERPRINT_INFO
        ).derive(current)

    @classmethod
    def parse(cls, value: str | None) -> MasterKeyRing:
        """Parse a ``SWITCHBOARD_MASTER_KEY`` value.

        ``"k2:<base64>,k1:<base64>"`` gives a ring whose current key is ``k2``;
        ``"<base64>"`` alone gives one key with id ``default``. Whitespace around
        entries is ignored. Raises ``MasterKeyError`` (naming the entry, never
        echoing a key) if the value is missing or empty, an entry is empty or
        has no key id while others exist, a key id is malformed or repeated, a
        key is not base64, or a key does not decode to exactly 32 bytes.
        """
        if value is None or not value.strip():
            raise MasterKeyError(f"{MASTER_KEY_ENV} is not set or empty. {_FORMAT_HINT}")
        entries = [entry.strip() for entry in value.split(",")]
        keys: list[tuple[str, bytes]] = []
        for position, entry in enumerate(entries, start=1):
            where = f"{MASTER_KEY_ENV} entry {position}"
            if not entry:
                raise MasterKeyError(f"{where} is empty (a stray comma?). {_FORMAT_HINT}")
            key_id, sep, encoded = entry.partition(":")
            if not sep:
                if len(entries) > 1:
                    raise MasterKeyError(
                        f"{where} has no key id; with several keys each entry is 'key_id:base64'"
                    )
                key_id, encoded = DEFAULT_KEY_ID, entry
            key_id = key_id.strip()
            _check_key_id(key_id, where)
            keys.append((key_id, _decode_key(encoded, f"{where} ({key_id!r})")))
        return cls(keys)

    @property
    def current_key_id(self) -> str:
        """The id of the key that seals (the first entry)."""
        return self._key_ids[0]

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id in the ring, the current one first."""
        return self._key_ids

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._aeads

    def __repr__(self) -> str:
        return f"MasterKeyRing(current_key_id={self.current_key_id!r}, key_ids={list(self._key_ids)!r})"

    def seal(self, plaintext: bytes, associated_data: bytes) -> SealedSecret:
        """Encrypt and authenticate ``plaintext`` under the current key.

        AES-256-GCM (NIST SP 800-38D) with a fresh random 96-bit nonce from
        ``os.urandom``; ``associated_data`` is authenticated, not stored (use
        ``secrets_associated_data``). Returns a ``SealedSecret`` whose
        ciphertext is ``len(plaintext) + 16`` bytes.
        """
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._aeads[self.current_key_id].encrypt(nonce, plaintext, associated_data)
        return SealedSecret(key_id=self.current_key_id, nonce=nonce, ciphertext=ciphertext)

    def open(self, sealed: SealedSecret, associated_data: bytes) -> bytes:
        """Decrypt ``sealed`` with the key named by its ``key_id``; return the plaintext.

        Raises ``SecretUnreadable`` if that key id is not in the ring, or if the
        GCM tag does not verify: the nonce or ciphertext was altered, the
        associated data differs from the one used to seal, or the ring holds a
        different key under that id.
        """
        aead = self._aeads.get(sealed.key_id)
        if aead is None:
            raise SecretUnreadable(
                f"the secret is sealed under master key {sealed.key_id!r}, which is not in "
                f"{MASTER_KEY_ENV} (it holds {', '.join(self._key_ids)}); add that key back as a "
                "non-first entry until a rotation has re-encrypted everything sealed under it"
            )
        if len(sealed.nonce) != NONCE_BYTES or len(sealed.ciphertext) < TAG_BYTES:
            raise SecretUnreadable(
                f"the secret sealed under master key {sealed.key_id!r} is malformed "
                f"(nonce must be {NONCE_BYTES} bytes, ciphertext at least {TAG_BYTES})"
            )
        try:
            return aead.decrypt(sealed.nonce, sealed.ciphertext, associated_data)
        except InvalidTag:
            raise SecretUnreadable(
                f"the secret sealed under master key {sealed.key_id!r} failed authentication: it was "
                "altered, it belongs to another tenant, channel or processor, or the key under that id in "
                f"{MASTER_KEY_ENV} is not the one that sealed it"
            ) from None

    def fingerprint(self, data: bytes) -> str:
        """A short keyed fingerprint of ``data``: 16 hex digits (64 bits).

        HMAC-SHA256 (RFC 2104) of ``data`` under a subkey derived from the
        current master key with HKDF-SHA256 (RFC 5869, no salt, info
        ``b"switchboard secret fingerprint"``), truncated to its first 16 hex
        digits. It tells whether two secrets are equal without revealing them,
        and cannot be computed without the master key. It depends on the
        current key, so fingerprints change when the current key does.
        """
        digest = hmac.new(self._fingerprint_key, data, hashlib.sha256).hexdigest()
        return digest[:FINGERPRINT_HEX_DIGITS]

    def keyed_digest(self, data: bytes, key_id: str | None = None) -> bytes:
        """HMAC-SHA256 (RFC 2104) of ``data`` under master key ``key_id``: 32 bytes.

        The HMAC key is a subkey derived from that master key (default: the
        current one) with HKDF-SHA256 (RFC 5869, no salt, info
        ``b"switchboard request digest"``), separate from the fingerprint
        subkey. Unlike :meth:`fingerprint` it is full length and can be
        recomputed under any key still in the ring, so a stored digest stays
        comparable during a rotation. Without the master key it can be neither
        computed nor used to test guesses of the data (a plain hash of a
        request holding a password could be). Raises ``SecretUnreadable`` if
        ``key_id`` is not in the ring.
        """
        key_id = self.current_key_id if key_id is None else key_id
        subkey = self._digest_keys.get(key_id)
        if subkey is None:
            raise SecretUnreadable(
                f"master key {key_id!r} is not in {MASTER_KEY_ENV} (it holds {', '.join(self._key_ids)})"
            )
        return hmac.new(subkey, data, hashlib.sha256).digest()


def generate_master_key(key_id: str | None = None) -> str:
    """A fresh ``key_id:base64`` entry for ``SWITCHBOARD_MASTER_KEY``.

    32 bytes from ``secrets.token_bytes`` (CSPRNG), standard base64. The id
    defaults to ``k<UTC date>-<6 random hex digits>``, e.g. ``k20250301-3fa9c1``.
    Raises ``MasterKeyError`` if ``key_id`` is given and malformed.
    """
    if key_id is None:
        key_id = f"k{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
    _check_key_id(key_id, "generate_master_key")
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode('ascii')}"
