"""Idempotency keys of TenantAdminService: AIP-155 ``request_id`` with Stripe's semantics.

Every mutating admin RPC runs through :meth:`AdminIdempotency.run`, the
operator-scoped twin of the payment mutations' ``_mutate``
(payments/store.py), reusing its request fingerprint and answer encoding.
Semantics (https://docs.stripe.com/api/idempotent_requests, AIP-155,
docs/idempotency.md):

- **Scope: the operator.** The admin API has one caller identity, the operator
  token, so its keys form one key space (table ``admin_idempotency_keys``,
  migration 0015), apart from every tenant's keys. The key is not tied to the
  token's value: a retry across an operator-token rotation still replays. A
  key does not carry the tenant it acts on; the tenant is part of the request,
  so the same key for another tenant is a different request.
- **First use:** in ONE transaction the key is inserted, the change is made and
  its answer (the response, or the error the change ended with) is stored with
  the key. An error rolls the change back to a savepoint first, so only the key
  and its error commit: never a partial change.
- **Same key, same request, within the retention window:** the stored answer,
  errors included; nothing is changed.
- **Same key, different request** (other values, or another RPC):
  FAILED_PRECONDITION ``IDEMPOTENCY_KEY_REUSED``; nothing is changed.
- **Concurrent calls with one key:** the later ones wait on the key's row (its
  primary key) until the first commits, then replay its answer; one that waits
  longer than ``lock_timeout_ms`` is ABORTED ``IDEMPOTENCY_KEY_IN_FLUX`` with
  ``RetryInfo`` (nothing written, safe to retry as it is).
- **Expired keys** (older than the retention window) are taken over as unused
  and deleted by the relay's reaper (``gateway.relay.reap_idempotency_keys``).
- **Not stored:** a request that fails validation (the caller checks it before
  calling :meth:`AdminIdempotency.run`), and database failures (the
  transaction rolls back; the client retries with the same key).

Secrets: a request carrying provider or processor secrets is compared by an
HMAC under a master-key subkey (:meth:`tenants.sealing.MasterKeyRing.keyed_digest`),
not by a plain SHA-256 that would let anyone reading the table test guesses of
a password. Answers carrying a secret (CreateApiKey's key, SetStatusCallback's
signing secret) are stored with the secret removed and a ``*_withheld`` flag
set: a replay returns everything but the secret, which exists nowhere at rest
(only a hash of an API key is ever stored).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TypeAlias, TypeVar

import asyncpg
from google.protobuf.message import Message
from google.rpc import status_pb2

from gateway.errors import (
    RpcError,
    concurrent_change,
    failed_precondition,
    idempotency_key_reused,
    key_in_flux,
)
from gateway.idempotency import decode_outcome, encode_outcome, request_fingerprint
from gateway.write_path import DEFAULT_IDEMPOTENCY_RETENTION_S
from payments.store import DEFAULT_LOCK_TIMEOUT_MS
from switchboard.db.pool import Connection
from switchboard.tenants.v1 import tenants_pb2
from tenants.sealing import MasterKeyRing

R = TypeVar("R", bound=Message)

#: Every TenantAdminService request that changes something: each carries a ``request_id``.
AdminMutation: TypeAlias = (
    tenants_pb2.CreateTenantRequest
    | tenants_pb2.UpdateTenantRequest
    | tenants_pb2.DisableTenantRequest
    | tenants_pb2.EnableTenantRequest
    | tenants_pb2.CreateApiKeyRequest
    | tenants_pb2.RevokeApiKeyRequest
    | tenants_pb2.SetProviderConfigRequest
    | tenants_pb2.DeleteProviderConfigRequest
    | tenants_pb2.SetProcessorConfigRequest
    | tenants_pb2.DeleteProcessorConfigRequest
    | tenants_pb2.SetStatusCallbackRequest
    | tenants_pb2.DeleteStatusCallbackRequest
)

#: Insert the key, or take it over when it is past the retention window ($4, seconds);
#: returns a row only then. A key another transaction inserted but has not committed
#: makes this wait (unique index) and then see it.
_KEY_SQL = """
INSERT INTO admin_idempotency_keys AS ik (request_id, request_hash, hash_key_id, response)
VALUES ($1, $2, $3, '')
ON CONFLICT (request_id) DO UPDATE
   SET request_hash = excluded.request_hash, hash_key_id = excluded.hash_key_id,
       response = excluded.response, created_at = now()
 WHERE ik.created_at < now() - make_interval(secs => $4)
RETURNING true AS fresh"""


class AdminIdempotency:
    """Runs admin mutations once per operator ``request_id``; see the module docstring.

    ``key_ring`` keys the hashes of requests carrying secrets (``None``: such
    requests cannot be run, the caller refuses them first). ``retention_s``:
    seconds a key is remembered (``SWITCHBOARD_IDEMPOTENCY_RETENTION_S``).
    ``lock_timeout_ms``: how long a call waits for a concurrent call's key, or
    for a row another change holds, before ABORTED with ``RetryInfo``.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        key_ring: MasterKeyRing | None,
        *,
        retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
        lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
    ) -> None:
        self._pool = pool
        self._key_ring = key_ring
        self._retention_s = retention_s
        self._lock_timeout_ms = lock_timeout_ms

    def require_key_ring(self) -> MasterKeyRing:
        """The master key ring, or ``RpcError`` FAILED_PRECONDITION ``MASTER_KEY_MISSING`` without one."""
        if self._key_ring is None:
            raise RpcError(
                failed_precondition(
                    "MASTER_KEY_MISSING", "SWITCHBOARD_MASTER_KEY is not set: secrets cannot be sealed"
                )
            )
        return self._key_ring

    def request_hash(self, request: AdminMutation, *, keyed: bool) -> tuple[bytes, str | None]:
        """The stored hash of ``request`` (32 bytes) and the master key id keying it (``None``: unkeyed).

        Unkeyed: :func:`gateway.idempotency.request_fingerprint`, SHA-256 over the
        method (the request's full type name: one per RPC) and the deterministic
        encoding. Keyed (requests carrying secrets): HMAC-SHA256 of that digest
        under the current master key's digest subkey. Raises ``RpcError``
        (FAILED_PRECONDITION ``MASTER_KEY_MISSING``) for a keyed hash without a key ring.
        """
        digest = request_fingerprint(request.DESCRIPTOR.full_name, request)
        if not keyed:
            return digest, None
        ring = self.require_key_ring()
        return ring.keyed_digest(digest), ring.current_key_id

    async def run(
        self,
        request: AdminMutation,
        response_type: type[R],
        write: Callable[[Connection], Awaitable[R]],
        *,
        keyed: bool = False,
        stored_form: Callable[[R], R] | None = None,
    ) -> R:
        """Answer ``request`` once for its ``request_id``; return the response or raise ``RpcError``.

        ``write(conn)`` makes the change on ``conn`` inside the transaction that
        holds the key and returns the response; an ``RpcError`` it raises is the
        answer (stored, then raised). ``keyed``: the request carries secrets
        (see :meth:`request_hash`). ``stored_form`` maps the response to what is
        stored and replayed (e.g. without its secret). The caller has validated
        ``request`` (its ``request_id`` included). Database failures propagate
        as asyncpg's exceptions; nothing is written then.
        """
        request_hash, hash_key_id = self.request_hash(request, keyed=keyed)
        request_id = request.request_id
        outcome: R | status_pb2.Status | None = None
        locking = "key"
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                timeout = f"{self._lock_timeout_ms}ms"
                await conn.execute("SELECT set_config('lock_timeout', $1, true)", timeout)
                retention_s = self._retention_s
                fresh = await conn.fetchval(_KEY_SQL, request_id, request_hash, hash_key_id, retention_s)
                if fresh:
                    locking = "change"
                    stored: R | status_pb2.Status
                    try:
                        async with conn.transaction():  # a savepoint: an error undoes the change only
                            response = await write(conn)
                        outcome = response
                        stored = stored_form(response) if stored_form is not None else response
                    except RpcError as exc:
                        outcome = stored = exc.status
                    await conn.execute(
                        "UPDATE admin_idempotency_keys SET response = $2 WHERE request_id = $1",
                        request_id,
                        encode_outcome(stored),
                    )
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            # Rolled back: nothing was written; the same request may be sent again as it is.
            if locking == "key":
                raise RpcError(key_in_flux(request_id)) from None
            raise RpcError(
                concurrent_change(
                    "another change holds what this request changes; retry with the same request_id"
                )
            ) from None
        if outcome is None:
            outcome = await self._replay(request, request_hash, hash_key_id, response_type)
        if isinstance(outcome, status_pb2.Status):
            raise RpcError(outcome)
        return outcome

    async def _replay(
        self, request: AdminMutation, request_hash: bytes, hash_key_id: str | None, response_type: type[R]
    ) -> R | status_pb2.Status:
        """The answer for a key used before: the stored one, or why there is none."""
        request_id = request.request_id
        existing = await self._pool.fetchrow(
            "SELECT request_hash, hash_key_id, response FROM admin_idempotency_keys WHERE request_id = $1",
            request_id,
        )
        if existing is None:
            # Reaped between our conflict and our read: the key is free again.
            return key_in_flux(request_id)
        stored_key_id: str | None = existing["hash_key_id"]
        if stored_key_id != hash_key_id:
            # Compare in the stored record's scheme: recompute this request's hash that way.
            ring = self._key_ring
            digest = request_fingerprint(request.DESCRIPTOR.full_name, request)
            if stored_key_id is None:
                request_hash = digest
            elif ring is None or stored_key_id not in ring:
                return failed_precondition(
                    "IDEMPOTENCY_KEY_UNVERIFIABLE",
                    f"request_id {request_id!r} was first used with a request hashed under master key "
                    f"{stored_key_id!r}, which is no longer in SWITCHBOARD_MASTER_KEY: it cannot be "
                    "compared with this request; use a new request_id",
                )
            else:
                request_hash = ring.keyed_digest(digest, stored_key_id)
        if not hmac.compare_digest(existing["request_hash"], request_hash):
            return idempotency_key_reused(request_id)
        try:
            return decode_outcome(existing["response"], response_type)
        except ValueError:
            return idempotency_key_reused(request_id)
