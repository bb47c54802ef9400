"""A fake Brevo transactional email API (``POST /v3/smtp/email``) on loopback.

It checks the documented wire format and answers like Brevo
(https://developers.brevo.com/reference/sendtransacemail,
https://developers.brevo.com/docs/how-it-works): errors are JSON
``{"code": ..., "message": ...}``.

In order, for each request:

1. injected faults (:meth:`FakeProviderServer.apply_faults`): 5xx, 429, slow,
   reset, malformed, lost_response; :meth:`FakeBrevo.rate_limited` builds a 429
   with Brevo's ``x-sib-ratelimit-limit`` / ``-remaining`` / ``-reset`` headers
   (https://developers.brevo.com/docs/limit-headers);
2. ``api-key`` header equal to the configured key, else 401
   ``{"code": "unauthorized", "message": "Key not found"}``;
3. ``content-type: application/json`` and a JSON object body, else 400
   ``bad_request`` (Brevo's exact answer here is undocumented; this is ours);
4. ``credits_exhausted`` set: 402 ``not_enough_credits``;
5. required fields: ``sender.email`` (or ``sender.id``), ``to[].email``,
   ``subject``, and ``textContent`` or ``htmlContent``, else 400
   ``missing_parameter`` (the body message is Brevo's observed one, see
   https://github.com/getbrevo/brevo-ruby/issues/8);
6. idempotency: Brevo documents ``headers.idempotencyKey``
   (https://developers.brevo.com/docs/heterogenous-versions-batch-emails): a key
   seen within the TTL (30 minutes) is refused with 400 ``duplicate_parameter``
   and nothing is sent. The reference page's example spells the header
   ``Idempotency-Key``; both spellings are honoured here;
7. accepted: recorded in ``received``, answered 201
   ``{"messageId": "<...@smtp-relay.mailin.fr>"}``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from typing import Any

from aiohttp import web

from switchboard.fakes.http import LOST_RESPONSE, FakeProviderServer, Fault

SEND_PATH = "/v3/smtp/email"
#: Brevo's documented idempotency key lifetime (seconds).
IDEMPOTENCY_TTL_S = 30 * 60.0
_IDEMPOTENCY_HEADERS = ("idempotencyKey", "Idempotency-Key")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


class FakeBrevo(FakeProviderServer):
    """Brevo's ``POST /v3/smtp/email`` for one account with API key ``api_key``.

    ``credits_exhausted``: answer 402 until cleared. ``message_ids``: the ids
    handed out, in order (``received[i]`` got ``message_ids[i]``).
    ``duplicates_refused``: requests refused for a reused idempotency key.
    """

    def __init__(
        self,
        api_key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        idempotency_ttl_s: float = IDEMPOTENCY_TTL_S,
    ) -> None:
        super().__init__(host, port)
        self.api_key = api_key
        self.credits_exhausted = False
        self.idempotency_ttl_s = idempotency_ttl_s
        self.message_ids: list[str] = []
        self.duplicates_refused = 0
        self._keys_seen: dict[str, float] = {}  # idempotency key -> monotonic expiry
        self._serial = itertools.count(1)

    @staticmethod
    def rate_limited(
        reset_s: int = 1, *, limit: int = 1000, retry_after_s: int | None = None, body: str = ""
    ) -> Fault:
        """A 429 fault with Brevo's rate-limit headers (``x-sib-ratelimit-remaining: 0``).

        ``reset_s``: seconds until the window resets (``x-sib-ratelimit-reset``).
        ``retry_after_s``: also send ``Retry-After`` (Brevo documents only the
        ``x-sib-*`` headers; proxies in front of it may add ``Retry-After``).
        """
        headers = {
            "x-sib-ratelimit-limit": str(limit),
            "x-sib-ratelimit-remaining": "0",
            "x-sib-ratelimit-reset": str(reset_s),
        }
        text = body or json.dumps({"code": "too_many_requests", "message": "Too many requests"})
        if retry_after_s is not None:
            return dataclasses.replace(Fault.rate_limited(retry_after_s, headers=headers), body=text)
        return Fault.http_status(429, text, headers)

    def routes(self, app: web.Application) -> None:
        """``POST /v3/smtp/email``."""
        app.router.add_post(SEND_PATH, self._send_transac_email)

    def _next_message_id(self) -> str:
        stamp = time.strftime("%Y%m%d%H%M", time.gmtime())
        return f"<{stamp}.{next(self._serial):011d}@smtp-relay.mailin.fr>"

    @staticmethod
    def _missing_fields(body: dict[str, Any]) -> list[str]:
        missing: list[str] = []
        sender = body.get("sender")
        if not isinstance(sender, dict) or not (sender.get("email") or sender.get("id")):
            missing.append("sender.email")
        to = body.get("to")
        if (
            not isinstance(to, list)
            or not to
            or not all(isinstance(r, dict) and isinstance(r.get("email"), str) and r["email"] for r in to)
        ):
            missing.append("to[].email")
        if not isinstance(body.get("subject"), str) or not body["subject"]:
            missing.append("subject")
        if not (body.get("textContent") or body.get("htmlContent")):
            missing.append("textContent/htmlContent")
        return missing

    def _idempotency_key(self, body: dict[str, Any]) -> str | None:
        headers = body.get("headers")
        if not isinstance(headers, dict):
            return None
        for name in _IDEMPOTENCY_HEADERS:
            value = headers.get(name)
            if isinstance(value, str) and value:
                return value
        return None

    def _key_is_fresh(self, key: str) -> bool:
        """Remember ``key``; ``False`` if it was seen within the TTL."""
        now = time.monotonic()
        expiry = self._keys_seen.get(key)
        if expiry is not None and expiry > now:
            return False
        self._keys_seen[key] = now + self.idempotency_ttl_s
        return True

    async def _send_transac_email(self, request: web.Request) -> web.StreamResponse:
        faulted = await self.apply_faults(request)
        if faulted is not None:
            return faulted
        if request.headers.get("api-key") != self.api_key:
            return _error(401, "unauthorized", "Key not found")
        if request.content_type != "application/json":
            return _error(400, "bad_request", "Content-Type must be application/json")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return _error(400, "bad_request", "Input must be a valid JSON object")
        if not isinstance(body, dict):
            return _error(400, "bad_request", "Input must be a valid JSON object")
        if self.credits_exhausted:
            return _error(402, "not_enough_credits", "Not enough credits to send the email")
        missing = self._missing_fields(body)
        if missing == ["textContent/htmlContent"]:
            return _error(400, "missing_parameter", "Either of htmlContent or textContent is required")
        if missing:
            return _error(400, "missing_parameter", f"{missing[0]} is missing")
        key = self._idempotency_key(body)
        if key is not None and not self._key_is_fresh(key):
            self.duplicates_refused += 1
            return _error(400, "duplicate_parameter", "idempotencyKey has already been used")
        message_id = self._next_message_id()
        self.record(request, body)
        self.message_ids.append(message_id)
        if request.get(LOST_RESPONSE):
            self.drop_connection(request)
            return web.Response(status=500)  # never reaches the client
        return web.json_response({"messageId": message_id}, status=201)
