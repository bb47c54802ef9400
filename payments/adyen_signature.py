"""HMAC signatures of Adyen standard webhooks (NotificationRequestItem).

Source: https://docs.adyen.com/development-resources/webhooks/verify-hmac-signatures
(also Adyen's own Python library, ``Adyen/util.py``, ``generate_notification_sig``).

Adyen sends standard webhooks as a JSON batch::

    {"live": "false",
     "notificationItems": [{"NotificationRequestItem": {
         "pspReference": "...", "originalReference": "...", "merchantAccountCode": "...",
         "merchantReference": "...", "amount": {"value": 1050, "currency": "EUR"},
         "eventCode": "AUTHORISATION", "success": "true",
         "additionalData": {"hmacSignature": "<base64>"}, ...}}]}

Each item carries its own signature in ``additionalData.hmacSignature``:

1. the *signing string* is eight fields joined by ``:``, in this order::

       pspReference:originalReference:merchantAccountCode:merchantReference:value:currency:eventCode:success

   with an empty string for a field that is absent (``originalReference`` is
   absent on AUTHORISATION), ``value`` being ``amount.value`` in minor units
   as a base-10 integer and ``success`` the literal ``true`` / ``false``;
2. the HMAC key from the Customer Area is hex; it is hex-decoded to bytes;
3. the signature is base64(HMAC-SHA256(key bytes, UTF-8 signing string)).

Verification compares in constant time (:func:`hmac.compare_digest`) and
accepts any of several keys, so a key can be rotated: configure the new key
next to the old one, switch the key in the Customer Area, then drop the old
one once nothing signed with it is in flight (Adyen retries webhooks for days).

Failures raise :class:`SignatureError` whose ``reason`` says what is wrong
(missing signature, not base64, no configured key matches, ...) and never
contains a key or the expected signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

#: The fields of the signing string, in order (Adyen "verify HMAC signatures").
SIGNED_FIELDS: tuple[str, ...] = (
    "pspReference",
    "originalReference",
    "merchantAccountCode",
    "merchantReference",
    "value",
    "currency",
    "eventCode",
    "success",
)


class SignatureError(ValueError):
    """A webhook item whose HMAC signature is missing, malformed or wrong.

    ``reason`` is a short English explanation meant for logs and metrics; it
    never contains an HMAC key or a computed signature.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _decode_key(hex_key: str, position: int) -> bytes:
    """The bytes of one hex HMAC key; the error names the key's position, never its text."""
    text = hex_key.strip()
    if not text:
        raise ValueError(f"HMAC key #{position} is empty")
    key = _unhex(text)
    if key is None:
        raise ValueError(f"HMAC key #{position} is not a hex string")
    return key


def _unhex(text: str) -> bytes | None:
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        return None


def _unbase64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _text(value: Any) -> str:
    """A signing-string field: ``""`` for absent/null, ``true``/``false`` for booleans."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def signing_string(item: Mapping[str, Any]) -> str:
    """The signing string of one NotificationRequestItem (see the module docstring).

    ``item`` is the object inside ``{"NotificationRequestItem": ...}``; its
    ``amount`` is ``{"value": <int minor units>, "currency": <ISO 4217>}``.
    Raises :class:`SignatureError` when ``amount`` is not an object or
    ``amount.value`` is not an integer.
    """
    amount = item.get("amount")
    if amount is None:
        amount = {}
    if not isinstance(amount, Mapping):
        raise SignatureError("amount is not an object")
    value = amount.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise SignatureError("amount.value is not an integer (minor units)")
    fields = {
        "pspReference": item.get("pspReference"),
        "originalReference": item.get("originalReference"),
        "merchantAccountCode": item.get("merchantAccountCode"),
        "merchantReference": item.get("merchantReference"),
        "value": value,
        "currency": amount.get("currency"),
        "eventCode": item.get("eventCode"),
        "success": item.get("success"),
    }
    return ":".join(_text(fields[name]) for name in SIGNED_FIELDS)


def compute_signature(item: Mapping[str, Any], hmac_key_hex: str) -> str:
    """base64(HMAC-SHA256(hex-decoded ``hmac_key_hex``, :func:`signing_string` of ``item``)).

    For the fake Adyen and tests: the value Adyen puts in
    ``additionalData.hmacSignature``. Raises ``ValueError`` if the key is not
    hex (the message does not contain the key), :class:`SignatureError` for a
    malformed ``amount``.
    """
    key = _decode_key(hmac_key_hex, 1)
    digest = hmac.new(key, signing_string(item).encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


class AdyenWebhookVerifier:
    """Verifies standard-webhook items against one or more hex HMAC keys (rotation).

    ``hmac_keys``: the hex keys of the webhook endpoint, newest first; at
    least one. Raises ``ValueError`` (naming the key's position, never its
    text) for an empty list, an empty key or a key that is not hex. The repr
    shows only how many keys there are.
    """

    def __init__(self, hmac_keys: Sequence[str]) -> None:
        if isinstance(hmac_keys, str):
            hmac_keys = [hmac_keys]
        if not hmac_keys:
            raise ValueError("at least one HMAC key is required")
        self._keys = tuple(_decode_key(key, position) for position, key in enumerate(hmac_keys, 1))

    def __repr__(self) -> str:
        return f"AdyenWebhookVerifier(keys=<{len(self._keys)} redacted>)"

    def verify_item(self, item: Mapping[str, Any]) -> int:
        """Check ``item``'s ``additionalData.hmacSignature``; return the 0-based index of the matching key.

        The index tells an operator which key signed it (0 = newest), so the
        old key can be dropped once nothing matches it. Raises
        :class:`SignatureError` when the signature is missing, empty, not
        base64 of a 32-byte digest, or matches none of the keys.
        """
        if not isinstance(item, Mapping):
            raise SignatureError("notification item is not an object")
        additional = item.get("additionalData")
        if additional is None:
            raise SignatureError("missing additionalData.hmacSignature (is HMAC enabled for this webhook?)")
        if not isinstance(additional, Mapping):
            raise SignatureError("additionalData is not an object")
        received_text = additional.get("hmacSignature")
        if received_text is None or received_text == "":
            raise SignatureError("missing additionalData.hmacSignature (is HMAC enabled for this webhook?)")
        if not isinstance(received_text, str):
            raise SignatureError("additionalData.hmacSignature is not a string")
        received = _unbase64(received_text)
        if received is None:
            raise SignatureError("additionalData.hmacSignature is not valid base64")
        if len(received) != hashlib.sha256().digest_size:
            raise SignatureError("additionalData.hmacSignature is not an HMAC-SHA256 digest (wrong length)")
        message = signing_string(item).encode("utf-8")
        matched = -1
        for index, key in enumerate(self._keys):
            expected = hmac.new(key, message, hashlib.sha256).digest()
            # Every key is tried (no early exit) so timing does not tell which key matched.
            if hmac.compare_digest(expected, received) and matched < 0:
                matched = index
        if matched < 0:
            raise SignatureError(
                f"HMAC signature does not match any of the {len(self._keys)} configured key(s): "
                "the item was altered or signed with another key"
            )
        return matched

    def _failure(self, item: Mapping[str, Any]) -> str | None:
        try:
            self.verify_item(item)
        except SignatureError as exc:
            return exc.reason
        return None

    def verify_body(self, body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """Verify every item of a standard-webhook batch; return the NotificationRequestItems in order.

        ``body`` is the parsed JSON ``{"live": ..., "notificationItems":
        [{"NotificationRequestItem": {...}}, ...]}``. All items must verify:
        one bad item raises :class:`SignatureError` (its reason starts with the
        item's position) and none is returned.
        """
        if not isinstance(body, Mapping):
            raise SignatureError("webhook body is not a JSON object")
        wrapped = body.get("notificationItems")
        if not isinstance(wrapped, list) or not wrapped:
            raise SignatureError("webhook body has no notificationItems")
        items: list[Mapping[str, Any]] = []
        for position, entry in enumerate(wrapped):
            item = entry.get("NotificationRequestItem") if isinstance(entry, Mapping) else None
            if not isinstance(item, Mapping):
                raise SignatureError(f"notificationItems[{position}] has no NotificationRequestItem object")
            failure = self._failure(item)
            if failure is not None:
                raise SignatureError(f"notificationItems[{position}]: {failure}")
            items.append(item)
        return items


def verify_item(item: Mapping[str, Any], hmac_keys: Sequence[str]) -> int:
    """Shorthand for ``AdyenWebhookVerifier(hmac_keys).verify_item(item)``; see there."""
    return AdyenWebhookVerifier(hmac_keys).verify_item(item)
