"""A fake Adyen Checkout API (v71) on loopback, with webhooks (see payments/adyen.py).

Endpoints, under :data:`API_PREFIX` (``/v71``, so a client's base URL is
:attr:`FakeAdyen.checkout_url`):

- ``POST /payments`` (https://docs.adyen.com/api-explorer/Checkout/71/post/payments);
- ``POST /payments/{pspReference}/captures``, ``/cancels``, ``/refunds``
  (https://docs.adyen.com/online-payments/capture, .../cancel, .../refund),
  answered ``201`` with ``status: "received"``.

Every request needs ``X-API-Key`` (else ``401``, errorCode ``000``, errorType
``security``) and a JSON body naming the configured ``merchantAccount`` (else
``403``, ``901`` "Invalid Merchant Account"). Errors use Adyen's envelope
``{"status", "errorCode", "message", "errorType"}``
(https://docs.adyen.com/development-resources/error-codes). Checks of
``/payments``, in order:

========================================================  ======  =========  ======================
check                                                     HTTP    errorCode  source
========================================================  ======  =========  ======================
body is a JSON object                                     400     702        error-codes (parse)
no field outside the PaymentRequest schema                400     702        error-codes (parse)
``merchantAccount`` is the account                        403     901        error-codes
``amount`` present                                        422     100        error-codes
``amount`` is ``{value: int >= 0, currency: ISO 4217}``   422     137        this fake's code
``reference`` 1-80 characters                             422     130        this fake's code
``returnUrl`` present                                     422     000        this fake's code
``paymentMethod`` is ``{type: scheme,                     422     000        this fake's code
storedPaymentMethodId}``
the stored payment method exists (:data:`MAGIC_METHODS`)  422     800        this fake's code
``shopperReference`` 3-256 characters                     422     000        PaymentRequest schema
``shopperInteraction`` / ``recurringProcessingModel``     422     000        PaymentRequest schema
are the schema's values, the latter present
``captureDelayHours`` integer >= 0, ``additionalData``    422     000        this fake's code
string values
``metadata``: <= 20 pairs / key <= 20 / value <= 80       422     177/178/   PaymentRequest schema
characters, string values                                         179
========================================================  ======  =========  ======================

**Idempotency** (https://docs.adyen.com/development-resources/api-idempotency),
per ``Idempotency-Key`` (at most 64 characters, else ``422``/``000``): the
same key with the same method, path and JSON body answers the stored first
answer again (``replays`` counts them) and does no work; the same key with
another request answers ``422``/``000`` (this fake's choice: Adyen does not
document one); a request arriving while the first with its key is still
being processed answers ``409``/``704`` "request already processed or in
progress" (errorType ``validation``), as Adyen does. Only processed requests are stored; refusals are not.
:meth:`FakeAdyen.hold` parks processed requests after they took their key,
so a test can send a concurrent duplicate without sleeping.

**Payments.** The stored payment method id picks the outcome
(:data:`MAGIC_METHODS`: ``stored_succeed`` is ``Authorised``,
``stored_refused`` is ``Refused``/``2``, ...). ``additionalData.manualCapture
"true"`` or ``captureDelayHours`` > 0 leaves an authorised payment
uncaptured; otherwise it is captured at once. ``charges`` lists every payment
created, in order: a test asserts exactly one charge per attempt.

**Modifications** settle at once and enforce Adyen's default accounting rules
(quoted on the idempotency page): captures together at most the authorised
amount, refunds together at most the captured amount, a cancel only before
any capture; a violation answers ``422`` (``137`` for amounts, ``000`` for
states; an unknown pspReference ``167``; these codes are this fake's choice,
real Adyen may instead accept and report ``success: false`` in the webhook).

**Webhooks.** Each payment and modification appends a standard
NotificationRequestItem (eventCode AUTHORISATION / CAPTURE / CANCELLATION /
REFUND, ``success`` ``"true"``/``"false"``, signed in
``additionalData.hmacSignature`` when the fake has an HMAC key) to
``notifications``; :meth:`FakeAdyen.deliver_notifications` POSTs the
undelivered ones as one batch to a webhook URL.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from aiohttp import web

from payments.adyen_signature import compute_signature
from switchboard.fakes.http import LOST_RESPONSE, FakeProviderServer, Fault

API_PREFIX = "/v71"
PAYMENTS_PATH = f"{API_PREFIX}/payments"
MODIFICATION_PATH = f"{API_PREFIX}/payments/{{psp_reference}}/{{kind:captures|cancels|refunds}}"
MAX_IDEMPOTENCY_KEY_CHARS = 64
MAX_REFERENCE_CHARS = 80
IN_PROGRESS_CODE = "704"

_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_SHOPPER_INTERACTIONS = ("Ecommerce", "ContAuth", "Moto", "POS")
_RECURRING_MODELS = ("CardOnFile", "Subscription", "UnscheduledCardOnFile")

#: The fields of Adyen's Checkout v71 PaymentRequest schema; any other field is refused (702).
PAYMENT_REQUEST_FIELDS = frozenset(
    {
        "accountInfo", "additionalAmount", "additionalData", "amount", "applicationInfo",
        "authenticationData", "billingAddress", "browserInfo", "captureDelayHours", "channel",
        "checkoutAttemptId", "company", "conversionId", "countryCode", "dateOfBirth", "dccQuote",
        "deliverAt", "deliveryAddress", "deliveryDate", "deviceFingerprint", "enableOneClick",
        "enablePayOut", "enableRecurring", "entityType", "fraudOffset", "fundOrigin", "fundRecipient",
        "industryUsage", "installments", "lineItems", "localizedShopperStatement", "mandate", "mcc",
        "merchantAccount", "merchantOrderReference", "merchantRiskIndicator", "metadata", "mpiData",
        "order", "orderReference", "origin", "paymentMethod", "platformChargebackLogic",
        "recurringExpiry", "recurringFrequency", "recurringProcessingModel",
        "redirectFromIssuerMethod", "redirectToIssuerMethod", "reference", "returnUrl", "riskData",
        "sessionValidity", "shopperEmail", "shopperIP", "shopperInteraction", "shopperLocale",
        "shopperName", "shopperReference", "shopperStatement", "socialSecurityNumber", "splits",
        "store", "storePaymentMethod", "telephoneNumber", "threeDS2RequestData",
        "threeDSAuthenticationOnly", "trustedShopper",
    }
)  # fmt: skip
#: Fields of the capture / cancel / refund requests this fake accepts.
MODIFICATION_FIELDS: dict[str, frozenset[str]] = {
    "captures": frozenset({"merchantAccount", "amount", "reference", "lineItems", "splits", "subMerchants"}),
    "cancels": frozenset({"merchantAccount", "reference"}),
    "refunds": frozenset(
        {"merchantAccount", "amount", "reference", "lineItems", "splits", "store", "merchantRefundReason"}
    ),
}
_EVENT_CODES = {"captures": "CAPTURE", "cancels": "CANCELLATION", "refunds": "REFUND"}


@dataclass(frozen=True)
class Outcome:
    """What ``/payments`` answers for a stored payment method: ``resultCode`` and refusal fields."""

    result_code: str
    refusal_reason: str = ""
    refusal_reason_code: str = ""


#: Magic ``storedPaymentMethodId`` values and their outcomes (refusal codes from
#: https://docs.adyen.com/development-resources/refusal-reasons).
MAGIC_METHODS: dict[str, Outcome] = {
    "stored_succeed": Outcome("Authorised"),
    "stored_refused": Outcome("Refused", "Refused", "2"),
    "stored_insufficient_funds": Outcome("Refused", "Not enough balance", "12"),
    "stored_expired_card": Outcome("Refused", "Expired Card", "6"),
    "stored_error": Outcome("Error", "Acquirer Error", "4"),
    "stored_cancelled": Outcome("Cancelled"),
    "stored_pending": Outcome("Pending"),
    "stored_received": Outcome("Received"),
    "stored_redirect": Outcome("RedirectShopper"),
    "stored_partially_authorised": Outcome("PartiallyAuthorised"),
}


@dataclass
class FakePayment:
    """One payment the fake created: amounts in minor units; totals of settled modifications."""

    psp_reference: str
    merchant_reference: str
    amount: int
    currency: str
    result_code: str
    manual_capture: bool
    shopper_reference: str
    stored_payment_method_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    captured: int = 0
    refunded: int = 0
    cancelled: bool = False


@dataclass
class _Stored:
    """What the fake remembers for one Idempotency-Key."""

    fingerprint: str
    done: bool = False
    status: int = 0
    body: dict[str, Any] = field(default_factory=dict)


def error_body(status: int, code: str, message: str, error_type: str = "validation") -> dict[str, Any]:
    """Adyen's error envelope (https://docs.adyen.com/development-resources/error-codes)."""
    return {"status": status, "errorCode": code, "message": message, "errorType": error_type}


def _error(status: int, code: str, message: str, error_type: str = "validation") -> web.Response:
    return web.json_response(error_body(status, code, message, error_type), status=status)


def _psp_reference() -> str:
    return uuid.uuid4().hex[:16].upper()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class FakeAdyen(FakeProviderServer):
    """Adyen's Checkout payments and modifications for one API key and merchant account.

    ``hmac_key``: hex HMAC key signing the webhook items (none: unsigned).
    ``received`` holds processed requests (``body`` = parsed JSON),
    ``charges`` the payments created, ``payments`` them by pspReference,
    ``modifications`` the settled captures/cancels/refunds, ``notifications``
    the webhook items, ``replays`` how many answers came from the
    idempotency store.
    """

    def __init__(
        self,
        api_key: str,
        merchant_account: str,
        *,
        hmac_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host, port)
        self.api_key = api_key
        self.merchant_account = merchant_account
        self.hmac_key = hmac_key
        self.charges: list[FakePayment] = []
        self.payments: dict[str, FakePayment] = {}
        self.modifications: list[dict[str, Any]] = []
        self.notifications: list[dict[str, Any]] = []
        self.delivered_notifications = 0
        self.replays = 0
        self._idempotency: dict[str, _Stored] = {}
        self._gate: asyncio.Event | None = None
        self.parked = asyncio.Event()
        self._changed = asyncio.Condition()

    def __repr__(self) -> str:
        return f"FakeAdyen(merchant_account={self.merchant_account!r}, base_url={self.base_url!r})"

    @property
    def checkout_url(self) -> str:
        """The Checkout API root a client uses as its base URL: ``http://127.0.0.1:<port>/v71``."""
        return f"{self.base_url}{API_PREFIX}"

    @staticmethod
    def error(
        status: int,
        code: str,
        message: str = "",
        error_type: str = "validation",
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """A fault answering ``status`` with Adyen's error envelope for ``code``."""
        body = error_body(status, code, message or f"injected Adyen error {code}", error_type)
        return Fault.http_status(status, body=json.dumps(body), headers=headers)

    # --- concurrency control for tests --------------------------------------------------------

    def hold(self) -> None:
        """Park every processed request, after it has taken its Idempotency-Key, until :meth:`release`.

        ``parked`` is set when a request is parked.
        """
        self._gate = asyncio.Event()
        self.parked.clear()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait (at most ``timeout_s`` s, else ``TimeoutError``) until ``predicate()`` holds; it is
        re-checked each time the fake finishes processing a request."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    def release(self) -> None:
        """Let parked requests (and later ones) carry on."""
        if self._gate is not None:
            self._gate.set()
        self._gate = None

    # --- routes -------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        """Register ``POST /v71/payments`` and the three modification endpoints."""
        app.router.add_post(PAYMENTS_PATH, self._payments)
        app.router.add_post(MODIFICATION_PATH, self._modification)

    async def _payments(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._check_payment, self._authorise)

    async def _modification(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        psp = request.match_info["psp_reference"]

        def check(body: dict[str, Any]) -> web.Response | None:
            return self._check_modification(kind, psp, body)

        def work(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            return self._modify(kind, psp, body)

        return await self._handle(request, check, work)

    async def _handle(
        self,
        request: web.Request,
        check: Callable[[dict[str, Any]], web.Response | None],
        work: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]],
    ) -> web.StreamResponse:
        # Read the whole body first, as a real server would before working on it: a slow
        # fault then still processes a request whose client has given up.
        raw = await request.read()
        faulted = await self.apply_faults(request)
        if faulted is not None:
            return faulted
        if not hmac.compare_digest(request.headers.get("X-API-Key", "").encode(), self.api_key.encode()):
            return _error(401, "000", "HTTP Status Response - Unauthorized", "security")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not request.content_type.startswith("application/json"):
            return _error(400, "702", "Unable to parse the request: expected a JSON object")
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            return _error(422, "000", "Idempotency-Key must be 1-64 characters")
        fingerprint = json.dumps([request.method, request.path, body], sort_keys=True, separators=(",", ":"))
        if key is not None:
            stored = self._idempotency.get(key)
            if stored is not None:
                return self._idempotent_answer(request, key, stored, fingerprint)
        refusal = check(body)
        if refusal is not None:
            return refusal
        if key is not None:
            self._idempotency[key] = _Stored(fingerprint)
        try:
            if self._gate is not None:
                gate = self._gate
                self.parked.set()
                await gate.wait()
            status, answer = work(body)
        except BaseException:
            if key is not None:
                self._idempotency.pop(key, None)
            raise
        if key is not None:
            self._idempotency[key] = _Stored(fingerprint, done=True, status=status, body=answer)
        self.record(request, body)
        async with self._changed:
            self._changed.notify_all()
        if request.get(LOST_RESPONSE):
            self.drop_connection(request)
        return web.json_response(answer, status=status, headers=_key_header(key))

    def _idempotent_answer(
        self, request: web.Request, key: str, stored: _Stored, fingerprint: str
    ) -> web.StreamResponse:
        if not stored.done:
            return _error(409, IN_PROGRESS_CODE, "request already processed or in progress")
        if stored.fingerprint != fingerprint:
            return _error(422, "000", "Idempotency-Key already used for a different request")
        self.replays += 1
        if request.get(LOST_RESPONSE):
            self.drop_connection(request)
        return web.json_response(stored.body, status=stored.status, headers=_key_header(key))

    # --- /payments ----------------------------------------------------------------------------

    def _check_common(self, body: dict[str, Any], allowed: frozenset[str], name: str) -> web.Response | None:
        unknown = sorted(set(body) - allowed)
        if unknown:
            return _error(400, "702", f"Structure of {name} contains the following unknown fields: {unknown}")
        if body.get("merchantAccount") != self.merchant_account:
            return _error(403, "901", "Invalid Merchant Account", "security")
        return None

    @staticmethod
    def _check_amount(body: dict[str, Any]) -> web.Response | None:
        if "amount" not in body:
            return _error(422, "100", "Required object 'amount' is not provided.")
        amount = body["amount"]
        if (
            not isinstance(amount, dict)
            or set(amount) != {"value", "currency"}
            or not _is_int(amount["value"])
            or amount["value"] < 0
            or not isinstance(amount["currency"], str)
            or not _CURRENCY_RE.match(amount["currency"])
        ):
            return _error(
                422,
                "137",
                "Invalid amount specified: expected {value: integer minor units, currency: ISO 4217}",
            )
        return None

    def _check_payment(self, body: dict[str, Any]) -> web.Response | None:
        refusal = self._check_common(body, PAYMENT_REQUEST_FIELDS, "PaymentRequest")
        if refusal is None:
            refusal = self._check_amount(body)
        if refusal is not None:
            return refusal
        reference = body.get("reference")
        if not isinstance(reference, str) or not 0 < len(reference) <= MAX_REFERENCE_CHARS:
            return _error(422, "130", "Required field 'reference' (1-80 characters) is not provided")
        if not isinstance(body.get("returnUrl"), str) or not body["returnUrl"]:
            return _error(422, "000", "Required field 'returnUrl' is not provided.")
        method = body.get("paymentMethod")
        if (
            not isinstance(method, dict)
            or method.get("type") != "scheme"
            or not isinstance(method.get("storedPaymentMethodId"), str)
        ):
            return _error(422, "000", "paymentMethod must be {type: scheme, storedPaymentMethodId}")
        if method["storedPaymentMethodId"] not in MAGIC_METHODS:
            return _error(422, "800", "Contract not found")
        shopper = body.get("shopperReference")
        if not isinstance(shopper, str) or not 3 <= len(shopper) <= 256:
            return _error(422, "000", "Required field 'shopperReference' (3-256 characters) is not provided")
        if body.get("shopperInteraction", "Ecommerce") not in _SHOPPER_INTERACTIONS:
            return _error(422, "000", "Invalid shopperInteraction")
        if body.get("recurringProcessingModel") not in _RECURRING_MODELS:
            return _error(422, "000", "recurringProcessingModel is required with stored payment details")
        delay = body.get("captureDelayHours", 0)
        if not _is_int(delay) or delay < 0:
            return _error(422, "000", "captureDelayHours must be an integer >= 0")
        additional = body.get("additionalData", {})
        if not isinstance(additional, dict) or not all(isinstance(v, str) for v in additional.values()):
            return _error(422, "000", "additionalData must map keys to string values")
        return self._check_metadata(body.get("metadata", {}))

    @staticmethod
    def _check_metadata(metadata: Any) -> web.Response | None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            return _error(422, "000", "metadata must map keys to string values")
        if len(metadata) > 20:
            return _error(422, "177", "Metadata size exceeds limit")
        if any(len(key) > 20 for key in metadata):
            return _error(422, "178", "Metadata key size exceeds limit")
        if any(len(value) > 80 for value in metadata.values()):
            return _error(422, "179", "Metadata value size exceeds limit")
        return None

    def _authorise(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        outcome = MAGIC_METHODS[body["paymentMethod"]["storedPaymentMethodId"]]
        manual = (
            body.get("additionalData", {}).get("manualCapture") == "true"
            or body.get("captureDelayHours", 0) > 0
        )
        payment = FakePayment(
            psp_reference=_psp_reference(),
            merchant_reference=body["reference"],
            amount=body["amount"]["value"],
            currency=body["amount"]["currency"],
            result_code=outcome.result_code,
            manual_capture=manual,
            shopper_reference=body["shopperReference"],
            stored_payment_method_id=body["paymentMethod"]["storedPaymentMethodId"],
            metadata=dict(body.get("metadata", {})),
        )
        if outcome.result_code == "Authorised" and not manual:
            payment.captured = payment.amount
        self.charges.append(payment)
        self.payments[payment.psp_reference] = payment
        answer: dict[str, Any] = {
            "pspReference": payment.psp_reference,
            "resultCode": outcome.result_code,
            "amount": {"value": payment.amount, "currency": payment.currency},
            "merchantReference": payment.merchant_reference,
        }
        if outcome.refusal_reason:
            answer["refusalReason"] = outcome.refusal_reason
            answer["refusalReasonCode"] = outcome.refusal_reason_code
        if outcome.result_code == "RedirectShopper":
            answer["action"] = {
                "type": "redirect",
                "method": "GET",
                "paymentMethodType": "scheme",
                "url": f"https://checkoutshopper-test.adyen.com/redirect/{payment.psp_reference}",
            }
        if outcome.result_code in ("Authorised", "Refused", "Error"):
            self._notify(
                "AUTHORISATION",
                payment,
                psp_reference=payment.psp_reference,
                amount=payment.amount,
                success=outcome.result_code == "Authorised",
                reason=outcome.refusal_reason,
            )
        return 200, answer

    # --- modifications ------------------------------------------------------------------------

    def _check_modification(self, kind: str, psp: str, body: dict[str, Any]) -> web.Response | None:
        refusal = self._check_common(body, MODIFICATION_FIELDS[kind], f"{kind} request")
        if refusal is not None:
            return refusal
        if kind != "cancels":
            refusal = self._check_amount(body)
            if refusal is not None:
                return refusal
        reference = body.get("reference")
        if reference is not None and (not isinstance(reference, str) or len(reference) > MAX_REFERENCE_CHARS):
            return _error(422, "000", "reference must be a string of at most 80 characters")
        payment = self.payments.get(psp)
        if payment is None:
            return _error(422, "167", f"Original pspReference {psp} not found")
        if kind != "cancels" and body["amount"]["currency"] != payment.currency:
            return _error(422, "137", "Invalid amount specified: currency differs from the payment's")
        if payment.result_code != "Authorised" or payment.cancelled:
            return _error(422, "000", f"Payment {psp} is not authorised (or was cancelled)")
        value = body["amount"]["value"] if kind != "cancels" else 0
        if kind == "captures":
            if not payment.manual_capture:
                return _error(422, "000", f"Payment {psp} was captured automatically")
            if payment.captured + value > payment.amount:
                return _error(
                    422, "137", "Invalid amount specified: captures would exceed the authorised amount"
                )
        if kind == "cancels" and payment.captured > 0:
            return _error(422, "000", f"Payment {psp} has been captured: refund it instead")
        if kind == "refunds" and payment.refunded + value > payment.captured:
            return _error(422, "137", "Invalid amount specified: refunds would exceed the captured amount")
        return None

    def _modify(self, kind: str, psp: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        payment = self.payments[psp]
        value = body["amount"]["value"] if kind != "cancels" else 0
        if kind == "captures":
            payment.captured += value
        elif kind == "refunds":
            payment.refunded += value
        else:
            payment.cancelled = True
        modification_psp = _psp_reference()
        answer: dict[str, Any] = {
            "merchantAccount": self.merchant_account,
            "paymentPspReference": psp,
            "pspReference": modification_psp,
            "status": "received",
        }
        if "reference" in body:
            answer["reference"] = body["reference"]
        if kind != "cancels":
            answer["amount"] = dict(body["amount"])
        self.modifications.append({"kind": kind, **answer})
        self._notify(
            _EVENT_CODES[kind],
            payment,
            psp_reference=modification_psp,
            original_reference=psp,
            amount=value if kind != "cancels" else payment.amount,
            success=True,
        )
        return 201, answer

    # --- webhooks -----------------------------------------------------------------------------

    def _notify(
        self,
        event_code: str,
        payment: FakePayment,
        *,
        psp_reference: str,
        amount: int,
        success: bool,
        original_reference: str | None = None,
        reason: str = "",
    ) -> None:
        item: dict[str, Any] = {
            "additionalData": {},
            "amount": {"currency": payment.currency, "value": amount},
            "eventCode": event_code,
            "eventDate": datetime.now(UTC).isoformat(timespec="seconds"),
            "merchantAccountCode": self.merchant_account,
            "merchantReference": payment.merchant_reference,
            "paymentMethod": "visa",
            "pspReference": psp_reference,
            "reason": reason,
            "success": "true" if success else "false",
        }
        if original_reference is not None:
            item["originalReference"] = original_reference
        if event_code == "AUTHORISATION" and success:
            item["operations"] = ["CANCEL", "CAPTURE", "REFUND"]
        self.notifications.append(self.sign(item))

    def sign(self, item: dict[str, Any]) -> dict[str, Any]:
        """``item`` with ``additionalData.hmacSignature`` computed with the fake's HMAC key (if any)."""
        if self.hmac_key is not None:
            additional = dict(item.get("additionalData") or {})
            additional["hmacSignature"] = compute_signature(item, self.hmac_key)
            item = {**item, "additionalData": additional}
        return item

    @staticmethod
    def notification_request(items: list[dict[str, Any]]) -> dict[str, Any]:
        """The standard-webhook batch body Adyen POSTs for ``items``."""
        return {"live": "false", "notificationItems": [{"NotificationRequestItem": item} for item in items]}

    async def deliver_notifications(self, url: str, *, timeout_s: float = 5.0) -> httpx.Response | None:
        """POST the not-yet-delivered notifications to ``url`` as one batch; ``None`` if there were none.

        They count as delivered only on a 2xx answer (Adyen retries otherwise).
        """
        pending = self.notifications[self.delivered_notifications :]
        if not pending:
            return None
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.post(url, json=self.notification_request(pending))
        if 200 <= response.status_code < 300:
            self.delivered_notifications += len(pending)
        return response


def _key_header(key: str | None) -> dict[str, str]:
    """Adyen echoes the Idempotency-Key of an idempotently processed request."""
    return {"Idempotency-Key": key} if key is not None else {}
