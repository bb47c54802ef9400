"""Stripe webhook signature verification (payments/stripe_signature.py).

Cases from https://docs.stripe.com/webhooks#verify-manually: a valid header,
a tampered payload, a wrong secret, timestamps outside the tolerance (old and
future), several ``v1`` values, rotated secrets on both sides, ignored ``v0``
and unknown schemes, and malformed headers. Every refusal names its reason
and never shows a secret, a signature or the header.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from payments.stripe_signature import (
    DEFAULT_TOLERANCE_S,
    MalformedSignatureHeader,
    MissingSignatureHeader,
    NoMatchingSignature,
    SignatureError,
    TimestampOutsideTolerance,
    compute_signature,
    construct_event,
    signature_header,
    verify_signature,
)

SECRET = "whsec_test_8f2c1d0e9b7a6f5e4d3c2b1a0f9e8d7c"
OLD_SECRET = "whsec_test_00112233445566778899aabbccddeeff"
OTHER_SECRET = "whsec_test_ffeeddccbbaa99887766554433221100"
NOW = 1_760_000_000
PAYLOAD = json.dumps(
    {"id": "evt_1", "object": "event", "type": "payment_intent.succeeded", "data": {"object": {"id": "pi_1"}}}
).encode()


def clock() -> float:
    return float(NOW)


def reference_signature(payload: bytes, secret: str, timestamp: int) -> str:
    """Written from the documentation, independently of the module under test."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()


def refusal(
    payload: bytes, header: str | None, secrets: str | list[str] = SECRET, *, tolerance_s: float = 300.0
) -> SignatureError:
    with pytest.raises(SignatureError) as info:
        verify_signature(payload, header, secrets, clock=clock, tolerance_s=tolerance_s)
    text = f"{info.value} {info.value!r}"
    for secret in (SECRET, OLD_SECRET, OTHER_SECRET):
        assert secret not in text
    if header:
        assert header not in text
        for part in header.split(","):
            value = part.partition("=")[2]
            if len(value) >= 16:
                assert value not in text
    return info.value


# --- computing -----------------------------------------------------------------------------------


def test_compute_signature_matches_the_documented_scheme() -> None:
    assert compute_signature(PAYLOAD, SECRET, NOW) == reference_signature(PAYLOAD, SECRET, NOW)
    assert compute_signature(PAYLOAD.decode(), SECRET, NOW) == reference_signature(PAYLOAD, SECRET, NOW)


def test_signature_header_has_one_v1_per_secret() -> None:
    header = signature_header(PAYLOAD, [SECRET, OLD_SECRET], clock=clock)
    new, old = reference_signature(PAYLOAD, SECRET, NOW), reference_signature(PAYLOAD, OLD_SECRET, NOW)
    assert header == f"t={NOW},v1={new},v1={old}"
    assert signature_header(PAYLOAD, SECRET, timestamp=123).startswith("t=123,v1=")


@pytest.mark.parametrize("secrets", ["", [], [""]])
def test_a_secret_is_required(secrets: str | list[str]) -> None:
    with pytest.raises(ValueError, match="secret"):
        verify_signature(PAYLOAD, signature_header(PAYLOAD, SECRET, clock=clock), secrets, clock=clock)
    with pytest.raises(ValueError, match="secret"):
        signature_header(PAYLOAD, secrets, clock=clock)


# --- accepting -----------------------------------------------------------------------------------


def test_valid_header_is_accepted_and_returns_the_timestamp() -> None:
    header = f"t={NOW},v1={reference_signature(PAYLOAD, SECRET, NOW)}"
    assert verify_signature(PAYLOAD, header, SECRET, clock=clock) == NOW


def test_whitespace_v0_and_unknown_schemes_are_ignored() -> None:
    good = reference_signature(PAYLOAD, SECRET, NOW)
    header = (
        f"t={NOW}, v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39, v1={good}, v9=zzz"
    )
    assert verify_signature(PAYLOAD, header, SECRET, clock=clock) == NOW


@pytest.mark.parametrize("order", ["good-first", "good-last"])
def test_any_of_several_v1_values_may_match(order: str) -> None:
    good = reference_signature(PAYLOAD, SECRET, NOW)
    wrong = reference_signature(PAYLOAD, OTHER_SECRET, NOW)
    values = [good, wrong] if order == "good-first" else [wrong, "not-hex-ünï", good]
    header = f"t={NOW}," + ",".join(f"v1={value}" for value in values)
    assert verify_signature(PAYLOAD, header, SECRET, clock=clock) == NOW


def test_rotated_secrets_on_our_side() -> None:
    """We accept under the new and the old secret while rotating."""
    signed_with_old = signature_header(PAYLOAD, OLD_SECRET, clock=clock)
    signed_with_new = signature_header(PAYLOAD, SECRET, clock=clock)
    assert verify_signature(PAYLOAD, signed_with_old, [SECRET, OLD_SECRET], clock=clock) == NOW
    assert verify_signature(PAYLOAD, signed_with_new, [SECRET, OLD_SECRET], clock=clock) == NOW
    error = refusal(PAYLOAD, signed_with_old, [SECRET])
    assert isinstance(error, NoMatchingSignature)


def test_rolled_secret_on_stripes_side() -> None:
    """While Stripe rolls an endpoint secret it signs with both; either configured secret verifies."""
    header = signature_header(PAYLOAD, [OLD_SECRET, SECRET], clock=clock)
    assert verify_signature(PAYLOAD, header, SECRET, clock=clock) == NOW
    assert verify_signature(PAYLOAD, header, OLD_SECRET, clock=clock) == NOW


@pytest.mark.parametrize("offset", [-DEFAULT_TOLERANCE_S, DEFAULT_TOLERANCE_S, 0])
def test_timestamps_at_the_tolerance_edge_are_accepted(offset: float) -> None:
    timestamp = NOW + int(offset)
    header = signature_header(PAYLOAD, SECRET, timestamp=timestamp)
    assert verify_signature(PAYLOAD, header, SECRET, clock=clock) == timestamp


def test_tolerance_can_be_disabled_or_changed() -> None:
    header = signature_header(PAYLOAD, SECRET, timestamp=NOW - 86_400)
    assert verify_signature(PAYLOAD, header, SECRET, clock=clock, tolerance_s=None) == NOW - 86_400
    error = refusal(PAYLOAD, signature_header(PAYLOAD, SECRET, timestamp=NOW - 11), tolerance_s=10)
    assert isinstance(error, TimestampOutsideTolerance)


# --- refusing ------------------------------------------------------------------------------------


def test_tampered_payload_is_refused() -> None:
    header = signature_header(PAYLOAD, SECRET, clock=clock)
    tampered = PAYLOAD.replace(b"pi_1", b"pi_2")
    error = refusal(tampered, header)
    assert isinstance(error, NoMatchingSignature)
    assert "matches" in str(error)


def test_reserialised_json_is_refused() -> None:
    """The raw body is signed: parsing and re-dumping it (other spacing) breaks the signature."""
    header = signature_header(PAYLOAD, SECRET, clock=clock)
    reserialised = json.dumps(json.loads(PAYLOAD), separators=(",", ":")).encode()
    assert reserialised != PAYLOAD
    assert isinstance(refusal(reserialised, header), NoMatchingSignature)


def test_wrong_secret_is_refused() -> None:
    header = signature_header(PAYLOAD, OTHER_SECRET, clock=clock)
    assert isinstance(refusal(PAYLOAD, header), NoMatchingSignature)


def test_signature_over_another_timestamp_is_refused() -> None:
    """Changing t without re-signing (a replay with a fresh timestamp) does not verify."""
    signature = reference_signature(PAYLOAD, SECRET, NOW - 3600)
    assert isinstance(refusal(PAYLOAD, f"t={NOW},v1={signature}"), NoMatchingSignature)


def test_expired_timestamp_is_refused() -> None:
    header = signature_header(PAYLOAD, SECRET, timestamp=NOW - 301)
    error = refusal(PAYLOAD, header)
    assert isinstance(error, TimestampOutsideTolerance)
    assert "old" in str(error)
    assert "tolerance 300 s" in str(error)


def test_future_timestamp_is_refused() -> None:
    header = signature_header(PAYLOAD, SECRET, timestamp=NOW + 301)
    error = refusal(PAYLOAD, header)
    assert isinstance(error, TimestampOutsideTolerance)
    assert "future" in str(error)


def test_only_v0_is_refused() -> None:
    """v0 is Stripe's legacy test scheme: a header without v1 never verifies."""
    legacy = reference_signature(PAYLOAD, SECRET, NOW)
    error = refusal(PAYLOAD, f"t={NOW},v0={legacy}")
    assert isinstance(error, NoMatchingSignature)
    assert "no v1 signature" in str(error)


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header_is_refused(header: str | None) -> None:
    error = refusal(PAYLOAD, header)
    assert isinstance(error, MissingSignatureHeader)
    assert "no Stripe-Signature header" in str(error)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        pytest.param("garbage", "every element", id="no-equals"),
        pytest.param("v1=abcdef0123456789abcdef", "no timestamp", id="no-timestamp"),
        pytest.param(f"t=soon,v1={'a' * 64}", "not UNIX seconds", id="non-integer-timestamp"),
        pytest.param(f"t=-5,v1={'a' * 64}", "not UNIX seconds", id="negative-timestamp"),
        pytest.param(f"t={NOW},t={NOW},v1={'a' * 64}", "more than one timestamp", id="two-timestamps"),
        pytest.param(f"t={NOW},,v1={'a' * 64}", "every element", id="empty-element"),
        pytest.param(f"t={NOW},=abc", "every element", id="empty-scheme"),
    ],
)
def test_malformed_header_is_refused(header: str, reason: str) -> None:
    error = refusal(PAYLOAD, header)
    assert isinstance(error, MalformedSignatureHeader)
    assert reason in str(error)


def test_refusals_are_value_errors_with_distinct_types() -> None:
    kinds = {MissingSignatureHeader, MalformedSignatureHeader, NoMatchingSignature, TimestampOutsideTolerance}
    assert all(issubclass(kind, SignatureError) and issubclass(kind, ValueError) for kind in kinds)
    assert len(kinds) == 4


# --- construct_event -----------------------------------------------------------------------------


def test_construct_event_verifies_then_parses() -> None:
    header = signature_header(PAYLOAD, SECRET, clock=clock)
    event = construct_event(PAYLOAD, header, SECRET, clock=clock)
    assert event["type"] == "payment_intent.succeeded"
    assert event["data"]["object"]["id"] == "pi_1"
    with pytest.raises(NoMatchingSignature):
        construct_event(PAYLOAD + b" ", header, SECRET, clock=clock)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]"])
def test_construct_event_refuses_a_verified_non_object(body: bytes) -> None:
    header = signature_header(body, SECRET, clock=clock)
    with pytest.raises(ValueError, match="JSON") as info:
        construct_event(body, header, SECRET, clock=clock)
    assert not isinstance(info.value, SignatureError)
