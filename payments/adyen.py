"""Card payments through Adyen's Checkout API (v71) with stored payment methods (tokens).

Wire format (https://docs.adyen.com/api-explorer/Checkout/71/post/payments)::

    POST {base_url}/payments                      base_url default https://checkout-test.adyen.com/v71
    X-API-Key: <API key>                          Content-Type: application/json
    Idempotency-Key: {payment_id}_{attempt_no}

    {"merchantAccount": "<config>",
     "amount": {"value": <minor units>, "currency": "EUR"},
     "reference": "{payment_id}_{attempt_no}",
     "merchantOrderReference": "{payment_id}",
     "paymentMethod": {"type": "scheme", "storedPaymentMethodId": "<token>"},
     "shopperReference": "<customer_reference>",
     "shopperInteraction": "ContAuth",
     "recurringProcessingModel": "UnscheduledCardOnFile",
     "returnUrl": "<config>",
     "captureDelayHours": 0                                  (automatic capture)
       or "additionalData": {"manualCapture": "true"}         (manual capture)
     "metadata": {...}}                                      (only when there is some)

    200 {"pspReference": "...", "resultCode": "Authorised", "amount": {...}, "merchantReference": "..."}

Token payments: https://docs.adyen.com/online-payments/tokenization/make-token-payments.
A merchant-initiated charge of a stored card is ``shopperInteraction``
``ContAuth`` with ``recurringProcessingModel`` ``UnscheduledCardOnFile`` (a
card-on-file charge on a non-fixed schedule and/or of variable amount; set
``recurring_processing_model="Subscription"`` for fixed-schedule billing).
``returnUrl`` is required by the API schema although a ContAuth payment
never redirects. Capture (https://docs.adyen.com/online-payments/capture):
automatic capture sends ``captureDelayHours: 0`` so the payment is captured
at once whatever the merchant account's default delay; manual capture sends
``additionalData.manualCapture: "true"``, which turns off auto-capture for
this payment only, and the payment is captured later with ``/captures``.
``ChargeRequest.description`` has no field in the Checkout ``/payments``
request and is not sent.

``resultCode`` (https://docs.adyen.com/online-payments/payment-result-codes):

=====================================  ==================================================
resultCode                             outcome
=====================================  ==================================================
Authorised                             SUCCEEDED (automatic capture) / REQUIRES_CAPTURE
Refused                                :class:`Declined` (``refusalReasonCode`` / ``refusalReason``)
Error                                  :class:`PermanentProcessorError` (not charged)
Cancelled                              CANCELED
Received, Pending                      PROCESSING (the outcome follows by webhook)
RedirectShopper, ChallengeShopper,     :class:`PermanentProcessorError`: a merchant-initiated
IdentifyShopper, PresentToShopper      charge cannot perform a shopper action
anything else                          :class:`AmbiguousProcessorError`
=====================================  ==================================================

Modifications (https://docs.adyen.com/online-payments/capture, .../cancel,
.../refund) are ``POST /payments/{pspReference}/captures`` (``amount``,
``reference``), ``/cancels`` (``reference``) and ``/refunds`` (``amount``,
``reference``), each with ``merchantAccount``, ``Idempotency-Key`` = the
caller's key and ``reference`` = the same key. Adyen answers ``201`` with
``status: "received"``: the request is accepted, the outcome arrives later
in the CAPTURE / CANCELLATION / REFUND webhook (``success`` true or false).
So capture and cancel return PROCESSING and refund returns PENDING.

Errors are ``{"status", "errorCode", "message", "errorType", "pspReference"}``
(https://docs.adyen.com/development-resources/error-codes,
https://docs.adyen.com/development-resources/response-handling):

=========================================  ==================================
answer                                     class
=========================================  ==================================
``errorCode`` 704 (HTTP 409: a request     :class:`RetryableProcessorError`
with this Idempotency-Key is in progress)
HTTP 401, 403 (API key, merchant account)  :class:`PermanentProcessorError`
HTTP 400, 404, 409, 422 (validation)       :class:`PermanentProcessorError`
HTTP 429                                   :class:`RetryableProcessorError` (``Retry-After``)
HTTP 5xx, other statuses                   :class:`AmbiguousProcessorError`
timeout / reset after sending, 2xx body    :class:`AmbiguousProcessorError`
that is not the documented JSON
connection refused, connect/pool timeout   :class:`RetryableProcessorError` (nothing sent)
=========================================  ==================================

Adyen answers a request whose Idempotency-Key belongs to a request still
being processed with ``{"status": 409, "errorCode": "704", "message":
"request already processed or in progress", "errorType": "validation"}``
(errorCode 704 "request already processed or in progress"; the exact
answer, HTTP 409, is quoted in public integration reports): it did not
process this request, so the same call may be retried with the same key.

**Idempotency and lookup.** Every POST carries ``Idempotency-Key``
(https://docs.adyen.com/development-resources/api-idempotency): a retry with
the same key returns the first answer and never charges twice. Checkout has
no API to retrieve a payment, so :meth:`AdyenProcessor.lookup_charge`
*replays* the attempt's ``/payments`` request, byte-for-byte the same body
(a pure function of the :class:`ChargeRequest` and this processor's
configuration: do not change the merchant account, return URL or recurring
model while attempts are unresolved) with the same key. Within the key's
validity Adyen answers with the original response. If the original request
never reached Adyen, the replay performs the charge now (still once for the
key), so the lookup never returns ``None``. Adyen's page says keys are
"valid for a minimum period of 31 days after first submission (but may be
retained for longer)"; this connector is more conservative and refuses the
replay (:class:`AmbiguousProcessorError`, code ``replay_window_exceeded``)
once the attempt is older than ``replay_window_s`` (default 7 days), because
a replay with an expired key would be a second charge. The age is read from
the payment id when it is a UUIDv7 (the project's ids are); for other ids it
cannot be checked and the caller must not look up older attempts. Keys are scoped to the company
account and not shared between regional endpoints. Past the window, resolve
the attempt from webhooks or the settlement report.

The API key never appears in ``repr``, error text or exception chains: errors
are raised from fresh exceptions without cause or context and Adyen's text is
scrubbed of it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from channels.provider import parse_retry_after
from payments.processor import (
    AmbiguousProcessorError,
    CaptureMethod,
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

#: Adyen's Checkout API test endpoint (live endpoints carry a per-merchant prefix).
DEFAULT_BASE_URL = "https://checkout-test.adyen.com/v71"
#: Required by the /payments schema; a ContAuth token payment never redirects to it.
DEFAULT_RETURN_URL = "https://switchboard.invalid/adyen/return"
#: ``recurringProcessingModel`` of a merchant-initiated charge on a non-fixed schedule.
DEFAULT_RECURRING_MODEL = "UnscheduledCardOnFile"
RECURRING_MODELS = ("CardOnFile", "Subscription", "UnscheduledCardOnFile")
#: Adyen's errorCode for "request already processed or in progress" under an Idempotency-Key.
IDEMPOTENCY_IN_PROGRESS_CODE = "704"
#: How long after an attempt was first sent lookup_charge may still replay it, in seconds.
DEFAULT_REPLAY_WINDOW_S = 7 * 24 * 3600.0
#: Adyen: "a unique identifier for the message with a maximum of 64 characters" (it is
#: also sent as ``reference``, whose maximum is 80 characters).
MAX_IDEMPOTENCY_KEY_CHARS = 64

_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_PSP_REFERENCE_RE = re.compile(r"^[A-Za-z0-9]{1,64}$")
_MAX_PROVIDER_TEXT = 300
_SHOPPER_ACTION_CODES = frozenset(
    {"RedirectShopper", "ChallengeShopper", "IdentifyShopper", "PresentToShopper"}
)


class AdyenProcessor:
    """One Adyen merchant account (name ``"adyen"``); see the module docstring for wire format and errors.

    ``api_key``: the web-service user's API key (sent as ``X-API-Key``; the
    secret). ``merchant_account``: the merchant account code sent as
    ``merchantAccount``. ``base_url``: Checkout API root including the
    version, default the test endpoint. ``return_url``: the required
    ``returnUrl``. ``recurring_processing_model``: ``UnscheduledCardOnFile``
    (default), ``CardOnFile`` or ``Subscription``. ``timeout_s``: seconds,
    applied by httpx to each of connect, write, read and pool wait.
    ``replay_window_s``: seconds after an attempt's first send during which
    :meth:`lookup_charge` may replay it. ``clock``: Unix time in seconds
    (tests). Raises ``ValueError`` for a missing key or merchant account or an
    unknown recurring model (the message never contains the key).
    """

    name = "adyen"

    def __init__(
        self,
        api_key: str,
        merchant_account: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        return_url: str = DEFAULT_RETURN_URL,
        recurring_processing_model: str = DEFAULT_RECURRING_MODEL,
        timeout_s: float = 15.0,
        replay_window_s: float = DEFAULT_REPLAY_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        if not merchant_account:
            raise ValueError("merchant_account is required")
        if recurring_processing_model not in RECURRING_MODELS:
            raise ValueError(f"recurring_processing_model must be one of {', '.join(RECURRING_MODELS)}")
        self._api_key = api_key
        self._merchant_account = merchant_account
        self._base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._return_url = return_url
        self._recurring_model = recurring_processing_model
        self._replay_window_s = replay_window_s
        self._clock = clock
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            timeout=httpx.Timeout(timeout_s),
            headers={"X-API-Key": api_key, "Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return (
            f"AdyenProcessor(merchant_account={self._merchant_account!r}, "
            f"base_url={self._base_url!r}, api_key=<redacted>)"
        )

    # --- requests -----------------------------------------------------------------------------

    def payment_request_body(self, request: ChargeRequest) -> dict[str, Any]:
        """The JSON body of the ``/payments`` request for ``request`` (deterministic: lookups replay it)."""
        body: dict[str, Any] = {
            "merchantAccount": self._merchant_account,
            "amount": {"value": request.amount_minor, "currency": request.currency},
            "reference": request.idempotency_key,
            "merchantOrderReference": str(request.payment_id),
            "paymentMethod": {"type": "scheme", "storedPaymentMethodId": request.payment_method},
            "shopperReference": request.customer_reference,
            "shopperInteraction": "ContAuth",
            "recurringProcessingModel": self._recurring_model,
            "returnUrl": self._return_url,
        }
        if request.capture_method is CaptureMethod.MANUAL:
            body["additionalData"] = {"manualCapture": "true"}
        else:
            body["captureDelayHours"] = 0
        if request.metadata:
            body["metadata"] = {str(key): str(value) for key, value in request.metadata.items()}
        return body

    async def create_charge(self, request: ChargeRequest) -> ProcessorPayment:
        """Authorise (and, for automatic capture, capture) ``request`` with one ``POST /payments``.

        Returns SUCCEEDED (``Authorised``, automatic capture; ``amount_captured_minor``
        = the amount), REQUIRES_CAPTURE (``Authorised``, manual capture),
        PROCESSING (``Received`` / ``Pending``) or CANCELED (``Cancelled``).
        Raises :class:`Declined` for ``Refused`` (``code`` = ``refusalReasonCode``),
        :class:`PermanentProcessorError` for an invalid request (checked
        locally before sending: amount > 0 minor units, ISO 4217 code, a
        token, a ``customer_reference`` of at least 3 characters, a key of at
        most 64) or ``Error``, and the other classes per the module table.
        """
        invalid = self._check_charge(request)
        if invalid is not None:
            raise invalid
        outcome = await self._post("/payments", self.payment_request_body(request), request.idempotency_key)
        if isinstance(outcome, ProcessorError):
            raise outcome  # created outside any except block: no __cause__/__context__ chain
        result = self._charge_result(outcome, request)
        if isinstance(result, ProcessorError):
            raise result
        payment, result_code = result
        if result_code == "Refused":
            raise Declined(
                payment.message or "Adyen refused the payment", code=payment.decline_code or "Refused"
            )
        if result_code == "Error" or result_code in _SHOPPER_ACTION_CODES:
            raise PermanentProcessorError(payment.message, code=payment.decline_code or result_code)
        return payment

    async def lookup_charge(self, request: ChargeRequest) -> ProcessorPayment | None:
        """Resolve an ambiguous attempt by replaying its ``/payments`` request with the same Idempotency-Key.

        Returns the attempt's payment as :meth:`create_charge` would, but
        FAILED (``decline_code`` = ``refusalReasonCode``, or the resultCode)
        where that raises for ``Refused``, ``Error`` or a shopper action.
        Never returns ``None``: a replay of a request
        Adyen never received performs it now, once. Raises
        :class:`AmbiguousProcessorError` with code ``replay_window_exceeded``
        when the attempt is older than the replay window (module docstring),
        :class:`RetryableProcessorError` while the original is still in
        progress (errorCode 704), 429 or the request could not be sent, and
        :class:`PermanentProcessorError` when Adyen refuses the replay (4xx):
        it then cannot tell whether the original was charged.
        """
        invalid = self._check_charge(request)
        if invalid is not None:
            raise invalid
        too_old = self._replay_refusal(request)
        if too_old is not None:
            raise too_old
        outcome = await self._post("/payments", self.payment_request_body(request), request.idempotency_key)
        if isinstance(outcome, PermanentProcessorError):
            raise PermanentProcessorError(
                f"{outcome}; Adyen refused the lookup replay, so whether the original attempt "
                "was charged is unknown: resolve it from webhooks or the settlement report",
                code=outcome.code,
            )
        if isinstance(outcome, ProcessorError):
            raise outcome
        result = self._charge_result(outcome, request)
        if isinstance(result, ProcessorError):
            raise result
        return result[0]

    async def capture(
        self, processor_reference: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> ProcessorPayment:
        """``POST /payments/{pspReference}/captures`` of ``amount_minor`` (<= authorised) in ``currency``.

        Source: https://docs.adyen.com/online-payments/capture. Returns
        PROCESSING for the payment ``processor_reference`` (``amount_minor`` =
        the requested capture, ``amount_captured_minor`` 0 until the CAPTURE
        webhook says ``success: true``; ``message`` names the capture's own
        pspReference). Raises :class:`PermanentProcessorError` for invalid
        input or a refusal (e.g. more than authorised), the other classes per
        the module table.
        """
        invalid = self._check_modification(processor_reference, idempotency_key, (amount_minor, currency))
        if invalid is not None:
            raise invalid
        body = {
            "merchantAccount": self._merchant_account,
            "amount": {"value": amount_minor, "currency": currency},
            "reference": idempotency_key,
        }
        answer = await self._modification(processor_reference, "captures", body, idempotency_key)
        return ProcessorPayment(
            processor_reference=processor_reference,
            status=ProcessorStatus.PROCESSING,
            amount_minor=amount_minor,
            currency=currency,
            message=f"capture {answer['pspReference']} received; the outcome follows in the CAPTURE webhook",
        )

    async def cancel(self, processor_reference: str, idempotency_key: str) -> ProcessorPayment:
        """``POST /payments/{pspReference}/cancels``: release an authorisation that was not captured.

        Source: https://docs.adyen.com/online-payments/cancel. Returns
        PROCESSING (the CANCELLATION webhook says whether it worked);
        ``amount_minor`` is 0 and ``currency`` empty because a cancel names
        no amount. Raises like :meth:`capture`.
        """
        invalid = self._check_modification(processor_reference, idempotency_key)
        if invalid is not None:
            raise invalid
        body = {"merchantAccount": self._merchant_account, "reference": idempotency_key}
        answer = await self._modification(processor_reference, "cancels", body, idempotency_key)
        return ProcessorPayment(
            processor_reference=processor_reference,
            status=ProcessorStatus.PROCESSING,
            amount_minor=0,
            currency="",
            message=f"cancel {answer['pspReference']} received; the CANCELLATION webhook has the outcome",
        )

    async def refund(
        self, processor_reference: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> ProcessorRefund:
        """``POST /payments/{pspReference}/refunds`` of ``amount_minor`` (several partial refunds allowed).

        Source: https://docs.adyen.com/online-payments/refund (by default the
        refunds together cannot exceed the captured amount). Returns PENDING
        with the refund's own pspReference; the REFUND webhook has the
        outcome. Raises like :meth:`capture`.
        """
        invalid = self._check_modification(processor_reference, idempotency_key, (amount_minor, currency))
        if invalid is not None:
            raise invalid
        body = {
            "merchantAccount": self._merchant_account,
            "amount": {"value": amount_minor, "currency": currency},
            "reference": idempotency_key,
        }
        answer = await self._modification(processor_reference, "refunds", body, idempotency_key)
        return ProcessorRefund(
            processor_reference=str(answer["pspReference"]),
            status=RefundStatus.PENDING,
            amount_minor=amount_minor,
            currency=currency,
        )

    async def aclose(self) -> None:
        """Close the HTTP client and its connections (idempotent)."""
        await self._client.aclose()

    # --- local checks -------------------------------------------------------------------------

    @staticmethod
    def _check_charge(request: ChargeRequest) -> ProcessorError | None:
        amount = request.amount_minor
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            return PermanentProcessorError("amount_minor must be a positive integer", code="invalid_amount")
        if not _CURRENCY_RE.match(request.currency):
            return PermanentProcessorError("currency must be an ISO 4217 code", code="invalid_currency")
        if not request.payment_method:
            return PermanentProcessorError(
                "payment_method (storedPaymentMethodId) is required", code="invalid_payment_method"
            )
        if len(request.customer_reference) < 3:
            return PermanentProcessorError(
                "customer_reference (shopperReference) of at least 3 characters is required "
                "for a stored-payment-method charge",
                code="invalid_shopper_reference",
            )
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
            return PermanentProcessorError("idempotency key longer than 64 characters", code="invalid_key")
        return None

    @staticmethod
    def _check_modification(
        processor_reference: str, idempotency_key: str, amount: tuple[int, str] | None = None
    ) -> ProcessorError | None:
        """Local checks of a modification: a pspReference-shaped reference (it goes into the URL
        path), a key of 1-64 characters, and when given a positive amount in an ISO 4217 currency."""
        if not _PSP_REFERENCE_RE.match(processor_reference):
            return PermanentProcessorError(
                "processor_reference is not an Adyen pspReference", code="invalid_reference"
            )
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
            return PermanentProcessorError("idempotency key must be 1-64 characters", code="invalid_key")
        if amount is not None:
            amount_minor, currency = amount
            if isinstance(amount_minor, bool) or not isinstance(amount_minor, int) or amount_minor <= 0:
                return PermanentProcessorError(
                    "amount_minor must be a positive integer", code="invalid_amount"
                )
            if not _CURRENCY_RE.match(currency):
                return PermanentProcessorError("currency must be an ISO 4217 code", code="invalid_currency")
        return None

    def _replay_refusal(self, request: ChargeRequest) -> ProcessorError | None:
        sent_at = _uuid7_seconds(request.payment_id)
        if sent_at is None:
            return None
        age_s = self._clock() - sent_at
        if age_s <= self._replay_window_s:
            return None
        return AmbiguousProcessorError(
            f"attempt is {age_s / 86400:.1f} days old, past the {self._replay_window_s / 86400:.1f}-day "
            "Idempotency-Key replay window: a replay could charge again. Resolve it from webhooks or "
            "the settlement report (https://docs.adyen.com/development-resources/api-idempotency)",
            code="replay_window_exceeded",
        )

    # --- HTTP ---------------------------------------------------------------------------------

    async def _post(
        self, path: str, body: Mapping[str, Any], idempotency_key: str
    ) -> httpx.Response | ProcessorError:
        """POST ``body``; return the response, or (not raise) our error for a transport failure or an
        error answer."""
        if self._client.is_closed:
            return RetryableProcessorError("Adyen client is closed (processor released); not sent")
        try:
            response = await self._client.post(path, json=body, headers={"Idempotency-Key": idempotency_key})
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return RetryableProcessorError(f"Adyen unreachable, not sent: {type(exc).__name__}")
        except httpx.TimeoutException as exc:
            return AmbiguousProcessorError(
                f"Adyen did not answer in time ({type(exc).__name__}); the request may have been processed"
            )
        except httpx.HTTPError as exc:
            return AmbiguousProcessorError(
                f"Adyen connection failed after sending ({type(exc).__name__}); "
                "the request may have been processed"
            )
        if 200 <= response.status_code < 300:
            return response
        return self._error(response)

    def _error(self, response: httpx.Response) -> ProcessorError:
        status = response.status_code
        body = _json_object(response)
        code = str(body.get("errorCode") or "") if body is not None else ""
        error_type = str(body.get("errorType") or "") if body is not None else ""
        message = self._scrub(str(body.get("message") or "")) if body is not None else ""
        psp = str(body.get("pspReference") or "") if body is not None else ""
        detail = f"Adyen {code or 'error'} (HTTP {status}{', ' + error_type if error_type else ''})"
        if message:
            detail += f": {message}"
        if psp:
            detail += f" [pspReference {self._scrub(psp)}]"
        retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
        if status == 429:
            return RetryableProcessorError(
                f"{detail}; not processed", code=code or "429", retry_after_s=retry_after_s
            )
        if code == IDEMPOTENCY_IN_PROGRESS_CODE and 400 <= status < 500:
            return RetryableProcessorError(
                f"{detail}; a request with this Idempotency-Key is still in progress",
                code=code,
                retry_after_s=retry_after_s,
            )
        if status in (401, 403):
            return PermanentProcessorError(
                f"{detail} [check the API key and its access to the merchant account]",
                code=code or str(status),
            )
        if 400 <= status < 500:
            return PermanentProcessorError(detail, code=code or str(status))
        return AmbiguousProcessorError(
            f"{detail}; the request may have been processed",
            code=code or str(status),
            retry_after_s=retry_after_s,
        )

    async def _modification(
        self, processor_reference: str, kind: str, body: Mapping[str, Any], idempotency_key: str
    ) -> dict[str, Any]:
        """POST a capture/cancel/refund and check the ``status: received`` answer."""
        outcome = await self._post(f"/payments/{processor_reference}/{kind}", body, idempotency_key)
        if isinstance(outcome, ProcessorError):
            raise outcome
        answer = _json_object(outcome)
        if (
            answer is None
            or answer.get("status") != "received"
            or not isinstance(answer.get("pspReference"), str)
            or not answer["pspReference"]
        ):
            raise AmbiguousProcessorError(
                f"Adyen HTTP {outcome.status_code} to /{kind} is not the documented "
                "{status: received, pspReference} answer; the request may have been processed",
                code="malformed_response",
            )
        return answer

    def _charge_result(
        self, response: httpx.Response, request: ChargeRequest
    ) -> tuple[ProcessorPayment, str] | ProcessorError:
        """Map a 2xx ``/payments`` answer to our payment and its ``resultCode``; an error when it is not
        the documented JSON or has an unknown ``resultCode``."""
        body = _json_object(response)
        psp = body.get("pspReference") if body is not None else None
        result_code = body.get("resultCode") if body is not None else None
        if body is None or not isinstance(psp, str) or not psp or not isinstance(result_code, str):
            return AmbiguousProcessorError(
                f"Adyen HTTP {response.status_code} without pspReference/resultCode; "
                "the payment may have been processed",
                code="malformed_response",
            )
        echoed = body.get("merchantReference")
        if echoed is not None and echoed != request.idempotency_key:
            return AmbiguousProcessorError(
                "Adyen answered for another merchantReference than this attempt's; outcome unknown",
                code="reference_mismatch",
            )
        refusal_code = body.get("refusalReasonCode")
        refusal = self._scrub(str(body.get("refusalReason") or ""))

        def payment(
            status: ProcessorStatus, captured: int = 0, decline: str | None = None, message: str = ""
        ) -> tuple[ProcessorPayment, str]:
            return (
                ProcessorPayment(
                    processor_reference=psp,
                    status=status,
                    amount_minor=request.amount_minor,
                    currency=request.currency,
                    amount_captured_minor=captured,
                    decline_code=decline,
                    message=message,
                ),
                result_code,
            )

        if result_code == "Authorised":
            if request.capture_method is CaptureMethod.MANUAL:
                return payment(ProcessorStatus.REQUIRES_CAPTURE)
            return payment(ProcessorStatus.SUCCEEDED, captured=request.amount_minor)
        if result_code in ("Received", "Pending"):
            return payment(
                ProcessorStatus.PROCESSING, message=f"Adyen {result_code}; outcome follows by webhook"
            )
        if result_code == "Cancelled":
            return payment(ProcessorStatus.CANCELED, message="Adyen Cancelled")
        if result_code in ("Refused", "Error"):
            code = str(refusal_code) if refusal_code not in (None, "") else result_code
            text = f"Adyen {result_code}: {refusal}" if refusal else f"Adyen {result_code}"
            if refusal_code not in (None, ""):
                text += f" (refusalReasonCode {refusal_code})"
            return payment(ProcessorStatus.FAILED, decline=code, message=text)
        if result_code in _SHOPPER_ACTION_CODES:
            return payment(
                ProcessorStatus.FAILED,
                decline=result_code,
                message=f"Adyen {result_code}: the payment needs a shopper action, impossible for a "
                "merchant-initiated (ContAuth) charge; nothing was charged",
            )
        return AmbiguousProcessorError(
            f"Adyen resultCode {self._scrub(result_code)!r} is not one this connector knows; outcome unknown",
            code="unknown_result_code",
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "<redacted>")[:_MAX_PROVIDER_TEXT]


def _uuid7_seconds(value: uuid.UUID) -> float | None:
    """The Unix time (s) in a UUIDv7's leading 48-bit millisecond field (RFC 9562 section 5.7), else None."""
    if value.version != 7:
        return None
    return (value.int >> 80) / 1000.0


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The body as a JSON object, or ``None`` if it is not one."""
    try:
        parsed = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None
