"""Processor webhook events, normalized: Stripe Events and Adyen NotificationRequestItems -> one shape.

:func:`normalize_stripe_event` and :func:`normalize_adyen_item` turn what a
processor POSTs into a :class:`ProcessorNotification` (or ``None`` for an
event Switchboard does not act on). They are pure functions, never trust
their input to be well formed, and raise :class:`MalformedNotification`
(whose message quotes no input) when it is not the documented shape.
:func:`claimed_references` pulls the references out of a body whose
signature did NOT verify: it never raises, and what it returns is only used
to find which payment to look up at the processor (payments/webhooks.py).

**Stripe** (event object: https://docs.stripe.com/api/events/object; types:
https://docs.stripe.com/api/events/types). ``data.object`` is the object as it
was when the event happened. Amounts are converted from Stripe's units to
ISO 4217 minor units (:func:`payments.stripe.from_stripe_amount`: ISK differs).

==========================================  =============  =======  ===================================
event type                                  kind           success  amount, notes
==========================================  =============  =======  ===================================
payment_intent.succeeded                    AUTHORISATION  true     ``amount_received``; captured (the
                                                                    charge of an automatic payment, or
                                                                    the capture of a manual one)
payment_intent.amount_capturable_updated    AUTHORISATION  true     ``amount_capturable``; authorized
                                                                    only (ignored unless the status is
                                                                    requires_capture)
payment_intent.payment_failed               AUTHORISATION  false    ``last_payment_error.decline_code``
                                                                    (else ``code``) and ``message``
payment_intent.canceled                     CANCELLATION   true     ``amount``; with
                                                                    ``cancellation_reason`` abandoned
                                                                    (the connector gave up a 3DS-only
                                                                    intent): AUTHORISATION false
                                                                    ``authentication_required``
charge.refunded                             REFUND         true     ``amount_refunded``, the charge's
                                                                    TOTAL (``amount_is_total``): the
                                                                    Charge no longer lists its refunds
refund.created, refund.updated,             REFUND         by       ``amount``; ``status`` succeeded:
refund.failed, charge.refund.updated                       status   true; failed, canceled: false;
                                                                    pending, requires_action: None
==========================================  =============  =======  ===================================

For payment_intent events ``payment_reference`` = ``processor_reference`` =
the PaymentIntent id and ``merchant_reference`` = its
``metadata.switchboard_attempt`` (the attempt's idempotency key,
``{payment_id}_{attempt_no}``, set by payments/stripe.py). For refunds
``processor_reference`` is the refund id, ``payment_reference`` its
``payment_intent`` and ``merchant_reference`` its
``metadata.switchboard_refund_key`` (our refund id). The event id (``evt_...``)
is the deduplication key.

**Adyen** standard webhooks (https://docs.adyen.com/development-resources/webhooks,
NotificationRequestItem: https://docs.adyen.com/api-explorer/Webhooks/1/post/AUTHORISATION):
``eventCode``, ``success`` (``"true"``/``"false"``), ``pspReference``,
``originalReference`` (the payment, on modifications), ``merchantReference``
(what we sent as ``reference``: the attempt's key on AUTHORISATION, the
capture or refund id on modifications, see payments/adyen.py) and
``amount {value (minor units), currency}``.

==================  ==============  ======================================================
eventCode           kind            success
==================  ==============  ======================================================
AUTHORISATION       AUTHORISATION   ``success``; ``captured`` None (the payment's capture
                                    method decides: automatic payments are captured at once)
CAPTURE             CAPTURE         ``success``
CAPTURE_FAILED      CAPTURE         false (the card scheme rejected a capture Adyen had
                                    accepted: https://docs.adyen.com/online-payments/capture/failure-reasons)
CANCELLATION        CANCELLATION    ``success``
REFUND              REFUND          ``success``
REFUND_FAILED       REFUND          false (rejected by the scheme after being accepted)
==================  ==============  ======================================================

Adyen items carry no event id. Adyen's guidance is to recognise a repeated
webhook by ``eventCode`` and ``pspReference``; ``success`` is part of our key
too, so a later ``success=true`` for the same reference is not taken for a
repeat of an earlier ``false``: the id is ``"<eventCode>:<pspReference>:<success>"``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from payments.stripe import METADATA_ATTEMPT, METADATA_REFUND_KEY, MalformedStripeObject, from_stripe_amount

#: Longest event id / reference kept (longer ones are malformed).
MAX_REFERENCE_CHARS: Final = 255
#: Longest failure message kept (characters).
MAX_MESSAGE_CHARS: Final = 500

_CURRENCY_RE = re.compile(r"^[A-Za-z]{3}$")


class NotificationKind(enum.StrEnum):
    """What a notification is about."""

    #: The outcome of a charge attempt: authorized (maybe also captured) or declined.
    AUTHORISATION = "authorisation"
    #: The outcome of a capture of an authorized payment.
    CAPTURE = "capture"
    #: The authorization was released (canceled, or expired), or a cancel was refused.
    CANCELLATION = "cancellation"
    #: The outcome of a refund.
    REFUND = "refund"


class MalformedNotification(ValueError):
    """A webhook event that is not the processor's documented shape; the message quotes no input."""


@dataclass(frozen=True)
class ProcessorNotification:
    """One processor event in Switchboard's terms.

    ``processor``: ``"stripe"`` or ``"adyen"``. ``event_id``: the deduplication key
    (Stripe ``evt_...``; Adyen ``<eventCode>:<pspReference>:<success>``).
    ``event_type``: the processor's own name (Stripe type, Adyen eventCode).
    ``success``: the outcome; ``None`` while the processor has none yet (a pending
    refund). ``processor_reference``: the processor's id of the object the event is
    about (PaymentIntent, refund, Adyen pspReference); ``payment_reference``: its id
    of the payment (PaymentIntent id, the payment's pspReference);
    ``merchant_reference``: our key it carries (attempt key, capture or refund id;
    ``""`` if none). ``amount_minor``: ISO 4217 minor units of ``currency``
    (upper case), ``None`` when the event has no amount; with ``amount_is_total``
    it is the payment's cumulative refunded amount (Stripe charge.refunded).
    ``captured`` (AUTHORISATION): True the money was captured too, False only
    authorized, None decided by the payment's capture method (Adyen).
    ``failure_code`` / ``failure_message``: why it failed (processor text, cut to
    :data:`MAX_MESSAGE_CHARS`). ``raw``: the event (Stripe) or item (Adyen) as parsed,
    left out of the repr.
    """

    processor: str
    event_id: str
    event_type: str
    kind: NotificationKind
    success: bool | None
    processor_reference: str
    payment_reference: str
    merchant_reference: str = ""
    amount_minor: int | None = None
    currency: str = ""
    captured: bool | None = None
    amount_is_total: bool = False
    failure_code: str = ""
    failure_message: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class ClaimedReferences:
    """References a (possibly forged) body claims: processor ids and our own keys, deduplicated."""

    processor_references: tuple[str, ...] = ()
    merchant_references: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.processor_references or self.merchant_references)


# --- small readers ---------------------------------------------------------------------------------


def _reference(value: Any, what: str, *, required: bool = True) -> str:
    if value is None or value == "":
        if required:
            raise MalformedNotification(f"{what} is missing")
        return ""
    if not isinstance(value, str) or len(value) > MAX_REFERENCE_CHARS or not value.isprintable():
        raise MalformedNotification(f"{what} is not a string of at most {MAX_REFERENCE_CHARS} characters")
    return value


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedNotification(f"{what} is not an object")
    return value


def _amount(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedNotification(f"{what} is not a non-negative integer")
    return value


def _stripe_minor(value: Any, what: str, currency: str) -> int:
    """A Stripe amount in ISO 4217 minor units (ISK: Stripe's 100 per króna)."""
    try:
        return from_stripe_amount(_amount(value, what), currency)
    except MalformedStripeObject:
        raise MalformedNotification(f"{what} is not a whole amount of {currency}") from None


def _currency(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _CURRENCY_RE.match(value):
        raise MalformedNotification(f"{what} is not an ISO 4217 currency code")
    return value.upper()


def _text(value: Any) -> str:
    return str(value)[:MAX_MESSAGE_CHARS] if value not in (None, "") else ""


# --- Stripe ----------------------------------------------------------------------------------------

#: Stripe event types that describe a refund (``data.object`` is a Refund).
STRIPE_REFUND_EVENTS: Final = frozenset(
    {"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"}
)
#: Every Stripe event type :func:`normalize_stripe_event` acts on.
STRIPE_EVENTS: Final = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.amount_capturable_updated",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
        "charge.refunded",
    }
    | STRIPE_REFUND_EVENTS
)
_STRIPE_REFUND_SUCCESS: Final[Mapping[str, bool | None]] = {
    "succeeded": True,
    "failed": False,
    "canceled": False,
    "pending": None,
    "requires_action": None,
}


def stripe_envelope(event: Any) -> tuple[str, str]:
    """``(id, type)`` of a Stripe Event object; raises :class:`MalformedNotification`.

    The id must be a non-empty string of at most :data:`MAX_REFERENCE_CHARS`
    characters, ``object`` (when present) ``"event"``.
    """
    body = _mapping(event, "the event")
    if body.get("object", "event") != "event":
        raise MalformedNotification("the body is not a Stripe event object")
    return _reference(body.get("id"), "event id"), _reference(body.get("type"), "event type")


def _metadata(obj: Mapping[str, Any], key: str) -> str:
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        return ""
    value = metadata.get(key)
    if isinstance(value, str) and 0 < len(value) <= MAX_REFERENCE_CHARS:
        return value
    return ""


def normalize_stripe_event(event: Mapping[str, Any]) -> ProcessorNotification | None:
    """The notification of a verified Stripe Event (see the module docstring's table).

    ``event``: the parsed body (https://docs.stripe.com/api/events/object). Returns
    ``None`` for a type not in :data:`STRIPE_EVENTS` (and for
    amount_capturable_updated whose PaymentIntent is not ``requires_capture``).
    Raises :class:`MalformedNotification` when the envelope or ``data.object``
    lacks a field the type needs.
    """
    event_id, event_type = stripe_envelope(event)
    if event_type not in STRIPE_EVENTS:
        return None
    obj = _mapping(_mapping(event.get("data"), "data").get("object"), "data.object")
    if event_type in STRIPE_REFUND_EVENTS:
        return _stripe_refund(event, event_id, event_type, obj)
    if event_type == "charge.refunded":
        if obj.get("object") != "charge":
            raise MalformedNotification("data.object is not a charge")
        currency = _currency(obj.get("currency"), "charge currency")
        return ProcessorNotification(
            processor="stripe",
            event_id=event_id,
            event_type=event_type,
            kind=NotificationKind.REFUND,
            success=True,
            processor_reference=_reference(obj.get("id"), "charge id"),
            payment_reference=_reference(obj.get("payment_intent"), "charge payment_intent"),
            amount_minor=_stripe_minor(obj.get("amount_refunded"), "amount_refunded", currency),
            currency=currency,
            amount_is_total=True,
            raw=event,
        )
    if obj.get("object") != "payment_intent":
        raise MalformedNotification("data.object is not a payment_intent")
    intent_id = _reference(obj.get("id"), "payment_intent id")
    currency = _currency(obj.get("currency"), "payment_intent currency")
    status = obj.get("status")

    def notification(
        kind: NotificationKind,
        success: bool,
        amount_field: str,
        *,
        captured: bool | None = None,
        code: str = "",
        message: str = "",
    ) -> ProcessorNotification:
        return ProcessorNotification(
            processor="stripe",
            event_id=event_id,
            event_type=event_type,
            kind=kind,
            success=success,
            processor_reference=intent_id,
            payment_reference=intent_id,
            merchant_reference=_metadata(obj, METADATA_ATTEMPT),
            amount_minor=_stripe_minor(obj.get(amount_field), amount_field, currency),
            currency=currency,
            captured=captured,
            failure_code=code,
            failure_message=message,
            raw=event,
        )

    if event_type == "payment_intent.succeeded":
        return notification(NotificationKind.AUTHORISATION, True, "amount_received", captured=True)
    if event_type == "payment_intent.amount_capturable_updated":
        if status != "requires_capture":
            return None
        return notification(NotificationKind.AUTHORISATION, True, "amount_capturable", captured=False)
    if event_type == "payment_intent.payment_failed":
        error = obj.get("last_payment_error")
        error = error if isinstance(error, Mapping) else {}
        code = _text(error.get("decline_code") or error.get("code")) or "payment_failed"
        message = _text(error.get("message")) or "the processor reports the payment failed"
        return notification(NotificationKind.AUTHORISATION, False, "amount", code=code, message=message)
    # payment_intent.canceled
    if obj.get("cancellation_reason") == "abandoned":
        return notification(
            NotificationKind.AUTHORISATION,
            False,
            "amount",
            code="authentication_required",
            message="abandoned: the payment needed customer authentication (3D Secure)",
        )
    return notification(NotificationKind.CANCELLATION, True, "amount")


def _stripe_refund(
    event: Mapping[str, Any], event_id: str, event_type: str, obj: Mapping[str, Any]
) -> ProcessorNotification:
    if obj.get("object") != "refund":
        raise MalformedNotification("data.object is not a refund")
    status = obj.get("status")
    if not isinstance(status, str) or status not in _STRIPE_REFUND_SUCCESS:
        raise MalformedNotification("the refund status is not one Stripe documents")
    currency = _currency(obj.get("currency"), "refund currency")
    success = _STRIPE_REFUND_SUCCESS[status]
    return ProcessorNotification(
        processor="stripe",
        event_id=event_id,
        event_type=event_type,
        kind=NotificationKind.REFUND,
        success=success,
        processor_reference=_reference(obj.get("id"), "refund id"),
        payment_reference=_reference(obj.get("payment_intent"), "refund payment_intent", required=False),
        merchant_reference=_metadata(obj, METADATA_REFUND_KEY),
        amount_minor=_stripe_minor(obj.get("amount"), "refund amount", currency),
        currency=currency,
        failure_code=_text(obj.get("failure_reason")) or (f"refund_{status}" if success is False else ""),
        failure_message=f"the processor reports the refund {status}" if success is False else "",
        raw=event,
    )


# --- Adyen -----------------------------------------------------------------------------------------

#: Adyen eventCodes :func:`normalize_adyen_item` acts on: (kind, success override).
ADYEN_EVENTS: Final[Mapping[str, tuple[NotificationKind, bool | None]]] = {
    "AUTHORISATION": (NotificationKind.AUTHORISATION, None),
    "CAPTURE": (NotificationKind.CAPTURE, None),
    "CAPTURE_FAILED": (NotificationKind.CAPTURE, False),
    "CANCELLATION": (NotificationKind.CANCELLATION, None),
    "REFUND": (NotificationKind.REFUND, None),
    "REFUND_FAILED": (NotificationKind.REFUND, False),
}


def adyen_items(body: Any) -> list[Mapping[str, Any]]:
    """The NotificationRequestItems of a standard-webhook body ``{"live", "notificationItems": [...]}``.

    Raises :class:`MalformedNotification` when the body is not that shape (no
    items, or an entry without a ``NotificationRequestItem`` object).
    """
    wrapped = _mapping(body, "the body").get("notificationItems")
    if not isinstance(wrapped, list) or not wrapped:
        raise MalformedNotification("the body has no notificationItems")
    items: list[Mapping[str, Any]] = []
    for position, entry in enumerate(wrapped):
        item = entry.get("NotificationRequestItem") if isinstance(entry, Mapping) else None
        if not isinstance(item, Mapping):
            raise MalformedNotification(f"notificationItems[{position}] has no NotificationRequestItem")
        items.append(item)
    return items


def _adyen_success(value: Any) -> bool:
    if value in ("true", True):
        return True
    if value in ("false", False):
        return False
    raise MalformedNotification("success is not 'true' or 'false'")


def adyen_event_id(item: Mapping[str, Any]) -> str:
    """``"<eventCode>:<pspReference>:<success>"``, the deduplication key of an Adyen item.

    Raises :class:`MalformedNotification` when a part is missing or malformed.
    """
    code = _reference(item.get("eventCode"), "eventCode")
    psp = _reference(item.get("pspReference"), "pspReference")
    success = "true" if _adyen_success(item.get("success")) else "false"
    event_id = f"{code}:{psp}:{success}"
    if len(event_id) > MAX_REFERENCE_CHARS:
        raise MalformedNotification("eventCode and pspReference are too long")
    return event_id


def normalize_adyen_item(item: Mapping[str, Any]) -> ProcessorNotification | None:
    """The notification of one verified NotificationRequestItem (see the module docstring's table).

    Returns ``None`` for an eventCode not in :data:`ADYEN_EVENTS`. Raises
    :class:`MalformedNotification` for missing or malformed fields.
    """
    event_id = adyen_event_id(item)
    code = str(item["eventCode"])
    if code not in ADYEN_EVENTS:
        return None
    kind, forced = ADYEN_EVENTS[code]
    success = _adyen_success(item.get("success")) if forced is None else forced
    psp = str(item["pspReference"])
    original = _reference(item.get("originalReference"), "originalReference", required=False)
    amount = item.get("amount")
    amount_minor: int | None = None
    currency = ""
    if amount is not None:
        amount_map = _mapping(amount, "amount")
        amount_minor = _amount(amount_map.get("value"), "amount.value")
        currency = _currency(amount_map.get("currency"), "amount.currency")
    if kind is NotificationKind.AUTHORISATION:
        payment_reference = psp
    else:
        payment_reference = original
        if not payment_reference:
            raise MalformedNotification(f"a {code} item needs originalReference")
    reason = _text(item.get("reason"))
    return ProcessorNotification(
        processor="adyen",
        event_id=event_id,
        event_type=code,
        kind=kind,
        success=success,
        processor_reference=psp,
        payment_reference=payment_reference,
        merchant_reference=_reference(item.get("merchantReference"), "merchantReference", required=False),
        amount_minor=amount_minor,
        currency=currency,
        failure_code="" if success else code.lower() if forced is not None else f"{code.lower()}_refused",
        failure_message="" if success else (reason or f"Adyen {code} success=false"),
        raw=item,
    )


# --- what an unverified body claims ----------------------------------------------------------------


def _strings(values: Sequence[Any]) -> tuple[str, ...]:
    seen: list[str] = []
    for value in values:
        if (
            isinstance(value, str)
            and 0 < len(value) <= MAX_REFERENCE_CHARS
            and value.isprintable()
            and value not in seen
        ):
            seen.append(value)
    return tuple(seen)


def claimed_references(processor: str, body: Any) -> ClaimedReferences:
    """The references a body claims to be about, whatever its shape; never raises.

    For a delivery whose signature did not verify: nothing in it is trusted, it
    only says which of the tenant's payments to look up at the processor.
    Stripe: ``data.object.id``, ``.payment_intent``, ``.metadata.switchboard_attempt``
    / ``.switchboard_refund_key``. Adyen: every item's ``pspReference``,
    ``originalReference`` and ``merchantReference``. Anything else gives nothing.
    """
    processor_refs: list[Any] = []
    merchant_refs: list[Any] = []
    if not isinstance(body, Mapping):
        return ClaimedReferences()
    if processor == "stripe":
        data = body.get("data")
        obj = data.get("object") if isinstance(data, Mapping) else None
        if isinstance(obj, Mapping):
            processor_refs += [obj.get("id"), obj.get("payment_intent")]
            merchant_refs += [_metadata(obj, METADATA_ATTEMPT), _metadata(obj, METADATA_REFUND_KEY)]
    elif processor == "adyen":
        wrapped = body.get("notificationItems")
        for entry in wrapped if isinstance(wrapped, list) else []:
            item = entry.get("NotificationRequestItem") if isinstance(entry, Mapping) else None
            if isinstance(item, Mapping):
                processor_refs += [item.get("pspReference"), item.get("originalReference")]
                merchant_refs.append(item.get("merchantReference"))
    return ClaimedReferences(_strings(processor_refs), _strings(merchant_refs))
