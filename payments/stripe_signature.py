"""Stripe webhook signatures: verify the ``Stripe-Signature`` header, and compute one.

Stripe signs each webhook delivery with the endpoint's signing secret
(``whsec_...``), as described in https://docs.stripe.com/webhooks#verify-manually::

    Stripe-Signature: t=1492774577,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd,v0=...

- ``t`` is the UNIX time (seconds) at which Stripe signed the delivery;
- each ``v1`` is ``hex(HMAC-SHA256(key=secret, msg=f"{t}." + raw body))``. While
  an endpoint secret is being rolled, Stripe sends one ``v1`` per active secret;
- ``v0`` (test-mode legacy scheme) and any other scheme are ignored.

Verification here follows the documented steps: split the header on ``,`` and
each element on the first ``=``; rebuild the signed payload from the **raw**
request body (not re-serialised JSON); compute the expected signature for
every configured secret (several during a rotation on our side); compare with
each ``v1`` using :func:`hmac.compare_digest` (constant time); then check the
timestamp against a tolerance (300 s by default, Stripe's recommended value).

Unlike Stripe's own libraries, which only refuse timestamps older than the
tolerance, a timestamp more than ``tolerance_s`` in the *future* is refused
too: it means a badly wrong clock on one side or a forged timestamp, and
accepting it would stretch the replay window.

Errors are :class:`SignatureError` subclasses that say why
(:class:`MissingSignatureHeader`, :class:`MalformedSignatureHeader`,
:class:`NoMatchingSignature`, :class:`TimestampOutsideTolerance`). Their text
never contains a secret, an expected signature, or the raw header.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

#: The HTTP header Stripe puts the signature in.
SIGNATURE_HEADER = "Stripe-Signature"
#: Stripe's recommended tolerance between the signed timestamp and now, in seconds.
DEFAULT_TOLERANCE_S = 300.0
#: The only signature scheme Stripe uses for live webhooks.
EXPECTED_SCHEME = "v1"

Clock = Callable[[], float]


class SignatureError(ValueError):
    """A webhook delivery whose ``Stripe-Signature`` does not prove it came from Stripe.

    The message names the reason and never contains a secret or a signature.
    """


class MissingSignatureHeader(SignatureError):
    """The request has no (or an empty) ``Stripe-Signature`` header."""


class MalformedSignatureHeader(SignatureError):
    """The header is not ``t=<unix seconds>,v1=<hex>[,...]``: no, two or a bad ``t``; bad elements."""


class NoMatchingSignature(SignatureError):
    """No ``v1`` signature in the header matches the payload under any configured secret."""


class TimestampOutsideTolerance(SignatureError):
    """The signature matches, but its timestamp is further than the tolerance from now (replay or clock)."""


def _secret_list(secrets: str | Sequence[str]) -> list[str]:
    items = [secrets] if isinstance(secrets, str) else list(secrets)
    if not items or any(not isinstance(item, str) or not item for item in items):
        raise ValueError("at least one non-empty webhook signing secret is required")
    return items


def _payload_bytes(payload: bytes | str) -> bytes:
    return payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)


def compute_signature(payload: bytes | str, secret: str, timestamp: int) -> str:
    """The ``v1`` signature: lower-case hex HMAC-SHA256 of ``f"{timestamp}." + payload`` keyed by ``secret``.

    ``payload`` is the raw request body (``str`` is encoded as UTF-8);
    ``timestamp`` is UNIX seconds. See https://docs.stripe.com/webhooks#verify-manually.
    Raises ``ValueError`` for an empty secret.
    """
    if not secret:
        raise ValueError("the webhook signing secret is empty")
    signed_payload = str(int(timestamp)).encode("ascii") + b"." + _payload_bytes(payload)
    return hmac.new(secret.encode("utf-8"), signed_payload, hashlib.sha256).hexdigest()


def signature_header(
    payload: bytes | str,
    secrets: str | Sequence[str],
    *,
    timestamp: int | None = None,
    clock: Clock = time.time,
) -> str:
    """A ``Stripe-Signature`` header value for ``payload``: ``t=<ts>,v1=<sig>[,v1=<sig>...]``.

    One ``v1`` per secret, in order, as Stripe sends during a secret roll.
    ``timestamp`` defaults to ``int(clock())`` (UNIX seconds). Used by the fake
    Stripe and by tests; raises ``ValueError`` when no non-empty secret is given.
    """
    when = int(clock()) if timestamp is None else int(timestamp)
    parts = [f"t={when}"]
    parts.extend(
        f"{EXPECTED_SCHEME}={compute_signature(payload, secret, when)}" for secret in _secret_list(secrets)
    )
    return ",".join(parts)


def _parse_header(header: str) -> tuple[int, list[str]]:
    """``(timestamp, [v1 signatures])`` from a header value; raises :class:`MalformedSignatureHeader`."""
    timestamp: int | None = None
    signatures: list[str] = []
    for element in header.split(","):
        key, sep, value = element.strip().partition("=")
        if not sep or not key:
            raise MalformedSignatureHeader(
                "malformed Stripe-Signature header: every element must be <scheme>=<value>"
            )
        value = value.strip()
        if key == "t":
            if timestamp is not None:
                raise MalformedSignatureHeader(
                    "malformed Stripe-Signature header: more than one timestamp (t)"
                )
            if not value.isascii() or not value.isdigit():
                raise MalformedSignatureHeader(
                    "malformed Stripe-Signature header: the timestamp (t) is not UNIX seconds"
                )
            timestamp = int(value)
        elif key == EXPECTED_SCHEME:
            signatures.append(value)
        # v0 and unknown schemes are ignored, as documented.
    if timestamp is None:
        raise MalformedSignatureHeader("malformed Stripe-Signature header: no timestamp (t)")
    return timestamp, signatures


def verify_signature(
    payload: bytes | str,
    header: str | None,
    secrets: str | Sequence[str],
    *,
    tolerance_s: float | None = DEFAULT_TOLERANCE_S,
    clock: Clock = time.time,
) -> int:
    """Check that ``header`` signs ``payload`` under one of ``secrets``; returns the signed timestamp.

    ``payload``: the raw request body exactly as received (bytes; ``str`` is
    UTF-8 encoded). ``header``: the ``Stripe-Signature`` value (``None`` when
    absent). ``secrets``: the endpoint signing secret, or several while
    rotating; a match under any of them is enough. ``tolerance_s``: maximum
    distance in seconds between the signed timestamp and ``clock()`` (UNIX
    seconds), in either direction; ``None`` disables the check.

    Raises :class:`MissingSignatureHeader`, :class:`MalformedSignatureHeader`,
    :class:`NoMatchingSignature` or :class:`TimestampOutsideTolerance`
    (https://docs.stripe.com/webhooks#verify-manually), and ``ValueError`` when
    no non-empty secret is configured.
    """
    candidates = _secret_list(secrets)
    if header is None or not header.strip():
        raise MissingSignatureHeader(f"no {SIGNATURE_HEADER} header")
    timestamp, signatures = _parse_header(header)
    if not signatures:
        raise NoMatchingSignature(f"no {EXPECTED_SCHEME} signature in the {SIGNATURE_HEADER} header")
    body = _payload_bytes(payload)
    matched = False
    # Compare every candidate against every expected value without stopping early.
    for secret in candidates:
        expected = compute_signature(body, secret, timestamp).encode("ascii")
        for signature in signatures:
            if hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
                matched = True
    if not matched:
        raise NoMatchingSignature(
            f"no {EXPECTED_SCHEME} signature in the {SIGNATURE_HEADER} header matches the payload "
            f"under the {len(candidates)} configured secret(s)"
        )
    if tolerance_s is not None:
        skew = clock() - timestamp
        if abs(skew) > tolerance_s:
            direction = "old" if skew > 0 else "in the future"
            raise TimestampOutsideTolerance(
                f"signed timestamp {timestamp} is {abs(skew):.0f} s {direction} "
                f"(tolerance {tolerance_s:.0f} s): possible replay or clock skew"
            )
    return timestamp


def construct_event(
    payload: bytes | str,
    header: str | None,
    secrets: str | Sequence[str],
    *,
    tolerance_s: float | None = DEFAULT_TOLERANCE_S,
    clock: Clock = time.time,
) -> dict[str, Any]:
    """Verify like :func:`verify_signature`, then parse the body as a Stripe Event object.

    Returns the event as a dict (``id``, ``type``, ``data.object``, ...; see
    https://docs.stripe.com/api/events/object). Raises the same
    :class:`SignatureError` subclasses, and ``ValueError`` when the verified
    body is not a JSON object.
    """
    verify_signature(payload, header, secrets, tolerance_s=tolerance_s, clock=clock)
    try:
        event = json.loads(_payload_bytes(payload))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the webhook body is not JSON") from None
    if not isinstance(event, dict):
        raise ValueError("the webhook body is not a JSON object")
    return event
