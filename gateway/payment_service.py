"""PaymentService: the gRPC servicer for payments (transport only).

Validation lives in payments/validation.py, the one-transaction writes, reads
and idempotency in payments/store.py, the rules in payments/state_machine.py.
Every mutation is admitted by the tenant's rate limit, validated (INVALID_ARGUMENT
with ``BadRequest`` field violations, nothing written), then committed in one
PostgreSQL transaction and answered at once (ACCEPTED: the payment, capture or
refund as committed; the processor is called later by the payment worker).
Errors follow AIP-193 (``ErrorInfo`` reasons in docs/payments.md).

WatchPayment mirrors WatchNotification (gateway/status_stream.py): a
:class:`~gateway.status_stream.StatusHub` on :data:`payments.store.PAYMENT_STATUS_CHANNEL`
wakes the stream after each committed change, the stream re-reads the payment
and sends it when it differs; it ends after a final status.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from google.rpc import status_pb2

from gateway.auth import Authenticator
from gateway.errors import RpcError, invalid_argument, not_found, unavailable
from gateway.rpc import answer, database_errors_as_unavailable
from gateway.service import undecodable_field
from gateway.status_stream import SHUTDOWN_RETRY_AFTER_MS, StatusHub, status_hub_for, stream_answer
from gateway.validation import FieldViolation, RequestInvalid
from gateway.write_path import DEFAULT_IDEMPOTENCY_RETENTION_S
from payments import store
from payments.state_machine import FINAL_PAYMENT_STATUSES
from payments.validation import (
    parse_list_request,
    parse_payment_id,
    validate_cancel_request,
    validate_capture_request,
    validate_create_request,
    validate_refund_request,
)
from switchboard.db.pool import read_snapshot
from switchboard.payments.v1 import payments_pb2, payments_pb2_grpc

PAYMENT_SERVICE_NAME = payments_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name
#: Proto values of the statuses after which a payment's status never changes (Watch ends).
FINAL_PAYMENT_STATUS_VALUES = frozenset(store.PAYMENT_STATUS_PROTO[s] for s in FINAL_PAYMENT_STATUSES)


def _invalid(exc: RequestInvalid) -> RpcError:
    return RpcError(invalid_argument(exc.violations))


def _outcome(outcome: Any) -> Any:
    """The response, or raise the stored/derived error as ``RpcError``."""
    if isinstance(outcome, status_pb2.Status):
        raise RpcError(outcome)
    return outcome


class PaymentService(payments_pb2_grpc.PaymentServiceServicer):
    """Implements ``switchboard.payments.v1.PaymentService``.

    ``topic_prefix`` prefixes the ``payments.commands`` topic; ``idempotency_retention_s``
    is how long a request_id is remembered (seconds); ``lock_timeout_ms`` bounds the
    wait for a concurrent request's lock before ABORTED with ``RetryInfo``.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        authenticator: Authenticator,
        *,
        topic_prefix: str = "",
        idempotency_retention_s: float = DEFAULT_IDEMPOTENCY_RETENTION_S,
        lock_timeout_ms: int = store.DEFAULT_LOCK_TIMEOUT_MS,
    ) -> None:
        self._pool = pool
        self._auth = authenticator
        self._topic_prefix = topic_prefix
        self._retention_s = idempotency_retention_s
        self._lock_timeout_ms = lock_timeout_ms

    @property
    def authenticator(self) -> Authenticator:
        """The authenticator (also used to authenticate undecodable requests)."""
        return self._auth

    async def CreatePayment(
        self, request: payments_pb2.CreatePaymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> payments_pb2.CreatePaymentResponse:
        async def call() -> payments_pb2.CreatePaymentResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.admit(context.invocation_metadata(), cost=1)
                try:
                    plan = validate_create_request(request)
                except RequestInvalid as exc:
                    raise _invalid(exc) from None
                outcome = await store.create_payment(
                    self._pool,
                    tenant_id,
                    request,
                    plan,
                    topic_prefix=self._topic_prefix,
                    retention_s=self._retention_s,
                )
            response: payments_pb2.CreatePaymentResponse = _outcome(outcome)
            return response

        return await answer(context, call)

    async def CapturePayment(
        self, request: payments_pb2.CapturePaymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> payments_pb2.CapturePaymentResponse:
        async def call() -> payments_pb2.CapturePaymentResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.admit(context.invocation_metadata(), cost=1)
                try:
                    payment_id = validate_capture_request(request)
                except RequestInvalid as exc:
                    raise _invalid(exc) from None
                outcome = await store.capture_payment(
                    self._pool,
                    tenant_id,
                    request,
                    payment_id,
                    topic_prefix=self._topic_prefix,
                    retention_s=self._retention_s,
                    lock_timeout_ms=self._lock_timeout_ms,
                )
            response: payments_pb2.CapturePaymentResponse = _outcome(outcome)
            return response

        return await answer(context, call)

    async def CancelPayment(
        self, request: payments_pb2.CancelPaymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> payments_pb2.CancelPaymentResponse:
        async def call() -> payments_pb2.CancelPaymentResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.admit(context.invocation_metadata(), cost=1)
                try:
                    payment_id = validate_cancel_request(request)
                except RequestInvalid as exc:
                    raise _invalid(exc) from None
                outcome = await store.cancel_payment(
                    self._pool,
                    tenant_id,
                    request,
                    payment_id,
                    topic_prefix=self._topic_prefix,
                    retention_s=self._retention_s,
                    lock_timeout_ms=self._lock_timeout_ms,
                )
            response: payments_pb2.CancelPaymentResponse = _outcome(outcome)
            return response

        return await answer(context, call)

    async def RefundPayment(
        self, request: payments_pb2.RefundPaymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> payments_pb2.RefundPaymentResponse:
        async def call() -> payments_pb2.RefundPaymentResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.admit(context.invocation_metadata(), cost=1)
                try:
                    payment_id = validate_refund_request(request)
                except RequestInvalid as exc:
                    raise _invalid(exc) from None
                outcome = await store.refund_payment(
                    self._pool,
                    tenant_id,
                    request,
                    payment_id,
                    topic_prefix=self._topic_prefix,
                    retention_s=self._retention_s,
                    lock_timeout_ms=self._lock_timeout_ms,
                )
            response: payments_pb2.RefundPaymentResponse = _outcome(outcome)
            return response

        return await answer(context, call)

    async def GetPayment(
        self, request: payments_pb2.GetPaymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> payments_pb2.GetPaymentResponse:
        async def call() -> payments_pb2.GetPaymentResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.tenant_id(context.invocation_metadata())
                try:
                    payment_id = parse_payment_id(request.payment_id)
                except RequestInvalid as exc:
                    raise _invalid(exc) from None
                async with read_snapshot(self._pool) as conn:
                    payment = await store.get_payment(conn, tenant_id, payment_id)
            if payment is None:
                raise RpcError(not_found("payment", request.payment_id))
            return payments_pb2.GetPaymentResponse(payment=payment)

        return await answer(context, call)

    async def ListPayments(
        self, request: payments_pb2.ListPaymentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> payments_pb2.ListPaymentsResponse:
        async def call() -> payments_pb2.ListPaymentsResponse:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.tenant_id(context.invocation_metadata())
                try:
                    query = parse_list_request(request)
                except RequestInvalid as exc:
                    raise _invalid(exc) from None
                async with read_snapshot(self._pool) as conn:
                    payments, next_page_token = await store.list_payments(conn, tenant_id, query)
            return payments_pb2.ListPaymentsResponse(payments=payments, next_page_token=next_page_token)

        return await answer(context, call)

    async def WatchPayment(
        self, request: payments_pb2.WatchPaymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[payments_pb2.WatchPaymentResponse]:
        async def stream() -> AsyncGenerator[payments_pb2.WatchPaymentResponse, None]:
            async with database_errors_as_unavailable():
                tenant_id = await self._auth.tenant_id(context.invocation_metadata())
            try:
                payment_id = parse_payment_id(request.payment_id)
            except RequestInvalid as exc:
                raise _invalid(exc) from None
            hub = status_hub_for(self._pool, store.PAYMENT_STATUS_CHANNEL)
            async with contextlib.aclosing(watch_payment(self._pool, hub, tenant_id, payment_id)) as watch:
                async for response in watch:
                    yield response

        async for response in stream_answer(context, stream()):
            yield response


async def _read(pool: asyncpg.Pool, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> payments_pb2.Payment:
    async with database_errors_as_unavailable(), read_snapshot(pool) as conn:
        payment = await store.get_payment(conn, tenant_id, payment_id)
    if payment is None:
        raise RpcError(not_found("payment", str(payment_id)))
    return payment


async def watch_payment(
    pool: asyncpg.Pool, hub: StatusHub, tenant_id: uuid.UUID, payment_id: uuid.UUID
) -> AsyncGenerator[payments_pb2.WatchPaymentResponse, None]:
    """Yield payment ``payment_id`` of ``tenant_id`` now, then again after each change;
    return after yielding a final one (SUCCEEDED, FAILED, CANCELED).

    ``transition`` is unset on the first message; on a later one it is the newest
    status change since the previous message (a burst of changes is coalesced into
    one message showing the latest state; ``payment.transitions`` lists them all),
    and unset for a change that is not a status change (a capture or refund
    recorded, a cancel requested).

    Raises ``RpcError``: NOT_FOUND (unknown, or another tenant's: ids never cross
    tenants), UNAVAILABLE (database down, or the hub closed at shutdown). The
    subscription is removed however the iteration ends.
    """
    payment = await _read(pool, tenant_id, payment_id)
    yield payments_pb2.WatchPaymentResponse(payment=payment)
    if payment.status in FINAL_PAYMENT_STATUS_VALUES:
        return
    last = payment
    try:
        subscription = hub.subscribe(payment_id)
    except RuntimeError:
        raise RpcError(
            unavailable("the gateway is shutting down; watch again", SHUTDOWN_RETRY_AFTER_MS)
        ) from None
    try:
        while True:
            # Subscribed before this read: a change after it wakes the subscription,
            # and so does the resync of the listener's (re)connect.
            payment = await _read(pool, tenant_id, payment_id)
            if payment != last:
                response = payments_pb2.WatchPaymentResponse(payment=payment)
                new = payment.transitions[len(last.transitions) :]
                if new:
                    response.transition.CopyFrom(new[-1])
                yield response
                last = payment
            if payment.status in FINAL_PAYMENT_STATUS_VALUES:
                return
            if not await subscription.wait():
                raise RpcError(
                    unavailable("the gateway is shutting down; watch again", SHUTDOWN_RETRY_AFTER_MS)
                )
    finally:
        hub.unsubscribe(subscription)


# --- Registration with requests parsed in the servicer -------------------------------------------
#
# As for NotificationService (gateway/service.py): registered with a ``None`` deserializer the
# servicer gets the request's bytes, so an undecodable request (corrupt wire format, invalid UTF-8
# in a string field) is INVALID_ARGUMENT naming the field instead of grpc's UNKNOWN.


def _parsing(
    authenticator: Authenticator, method: Any, behavior: Callable[..., Any]
) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Any]:
    """``behavior`` taking the request's bytes: parse, or answer INVALID_ARGUMENT (after auth)."""
    request_type: Any = GetMessageClass(method.input_type)

    async def reject(data: bytes, context: grpc.aio.ServicerContext[Any, Any], error: DecodeError) -> None:
        async def call() -> None:
            async with database_errors_as_unavailable():
                await authenticator.tenant_id(context.invocation_metadata())
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


def add_payment_service_to_server(service: PaymentService, server: grpc.aio.Server) -> None:
    """Register ``service`` like the generated ``add_PaymentServiceServicer_to_server``, but
    with requests parsed in the servicer (undecodable ones are INVALID_ARGUMENT)."""
    descriptor = payments_pb2.DESCRIPTOR.services_by_name["PaymentService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        assert not method.client_streaming, "client streaming is not handled"
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            _parsing(service.authenticator, method, getattr(service, method.name)),
            request_deserializer=None,
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)  # type: ignore[attr-defined]
