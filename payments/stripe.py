"""Stripe connector: card payments through the PaymentIntents API (https://docs.stripe.com/api/payment_intents).

Wire format (https://docs.stripe.com/api/authentication, https://docs.stripe.com/api/versioning)::

    POST {base_url}/v1/payment_intents
    Authorization: Bearer sk_...            (the tenant's secret key)
    Stripe-Version: 2025-03-31.basil        (pinned: response shapes do not move under us)
    Idempotency-Key: {payment_id}_{attempt_no}
    Content-Type: application/x-www-form-urlencoded

    amount=1050&currency=eur&payment_method=pm_...&confirm=true&capture_method=automatic
    &automatic_payment_methods[enabled]=true&automatic_payment_methods[allow_redirects]=never
    &description=...&metadata[switchboard_payment_id]=<uuid>&metadata[switchboard_attempt]=<key>

Nested parameters use Stripe's bracket notation (``metadata[key]=value``,
lists as ``key[0]=...``), see :func:`encode_form`. Calls:

==================  =====================================================  ==========================
operation           request                                                 docs
==================  =====================================================  ==========================
create_charge       ``POST /v1/payment_intents`` (confirm=true)             /api/payment_intents/create
confirm             ``POST /v1/payment_intents/{id}/confirm``               /api/payment_intents/confirm
                    (``payment_method``, ``return_url``; not used to
                    charge: see :meth:`StripeProcessor.confirm`)
capture             ``POST /v1/payment_intents/{id}/capture``               /api/payment_intents/capture
                    (``amount_to_capture``)
cancel              ``POST /v1/payment_intents/{id}/cancel``                /api/payment_intents/cancel
refund              ``POST /v1/refunds`` (``payment_intent``, ``amount``)   /api/refunds/create
retrieve            ``GET /v1/payment_intents/{id}``                        /api/payment_intents/retrieve
lookup_charge       ``GET /v1/payment_intents/search`` then                 /api/payment_intents/search,
                    ``GET /v1/payment_intents?created[gte]=...``            /api/payment_intents/list
==================  =====================================================  ==========================

``automatic_payment_methods[allow_redirects]=never`` is sent because this is a
server-to-server charge with no customer browser to redirect: Stripe otherwise
refuses ``confirm=true`` without a ``return_url``.

**Amounts** are ISO 4217 minor units on our side and "the currency's smallest
unit" on Stripe's (https://docs.stripe.com/currencies#minor-units); they agree
except for ISK, which ISO 4217 gives 0 decimals but Stripe keeps as a
two-decimal currency (100 = 1 króna, multiples of 100 only;
https://docs.stripe.com/currencies#special-cases), so ISK amounts are scaled
by 100 on the wire. Currencies go to Stripe lower-case and come back upper-case.
Three-decimal currencies (BHD, JOD, KWD, OMR, TND) must end in 0 at Stripe;
Stripe refuses others with a 400 (a :class:`PermanentProcessorError`).

**PaymentIntent status mapping** (https://docs.stripe.com/payments/paymentintents/lifecycle):

=========================  ==================  ==========================================================
Stripe ``status``          ProcessorStatus     notes
=========================  ==================  ==========================================================
succeeded                  SUCCEEDED           ``amount_captured_minor`` = ``amount_received``
requires_capture           REQUIRES_CAPTURE    authorized (``capture_method=manual``)
processing                 PROCESSING          outcome follows by webhook / lookup
requires_payment_method    FAILED              after a decline: ``last_payment_error.decline_code``
                                               (else its ``code``) becomes ``decline_code``
requires_confirmation      FAILED              never confirmed: nothing can be charged without us
requires_action            FAILED              see below; ``decline_code`` ``authentication_required``
canceled                   CANCELED            authorization released; FAILED when we abandoned it
                                               (``cancellation_reason=abandoned``, see below)
=========================  ==================  ==========================================================

*requires_action* means the card needs customer authentication (3D Secure).
Switchboard charges server to server: there is no customer session to run
the challenge in, and the ``client_secret`` that would let one complete it is
never handed out. Leaving the PaymentIntent open would keep the attempt in a
state that is neither charged nor definitively failed, so the connector
**cancels** it at once (``cancellation_reason=abandoned``, idempotency key
``<attempt key>:abandon``) and reports a decline with code
``authentication_required`` -- the same outcome Stripe gives an off-session
payment that needs authentication. A failover or a new attempt can then
proceed without risk of a late second charge. (A PROCESSING mapping would
instead wait for a webhook that never comes.)

**Errors** (https://docs.stripe.com/api/errors, https://docs.stripe.com/error-low-level,
https://docs.stripe.com/error-codes), in order of precedence:

==============================================  ==========================================  =============
answer                                          meaning                                     class
==============================================  ==========================================  =============
HTTP 5xx, ``type=api_error``, HTTP 424          Stripe-side failure: "treat the result of   Ambiguous
                                                a 500 as indeterminate"
HTTP 429 (``rate_limit``)                       rate limiters run *before* the idempotency  Retryable,
                                                layer: the request was not processed        Retry-After
HTTP 409, ``idempotency_key_in_use``,           a request with this key is executing, or    Retryable
``lock_timeout``                                the object is locked: retry same key
  ... with ``Stripe-Should-Retry: false``       Stripe says a retry won't help, but the     Ambiguous
                                                concurrent request may charge
HTTP 402 / ``type=card_error``                  declined (``decline_code``)                 Declined
``type=idempotency_error`` (HTTP 400: key       see below                                   Ambiguous
reused with different parameters)
other 4xx with ``Stripe-Should-Retry: true``    Stripe says the request may be retried      Retryable
HTTP 400 ``invalid_request_error``, 401         refused; a retry will not help and nothing  Permanent
(authentication), 403 (permission), 404         was done
2xx that is not the documented JSON object      the request may have been executed          Ambiguous
timeout after sending, reset, closed            may have been executed                      Ambiguous
connect error / connect or pool timeout         never sent                                  Retryable
==============================================  ==========================================  =============

``Stripe-Should-Retry`` (https://docs.stripe.com/error-low-level#should-retry)
is honoured as shown; on a 5xx it is reported in the message but does not
change the class, because Stripe documents 5xx results as indeterminate
whatever the retry advice. **idempotency_error** is deliberately *not*
:class:`PermanentProcessorError`: Stripe only records a key once execution of
the first request with it has begun (https://docs.stripe.com/api/idempotent_requests),
so the refusal proves an earlier request with this attempt's key reached
Stripe -- and that request may have charged. "Nothing was charged, failover
allowed" would be wrong; :class:`AmbiguousProcessorError` sends the attempt to
the lookup instead.

Reads (``GET``) are idempotent at Stripe and move no money, so their transport
failures, 5xx and malformed answers are :class:`RetryableProcessorError`.

**Lookup and search freshness.** :meth:`StripeProcessor.lookup_charge` finds
the attempt's PaymentIntent by its metadata with the Search API
(``metadata['switchboard_attempt']:'<key>'``). Stripe documents search as
eventually consistent: "under normal operating conditions, data is
searchable in less than a minute. Occasionally, propagation of new or updated
data can be up to an hour behind during outages", and "for read-after-write
flows ... use the list APIs" (https://docs.stripe.com/search#data-freshness).
So a search miss is not taken as absence: the connector then pages through
the strongly consistent list of PaymentIntents created in the last
``search_freshness_window_s`` (default 3600 s) and filters the metadata
itself. Only when both miss is the answer ``None``; when the list is longer
than ``lookup_max_pages`` pages the lookup raises
:class:`RetryableProcessorError` ("cannot tell"). A match found by search is
re-read with ``GET /v1/payment_intents/{id}`` because the search index may
hold a stale status. Search is not available to accounts in India.

One window remains: a request that timed out on our side may still be
*executing* at Stripe, and is invisible to every read until it commits. The
caller (the janitor) must therefore only trust ``None`` for an attempt whose
last request was sent longer ago than this client's timeout plus a margin.

The secret key never appears in ``repr``, error text or exception chains:
errors are raised outside ``except`` blocks (no ``__cause__``/``__context__``)
and Stripe's text is scrubbed of the key.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar
from urllib.parse import urlencode

import httpx

from channels.provider import parse_retry_after
from payments.processor import (
    AmbiguousProcessorError,
    ChargeRequest,
    Declined,
    PermanentProcessorError,
    ProcessorError,
    ProcessorPayment,
    ProcessorRefund,
    ProcessorStatus,
    RefundStatus,
    RetryableProcessorError,
)

DEFAULT_BASE_URL = "https://api.stripe.com"
#: The Stripe API version every request is pinned to (https://docs.stripe.com/api/versioning).
API_VERSION = "2025-03-31.basil"
#: Metadata keys this connector sets on every PaymentIntent it creates.
METADATA_PAYMENT_ID = "switchboard_payment_id"
METADATA_ATTEMPT = "switchboard_attempt"
METADATA_CUSTOMER_REFERENCE = "switchboard_customer_reference"
#: Metadata key on refunds: the refund's idempotency key (for reconciliation).
METADATA_REFUND_KEY = "switchboard_refund_key"
#: ``cancellation_reason`` used when a PaymentIntent needing customer authentication is abandoned.
ABANDONED = "abandoned"
#: Stripe's limits on metadata (https://docs.stripe.com/api/metadata).
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_CHARS = 40
MAX_METADATA_VALUE_CHARS = 500
#: Stripe's limit on idempotency keys (https://docs.stripe.com/api/idempotent_requests).
MAX_IDEMPOTENCY_KEY_CHARS = 255

#: Currencies whose Stripe amount is the ISO 4217 minor-unit amount times this factor.
_STRIPE_AMOUNT_FACTOR: dict[str, int] = {"ISK": 100}
_MAX_PROVIDER_TEXT = 300
_T = TypeVar("_T")
_PAYMENT_INTENT_ID_RE = re.compile(r"^pi_[A-Za-z0-9]+$")
_CURRENCY_RE = re.compile(r"^[A-Za-z]{3}$")

FormValue: TypeAlias = str | int | bool | Mapping[str, "FormValue"] | Sequence["FormValue"] | None


class MalformedStripeObject(ValueError):
    """A Stripe answer that is not the documented object (missing id, amount, unknown status...)."""


# --- form encoding -----------------------------------------------------------------------------


def encode_form(params: Mapping[str, FormValue]) -> list[tuple[str, str]]:
    """Flatten ``params`` into Stripe's form encoding with bracket notation.

    ``{"metadata": {"k": "v"}, "expand": ["a", "b"], "confirm": True}`` becomes
    ``[("metadata[k]", "v"), ("expand[0]", "a"), ("expand[1]", "b"), ("confirm", "true")]``:
    nested mappings as ``parent[child]``, sequences as ``parent[index]``,
    booleans as ``true``/``false``, integers in decimal; ``None`` values are
    left out. Pass the result to :func:`urllib.parse.urlencode`.
    See https://docs.stripe.com/api (form-encoded request bodies) and
    https://docs.stripe.com/api/metadata. Raises ``TypeError`` for other value types.
    """
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        _encode_value(key, value, pairs)
    return pairs


def _encode_value(name: str, value: FormValue, pairs: list[tuple[str, str]]) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        pairs.append((name, "true" if value else "false"))
    elif isinstance(value, int):
        pairs.append((name, str(value)))
    elif isinstance(value, str):
        pairs.append((name, value))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _encode_value(f"{name}[{key}]", item, pairs)
    elif isinstance(value, Sequence):
        for index, item in enumerate(value):
            _encode_value(f"{name}[{index}]", item, pairs)
    else:  # pragma: no cover - guarded by the type alias
        raise TypeError(f"cannot form-encode a {type(value).__name__} for {name!r}")


# --- amounts and mapping -----------------------------------------------------------------------


def to_stripe_amount(amount_minor: int, currency: str) -> int:
    """ISO 4217 minor units -> Stripe's amount for ``currency`` (x100 for ISK, else unchanged).

    See https://docs.stripe.com/currencies#special-cases.
    """
    return amount_minor * _STRIPE_AMOUNT_FACTOR.get(currency.upper(), 1)


def from_stripe_amount(amount: int, currency: str) -> int:
    """Stripe's amount for ``currency`` -> ISO 4217 minor units (inverse of :func:`to_stripe_amount`).

    Raises :class:`MalformedStripeObject` for an ISK amount that is not a multiple of 100.
    """
    factor = _STRIPE_AMOUNT_FACTOR.get(currency.upper(), 1)
    if amount % factor:
        raise MalformedStripeObject(f"{currency.upper()} amount {amount} is not a multiple of {factor}")
    return amount // factor


def _require_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedStripeObject(f"missing or invalid {key!r}")
    return value


def _require_int(obj: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedStripeObject(f"missing or invalid {key!r}")
    return value


def map_payment_intent(intent: Mapping[str, Any]) -> ProcessorPayment:
    """A Stripe PaymentIntent (https://docs.stripe.com/api/payment_intents/object) as a ProcessorPayment.

    Uses ``id``, ``status``, ``amount``, ``amount_received``, ``currency``,
    ``last_payment_error`` and ``cancellation_reason``; the status table is in
    the module docstring. Amounts are returned in ISO 4217 minor units and the
    currency upper-case. Raises :class:`MalformedStripeObject` when the object
    is not a PaymentIntent or lacks those fields.
    """
    if intent.get("object") != "payment_intent":
        raise MalformedStripeObject("not a payment_intent object")
    reference = _require_str(intent, "id")
    currency = _require_str(intent, "currency").upper()
    amount = from_stripe_amount(_require_int(intent, "amount"), currency)
    received = from_stripe_amount(_require_int(intent, "amount_received", 0), currency)
    status = intent.get("status")
    error = intent.get("last_payment_error")
    error = error if isinstance(error, Mapping) else {}

    def payment(
        state: ProcessorStatus, decline_code: str | None = None, message: str = ""
    ) -> ProcessorPayment:
        return ProcessorPayment(
            processor_reference=reference,
            status=state,
            amount_minor=amount,
            currency=currency,
            amount_captured_minor=received,
            decline_code=decline_code,
            message=message[:_MAX_PROVIDER_TEXT],
        )

    if status == "succeeded":
        return payment(ProcessorStatus.SUCCEEDED)
    if status == "requires_capture":
        return payment(ProcessorStatus.REQUIRES_CAPTURE)
    if status == "processing":
        return payment(ProcessorStatus.PROCESSING)
    if status == "requires_payment_method":
        code = error.get("decline_code") or error.get("code")
        text = error.get("message") or "the PaymentIntent has no successful payment method"
        return payment(ProcessorStatus.FAILED, str(code) if code else None, str(text))
    if status == "requires_confirmation":
        return payment(ProcessorStatus.FAILED, None, "the PaymentIntent was never confirmed")
    if status == "requires_action":
        return payment(
            ProcessorStatus.FAILED,
            "authentication_required",
            "the payment needs customer authentication (3D Secure), which a server-to-server charge "
            "cannot do",
        )
    if status == "canceled":
        if intent.get("cancellation_reason") == ABANDONED:
            return payment(
                ProcessorStatus.FAILED,
                "authentication_required",
                "abandoned: the payment needed customer authentication (3D Secure)",
            )
        return payment(ProcessorStatus.CANCELED, None, "authorization released")
    raise MalformedStripeObject(f"unknown PaymentIntent status {status!r}")


def map_refund(refund: Mapping[str, Any]) -> ProcessorRefund:
    """A Stripe Refund object (https://docs.stripe.com/api/refunds/object) as a ProcessorRefund.

    ``succeeded`` -> SUCCEEDED; ``pending`` and ``requires_action`` -> PENDING;
    ``failed`` and ``canceled`` -> FAILED. Amount in ISO 4217 minor units.
    Raises :class:`MalformedStripeObject` for anything else.
    """
    if refund.get("object") != "refund":
        raise MalformedStripeObject("not a refund object")
    currency = _require_str(refund, "currency").upper()
    states = {
        "succeeded": RefundStatus.SUCCEEDED,
        "pending": RefundStatus.PENDING,
        "requires_action": RefundStatus.PENDING,
        "failed": RefundStatus.FAILED,
        "canceled": RefundStatus.FAILED,
    }
    status = refund.get("status")
    if status not in states:
        raise MalformedStripeObject(f"unknown refund status {status!r}")
    return ProcessorRefund(
        processor_reference=_require_str(refund, "id"),
        status=states[str(status)],
        amount_minor=from_stripe_amount(_require_int(refund, "amount"), currency),
        currency=currency,
    )


def search_query_for(idempotency_key: str) -> str:
    """The Stripe search query matching the attempt's metadata: ``metadata['switchboard_attempt']:'<key>'``.

    Quotes and backslashes in the value are backslash-escaped, per
    https://docs.stripe.com/search#search-query-language.
    """
    escaped = idempotency_key.replace("\\", "\\\\").replace("'", "\\'")
    return f"metadata['{METADATA_ATTEMPT}']:'{escaped}'"


# --- the connector -----------------------------------------------------------------------------


class StripeProcessor:
    """One Stripe account of one tenant; implements :class:`payments.processor.PaymentProcessor`.

    ``secret_key``: the account's secret (``sk_live_...``/``sk_test_...``) or
    restricted (``rk_...``) key, sent as ``Authorization: Bearer``
    (https://docs.stripe.com/api/authentication). ``base_url``: Stripe's API
    host (a fake in tests). ``api_version``: sent as ``Stripe-Version``.
    ``timeout_s``: seconds for each of write, read and pool wait;
    ``connect_timeout_s``: seconds to establish a connection.
    ``search_freshness_window_s`` (seconds back from now), ``lookup_max_pages``
    and ``list_page_size`` (1..100 PaymentIntents a page) bound the list
    fallback of :meth:`lookup_charge`; ``clock`` gives UNIX seconds for it.
    ``transport`` replaces httpx's network transport (tests only).
    Raises ``ValueError`` for an empty key or out-of-range settings.
    """

    name = "stripe"

    def __init__(
        self,
        secret_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_version: str = API_VERSION,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        search_freshness_window_s: float = 3600.0,
        lookup_max_pages: int = 10,
        list_page_size: int = 100,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not secret_key:
            raise ValueError("secret_key is required")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if lookup_max_pages < 1:
            raise ValueError("lookup_max_pages must be at least 1")
        if not 1 <= list_page_size <= 100:
            raise ValueError("list_page_size must be 1..100 (Stripe's limit range)")
        self._secret_key = secret_key
        self._base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._api_version = api_version
        self._freshness_window_s = search_freshness_window_s
        self._lookup_max_pages = lookup_max_pages
        self._list_page_size = list_page_size
        self._clock = clock
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            headers={
                "Authorization": f"Bearer {secret_key}",
                "Stripe-Version": api_version,
                "Accept": "application/json",
                "User-Agent": "switchboard-stripe/0.1",
            },
            transport=transport,
        )

    def __repr__(self) -> str:
        if "_live_" in self._secret_key:
            mode = "live"
        elif "_test_" in self._secret_key:
            mode = "test"
        else:
            mode = "unknown"
        return (
            f"StripeProcessor(base_url={self._base_url!r}, api_version={self._api_version!r}, "
            f"mode={mode!r}, secret_key=<redacted>)"
        )

    __str__ = __repr__

    # -- PaymentProcessor ---------------------------------------------------------------------

    def charge_form(self, request: ChargeRequest) -> dict[str, FormValue]:
        """The create-PaymentIntent parameters for ``request`` (before form encoding).

        Caller metadata is kept; the connector's keys (``switchboard_payment_id``,
        ``switchboard_attempt`` = the idempotency key, ``switchboard_customer_reference``)
        win over caller keys of the same name. Raises
        :class:`PermanentProcessorError` (nothing sent) for a non-positive amount,
        a currency that is not three letters, an empty payment method, or
        metadata beyond Stripe's limits (https://docs.stripe.com/api/metadata).
        """
        if request.amount_minor <= 0:
            raise PermanentProcessorError("amount_minor must be positive; not sent", code="invalid_amount")
        if not _CURRENCY_RE.match(request.currency):
            raise PermanentProcessorError(
                "currency must be an ISO 4217 code; not sent", code="invalid_currency"
            )
        if not request.payment_method:
            raise PermanentProcessorError(
                "payment_method is required; not sent", code="invalid_payment_method"
            )
        metadata: dict[str, FormValue] = {str(key): str(value) for key, value in request.metadata.items()}
        metadata[METADATA_PAYMENT_ID] = str(request.payment_id)
        metadata[METADATA_ATTEMPT] = request.idempotency_key
        if request.customer_reference:
            metadata[METADATA_CUSTOMER_REFERENCE] = request.customer_reference
        problem = _metadata_problem(metadata)
        if problem:
            raise PermanentProcessorError(f"{problem}; not sent", code="invalid_metadata")
        return {
            "amount": to_stripe_amount(request.amount_minor, request.currency),
            "currency": request.currency.lower(),
            "payment_method": request.payment_method,
            "confirm": True,
            "capture_method": request.capture_method.value,
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            "description": request.description or None,
            "metadata": metadata,
        }

    async def create_charge(self, request: ChargeRequest) -> ProcessorPayment:
        """Create and confirm a PaymentIntent (``POST /v1/payment_intents``; key = the attempt key).

        Returns SUCCEEDED (automatic capture), REQUIRES_CAPTURE (manual) or
        PROCESSING. Raises :class:`Declined` for a card decline (``code`` =
        ``decline_code``, e.g. ``insufficient_funds``) and for a payment that
        needs customer authentication (after cancelling it; ``code``
        ``authentication_required``), and the other :class:`ProcessorError`
        subclasses per the module table. https://docs.stripe.com/api/payment_intents/create
        """
        form = self.charge_form(request)
        intent = await self._call(
            "POST", "/v1/payment_intents", form=form, idempotency_key=request.idempotency_key
        )
        return await self._confirmed(intent, request.idempotency_key)

    async def confirm(
        self,
        processor_reference: str,
        idempotency_key: str,
        *,
        payment_method: str | None = None,
        return_url: str | None = None,
    ) -> ProcessorPayment:
        """Confirm an existing PaymentIntent: Stripe attempts the payment with its payment method, or
        with ``payment_method`` (a ``pm_...`` to attach first).

        ``POST /v1/payment_intents/{id}/confirm`` (https://docs.stripe.com/api/payment_intents/confirm),
        form-encoded with ``payment_method`` and ``return_url`` when given, under
        ``idempotency_key`` (1-255 characters; a key of its own: Stripe refuses a key used on another
        endpoint). Stripe confirms a PaymentIntent in ``requires_payment_method`` (a new
        payment method is needed, e.g. after a decline), ``requires_confirmation`` or
        ``requires_action``, and answers 400 ``payment_intent_unexpected_state`` in any other status
        (a :class:`PermanentProcessorError`); with automatic payment methods that allow redirects it
        needs ``return_url``. The answer is handled as :meth:`create_charge` handles its own:
        SUCCEEDED, REQUIRES_CAPTURE or PROCESSING is returned; a decline raises :class:`Declined`;
        ``requires_action`` is abandoned (canceled, key ``<idempotency_key>:abandon``) and declined
        ``authentication_required``; errors are classified per the module table.

        **When it is used.** Not in the charge path: :meth:`create_charge` creates and confirms in
        ONE request (``confirm=true``, which Stripe documents as the same as create then confirm), so
        a charge attempt is exactly one request under one idempotency key
        ``{payment_id}_{attempt_no}`` -- the recovery point the worker resends and the janitor looks
        up. A separate confirm would add a state (created, not confirmed) whose lost answer would
        need a second key and a second lookup. This method is for PaymentIntents created unconfirmed
        elsewhere (``requires_confirmation``, e.g. Stripe's manual confirmation flow, where the
        server confirms after the customer's authentication) and for trying a new payment method on
        one left ``requires_payment_method``; the janitor never calls it (a lookup must not charge).
        """
        path = f"/v1/payment_intents/{_intent_id(processor_reference)}/confirm"
        if payment_method is not None and not payment_method:
            raise PermanentProcessorError(
                "payment_method must not be empty; not sent", code="invalid_payment_method"
            )
        form: dict[str, FormValue] = {"payment_method": payment_method, "return_url": return_url}
        intent = await self._call("POST", path, form=form, idempotency_key=idempotency_key)
        return await self._confirmed(intent, idempotency_key)

    async def _confirmed(self, intent: Mapping[str, Any], idempotency_key: str) -> ProcessorPayment:
        """A PaymentIntent just confirmed (by create with ``confirm=true`` or by confirm): returned when
        charged, authorized or processing; abandoned if it waits for customer authentication; a
        :class:`Declined` when it did not charge."""
        payment = self._payment(intent, mutating=True)
        if intent.get("status") == "requires_action":
            payment = await self._abandon(payment.processor_reference, idempotency_key)
        if payment.status in (ProcessorStatus.FAILED, ProcessorStatus.CANCELED):
            raise Declined(
                f"Stripe did not charge {payment.processor_reference}: {payment.message}",
                code=payment.decline_code or str(intent.get("status")),
            )
        return payment

    async def capture(
        self, processor_reference: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> ProcessorPayment:
        """Capture ``amount_minor`` (<= the authorized amount; the rest is released) of a PaymentIntent.

        ``POST /v1/payment_intents/{id}/capture`` with ``amount_to_capture``
        (https://docs.stripe.com/api/payment_intents/capture). ``currency`` is
        the PaymentIntent's (used for the minor-unit scale). Returns the
        PaymentIntent (normally SUCCEEDED). Raises :class:`ProcessorError`
        subclasses per the module table.
        """
        path = f"/v1/payment_intents/{_intent_id(processor_reference)}/capture"
        if amount_minor <= 0:
            raise PermanentProcessorError("amount_minor must be positive; not sent", code="invalid_amount")
        form: dict[str, FormValue] = {"amount_to_capture": to_stripe_amount(amount_minor, currency)}
        intent = await self._call("POST", path, form=form, idempotency_key=idempotency_key)
        return self._payment(intent, mutating=True)

    async def cancel(self, processor_reference: str, idempotency_key: str) -> ProcessorPayment:
        """Cancel a PaymentIntent, releasing an uncaptured authorization (CANCELED).

        ``POST /v1/payment_intents/{id}/cancel`` (https://docs.stripe.com/api/payment_intents/cancel).
        A PaymentIntent that already succeeded cannot be canceled: Stripe
        answers 400 and this raises :class:`PermanentProcessorError`.
        """
        path = f"/v1/payment_intents/{_intent_id(processor_reference)}/cancel"
        intent = await self._call("POST", path, form={}, idempotency_key=idempotency_key)
        return self._payment(intent, mutating=True)

    async def refund(
        self, processor_reference: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> ProcessorRefund:
        """Refund ``amount_minor`` of a captured PaymentIntent (``POST /v1/refunds``).

        Several partial refunds are allowed up to the captured amount; Stripe
        refuses more with a 400 (:class:`PermanentProcessorError`). The refund's
        idempotency key is also stored as ``metadata[switchboard_refund_key]``.
        https://docs.stripe.com/api/refunds/create
        """
        reference = _intent_id(processor_reference)
        if amount_minor <= 0:
            raise PermanentProcessorError("amount_minor must be positive; not sent", code="invalid_amount")
        form: dict[str, FormValue] = {
            "payment_intent": reference,
            "amount": to_stripe_amount(amount_minor, currency),
            "metadata": {METADATA_REFUND_KEY: idempotency_key},
        }
        body = await self._call("POST", "/v1/refunds", form=form, idempotency_key=idempotency_key)
        return self._parsed(map_refund, body, mutating=True)

    async def retrieve(self, processor_reference: str) -> ProcessorPayment:
        """The current state of a PaymentIntent (``GET /v1/payment_intents/{id}``).

        https://docs.stripe.com/api/payment_intents/retrieve. Failures are
        Retryable (reads move no money) or Permanent (e.g. 404).
        """
        body = await self._call("GET", f"/v1/payment_intents/{_intent_id(processor_reference)}")
        return self._payment(body, mutating=False)

    async def lookup_charge(self, request: ChargeRequest) -> ProcessorPayment | None:
        """Find the PaymentIntent of ``request``'s attempt by ``metadata[switchboard_attempt]``.

        Search first, then the strongly consistent list of recent
        PaymentIntents (see "Lookup and search freshness" in the module
        docstring). A found PaymentIntent is re-read, and abandoned (canceled)
        if it waits for customer authentication. Returns ``None`` only when
        neither finds one; raises :class:`RetryableProcessorError` when it
        cannot tell (read failures, list longer than ``lookup_max_pages``).
        https://docs.stripe.com/api/payment_intents/search
        """
        key = request.idempotency_key
        found = await self._search(key)
        if found is None:
            found = await self._list_recent(key)
        if found is None:
            return None
        current = await self._call("GET", f"/v1/payment_intents/{found}")
        payment = self._payment(current, mutating=False)
        if current.get("status") == "requires_action":
            payment = await self._abandon(found, key)
        return payment

    async def aclose(self) -> None:
        """Close the HTTP client and its connections (idempotent)."""
        await self._client.aclose()

    # -- lookup helpers -----------------------------------------------------------------------

    async def _search(self, key: str) -> str | None:
        params = [("query", search_query_for(key)), ("limit", "10")]
        body = await self._call("GET", "/v1/payment_intents/search", params=params)
        matches = self._matching(body, key, "search_result")
        return _best(matches)

    async def _list_recent(self, key: str) -> str | None:
        since = int(self._clock() - self._freshness_window_s)
        starting_after: str | None = None
        for _ in range(self._lookup_max_pages):
            params = [("created[gte]", str(since)), ("limit", str(self._list_page_size))]
            if starting_after is not None:
                params.append(("starting_after", starting_after))
            body = await self._call("GET", "/v1/payment_intents", params=params)
            matches = self._matching(body, key, "list")
            if matches:
                return _best(matches)
            data = body.get("data")
            if not body.get("has_more") or not isinstance(data, list) or not data:
                return None
            last = data[-1]
            starting_after = last.get("id") if isinstance(last, Mapping) else None
            if not isinstance(starting_after, str):
                break
        raise RetryableProcessorError(
            f"cannot tell whether Stripe has a PaymentIntent for this attempt: more than "
            f"{self._lookup_max_pages} pages of recent PaymentIntents to scan",
            code="lookup_incomplete",
        )

    def _matching(self, body: Mapping[str, Any], key: str, kind: str) -> list[Mapping[str, Any]]:
        data = body.get("data")
        if body.get("object") != kind or not isinstance(data, list):
            raise RetryableProcessorError(f"Stripe {kind} answer is not the documented JSON; retry the read")
        matches: list[Mapping[str, Any]] = []
        for item in data:
            if not isinstance(item, Mapping):
                continue
            metadata = item.get("metadata")
            if isinstance(metadata, Mapping) and metadata.get(METADATA_ATTEMPT) == key:
                matches.append(item)
        return matches

    async def _abandon(self, reference: str, key: str) -> ProcessorPayment:
        """Cancel a PaymentIntent stuck in requires_action so the attempt is definitively not charged."""
        path = f"/v1/payment_intents/{reference}/cancel"
        refused: PermanentProcessorError | None = None
        try:
            intent = await self._call(
                "POST", path, form={"cancellation_reason": ABANDONED}, idempotency_key=f"{key}:abandon"
            )
        except PermanentProcessorError as exc:
            refused = PermanentProcessorError(str(exc), code=exc.code)
        else:
            return self._payment(intent, mutating=True)
        # The cancel was refused (e.g. the PaymentIntent moved on): report its current state instead.
        current = await self.retrieve(reference)
        if current.status is ProcessorStatus.FAILED and current.decline_code == "authentication_required":
            raise AmbiguousProcessorError(
                f"could not abandon {reference} waiting for customer authentication: {refused}",
                code=refused.code if refused else "",
            )
        return current

    # -- HTTP ---------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        form: Mapping[str, FormValue] | None = None,
        params: list[tuple[str, str]] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Send one request; returns the JSON object of a 2xx answer or raises a classified error."""
        mutating = method != "GET"
        if self._client.is_closed:
            raise RetryableProcessorError("Stripe client is closed (processor released); not sent")
        headers: dict[str, str] = {}
        content: bytes | None = None
        if mutating:
            if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
                raise PermanentProcessorError(
                    f"an idempotency key of 1..{MAX_IDEMPOTENCY_KEY_CHARS} characters is required; not sent",
                    code="invalid_idempotency_key",
                )
            headers["Idempotency-Key"] = idempotency_key
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            content = urlencode(encode_form(form or {})).encode("ascii")
        outcome = await self._send(method, path, headers=headers, content=content, params=params)
        if isinstance(outcome, ProcessorError):
            raise outcome  # created outside any except block: no __cause__/__context__ chain
        return self._interpret(outcome, mutating=mutating)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        content: bytes | None,
        params: list[tuple[str, str]] | None,
    ) -> httpx.Response | ProcessorError:
        """Send; a transport failure is returned (not raised) as our error."""
        mutating = method != "GET"
        try:
            query = httpx.QueryParams(tuple(params)) if params else None
            return await self._client.request(method, path, headers=headers, content=content, params=query)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return RetryableProcessorError(
                f"Stripe unreachable, not sent: {type(exc).__name__}", code="connect"
            )
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            return PermanentProcessorError(f"request could not be sent: {type(exc).__name__}", code="network")
        except httpx.RequestError as exc:
            if not mutating:
                return RetryableProcessorError(
                    f"Stripe read failed ({type(exc).__name__}); safe to retry", code="network"
                )
            return AmbiguousProcessorError(
                f"no answer from Stripe after sending ({type(exc).__name__}); the request may have "
                "been executed",
                code="network",
            )

    def _interpret(self, response: httpx.Response, *, mutating: bool) -> dict[str, Any]:
        status = response.status_code
        body = _json_object(response)
        if 200 <= status < 300:
            if body is None or not isinstance(body.get("object"), str):
                raise self._malformed(f"HTTP {status} without the documented JSON object", mutating)
            return body
        raise self._classify(response, body, mutating)

    def _classify(
        self, response: httpx.Response, body: dict[str, Any] | None, mutating: bool
    ) -> ProcessorError:
        """The error for a non-2xx answer, per the module table."""
        status = response.status_code
        error = body.get("error") if body is not None else None
        error = error if isinstance(error, dict) else {}
        kind = str(error.get("type") or "")
        code = str(error.get("code") or "")
        decline_code = str(error.get("decline_code") or "")
        should_retry = response.headers.get("Stripe-Should-Retry", "").strip().lower()
        retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
        detail = self._detail(response, kind, code, decline_code, str(error.get("message") or ""))
        label = code or kind

        if status >= 500 or kind == "api_error" or status == 424:
            if should_retry:
                detail += f" [Stripe-Should-Retry: {should_retry}]"
            if not mutating:
                return RetryableProcessorError(detail, code=label, retry_after_s=retry_after_s)
            return AmbiguousProcessorError(
                f"{detail}; indeterminate: the request may have been executed",
                code=label,
                retry_after_s=retry_after_s,
            )
        if status == 429:
            return RetryableProcessorError(
                f"{detail}; not processed", code=label or "rate_limit", retry_after_s=retry_after_s
            )
        if status == 409 or code in ("idempotency_key_in_use", "lock_timeout"):
            if should_retry == "false" and mutating:
                return AmbiguousProcessorError(
                    f"{detail}; Stripe-Should-Retry: false while another request may be executing",
                    code=label,
                )
            return RetryableProcessorError(f"{detail}; retry with the same key", code=label or "conflict")
        if kind == "card_error":
            return Declined(detail, code=decline_code or code or "card_declined")
        if kind == "idempotency_error":
            return AmbiguousProcessorError(
                f"{detail}; an earlier request with this idempotency key reached Stripe and may have charged",
                code=label,
            )
        if should_retry == "true":
            return RetryableProcessorError(f"{detail}; Stripe-Should-Retry: true", code=label)
        if 400 <= status < 500:
            return PermanentProcessorError(detail, code=label or f"http_{status}")
        return self._malformed(f"unexpected HTTP {status}", mutating)

    def _detail(self, response: httpx.Response, kind: str, code: str, decline_code: str, message: str) -> str:
        text = f"Stripe HTTP {response.status_code}"
        labels = "/".join(part for part in (kind, code, decline_code) if part)
        if labels:
            text += f" {labels}"
        if message:
            text += f": {self._scrub(message)}"
        request_id = response.headers.get("Request-Id")
        if request_id:
            text += f" (request {self._scrub(request_id)[:64]})"
        return text

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret_key, "<redacted>")[:_MAX_PROVIDER_TEXT]

    @staticmethod
    def _malformed(problem: str, mutating: bool) -> ProcessorError:
        if not mutating:
            return RetryableProcessorError(
                f"Stripe read answer malformed ({problem}); retry", code="malformed"
            )
        return AmbiguousProcessorError(
            f"Stripe answer malformed ({problem}); the request may have been executed", code="malformed"
        )

    def _payment(self, body: Mapping[str, Any], *, mutating: bool) -> ProcessorPayment:
        payment = self._parsed(map_payment_intent, body, mutating=mutating)
        return dataclasses.replace(payment, message=self._scrub(payment.message))

    def _parsed(
        self, parse: Callable[[Mapping[str, Any]], _T], body: Mapping[str, Any], *, mutating: bool
    ) -> _T:
        try:
            result = parse(body)
        except MalformedStripeObject as exc:
            problem = str(exc)
        else:
            return result
        raise self._malformed(problem, mutating)


def _intent_id(reference: str) -> str:
    """``reference`` if it is a PaymentIntent id (``pi_`` + alphanumerics), so it is safe in a path."""
    if not _PAYMENT_INTENT_ID_RE.match(reference):
        raise PermanentProcessorError(
            "not a Stripe PaymentIntent id (pi_...); not sent", code="invalid_reference"
        )
    return reference


def _metadata_problem(metadata: Mapping[str, FormValue]) -> str | None:
    if len(metadata) > MAX_METADATA_KEYS:
        return f"more than {MAX_METADATA_KEYS} metadata keys"
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY_CHARS or "[" in key or "]" in key:
            return f"metadata key {key[:50]!r} is empty, longer than {MAX_METADATA_KEY_CHARS} or has brackets"
        if isinstance(value, str) and len(value) > MAX_METADATA_VALUE_CHARS:
            return f"metadata value of {key!r} is longer than {MAX_METADATA_VALUE_CHARS} characters"
    return None


_STATUS_PRIORITY = {"succeeded": 0, "requires_capture": 1, "processing": 2, "requires_action": 3}


def _best(matches: Sequence[Mapping[str, Any]]) -> str | None:
    """The id of the match that matters most for money (succeeded > requires_capture > processing > rest)."""
    ranked = sorted(matches, key=lambda item: _STATUS_PRIORITY.get(str(item.get("status")), 9))
    for item in ranked:
        reference = item.get("id")
        if isinstance(reference, str) and _PAYMENT_INTENT_ID_RE.match(reference):
            return reference
    return None


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The body as a JSON object, or ``None`` if it is not one."""
    try:
        parsed = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


__all__ = [
    "API_VERSION",
    "DEFAULT_BASE_URL",
    "METADATA_ATTEMPT",
    "METADATA_CUSTOMER_REFERENCE",
    "METADATA_PAYMENT_ID",
    "METADATA_REFUND_KEY",
    "MalformedStripeObject",
    "StripeProcessor",
    "encode_form",
    "from_stripe_amount",
    "map_payment_intent",
    "map_refund",
    "search_query_for",
    "to_stripe_amount",
]
