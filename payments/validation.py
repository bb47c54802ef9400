"""Validation of PaymentService requests: pure functions, no I/O.

Each rule names the offending field with a ``google.rpc.BadRequest``
field-violation path (AIP-193), e.g. ``customer.phone_number`` or
``metadata["k"]``; every violation of a request is reported at once and the
list is capped like the notification API's (gateway/validation.py), so an
error always fits gRPC's trailing metadata. A request that fails here writes
nothing, not even its idempotency record (docs/idempotency.md).

Money: amounts are int64 minor units of an ISO 4217 currency
(:data:`CURRENCY_MINOR_UNITS`), 1 to :data:`AMOUNT_MAX_MINOR`.

Checks that need the payment (its status, the authorized, captured and
refunded amounts) are made by payments/store.py under the payment's row lock
with payments/state_machine.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Final

from gateway import pagination
from gateway.validation import (
    FieldViolation,
    RequestInvalid,
    _capped,
    _validate_metadata,
    normalize_e164,
    normalize_email_address,
    validate_request_id,
)
from payments.state_machine import PaymentStatus
from switchboard.payments.v1 import payments_pb2

#: The largest amount accepted, in minor units: twelve digits, the largest any
#: processor we connect takes (Stripe: "up to eight digits ... twelve for some
#: currencies", https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts).
#: A processor's own, lower, limit is checked by the processor at charge time.
AMOUNT_MAX_MINOR: Final = 999_999_999_999
CUSTOMER_REFERENCE_MAX_CHARS: Final = 128
#: A processor's payment-method token (Stripe ``pm_...``, Adyen ``storedPaymentMethodId``).
PAYMENT_METHOD_MAX_CHARS: Final = 255
DESCRIPTION_MAX_CHARS: Final = 1000
#: CancelPayment and RefundPayment ``reason``.
REASON_MAX_CHARS: Final = 500

#: ISO 4217 alphabetic code -> minor unit (decimal places), for every currency
#: a payment can be made in. Source: ISO 4217 "List One: current currency &
#: funds code list", maintained by SIX Financial Information for ISO
#: (https://www.six-group.com/en/products-services/financial-information/data-standards.html),
#: snapshot of 2025 (with ZWG, 2024, and XCG, 2025; withdrawn codes such as HRK,
#: SLL and ZWL are left out). Not included, because nothing is charged in them:
#: the fund codes (:data:`ISO4217_FUND_CODES`) and the codes without a minor unit
#: (precious metals, bond-market units, XDR, XSU, XUA, XTS, XXX:
#: :data:`ISO4217_NON_MONETARY_CODES`).
CURRENCY_MINOR_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "AED": 2, "AFN": 2, "ALL": 2, "AMD": 2, "ANG": 2, "AOA": 2, "ARS": 2, "AUD": 2,
        "AWG": 2, "AZN": 2, "BAM": 2, "BBD": 2, "BDT": 2, "BGN": 2, "BHD": 3, "BIF": 0,
        "BMD": 2, "BND": 2, "BOB": 2, "BRL": 2, "BSD": 2, "BTN": 2, "BWP": 2, "BYN": 2,
        "BZD": 2, "CAD": 2, "CDF": 2, "CHF": 2, "CLP": 0, "CNY": 2, "COP": 2, "CRC": 2,
        "CUC": 2, "CUP": 2, "CVE": 2, "CZK": 2, "DJF": 0, "DKK": 2, "DOP": 2, "DZD": 2,
        "EGP": 2, "ERN": 2, "ETB": 2, "EUR": 2, "FJD": 2, "FKP": 2, "GBP": 2, "GEL": 2,
        "GHS": 2, "GIP": 2, "GMD": 2, "GNF": 0, "GTQ": 2, "GYD": 2, "HKD": 2, "HNL": 2,
        "HTG": 2, "HUF": 2, "IDR": 2, "ILS": 2, "INR": 2, "IQD": 3, "IRR": 2, "ISK": 0,
        "JMD": 2, "JOD": 3, "JPY": 0, "KES": 2, "KGS": 2, "KHR": 2, "KMF": 0, "KPW": 2,
        "KRW": 0, "KWD": 3, "KYD": 2, "KZT": 2, "LAK": 2, "LBP": 2, "LKR": 2, "LRD": 2,
        "LSL": 2, "LYD": 3, "MAD": 2, "MDL": 2, "MGA": 2, "MKD": 2, "MMK": 2, "MNT": 2,
        "MOP": 2, "MRU": 2, "MUR": 2, "MVR": 2, "MWK": 2, "MXN": 2, "MYR": 2, "MZN": 2,
        "NAD": 2, "NGN": 2, "NIO": 2, "NOK": 2, "NPR": 2, "NZD": 2, "OMR": 3, "PAB": 2,
        "PEN": 2, "PGK": 2, "PHP": 2, "PKR": 2, "PLN": 2, "PYG": 0, "QAR": 2, "RON": 2,
        "RSD": 2, "RUB": 2, "RWF": 0, "SAR": 2, "SBD": 2, "SCR": 2, "SDG": 2, "SEK": 2,
        "SGD": 2, "SHP": 2, "SLE": 2, "SOS": 2, "SRD": 2, "SSP": 2, "STN": 2, "SVC": 2,
        "SYP": 2, "SZL": 2, "THB": 2, "TJS": 2, "TMT": 2, "TND": 3, "TOP": 2, "TRY": 2,
        "TTD": 2, "TWD": 2, "TZS": 2, "UAH": 2, "UGX": 0, "USD": 2, "UYU": 2, "UZS": 2,
        "VED": 2, "VES": 2, "VND": 0, "VUV": 0, "WST": 2, "XAF": 0, "XCD": 2, "XCG": 2,
        "XOF": 0, "XPF": 0, "YER": 2, "ZAR": 2, "ZMW": 2, "ZWG": 2,
    }
)  # fmt: skip
#: ISO 4217 fund codes (List One "Fund" entries): units of account, not money that is charged.
ISO4217_FUND_CODES: Final = frozenset({"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "UYI", "UYW"})
#: ISO 4217 codes whose minor unit is "N.A.": metals, bond-market units, XDR, XSU, XUA,
#: the test code and "no currency".
ISO4217_NON_MONETARY_CODES: Final = frozenset(
    {"XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XDR", "XPD", "XPT", "XSU", "XTS", "XUA", "XXX"}
)

#: AIP-158: the page size when the request leaves ``page_size`` at 0, and the largest accepted.
PAGE_SIZE_DEFAULT: Final = 50
PAGE_SIZE_MAX: Final = 1000

# Patterns are used with fullmatch (with match, `$` also accepts a trailing newline).
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")
_CARD_LIKE_RE = re.compile(r"[0-9][0-9 -]{10,}[0-9]")

_CAPTURE_METHODS: Final[Mapping[int, str]] = MappingProxyType(
    {
        payments_pb2.CAPTURE_METHOD_UNSPECIFIED: "automatic",
        payments_pb2.CAPTURE_METHOD_AUTOMATIC: "automatic",
        payments_pb2.CAPTURE_METHOD_MANUAL: "manual",
    }
)


def _violation(field: str, description: str) -> FieldViolation:
    return FieldViolation(field=field, description=description)


def _raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise RequestInvalid(_capped(violations))


def currency_violation(currency: str, field: str = "currency") -> FieldViolation | None:
    """Why ``currency`` is not a currency a payment can be made in, or ``None`` if it is.

    It must be an upper-case ISO 4217 alphabetic code listed in :data:`CURRENCY_MINOR_UNITS`.
    """
    if not currency:
        return _violation(field, 'required: an ISO 4217 code in upper case, e.g. "EUR"')
    if not _CURRENCY_RE.fullmatch(currency):
        hint = f' (did you mean "{currency.upper()}"?)' if _CURRENCY_RE.fullmatch(currency.upper()) else ""
        return _violation(field, f'must be an ISO 4217 code of three upper-case letters, e.g. "EUR"{hint}')
    if currency in ISO4217_FUND_CODES:
        return _violation(
            field, f"{currency} is an ISO 4217 fund code (a unit of account); payments need money"
        )
    if currency in ISO4217_NON_MONETARY_CODES:
        return _violation(
            field, f"{currency} is an ISO 4217 code without a minor unit; nothing is charged in it"
        )
    if currency not in CURRENCY_MINOR_UNITS:
        return _violation(field, f"{currency} is not a current ISO 4217 currency code")
    return None


def amount_violation(
    amount_minor: int, field: str = "amount_minor", *, zero_allowed: bool
) -> FieldViolation | None:
    """Why ``amount_minor`` is out of range, or ``None``: 1 to :data:`AMOUNT_MAX_MINOR` minor
    units (0 too when ``zero_allowed``: "the whole amount" in captures and refunds)."""
    low = 0 if zero_allowed else 1
    if amount_minor < low or amount_minor > AMOUNT_MAX_MINOR:
        meaning = " (0 means the whole amount)" if zero_allowed else ""
        return _violation(
            field, f"must be {low} to {AMOUNT_MAX_MINOR} minor units{meaning}, got {amount_minor}"
        )
    return None


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def looks_like_card_number(text: str) -> bool:
    """Whether ``text`` is 12-19 digits (spaces and dashes allowed) passing the Luhn check
    (ISO/IEC 7812): raw card data, which must never reach Switchboard (PCI DSS)."""
    if not _CARD_LIKE_RE.fullmatch(text):
        return False
    digits = text.replace(" ", "").replace("-", "")
    return 12 <= len(digits) <= 19 and _luhn_valid(digits)


def _text_violation(field: str, value: str, limit: int) -> FieldViolation | None:
    if len(value) > limit:
        return _violation(field, f"at most {limit} characters, got {len(value)}")
    if "\x00" in value:
        return _violation(field, "must not contain NUL characters")
    return None


@dataclass(frozen=True)
class CreatePlan:
    """A validated CreatePaymentRequest, normalized for storage.

    ``capture_method`` is ``"automatic"`` or ``"manual"``; ``customer_email`` and
    ``customer_phone`` are normalized (email-validator, E.164) or ``""``;
    ``metadata`` is the request's map as a dict.
    """

    capture_method: str
    customer_email: str
    customer_phone: str
    metadata: dict[str, str]


def validate_create_request(request: payments_pb2.CreatePaymentRequest) -> CreatePlan:
    """Validate every field of ``request``; return the plan or raise ``RequestInvalid``.

    Rules: ``request_id`` 1-128 printable ASCII (AIP-155); ``amount_minor`` 1 to
    :data:`AMOUNT_MAX_MINOR`; ``currency`` per :func:`currency_violation`;
    ``customer_reference`` at most 128 characters without control characters;
    ``customer.email`` a valid address and ``customer.phone_number`` a valid
    E.164 number when given; ``payment_method`` 1-255 printable ASCII
    characters and never a card number; ``capture_method`` a known value;
    ``description`` at most 1000 characters; ``metadata`` at most 32 entries,
    keys 1-64 of ``A-Z a-z 0-9 _ . - /``, values at most 512 characters.
    """
    violations = validate_request_id(request.request_id)
    if (found := amount_violation(request.amount_minor, zero_allowed=False)) is not None:
        violations.append(found)
    if (found := currency_violation(request.currency)) is not None:
        violations.append(found)
    reference = request.customer_reference
    if len(reference) > CUSTOMER_REFERENCE_MAX_CHARS:
        violations.append(
            _violation("customer_reference", f"at most {CUSTOMER_REFERENCE_MAX_CHARS} characters")
        )
    elif _CONTROL_CHARS_RE.search(reference):
        violations.append(_violation("customer_reference", "must not contain control characters"))
    email = phone = ""
    if request.customer.email:
        try:
            email = normalize_email_address(request.customer.email)
        except ValueError as exc:
            violations.append(_violation("customer.email", f"not a valid email address: {exc}"))
    if request.customer.phone_number:
        try:
            phone = normalize_e164(request.customer.phone_number)
        except ValueError as exc:
            violations.append(_violation("customer.phone_number", str(exc)))
    method = request.payment_method
    if not method:
        violations.append(_violation("payment_method", "required: the processor's payment-method token"))
    elif looks_like_card_number(method):
        violations.append(
            _violation(
                "payment_method", "looks like a card number: send the processor's token, never card data"
            )
        )
    elif len(method) > PAYMENT_METHOD_MAX_CHARS or not _TOKEN_RE.fullmatch(method):
        violations.append(
            _violation(
                "payment_method",
                f"must be 1-{PAYMENT_METHOD_MAX_CHARS} printable ASCII characters without spaces",
            )
        )
    capture_method = _CAPTURE_METHODS.get(request.capture_method)
    if capture_method is None:
        violations.append(
            _violation(
                "capture_method", "must be CAPTURE_METHOD_AUTOMATIC or CAPTURE_METHOD_MANUAL (or unset)"
            )
        )
    if (found := _text_violation("description", request.description, DESCRIPTION_MAX_CHARS)) is not None:
        violations.append(found)
    violations += _validate_metadata(request.metadata)
    _raise_if(violations)
    assert capture_method is not None
    return CreatePlan(
        capture_method=capture_method,
        customer_email=email,
        customer_phone=phone,
        metadata=dict(request.metadata),
    )


def _payment_id(value: str, violations: list[FieldViolation], field: str = "payment_id") -> uuid.UUID | None:
    if not value:
        violations.append(_violation(field, "required: the payment id returned by CreatePayment"))
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        violations.append(_violation(field, "must be a payment id (UUID)"))
        return None


def parse_payment_id(value: str, field: str = "payment_id") -> uuid.UUID:
    """``value`` as a payment id; raises ``RequestInvalid`` when empty or not a UUID."""
    violations: list[FieldViolation] = []
    payment_id = _payment_id(value, violations, field)
    _raise_if(violations)
    assert payment_id is not None
    return payment_id


def validate_capture_request(request: payments_pb2.CapturePaymentRequest) -> uuid.UUID:
    """Validate a CapturePaymentRequest; return the payment id or raise ``RequestInvalid``.

    ``amount_minor`` 0 (all) to :data:`AMOUNT_MAX_MINOR`; whether it fits the
    authorized amount is checked against the payment (:mod:`payments.store`).
    """
    violations = validate_request_id(request.request_id)
    payment_id = _payment_id(request.payment_id, violations)
    if (found := amount_violation(request.amount_minor, zero_allowed=True)) is not None:
        violations.append(found)
    _raise_if(violations)
    assert payment_id is not None
    return payment_id


def validate_cancel_request(request: payments_pb2.CancelPaymentRequest) -> uuid.UUID:
    """Validate a CancelPaymentRequest (``reason`` at most 500 characters); return the payment id."""
    violations = validate_request_id(request.request_id)
    payment_id = _payment_id(request.payment_id, violations)
    if (found := _text_violation("reason", request.reason, REASON_MAX_CHARS)) is not None:
        violations.append(found)
    _raise_if(violations)
    assert payment_id is not None
    return payment_id


def validate_refund_request(request: payments_pb2.RefundPaymentRequest) -> uuid.UUID:
    """Validate a RefundPaymentRequest; return the payment id or raise ``RequestInvalid``.

    ``amount_minor`` 0 (all that remains) to :data:`AMOUNT_MAX_MINOR`; ``reason``
    at most 500 characters. What remains refundable is checked under the
    payment's row lock (:func:`payments.state_machine.check_refund`).
    """
    violations = validate_request_id(request.request_id)
    payment_id = _payment_id(request.payment_id, violations)
    if (found := amount_violation(request.amount_minor, zero_allowed=True)) is not None:
        violations.append(found)
    if (found := _text_violation("reason", request.reason, REASON_MAX_CHARS)) is not None:
        violations.append(found)
    _raise_if(violations)
    assert payment_id is not None
    return payment_id


# --- ListPayments ---------------------------------------------------------------------------------

#: PaymentStatus (state machine) by proto enum value.
STATUS_BY_PROTO: Final[Mapping[int, PaymentStatus]] = MappingProxyType(
    {payments_pb2.PaymentStatus.Value(f"PAYMENT_STATUS_{s.name}"): s for s in PaymentStatus}
)


@dataclass(frozen=True)
class PaymentListQuery:
    """A validated ListPaymentsRequest.

    ``None`` filters do not filter; ``created_after``/``created_before`` are
    exclusive bounds. ``after`` is the page token's cursor: ``(created_at, id)``
    of the last payment of the previous page.
    """

    page_size: int
    status: PaymentStatus | None = None
    currency: str | None = None
    customer_reference: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    after: tuple[datetime, uuid.UUID] | None = None

    def filter_fingerprint(self) -> str:
        """A short digest of the filters, carried in page tokens (AIP-158: a token is
        only valid with the request parameters it was issued for; page_size may change)."""
        filters = [
            "payments",
            self.status.value if self.status else None,
            self.currency,
            self.customer_reference,
            self.created_after.isoformat() if self.created_after else None,
            self.created_before.isoformat() if self.created_before else None,
        ]
        return hashlib.sha256(json.dumps(filters).encode()).hexdigest()[:16]


_FOREIGN_CURSOR = "not a page token from a previous ListPayments answer with the same filters"


def encode_page_token(query: PaymentListQuery, created_at: datetime, payment_id: uuid.UUID) -> str:
    """An opaque AIP-158 page token: "after this item, with these filters" (gateway/pagination.py)."""
    return pagination.encode_page_token(created_at, payment_id, query.filter_fingerprint())


def decode_page_token(token: str, query: PaymentListQuery) -> tuple[datetime, uuid.UUID]:
    """The cursor in ``token``; raises ``ValueError`` for a token we did not issue
    or one issued for other filters than ``query``'s."""
    return pagination.decode_page_token(token, query.filter_fingerprint(), _FOREIGN_CURSOR)


def parse_list_request(request: payments_pb2.ListPaymentsRequest) -> PaymentListQuery:
    """Validate a ListPaymentsRequest; raises ``RequestInvalid`` naming every bad field.

    Rules: ``page_size`` 0-1000 (0 means :data:`PAGE_SIZE_DEFAULT`); ``status``
    unspecified or a known status; ``currency`` empty or as in CreatePayment;
    ``customer_reference`` at most 128 characters; valid timestamps with
    ``create_time_before`` later than ``create_time_after``; ``page_token`` empty
    or issued by an earlier call with the same filters.
    """
    violations: list[FieldViolation] = []
    if not 0 <= request.page_size <= PAGE_SIZE_MAX:
        violations.append(
            _violation("page_size", f"must be 0 (default {PAGE_SIZE_DEFAULT}) to {PAGE_SIZE_MAX}")
        )
    status = None
    if request.status != payments_pb2.PAYMENT_STATUS_UNSPECIFIED:
        status = STATUS_BY_PROTO.get(request.status)
        if status is None:
            violations.append(_violation("status", "must be a known PaymentStatus (or unset: any status)"))
    if request.currency and (found := currency_violation(request.currency)) is not None:
        violations.append(found)
    if len(request.customer_reference) > CUSTOMER_REFERENCE_MAX_CHARS:
        violations.append(
            _violation("customer_reference", f"at most {CUSTOMER_REFERENCE_MAX_CHARS} characters")
        )
    created_after, created_before = pagination.create_time_range(request, violations)
    query = PaymentListQuery(
        page_size=request.page_size or PAGE_SIZE_DEFAULT,
        status=status,
        currency=request.currency or None,
        customer_reference=request.customer_reference or None,
        created_after=created_after,
        created_before=created_before,
    )
    if request.page_token and not violations:
        try:
            after = decode_page_token(request.page_token, query)
        except ValueError as exc:
            violations.append(_violation("page_token", str(exc)))
        else:
            query = dataclasses.replace(query, after=after)
    _raise_if(violations)
    return query
