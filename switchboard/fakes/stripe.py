"""A fake Stripe API (PaymentIntents, Refunds, Search) on loopback, for payments/stripe.py.

Endpoints, with Stripe's JSON shapes (https://docs.stripe.com/api/payment_intents,
https://docs.stripe.com/api/refunds):

- ``POST /v1/payment_intents`` (create, optionally ``confirm=true``);
- ``GET /v1/payment_intents`` (list; ``created[gte|gt|lte|lt]``, ``limit``, ``starting_after``);
- ``GET /v1/payment_intents/search`` (``query``, ``limit``; https://docs.stripe.com/search);
- ``GET /v1/payment_intents/{id}``;
- ``POST /v1/payment_intents/{id}/capture`` (``amount_to_capture``), ``/cancel``
  (``cancellation_reason``) and ``/confirm`` (``payment_method``, ``return_url``; a
  PaymentIntent in ``requires_payment_method``, ``requires_confirmation`` or
  ``requires_action``, else ``400 payment_intent_unexpected_state``);
- ``POST /v1/refunds`` (``payment_intent``, ``amount``, ``reason``, ``metadata``).

What it checks, each refusal in Stripe's error envelope
``{"error": {"type", "code", "message", "param", "doc_url", ...}}`` (https://docs.stripe.com/api/errors):

- the secret key, as ``Authorization: Bearer <key>`` or basic auth with the key
  as user name (https://docs.stripe.com/api/authentication): 401;
- a ``Stripe-Version`` header, when present, looks like ``YYYY-MM-DD[.name]``: 400;
- POST bodies are ``application/x-www-form-urlencoded`` with bracket notation
  (``metadata[key]=value``), no duplicate or unknown parameters, required
  parameters present, integers and booleans well formed, currencies lower-case
  ISO codes, ISK amounts multiples of 100, metadata within Stripe's limits
  (https://docs.stripe.com/api/metadata): 400 ``parameter_missing``,
  ``parameter_unknown``, ``parameter_invalid_integer``...;
- ``confirm=true`` needs a payment method, and (as at Stripe, with automatic
  payment methods) a ``return_url`` unless ``automatic_payment_methods[allow_redirects]=never``.

**Idempotency** as documented (https://docs.stripe.com/api/idempotent_requests,
https://docs.stripe.com/error-low-level#idempotency): the result of a POST with an
``Idempotency-Key`` is saved once the endpoint starts executing -- including
card declines and state errors, but not authentication, validation or
injected faults (rate limiters run before the idempotency layer). The same key
with the same method, path and parameters replays the saved status and body
with ``Idempotent-Replayed: true``; with different ones it is ``400
idempotency_error``; while the first request with the key is still executing
it is ``409 idempotency_error`` / ``idempotency_key_in_use`` with
``Stripe-Should-Retry: true``. :meth:`FakeStripe.hold_execution` parks the next
execution so tests can create that overlap without sleeping.

**Outcomes** follow Stripe's test PaymentMethods (https://docs.stripe.com/testing):
``pm_card_visa`` and friends succeed; ``pm_card_chargeDeclined`` (generic_decline),
``pm_card_chargeDeclinedInsufficientFunds``, ``...LostCard``, ``...StolenCard``,
``...Fraudulent``, ``...ExpiredCard``, ``...IncorrectCvc`` and
``...ProcessingError`` answer ``402 card_error`` and leave the PaymentIntent in
``requires_payment_method`` with ``last_payment_error``;
``pm_card_authenticationRequired`` / ``pm_card_threeDSecure2Required`` leave it
in ``requires_action``. ``pm_fake_processing`` is this fake's own token (no
Stripe card does this): the PaymentIntent stays ``processing`` until
:meth:`FakeStripe.finish_processing`.

**Money rules**: capture at most ``amount_capturable`` (the rest is released),
refunds in total at most the captured amount, cancel only before success.

**Search** is immediate by default. With ``search_lag=True`` it answers from an
index that only :meth:`FakeStripe.refresh_search_index` updates (a snapshot,
so statuses can be stale), like Stripe's eventually consistent search; the
list endpoint is always current.

**Records**: ``received`` (executed requests and reads), ``charges`` (one Stripe
Charge object per successful authorization or charge; ``captured`` tells which),
``refunds``, ``intents``, ``replays`` (keys replayed) and ``events`` (Stripe Event
objects for each state change), which :meth:`FakeStripe.send_event` delivers
to a webhook URL signed with ``Stripe-Signature``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hmac
import itertools
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
from aiohttp import web

from payments.stripe_signature import SIGNATURE_HEADER, signature_header
from switchboard.fakes.http import LOST_RESPONSE, FakeProviderServer, Fault

FAKE_API_VERSION = "2025-03-31.basil"
DOCS = "https://docs.stripe.com/error-codes"

#: Test PaymentMethods that authorize successfully.
SUCCEEDING_TOKENS = frozenset(
    {
        "pm_card_visa",
        "pm_card_visa_debit",
        "pm_card_mastercard",
        "pm_card_amex",
        "pm_card_discover",
        "pm_card_us",
    }
)
#: Test PaymentMethods that decline: token -> (code, decline_code, message).
DECLINING_TOKENS: dict[str, tuple[str, str | None, str]] = {
    "pm_card_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    "pm_card_chargeDeclinedLostCard": ("card_declined", "lost_card", "Your card was declined."),
    "pm_card_chargeDeclinedStolenCard": ("card_declined", "stolen_card", "Your card was declined."),
    "pm_card_chargeDeclinedFraudulent": ("card_declined", "fraudulent", "Your card was declined."),
    "pm_card_chargeDeclinedExpiredCard": ("expired_card", None, "Your card has expired."),
    "pm_card_chargeDeclinedIncorrectCvc": ("incorrect_cvc", None, "Your card's security code is incorrect."),
    "pm_card_chargeDeclinedProcessingError": (
        "processing_error",
        None,
        "An error occurred while processing your card. Try again in a little bit.",
    ),
}
#: Test PaymentMethods that need 3D Secure (the PaymentIntent goes to requires_action).
AUTHENTICATION_TOKENS = frozenset(
    {"pm_card_authenticationRequired", "pm_card_threeDSecure2Required", "pm_card_threeDSecureRequired"}
)
#: This fake's own token: the PaymentIntent stays ``processing`` (not a Stripe test token).
PROCESSING_TOKEN = "pm_fake_processing"  # noqa: S105 - a test token, not a secret

_CREATE_PARAMS = frozenset(
    {
        "amount",
        "currency",
        "payment_method",
        "confirm",
        "capture_method",
        "automatic_payment_methods",
        "description",
        "metadata",
        "return_url",
        "payment_method_types",
        "customer",
        "receipt_email",
        "statement_descriptor_suffix",
        "off_session",
    }
)
#: Confirm parameters this fake understands (a subset of https://docs.stripe.com/api/payment_intents/confirm;
#: the others, e.g. ``off_session``, are refused as unknown rather than silently ignored).
_CONFIRM_PARAMS = frozenset({"payment_method", "return_url", "capture_method", "receipt_email"})
_CAPTURE_METHODS = frozenset({"automatic", "automatic_async", "manual"})
#: Statuses in which Stripe accepts a confirm.
_CONFIRMABLE = frozenset({"requires_payment_method", "requires_confirmation", "requires_action"})
_CANCEL_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer", "abandoned"})
_REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
_CANCELABLE = frozenset(
    {"requires_payment_method", "requires_capture", "requires_confirmation", "requires_action", "processing"}
)
_VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")
_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_CLAUSE_RE = re.compile(
    r"^(?:metadata\['(?P<meta>(?:[^'\\]|\\.)*)'\]|(?P<field>[a-z_]+)):'(?P<value>(?:[^'\\]|\\.)*)'$"
)
_SEARCH_FIELDS = frozenset({"status", "currency", "customer"})
_COMPARISONS: dict[str, Callable[[int, int], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


class StripeRefusal(Exception):
    """A request the fake answers with a Stripe error (status + error object)."""

    def __init__(self, status: int, error: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(error.get("message", ""))
        self.status = status
        self.error = error
        self.headers = headers or {}


def error_object(
    kind: str,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    decline_code: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Stripe's error object (``type``, ``code``, ``decline_code``, ``message``, ``param``, ``doc_url``)."""
    error: dict[str, Any] = {"type": kind, "message": message}
    if code:
        error["code"] = code
        error["doc_url"] = f"{DOCS}/{code.replace('_', '-')}"
    if param is not None:
        error["param"] = param
    if decline_code:
        error["decline_code"] = decline_code
    error.update(extra)
    return error


def _invalid(
    message: str, *, code: str | None = None, param: str | None = None, status: int = 400
) -> StripeRefusal:
    return StripeRefusal(status, error_object("invalid_request_error", message, code=code, param=param))


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def decode_form(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Stripe bracket notation back to nested dicts: ``metadata[k]=v`` -> ``{"metadata": {"k": "v"}}``.

    List indices (``expand[0]``) stay dict keys (``"0"``). Raises
    :class:`StripeRefusal` (400) for a malformed, duplicate or conflicting key.
    """
    result: dict[str, Any] = {}
    for raw_key, value in pairs:
        match = _KEY_RE.match(raw_key)
        if match is None:
            raise _invalid(f"Invalid parameter name: {raw_key}", code="parameter_unknown", param=raw_key)
        path = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise _invalid(f"Invalid value for {raw_key}: conflicting parameters", param=raw_key)
            node = child
        if path[-1] in node:
            raise _invalid(f"Received duplicate parameter: {raw_key}", param=raw_key)
        node[path[-1]] = value
    return result


@dataclass
class _Saved:
    method: str
    path: str
    params: dict[str, Any]
    status: int
    body: dict[str, Any]
    request_id: str


@dataclass
class Hold:
    """A parked execution: ``reached`` is set when a request waits on it; :meth:`release` lets it go on."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        """Let the parked request finish."""
        self.released.set()


class FakeStripe(FakeProviderServer):
    """Stripe's PaymentIntents, Refunds and Search for one account (``secret_key``).

    See the module docstring for endpoints, checks, idempotency and records.
    ``clock`` gives UNIX seconds for ``created`` timestamps.
    """

    def __init__(
        self,
        secret_key: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        search_lag: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(host, port)
        self.secret_key = secret_key
        self.search_lag = search_lag
        self.clock = clock
        self.intents: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.charges: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.replays: list[str] = []
        self._saved: dict[str, _Saved] = {}
        self._in_flight: set[str] = set()
        self._search_index: dict[str, dict[str, Any]] = {}
        self._hold: Hold | None = None
        self._sequence = itertools.count()
        self._order: dict[str, int] = {}
        self._changed: asyncio.Condition | None = None

    # -- test helpers ----------------------------------------------------------------------------

    @staticmethod
    def error(
        status: int,
        kind: str,
        *,
        code: str | None = None,
        message: str = "",
        decline_code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """A fault answering ``status`` with Stripe's error envelope (before the idempotency layer)."""
        error = error_object(kind, message or f"injected Stripe {kind}", code=code, decline_code=decline_code)
        return Fault.http_status(status, body=json.dumps({"error": error}), headers=headers)

    def hold_execution(self) -> Hold:
        """Park the next POST that starts executing (its idempotency key in flight) until released."""
        self._hold = Hold()
        return self._hold

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checked after every executed POST (no polling).

        Raises ``TimeoutError`` after ``timeout_s`` seconds. For work the fake
        finishes after the client gave up (``Fault.slow``).
        """
        changed = self._condition()
        async with changed:
            await asyncio.wait_for(changed.wait_for(predicate), timeout_s)

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def captured_charges(self) -> list[dict[str, Any]]:
        """The charges that moved money (``captured`` true)."""
        return [charge for charge in self.charges if charge["captured"]]

    def refresh_search_index(self) -> None:
        """Make every PaymentIntent, as it is now, visible to search (``search_lag`` mode)."""
        self._search_index = copy.deepcopy(self.intents)

    def finish_processing(self, intent_id: str, *, succeed: bool = True) -> dict[str, Any]:
        """Settle a ``processing`` PaymentIntent (``pm_fake_processing``) as succeeded or failed."""
        intent = self.intents[intent_id]
        if intent["status"] != "processing":
            raise ValueError(f"{intent_id} is {intent['status']}, not processing")
        if succeed:
            self._authorize(intent)
        else:
            self._decline(intent, ("card_declined", "generic_decline", "Your card was declined."))
        return copy.deepcopy(intent)

    def event(self, event_type: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """A Stripe Event object (https://docs.stripe.com/api/events/object) carrying a copy of ``obj``."""
        return {
            "id": _new_id("evt"),
            "object": "event",
            "api_version": FAKE_API_VERSION,
            "created": int(self.clock()),
            "data": {"object": copy.deepcopy(dict(obj))},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }

    async def send_event(
        self,
        url: str,
        event: Mapping[str, Any],
        secrets: str | Sequence[str],
        *,
        timestamp: int | None = None,
        timeout_s: float = 5.0,
    ) -> httpx.Response:
        """POST ``event`` as JSON to ``url`` with a ``Stripe-Signature`` header, as Stripe delivers webhooks.

        One ``v1`` per secret (several while rolling); ``timestamp`` defaults to
        ``clock()``. See https://docs.stripe.com/webhooks#verify-manually.
        """
        payload = json.dumps(event, separators=(",", ":")).encode("utf-8")
        header = signature_header(payload, secrets, timestamp=timestamp, clock=self.clock)
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            return await client.post(
                url,
                content=payload,
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    SIGNATURE_HEADER: header,
                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                },
            )

    # -- routes ----------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        """Register the PaymentIntent, Refund and Search endpoints."""
        app.router.add_post("/v1/payment_intents", self._create_intent)
        app.router.add_get("/v1/payment_intents", self._list_intents)
        app.router.add_get("/v1/payment_intents/search", self._search_intents)
        app.router.add_get("/v1/payment_intents/{id}", self._retrieve_intent)
        app.router.add_post("/v1/payment_intents/{id}/capture", self._capture_intent)
        app.router.add_post("/v1/payment_intents/{id}/cancel", self._cancel_intent)
        app.router.add_post("/v1/payment_intents/{id}/confirm", self._confirm_intent)
        app.router.add_post("/v1/refunds", self._create_refund)

    # -- request plumbing ------------------------------------------------------------------------

    def _response(
        self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> web.Response:
        all_headers = {"Request-Id": _new_id("req"), "Stripe-Version": FAKE_API_VERSION, **(headers or {})}
        return web.json_response(body, status=status, headers=all_headers)

    def _refusal(self, refusal: StripeRefusal) -> web.Response:
        return self._response(refusal.status, {"error": refusal.error}, refusal.headers)

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = credential.strip()
        elif scheme.lower() == "basic":
            try:
                key = base64.b64decode(credential, validate=True).decode("utf-8").partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                key = ""
        if not key:
            raise _invalid(
                "You did not provide an API key. You need to provide your API key in the Authorization "
                "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
                status=401,
            )
        if not hmac.compare_digest(key.encode(), self.secret_key.encode()):
            raise _invalid(f"Invalid API Key provided: {key[:8]}****{key[-4:]}", status=401)
        version = request.headers.get("Stripe-Version")
        if version is not None and not _VERSION_RE.match(version):
            raise _invalid(f"Invalid Stripe API version: {version}", code="invalid_api_version")

    async def _post(
        self,
        request: web.Request,
        validate: Callable[[dict[str, Any]], None],
        execute: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]],
    ) -> web.StreamResponse:
        """Faults, auth, form decoding, the idempotency layer, validation, then execution."""
        raw = await request.read()  # the whole body first, as a real server would
        faulted = await self.apply_faults(request)
        if faulted is not None:
            return faulted
        key: str | None = None
        try:
            self._authenticate(request)
            if request.content_type != "application/x-www-form-urlencoded":
                raise _invalid(
                    "Invalid request: the body must be application/x-www-form-urlencoded "
                    "(https://docs.stripe.com/api)"
                )
            try:
                pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw))
            except (UnicodeDecodeError, ValueError):
                raise _invalid("Invalid request: the form body could not be parsed") from None
            params = decode_form(pairs)
            key = request.headers.get("Idempotency-Key")
            if key is not None:
                replay = self._idempotent_replay(request, key, params)
                if replay is not None:
                    return replay
            validate(params)
        except StripeRefusal as refusal:
            return self._refusal(refusal)
        if key:
            self._in_flight.add(key)
        try:
            if self._hold is not None:
                hold, self._hold = self._hold, None
                hold.reached.set()
                await hold.released.wait()
            try:
                status, body = execute(params)
            except StripeRefusal as refusal:
                status, body = refusal.status, {"error": refusal.error}
            request_id = _new_id("req")
            if key:
                self._saved[key] = _Saved(request.method, request.path, params, status, body, request_id)
        finally:
            if key:
                self._in_flight.discard(key)
        self.record(request, params)
        changed = self._condition()
        async with changed:
            changed.notify_all()
        if request.get(LOST_RESPONSE):
            self.drop_connection(request)
        return self._response(status, body, {"Request-Id": request_id})

    def _idempotent_replay(
        self, request: web.Request, key: str, params: dict[str, Any]
    ) -> web.Response | None:
        if not key or len(key) > 255:
            raise _invalid("Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
        if key in self._in_flight:
            raise StripeRefusal(
                409,
                error_object(
                    "idempotency_error",
                    "There is currently another in-progress request using this Idempotency Key (that "
                    "probably means you submitted twice, and the other request is still going through): "
                    f"{key}. Please try again later.",
                    code="idempotency_key_in_use",
                ),
                {"Stripe-Should-Retry": "true"},
            )
        saved = self._saved.get(key)
        if saved is None:
            return None
        if (saved.method, saved.path) != (request.method, request.path):
            raise StripeRefusal(
                400,
                error_object(
                    "idempotency_error",
                    "Keys for idempotent requests can only be used for the same endpoint they were first "
                    f"used for ('{saved.method} {saved.path}'). Try using a key other than '{key}' if you "
                    "meant to execute a different request.",
                ),
            )
        if saved.params != params:
            raise StripeRefusal(
                400,
                error_object(
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters they were first "
                    f"used with. Try using a key other than '{key}' if you meant to execute a different "
                    "request.",
                ),
            )
        self.replays.append(key)
        if request.get(LOST_RESPONSE):
            self.drop_connection(request)
        return self._response(
            saved.status,
            saved.body,
            {"Idempotent-Replayed": "true", "Original-Request": saved.request_id},
        )

    async def _get(
        self, request: web.Request, answer: Callable[[Mapping[str, str]], dict[str, Any]]
    ) -> web.StreamResponse:
        faulted = await self.apply_faults(request)
        if faulted is not None:
            return faulted
        try:
            self._authenticate(request)
            query = {key: request.query.getone(key) for key in request.query}
            body = answer(query)
        except StripeRefusal as refusal:
            return self._refusal(refusal)
        self.record(request, query)
        if request.get(LOST_RESPONSE):
            self.drop_connection(request)
        return self._response(200, body)

    # -- PaymentIntents --------------------------------------------------------------------------

    async def _create_intent(self, request: web.Request) -> web.StreamResponse:
        return await self._post(request, self._validate_create, self._execute_create)

    def _validate_create(self, params: dict[str, Any]) -> None:
        for name in params:
            if name not in _CREATE_PARAMS:
                raise _invalid(f"Received unknown parameter: {name}", code="parameter_unknown", param=name)
        amount = _integer(params, "amount", required=True)
        if amount < 1:
            raise _invalid(
                "This value must be greater than or equal to 1.", code="amount_too_small", param="amount"
            )
        currency = _string(params, "currency", required=True)
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise _invalid(f"Invalid currency: {currency}", code="parameter_invalid_string", param="currency")
        if currency == "isk" and amount % 100:
            raise _invalid(
                "Invalid amount. Currency ISK has become effectively zero-decimal and charged amounts "
                "must be evenly divisible by 100. See https://stripe.com/docs/currencies#special-cases",
                code="invalid_charge_amount_no_decimal_compatible",
                param="amount",
            )
        capture_method = _string(params, "capture_method") or "automatic"
        if capture_method not in ("automatic", "automatic_async", "manual"):
            raise _invalid(f"Invalid capture_method: {capture_method}", param="capture_method")
        confirm = _boolean(params, "confirm")
        automatic = params.get("automatic_payment_methods")
        if automatic is not None:
            if not isinstance(automatic, dict) or set(automatic) - {"enabled", "allow_redirects"}:
                raise _invalid("Invalid automatic_payment_methods", param="automatic_payment_methods")
            _boolean(automatic, "enabled", required=True, prefix="automatic_payment_methods")
            redirects = automatic.get("allow_redirects", "always")
            if redirects not in ("always", "never"):
                raise _invalid(
                    f"Invalid allow_redirects: {redirects}",
                    param="automatic_payment_methods[allow_redirects]",
                )
        _validate_metadata(params.get("metadata"))
        if not isinstance(params.get("description", ""), str):
            raise _invalid("Invalid description", param="description")
        if confirm:
            if not params.get("payment_method"):
                raise _invalid(
                    "You cannot confirm this PaymentIntent because it's missing a payment method.",
                    code="parameter_missing",
                    param="payment_method",
                )
            no_redirects = isinstance(automatic, dict) and automatic.get("allow_redirects") == "never"
            if not params.get("return_url") and not no_redirects and "payment_method_types" not in params:
                raise _invalid(
                    "This PaymentIntent is configured to accept payment methods enabled in your Dashboard. "
                    "Because some of these payment methods might redirect your customer off of your page, "
                    "you must provide a `return_url`. If you don't want to accept redirect-based payment "
                    "methods, set `automatic_payment_methods[enabled]` to `true` and "
                    "`automatic_payment_methods[allow_redirects]` to `never`.",
                    param="return_url",
                )

    def _execute_create(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        token = str(params.get("payment_method") or "")
        if token and token not in self._known_tokens():
            raise _invalid(
                f"No such PaymentMethod: '{token}'", code="resource_missing", param="payment_method"
            )
        intent_id = _new_id("pi")
        intent: dict[str, Any] = {
            "id": intent_id,
            "object": "payment_intent",
            "amount": int(params["amount"]),
            "amount_capturable": 0,
            "amount_received": 0,
            "automatic_payment_methods": _automatic(params.get("automatic_payment_methods")),
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": params.get("capture_method") or "automatic",
            "client_secret": f"{intent_id}_secret_{uuid.uuid4().hex[:24]}",
            "confirmation_method": "automatic",
            "created": int(self.clock()),
            "currency": params["currency"],
            "customer": params.get("customer"),
            "description": params.get("description") or None,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": dict(params.get("metadata") or {}),
            "next_action": None,
            "payment_method": token or None,
            "payment_method_types": ["card"],
            "status": "requires_confirmation" if token else "requires_payment_method",
        }
        self.intents[intent_id] = intent
        self._order[intent_id] = next(self._sequence)
        self._emit("payment_intent.created", intent)
        if not _boolean(params, "confirm"):
            return 200, copy.deepcopy(intent)
        return self._attempt_payment(intent)

    def _attempt_payment(self, intent: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Confirm ``intent`` with its payment method: the test token decides the outcome."""
        token = str(intent["payment_method"] or "")
        if token in DECLINING_TOKENS:
            error = self._decline(intent, DECLINING_TOKENS[token])
            return 402, {"error": error}
        if token in AUTHENTICATION_TOKENS:
            intent["status"] = "requires_action"
            intent["next_action"] = {
                "type": "use_stripe_sdk",
                "use_stripe_sdk": {
                    "type": "three_d_secure_redirect",
                    "stripe_js": "https://hooks.stripe.com/",
                },
            }
            self._emit("payment_intent.requires_action", intent)
        elif token == PROCESSING_TOKEN:
            intent["status"] = "processing"
            self._emit("payment_intent.processing", intent)
        else:
            self._authorize(intent)
        return 200, copy.deepcopy(intent)

    async def _confirm_intent(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/payment_intents/{id}/confirm`` (https://docs.stripe.com/api/payment_intents/confirm)."""
        intent_id = request.match_info["id"]

        def validate(params: dict[str, Any]) -> None:
            _only(params, _CONFIRM_PARAMS)
            capture_method = params.get("capture_method")
            if capture_method is not None and capture_method not in _CAPTURE_METHODS:
                raise _invalid(f"Invalid capture_method: {capture_method}", param="capture_method")

        def execute(params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            intent = self._intent(intent_id)
            if intent["status"] not in _CONFIRMABLE:
                raise _invalid(
                    "You cannot confirm this PaymentIntent because it has a status of "
                    f"{intent['status']}. Only a PaymentIntent with one of the following statuses may be "
                    f"confirmed: {', '.join(sorted(_CONFIRMABLE))}.",
                    code="payment_intent_unexpected_state",
                )
            token = str(params.get("payment_method") or intent["payment_method"] or "")
            if not token:
                raise _invalid(
                    "You cannot confirm this PaymentIntent because it's missing a payment method. To confirm "
                    "the PaymentIntent with a payment method, pass `payment_method`.",
                    code="payment_intent_unexpected_state",
                    param="payment_method",
                )
            if token not in self._known_tokens():
                raise _invalid(
                    f"No such PaymentMethod: '{token}'", code="resource_missing", param="payment_method"
                )
            automatic = intent["automatic_payment_methods"] or {}
            redirects = automatic.get("enabled") and automatic.get("allow_redirects") != "never"
            if redirects and not params.get("return_url"):
                raise _invalid(
                    "This PaymentIntent is configured to accept payment methods enabled in your Dashboard. "
                    "Because some of these payment methods might redirect your customer off of your page, "
                    "you must provide a `return_url`.",
                    param="return_url",
                )
            intent["payment_method"] = token
            intent["last_payment_error"] = None
            if params.get("capture_method"):
                intent["capture_method"] = params["capture_method"]
            return self._attempt_payment(intent)

        return await self._post(request, validate, execute)

    def _known_tokens(self) -> frozenset[str]:
        return SUCCEEDING_TOKENS | AUTHENTICATION_TOKENS | frozenset(DECLINING_TOKENS) | {PROCESSING_TOKEN}

    def _authorize(self, intent: dict[str, Any]) -> None:
        manual = intent["capture_method"] == "manual"
        charge = {
            "id": _new_id("ch"),
            "object": "charge",
            "amount": intent["amount"],
            "amount_captured": 0 if manual else intent["amount"],
            "amount_refunded": 0,
            "captured": not manual,
            "created": int(self.clock()),
            "currency": intent["currency"],
            "metadata": dict(intent["metadata"]),
            "paid": True,
            "payment_intent": intent["id"],
            "payment_method": intent["payment_method"],
            "refunded": False,
            "status": "succeeded",
        }
        self.charges.append(charge)
        intent["latest_charge"] = charge["id"]
        intent["next_action"] = None
        if manual:
            intent["status"] = "requires_capture"
            intent["amount_capturable"] = intent["amount"]
            self._emit("payment_intent.amount_capturable_updated", intent)
        else:
            intent["status"] = "succeeded"
            intent["amount_received"] = intent["amount"]
            self._emit("payment_intent.succeeded", intent)

    def _decline(self, intent: dict[str, Any], outcome: tuple[str, str | None, str]) -> dict[str, Any]:
        code, decline_code, message = outcome
        error = error_object(
            "card_error",
            message,
            code=code,
            decline_code=decline_code,
            param="" if code == "card_declined" else None,
            payment_method={"id": intent["payment_method"], "object": "payment_method", "type": "card"},
        )
        intent["status"] = "requires_payment_method"
        intent["last_payment_error"] = copy.deepcopy(error)
        intent["payment_method"] = None
        self._emit("payment_intent.payment_failed", intent)
        return {**error, "payment_intent": copy.deepcopy(intent)}

    def _intent(self, intent_id: str) -> dict[str, Any]:
        intent = self.intents.get(intent_id)
        if intent is None:
            raise _invalid(
                f"No such payment_intent: '{intent_id}'", code="resource_missing", param="intent", status=404
            )
        return intent

    async def _retrieve_intent(self, request: web.Request) -> web.StreamResponse:
        intent_id = request.match_info["id"]
        return await self._get(request, lambda _query: copy.deepcopy(self._intent(intent_id)))

    async def _capture_intent(self, request: web.Request) -> web.StreamResponse:
        intent_id = request.match_info["id"]

        def validate(params: dict[str, Any]) -> None:
            _only(params, {"amount_to_capture", "metadata", "statement_descriptor_suffix"})
            if "amount_to_capture" in params and _integer(params, "amount_to_capture") < 1:
                raise _invalid("This value must be greater than or equal to 1.", param="amount_to_capture")

        def execute(params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            intent = self._intent(intent_id)
            if intent["status"] != "requires_capture":
                raise _invalid(
                    "This PaymentIntent could not be captured because it has a status of "
                    f"{intent['status']}. Only a PaymentIntent with one of the following statuses may be "
                    "captured: requires_capture.",
                    code="payment_intent_unexpected_state",
                )
            amount = int(params.get("amount_to_capture", intent["amount_capturable"]))
            if amount > intent["amount_capturable"]:
                raise _invalid(
                    f"The amount to capture ({amount}) must be less than or equal to the amount capturable "
                    f"({intent['amount_capturable']}).",
                    code="amount_too_large",
                    param="amount_to_capture",
                )
            intent["status"] = "succeeded"
            intent["amount_received"] = amount
            intent["amount_capturable"] = 0
            charge = self._charge_of(intent)
            charge["captured"] = True
            charge["amount_captured"] = amount
            self._emit("payment_intent.succeeded", intent)
            return 200, copy.deepcopy(intent)

        return await self._post(request, validate, execute)

    async def _cancel_intent(self, request: web.Request) -> web.StreamResponse:
        intent_id = request.match_info["id"]

        def validate(params: dict[str, Any]) -> None:
            _only(params, {"cancellation_reason"})
            reason = params.get("cancellation_reason")
            if reason is not None and reason not in _CANCEL_REASONS:
                raise _invalid(f"Invalid cancellation_reason: {reason}", param="cancellation_reason")

        def execute(params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            intent = self._intent(intent_id)
            if intent["status"] not in _CANCELABLE:
                raise _invalid(
                    "You cannot cancel this PaymentIntent because it has a status of "
                    f"{intent['status']}. Only a PaymentIntent with one of the following statuses may be "
                    f"canceled: {', '.join(sorted(_CANCELABLE))}.",
                    code="payment_intent_unexpected_state",
                )
            if intent["status"] == "requires_capture":
                charge = self._charge_of(intent)
                charge["refunded"] = True
                charge["amount_refunded"] = charge["amount"]
            intent["status"] = "canceled"
            intent["canceled_at"] = int(self.clock())
            intent["cancellation_reason"] = params.get("cancellation_reason")
            intent["amount_capturable"] = 0
            intent["next_action"] = None
            self._emit("payment_intent.canceled", intent)
            return 200, copy.deepcopy(intent)

        return await self._post(request, validate, execute)

    def _charge_of(self, intent: Mapping[str, Any]) -> dict[str, Any]:
        for charge in self.charges:
            if charge["id"] == intent["latest_charge"]:
                return charge
        raise AssertionError(f"{intent['id']} has no charge")  # pragma: no cover - fake invariant

    async def _list_intents(self, request: web.Request) -> web.StreamResponse:
        def answer(query: Mapping[str, str]) -> dict[str, Any]:
            allowed = {"limit", "starting_after", "ending_before", "customer"}
            allowed |= {f"created[{op}]" for op in ("gt", "gte", "lt", "lte")} | {"created"}
            for name in query:
                if name not in allowed:
                    raise _invalid(
                        f"Received unknown parameter: {name}", code="parameter_unknown", param=name
                    )
            limit = _limit(query)
            items = sorted(self.intents.values(), key=lambda item: self._order[item["id"]], reverse=True)
            for op, test in _COMPARISONS.items():
                if f"created[{op}]" in query:
                    bound = _integer(dict(query), f"created[{op}]")
                    items = [item for item in items if test(int(item["created"]), bound)]
            if "starting_after" in query:
                cursor = query["starting_after"]
                ids = [item["id"] for item in items]
                if cursor not in self.intents:
                    raise _invalid(
                        f"No such payment_intent: '{cursor}'", code="resource_missing", param="starting_after"
                    )
                items = items[ids.index(cursor) + 1 :] if cursor in ids else []
            page = items[:limit]
            return {
                "object": "list",
                "url": "/v1/payment_intents",
                "has_more": len(items) > limit,
                "data": copy.deepcopy(page),
            }

        return await self._get(request, answer)

    async def _search_intents(self, request: web.Request) -> web.StreamResponse:
        def answer(query: Mapping[str, str]) -> dict[str, Any]:
            for name in query:
                if name not in ("query", "limit", "page", "expand[0]"):
                    raise _invalid(
                        f"Received unknown parameter: {name}", code="parameter_unknown", param=name
                    )
            text = query.get("query")
            if not text:
                raise _invalid("Missing required param: query.", code="parameter_missing", param="query")
            clauses = _parse_search(text)
            limit = _limit(query)
            source = self._search_index if self.search_lag else self.intents
            items = sorted(source.values(), key=lambda item: self._order[item["id"]], reverse=True)
            hits = [item for item in items if all(_clause_matches(item, clause) for clause in clauses)]
            return {
                "object": "search_result",
                "url": "/v1/payment_intents/search",
                "has_more": len(hits) > limit,
                "next_page": None,
                "data": copy.deepcopy(hits[:limit]),
            }

        return await self._get(request, answer)

    # -- Refunds ---------------------------------------------------------------------------------

    async def _create_refund(self, request: web.Request) -> web.StreamResponse:
        def validate(params: dict[str, Any]) -> None:
            _only(params, {"payment_intent", "charge", "amount", "reason", "metadata"})
            if not params.get("payment_intent") and not params.get("charge"):
                raise _invalid(
                    "One of the following params should be provided for this request: "
                    "payment_intent or charge.",
                    code="parameter_missing",
                    param="payment_intent",
                )
            if "amount" in params and _integer(params, "amount") < 1:
                raise _invalid("This value must be greater than or equal to 1.", param="amount")
            reason = params.get("reason")
            if reason is not None and reason not in _REFUND_REASONS:
                raise _invalid(f"Invalid reason: {reason}", param="reason")
            _validate_metadata(params.get("metadata"))

        def execute(params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            intent = self._refund_target(params)
            if intent["status"] != "succeeded":
                raise _invalid(
                    f"This PaymentIntent ({intent['id']}) does not have a successful charge to refund.",
                    code="charge_not_refundable",
                    param="payment_intent",
                )
            charge = self._charge_of(intent)
            remaining = charge["amount_captured"] - charge["amount_refunded"]
            amount = int(params.get("amount", remaining))
            if remaining <= 0:
                raise _invalid(
                    f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded"
                )
            if amount > remaining:
                raise _invalid(
                    f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})",
                    code="amount_too_large",
                    param="amount",
                )
            refund = {
                "id": _new_id("re"),
                "object": "refund",
                "amount": amount,
                "charge": charge["id"],
                "created": int(self.clock()),
                "currency": intent["currency"],
                "metadata": dict(params.get("metadata") or {}),
                "payment_intent": intent["id"],
                "reason": params.get("reason"),
                "status": "succeeded",
            }
            self.refunds[refund["id"]] = refund
            charge["amount_refunded"] += amount
            charge["refunded"] = charge["amount_refunded"] == charge["amount_captured"]
            self._emit("refund.created", refund)
            self._emit("charge.refunded", charge)
            return 200, copy.deepcopy(refund)

        return await self._post(request, validate, execute)

    def _refund_target(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if params.get("payment_intent"):
            intent_id = str(params["payment_intent"])
            intent = self.intents.get(intent_id)
            if intent is None:
                raise _invalid(
                    f"No such payment_intent: '{intent_id}'", code="resource_missing", param="payment_intent"
                )
            return intent
        charge_id = str(params["charge"])
        for charge in self.charges:
            if charge["id"] == charge_id:
                return self.intents[charge["payment_intent"]]
        raise _invalid(f"No such charge: '{charge_id}'", code="resource_missing", param="charge")

    def _emit(self, event_type: str, obj: Mapping[str, Any]) -> None:
        self.events.append(self.event(event_type, obj))


# --- parameter helpers ---------------------------------------------------------------------------


def _only(params: Mapping[str, Any], allowed: Set[str]) -> None:
    for name in params:
        if name not in allowed:
            raise _invalid(f"Received unknown parameter: {name}", code="parameter_unknown", param=name)


def _string(params: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _invalid(f"Missing required param: {name}.", code="parameter_missing", param=name)
        return ""
    if not isinstance(value, str):
        raise _invalid(f"Invalid string: {name}", code="parameter_invalid_string", param=name)
    return value


def _integer(params: Mapping[str, Any], name: str, *, required: bool = False) -> int:
    text = _string(params, name, required=required)
    if not text:
        return 0
    if not re.fullmatch(r"-?[0-9]+", text):
        raise _invalid(f"Invalid integer: {text}", code="parameter_invalid_integer", param=name)
    return int(text)


def _boolean(params: Mapping[str, Any], name: str, *, required: bool = False, prefix: str = "") -> bool:
    full = f"{prefix}[{name}]" if prefix else name
    value = params.get(name)
    if value is None:
        if required:
            raise _invalid(f"Missing required param: {full}.", code="parameter_missing", param=full)
        return False
    if value not in ("true", "false"):
        raise _invalid(f"Invalid boolean: {value}", param=full)
    return bool(value == "true")


def _limit(query: Mapping[str, str]) -> int:
    if "limit" not in query:
        return 10
    limit = _integer(dict(query), "limit")
    if not 1 <= limit <= 100:
        raise _invalid("Limit must be between 1 and 100.", param="limit")
    return limit


def _automatic(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return {
        "enabled": value.get("enabled") == "true",
        "allow_redirects": value.get("allow_redirects", "always"),
    }


def _validate_metadata(metadata: Any) -> None:
    if metadata is None or metadata == "":
        return
    if not isinstance(metadata, dict):
        raise _invalid("Invalid metadata: must be a hash", param="metadata")
    if len(metadata) > 50:
        raise _invalid("Invalid metadata: at most 50 keys", param="metadata")
    for key, value in metadata.items():
        if len(key) > 40:
            raise _invalid(
                f"Invalid metadata key {key[:50]}: at most 40 characters", param=f"metadata[{key}]"
            )
        if not isinstance(value, str) or len(value) > 500:
            raise _invalid(
                f"Invalid metadata value for {key}: at most 500 characters", param=f"metadata[{key}]"
            )


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _parse_search(text: str) -> list[tuple[str, str, str]]:
    """``[(kind, name, value)]`` for ``clause AND clause ...``; kind is ``metadata`` or ``field``."""
    clauses: list[tuple[str, str, str]] = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        match = _CLAUSE_RE.match(part.strip())
        if match is None:
            raise _invalid(f"Invalid search query: {text}", code="parameter_invalid_string", param="query")
        if match.group("meta") is not None:
            clauses.append(("metadata", _unescape(match.group("meta")), _unescape(match.group("value"))))
        else:
            name = match.group("field")
            if name not in _SEARCH_FIELDS:
                raise _invalid(
                    f"Field `{name}` is an unsupported search field for resource `payment_intents`.",
                    param="query",
                )
            clauses.append(("field", name, _unescape(match.group("value"))))
    return clauses


def _clause_matches(item: Mapping[str, Any], clause: tuple[str, str, str]) -> bool:
    kind, name, value = clause
    if kind == "metadata":
        return bool(item.get("metadata", {}).get(name) == value)
    return str(item.get(name)) == value
