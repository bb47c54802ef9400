"""Tenant isolation: no RPC reveals or touches another tenant's data.

Every NotificationService RPC that takes an object id is called with tenant
B's key on tenant A's object and must answer NOT_FOUND, leaving A's data as it
was; a meta-test fails when an RPC with an id field has no such case. Every
TenantAdminService RPC refuses tenant keys altogether.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest

from gateway.server import Gateway
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import row_counts, send_request

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


def test_every_rpc_taking_an_id_has_an_isolation_case() -> None:
    service = notify_pb2.DESCRIPTOR.services_by_name["NotificationService"]
    with_ids = {
        method.name
        for method in service.methods
        if any(f.name.endswith("_id") and f.name != "request_id" for f in method.input_type.fields)
    }
    assert with_ids <= set(ISOLATION_CASES), (
        f"add isolation cases for {sorted(with_ids - set(ISOLATION_CASES))}"
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


ADMIN_METHODS = [m.name for m in tenants_pb2.DESCRIPTOR.services_by_name["TenantAdminService"].methods]


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
