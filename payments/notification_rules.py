"""Payment notification rules: "on this payment event, notify the customer like this".

A tenant keeps any number of named rules (table ``payment_notification_rules``,
migration 0011). Each rule names one ``PaymentEvent.event_type`` (e.g.
``payment.succeeded``), the channels to send on (email, sms, push) and one
template per piece of content: ``email_subject``, ``email_text``,
``email_html``, ``sms_text``, ``push_title``, ``push_body``.

Templates are :class:`string.Template` text: ``$name`` or ``${name}`` is
replaced, ``$$`` is a literal ``$``; nothing else is evaluated (no attribute
access, no format specs, no code). The placeholders are :data:`PLACEHOLDERS`.
Amounts are rendered in major units with exactly the currency's ISO 4217
exponent of decimals, computed with :class:`decimal.Decimal` (never floats):
``1050 EUR -> "10.50"``, ``500 JPY -> "500"``, ``1234 BHD -> "1.234"``.
In ``email_html`` every value is HTML-escaped (:func:`html.escape`, quotes
included); in the single-line templates (``email_subject``, ``push_title``)
line breaks and other control characters of values become spaces.

Recipients come from the event's payment snapshot: email from
``customer.email``, SMS from ``customer.phone_number`` and push from the
payment metadata entry :data:`PUSH_TOKEN_METADATA_KEY`. A channel whose
recipient is missing is left out of the notification (and reported in
:attr:`Rendered.skipped`); with no channel left nothing is sent.

The notification's ``request_id`` is :func:`notification_request_id` of the
rule id and the event id, so a redelivered event is accepted again with the
same key and replays the first answer instead of sending twice.

Validation (:func:`validate_rule`) raises :class:`RuleInvalid` with every
violation at once, each naming its field (``name``, ``event_type``,
``channels``, ``channels[1]``, ``email_subject`` ...), the same
``google.rpc.BadRequest.FieldViolation`` shape the gateway uses.
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from string import Template
from typing import Final

import asyncpg
from google.rpc.error_details_pb2 import BadRequest

from channels.catalog import ALL_CHANNELS, CHANNEL_VALUES
from gateway.validation import (
    EMAIL_BODY_MAX_BYTES,
    EMAIL_SUBJECT_MAX_CHARS,
    PUSH_BODY_MAX_CHARS,
    PUSH_TITLE_MAX_CHARS,
    SMS_TEXT_MAX_CHARS,
)
from payments.reconciliation import currency_exponent
from payments.state_machine import PaymentEventType
from switchboard.db.pool import Connection
from switchboard.notify.v1 import notify_pb2
from switchboard.payments.v1 import events_pb2

FieldViolation = BadRequest.FieldViolation

#: Every ``PaymentEvent.event_type`` a rule can name (payments/state_machine.py, events.proto).
EVENT_TYPES: Final[tuple[str, ...]] = tuple(t.value for t in PaymentEventType)

#: The placeholders templates may use, with what each becomes.
PLACEHOLDERS: Final[dict[str, str]] = {
    "amount": "the payment amount in major units of its currency, e.g. 10.50",
    "amount_captured": "the amount captured so far, major units",
    "amount_refunded": "the amount refunded so far (this refund included), major units",
    "refund_amount": "for payment.refunded: this refund's amount, major units; empty otherwise",
    "currency": "the ISO 4217 code, e.g. EUR",
    "description": "the payment's description",
    "payment_id": "the payment id (UUID)",
    "customer_reference": "the tenant's reference for the customer",
    "event_type": "the event type, e.g. payment.succeeded",
    "failure_message": "for payment.failed: the processor's explanation; empty otherwise",
    "occur_time": "when the change happened, RFC 3339 UTC, e.g. 2026-01-31T09:30:00Z",
}

#: The payment metadata entry holding the customer's FCM registration token (push channel).
PUSH_TOKEN_METADATA_KEY: Final = "fcm_token"  # noqa: S105 - a metadata key name, not a secret

#: Tenant-chosen rule names: like tenant names, plus ``_``; at most 63 characters.
RULE_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

#: The template fields, in display order, with the channel each belongs to.
TEMPLATE_CHANNELS: Final[dict[str, str]] = {
    "email_subject": "email",
    "email_text": "email",
    "email_html": "email",
    "sms_text": "sms",
    "push_title": "push",
    "push_body": "push",
}

_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")
_SINGLE_LINE_FIELDS = frozenset({"email_subject", "push_title"})


class RuleInvalid(ValueError):
    """A rule failed validation; ``violations`` lists every bad field (never partial)."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


class RenderError(ValueError):
    """An event cannot be rendered with a rule (e.g. its currency is not in ISO 4217)."""


@dataclass(frozen=True)
class RuleTemplates:
    """The content templates of a rule; ``""`` means unused. Text, see the module docstring."""

    email_subject: str = ""
    email_text: str = ""
    email_html: str = ""
    sms_text: str = ""
    push_title: str = ""
    push_body: str = ""

    def as_dict(self) -> dict[str, str]:
        """``{field name: template}`` for every field of :data:`TEMPLATE_CHANNELS`."""
        return {name: getattr(self, name) for name in TEMPLATE_CHANNELS}


@dataclass(frozen=True)
class RuleSpec:
    """What a tenant sets: a rule without its id and timestamps.

    ``name`` is the tenant's handle (:data:`RULE_NAME_RE`); ``event_type`` one
    of :data:`EVENT_TYPES`; ``channels`` names from ``email``, ``sms``,
    ``push``; ``enabled`` false keeps the rule stored but never fires it.
    """

    name: str
    event_type: str
    channels: tuple[str, ...]
    templates: RuleTemplates = field(default_factory=RuleTemplates)
    enabled: bool = True


@dataclass(frozen=True)
class NotificationRule:
    """A stored rule: its id (UUID, stable across ``set`` of the same name), tenant and times."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    spec: RuleSpec
    created_at: datetime
    updated_at: datetime


def _violation(field_name: str, description: str) -> FieldViolation:
    return FieldViolation(field=field_name, description=description)


def _known_placeholders() -> str:
    return ", ".join(f"${name}" for name in PLACEHOLDERS)


def _template_violations(field_name: str, text: str) -> list[FieldViolation]:
    """Syntax and placeholder checks of one template (placeholders must be known)."""
    if "\x00" in text:
        return [_violation(field_name, "must not contain NUL characters")]
    template = Template(text)
    if not template.is_valid():
        return [
            _violation(
                field_name,
                "invalid placeholder: use $name or ${name} with a known name, and $$ for a literal $",
            )
        ]
    unknown = [name for name in template.get_identifiers() if name not in PLACEHOLDERS]
    if unknown:
        names = ", ".join(f"${name}" for name in unknown)
        return [_violation(field_name, f"unknown placeholder {names}; known: {_known_placeholders()}")]
    return []


def _length_violation(field_name: str, text: str) -> FieldViolation | None:
    if field_name == "email_subject":
        if len(text) > EMAIL_SUBJECT_MAX_CHARS:
            return _violation(field_name, f"at most {EMAIL_SUBJECT_MAX_CHARS} characters")
        if _CONTROL_CHARS_RE.search(text):
            return _violation(field_name, "must not contain line breaks or control characters")
    elif field_name in ("email_text", "email_html"):
        if len(text.encode("utf-8", errors="surrogatepass")) > EMAIL_BODY_MAX_BYTES:
            return _violation(field_name, f"at most {EMAIL_BODY_MAX_BYTES} bytes in UTF-8")
    else:
        limit = {
            "sms_text": SMS_TEXT_MAX_CHARS,
            "push_title": PUSH_TITLE_MAX_CHARS,
            "push_body": PUSH_BODY_MAX_CHARS,
        }[field_name]
        if len(text) > limit:
            return _violation(field_name, f"at most {limit} characters")
    return None


def _channel_violations(channels: tuple[str, ...]) -> tuple[tuple[str, ...], list[FieldViolation]]:
    violations: list[FieldViolation] = []
    seen: list[str] = []
    if not channels:
        violations.append(_violation("channels", "required: at least one of email, sms, push"))
    for index, channel in enumerate(channels):
        if channel not in ALL_CHANNELS:
            violations.append(
                _violation(f"channels[{index}]", f"unknown channel {channel!r}: email, sms or push")
            )
        elif channel in seen:
            violations.append(_violation(f"channels[{index}]", f"{channel} appears twice"))
        else:
            seen.append(channel)
    return tuple(c for c in ALL_CHANNELS if c in seen), violations


def validate_rule(spec: RuleSpec) -> RuleSpec:
    """Check every field of ``spec``; return it normalized or raise :class:`RuleInvalid`.

    Normalized: ``channels`` in email, sms, push order. Checks: the name
    pattern; a known event type; 1-3 distinct known channels; each chosen
    channel has its content (email: ``email_subject`` and ``email_text`` or
    ``email_html``; sms: ``sms_text``; push: ``push_title`` or ``push_body``);
    templates of channels not chosen are empty; every template uses only
    :data:`PLACEHOLDERS` with valid syntax and fits the notification limits of
    :mod:`gateway.validation` (before rendering; the rendered request is
    checked again when an event fires the rule).
    """
    violations: list[FieldViolation] = []
    if not RULE_NAME_RE.fullmatch(spec.name):
        violations.append(_violation("name", "1-63 of a-z 0-9 _ -, starting with a letter or digit"))
    if spec.event_type not in EVENT_TYPES:
        violations.append(
            _violation(
                "event_type", f"unknown event type {spec.event_type!r}; one of {', '.join(EVENT_TYPES)}"
            )
        )
    channels, channel_violations = _channel_violations(spec.channels)
    violations += channel_violations
    texts = spec.templates.as_dict()
    for field_name, text in texts.items():
        channel = TEMPLATE_CHANNELS[field_name]
        if text and channel not in channels and not channel_violations:
            violations.append(
                _violation(
                    field_name, f"only used with the {channel} channel: add it to channels or leave empty"
                )
            )
            continue
        if not text:
            continue
        found = _template_violations(field_name, text)
        length = _length_violation(field_name, text)
        violations += found or ([length] if length else [])
    if "email" in channels:
        if not texts["email_subject"].strip():
            violations.append(_violation("email_subject", "required for the email channel"))
        if not texts["email_text"].strip() and not texts["email_html"].strip():
            violations.append(_violation("email_text", "the email channel needs email_text or email_html"))
    if "sms" in channels and not texts["sms_text"].strip():
        violations.append(_violation("sms_text", "required for the sms channel"))
    if "push" in channels and not texts["push_title"].strip() and not texts["push_body"].strip():
        violations.append(_violation("push_title", "the push channel needs push_title or push_body"))
    if violations:
        raise RuleInvalid(violations)
    return RuleSpec(spec.name, spec.event_type, channels, spec.templates, spec.enabled)


# --- rendering --------------------------------------------------------------------------------------


def format_major_units(amount_minor: int, currency: str) -> str:
    """``amount_minor`` minor units of ``currency`` as a major-unit decimal string.

    Exactly the ISO 4217 exponent of decimals (``iso4217`` package), computed
    with ``Decimal``: ``(1050, "EUR") -> "10.50"``, ``(500, "JPY") -> "500"``,
    ``(1234, "BHD") -> "1.234"``, ``(-5, "EUR") -> "-0.05"``. Raises
    :class:`RenderError` for a code that is not an ISO 4217 currency with a
    minor unit.
    """
    try:
        exponent = currency_exponent(currency)
    except ValueError as exc:
        raise RenderError(str(exc)) from None
    return f"{Decimal(amount_minor).scaleb(-exponent):.{exponent}f}"


def placeholder_values(event: events_pb2.PaymentEvent) -> dict[str, str]:
    """The raw (unescaped) value of every :data:`PLACEHOLDERS` entry for ``event``.

    Raises :class:`RenderError` when the event's currency is unknown.
    """
    currency = event.currency

    def money(minor: int) -> str:
        return format_major_units(minor, currency)

    return {
        "amount": money(event.amount_minor),
        "amount_captured": money(event.amount_captured_minor),
        "amount_refunded": money(event.amount_refunded_minor),
        "refund_amount": money(event.refund.amount_minor) if event.HasField("refund") else "",
        "currency": currency.upper(),
        "description": event.description,
        "payment_id": event.payment_id,
        "customer_reference": event.customer_reference,
        "event_type": event.event_type,
        "failure_message": event.failure_message,
        "occur_time": event.occur_time.ToJsonString() if event.HasField("occur_time") else "",
    }


def _plain(value: str) -> str:
    return value.replace("\x00", "")


def _single_line(value: str) -> str:
    return _CONTROL_CHARS_RE.sub(" ", value)


def _escape_html(value: str) -> str:
    return html.escape(value.replace("\x00", ""), quote=True)


def render_template(field_name: str, text: str, values: Mapping[str, str]) -> str:
    """``text`` with its placeholders replaced by ``values``, escaped for ``field_name``.

    ``email_html``: values HTML-escaped; ``email_subject``/``push_title``:
    control characters of values become spaces; otherwise NULs dropped.
    Raises ``KeyError``/``ValueError`` (from :class:`string.Template`) for a
    template that :func:`validate_rule` would refuse.
    """
    escape: Callable[[str], str]
    if field_name == "email_html":
        escape = _escape_html
    elif field_name in _SINGLE_LINE_FIELDS:
        escape = _single_line
    else:
        escape = _plain
    return Template(text).substitute({name: escape(value) for name, value in values.items()})


def notification_request_id(rule_id: uuid.UUID, event_id: uuid.UUID) -> str:
    """The idempotency key of the notification ``rule_id`` sends for ``event_id`` (92 ASCII chars).

    ``payment-rule:<rule id>:event:<event id>``: the same event (a Kafka
    redelivery, a republished outbox row) gives the same key, so the write
    path replays the first answer instead of sending again.
    """
    return f"payment-rule:{rule_id}:event:{event_id}"


@dataclass(frozen=True)
class Rendered:
    """A rule rendered for an event.

    ``request`` is the SendNotificationRequest to accept (not yet validated
    by :func:`gateway.validation.validate_send_request`), or ``None`` when no
    channel of the rule has a recipient; ``skipped`` lists ``(channel,
    reason)`` for every channel left out.
    """

    request: notify_pb2.SendNotificationRequest | None
    skipped: tuple[tuple[str, str], ...]


def _recipient(channel: str, event: events_pb2.PaymentEvent) -> tuple[str, str]:
    """(address or "", reason when missing) for ``channel``."""
    if channel == "email":
        return event.customer.email, "the payment has no customer email"
    if channel == "sms":
        return event.customer.phone_number, "the payment has no customer phone number"
    return event.metadata.get(PUSH_TOKEN_METADATA_KEY, ""), (
        f"the payment has no metadata entry {PUSH_TOKEN_METADATA_KEY!r} (FCM registration token)"
    )


def render_notification(
    rule: NotificationRule, event: events_pb2.PaymentEvent, event_id: uuid.UUID
) -> Rendered:
    """Build the SendNotificationRequest ``rule`` sends for ``event`` (whose id is ``event_id``).

    One notification on every channel of the rule that has a recipient (see
    the module docstring); ``request_id`` from :func:`notification_request_id`;
    metadata ``payment_id``, ``payment_event_id``, ``payment_event_type`` and
    ``payment_notification_rule`` (the rule name); push data ``payment_id``
    and ``event_type``. Deterministic: the same rule and event always give
    the same request. Raises :class:`RenderError` for an unknown currency.
    """
    spec = rule.spec
    channels: list[str] = []
    skipped: list[tuple[str, str]] = []
    recipient = notify_pb2.Recipient()
    for channel in spec.channels:
        address, reason = _recipient(channel, event)
        if not address:
            skipped.append((channel, reason))
            continue
        channels.append(channel)
        if channel == "email":
            recipient.email = address
        elif channel == "sms":
            recipient.phone_number = address
        else:
            recipient.fcm_token = address
    if not channels:
        return Rendered(None, tuple(skipped))
    values = placeholder_values(event)
    texts = {name: render_template(name, text, values) for name, text in spec.templates.as_dict().items()}
    request = notify_pb2.SendNotificationRequest(
        request_id=notification_request_id(rule.id, event_id),
        channels=[CHANNEL_VALUES[c] for c in channels],  # type: ignore[misc]
        recipient=recipient,
        metadata={
            "payment_id": event.payment_id,
            "payment_event_id": str(event_id),
            "payment_event_type": event.event_type,
            "payment_notification_rule": spec.name,
        },
    )
    if "email" in channels:
        request.email.CopyFrom(
            notify_pb2.EmailContent(
                subject=texts["email_subject"], text=texts["email_text"], html=texts["email_html"]
            )
        )
    if "sms" in channels:
        request.sms.text = texts["sms_text"]
    if "push" in channels:
        request.push.CopyFrom(
            notify_pb2.PushContent(
                title=texts["push_title"],
                body=texts["push_body"],
                data={"payment_id": event.payment_id, "event_type": event.event_type},
            )
        )
    return Rendered(request, tuple(skipped))


# --- storage ----------------------------------------------------------------------------------------

_COLUMNS = (
    "id, tenant_id, name, event_type, channels, email_subject, email_text, email_html, "
    "sms_text, push_title, push_body, enabled, created_at, updated_at"
)


def _rule(row: asyncpg.Record) -> NotificationRule:
    templates = RuleTemplates(**{name: row[name] for name in TEMPLATE_CHANNELS})
    spec = RuleSpec(row["name"], row["event_type"], tuple(row["channels"]), templates, row["enabled"])
    return NotificationRule(row["id"], row["tenant_id"], spec, row["created_at"], row["updated_at"])


async def set_rule(conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID, spec: RuleSpec) -> NotificationRule:
    """Validate ``spec`` and store it as ``tenant_id``'s rule ``spec.name``; return the stored rule.

    An existing rule of that name is replaced entirely (templates left out
    become empty) and keeps its id, so events already notified under it stay
    deduplicated. Raises :class:`RuleInvalid` (nothing stored) and asyncpg's
    ``ForeignKeyViolationError`` for an unknown tenant.
    """
    spec = validate_rule(spec)
    t = spec.templates
    row = await conn.fetchrow(
        f"""INSERT INTO payment_notification_rules AS r
                   (id, tenant_id, name, event_type, channels, email_subject, email_text, email_html,
                    sms_text, push_title, push_body, enabled)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
            ON CONFLICT (tenant_id, name) DO UPDATE
               SET event_type = excluded.event_type, channels = excluded.channels,
                   email_subject = excluded.email_subject, email_text = excluded.email_text,
                   email_html = excluded.email_html, sms_text = excluded.sms_text,
                   push_title = excluded.push_title, push_body = excluded.push_body,
                   enabled = excluded.enabled, updated_at = now()
            RETURNING {_COLUMNS}""",  # noqa: S608 - a module constant; every value is a bind parameter
        uuid.uuid4(),
        tenant_id,
        spec.name,
        spec.event_type,
        list(spec.channels),
        t.email_subject,
        t.email_text,
        t.email_html,
        t.sms_text,
        t.push_title,
        t.push_body,
        spec.enabled,
    )
    assert row is not None
    return _rule(row)


async def list_rules(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID, event_type: str | None = None
) -> list[NotificationRule]:
    """``tenant_id``'s rules (all, or those for ``event_type``), by event type then name."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM payment_notification_rules
             WHERE tenant_id = $1 AND ($2::text IS NULL OR event_type = $2)
             ORDER BY event_type, name""",  # noqa: S608 - a module constant
        tenant_id,
        event_type,
    )
    return [_rule(r) for r in rows]


async def delete_rule(conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID, name: str) -> bool:
    """Delete ``tenant_id``'s rule ``name``; ``False`` if there was none."""
    deleted = await conn.fetchval(
        "DELETE FROM payment_notification_rules WHERE tenant_id = $1 AND name = $2 RETURNING 1",
        tenant_id,
        name,
    )
    return deleted is not None


async def rules_for_event(
    conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID, event_type: str
) -> list[NotificationRule]:
    """The enabled rules ``tenant_id`` has for ``event_type``, by name; none for a disabled tenant.

    Only ``tenant_id``'s own rules: another tenant's rule never fires here.
    """
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM payment_notification_rules r
             WHERE r.tenant_id = $1 AND r.event_type = $2 AND r.enabled
               AND EXISTS (SELECT 1 FROM tenants t WHERE t.id = r.tenant_id AND t.disabled_at IS NULL)
             ORDER BY r.name""",  # noqa: S608 - a module constant
        tenant_id,
        event_type,
    )
    return [_rule(r) for r in rows]
