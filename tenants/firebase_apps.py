"""One ``firebase_admin`` App per tenant, and its lifecycle on an asyncio event loop.

firebase-admin keeps initialized apps in a process-wide registry keyed by name
(https://firebase.google.com/docs/admin/setup#initialize_multiple_apps); a tenant's
app is named ``switchboard-tenant-<tenant uuid>``. Three parts of the SDK block or
misbehave on an event loop, and this module moves them off it:

- ``firebase_admin.delete_app`` closes the messaging service's async HTTP client
  with ``asyncio.run``, which raises ``RuntimeError`` inside a running loop
  (firebase_admin/messaging.py, ``_MessagingService.close``). :func:`delete_app`
  closes those clients on the loop that used them, then deletes the app in a
  worker thread.
- The OAuth2 access token (about one hour) is refreshed by google-auth through
  the blocking ``requests`` transport, on whichever thread asks for it: on the loop
  if it happens inside a send. :func:`refresh_access_token` does it in a worker
  thread; callers check :func:`access_token_needs_refresh` before sending.
- Building ``credentials.Certificate`` parses the RSA private key (CPU work);
  :func:`get_or_create_app` does that in a worker thread too.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import firebase_admin  # type: ignore[import-untyped]
from firebase_admin import credentials
from google.auth import credentials as google_credentials

APP_NAME_PREFIX = "switchboard-tenant-"
DEFAULT_REFRESH_MARGIN_S = 300.0
"""Refresh a token this many seconds before it expires: more than google-auth's own
3 min 45 s threshold, so a send never triggers a blocking refresh on the loop."""

# Per app name; an entry lives only while some coroutine holds the lock object.
_init_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
# Refreshes in flight, by id() of the app (the task keeps the app alive meanwhile).
_refreshes: dict[int, asyncio.Task[None]] = {}


def app_name(tenant_id: uuid.UUID) -> str:
    """The firebase_admin app name for ``tenant_id``: ``switchboard-tenant-<uuid>``."""
    return f"{APP_NAME_PREFIX}{tenant_id}"


async def get_or_create_app(tenant_id: uuid.UUID, service_account: dict[str, Any]) -> firebase_admin.App:
    """The tenant's Firebase app, initialized on first use.

    ``service_account`` is the parsed service-account JSON from the Firebase console
    (``type`` = ``service_account``, ``project_id``, ``private_key_id``,
    ``private_key`` (PEM), ``client_email``, ``token_uri``, ...). The app is
    ``firebase_admin.initialize_app(credentials.Certificate(service_account),
    name=app_name(tenant_id), options={"projectId": project_id})``
    (https://firebase.google.com/docs/reference/admin/python/firebase_admin#initialize_app).

    Exactly one ``initialize_app`` runs per tenant even under concurrent first use:
    ``firebase_admin.get_app`` is checked, then again under a per-tenant lock. An
    existing app made from a different service account (other ``client_email``,
    ``private_key_id`` or ``project_id``: the configuration changed) is deleted and
    replaced. No network I/O happens here (tokens are fetched on first use).

    Raises ``ValueError`` for a service account firebase-admin or google-auth
    rejects (wrong ``type``, unparsable key, missing fields, no ``project_id``).
    """
    project_id = service_account.get("project_id")
    if not isinstance(project_id, str) or not project_id:
        raise ValueError("the service account has no project_id")
    name = app_name(tenant_id)
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

    Calls ``app.credential.get_access_token()`` (a blocking POST of a signed JWT to
    the service account's ``token_uri`` through google-auth's ``requests``
    transport) via ``asyncio.to_thread``, so the event loop keeps running during
    the round trip. Concurrent calls for the same app share one refresh.

    Raises ``google.auth.exceptions.RefreshError`` when the token endpoint refuses
    the grant and ``google.auth.exceptions.TransportError`` when it cannot be reached.
    """
    key = id(app)
    task = _refreshes.get(key)
    if task is None:
        task = asyncio.create_task(_refresh(app), name=f"firebase-token-refresh-{app.name}")
        _refreshes[key] = task
        task.add_done_callback(lambda done: _refresh_finished(key, done))
    await asyncio.shield(task)


async def ensure_access_token(app: firebase_admin.App, margin_s: float = DEFAULT_REFRESH_MARGIN_S) -> None:
    """Refresh ``app``'s access token off the loop if :func:`access_token_needs_refresh` says so.

    Call before every send; same errors as :func:`refresh_access_token`.
    """
    if access_token_needs_refresh(app, margin_s):
        await refresh_access_token(app)


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


async def _refresh(app: firebase_admin.App) -> None:
    await asyncio.to_thread(app.credential.get_access_token)


def _refresh_finished(key: int, task: asyncio.Task[None]) -> None:
    if _refreshes.get(key) is task:
        del _refreshes[key]
    if not task.cancelled():
        task.exception()  # retrieved: every caller already got it, or none is left
