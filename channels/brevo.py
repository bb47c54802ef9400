"""Email through Brevo's transactional email API (formerly Sendinblue).

Wire format, as documented by Brevo:

- Endpoint and body: https://developers.brevo.com/reference/sendtransacemail
  (also served as https://developers.brevo.com/reference/send-transac-email)
- Authentication header, JSON error body ``{"code", "message"}``:
  https://developers.brevo.com/docs/how-it-works
- Idempotency (``headers.idempotencyKey``, TTL 30 minutes, a reused key is
  refused with the ``duplicate_parameter`` error code):
  https://developers.brevo.com/docs/heterogenous-versions-batch-emails and
  https://developers.brevo.com/changelog/email-api-now-supports-idempotency
- Rate limits (429) and the ``x-sib-ratelimit-limit`` / ``-remaining`` /
  ``-reset`` headers (reset: time until the window resets, in seconds):
  https://developers.brevo.com/docs/api-limits and
  https://developers.brevo.com/docs/limit-headers
- ``Retry-After``: RFC 9110 section 10.2.3 (delay-seconds or HTTP-date).

One request per delivery::

    POST {base_url}/v3/smtp/email
    api-key: <key>
    accept: application/json
    content-type: application/json

    {"sender": {"email": "<sender_email>", "name": "<sender_name>"},   # name only if set
     "to": [{"email": "<recipient>"}],
     "subject": "<subject>",
     "textContent": "<text>",                                          # if set
     "htmlContent": "<html>",                                          # if set
     "headers": {"X-Switchboard-Delivery-Id": "<delivery_id>",
                 "idempotencyKey": "<delivery_id>"}}

    HTTP 201  {"messageId": "<201801311233.27968069801@smtp-relay.mailin.fr>"}

The reference page marks ``htmlContent`` as required without a template, but
Brevo accepts ``textContent`` alone (it answers ``missing_parameter`` "Either
of htmlContent or textContent is required" only when both are missing; see
https://github.com/getbrevo/brevo-ruby/issues/8 and
https://github.com/anymail/django-anymail/pull/487, which also notes that
Brevo converts a text-only message to HTML).

The idempotency key is the delivery id (a UUID, as the docs require), so a
retry within Brevo's 30-minute TTL is not sent twice. Brevo answers such a
retry with ``duplicate_parameter`` instead of the first answer; with our single
``to`` recipient and no cc/bcc the only parameter that can be a duplicate is
the idempotency key, so that answer means "already accepted" and is treated as
success (``provider_message_id`` is then ``duplicate-idempotencyKey:<delivery id>``:
Brevo does not repeat the first message id). Outside the TTL a retry sends again.

Classification:

================================================  ===========================================
answer                                            outcome
================================================  ===========================================
201/202 with ``messageId`` (or ``messageIds``)    delivered
400 ``duplicate_parameter``                       delivered (idempotent replay, see above)
400 bad request (missing/invalid parameter)       permanent
401 unauthorized (API key invalid)                permanent
402 payment required (``not_enough_credits``)     permanent until the account is topped up
403 forbidden (account, IP, sender not allowed)   permanent
404 not found, other 4xx, 3xx                     permanent (408 is retryable)
429 too many requests                             retryable; ``retry_after_s`` = the larger of
                                                  ``Retry-After`` and ``x-sib-ratelimit-reset``
5xx                                               retryable (``Retry-After`` honoured)
2xx without the documented JSON                   retryable (the key makes the retry safe)
connect error / connect or pool timeout           retryable (not sent)
read/write timeout, reset after sending           retryable (maybe accepted; the key makes the
                                                  retry safe within the TTL)
================================================  ===========================================

Secrets: the API key travels only in the ``api-key`` header; it is scrubbed from
every reason (Brevo's ``code``/``message`` are quoted, scrubbed, at most 300
characters), errors are raised outside ``except`` blocks (no ``__cause__`` or
``__context__`` carrying httpx requests and their headers), and ``repr`` never
shows it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx

from channels.provider import (
    DeliveryError,
    PermanentDeliveryError,
    RetryableDeliveryError,
    SendResult,
    parse_retry_after,
)
from switchboard.notify.v1 import events_pb2

DEFAULT_BASE_URL = "https://api.brevo.com"
SEND_PATH = "/v3/smtp/email"
#: Brevo's error code for a reused idempotency key (and other duplicated parameters).
DUPLICATE_CODE = "duplicate_parameter"
#: ``provider_message_id`` prefix recorded when Brevo refused a retry as a duplicate.
DUPLICATE_MESSAGE_ID_PREFIX = "duplicate-idempotencyKey:"
_MAX_PROVIDER_TEXT = 300
_PERMANENT_MEANING = {
    400: "bad request",
    401: "unauthorized: the API key was rejected; fix the tenant's Brevo configuration",
    402: "payment required: the Brevo account is out of credits; permanent until topped up",
    403: "forbidden: the account, sender or IP is not allowed to send",
    404: "not found: check the base URL",
}


def parse_ratelimit_reset(value: str | None) -> float | None:
    """Seconds until Brevo's rate-limit window resets, from ``x-sib-ratelimit-reset``.

    Brevo documents the value as the time remaining in the window's granularity
    unit, typically seconds. Returns ``None`` for a missing, negative or
    unparseable value.
    """
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The body as a JSON object, or ``None`` if it is not one."""
    try:
        parsed = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


class BrevoProvider:
    """Sends email through one Brevo account; see the module docstring for the wire format.

    ``api_key``: the account's v3 API key (secret; sent only as the ``api-key``
    header). ``sender_email`` / ``sender_name``: a sender registered in the
    Brevo account (the name is omitted when empty). ``base_url``: scheme + host
    (empty means the default), no trailing path. ``timeout_s``: seconds, applied
    by httpx to each of connect, write, read and pool wait.

    One ``httpx.AsyncClient`` (keep-alive connection pool) per instance,
    closed by :meth:`close`.
    """

    name = "brevo"

    def __init__(
        self,
        api_key: str,
        sender_email: str,
        sender_name: str = "",
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout_s: float = 15.0,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        if not sender_email:
            raise ValueError("sender_email is required")
        self._api_key = api_key
        self._sender_email = sender_email
        self._sender_name = sender_name
        self._base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            headers={"api-key": api_key, "accept": "application/json"},
        )

    def __repr__(self) -> str:
        return (
            f"BrevoProvider(sender_email={self._sender_email!r}, base_url={self._base_url!r}, "
            "api_key=<redacted>)"
        )

    def _scrub(self, text: str) -> str:
        """``text`` with the API key replaced."""
        return text.replace(self._api_key, "<redacted>")

    def request_body(self, event: events_pb2.DeliveryRequested) -> dict[str, Any]:
        """The JSON body of ``POST /v3/smtp/email`` for ``event`` (see the module docstring)."""
        sender: dict[str, str] = {"email": self._sender_email}
        if self._sender_name:
            sender["name"] = self._sender_name
        body: dict[str, Any] = {
            "sender": sender,
            "to": [{"email": event.recipient}],
            "subject": event.email.subject,
        }
        if event.email.text:
            body["textContent"] = event.email.text
        if event.email.html:
            body["htmlContent"] = event.email.html
        body["headers"] = {
            "X-Switchboard-Delivery-Id": event.delivery_id,
            "idempotencyKey": event.delivery_id,
        }
        return body

    async def send(self, event: events_pb2.DeliveryRequested) -> SendResult:
        """Send one email; returns Brevo's ``messageId`` as ``provider_message_id``.

        Raises ``PermanentDeliveryError`` or ``RetryableDeliveryError`` as in the
        module table (reasons never contain the API key).
        """
        if event.WhichOneof("content") != "email":
            raise PermanentDeliveryError("Brevo sends email only: the delivery has no email content")
        if not event.recipient:
            raise PermanentDeliveryError("empty recipient address")
        if not event.email.subject:
            raise PermanentDeliveryError("Brevo requires a subject")
        if not (event.email.text or event.email.html):
            raise PermanentDeliveryError("Brevo requires a text or HTML body")
        if self._client.is_closed:
            raise RetryableDeliveryError("Brevo client is closed (provider released); not sent")
        outcome = await self._post(self.request_body(event))
        if isinstance(outcome, DeliveryError):
            raise outcome  # created outside any except block: no __cause__/__context__ to leak
        return self._interpret(outcome, event.delivery_id)

    async def _post(self, body: dict[str, Any]) -> httpx.Response | DeliveryError:
        """POST the body; a transport failure is returned (not raised) as our error."""
        try:
            return await self._client.post(SEND_PATH, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return RetryableDeliveryError(f"Brevo unreachable, not sent: {type(exc).__name__}")
        except httpx.TimeoutException as exc:
            return RetryableDeliveryError(
                f"Brevo did not answer in time ({type(exc).__name__}); it may have accepted the "
                "email, the retry carries the same idempotency key"
            )
        except httpx.HTTPError as exc:
            return RetryableDeliveryError(
                f"Brevo connection failed ({type(exc).__name__}); it may have accepted the email, "
                "the retry carries the same idempotency key"
            )

    def _brevo_error(self, body: dict[str, Any] | None) -> tuple[str, str]:
        """Brevo's ``code`` and a quotable ``code: message`` text, scrubbed and truncated."""
        if body is None:
            return "", "(no JSON error body)"
        code = self._scrub(str(body.get("code", "")))[:100]
        message = self._scrub(str(body.get("message", "")))
        text = f"{code}: {message}" if code else message
        return code, (text.strip()[:_MAX_PROVIDER_TEXT] or "(empty error body)")

    def _interpret(self, response: httpx.Response, delivery_id: str) -> SendResult:
        status = response.status_code
        body = _json_object(response)
        if 200 <= status < 300:
            message_id = _message_id(body)
            if message_id:
                return SendResult(provider_message_id=self._scrub(message_id))
            raise RetryableDeliveryError(
                f"Brevo HTTP {status} without the documented messageId JSON; it may have accepted "
                "the email, the retry carries the same idempotency key"
            )
        code, quoted = self._brevo_error(body)
        if status == 400 and code == DUPLICATE_CODE:
            # The idempotency key was used within Brevo's TTL: the first request was accepted.
            return SendResult(provider_message_id=f"{DUPLICATE_MESSAGE_ID_PREFIX}{delivery_id}")
        if status == 429:
            waits = [
                w
                for w in (
                    parse_retry_after(response.headers.get("Retry-After")),
                    parse_ratelimit_reset(response.headers.get("x-sib-ratelimit-reset")),
                )
                if w is not None
            ]
            raise RetryableDeliveryError(
                f"Brevo HTTP 429 too many requests: {quoted}", retry_after_s=max(waits) if waits else None
            )
        if status >= 500:
            raise RetryableDeliveryError(
                f"Brevo HTTP {status} server error: {quoted}",
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status == 408:
            raise RetryableDeliveryError(f"Brevo HTTP 408 request timeout: {quoted}")
        meaning = _PERMANENT_MEANING.get(status, response.reason_phrase.lower() or "unexpected answer")
        raise PermanentDeliveryError(f"Brevo HTTP {status} {meaning}: {quoted}")

    async def close(self) -> None:
        """Close the HTTP client and its connections (idempotent)."""
        await self._client.aclose()


def _message_id(body: dict[str, Any] | None) -> str | None:
    """``messageId`` (201), or the first of ``messageIds`` (202 / message versions)."""
    if body is None:
        return None
    single = body.get("messageId")
    if isinstance(single, str) and single:
        return single
    many = body.get("messageIds")
    if isinstance(many, list) and many and isinstance(many[0], str) and many[0]:
        return many[0]
    return None
