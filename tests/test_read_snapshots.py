"""Reads made of several statements see one snapshot (switchboard.db.pool.read_snapshot):
a commit landing between the statements of GetPayment / GetNotification never tears them."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from gateway import status_queries
from gateway.server import Gateway
from payments import store
from payments.state_machine import PaymentStatus
from switchboard.db.pool import read_snapshot
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.payments.v1 import payments_pb2
from tests.conftest import TenantCredentials
from tests.helpers import send_request
from tests.test_payment_service import create, drive, payments_stub  # noqa: F401

if TYPE_CHECKING:
    from tests.test_payment_service import PaymentStub


def commit_in_between(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, change: Callable[[], Any]
) -> list[int]:
    """Make ``module.name`` (a read helper called after the first statement) commit ``change()``
    on another connection before it runs; return a list counting the interleavings."""
    original = getattr(module, name)
    done: list[int] = []

    async def interleaved(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(1)
            await change()
        return await original(*args, **kwargs)

    monkeypatch.setattr(module, name, interleaved)
    return done


async def test_a_snapshot_does_not_see_a_commit_made_after_its_first_read(pool: asyncpg.Pool) -> None:
    await pool.execute("CREATE TABLE snap (x int)")
    async with read_snapshot(pool) as conn:
        assert await conn.fetchval("SELECT count(*) FROM snap") == 0
        await pool.execute("INSERT INTO snap VALUES (1)")  # committed by another connection
        assert await conn.fetchval("SELECT count(*) FROM snap") == 0
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("INSERT INTO snap VALUES (2)")
    assert await pool.fetchval("SELECT count(*) FROM snap") == 1


async def test_get_payment_is_not_torn_by_a_commit_between_its_statements(
    payments_stub: PaymentStub,  # noqa: F811
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payment = await create(payments_stub, tenant)

    async def succeed() -> None:
        await drive(pool, tenant.tenant_id, payment.payment_id, PaymentStatus.SUCCEEDED)

    interleaved = commit_in_between(monkeypatch, store, "_children", succeed)
    seen = (
        await payments_stub.GetPayment(
            payments_pb2.GetPaymentRequest(payment_id=payment.payment_id), metadata=tenant.metadata
        )
    ).payment
    assert interleaved == [1]
    # The whole answer is from before the commit: the status and the history agree.
    assert seen.status == payments_pb2.PAYMENT_STATUS_REQUIRES_PROCESSING
    assert [t.to_status for t in seen.transitions] == [payments_pb2.PAYMENT_STATUS_REQUIRES_PROCESSING]
    assert list(seen.attempts) == []
    after = (
        await payments_stub.GetPayment(
            payments_pb2.GetPaymentRequest(payment_id=payment.payment_id), metadata=tenant.metadata
        )
    ).payment
    assert after.status == payments_pb2.PAYMENT_STATUS_SUCCEEDED
    assert after.transitions[-1].to_status == payments_pb2.PAYMENT_STATUS_SUCCEEDED


async def test_get_notification_is_not_torn_by_a_commit_between_its_statements(
    gateway: Gateway,
    stub: notify_pb2_grpc.NotificationServiceAsyncStub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    del gateway
    accepted = await stub.SendNotification(send_request(), metadata=tenant.metadata)
    notification_id = uuid.UUID(accepted.notification_id)

    async def deliver_all() -> None:
        await pool.execute(
            "UPDATE deliveries SET status = 'delivered', updated_at = now() WHERE notification_id = $1",
            notification_id,
        )

    original_fetch = status_queries.get_notification

    async def read(conn: Any, tenant_id: uuid.UUID, nid: uuid.UUID) -> Any:
        # Run the real read with a connection whose second statement comes after our commit.
        class Interleaving:
            async def fetchrow(self, *args: Any) -> Any:
                return await conn.fetchrow(*args)

            async def fetch(self, *args: Any) -> Any:
                await deliver_all()
                return await conn.fetch(*args)

        return await original_fetch(Interleaving(), tenant_id, nid)  # type: ignore[arg-type]

    monkeypatch.setattr("gateway.service.get_notification", read)
    seen = (
        await stub.GetNotification(
            notify_pb2.GetNotificationRequest(notification_id=accepted.notification_id),
            metadata=tenant.metadata,
        )
    ).notification
    assert {d.status for d in seen.deliveries} == {notify_pb2.DELIVERY_STATUS_QUEUED}
    monkeypatch.undo()
    after = (
        await stub.GetNotification(
            notify_pb2.GetNotificationRequest(notification_id=accepted.notification_id),
            metadata=tenant.metadata,
        )
    ).notification
    assert {d.status for d in after.deliveries} == {notify_pb2.DELIVERY_STATUS_DELIVERED}
