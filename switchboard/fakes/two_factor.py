"""A fake 2Factor transactional SMS endpoint on loopback (see channels/two_factor.py).

``POST /API/V1/{api_key}/ADDON_SERVICES/SEND/TSMS`` with a form body
``From``/``To``/``Msg`` (https://documenter.getpostman.com/view/301893/TWDamFGh,
https://2factor.in/API/DOCS/ADDON_SRV_SEND_TSMS.html). Like 2Factor, it answers
every provider-level outcome with HTTP 200 and a ``Status`` JSON:

- ``{"Status": "Success", "Details": "<id>"}`` for an accepted SMS (recorded);
- ``{"Status": "Error", "Details": "..."}`` for a wrong API key, a sender id
  that is not the 6-character registered one, a ``To`` that is not an
  international number without ``+`` (country code + subscriber number,
  8-15 digits), an empty or over-long ``Msg``, or a body that is not a form.

The ``Details`` wording of refusals is this fake's own (2Factor documents no
fixed list). Besides the base faults, :meth:`FakeTwoFactor.error` builds an
injectable HTTP-200 ``Status: Error`` answer with any ``Details``.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid

from aiohttp import web

from switchboard.fakes.http import LOST_RESPONSE, FakeProviderServer, Fault

SEND_PATH = "/API/V1/{api_key}/ADDON_SERVICES/SEND/TSMS"
MAX_MSG_CHARS = 1600
_TO_RE = re.compile(r"^[1-9][0-9]{7,14}$")
_SENDER_RE = re.compile(r"^[A-Za-z0-9]{6}$")


def _status(status: str, details: str) -> web.Response:
    return web.json_response({"Status": status, "Details": details})


class FakeTwoFactor(FakeProviderServer):
    """2Factor's TSMS endpoint for one account (``api_key``) and optional sender ids.

    ``sender_ids``: the registered sender ids accepted as ``From``; empty
    means any 6-character alphanumeric id. ``received`` holds accepted
    requests (``body`` is the form as a dict); ``message_ids`` the ids issued.
    """

    def __init__(
        self,
        api_key: str,
        *,
        sender_ids: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host, port)
        self.api_key = api_key
        self.sender_ids = sender_ids
        self.message_ids: list[str] = []

    @staticmethod
    def error(details: str) -> Fault:
        """A fault answering HTTP 200 ``{"Status": "Error", "Details": details}``, as 2Factor does."""
        return Fault.http_status(200, body=json.dumps({"Status": "Error", "Details": details}))

    def routes(self, app: web.Application) -> None:
        """Register the TSMS send endpoint (POST only)."""
        app.router.add_post(SEND_PATH, self._send)

    async def _send(self, request: web.Request) -> web.StreamResponse:
        # Read the whole body first, as a real server would before working on it: a slow
        # fault then still processes a request whose client has given up.
        form = {key: str(value) for key, value in (await request.post()).items()}
        faulted = await self.apply_faults(request)
        if faulted is not None:
            return faulted
        if not hmac.compare_digest(request.match_info["api_key"].encode(), self.api_key.encode()):
            return _status("Error", "Invalid API Key - No Account Exists")
        if request.content_type != "application/x-www-form-urlencoded":
            return _status("Error", "Invalid request: expected an application/x-www-form-urlencoded body")
        sender = form.get("From", "")
        if not _SENDER_RE.match(sender) or (self.sender_ids and sender not in self.sender_ids):
            return _status("Error", "Invalid Sender Id - not approved for this account")
        if not _TO_RE.match(form.get("To", "")):
            return _status("Error", "Invalid Phone Number - expected country code and number, digits only")
        text = form.get("Msg", "")
        if not text.strip():
            return _status("Error", "Missing parameter Msg")
        if len(text) > MAX_MSG_CHARS:
            return _status("Error", f"Msg exceeds {MAX_MSG_CHARS} characters")
        message_id = str(uuid.uuid4())
        self.message_ids.append(message_id)
        self.record(request, form)
        if request.get(LOST_RESPONSE):
            self.drop_connection(request)
        return _status("Success", message_id)
