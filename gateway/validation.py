"""Validation of SendNotification requests: pure functions, no I/O.

Each rule names the offending field with a ``google.rpc.BadRequest``
field-violation path (AIP-193), e.g. ``recipient.phone_number`` or
``push.data["from"]``. Batch items are validated with the same rules and their
paths are relative to the item.

Limits (characters unless the name says bytes) are the module constants below;
their sources are given beside each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

import phonenumbers
from cachetools import LRUCache
from email_validator import EmailNotValidError, validate_email
from google.rpc.error_details_pb2 import BadRequest

from channels.catalog import ALL_CHANNELS, CHANNEL_NAMES
from switchboard.notify.v1 import notify_pb2

FieldViolation: TypeAlias = BadRequest.FieldViolation

#: AIP-155 leaves the format open; we take 1-128 printable ASCII characters.
REQUEST_ID_MAX_CHARS = 128
#: RFC 5322 section 2.1.1: a line is at most 998 characters.
EMAIL_SUBJECT_MAX_CHARS = 998
EMAIL_BODY_MAX_BYTES = 256 * 1024
#: Twilio's documented maximum message body (10 segments).
SMS_TEXT_MAX_CHARS = 1600
PUSH_TITLE_MAX_CHARS = 256
PUSH_BODY_MAX_CHARS = 2048
#: FCM: the data payload is limited to 4096 bytes (keys and values).
PUSH_DATA_MAX_BYTES = 4096
#: FCM registration tokens are opaque; real ones are ~150-250 characters.
FCM_TOKEN_MAX_CHARS = 4096
METADATA_MAX_ENTRIES = 32
METADATA_KEY_MAX_CHARS = 64
METADATA_VALUE_MAX_CHARS = 512
#: The largest SendNotificationBatch.
BATCH_MAX_ITEMS = 500
#: An error must fit in gRPC's default 8 KiB of trailing metadata (grpc-status-details-bin, plus
#: grpc-message listing the fields, percent-encoded), or the client gets RESOURCE_EXHAUSTED instead.
#: Violations echo map keys and library messages, and a request can have thousands of bad entries,
#: so map keys are cut in paths, descriptions are cut, and the violations of one request stop at a
#: byte budget (UTF-8 of paths and descriptions); a last violation says how many were left out.
VIOLATION_KEY_MAX_CHARS = 32
VIOLATION_DESCRIPTION_MAX_CHARS = 200
VIOLATIONS_MAX_BYTES = 1536
VIOLATIONS_CAPPED_DESCRIPTION = "further violations not listed"

# Patterns are used with fullmatch: with match, `$` also accepts a trailing newline.
_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
_E164_RE = re.compile(r"\+[1-9][0-9]{1,14}")
_FCM_TOKEN_RE = re.compile(r"[A-Za-z0-9_:.\-]+")
_METADATA_KEY_RE = re.compile(r"[A-Za-z0-9_.\-/]+")
#: Keys FCM reserves in the data payload (FCM HTTP v1 reference, Message.data).
_FCM_RESERVED_KEYS = frozenset({"from", "message_type", "notification"})
_FCM_RESERVED_PREFIXES = ("google.", "gcm.")
_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class NotificationPlan:
    """A validated request: the concrete channels (names, deduplicated; in
    email/sms/push order, or in the given order for a fallback chain) and the
    normalized recipient address per channel. With ``fallback`` only the first
    channel gets a delivery at accept time."""

    channels: tuple[str, ...]
    recipients: dict[str, str]
    fallback: bool = False


class RequestInvalid(Exception):
    """Raised with every field violation of a request (never partial)."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


def _violation(field: str, description: str) -> FieldViolation:
    return FieldViolation(field=field, description=description)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "\u2026"


def _key_path(field: str, key: str) -> str:
    """``field["key"]``, the key cut to ``VIOLATION_KEY_MAX_CHARS`` (an ellipsis marks a cut)."""
    return f'{field}["{_cut(key, VIOLATION_KEY_MAX_CHARS)}"]'


def _capped(violations: list[FieldViolation]) -> list[FieldViolation]:
    """``violations`` within ``VIOLATIONS_MAX_BYTES``, descriptions cut; the first is always kept."""
    kept: list[FieldViolation] = []
    used = 0
    for index, violation in enumerate(violations):
        description = _cut(violation.description, VIOLATION_DESCRIPTION_MAX_CHARS)
        used += _utf8_len(violation.field) + _utf8_len(description)
        if kept and used > VIOLATIONS_MAX_BYTES:
            left = len(violations) - index
            kept.append(
                _violation(
                    violation.field, f"{VIOLATIONS_CAPPED_DESCRIPTION}: {left}, the first on this field"
                )
            )
            break
        kept.append(_violation(violation.field, description))
    return kept


def validate_request_id(request_id: str, field: str = "request_id") -> list[FieldViolation]:
    """Check an AIP-155 request id: 1-128 printable ASCII characters."""
    if not request_id:
        return [_violation(field, "required: an idempotency key (AIP-155), e.g. a UUID")]
    if not _REQUEST_ID_RE.fullmatch(request_id):
        return [
            _violation(field, f"must be 1-{REQUEST_ID_MAX_CHARS} printable ASCII characters without spaces")
        ]
    return []


#: Outcomes of recent address checks: normalized address, or the reason it is invalid.
#: Notification traffic repeats recipients; a hit costs a dict lookup instead of
#: ~100 us of email-validator (BENCHMARKS.md). Bounded: at most this many addresses.
_EMAIL_CHECKS: LRUCache[str, tuple[bool, str]] = LRUCache(maxsize=10_000)


def normalize_email_address(address: str) -> str:
    """Return the normalized address; raise ``ValueError`` with the reason.

    Syntax per RFC 5321/5322 as implemented by ``email-validator`` (no DNS
    lookup: deliverability is the provider's business). Results, valid or not,
    are remembered in a bounded LRU (the check is a pure function of the string).
    """
    known = _EMAIL_CHECKS.get(address)
    if known is None:
        try:
            known = (True, str(validate_email(address, check_deliverability=False).normalized))
        except EmailNotValidError as exc:
            known = (False, str(exc))
        _EMAIL_CHECKS[address] = known
    valid, text = known
    if not valid:
        raise ValueError(text)
    return text


_E164_CHECKS: LRUCache[str, tuple[bool, str]] = LRUCache(maxsize=10_000)


def normalize_e164(number: str) -> str:
    """Return ``number`` if it is a valid E.164 number; raise ``ValueError`` otherwise.

    E.164 (ITU-T): ``+`` then country code and subscriber number, at most 15
    digits, no spaces or punctuation; validity per ``phonenumbers``. Results
    are remembered in a bounded LRU, as for email addresses.
    """
    known = _E164_CHECKS.get(number)
    if known is None:
        try:
            known = (True, _check_e164(number))
        except ValueError as exc:
            known = (False, str(exc))
        _E164_CHECKS[number] = known
    valid, text = known
    if not valid:
        raise ValueError(text)
    return text


def _check_e164(number: str) -> str:
    if not _E164_RE.fullmatch(number):
        raise ValueError("must be in E.164 form: '+' then 2-15 digits, e.g. +14155550123")
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError("not a valid phone number for its country code")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _fallback_channels(
    request: notify_pb2.SendNotificationRequest,
) -> tuple[tuple[str, ...], list[FieldViolation]]:
    violations: list[FieldViolation] = []
    if request.channels:
        violations.append(_violation("channels", "leave empty when fallback_channels is set"))
    chain: list[str] = []
    for index, value in enumerate(request.fallback_channels):
        name = CHANNEL_NAMES.get(value)
        if name is None:
            violations.append(_violation(f"fallback_channels[{index}]", "EMAIL, SMS or PUSH (not ALL)"))
        elif name in chain:
            violations.append(_violation(f"fallback_channels[{index}]", f"{name} appears twice"))
        else:
            chain.append(name)
    return tuple(chain), violations


def _requested_channels(
    request: notify_pb2.SendNotificationRequest,
) -> tuple[tuple[str, ...], list[FieldViolation]]:
    violations: list[FieldViolation] = []
    wanted: set[str] = set()
    if not request.channels:
        violations.append(_violation("channels", "required: at least one of EMAIL, SMS, PUSH or ALL"))
    for index, value in enumerate(request.channels):
        if value == notify_pb2.CHANNEL_ALL:
            wanted.update(ALL_CHANNELS)
        elif value in CHANNEL_NAMES:
            wanted.add(CHANNEL_NAMES[value])
        else:
            violations.append(_violation(f"channels[{index}]", f"unknown channel value {value}"))
    return tuple(c for c in ALL_CHANNELS if c in wanted), violations


def _validate_email(
    request: notify_pb2.SendNotificationRequest, recipients: dict[str, str]
) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not request.recipient.email:
        violations.append(_violation("recipient.email", "required for the EMAIL channel"))
    else:
        try:
            recipients["email"] = normalize_email_address(request.recipient.email)
        except ValueError as exc:
            violations.append(_violation("recipient.email", f"not a valid email address: {exc}"))
    email = request.email
    if not email.subject.strip():
        violations.append(_violation("email.subject", "required for the EMAIL channel"))
    elif len(email.subject) > EMAIL_SUBJECT_MAX_CHARS:
        violations.append(_violation("email.subject", f"at most {EMAIL_SUBJECT_MAX_CHARS} characters"))
    elif _CONTROL_CHARS_RE.search(email.subject):
        violations.append(_violation("email.subject", "must not contain line breaks or control characters"))
    if not email.text.strip() and not email.html.strip():
        violations.append(_violation("email.text", "the EMAIL channel needs a text or an html body"))
    for name, body in (("text", email.text), ("html", email.html)):
        if _utf8_len(body) > EMAIL_BODY_MAX_BYTES:
            violations.append(_violation(f"email.{name}", f"at most {EMAIL_BODY_MAX_BYTES} bytes in UTF-8"))
        elif "\x00" in body:
            violations.append(_violation(f"email.{name}", "must not contain NUL characters"))
    return violations


def _validate_sms(
    request: notify_pb2.SendNotificationRequest, recipients: dict[str, str]
) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not request.recipient.phone_number:
        violations.append(_violation("recipient.phone_number", "required for the SMS channel (E.164)"))
    else:
        try:
            recipients["sms"] = normalize_e164(request.recipient.phone_number)
        except ValueError as exc:
            violations.append(_violation("recipient.phone_number", str(exc)))
    text = request.sms.text
    if not text.strip():
        violations.append(_violation("sms.text", "required for the SMS channel"))
    elif len(text) > SMS_TEXT_MAX_CHARS:
        violations.append(_violation("sms.text", f"at most {SMS_TEXT_MAX_CHARS} characters"))
    elif "\x00" in text:
        violations.append(_violation("sms.text", "must not contain NUL characters"))
    return violations


def _validate_push(
    request: notify_pb2.SendNotificationRequest, recipients: dict[str, str]
) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    token = request.recipient.fcm_token
    if not token:
        violations.append(_violation("recipient.fcm_token", "required for the PUSH channel"))
    elif len(token) > FCM_TOKEN_MAX_CHARS or not _FCM_TOKEN_RE.fullmatch(token):
        violations.append(
            _violation(
                "recipient.fcm_token",
                f"an FCM registration token: 1-{FCM_TOKEN_MAX_CHARS} of A-Z a-z 0-9 _ : . -",
            )
        )
    else:
        recipients["push"] = token
    push = request.push
    if not push.title.strip() and not push.body.strip() and not push.data:
        violations.append(_violation("push", "the PUSH channel needs a title, a body or data"))
    if len(push.title) > PUSH_TITLE_MAX_CHARS:
        violations.append(_violation("push.title", f"at most {PUSH_TITLE_MAX_CHARS} characters"))
    elif "\x00" in push.title:
        violations.append(_violation("push.title", "must not contain NUL characters"))
    if len(push.body) > PUSH_BODY_MAX_CHARS:
        violations.append(_violation("push.body", f"at most {PUSH_BODY_MAX_CHARS} characters"))
    elif "\x00" in push.body:
        violations.append(_violation("push.body", "must not contain NUL characters"))
    total = 0
    for key in sorted(push.data):
        total += _utf8_len(key) + _utf8_len(push.data[key])
        if not key or key in _FCM_RESERVED_KEYS or key.startswith(_FCM_RESERVED_PREFIXES):
            violations.append(_violation(_key_path("push.data", key), "empty or reserved by FCM"))
        elif "\x00" in key or "\x00" in push.data[key]:
            violations.append(_violation(_key_path("push.data", key), "must not contain NUL characters"))
    if total > PUSH_DATA_MAX_BYTES:
        violations.append(
            _violation("push.data", f"keys and values together at most {PUSH_DATA_MAX_BYTES} bytes")
        )
    return violations


def _validate_metadata(metadata: Mapping[str, str]) -> list[FieldViolation]:
    items = sorted(metadata.items())
    violations: list[FieldViolation] = []
    if len(items) > METADATA_MAX_ENTRIES:
        violations.append(_violation("metadata", f"at most {METADATA_MAX_ENTRIES} entries"))
    for key, value in items:
        if not key or len(key) > METADATA_KEY_MAX_CHARS or not _METADATA_KEY_RE.fullmatch(key):
            violations.append(
                _violation(
                    _key_path("metadata", key), f"keys are 1-{METADATA_KEY_MAX_CHARS} of A-Z a-z 0-9 _ . - /"
                )
            )
        elif len(value) > METADATA_VALUE_MAX_CHARS:
            violations.append(
                _violation(
                    _key_path("metadata", key), f"values are at most {METADATA_VALUE_MAX_CHARS} characters"
                )
            )
        elif "\x00" in value:
            violations.append(_violation(_key_path("metadata", key), "must not contain NUL characters"))
    return violations


_CHANNEL_RULES = {"email": _validate_email, "sms": _validate_sms, "push": _validate_push}


def validate_send_request(request: notify_pb2.SendNotificationRequest) -> NotificationPlan:
    """Validate every field of ``request``; return the plan or raise ``RequestInvalid``.

    All violations are collected, so a client sees every bad field at once.
    Content for channels that were not requested is ignored.
    """
    violations = validate_request_id(request.request_id)
    fallback = bool(request.fallback_channels)
    channels, channel_violations = _fallback_channels(request) if fallback else _requested_channels(request)
    violations += channel_violations
    recipients: dict[str, str] = {}
    for channel in channels:
        violations += _CHANNEL_RULES[channel](request, recipients)
    violations += _validate_metadata(request.metadata)
    if violations:
        raise RequestInvalid(_capped(violations))
    return NotificationPlan(channels=channels, recipients=recipients, fallback=fallback)


def validate_batch_size(count: int) -> list[FieldViolation]:
    """Check the number of items of a SendNotificationBatch (1 to 500)."""
    if count == 0:
        return [_violation("requests", "at least one request")]
    if count > BATCH_MAX_ITEMS:
        return [_violation("requests", f"at most {BATCH_MAX_ITEMS} requests per batch, got {count}")]
    return []
