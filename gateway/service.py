"""NotificationService: the gRPC servicer (transport only; logic lives in
validation, write_path and status_queries)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import asyncpg
import grpc
import structlog
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from gateway.auth import Authenticator
from gateway.errors import RpcError, invalid_argument, not_found
from gateway.rpc import answer, database_errors_as_unavailable
from gateway.status_queries import get_notification, list_notifications, parse_list_request
from gateway.status_stream import status_hub_for, stream_answer, watch_notification
from gateway.validation import FieldViolation, RequestInvalid, validate_batch_size, validate_send_request
from gateway.write_path import DEFAULT_IDEMPOTENCY_RETENTION_S, AcceptRequest, GroupCommit
from switchboard.db.pool import read_snapshot
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc

log = structlog.get_logger(__name__)
T = TypeVar("T")


class NotificationService(notify_pb2_grpc.NotificationServiceServicer):
    """Implements ``switchboard.notify.v1.NotificationService``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        authenticator: Authenticator,
        *,
        topic_prefix: str = "",
        idempotency_retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
        write_concurrency: int = 4,
    ) -> None:
        self._pool = pool
        self._auth = authenticator
        self._topic_prefix = topic_prefix
        self._retention_s = idempotency_retention_s
        #: Accepts go through group commit (gateway.write_path.GroupCommit).
        self.writes = GroupCommit(
            pool, topic_prefix=topic_prefix, retention_s=idempotency_retention_s, writers=write_concurrency
        )

    async def SendNotification(
        self, request: notify_pb2.SendNotificationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notify_pb2.SendNotificationResponse:
        async def call() -> notify_pb2.SendNotificationResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.admit(context.invocation_metadata(), cost=1)
                try:
                    plan = validate_send_request(request)
                except RequestInvalid as exc:
                    raise RpcError(invalid_argument(exc.violations)) from None
                (outcome,) = await self.writes.accept(tenant_id, [AcceptRequest(request, plan)])
            if isinstance(outcome, notify_pb2.SendNotificationResponse):
                return outcome
            raise RpcError(outcome)

        return await answer(context, call)

    async def SendNotificationBatch(
        self, request: notify_pb2.SendNotificationBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notify_pb2.SendNotificationBatchResponse:
        async def call() -> notify_pb2.SendNotificationBatchResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.admit(
                    context.invocation_metadata(), cost=max(1, len(request.requests))
                )
                size_violations = validate_batch_size(len(request.requests))
                if size_violations:
                    raise RpcError(invalid_argument(size_violations))
                results = [notify_pb2.SendNotificationBatchResult() for _ in request.requests]
                valid: list[tuple[int, AcceptRequest]] = []
                for index, item in enumerate(request.requests):
                    try:
                        valid.append((index, AcceptRequest(item, validate_send_request(item))))
                    except RequestInvalid as exc:
                        results[index].error.CopyFrom(invalid_argument(exc.violations))
                if valid:
                    outcomes = await self.writes.accept(tenant_id, [a for _, a in valid])
                    for (index, _), outcome in zip(valid, outcomes, strict=True):
                        if isinstance(outcome, notify_pb2.SendNotificationResponse):
                            results[index].response.CopyFrom(outcome)
                        else:
                            results[index].error.CopyFrom(outcome)
            return notify_pb2.SendNotificationBatchResponse(results=results)

        return await answer(context, call)

    async def GetNotification(
        self, request: notify_pb2.GetNotificationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notify_pb2.GetNotificationResponse:
        async def call() -> notify_pb2.GetNotificationResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.tenant_id(context.invocation_metadata())
                try:
                    notification_id = uuid.UUID(request.notification_id)
                except ValueError:
                    raise RpcError(
                        invalid_argument(
                            [
                                FieldViolation(
                                    field="notification_id", description="must be a notification id (UUID)"
                                )
                            ]
                        )
                    ) from None
                async with read_snapshot(self._pool) as conn:
                    notification = await get_notification(conn, tenant_id, notification_id)
            if notification is None:
                raise RpcError(not_found("notification", request.notification_id))
            return notify_pb2.GetNotificationResponse(notification=notification)

        return await answer(context, call)

    async def ListNotifications(
        self, request: notify_pb2.ListNotificationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notify_pb2.ListNotificationsResponse:
        async def call() -> notify_pb2.ListNotificationsResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.tenant_id(context.invocation_metadata())
                try:
                    query = parse_list_request(request)
                except RequestInvalid as exc:
                    raise RpcError(invalid_argument(exc.violations)) from None
                async with read_snapshot(self._pool) as conn:
                    notifications, next_page_token = await list_notifications(conn, tenant_id, query)
            return notify_pb2.ListNotificationsResponse(
                notifications=notifications, next_page_token=next_page_token
            )

        return await answer(context, call)

    async def WatchNotification(
        self, request: notify_pb2.WatchNotificationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notify_pb2.WatchNotificationResponse]:
        async def stream() -> AsyncGenerator[notify_pb2.WatchNotificationResponse, None]:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.tenant_id(context.invocation_metadata())
            try:
                notification_id = uuid.UUID(request.notification_id)
            except ValueError:
                raise RpcError(
                    invalid_argument(
                        [
                            FieldViolation(
                                field="notification_id", description="must be a notification id (UUID)"
                            )
                        ]
                    )
                ) from None
            hub = status_hub_for(self._pool)
            async with contextlib.aclosing(
                watch_notification(self._pool, hub, tenant_id, notification_id)
            ) as watch:
                async for notification in watch:
                    yield notify_pb2.WatchNotificationResponse(notification=notification)

        async for response in stream_answer(context, stream()):
            yield response


# --- Parsing requests in the servicer ------------------------------------------------------------
#
# grpc parses a request with the handler's ``request_deserializer`` before the servicer runs; an
# undecodable one (corrupt wire format, invalid UTF-8 in a string field) is answered by grpc itself
# with UNKNOWN "Unexpected <class 'DecodeError'>: ...". Registered with a ``None`` deserializer the
# servicer gets the bytes, and parsing them here turns that into INVALID_ARGUMENT naming the field.

_STRING = FieldDescriptor.TYPE_STRING


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError: truncated
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
        if shift > 63:
            raise IndexError("varint too long")


def undecodable_field(data: bytes, descriptor: Descriptor, path: str = "") -> str | None:
    """Best effort: the path of the field that makes ``data`` undecodable as ``descriptor`` (a
    string with invalid UTF-8, or a message whose wire format is corrupt: ``path`` itself, which is
    ``""`` for the request); ``None`` if no such field is found. Maps are named without a key."""
    seen: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if pos > len(data) or field is None:
                    continue
                name = f"{path}.{field.name}" if path else field.name
                index = seen[number] = seen.get(number, -1) + 1
                inner = field.message_type
                if inner is not None and inner.GetOptions().map_entry:
                    if undecodable_field(chunk, inner) is not None:
                        return name
                elif inner is not None:
                    found = undecodable_field(chunk, inner, f"{name}[{index}]" if field.is_repeated else name)
                    if found is not None:
                        return found
                elif field.type == _STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return f"{name}[{index}]" if field.is_repeated else name
            else:
                return path
    except IndexError:
        return path
    return path if pos > len(data) else None


def _parsing(
    service: NotificationService, method: MethodDescriptor, behavior: Callable[..., Any]
) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Any]:
    """``behavior`` taking the request's bytes: parse, or answer INVALID_ARGUMENT (after auth)."""
    request_type: Any = GetMessageClass(method.input_type)

    async def reject(data: bytes, context: grpc.aio.ServicerContext[Any, Any], error: DecodeError) -> None:
        async def call() -> None:
            async with database_errors_as_unavailable():
                await service._auth.tenant_id(context.invocation_metadata())
            found = undecodable_field(data, method.input_type)
            description = f"not a decodable {method.input_type.name} (protobuf wire format): {error}"
            raise RpcError(invalid_argument([FieldViolation(field=found or "", description=description)]))

        await answer(context, call)

    if method.server_streaming:

        async def stream(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                request = request_type.FromString(data)
            except DecodeError as error:
                await reject(data, context, error)
                return
            async for response in behavior(request, context):
                yield response

        return stream

    async def unary(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = request_type.FromString(data)
        except DecodeError as error:
            await reject(data, context, error)
            raise AssertionError("abort returned") from error
        return await behavior(request, context)

    return unary


def add_notification_service_to_server(service: NotificationService, server: grpc.aio.Server) -> None:
    """Register ``service`` like the generated ``add_NotificationServiceServicer_to_server``, but
    with requests parsed in the servicer: an undecodable request is INVALID_ARGUMENT with a
    ``BadRequest`` naming the field where it can be found, instead of grpc's UNKNOWN."""
    descriptor = notify_pb2.DESCRIPTOR.services_by_name["NotificationService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        assert not method.client_streaming, "client streaming is not handled"
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            _parsing(service, method, getattr(service, method.name)),
            request_deserializer=None,
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)  # type: ignore[attr-defined]
