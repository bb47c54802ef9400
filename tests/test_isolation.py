"""Tenant isolation: no RPC reveals or touches another tenant's data.

Every NotificationService RPC that takes an object id is called with tenant
B's key on tenant A's object and must answer NOT_FOUND, leaving A's data as it
was (PaymentService's cases are in tests/test_payment_service.py,
``PAYMENT_ISOLATION_CASES``). Meta-tests fail when an RPC of either service
with an id field has no such case, and when the gateway's protos gain a
service that has neither isolation cases nor is operator-only. Every
TenantAdminService RPC refuses tenant keys altogether.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.protobuf.descriptor import Descriptor, ServiceDescriptor

from gateway.server import Gateway
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.payments.v1 import payments_pb2
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import row_counts, send_request
from tests.test_payment_service import PAYMENT_ISOLATION_CASES

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub

IsolationCase = Callable[["Stub", str, tuple[tuple[str, str], ...]], Awaitable[Any]]


async def _watch_first_message(stub: Stub, nid: str, md: tuple[tuple[str, str], ...]) -> Any:
    """WatchNotification is a stream: its status surfaces when the first message is read."""
    call = stub.WatchNotification(
        notify_pb2.WatchNotificationRequest(notification_id=nid), metadata=md, timeout=10
    )
    return await call.read()


#: RPC -> a call of it on notification ``nid`` with the given metadata.
ISOLATION_CASES: dict[str, IsolationCase] = {
    "GetNotification": lambda stub, nid, md: stub.GetNotification(
        notify_pb2.GetNotificationRequest(notification_id=nid), metadata=md
    ),
    "WatchNotification": _watch_first_message,
}


NOTIFICATION_SERVICE = notify_pb2.DESCRIPTOR.services_by_name["NotificationService"]
PAYMENT_SERVICE = payments_pb2.DESCRIPTOR.services_by_name["PaymentService"]
ADMIN_SERVICE = tenants_pb2.DESCRIPTOR.services_by_name["TenantAdminService"]
#: Service -> the RPCs with isolation cases (RPC name -> call).
CASES_BY_SERVICE: dict[str, Mapping[str, object]] = {
    NOTIFICATION_SERVICE.full_name: ISOLATION_CASES,
    PAYMENT_SERVICE.full_name: PAYMENT_ISOLATION_CASES,
}
#: Services no tenant key may call at all (test_every_admin_rpc_refuses_tenant_keys).
OPERATOR_ONLY = {ADMIN_SERVICE.full_name}


def _has_an_id(message: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``message`` or a message inside it has an object id field (``*_id`` but the
    idempotency key ``request_id``)."""
    seen = seen | {message.full_name}
    for field in message.fields:
        if field.name.endswith("_id") and field.name != "request_id":
            return True
        nested = field.message_type
        if nested is not None and nested.full_name not in seen and _has_an_id(nested, seen):
            return True
    return False


def rpcs_taking_an_id(service: ServiceDescriptor) -> set[str]:
    """Names of ``service``'s RPCs whose request carries an object id."""
    return {method.name for method in service.methods if _has_an_id(method.input_type)}


@pytest.mark.parametrize("service", [NOTIFICATION_SERVICE, PAYMENT_SERVICE], ids=lambda s: s.name)
def test_every_rpc_taking_an_id_has_an_isolation_case(service: ServiceDescriptor) -> None:
    with_ids = rpcs_taking_an_id(service)
    cases = set(CASES_BY_SERVICE[service.full_name])
    assert with_ids, f"{service.name}: no RPC takes an id? the id detection is broken"
    assert with_ids <= cases, f"add isolation cases for {service.name}: {sorted(with_ids - cases)}"
    assert cases <= {m.name for m in service.methods}, f"cases for RPCs {service.name} does not have"


def test_every_service_of_the_gateway_is_covered() -> None:
    services = {
        service.full_name
        for file in (notify_pb2.DESCRIPTOR, payments_pb2.DESCRIPTOR, tenants_pb2.DESCRIPTOR)
        for service in file.services_by_name.values()
    }
    assert services == set(CASES_BY_SERVICE) | OPERATOR_ONLY, (
        "a service needs isolation cases (or must refuse tenant keys): "
        f"{sorted(services - set(CASES_BY_SERVICE) - OPERATOR_ONLY)}"
    )


@pytest.mark.parametrize("rpc", sorted(ISOLATION_CASES))
async def test_another_tenants_object_is_not_found_and_unchanged(
    rpc: str, stub: Stub, tenant: TenantCredentials, other_tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    accepted = await stub.SendNotification(send_request(), metadata=tenant.metadata)
    before_counts = await row_counts(pool)
    before = await stub.GetNotification(
        notify_pb2.GetNotificationRequest(notification_id=accepted.notification_id), metadata=tenant.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ISOLATION_CASES[rpc](stub, accepted.notification_id, other_tenant.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert accepted.notification_id in (caught.value.details() or "")  # names what was asked, reveals nothing
    after = await stub.GetNotification(
        notify_pb2.GetNotificationRequest(notification_id=accepted.notification_id), metadata=tenant.metadata
    )
    assert after == before
    assert await row_counts(pool) == before_counts


@pytest.fixture
async def admin_channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield channel


ADMIN_METHODS = [m.name for m in ADMIN_SERVICE.methods]


@pytest.mark.parametrize("method", ADMIN_METHODS)
async def test_every_admin_rpc_refuses_tenant_keys(
    method: str, admin_channel: grpc.aio.Channel, tenant: TenantCredentials
) -> None:
    stub = tenants_pb2_grpc.TenantAdminServiceStub(admin_channel)
    descriptor = tenants_pb2.DESCRIPTOR.services_by_name["TenantAdminService"].methods_by_name[method]
    request_class = getattr(tenants_pb2, descriptor.input_type.name)
    request = request_class()
    if "tenant_id" in request_class.DESCRIPTOR.fields_by_name:
        request.tenant_id = str(tenant.tenant_id)  # its own id: still refused
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request, metadata=tenant.metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
