"""Per-tenant ``firebase_admin`` Apps, and their lifecycle on an asyncio event loop.

firebase-admin keeps initialized apps in a process-wide registry keyed by name
(https://firebase.google.com/docs/admin/setup#initialize_multiple_apps). A tenant's
app is named ``switchboard-tenant-<tenant uuid>-<generation>``: each FCM provider
object (one per tenant in the provider cache at a time) takes a generation of its
own, so the app a provider deletes when it is released is always the one it
created, never one a newer provider of the same tenant is sending through
(channels/fcm.py). Three parts of the SDK block or misbehave on an event loop,
and this module moves them off it:

- ``firebase_admin.delete_app`` closes the messaging service's async HTTP client
  with ``asyncio.run``, which raises ``RuntimeError`` inside a running loop
  (firebase_admin/messaging.py, ``_MessagingService.close``). :func:`delete_app`
  closes those clients on the loop that used them, then deletes the app in a
  worker thread.
- The OAuth2 access token (about one hour) is refreshed by google-auth through
  the blocking ``requests`` transport, on whichever thread asks for it. The
  async send path asks on the loop twice over: firebase-admin's httpx auth flow
  (``_http_client.GoogleAuthCredentialFlow``) refreshes an invalid token before a
  request, and after a 401 it refreshes (up to twice) and resends.
  :func:`refresh_access_token` refreshes in a worker thread (callers check
  :func:`access_token_needs_refresh` before sending), and
  :func:`refresh_tokens_off_the_loop` gives the app's messaging client
  :class:`OffLoopCredentialFlow`, which does the auth flow's own refreshes in a
  worker thread too.
- Building ``credentials.Certificate`` parses the RSA private key (CPU work);
  :func:`get_or_create_app` does that in a worker thread too.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
import weakref
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import firebase_admin  # type: ignore[import-untyped]
import httpx
from firebase_admin import credentials, messaging
from firebase_admin._http_client import GoogleAuthCredentialFlow  # type: ignore[import-untyped]
from google.auth import credentials as google_credentials
from google.auth.transport import requests as google_auth_requests

APP_NAME_PREFIX = "switchboard-tenant-"
DEFAULT_REFRESH_MARGIN_S = 300.0
"""Refresh a token this many seconds before it expires: more than google-auth's own
3 min 45 s threshold, so a send never triggers a blocking refresh on the loop."""

# Per app name; an entry lives only while some coroutine holds the lock object.
_init_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
# Refreshes in flight, by id() of the google-auth credential (the task keeps it alive meanwhile).
_refreshes: dict[int, asyncio.Task[None]] = {}
# The HTTP transport of token refreshes (a requests.Session), as firebase_admin.credentials keeps one.
_token_transport = google_auth_requests.Request()


def app_name(tenant_id: uuid.UUID, generation: int = 0) -> str:
    """The firebase_admin app name of ``tenant_id``'s app ``generation``:
    ``switchboard-tenant-<uuid>-<generation>``."""
    return f"{APP_NAME_PREFIX}{tenant_id}-{generation}"


async def get_or_create_app(
    tenant_id: uuid.UUID, service_account: dict[str, Any], *, generation: int = 0
) -> firebase_admin.App:
    """The tenant's Firebase app ``generation``, initialized on first use.

    ``service_account`` is the parsed service-account JSON from the Firebase console
    (``type`` = ``service_account``, ``project_id``, ``private_key_id``,
    ``private_key`` (PEM), ``client_email``, ``token_uri``, ...). The app is
    ``firebase_admin.initialize_app(credentials.Certificate(service_account),
    name=app_name(tenant_id, generation), options={"projectId": project_id})``
    (https://firebase.google.com/docs/reference/admin/python/firebase_admin#initialize_app).

    Exactly one ``initialize_app`` runs per name even under concurrent first use:
    ``firebase_admin.get_app`` is checked, then again under a per-name lock. An
    existing app made from a different service account (other ``client_email``,
    ``private_key_id`` or ``project_id``: the configuration changed) is deleted and
    replaced. No network I/O happens here (tokens are fetched on first use).

    Raises ``ValueError`` for a service account firebase-admin or google-auth
    rejects (wrong ``type``, unparsable key, missing fields, no ``project_id``).
    """
    project_id = service_account.get("project_id")
    if not isinstance(project_id, str) or not project_id:
        raise ValueError("the service account has no project_id")
    name = app_name(tenant_id, generation)
    existing = _registered(name)
    if existing is not None and _made_from(existing, service_account):
        return existing
    lock = _init_locks.get(name)
    if lock is None:
        lock = _init_locks[name] = asyncio.Lock()
    async with lock:
        existing = _registered(name)
        if existing is not None:
            if _made_from(existing, service_account):
                return existing
            await delete_app(existing)
        credential = await asyncio.to_thread(credentials.Certificate, service_account)
        keep_off_google_when_not_google(credential, service_account)
        return firebase_admin.initialize_app(credential, name=name, options={"projectId": project_id})


#: A Regional Access Boundary that never needs a refresh (see below).
_NO_LOOKUP_BOUNDARY = {"encodedLocations": "0x0", "expiry": datetime(9999, 1, 1)}


def keep_off_google_when_not_google(
    credential: credentials.Certificate, service_account: dict[str, Any]
) -> None:
    """Stop google-auth from calling Google for a service account that is not Google's.

    google-auth (>= 2.4x) starts a background Regional Access Boundary lookup at
    ``iamcredentials.googleapis.com`` after a token refresh. For a service
    account whose ``token_uri`` is not a Google host (the loopback fakes of the
    tests and the dev stack) that would be traffic to the internet; we preset a
    boundary that never expires, through the hook google-auth keeps for the
    gcloud CLI (``Credentials._set_regional_access_boundary``). Real Google
    service accounts keep the library's behaviour.
    """
    host = urlsplit(str(service_account.get("token_uri", ""))).hostname or ""
    if host == "googleapis.com" or host.endswith(".googleapis.com"):
        return
    google_credential = credential.get_credential()
    setter = getattr(google_credential, "_set_regional_access_boundary", None)
    if setter is not None:
        setter(_NO_LOOKUP_BOUNDARY)


async def delete_app(app: firebase_admin.App) -> None:
    """Delete ``app`` from firebase-admin and close its HTTP clients, from a running loop.

    Async HTTP clients of the app's services (the messaging service's httpx client)
    are closed here, on the loop that used them; then ``firebase_admin.delete_app``
    runs in a worker thread, where its ``asyncio.run(client.aclose())`` has no
    running loop to trip over (and finds the client already closed). Afterwards
    ``firebase_admin.get_app(app.name)`` raises ``ValueError``.

    Idempotent: an app already deleted, or replaced by a newer app of the same
    name, is left alone.
    """
    await _close_async_clients(app)
    await asyncio.to_thread(_delete_app_sync, app)


def access_token_needs_refresh(app: firebase_admin.App, margin_s: float = DEFAULT_REFRESH_MARGIN_S) -> bool:
    """Whether ``app``'s OAuth2 access token is missing, invalid or expires within ``margin_s`` seconds.

    Reads the google-auth credential (``app.credential.get_credential()``: ``.token``,
    ``.valid``, ``.expiry`` as a naive UTC datetime or ``None`` for no expiry). No I/O.
    """
    credential: google_credentials.Credentials = app.credential.get_credential()
    if credential.token is None or not credential.valid:
        return True
    expiry: datetime | None = credential.expiry
    if expiry is None:
        return False
    if expiry.tzinfo is not None:
        expiry = expiry.astimezone(UTC).replace(tzinfo=None)
    now = datetime.now(UTC).replace(tzinfo=None)
    return expiry - timedelta(seconds=margin_s) <= now


async def refresh_access_token(app: firebase_admin.App) -> None:
    """Fetch a new OAuth2 access token for ``app`` in a worker thread.

    :func:`refresh_credential` of the app's google-auth credential
    (``app.credential.get_credential()``).

    Raises ``google.auth.exceptions.RefreshError`` when the token endpoint refuses
    the grant and ``google.auth.exceptions.TransportError`` when it cannot be reached.
    """
    await refresh_credential(app.credential.get_credential())


async def refresh_credential(credential: google_credentials.Credentials) -> None:
    """``credential.refresh()`` in a worker thread; concurrent calls for one credential share it.

    For a service account that is a blocking POST of a signed JWT (RFC 7523) to its
    ``token_uri`` through google-auth's ``requests`` transport; ``asyncio.to_thread``
    keeps the event loop running during the round trip. A caller that joins a refresh
    already in flight gets that refresh's token (or error).

    Raises ``google.auth.exceptions.RefreshError`` when the token endpoint refuses
    the grant and ``google.auth.exceptions.TransportError`` when it cannot be reached.
    """
    key = id(credential)
    task = _refreshes.get(key)
    if task is None:
        task = asyncio.create_task(
            asyncio.to_thread(credential.refresh, _token_transport), name="firebase-token-refresh"
        )
        _refreshes[key] = task
        task.add_done_callback(lambda done: _refresh_finished(key, done))
    await asyncio.shield(task)


async def ensure_access_token(app: firebase_admin.App, margin_s: float = DEFAULT_REFRESH_MARGIN_S) -> None:
    """Refresh ``app``'s access token off the loop if :func:`access_token_needs_refresh` says so.

    Call before every send; same errors as :func:`refresh_access_token`.
    """
    if access_token_needs_refresh(app, margin_s):
        await refresh_access_token(app)


class OffLoopCredentialFlow(GoogleAuthCredentialFlow):  # type: ignore[misc]
    """firebase-admin's httpx auth flow for a google-auth credential, refreshing in a worker thread.

    ``firebase_admin._http_client.GoogleAuthCredentialFlow`` (firebase-admin 7) implements
    only httpx's generator ``auth_flow``, which an ``httpx.AsyncClient`` runs on the event
    loop; its token refreshes (google-auth's blocking ``requests`` POST) then stall the
    loop for a token-endpoint round trip each: before a request whose token is invalid,
    and after every 401 (up to ``_max_refresh_attempts`` = 2 per request). httpx asks
    auth schemes that do I/O to override ``async_auth_flow``
    (https://www.python-httpx.org/advanced/authentication/#custom-authentication-schemes,
    and ``httpx.Auth.async_auth_flow``); this one keeps the library's rules and does each
    refresh with :func:`refresh_credential`:

    - before each send, an invalid token (missing, or within google-auth's 3 min 45 s
      of expiry: ``credential.valid``) is refreshed first; the headers are then applied
      by the library's ``apply_auth_headers``, which does no I/O for a valid token;
    - a 401 answer is followed by a refresh and a resend, at most
      ``_max_refresh_attempts`` times, after which the 401 is returned;
    - concurrent refreshes of the credential share one token request, and a 401 for
      a request sent with a token that has been replaced since is resent with the new
      token without another refresh (a batch of 500 sends answered 401 together costs
      one token request, not 1,000).

    The synchronous ``auth_flow`` (``httpx.Client``) is the library's, unchanged.
    Errors are the library's: google-auth's ``RefreshError`` / ``TransportError`` from a
    refused or unreachable token endpoint propagate out of the request.
    """

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Authenticate ``request`` (resending it after a 401 as described above)."""
        credential: google_credentials.Credentials = self._credential
        original_headers = request.headers.copy()
        refreshes = 0
        while True:
            request.headers = original_headers.copy()
            if not credential.valid:
                await refresh_credential(credential)
            sent_with = credential.token
            self.apply_auth_headers(request, _token_transport)
            response = yield request
            if response.status_code not in self._refresh_status_codes:
                return
            if refreshes >= self._max_refresh_attempts:
                return
            refreshes += 1
            if credential.token == sent_with:  # nobody refreshed it since this request went out
                await refresh_credential(credential)


def refresh_tokens_off_the_loop(app: firebase_admin.App) -> None:
    """Give ``app``'s FCM messaging client an :class:`OffLoopCredentialFlow`; idempotent.

    firebase-admin 7 has no option for the auth of its async HTTP client: the app's
    ``_MessagingService`` (created on first use, cached on the app) builds
    ``_http_client.HttpxAsyncClient(credential=...)``, whose public ``async_client``
    is an ``httpx.AsyncClient`` with ``auth=GoogleAuthCredentialFlow(credential)``. This
    replaces that client's ``auth`` (``httpx.AsyncClient.auth`` is a public setter) with
    the off-loop flow for the same credential. Builds the messaging service if the app
    has none yet (70-150 ms of CPU: call it in a worker thread).

    Raises ``RuntimeError`` if a firebase-admin upgrade changed that structure, rather
    than let sends refresh tokens on the event loop unnoticed.
    """
    service = messaging._get_messaging_service(app)
    client = getattr(getattr(service, "_async_client", None), "async_client", None)
    if not isinstance(client, httpx.AsyncClient) or not isinstance(client.auth, GoogleAuthCredentialFlow):
        raise RuntimeError(
            "firebase_admin.messaging._MessagingService has no httpx client with a GoogleAuthCredentialFlow: "
            "the off-loop token refresh needs updating for this firebase-admin version"
        )
    if not isinstance(client.auth, OffLoopCredentialFlow):
        client.auth = OffLoopCredentialFlow(app.credential.get_credential())


# -- internals -----------------------------------------------------------------


def _registered(name: str) -> firebase_admin.App | None:
    try:
        return firebase_admin.get_app(name)
    except ValueError:
        return None


def _made_from(app: firebase_admin.App, service_account: dict[str, Any]) -> bool:
    """Whether ``app`` was initialized from this service account (same email, key id, project)."""
    credential = app.credential
    if not isinstance(credential, credentials.Certificate):
        return False
    return bool(
        credential.service_account_email == service_account.get("client_email")
        and credential.signer.key_id == service_account.get("private_key_id")
        and app.options.get("projectId") == service_account.get("project_id")
    )


async def _close_async_clients(app: firebase_admin.App) -> None:
    # Private SDK state: App._services maps service names to service objects; the
    # messaging service keeps an HttpxAsyncClient in _async_client (firebase-admin 7).
    # Closing it from the worker thread's own loop would touch this loop's sockets.
    services = getattr(app, "_services", None)
    if not isinstance(services, dict):
        return
    for service in list(services.values()):
        aclose = getattr(getattr(service, "_async_client", None), "aclose", None)
        if aclose is not None and inspect.iscoroutinefunction(aclose):
            await aclose()


def _delete_app_sync(app: firebase_admin.App) -> None:
    try:
        firebase_admin.delete_app(app)
    except ValueError:
        if _registered(app.name) is app:
            raise
        # Already deleted, or replaced by a newer app of the same name.


def _refresh_finished(key: int, task: asyncio.Task[None]) -> None:
    if _refreshes.get(key) is task:
        del _refreshes[key]
    if not task.cancelled():
        task.exception()  # retrieved: every caller already got it, or none is left
