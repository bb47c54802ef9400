"""SMS through Twilio Programmable Messaging (the Messages resource, API 2010-04-01).

Wire format (https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource)::

    POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json
    Authorization: Basic base64(AccountSid:AuthToken)
    Content-Type: application/x-www-form-urlencoded

    To=<E.164>&Body=<text>&From=<E.164 | alphanumeric id>  (or MessagingServiceSid=MG...)
    [&StatusCallback=<url>]

    201 Created  {"sid": "SM...", "status": "queued" | "accepted", ...}

``StatusCallback`` is sent when the provider has a status-callback URL: Twilio
then POSTs ``MessageSid``, ``MessageStatus`` and ``ErrorCode`` to it as the
message moves through queued/sent/delivered/undelivered/failed
(https://www.twilio.com/docs/messaging/guides/track-outbound-message-status).

Errors are JSON ``{"code": 21211, "message": ..., "more_info": ..., "status": 400}``
(https://www.twilio.com/docs/usage/twilios-response). Classification, with the
error dictionary pages https://www.twilio.com/docs/api/errors/<code>:

=========================  ===================================================  =========
code / HTTP                meaning                                              outcome
=========================  ===================================================  =========
21211                      invalid ``To`` number                                permanent
21614                      ``To`` is not a mobile number (landline)             permanent
21610                      recipient opted out (replied STOP)                   permanent
21408                      geo permission for the destination region disabled   permanent
21606, 21659               ``From`` not a message-capable Twilio number         permanent
20003 / HTTP 401           authentication failed (SID / auth token)             permanent
20429 / HTTP 429           too many requests; ``Retry-After`` honoured           retryable
HTTP 5xx                   Twilio error                                         retryable, ambiguous
other 4xx                  request refused                                      permanent
timeout / reset after      no answer for a request that was sent                retryable, ambiguous
sending, malformed 2xx
connect failure            the request never left                               retryable
=========================  ===================================================  =========

Per https://www.twilio.com/docs/api/errors/20429 a 429 answer was not
processed and is safe to retry. Delivery-stage errors such as 30003
(unreachable handset) never come from this call: they arrive later on the
status callback (``MessageStatus=undelivered``, ``ErrorCode=30003``).

**Duplicate window.** Creating a Message is not idempotent: the Messages API
takes no idempotency key, so Twilio cannot recognise a retry of the same
delivery. Whenever Twilio may have accepted the request but we did not get
its 201 (read timeout after the request was written, connection reset or
closed after sending, HTTP 5xx, a 2xx body without a ``sid``), the failure is
retryable and its reason starts with ``ambiguous:``; a retry of such a failure
can deliver the SMS twice. Failures before the request left (connection
refused, connect timeout, pool timeout), 429s and 4xx refusals cannot
duplicate. Together with the worker's own window (dying between Twilio's 201
and recording DELIVERED) this is the whole duplicate window; count
``ambiguous:`` attempt errors to measure it.

The auth token never appears in ``repr``, error text or exception chains:
errors are raised from fresh exceptions without cause or context and
provider text is scrubbed of it.
"""

from __future__ import annotations

import json
import re
from typing import Any

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
DEFAULT_BASE_URL = "https://api.twilio.com"
_E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
_MAX_PROVIDER_TEXT = 300

#: Twilio error codes that no retry can fix, with what they mean.
PERMANENT_CODES: dict[int, str] = {
    20003: "authentication failed: check the Account SID and auth token",
    21211: "invalid 'To' phone number",
    21408: "permission to send to this region is not enabled (Messaging Geo Permissions)",
    21606: "'From' is not a message-capable Twilio number for this destination/account",
    21610: "the recipient has opted out (replied STOP)",
    21614: "'To' is not a mobile number",
    21659: "'From' is not a Twilio phone number, or short code country mismatch",
}
#: Twilio error codes that say "not processed, try later".
RETRYABLE_CODES: dict[int, str] = {
    20429: "too many requests",
}


def is_ambiguous(error: DeliveryError) -> bool:
    """Whether ``error`` is a failure after which the SMS may have been sent."""
    return error.reason.startswith(AMBIGUOUS_PREFIX)


class TwilioProvider:
    """Sends SMS from one Twilio account; see the module docstring for wire format and errors.

    ``account_sid``: ``AC`` + 32 hex (basic-auth user and path segment).
    ``auth_token``: the secret (basic-auth password). Exactly one of
    ``from_number`` (E.164 or alphanumeric sender id) and
    ``messaging_service_sid`` (``MG`` + 32 hex) is normally set; at least one
    is required. ``status_callback_url``: sent as ``StatusCallback`` when set.
    ``timeout_s``: seconds, applied by httpx to each of connect, write, read
    and pool wait. Raises ``ValueError`` for a missing SID, token or sender.
    """

    name = "twilio"

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        from_number: str = "",
        messaging_service_sid: str = "",
        base_url: str = DEFAULT_BASE_URL,
        status_callback_url: str | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        if not account_sid:
            raise ValueError("account_sid is required")
        if not auth_token:
            raise ValueError("auth_token is required")
        if not from_number and not messaging_service_sid:
            raise ValueError("set from_number or messaging_service_sid")
        self._account_sid = account_sid
        self._auth_token = auth_token
        self._from_number = from_number
        self._messaging_service_sid = messaging_service_sid
        self._status_callback_url = status_callback_url or None
        self._base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._path = f"/2010-04-01/Accounts/{account_sid}/Messages.json"
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            auth=httpx.BasicAuth(account_sid, auth_token),
            timeout=httpx.Timeout(timeout_s),
            headers={"Accept": "application/json"},
        )

    def __repr__(self) -> str:
        sender = (
            f"messaging_service_sid={self._messaging_service_sid!r}"
            if self._messaging_service_sid
            else f"from_number={self._from_number!r}"
        )
        return (
            f"TwilioProvider(account_sid={self._account_sid!r}, {sender}, "
            f"base_url={self._base_url!r}, auth_token=<redacted>)"
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._auth_token, "<redacted>")[:_MAX_PROVIDER_TEXT]

    def form_for(self, event: events_pb2.DeliveryRequested) -> dict[str, str]:
        """The form fields of the create-Message request for ``event``."""
        form = {"To": event.recipient, "Body": event.sms.text}
        if self._from_number:
            form["From"] = self._from_number
        if self._messaging_service_sid:
            form["MessagingServiceSid"] = self._messaging_service_sid
        if self._status_callback_url:
            form["StatusCallback"] = self._status_callback_url
        return form

    async def send(self, event: events_pb2.DeliveryRequested) -> SendResult:
        """Create one outbound Message; returns its ``SM...`` sid as ``provider_message_id``.

        Raises ``PermanentDeliveryError`` / ``RetryableDeliveryError`` per the
        module table; reasons of possibly-sent failures start with ``ambiguous:``.
        """
        if event.WhichOneof("content") != "sms":
            raise PermanentDeliveryError("Twilio sends SMS only: the delivery has no SMS content")
        if not _E164_RE.match(event.recipient):
            raise PermanentDeliveryError("invalid recipient: not an E.164 phone number")
        if not event.sms.text:
            raise PermanentDeliveryError("empty SMS text")
        if self._client.is_closed:
            raise RetryableDeliveryError("Twilio client is closed (provider released); not sent")
        outcome = await self._post(self.form_for(event))
        if isinstance(outcome, DeliveryError):
            raise outcome  # created outside any except block: no __cause__/__context__ chain
        return self._interpret(outcome)

    async def _post(self, form: dict[str, str]) -> httpx.Response | DeliveryError:
        """POST the form; a transport failure is returned (not raised) as our error."""
        try:
            return await self._client.post(self._path, data=form)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return RetryableDeliveryError(f"Twilio unreachable, not sent: {type(exc).__name__}")
        except httpx.TimeoutException as exc:
            return RetryableDeliveryError(
                f"{AMBIGUOUS_PREFIX} Twilio did not answer in time ({type(exc).__name__}); "
                "the SMS may have been sent"
            )
        except httpx.HTTPError as exc:
            return RetryableDeliveryError(
                f"{AMBIGUOUS_PREFIX} Twilio connection failed after sending "
                f"({type(exc).__name__}); the SMS may have been sent"
            )

    def _interpret(self, response: httpx.Response) -> SendResult:
        status = response.status_code
        body = _json_object(response)
        if 200 <= status < 300:
            sid = body.get("sid") if body is not None else None
            if isinstance(sid, str) and sid:
                return SendResult(provider_message_id=sid)
            raise RetryableDeliveryError(
                f"{AMBIGUOUS_PREFIX} Twilio HTTP {status} without a message sid; the SMS may have been sent"
            )
        code = _int_or_none(body.get("code")) if body is not None else None
        message = self._scrub(str(body.get("message") or "")) if body is not None else ""
        detail = f"Twilio {code if code is not None else 'error'} (HTTP {status})"
        if message:
            detail += f": {message}"
        if code is not None:
            detail += f" https://www.twilio.com/docs/errors/{code}"
        retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
        if status == 429 or code in RETRYABLE_CODES:
            raise RetryableDeliveryError(detail, retry_after_s=retry_after_s)
        if status >= 500:
            raise RetryableDeliveryError(
                f"{AMBIGUOUS_PREFIX} {detail}; the SMS may have been sent", retry_after_s=retry_after_s
            )
        if code in PERMANENT_CODES:
            raise PermanentDeliveryError(f"{detail} [{PERMANENT_CODES[code]}]")
        if status == 401:
            raise PermanentDeliveryError(f"{detail} [{PERMANENT_CODES[20003]}]")
        raise PermanentDeliveryError(detail)

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


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
