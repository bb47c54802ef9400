"""Shared servicer plumbing: turning RpcError and database outages into gRPC statuses."""

from __future__ import annotations

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

_DATABASE_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError)


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


async def answer(context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call`` for a servicer method; an ``RpcError`` aborts the RPC with its
    rich status (code, message and details in the ``grpc-status-details-bin`` trailer)."""
    try:
        return await call()
    except RpcError as exc:
        status = rpc_status.to_status(exc.status)
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("abort returned") from exc
