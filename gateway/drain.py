"""Draining a gateway on shutdown: refuse new RPCs with UNAVAILABLE, let in-flight ones finish.

gRPC's own ``server.stop(grace)`` rejects calls that arrive during the grace
period with CANCELLED, which clients read as "the caller gave up". This
interceptor answers them UNAVAILABLE instead (AIP-193: retry, here on another
gateway) and counts calls in flight, so :meth:`DrainInterceptor.wait_idle`
knows when the drain is done. Health and reflection calls are never refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

_ALWAYS_SERVED = ("/grpc.health.", "/grpc.reflection.")
_REFUSAL = "this gateway is shutting down; retry (with the same request_id) on another one"


class DrainInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts unary calls and server streams in flight; refuses new ones once draining."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: Wrapped handlers by method name: built on a method's first call, reused after.
        self._handlers: dict[str, Any] = {}

    def start_draining(self) -> None:
        """From now on, new calls are answered UNAVAILABLE."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight, at most ``timeout_s`` s; ``True`` if idle."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = str(getattr(handler_call_details, "method", ""))
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(_ALWAYS_SERVED):
            return handler
        wrapped = self._wrap(handler)
        self._handlers[method] = wrapped
        return wrapped

    def _wrap(self, handler: Any) -> Any:
        """The counting/refusing version of ``handler`` (built once per method)."""
        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def unary_call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if self.draining:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, _REFUSAL)
                self._enter()
                try:
                    return await unary(request, context)
                finally:
                    self._leave()

            return grpc.unary_unary_rpc_method_handler(
                unary_call,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def stream_call(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if self.draining:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, _REFUSAL)
                self._enter()
                try:
                    async for item in stream(request, context):
                        yield item
                finally:
                    self._leave()

            return grpc.unary_stream_rpc_method_handler(
                stream_call,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
