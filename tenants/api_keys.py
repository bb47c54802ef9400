"""API key format, generation and hashing.

A key looks like ``sb_<key id>_<secret>``: the ``sb_`` prefix makes leaked keys
recognisable to secret scanners, the 12-character key id is the public handle
(stored, listed, used for lookup) and the secret is 32 random bytes in
URL-safe base64 (43 characters). Only SHA-256 of the secret is stored: the
secret has 256 bits of entropy, so a slow password hash adds nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass, field

KEY_PREFIX = "sb_"
KEY_ID_LENGTH = 12
_KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_BYTES = 32


@dataclass(frozen=True)
class NewApiKey:
    """A freshly generated key: ``token`` is shown once and never stored."""

    key_id: str
    token: str = field(repr=False)
    secret_sha256: bytes = field(repr=False)

    @property
    def display_prefix(self) -> str:
        """The non-secret start of the token, e.g. ``sb_ab12cd34ef56``."""
        return f"{KEY_PREFIX}{self.key_id}"


@dataclass(frozen=True)
class ParsedApiKey:
    """A presented token split into its key id and the SHA-256 of its secret."""

    key_id: str
    secret_sha256: bytes = field(repr=False)


def generate_api_key() -> NewApiKey:
    """Generate a new random key (``secrets`` module, CSPRNG)."""
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return NewApiKey(
        key_id=key_id,
        token=f"{KEY_PREFIX}{key_id}_{secret}",
        secret_sha256=hashlib.sha256(secret.encode("ascii")).digest(),
    )


def parse_api_key(token: str) -> ParsedApiKey | None:
    """Split a presented token; ``None`` if it does not have the key format."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or len(key_id) != KEY_ID_LENGTH or not secret or len(secret) > 128:
        return None
    if any(c not in _KEY_ID_ALPHABET for c in key_id):
        return None
    try:
        encoded = secret.encode("ascii")
    except UnicodeEncodeError:
        return None
    return ParsedApiKey(key_id=key_id, secret_sha256=hashlib.sha256(encoded).digest())


def secret_matches(presented: ParsedApiKey, stored_sha256: bytes) -> bool:
    """Constant-time comparison of the presented secret's hash with the stored one."""
    return hmac.compare_digest(presented.secret_sha256, stored_sha256)
