"""A fake Firebase Cloud Messaging (HTTP v1) with its Google OAuth2 token endpoint, on loopback.

One aiohttp server (:class:`FakeFcm`, built on :class:`~switchboard.fakes.http.FakeProviderServer`)
answers the two calls ``firebase_admin`` makes for a push, so the SDK runs unmodified
apart from its FCM endpoint base (``channels/fcm.py``):

``POST /token``
    The OAuth 2.0 JWT-bearer grant (RFC 7523) that google-auth sends for a service
    account (https://developers.google.com/identity/protocols/oauth2/service-account#httprest):
    form ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>``. The
    assertion must be RS256-signed by a key registered with :meth:`FakeFcm.register_service_account`
    (``kid`` = ``private_key_id``), ``iss`` = that account's ``client_email``, ``aud`` =
    ``https://oauth2.googleapis.com/token`` (google-auth uses it whatever ``token_uri`` says),
    ``iat <= now < exp``. Answer: ``{"access_token": "...", "expires_in": 3600, "token_type":
    "Bearer"}``; refusals are 400 ``{"error": "unsupported_grant_type" | "invalid_grant",
    "error_description": "..."}`` as RFC 6749 section 5.2 says.

``POST /v1/projects/{project_id}/messages:send``
    https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send with
    ``Authorization: Bearer <a token this fake issued>``, for an account of that project
    and with the ``cloud-platform`` or ``firebase.messaging`` scope. Body ``{"message":
    Message, "validate_only"?: bool}`` where Message
    (https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages) has exactly
    one target (``token``, ``fid``, ``topic`` or ``condition``), ``data`` a string->string map
    without FCM-reserved keys (``from``, ``message_type``, ``google.*``, ``gcm.*``),
    ``notification`` ``{title?, body?, image?}`` and at most 4096 bytes of payload.
    Answer: ``{"name": "projects/<project>/messages/<id>"}``.

Errors use the google.rpc.Status JSON of the HTTP v1 API
(https://firebase.google.com/docs/cloud-messaging/error-codes), e.g. for an unregistered token::

    HTTP 404
    {"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
               "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": "UNREGISTERED"}]}}

Per-token scripted errors (:meth:`FakeFcm.fail_token`) answer every send to that token with
one of the ErrorCode values (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode),
HTTP statuses as documented there; the base faults (``inject``) apply to the next send
requests (never to ``/token``), and a status fault without a body gets a google.rpc.Status body.

firebase-admin's own auth flow (``_http_client.GoogleAuthCredentialFlow``) refreshes the access
token synchronously on the calling thread after a 401: a client doing that on the same event loop
as this fake would deadlock. Switchboard's FCM provider refreshes in a worker thread
(``tenants.firebase_apps.OffLoopCredentialFlow``); tests still run the fake on its own loop with
:func:`serving_in_thread`, so a regression shows up as a measured stall instead of a hang.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from switchboard.fakes.http import LOST_RESPONSE, FakeProviderServer, Received

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: The audience google-auth puts in every service-account grant (google/oauth2/service_account.py).
GRANT_AUDIENCE = "https://oauth2.googleapis.com/token"
#: Scopes that allow ``messages:send`` (https://firebase.google.com/docs/cloud-messaging/auth-server).
FCM_SCOPES = frozenset(
    {"https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform"}
)
ACCESS_TOKEN_LIFETIME_S = 3600
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
MAX_PAYLOAD_BYTES = 4096
_MESSAGE_FIELDS = frozenset(
    {"name", "data", "notification", "android", "webpush", "apns", "fcm_options", "fcmOptions"}
)
_TARGETS = ("token", "fid", "topic", "condition")
_NOTIFICATION_FIELDS = frozenset({"title", "body", "image"})
_RESERVED_DATA_KEYS = frozenset({"from", "message_type"})
_RESERVED_DATA_PREFIXES = ("google.", "gcm.")

#: ErrorCode -> (HTTP status, google.rpc canonical status, message), per
#: https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode.
FCM_ERRORS: dict[str, tuple[int, str, str]] = {
    "UNSPECIFIED_ERROR": (500, "UNKNOWN", "No more information is available about this error."),
    "INVALID_ARGUMENT": (
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
    ),
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Sending limit exceeded for the message target."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
}
_CANONICAL_BY_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_S = TypeVar("_S", bound=FakeProviderServer)


@dataclass(frozen=True)
class ScriptedError:
    """What every send to one registration token answers: an FCM ``error_code`` (a key of
    :data:`FCM_ERRORS`, or any other string: then ``http_status``/``canonical`` say how), with a
    ``Retry-After`` header of ``retry_after_s`` seconds if set."""

    error_code: str
    retry_after_s: int | None = None
    http_status: int | None = None
    canonical: str | None = None


@dataclass(frozen=True)
class IssuedToken:
    """An access token this fake handed out: for which account and project, with which scopes."""

    client_email: str
    project_id: str
    scopes: frozenset[str]
    expires_at: float


@dataclass
class _Account:
    client_email: str
    project_id: str
    public_pem: bytes


@dataclass
class TokenGrant:
    """One accepted JWT-bearer grant: the decoded claims and the access token issued for it."""

    claims: dict[str, Any]
    access_token: str


def google_error(
    http_status: int,
    message: str,
    canonical: str | None = None,
    *,
    fcm_error_code: str | None = None,
    field_violations: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """A google.rpc.Status error body as the FCM HTTP v1 API sends it.

    ``{"error": {"code": <http status>, "message": ..., "status": <canonical>, "details": [
    {"@type": FcmError, "errorCode": ...}?, {"@type": BadRequest, "fieldViolations":
    [{"field", "description"}, ...]}?]}}`` (``details`` only when one of them is given).
    """
    error: dict[str, Any] = {
        "code": http_status,
        "message": message,
        "status": canonical or _CANONICAL_BY_STATUS.get(http_status, "UNKNOWN"),
    }
    details: list[dict[str, Any]] = []
    if fcm_error_code is not None:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": fcm_error_code})
    if field_violations:
        details.append(
            {
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{"field": f, "description": d} for f, d in field_violations],
            }
        )
    if details:
        error["details"] = details
    return {"error": error}


def make_service_account(token_uri: str, project_id: str) -> dict[str, Any]:
    """A service-account key file (the JSON the Firebase console downloads) with a fresh RSA key.

    Shape: ``{"type": "service_account", "project_id", "private_key_id" (32 hex), "private_key"
    (PKCS#8 PEM, 2048-bit RSA), "client_email" ("firebase-adminsdk-<x>@<project>.iam.gserviceaccount.com"),
    "client_id", "auth_uri", "token_uri"}``. A :class:`FakeFcm` accepts its grants once
    :meth:`FakeFcm.register_service_account` has seen it (or use :meth:`FakeFcm.service_account`).
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    suffix = uuid.uuid4().hex[:5]
    return {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": uuid.uuid4().hex,
        "private_key": private_pem.decode(),
        "client_email": f"firebase-adminsdk-{suffix}@{project_id}.iam.gserviceaccount.com",
        "client_id": str(uuid.uuid4().int % 10**21),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_grant(assertion: str, public_keys: dict[str, bytes]) -> dict[str, Any]:
    """The claims of a service account's RS256 JWT grant, after checking signature, audience and expiry.

    ``public_keys`` maps ``private_key_id`` (the JWT header's ``kid``) to the public key PEM.
    Raises ``InvalidSignature``, ``KeyError`` (unknown key id) or ``ValueError`` (malformed JWT,
    other algorithm, wrong audience, outside ``iat``..``exp`` with 60 s leeway).
    """
    try:
        header_b64, claims_b64, signature_b64 = assertion.split(".")
        header = json.loads(_b64decode(header_b64))
        claims: dict[str, Any] = json.loads(_b64decode(claims_b64))
        signature = _b64decode(signature_b64)
    except (ValueError, TypeError) as error:
        raise ValueError(f"not a JWT: {error}") from None
    if not isinstance(header, dict) or header.get("alg") != "RS256":
        raise ValueError(f"unexpected alg {header.get('alg') if isinstance(header, dict) else None!r}")
    public_key = serialization.load_pem_public_key(public_keys[header["kid"]])
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("not an RSA key")
    public_key.verify(signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    if claims.get("aud") != GRANT_AUDIENCE:
        raise ValueError(f"wrong audience {claims.get('aud')!r}")
    if not claims["iat"] <= time.time() + 60 < claims["exp"] + 60:
        raise ValueError("grant outside its validity window")
    return claims


class FakeFcm(FakeProviderServer):
    """FCM HTTP v1 ``messages:send`` and the OAuth2 token endpoint, on one loopback server.

    State (read it from tests; every list is in arrival order):

    - ``grants``: accepted token grants (:class:`TokenGrant`); ``issued``: access token ->
      :class:`IssuedToken`;
    - ``attempts``: every send request that reached the handler, answered or not;
    - ``received`` (base): sends that were accepted, body = the parsed request JSON;
    - ``requests_seen`` (base): send requests, including those a fault answered.

    ``token_delay_s`` delays every token answer (without blocking this server's loop);
    ``grant_error`` (e.g. ``"invalid_grant"``) makes ``/token`` refuse every grant.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token_delay_s: float = 0.0) -> None:
        super().__init__(host, port)
        self.token_delay_s = token_delay_s
        self.grant_error: str | None = None
        self.grants: list[TokenGrant] = []
        self.issued: dict[str, IssuedToken] = {}
        self.attempts: list[Received] = []
        self.scripted: dict[str, ScriptedError] = {}
        self._accounts: dict[str, _Account] = {}  # private_key_id -> account
        self._ids = itertools.count(1)

    # -- set-up ---------------------------------------------------------------------

    @property
    def token_url(self) -> str:
        """``http://127.0.0.1:<port>/token``: the ``token_uri`` for service accounts."""
        return f"{self.base_url}/token"

    def register_service_account(self, service_account: dict[str, Any]) -> None:
        """Accept grants signed by ``service_account``'s key for its ``client_email`` and ``project_id``."""
        private_key = serialization.load_pem_private_key(service_account["private_key"].encode(), None)
        public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._accounts[service_account["private_key_id"]] = _Account(
            client_email=service_account["client_email"],
            project_id=service_account["project_id"],
            public_pem=public_pem,
        )

    def service_account(self, project_id: str) -> dict[str, Any]:
        """:func:`make_service_account` for this fake's ``/token``, registered."""
        account = make_service_account(self.token_url, project_id)
        self.register_service_account(account)
        return account

    def fail_token(
        self,
        token: str,
        error_code: str,
        *,
        retry_after_s: int | None = None,
        http_status: int | None = None,
        canonical: str | None = None,
    ) -> None:
        """Answer every later send to ``token`` with ``error_code`` (see :class:`ScriptedError`)."""
        self.scripted[token] = ScriptedError(error_code, retry_after_s, http_status, canonical)

    def clear(self) -> None:
        """Forget scripted errors, queued faults and ``grant_error`` (not the record of requests)."""
        self.scripted.clear()
        self.faults.clear()
        self.grant_error = None

    def sends_to(self, token: str) -> list[Received]:
        """Send requests (``attempts``) addressed to ``token``."""
        return [
            r
            for r in self.attempts
            if isinstance(r.body, dict)
            and isinstance(r.body.get("message"), dict)
            and r.body["message"].get("token") == token
        ]

    # -- server ---------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        """``POST /token`` and ``POST /v1/projects/{project_id}/messages:send``."""
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project_id}/messages:send", self._send)

    async def apply_faults(self, request: web.Request) -> web.StreamResponse | None:
        """The base faults; a status fault without a body answers a google.rpc.Status body."""
        if self.faults and self.faults[0].kind == "status" and not self.faults[0].body:
            fault = self.faults.popleft()
            body = google_error(fault.status, f"injected {fault.status}")
            self.faults.appendleft(replace(fault, body=json.dumps(body)))
        return await super().apply_faults(request)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            return _oauth_error("unsupported_grant_type", "only the JWT bearer grant is supported")
        assertion = form.get("assertion")
        if not isinstance(assertion, str):
            return _oauth_error("invalid_request", "assertion is required")
        public_keys = {kid: account.public_pem for kid, account in self._accounts.items()}
        try:
            claims = verify_grant(assertion, public_keys)
            kid = json.loads(_b64decode(assertion.split(".")[0]))["kid"]
        except KeyError as error:  # unknown key id, or a claim missing
            return _oauth_error("invalid_grant", f"Invalid JWT: unknown key or missing claim {error}")
        except (ValueError, InvalidSignature) as error:
            return _oauth_error("invalid_grant", f"Invalid JWT: {error or 'bad signature'}")
        account = self._accounts[kid]
        if claims.get("iss") != account.client_email:
            return _oauth_error("invalid_grant", "Invalid JWT: iss is not the key's service account")
        if self.grant_error is not None:
            return _oauth_error(self.grant_error, "refused by the test")
        if self.token_delay_s:
            await asyncio.sleep(self.token_delay_s)
        access_token = f"ya29.fake-{next(self._ids)}-{uuid.uuid4().hex}"
        self.issued[access_token] = IssuedToken(
            client_email=account.client_email,
            project_id=account.project_id,
            scopes=frozenset(str(claims.get("scope", "")).split()),
            expires_at=time.time() + ACCESS_TOKEN_LIFETIME_S,
        )
        self.grants.append(TokenGrant(claims=claims, access_token=access_token))
        return web.json_response(
            {"access_token": access_token, "expires_in": ACCESS_TOKEN_LIFETIME_S, "token_type": "Bearer"}
        )

    async def _send(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.attempts.append(
            Received(method=request.method, path=request.path, headers=dict(request.headers), body=body)
        )
        fault_response = await self.apply_faults(request)
        if fault_response is not None:
            return fault_response
        project_id = request.match_info["project_id"]

        denied = self._check_auth(request.headers.get("Authorization", ""), project_id)
        if denied is not None:
            return denied
        if body is None:
            return _error(400, "Invalid JSON payload received.", field_violations=[("", "not JSON")])
        invalid = _check_send_body(body)
        if invalid is not None:
            return invalid
        message: dict[str, Any] = body["message"]
        scripted = self.scripted.get(message.get("token") or message.get("fid") or "")
        if scripted is not None:
            return _scripted_response(scripted)

        name = f"projects/{project_id}/messages/{next(self._ids)}:{uuid.uuid4().hex[:16]}"
        if body.get("validate_only"):
            return web.json_response({"name": f"projects/{project_id}/messages/fake_message_id"})
        self.record(request, body)
        if request.get(LOST_RESPONSE):
            self.drop_connection(request)
        return web.json_response({"name": name})

    def _check_auth(self, authorization: str, project_id: str) -> web.Response | None:
        scheme, _, access_token = authorization.partition(" ")
        issued = self.issued.get(access_token) if scheme.lower() == "bearer" else None
        if issued is None or issued.expires_at <= time.time():
            return _error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
            )
        if not issued.scopes & FCM_SCOPES:
            return _error(403, "Request had insufficient authentication scopes.")
        if issued.project_id != project_id:
            return _error(
                403,
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project_id}' (or it may not exist).",
            )
        return None


def _check_send_body(body: Any) -> web.Response | None:
    """``None`` if ``body`` is a valid ``messages:send`` request, else the FCM 400 answer."""
    if not isinstance(body, dict):
        return _error(400, "Invalid JSON payload received.", field_violations=[("", "not an object")])
    unknown = sorted(set(body) - {"message", "validate_only", "validateOnly"})
    if unknown:
        text = f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.'
        return _error(400, text, field_violations=[(unknown[0], text)])
    message = body.get("message")
    if not isinstance(message, dict):
        return _error(400, "Message is not set.", field_violations=[("message", "Message is not set.")])
    unknown = sorted(set(message) - _MESSAGE_FIELDS - set(_TARGETS))
    if unknown:
        text = (
            f"Invalid JSON payload received. Unknown name \"{unknown[0]}\" at 'message': Cannot find field."
        )
        return _error(400, text, field_violations=[(f"message.{unknown[0]}", text)])
    targets = [t for t in _TARGETS if t in message]
    if len(targets) != 1:
        text = "Recipient of the message is not set." if not targets else "Exactly one target may be set."
        return _error(400, text, fcm_error_code="INVALID_ARGUMENT", field_violations=[("message", text)])
    target = message[targets[0]]
    if not isinstance(target, str) or not target.strip():
        return _error(
            400,
            "The registration token is not a valid FCM registration token",
            fcm_error_code="INVALID_ARGUMENT",
            field_violations=[(f"message.{targets[0]}", "Invalid registration token")],
        )
    data = message.get("data", {})
    if not isinstance(data, dict):
        return _error(400, "Invalid value at 'message.data'", field_violations=[("message.data", "a map")])
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            text = f"Invalid value at 'message.data[{index}].value' (TYPE_STRING), {json.dumps(value)}"
            return _error(400, text, field_violations=[(f"message.data[{index}].value", text)])
        if key in _RESERVED_DATA_KEYS or key.startswith(_RESERVED_DATA_PREFIXES):
            text = f"Invalid data payload key: {key}"
            return _error(400, text, field_violations=[("message.data", text)])
    notification = message.get("notification", {})
    if not isinstance(notification, dict) or set(notification) - _NOTIFICATION_FIELDS:
        text = "Invalid JSON payload received at 'message.notification'"
        return _error(400, text, field_violations=[("message.notification", text)])
    if any(not isinstance(v, str) for v in notification.values()):
        text = "Invalid value at 'message.notification' (TYPE_STRING)"
        return _error(400, text, field_violations=[("message.notification", text)])
    size = sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
    size += sum(len(v.encode()) for v in notification.values())
    if size > MAX_PAYLOAD_BYTES:
        return _error(400, "Request contains an invalid argument.")  # as FCM answers: no details
    return None


def _scripted_response(scripted: ScriptedError) -> web.Response:
    status, canonical, text = FCM_ERRORS.get(scripted.error_code, (400, "INVALID_ARGUMENT", "Error"))
    status = scripted.http_status or status
    canonical = scripted.canonical or canonical
    violations = None
    if scripted.error_code == "INVALID_ARGUMENT":
        violations = [("message.token", "Invalid registration token")]
    headers = {"Retry-After": str(scripted.retry_after_s)} if scripted.retry_after_s is not None else None
    return _error(
        status,
        text,
        canonical,
        fcm_error_code=scripted.error_code,
        field_violations=violations,
        headers=headers,
    )


def _error(
    http_status: int,
    message: str,
    canonical: str | None = None,
    *,
    fcm_error_code: str | None = None,
    field_violations: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = google_error(
        http_status, message, canonical, fcm_error_code=fcm_error_code, field_violations=field_violations
    )
    return web.json_response(body, status=http_status, headers=headers)


def _oauth_error(error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=400)


@contextlib.contextmanager
def serving_in_thread(server: _S, timeout_s: float = 10.0) -> Iterator[_S]:
    """Run ``server`` on a new event loop in a daemon thread for the ``with`` block.

    Yields ``server`` once it listens (``server.base_url`` is set); stops it and the loop on
    exit. Its ``inject``/``fail_token``/lists may be used from the caller's thread (single
    deque/dict/list operations). Needed when the client may block its own loop on a call to
    the server, as firebase-admin does for a token refresh after a 401.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"{type(server).__name__}-loop", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout_s)
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout_s)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        loop.close()


__all__ = [
    "FCM_ERRORS",
    "FakeFcm",
    "IssuedToken",
    "ScriptedError",
    "TokenGrant",
    "google_error",
    "make_service_account",
    "serving_in_thread",
    "verify_grant",
]
