"""Push through Firebase Cloud Messaging (HTTP v1) with firebase-admin, one Firebase app per tenant.

A send is ``firebase_admin.messaging.send_each_async([Message], app=<the tenant's app>)``
(https://firebase.google.com/docs/reference/admin/python/firebase_admin.messaging#send_each_async),
which POSTs ``{"message": {"token": <FCM registration token>, "notification": {"title", "body"}?,
"data": {...}?}}`` to ``<endpoint base>/v1/projects/<project_id>/messages:send``
(https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send) with the
app's OAuth2 access token and answers ``{"name": "projects/<project_id>/messages/<id>"}``; that
name is the ``provider_message_id``. Before every send the access token is refreshed off the
event loop if it is near expiry (:func:`tenants.firebase_apps.ensure_access_token`), and the
SDK's own refreshes (an invalid token, a 401 answer) run in a worker thread too
(:class:`tenants.firebase_apps.OffLoopCredentialFlow`): google-auth's blocking refresh never
runs on the loop.

Each :class:`FcmProvider` object sends through a Firebase app of its own (the tenant id and a
per-process generation in the name, :func:`tenants.firebase_apps.app_name`), created on its first
send and deleted by :meth:`FcmProvider.close` once the sends it has in flight are done. When
the provider cache replaces a tenant's provider (any invalidation of the tenant, eviction),
the old provider's release therefore never touches the app the new one sends through, and a
send that was already under way finishes on the old app.

The library is used unmodified except for one private attribute: firebase-admin 7.7.0 has no
option for the FCM endpoint (``_MessagingService.__init__`` formats the class constant
``FCM_URL = 'https://fcm.googleapis.com/v1/projects/{0}/messages:send'`` into the instance
attribute ``_fcm_url``), so :func:`point_messaging_at` rewrites that attribute on the tenant
app's own messaging service. Nothing module-wide changes; other tenants' apps keep their URL.

How failures are classified (each FCM answer is a google.rpc.Status JSON; firebase-admin turns
it into a ``FirebaseError`` whose ``code`` is the canonical status and whose class reflects the
``FcmError.errorCode`` detail; https://firebase.google.com/docs/cloud-messaging/error-codes):

================================  ======  =========  ==========================================
FCM ErrorCode (HTTP)              result  token      source
================================  ======  =========  ==========================================
UNREGISTERED (404)                perm.   invalid    ErrorCode: "token is no longer valid"
SENDER_ID_MISMATCH (403)          perm.   invalid    ErrorCode: token tied to another sender
INVALID_ARGUMENT (400), naming    perm.   invalid    error-codes page, example 2 (FcmError
the token                                            detail, or BadRequest on message.token)
INVALID_ARGUMENT (400), payload   perm.   kept       BadRequest on another field / no details
THIRD_PARTY_AUTH_ERROR (401)      perm.   kept       APNs certificate / web push key invalid
QUOTA_EXCEEDED (429)              retry   kept       Retry-After, else 60 s ("minimum initial
                                                     delay of 1 minute")
UNAVAILABLE (503), INTERNAL (500) retry   kept       "honor the Retry-After header"
other code: canonical status      perm.   kept       INVALID_ARGUMENT, UNAUTHENTICATED,
                                                     PERMISSION_DENIED, NOT_FOUND ("auth refused",
                                                     misconfigured project)
anything else                     retry   kept       RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
                                                     UNKNOWN, connection errors, timeouts
token grant refused               perm.   kept       google-auth RefreshError(retryable=False)
================================  ======  =========  ==========================================

(ErrorCode reference: https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode.)
A token recorded invalid fails later sends to it at once, without calling FCM.

Also note, from the SDK (firebase_admin/_retry.py, _http_client.py): it retries 500 and 503 up
to 4 more times itself (0.5 s backoff factor, about 7 s in all, ignoring ``Retry-After``) before
the error reaches us, and after a 401 it refreshes the token and resends, at most twice.
Building an app's messaging service (a requests session and an httpx client with three SSL
contexts, 70-150 ms of CPU) happens once per app, in a worker thread. google-auth >= 2.62 also
looks up the service account's Regional Access Boundary at iamcredentials.googleapis.com in a
background thread after a token is first used (google/auth/_regional_access_boundary_utils.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import firebase_admin  # type: ignore[import-untyped]
import structlog
from firebase_admin import exceptions as firebase_exceptions
from firebase_admin import messaging
from google.auth import exceptions as google_auth_exceptions

from channels.provider import DeliveryError, PermanentDeliveryError, RetryableDeliveryError, SendResult
from switchboard.notify.v1 import events_pb2
from tenants.firebase_apps import (
    app_name,
    delete_app,
    ensure_access_token,
    get_or_create_app,
    refresh_tokens_off_the_loop,
)

log = structlog.get_logger(__name__)

DEFAULT_ENDPOINT_BASE = "https://fcm.googleapis.com"
#: ``send_each_async`` refuses more (firebase_admin/messaging.py).
MAX_BATCH_SIZE = 500
#: The wait for QUOTA_EXCEEDED without ``Retry-After``: the ErrorCode reference asks for
#: "exponential backoff with a minimum initial delay of 1 minute".
QUOTA_EXCEEDED_RETRY_AFTER_S = 60.0
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
_MAX_REASON_CHARS = 300
#: Generations of FcmProvider objects in this process: each one's Firebase app has its own name.
_generations = itertools.count(1)

#: FCM ErrorCodes after which the registration token never works again for this sender.
TOKEN_INVALID_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
#: FCM ErrorCodes another attempt cannot fix.
PERMANENT_FCM_CODES = frozenset(
    {"UNREGISTERED", "SENDER_ID_MISMATCH", "INVALID_ARGUMENT", "THIRD_PARTY_AUTH_ERROR", "APNS_AUTH_ERROR"}
)
#: FCM ErrorCodes worth another attempt.
RETRYABLE_FCM_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
#: Canonical statuses (``FirebaseError.code``) another attempt cannot fix, when no known
#: ErrorCode came with them: a bad request, or credentials/project FCM refuses.
PERMANENT_CANONICAL_CODES = frozenset(
    {"INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND"}
)


# -- invalid registration tokens ---------------------------------------------------------


class InvalidTokenStore(Protocol):
    """Registration tokens FCM has rejected for good, per tenant.

    ``reason`` is the FCM ErrorCode (``UNREGISTERED``, ``SENDER_ID_MISMATCH`` or
    ``INVALID_ARGUMENT``). Implementations must be safe to call concurrently from one loop.
    """

    async def is_invalid(self, tenant_id: uuid.UUID, token: str) -> bool:
        """Whether ``token`` was recorded invalid for ``tenant_id``."""
        ...

    async def mark_invalid(self, tenant_id: uuid.UUID, token: str, reason: str) -> None:
        """Record ``token`` as invalid for ``tenant_id`` (idempotent; the latest reason wins)."""
        ...


class InMemoryInvalidTokenStore:
    """An :class:`InvalidTokenStore` in a dict, per process; the least recently marked token
    is forgotten beyond ``max_entries`` (then it is simply tried, and rejected, once more)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._reasons: OrderedDict[tuple[uuid.UUID, str], str] = OrderedDict()

    async def is_invalid(self, tenant_id: uuid.UUID, token: str) -> bool:
        """Whether ``token`` was recorded invalid for ``tenant_id``."""
        return (tenant_id, token) in self._reasons

    async def mark_invalid(self, tenant_id: uuid.UUID, token: str, reason: str) -> None:
        """Record ``token`` as invalid for ``tenant_id`` with ``reason``."""
        key = (tenant_id, token)
        self._reasons[key] = reason
        self._reasons.move_to_end(key)
        while len(self._reasons) > self._max_entries:
            self._reasons.popitem(last=False)

    def reason(self, tenant_id: uuid.UUID, token: str) -> str | None:
        """The recorded reason, or ``None`` if ``token`` is not recorded for ``tenant_id``."""
        return self._reasons.get((tenant_id, token))

    def __len__(self) -> int:
        return len(self._reasons)


# -- the endpoint base ---------------------------------------------------------------------


def fcm_send_url(endpoint_base: str, project_id: str) -> str:
    """``<endpoint_base>/v1/projects/<project_id>/messages:send``; empty base = Google's."""
    base = (endpoint_base or DEFAULT_ENDPOINT_BASE).rstrip("/")
    return f"{base}/v1/projects/{project_id}/messages:send"


def point_messaging_at(app: firebase_admin.App, endpoint_base: str) -> str:
    """Make ``app``'s messaging service send to ``endpoint_base`` (``""``: Google's); return the URL.

    firebase-admin 7.7.0 has no public setting for the FCM endpoint: the per-app
    ``_MessagingService`` (created on first use and cached on the app) computes
    ``self._fcm_url = FCM_URL.format(project_id)`` in ``__init__`` and every send uses it
    (firebase_admin/messaging.py). This sets that private *instance* attribute only, so other
    apps (tenants) and the class constant are untouched. If a firebase-admin upgrade renames
    it, this raises ``RuntimeError`` rather than let sends go somewhere unintended.
    """
    service = messaging._get_messaging_service(app)
    if not isinstance(getattr(service, "_fcm_url", None), str):
        raise RuntimeError(
            "firebase_admin.messaging._MessagingService has no _fcm_url attribute: "
            "the FCM endpoint override needs updating for this firebase-admin version"
        )
    url = fcm_send_url(endpoint_base, app.project_id)
    if service._fcm_url != url:
        service._fcm_url = url
    return url


def _set_up_messaging(app: firebase_admin.App, endpoint_base: str) -> None:
    """Point ``app``'s messaging service at ``endpoint_base`` and move its token refreshes off the
    event loop (:func:`tenants.firebase_apps.refresh_tokens_off_the_loop`); blocking (it builds
    the service on first use), for a worker thread. Raises ``RuntimeError`` as those two do."""
    point_messaging_at(app, endpoint_base)
    refresh_tokens_off_the_loop(app)


# -- messages and errors -------------------------------------------------------------------


def build_message(event: events_pb2.DeliveryRequested) -> Any:
    """The ``messaging.Message`` for a push delivery (typed ``Any``: firebase-admin is untyped).

    ``token`` = ``event.recipient`` (an FCM registration token), ``notification`` =
    ``Notification(title, body)`` when either is set (empty ones left out), ``data`` =
    ``event.push.data`` (string -> string). Encoded by the SDK as ``{"token", "notification"?,
    "data"?}``. firebase-admin 7.7 deprecates ``Message.token`` in favour of ``fid`` (Firebase
    installation id); registration tokens still work, so that warning is silenced here.
    """
    push = event.push
    notification = None
    if push.title or push.body:
        notification = messaging.Notification(title=push.title or None, body=push.body or None)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Message\.token is deprecated", category=DeprecationWarning
        )
        return messaging.Message(
            token=event.recipient, notification=notification, data=dict(push.data) or None
        )


@dataclass(frozen=True)
class ClassifiedError:
    """How one FCM failure is handled: ``error`` to report, and whether the token is dead."""

    error: DeliveryError
    token_invalid: bool = False
    fcm_code: str | None = None


def classify_fcm_error(error: BaseException) -> ClassifiedError:
    """Map a firebase-admin / google-auth / asyncio failure of one send to a :class:`DeliveryError`.

    See the table in the module docstring. ``Retry-After`` (seconds or an HTTP date, RFC 9110
    section 10.2.3) is read from ``FirebaseError.http_response`` when the SDK kept the response.
    Reasons look like ``FCM UNREGISTERED (HTTP 404, NOT_FOUND): Requested entity was not found.``
    and never contain the token or credentials.
    """
    if isinstance(error, firebase_exceptions.FirebaseError):
        return _classify_firebase_error(error)
    if isinstance(error, google_auth_exceptions.RefreshError):
        reason = _reason(f"the OAuth2 token endpoint refused the service account: {error}")
        if getattr(error, "retryable", False):
            return ClassifiedError(RetryableDeliveryError(reason))
        return ClassifiedError(PermanentDeliveryError(reason))
    if isinstance(error, google_auth_exceptions.TransportError):
        return ClassifiedError(
            RetryableDeliveryError(_reason(f"the OAuth2 token endpoint is unreachable: {error}"))
        )
    if isinstance(error, TimeoutError):
        return ClassifiedError(RetryableDeliveryError("FCM did not answer in time"))
    if isinstance(error, ValueError):
        return ClassifiedError(
            PermanentDeliveryError(_reason(f"the message was refused by firebase-admin: {error}"))
        )
    return ClassifiedError(
        RetryableDeliveryError(_reason(f"FCM send failed: {type(error).__name__}: {error}"))
    )


def _classify_firebase_error(error: firebase_exceptions.FirebaseError) -> ClassifiedError:
    cause = error.cause
    if isinstance(cause, google_auth_exceptions.GoogleAuthError):
        return classify_fcm_error(cause)  # a refresh the SDK did itself (after a 401)
    canonical: str = error.code or "UNKNOWN"
    response = error.http_response
    body = _json_body(response)
    fcm_code = _sdk_fcm_code(error) or _detail_fcm_code(body)
    status = getattr(response, "status_code", None)
    label = fcm_code or canonical
    where = f"HTTP {status}, {canonical}" if status is not None else canonical
    reason = _reason(f"FCM {label} ({where}): {_error_message(error, body)}")
    retry_after_s = _retry_after_s(getattr(response, "headers", None))

    if fcm_code in PERMANENT_FCM_CODES:
        token_invalid = fcm_code in TOKEN_INVALID_CODES or (
            fcm_code == "INVALID_ARGUMENT" and _names_the_token(body)
        )
        return ClassifiedError(PermanentDeliveryError(reason), token_invalid=token_invalid, fcm_code=fcm_code)
    if fcm_code in RETRYABLE_FCM_CODES:
        if fcm_code == "QUOTA_EXCEEDED" and retry_after_s is None:
            retry_after_s = QUOTA_EXCEEDED_RETRY_AFTER_S
        return ClassifiedError(RetryableDeliveryError(reason, retry_after_s=retry_after_s), fcm_code=fcm_code)
    if canonical in PERMANENT_CANONICAL_CODES:
        return ClassifiedError(PermanentDeliveryError(reason), fcm_code=fcm_code)
    return ClassifiedError(RetryableDeliveryError(reason, retry_after_s=retry_after_s), fcm_code=fcm_code)


def _sdk_fcm_code(error: firebase_exceptions.FirebaseError) -> str | None:
    """The ErrorCode behind firebase-admin's FCM-specific exception classes."""
    if isinstance(error, messaging.UnregisteredError):
        return "UNREGISTERED"
    if isinstance(error, messaging.SenderIdMismatchError):
        return "SENDER_ID_MISMATCH"
    if isinstance(error, messaging.QuotaExceededError):
        return "QUOTA_EXCEEDED"
    if isinstance(error, messaging.ThirdPartyAuthError):
        return "THIRD_PARTY_AUTH_ERROR"
    return None


def _json_body(response: Any) -> dict[str, Any]:
    """The ``error`` object of a google.rpc.Status JSON body, or ``{}``."""
    if response is None:
        return {}
    try:
        parsed = response.json()
    except ValueError:
        return {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else {}


def _details(body: Mapping[str, Any], type_url: str) -> list[dict[str, Any]]:
    details = body.get("details")
    if not isinstance(details, list):
        return []
    return [d for d in details if isinstance(d, dict) and d.get("@type") == type_url]


def _detail_fcm_code(body: Mapping[str, Any]) -> str | None:
    """``errorCode`` of the ``google.firebase.fcm.v1.FcmError`` detail, if any."""
    for detail in _details(body, FCM_ERROR_TYPE):
        code = detail.get("errorCode")
        if isinstance(code, str) and code:
            return code
    return None


def _names_the_token(body: Mapping[str, Any]) -> bool:
    """Whether an INVALID_ARGUMENT is about the registration token rather than the payload.

    A ``google.rpc.BadRequest`` field violation on ``message.token`` says so; without any
    BadRequest detail, the FcmError ``INVALID_ARGUMENT`` detail alone is FCM's answer for an
    invalid registration token (https://firebase.google.com/docs/cloud-messaging/error-codes,
    example 2), while payload errors name their field (example 1).
    """
    bad_requests = _details(body, BAD_REQUEST_TYPE)
    if not bad_requests:
        return _detail_fcm_code(body) == "INVALID_ARGUMENT"
    for detail in bad_requests:
        for violation in detail.get("fieldViolations") or []:
            if isinstance(violation, dict) and violation.get("field") == "message.token":
                return True
    return False


def _error_message(error: firebase_exceptions.FirebaseError, body: Mapping[str, Any]) -> str:
    message = body.get("message")
    return message if isinstance(message, str) and message else str(error)


def _retry_after_s(headers: Any) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or ``None``."""
    value = headers.get("Retry-After") if headers is not None else None
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _reason(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 1] + "…"


def _copy(error: DeliveryError) -> DeliveryError:
    """A fresh exception of the same kind (one per message of a batch that failed as a whole)."""
    return type(error)(error.reason, retry_after_s=error.retry_after_s)


# -- the provider --------------------------------------------------------------------------


class FcmProvider:
    """Push to FCM registration tokens through one tenant's Firebase project.

    ``service_account`` is the parsed service-account JSON (``type``, ``project_id``,
    ``private_key_id``, ``private_key``, ``client_email``, ``token_uri``, ...);
    ``endpoint_base`` (``""`` = ``https://fcm.googleapis.com``) is where ``/v1/projects/...``
    goes; ``timeout_s`` bounds each :meth:`send` / :meth:`send_batch` (token refresh included);
    ``invalid_tokens`` records rejected tokens (default: a store of this provider's own).

    The provider's Firebase app is its own (:attr:`app_name`: the tenant id and this object's
    generation), created on the first send and deleted by :meth:`close`.

    Raises ``ValueError`` for an ``endpoint_base`` that is not an http(s) URL or a service
    account without ``project_id``. Creates no app and does no I/O until the first send.
    """

    name = "fcm"

    def __init__(
        self,
        tenant_id: uuid.UUID,
        service_account: dict[str, Any],
        *,
        endpoint_base: str = "",
        timeout_s: float = 15.0,
        invalid_tokens: InvalidTokenStore | None = None,
    ) -> None:
        if endpoint_base:
            parts = urlsplit(endpoint_base)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
                raise ValueError("endpoint_base must be an http(s) URL such as https://fcm.googleapis.com")
        project_id = service_account.get("project_id")
        if not isinstance(project_id, str) or not project_id:
            raise ValueError("the service account has no project_id")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._tenant_id = tenant_id
        self._service_account = service_account
        self._project_id = project_id
        self._endpoint_base = endpoint_base
        self._timeout_s = timeout_s
        self._invalid_tokens: InvalidTokenStore = (
            invalid_tokens if invalid_tokens is not None else InMemoryInvalidTokenStore()
        )
        self._generation = next(_generations)
        self._app: firebase_admin.App | None = None
        self._pointed_app: firebase_admin.App | None = None  # the app _set_up_messaging last set up
        self._closed = False  # close() began: new sends are refused
        self._released = False  # close() deleted the app: nothing may create it again
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return (
            f"FcmProvider(tenant_id={self._tenant_id}, project_id={self._project_id!r}, "
            f"url={fcm_send_url(self._endpoint_base, self._project_id)!r})"
        )

    @property
    def tenant_id(self) -> uuid.UUID:
        """The tenant whose Firebase project this provider sends through."""
        return self._tenant_id

    @property
    def app_name(self) -> str:
        """The name of this provider's Firebase app: ``switchboard-tenant-<tenant uuid>-<generation>``."""
        return app_name(self._tenant_id, self._generation)

    @property
    def send_url(self) -> str:
        """Where messages go: ``<endpoint base>/v1/projects/<project_id>/messages:send``."""
        return fcm_send_url(self._endpoint_base, self._project_id)

    async def send(self, event: events_pb2.DeliveryRequested) -> SendResult:
        """Send one push (through :meth:`send_batch`); the result's id is the FCM message name.

        Raises ``PermanentDeliveryError`` / ``RetryableDeliveryError`` as classified in the
        module docstring, ``PermanentDeliveryError`` at once for a token recorded invalid.
        """
        (outcome,) = await self.send_batch([event])
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    async def send_batch(
        self, events: Sequence[events_pb2.DeliveryRequested]
    ) -> list[SendResult | DeliveryError]:
        """Send up to 500 pushes with one ``send_each_async``; one outcome per event, in order.

        Each outcome is a :class:`SendResult` (``provider_message_id`` =
        ``projects/<project>/messages/<id>``) or the :class:`DeliveryError` for that event:
        events that are not push deliveries of this tenant, have no recipient, or target a
        token recorded invalid fail without a request. A failure of the batch as a whole
        (service account, token grant, timeout, an SDK error outside any one response) is
        reported for every event sent; some of those may have been delivered. After
        :meth:`close` began, every event fails with ``RetryableDeliveryError`` without a
        request (the cache has a newer provider); a batch that began before it finishes.

        Raises ``ValueError`` for more than 500 events.
        """
        if len(events) > MAX_BATCH_SIZE:
            raise ValueError(f"at most {MAX_BATCH_SIZE} events per batch, got {len(events)}")
        if self._closed:
            return [RetryableDeliveryError("this FCM provider was closed") for _ in events]
        # Counted before the first await: a close() that starts later waits for this batch.
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._send_batch(events)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def close(self) -> None:
        """Refuse new sends, let those in flight finish, then delete this provider's Firebase app.

        The wait for sends in flight is bounded by ``timeout_s`` (each send is). The app is
        deleted with :func:`tenants.firebase_apps.delete_app`: its HTTP clients closed on this
        loop, ``firebase_admin.delete_app`` in a worker thread. Only this provider's own app
        (:attr:`app_name`) is deleted; a newer provider of the same tenant keeps its app.
        Idempotent. Later sends fail with ``RetryableDeliveryError`` (a new provider takes over).
        """
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout_s):
                await self._idle.wait()
        self._released = True
        app, self._app, self._pointed_app = self._app, None, None
        if app is not None:
            await delete_app(app)

    # -- internals ---------------------------------------------------------------------

    async def _send_batch(
        self, events: Sequence[events_pb2.DeliveryRequested]
    ) -> list[SendResult | DeliveryError]:
        outcomes: list[SendResult | DeliveryError | None] = [None] * len(events)
        pending: list[tuple[int, str, Any]] = []  # (index, token, messaging.Message)
        for index, event in enumerate(events):
            try:
                pending.append((index, event.recipient, await self._prepare(event)))
            except DeliveryError as error:
                outcomes[index] = error
        if pending:
            sent = await self._send_messages([message for _, _, message in pending])
            for (index, token, _), result in zip(pending, sent, strict=True):
                if isinstance(result, ClassifiedError):
                    if result.token_invalid:
                        await self._mark_invalid(token, result.fcm_code or "INVALID_ARGUMENT")
                    outcomes[index] = result.error
                else:
                    outcomes[index] = result
        return [outcome for outcome in outcomes if outcome is not None]

    async def _prepare(self, event: events_pb2.DeliveryRequested) -> Any:
        """The Message for ``event``, or a DeliveryError saying why it is not sent."""
        if event.WhichOneof("content") != "push":
            raise PermanentDeliveryError("not a push delivery")
        try:
            event_tenant = uuid.UUID(event.tenant_id)
        except ValueError:
            raise PermanentDeliveryError("the delivery has no valid tenant_id") from None
        if event_tenant != self._tenant_id:
            raise PermanentDeliveryError("the delivery belongs to another tenant than this FCM provider")
        if not event.recipient:
            raise PermanentDeliveryError("no FCM registration token")
        if await self._invalid_tokens.is_invalid(self._tenant_id, event.recipient):
            raise PermanentDeliveryError("FCM rejected this registration token earlier (not sent again)")
        message = build_message(event)
        try:
            str(message)  # the SDK's own encoding and checks, before anything is sent
        except ValueError as error:
            raise classify_fcm_error(error).error from None
        return message

    async def _send_messages(self, messages: list[Any]) -> list[SendResult | ClassifiedError]:
        try:
            async with asyncio.timeout(self._timeout_s):
                app = await self._current_app()
                await ensure_access_token(app)
                batch = await messaging.send_each_async(messages, app=app)
        except DeliveryError as error:
            return [ClassifiedError(_copy(error)) for _ in messages]
        except ValueError as error:
            # Messages were checked in _prepare; here it is the SDK refusing a deleted app
            # ('Service requested from deleted Firebase App'): closed or replaced meanwhile.
            reason = _reason(f"the tenant's Firebase app went away during the send: {error}")
            return [ClassifiedError(RetryableDeliveryError(reason)) for _ in messages]
        except Exception as error:  # classified: every failure becomes a DeliveryError
            classified = classify_fcm_error(error)
            log.warning("fcm.batch_failed", tenant_id=str(self._tenant_id), reason=classified.error.reason)
            return [ClassifiedError(_copy(classified.error)) for _ in messages]
        results: list[SendResult | ClassifiedError] = []
        for response in batch.responses:
            if response.success:
                results.append(SendResult(provider_message_id=str(response.message_id)))
            elif response.exception is not None:
                results.append(classify_fcm_error(response.exception))
            else:
                results.append(ClassifiedError(RetryableDeliveryError("FCM answered without a message name")))
        return results

    async def _current_app(self) -> firebase_admin.App:
        """This provider's app, pointed at its endpoint base, refreshing tokens off the loop."""
        if self._released:
            raise RetryableDeliveryError("this FCM provider was closed")
        try:
            app = await get_or_create_app(self._tenant_id, self._service_account, generation=self._generation)
        except ValueError as error:
            raise PermanentDeliveryError(_reason(f"the FCM service account is invalid: {error}")) from None
        self._app = app
        if app is not self._pointed_app:
            # The app's first messaging use builds _MessagingService: a requests session and an
            # httpx client with three SSL contexts, 70-150 ms of CPU; keep it off the loop.
            # App._get_service is guarded by the app's threading lock.
            try:
                await asyncio.to_thread(_set_up_messaging, app, self._endpoint_base)
            except RuntimeError as error:
                raise RetryableDeliveryError(str(error)) from None
            self._pointed_app = app
        return app

    async def _mark_invalid(self, token: str, reason: str) -> None:
        try:
            await self._invalid_tokens.mark_invalid(self._tenant_id, token, reason)
        except Exception as error:  # the send outcome stands; the next send tries FCM again
            log.warning("fcm.mark_invalid_failed", tenant_id=str(self._tenant_id), error=repr(error))


__all__ = [
    "DEFAULT_ENDPOINT_BASE",
    "MAX_BATCH_SIZE",
    "ClassifiedError",
    "FcmProvider",
    "InMemoryInvalidTokenStore",
    "InvalidTokenStore",
    "build_message",
    "classify_fcm_error",
    "fcm_send_url",
    "point_messaging_at",
]
