"""Group commit: concurrent accepts of several tenants share statements, each answered after its commit."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from gateway.validation import validate_send_request
from gateway.write_path import AcceptRequest, GroupCommit
from switchboard.notify.v1 import notify_pb2
from tests.conftest import TenantCredentials
from tests.helpers import row_counts, send_request


def accept_request(**overrides: object) -> AcceptRequest:
    request = send_request(**overrides)
    return AcceptRequest(request, validate_send_request(request))


async def test_concurrent_calls_of_two_tenants_share_commits_and_get_their_own_answers(
    pool: asyncpg.Pool, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    writes = GroupCommit(pool, writers=2)
    calls = [(tenant if i % 2 else other_tenant, [accept_request()]) for i in range(60)]
    results = await asyncio.gather(*(writes.accept(t.tenant_id, items) for t, items in calls))

    assert writes.calls == 60
    assert writes.statements < 60  # calls queued behind the two writers were written together
    ids = {(o.notification_id) for (o,) in results if isinstance(o, notify_pb2.SendNotificationResponse)}
    assert len(ids) == 60
    rows = await pool.fetch("SELECT id, tenant_id, request_id FROM notifications")
    owner = {(r["tenant_id"], r["request_id"]) for r in rows}
    assert owner == {(t.tenant_id, items[0].request.request_id) for t, items in calls}
    counts = await row_counts(pool)
    assert counts["deliveries"] == counts["outbox"] == 180


async def test_one_request_id_in_two_tenants_in_one_group_is_two_notifications(
    pool: asyncpg.Pool, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    writes = GroupCommit(pool, writers=1)
    shared = str(uuid.uuid4())
    blocker = writes.accept(tenant.tenant_id, [accept_request()])  # holds the only writer
    a = writes.accept(tenant.tenant_id, [accept_request(request_id=shared)])
    b = writes.accept(other_tenant.tenant_id, [accept_request(request_id=shared)])
    _, (first,), (second,) = await asyncio.gather(blocker, a, b)
    assert isinstance(first, notify_pb2.SendNotificationResponse)
    assert isinstance(second, notify_pb2.SendNotificationResponse)
    assert first.notification_id != second.notification_id
    assert writes.statements == 2


async def test_a_database_error_fails_every_call_of_the_group_and_writes_nothing(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    writes = GroupCommit(pool, writers=1)
    unknown_tenant = uuid.uuid4()  # violates the foreign key: the whole statement fails
    results = await asyncio.gather(
        writes.accept(tenant.tenant_id, [accept_request()]),
        writes.accept(unknown_tenant, [accept_request()]),
        writes.accept(tenant.tenant_id, [accept_request()]),
        return_exceptions=True,
    )
    assert isinstance(results[0], list)  # the first call had the writer to itself
    assert all(isinstance(r, asyncpg.ForeignKeyViolationError) for r in results[1:])
    assert (await row_counts(pool))["notifications"] == 1


async def test_a_caller_that_gave_up_while_queued_is_not_written(
    pool: asyncpg.Pool, tenant: TenantCredentials
) -> None:
    writes = GroupCommit(pool, writers=1)
    running = asyncio.ensure_future(writes.accept(tenant.tenant_id, [accept_request()]))
    queued = asyncio.ensure_future(writes.accept(tenant.tenant_id, [accept_request()]))
    await asyncio.sleep(0)  # both are submitted; the first holds the writer
    queued.cancel()
    await running
    with pytest.raises(asyncio.CancelledError):
        await queued
    await writes.wait_idle()
    assert (await row_counts(pool))["notifications"] == 1
