"""A fake Twilio Messages endpoint on loopback (see channels/twilio.py).

``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` with HTTP basic auth
(Account SID, auth token) and a form body, as in
https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource.
Checks, each answered with Twilio's error JSON ``{"code", "message",
"more_info", "status"}`` (https://www.twilio.com/docs/usage/twilios-response):

- credentials missing or wrong, or a path SID other than the account's: 401 / 20003;
- not a form body: 400 / 21600 (this fake's choice);
- ``To`` missing: 400 / 21604; not E.164: 400 / 21211;
- ``Body`` missing or empty: 400 / 21602; over 1600 characters: 400 / 21617;
- neither ``From`` nor ``MessagingServiceSid``: 400 / 21603; ``From`` neither
  E.164 nor an alphanumeric sender id: 400 / 21212; a ``MessagingServiceSid``
  that is not ``MG`` + 32 hex: 400 / 21701;
- ``StatusCallback`` that is not an http(s) URL: 400 / 21609.

An accepted request is recorded and answered ``201`` with a Message resource
(``sid`` ``SM`` + 32 hex, ``status`` ``queued``, or ``accepted`` when sent
through a Messaging Service). :meth:`FakeTwilio.error` builds an injectable
error answer with any code and HTTP status (plus headers such as
``Retry-After``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import uuid
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from switchboard.fakes.http import LOST_RESPONSE, FakeProviderServer, Fault

MESSAGES_PATH = "/2010-04-01/Accounts/{account_sid}/Messages.json"
MAX_BODY_CHARS = 1600
_E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
_ALPHANUMERIC_SENDER_RE = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
_SERVICE_SID_RE = re.compile(r"^MG[0-9a-fA-F]{32}$")


def error_body(code: int, message: str, status: int) -> dict[str, Any]:
    """Twilio's REST error representation."""
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response(error_body(code, message, status), status=status)


class FakeTwilio(FakeProviderServer):
    """Twilio's create-Message endpoint for one account.

    ``received`` holds accepted requests (``body`` is the form as a dict);
    ``messages`` the Message resources returned, in order.
    """

    def __init__(self, account_sid: str, auth_token: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.messages: list[dict[str, Any]] = []

    @staticmethod
    def error(
        code: int, status: int = 400, message: str = "", headers: dict[str, str] | None = None
    ) -> Fault:
        """A fault answering ``status`` with Twilio's error JSON for ``code``."""
        body = error_body(code, message or f"injected Twilio error {code}", status)
        return Fault.http_status(status, body=json.dumps(body), headers=headers)

    def routes(self, app: web.Application) -> None:
        """Register the create-Message endpoint (POST only)."""
        app.router.add_post(MESSAGES_PATH, self._create_message)

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return (
            hmac.compare_digest(user.encode(), self.account_sid.encode())
            and hmac.compare_digest(password.encode(), self.auth_token.encode())
            and request.match_info["account_sid"] == self.account_sid
        )

    async def _create_message(self, request: web.Request) -> web.StreamResponse:
        # Read the whole body first, as a real server would before working on it: a slow
        # fault then still processes a request whose client has given up.
        form = {key: str(value) for key, value in (await request.post()).items()}
        faulted = await self.apply_faults(request)
        if faulted is not None:
            return faulted
        if not self._authorized(request):
            return _error(401, 20003, "Authenticate")
        if request.content_type != "application/x-www-form-urlencoded":
            return _error(400, 21600, "Expected an application/x-www-form-urlencoded body")
        refusal = self._check(form)
        if refusal is not None:
            return refusal
        message = self._message_resource(form)
        self.messages.append(message)
        self.record(request, form)
        if request.get(LOST_RESPONSE):
            self.drop_connection(request)
        return web.json_response(message, status=201)

    @staticmethod
    def _check(form: dict[str, str]) -> web.Response | None:
        to = form.get("To", "")
        if not to:
            return _error(400, 21604, "A 'To' phone number is required.")
        if not _E164_RE.match(to):
            return _error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        body = form.get("Body", "")
        if not body.strip():
            return _error(400, 21602, "Message body is required.")
        if len(body) > MAX_BODY_CHARS:
            return _error(400, 21617, f"The concatenated message body exceeds the {MAX_BODY_CHARS} limit")
        sender, service = form.get("From", ""), form.get("MessagingServiceSid", "")
        if not sender and not service:
            return _error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required")
        if sender and not (_E164_RE.match(sender) or _ALPHANUMERIC_SENDER_RE.match(sender)):
            return _error(400, 21212, f"Invalid From Number: {sender}")
        if service and not _SERVICE_SID_RE.match(service):
            return _error(400, 21701, f"The Messaging Service Sid {service} is invalid.")
        callback = form.get("StatusCallback")
        if callback is not None:
            parts = urlsplit(callback)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return _error(400, 21609, "Invalid 'StatusCallback'")
        return None

    def _message_resource(self, form: dict[str, str]) -> dict[str, Any]:
        sid = "SM" + uuid.uuid4().hex
        now = formatdate(usegmt=True)
        service = form.get("MessagingServiceSid") or None
        return {
            "sid": sid,
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": form["Body"],
            "date_created": now,
            "date_updated": now,
            "date_sent": None,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form.get("From") or None,
            "messaging_service_sid": service,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "status": "accepted" if service and not form.get("From") else "queued",
            "to": form["To"],
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }
