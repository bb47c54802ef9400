"""Shared servicer plumbing: turning RpcError and database outages into gRPC statuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import grpc
import structlog
from grpc_status import rpc_status

from gateway.errors import RpcError, unavailable

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: How long a client should wait before retrying when PostgreSQL is unreachable.
DATABASE_RETRY_AFTER_MS = 1_000

_DATABASE_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
    # SQLSTATE 57P01-57P03: the server is shutting down, crashed, or is still
    # starting up / recovering (seen right after a PostgreSQL restart).
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    # A pooled connection left mid-operation when the server died under it
    # ("cannot switch to state ...; another operation is in progress").
    asyncpg.InternalClientError,
)


@asynccontextmanager
async def database_errors_as_unavailable() -> AsyncIterator[None]:
    """Turn connection-level database failures into UNAVAILABLE (safe to retry
    with the same request_id: the transaction either committed or did not)."""
    try:
        yield
    except _DATABASE_ERRORS as exc:
        log.warning("database unavailable", error=type(exc).__name__)
        raise RpcError(
            unavailable(
                "the database is unavailable; retry with the same request_id", DATABASE_RETRY_AFTER_MS
            )
        ) from exc


#: Work on an RPC without a client deadline is bounded by this (seconds).
DEFAULT_RPC_BUDGET_S = 30.0
#: Answer this long before the client's deadline, so the answer arrives in time (seconds).
DEADLINE_MARGIN_S = 0.05


def rpc_budget_s(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    """Seconds the servicer may work: the client's remaining deadline less a margin, or the default."""
    remaining = context.time_remaining()
    if remaining is None or remaining > DEFAULT_RPC_BUDGET_S:
        return DEFAULT_RPC_BUDGET_S
    return max(0.0, remaining - DEADLINE_MARGIN_S)


async def answer(context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call`` for a servicer method within the client's deadline; an
    ``RpcError`` aborts the RPC with its rich status (code, message and details
    in the ``grpc-status-details-bin`` trailer).

    Work that would outlive the deadline (a database that stopped answering)
    is cancelled and answered UNAVAILABLE with ``RetryInfo`` just before the
    deadline: the request either committed or did not, so a retry with the
    same request_id is safe.
    """
    try:
        try:
            async with asyncio.timeout(rpc_budget_s(context)):
                return await call()
        except TimeoutError:
            log.warning("rpc ran out of time")
            raise RpcError(
                unavailable(
                    "the request ran out of time; retry with the same request_id", DATABASE_RETRY_AFTER_MS
                )
            ) from None
    except RpcError as exc:
        status = rpc_status.to_status(exc.status)
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("abort returned") from exc
