"""NotificationService: the gRPC servicer (transport only; logic lives in
validation, write_path and status_queries)."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

import asyncpg
import grpc
import structlog

from gateway.auth import Authenticator
from gateway.errors import RpcError, invalid_argument, not_found
from gateway.rpc import answer, database_errors_as_unavailable
from gateway.status_queries import get_notification
from gateway.validation import FieldViolation, RequestInvalid, validate_batch_size, validate_send_request
from gateway.write_path import DEFAULT_IDEMPOTENCY_RETENTION_S, AcceptRequest, accept_notifications
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
    ) -> None:
        self._pool = pool
        self._auth = authenticator
        self._topic_prefix = topic_prefix
        self._retention_s = idempotency_retention_s

    async def SendNotification(
        self, request: notify_pb2.SendNotificationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notify_pb2.SendNotificationResponse:
        async def call() -> notify_pb2.SendNotificationResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.tenant_id(context.invocation_metadata())
                try:
                    plan = validate_send_request(request)
                except RequestInvalid as exc:
                    raise RpcError(invalid_argument(exc.violations)) from None
                (outcome,) = await accept_notifications(
                    self._pool,
                    tenant_id,
                    [AcceptRequest(request, plan)],
                    topic_prefix=self._topic_prefix,
                    retention_s=self._retention_s,
                )
            if isinstance(outcome, notify_pb2.SendNotificationResponse):
                return outcome
            raise RpcError(outcome)

        return await answer(context, call)

    async def SendNotificationBatch(
        self, request: notify_pb2.SendNotificationBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> notify_pb2.SendNotificationBatchResponse:
        async def call() -> notify_pb2.SendNotificationBatchResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.tenant_id(context.invocation_metadata())
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
                    outcomes = await accept_notifications(
                        self._pool,
                        tenant_id,
                        [a for _, a in valid],
                        topic_prefix=self._topic_prefix,
                        retention_s=self._retention_s,
                    )
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
                notification = await get_notification(self._pool, tenant_id, notification_id)
            if notification is None:
                raise RpcError(not_found("notification", request.notification_id))
            return notify_pb2.GetNotificationResponse(notification=notification)

        return await answer(context, call)
