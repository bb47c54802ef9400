"""SMS through 2Factor's transactional SMS API (2factor.in, India).

Wire format, as documented by 2Factor (API collection
https://documenter.getpostman.com/view/301893/TWDamFGh, "Send Transactional SMS";
the per-endpoint page https://2factor.in/API/DOCS/ADDON_SRV_SEND_TSMS.html; the
OTP page https://2factor.in/API/DOCS/SMS_OTP.html shows the same ``Status`` /
``Details`` answer)::

    POST {base_url}/API/V1/{api_key}/ADDON_SERVICES/SEND/TSMS
    Content-Type: application/x-www-form-urlencoded

    From=<registered 6-character sender id>&To=<number>&Msg=<text>

    HTTP 200  {"Status": "Success", "Details": "<message/session id>"}
    HTTP 200  {"Status": "Error",   "Details": "<reason>"}

We use the "open template" variant (``Msg`` carries the full text). Indian
DLT rules still apply: the text must match a DLT-registered template for the
sender id, otherwise 2Factor refuses it. ``To`` is the E.164 number without
the ``+`` (country code + subscriber number, e.g. ``919876543210``).

The trap: 2Factor reports most failures with HTTP **200** and
``"Status": "Error"``; HTTP 200 alone means nothing, ``Status`` decides.
There are no numeric error codes, so ``Details`` is classified by wording:

============================================================  ==========
``Details`` mentions                                          outcome
============================================================  ==========
invalid/unknown API key, no account, authentication           permanent
invalid phone/mobile number, length mismatch, DND/blocked     permanent
DLT, template, sender id / header not approved or unknown     permanent
insufficient balance / credits                                permanent (until topped up)
rate/limit, too many, try again, temporarily, timeout, busy   retryable
anything else                                                 retryable
============================================================  ==========

HTTP level: 429 and 5xx are retryable (``Retry-After`` honoured), a 4xx
carrying ``Status: Error`` is classified by ``Details`` as above, any other
4xx is permanent, and a 2xx that is not the documented JSON is retryable.
Connection failures before the request was sent are retryable and safe.
Timeouts or resets after the request may have reached 2Factor, 5xx, and
undocumented 2xx bodies are retryable but *ambiguous* (reason prefix
``ambiguous:``): 2Factor takes no idempotency key, so the SMS may already have
been sent and a retry can duplicate it.

The API key is part of the URL path, so it is kept out of everything we emit:
requests are built with a placeholder segment and a small transport puts the
real key in only on the way to the socket (httpx logs request URLs at INFO and
its exceptions carry the request), every error is raised from a fresh
exception without a cause or context, provider text is scrubbed of the key,
and ``repr`` never shows it.
"""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any
from urllib.parse import quote

import httpx

from channels.provider import (
    AMBIGUOUS_PREFIX,
    DeliveryError,
    PermanentDeliveryError,
    RetryableDeliveryError,
    SendResult,
    parse_retry_after,
)
from switchboard.notify.v1 import events_pb2

#: Reasons of failures after which the SMS may nevertheless have been sent start with this.
DEFAULT_BASE_URL = "https://2factor.in"
_KEY_PLACEHOLDER = "REDACTED-API-KEY"
_SEND_PATH = f"/API/V1/{_KEY_PLACEHOLDER}/ADDON_SERVICES/SEND/TSMS"
_E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
_MAX_PROVIDER_TEXT = 300

# Checked in this order; the first table whose marker occurs in the lower-cased Details wins.
_BALANCE_MARKERS = ("insufficient balance", "insufficient credit", "low balance", "no balance", "balance")
_PERMANENT_MARKERS = (
    "api key",
    "apikey",
    "no account",
    "account not found",
    "authentication",
    "unauthori",
    "invalid phone",
    "invalid number",
    "invalid mobile",
    "invalid to",
    "length mismatch",
    "dnd",
    "blocked",
    "blacklist",
    "dlt",
    "template",
    "sender",
    "header",
    "not approved",
    "not registered",
    "unregistered",
)
_RETRYABLE_MARKERS = (
    "rate",
    "limit",
    "too many",
    "try again",
    "temporar",
    "timeout",
    "timed out",
    "busy",
    "unavailable",
    "server error",
)


def classify_details(details: str) -> DeliveryError:
    """The error for a ``{"Status": "Error", "Details": details}`` answer (see the module table).

    ``details`` must already be scrubbed of secrets; it is quoted in the reason.
    """
    lowered = details.lower()
    quoted = details.strip()[:_MAX_PROVIDER_TEXT] or "(no details)"
    if any(marker in lowered for marker in _BALANCE_MARKERS):
        return PermanentDeliveryError(
            f"2Factor: insufficient balance, permanent until the account is topped up: {quoted}"
        )
    if any(marker in lowered for marker in _PERMANENT_MARKERS):
        return PermanentDeliveryError(f"2Factor rejected the SMS: {quoted}")
    if any(marker in lowered for marker in _RETRYABLE_MARKERS):
        return RetryableDeliveryError(f"2Factor transient error: {quoted}")
    return RetryableDeliveryError(f"2Factor error (unrecognised, retrying): {quoted}")


class _ApiKeyTransport(httpx.AsyncBaseTransport):
    """Puts the API key into the path only for the wire request.

    The client's own ``Request`` (the one httpx logs and attaches to its
    exceptions and responses) keeps the placeholder.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, api_key: str) -> None:
        self._inner = inner
        self._placeholder = _KEY_PLACEHOLDER.encode("ascii")
        self._secret_segment = quote(api_key, safe="").encode("ascii")

    def __repr__(self) -> str:
        return "_ApiKeyTransport(api_key=<redacted>)"

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raw_path = request.url.raw_path.replace(self._placeholder, self._secret_segment, 1)
        wire = httpx.Request(
            request.method,
            request.url.copy_with(raw_path=raw_path),
            headers=request.headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        return await self._inner.handle_async_request(wire)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _network_transport(base_url: str) -> httpx.AsyncHTTPTransport:
    """An HTTP transport honouring ``*_PROXY`` / ``NO_PROXY`` from the environment.

    The client itself runs with ``trust_env=False`` so httpx cannot route
    around :class:`_ApiKeyTransport` through an environment proxy mount.
    """
    url = httpx.URL(base_url)
    proxy = None if urllib.request.proxy_bypass(url.host) else urllib.request.getproxies().get(url.scheme)
    return httpx.AsyncHTTPTransport(proxy=proxy, trust_env=True)


class TwoFactorProvider:
    """Sends SMS through one 2Factor account; see the module docstring for the wire format.

    ``api_key``: the account's API key (secret). ``sender_id``: the registered
    6-character DLT sender id (``From``). ``base_url``: scheme + host, no
    trailing path. ``timeout_s``: seconds, applied by httpx to each of connect,
    write, read and pool wait.
    """

    name = "two_factor"

    def __init__(
        self,
        api_key: str,
        sender_id: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout_s: float = 15.0,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        if not sender_id:
            raise ValueError("sender_id is required")
        self._api_key = api_key
        self._sender_id = sender_id
        self._base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            timeout=httpx.Timeout(timeout_s),
            transport=_ApiKeyTransport(_network_transport(self._base_url), api_key),
            trust_env=False,
            headers={"Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return (
            f"TwoFactorProvider(sender_id={self._sender_id!r}, base_url={self._base_url!r}, "
            "api_key=<redacted>)"
        )

    def _scrub(self, text: str) -> str:
        """``text`` with the API key (raw or URL-quoted) replaced."""
        for secret in {self._api_key, quote(self._api_key, safe="")}:
            text = text.replace(secret, "<redacted>")
        return text

    async def send(self, event: events_pb2.DeliveryRequested) -> SendResult:
        """Send ``event.sms.text`` to ``event.recipient`` (E.164).

        Returns 2Factor's ``Details`` id as ``provider_message_id``. Raises
        ``PermanentDeliveryError`` or ``RetryableDeliveryError`` as in the module
        table; reasons of possibly-sent failures start with ``ambiguous:``.
        """
        if event.WhichOneof("content") != "sms":
            raise PermanentDeliveryError("2Factor sends SMS only: the delivery has no SMS content")
        if not _E164_RE.match(event.recipient):
            raise PermanentDeliveryError("invalid recipient: not an E.164 phone number")
        if not event.sms.text:
            raise PermanentDeliveryError("empty SMS text")
        if self._client.is_closed:
            raise RetryableDeliveryError("2Factor client is closed (provider released); not sent")
        form = {"From": self._sender_id, "To": event.recipient[1:], "Msg": event.sms.text}
        outcome = await self._post(form)
        if isinstance(outcome, DeliveryError):
            raise outcome  # created outside any except block: no __cause__/__context__ to leak
        return self._interpret(outcome)

    async def _post(self, form: dict[str, str]) -> httpx.Response | DeliveryError:
        """POST the form; a transport failure is returned (not raised) as our error."""
        try:
            return await self._client.post(_SEND_PATH, data=form)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return RetryableDeliveryError(f"2Factor unreachable, not sent: {type(exc).__name__}")
        except httpx.TimeoutException as exc:
            return RetryableDeliveryError(
                f"{AMBIGUOUS_PREFIX} 2Factor did not answer in time ({type(exc).__name__}); "
                "the SMS may have been sent"
            )
        except httpx.HTTPError as exc:
            return RetryableDeliveryError(
                f"{AMBIGUOUS_PREFIX} 2Factor connection failed after sending "
                f"({type(exc).__name__}); the SMS may have been sent"
            )

    def _interpret(self, response: httpx.Response) -> SendResult:
        status = response.status_code
        body = _json_object(response)
        if status == 429:
            raise RetryableDeliveryError(
                "2Factor HTTP 429 Too Many Requests",
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 500:
            raise RetryableDeliveryError(
                f"{AMBIGUOUS_PREFIX} 2Factor HTTP {status}; the SMS may have been sent",
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            )
        provider_status = str(body.get("Status", "")).lower() if body is not None else ""
        details = self._scrub(str(body.get("Details", ""))) if body is not None else ""
        if provider_status == "error":
            raise classify_details(details)
        if status >= 400:
            raise PermanentDeliveryError(f"2Factor HTTP {status} {response.reason_phrase}".rstrip())
        if provider_status == "success":
            return SendResult(provider_message_id=details)
        raise RetryableDeliveryError(
            f"{AMBIGUOUS_PREFIX} 2Factor HTTP {status} without the documented Status JSON; "
            "the SMS may have been sent"
        )

    async def close(self) -> None:
        """Close the HTTP client and its connections (idempotent)."""
        await self._client.aclose()


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The body as a JSON object, or ``None`` if it is not one."""
    try:
        parsed = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None
