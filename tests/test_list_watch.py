"""ListNotifications (AIP-158 pages, filters, tenant scope) and WatchNotification
(LISTEN/NOTIFY fan-out, resync, deadlines, shutdown) over gRPC."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from channels.sandbox import SandboxProvider
from gateway.status_queries import notification_status
from gateway.status_stream import (
    DELIVERY_STATUS_CHANNEL,
    StatusHub,
    close_status_hubs,
    notify_delivery_status_changed,
    status_hub_for,
)
from switchboard.db.pool import Connection
from switchboard.notify.v1 import events_pb2, notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from tests.conftest import TenantCredentials
from tests.helpers import running_pipeline, send_request, wait_for
from tests.test_gateway import rich_status, violations

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub
    WatchCall = grpc.aio.UnaryStreamCall[
        notify_pb2.WatchNotificationRequest, notify_pb2.WatchNotificationResponse
    ]

N = notify_pb2
FINAL = {
    N.NOTIFICATION_STATUS_DELIVERED,
    N.NOTIFICATION_STATUS_PARTIALLY_DELIVERED,
    N.NOTIFICATION_STATUS_FAILED,
}


def sms_request(**overrides: object) -> notify_pb2.SendNotificationRequest:
    """An SMS-only request (the sandbox provider delivers it)."""
    request = notify_pb2.SendNotificationRequest(
        request_id=str(uuid.uuid4()),
        channels=[N.CHANNEL_SMS],
        recipient=N.Recipient(phone_number="+14155550123"),
        sms=N.SmsContent(text="hi"),
    )
    for name, value in overrides.items():
        field = getattr(request, name)
        if isinstance(value, list):
            del field[:]
            field.extend(value)
        else:
            setattr(request, name, value)
    return request


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


async def list_all(stub: Stub, md: Any, page_size: int, **filters: Any) -> tuple[list[str], int]:
    """Every id over every page (in order) and the number of pages."""
    ids: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = await stub.ListNotifications(
            N.ListNotificationsRequest(page_size=page_size, page_token=token, **filters), metadata=md
        )
        pages += 1
        assert len(reply.notifications) <= page_size
        ids += [n.notification_id for n in reply.notifications]
        token = reply.next_page_token
        if not token:
            return ids, pages
        assert pages < 1000, "pagination does not end"


async def newest_first(pool: asyncpg.Pool, tenant_id: uuid.UUID) -> list[str]:
    rows = await pool.fetch(
        "SELECT id FROM notifications WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC", tenant_id
    )
    return [str(r["id"]) for r in rows]


# ---------------------------------------------------------------- ListNotifications


async def test_pages_cover_every_notification_once_newest_first(
    stub: Stub, tenant: TenantCredentials, other_tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    # A batch commits in one transaction: its notifications share created_at, so
    # the id must break ties for the pages to be stable.
    await stub.SendNotificationBatch(
        N.SendNotificationBatchRequest(requests=[sms_request() for _ in range(12)]), metadata=tenant.metadata
    )
    for _ in range(11):
        await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    await stub.SendNotification(sms_request(), metadata=other_tenant.metadata)
    expected = await newest_first(pool, tenant.tenant_id)
    assert len(expected) == 23
    for page_size in (1, 5, 12, 23, 1000):
        ids, pages = await list_all(stub, tenant.metadata, page_size)
        assert ids == expected, page_size
        assert pages == -(-23 // page_size)
    reply = await stub.ListNotifications(N.ListNotificationsRequest(page_size=3), metadata=tenant.metadata)
    first = reply.notifications[0]
    assert first.status == N.NOTIFICATION_STATUS_ACCEPTED
    assert [d.channel for d in first.deliveries] == [N.CHANNEL_SMS]
    assert first.deliveries[0].status == N.DELIVERY_STATUS_QUEUED


async def test_page_size_zero_means_fifty(stub: Stub, tenant: TenantCredentials) -> None:
    await stub.SendNotificationBatch(
        N.SendNotificationBatchRequest(requests=[sms_request() for _ in range(51)]), metadata=tenant.metadata
    )
    reply = await stub.ListNotifications(N.ListNotificationsRequest(), metadata=tenant.metadata)
    assert len(reply.notifications) == 50
    rest = await stub.ListNotifications(
        N.ListNotificationsRequest(page_token=reply.next_page_token), metadata=tenant.metadata
    )
    assert len(rest.notifications) == 1
    assert rest.next_page_token == ""


async def test_only_the_callers_notifications_are_listed(
    stub: Stub, tenant: TenantCredentials, other_tenant: TenantCredentials
) -> None:
    mine = {(await stub.SendNotification(sms_request(), metadata=tenant.metadata)).notification_id}
    theirs = {(await stub.SendNotification(sms_request(), metadata=other_tenant.metadata)).notification_id}
    assert set((await list_all(stub, tenant.metadata, 10))[0]) == mine
    assert set((await list_all(stub, other_tenant.metadata, 10))[0]) == theirs
    # A token carries no tenant: used by another tenant it pages through that tenant's data only.
    await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    first = await stub.ListNotifications(N.ListNotificationsRequest(page_size=1), metadata=tenant.metadata)
    borrowed = await stub.ListNotifications(
        N.ListNotificationsRequest(page_size=10, page_token=first.next_page_token),
        metadata=other_tenant.metadata,
    )
    assert {n.notification_id for n in borrowed.notifications} <= theirs


async def insert_notification(
    conn: Connection,
    tenant_id: uuid.UUID,
    statuses: Iterable[str],
    *,
    chain: tuple[str, ...] = (),
    channels: tuple[str, ...] = ("email", "sms", "push"),
    created_at: datetime | None = None,
) -> str:
    """A notification with one delivery per status (as the worker would leave them)."""
    notification_id = uuid.uuid4()
    await conn.execute(
        """INSERT INTO notifications (id, tenant_id, request_id, fallback_channels, created_at)
           VALUES ($1, $2, $3, $4, coalesce($5, now()))""",
        notification_id,
        tenant_id,
        str(notification_id),
        list(chain),
        created_at,
    )
    for position, status in enumerate(statuses):
        channel = chain[position] if chain else channels[position]
        await conn.execute(
            """INSERT INTO deliveries (id, notification_id, tenant_id, channel, recipient, status, event,
                                       chain_position)
               VALUES ($1, $2, $3, $4, 'r', $5, $6, $7)""",
            uuid.uuid4(),
            notification_id,
            tenant_id,
            channel,
            status,
            events_pb2.DeliveryRequested().SerializeToString(),
            position if chain else 0,
        )
    return str(notification_id)


STATUS_FILTERS = [
    N.NOTIFICATION_STATUS_ACCEPTED,
    N.NOTIFICATION_STATUS_DELIVERED,
    N.NOTIFICATION_STATUS_PARTIALLY_DELIVERED,
    N.NOTIFICATION_STATUS_FAILED,
]


async def test_status_filter_in_sql_agrees_with_notification_status_on_every_combination(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    delivery_statuses = ("queued", "sending", "delivered", "failed")
    expected: dict[notify_pb2.NotificationStatus.ValueType, set[str]] = {s: set() for s in STATUS_FILTERS}
    async with pool.acquire() as conn, conn.transaction():
        # Plain notifications: 0 to 3 deliveries in every status combination.
        for count in range(4):
            for combo in itertools.combinations_with_replacement(delivery_statuses, count):
                nid = await insert_notification(conn, tenant.tenant_id, combo)
                expected[notification_status(combo)].add(nid)
        # Fallback chains of 2 and 3 channels, partway along or at the end of the chain.
        for chain in (("push", "sms"), ("push", "sms", "email")):
            for tried in range(len(chain) + 1):
                for combo in itertools.product(delivery_statuses, repeat=tried):
                    nid = await insert_notification(conn, tenant.tenant_id, combo, chain=chain)
                    expected[notification_status(combo, len(chain))].add(nid)
    assert all(expected.values())
    for status, ids in expected.items():
        listed, _ = await list_all(stub, tenant.metadata, 7, status=status)
        assert set(listed) == ids, N.NotificationStatus.Name(status)
        assert len(listed) == len(ids)
    everything, _ = await list_all(stub, tenant.metadata, 1000)
    assert len(everything) == sum(len(v) for v in expected.values())
    # The status in each answer is the one filtered on.
    reply = await stub.ListNotifications(
        N.ListNotificationsRequest(page_size=1000, status=N.NOTIFICATION_STATUS_PARTIALLY_DELIVERED),
        metadata=tenant.metadata,
    )
    assert {n.status for n in reply.notifications} == {N.NOTIFICATION_STATUS_PARTIALLY_DELIVERED}


async def test_channel_filter_matches_deliveries_and_fallback_chains(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    sms = (await stub.SendNotification(sms_request(), metadata=tenant.metadata)).notification_id
    email = (
        await stub.SendNotification(send_request(channels=[N.CHANNEL_EMAIL]), metadata=tenant.metadata)
    ).notification_id
    every = (await stub.SendNotification(send_request(), metadata=tenant.metadata)).notification_id
    chain = (
        await stub.SendNotification(
            send_request(channels=[], fallback_channels=[N.CHANNEL_PUSH, N.CHANNEL_SMS]),
            metadata=tenant.metadata,
        )
    ).notification_id
    # Only the chain's first channel has a delivery so far; SMS is still addressed.
    assert await pool.fetchval(
        "SELECT array_agg(channel) FROM deliveries WHERE notification_id = $1", uuid.UUID(chain)
    ) == ["push"]
    cases = {
        N.CHANNEL_SMS: {sms, every, chain},
        N.CHANNEL_EMAIL: {email, every},
        N.CHANNEL_PUSH: {every, chain},
        N.CHANNEL_UNSPECIFIED: {sms, email, every, chain},
    }
    for channel, ids in cases.items():
        listed, _ = await list_all(stub, tenant.metadata, 2, channel=channel)
        assert set(listed) == ids, N.Channel.Name(channel)
        assert len(listed) == len(ids)
    # Filters combine: SMS notifications that are DELIVERED.
    await pool.execute(
        "UPDATE deliveries SET status = 'delivered' WHERE notification_id = $1", uuid.UUID(sms)
    )
    listed, _ = await list_all(
        stub, tenant.metadata, 2, channel=N.CHANNEL_SMS, status=N.NOTIFICATION_STATUS_DELIVERED
    )
    assert listed == [sms]


async def test_create_time_bounds_are_exclusive(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    base = datetime(2030, 1, 1, tzinfo=UTC)
    ids = {}
    async with pool.acquire() as conn:
        for minute in range(5):
            ids[minute] = await insert_notification(
                conn, tenant.tenant_id, ["queued"], created_at=base + timedelta(minutes=minute)
            )

    async def between(after: int | None, before: int | None, **extra: Any) -> list[str]:
        filters: dict[str, Any] = dict(extra)
        if after is not None:
            filters["create_time_after"] = timestamp(base + timedelta(minutes=after))
        if before is not None:
            filters["create_time_before"] = timestamp(base + timedelta(minutes=before))
        return (await list_all(stub, tenant.metadata, 2, **filters))[0]

    assert await between(1, 4) == [ids[3], ids[2]]
    assert await between(None, 2) == [ids[1], ids[0]]
    assert await between(2, None) == [ids[4], ids[3]]
    assert await between(None, None) == [ids[m] for m in (4, 3, 2, 1, 0)]
    # Sub-microsecond bounds: 1 ns past minute 3 still includes minute 3 as "before".
    before = timestamp(base + timedelta(minutes=3))
    before.nanos += 1
    reply = await stub.ListNotifications(
        N.ListNotificationsRequest(create_time_before=before, page_size=10), metadata=tenant.metadata
    )
    assert [n.notification_id for n in reply.notifications] == [ids[3], ids[2], ids[1], ids[0]]


INVALID_LIST_CASES: list[tuple[str, dict[str, Any]]] = [
    ("page_size", {"page_size": -1}),
    ("page_size", {"page_size": 1001}),
    ("page_token", {"page_token": "not-a-token"}),
    ("page_token", {"page_token": "W10"}),  # valid base64 of "[]"
    ("status", {"status": 42}),
    ("channel", {"channel": N.CHANNEL_ALL}),
    ("channel", {"channel": 42}),
    (
        "create_time_before",
        {
            "create_time_after": timestamp(datetime(2030, 1, 2, tzinfo=UTC)),
            "create_time_before": timestamp(datetime(2030, 1, 1, tzinfo=UTC)),
        },
    ),
    (
        "create_time_before",
        {
            "create_time_after": timestamp(datetime(2030, 1, 1, tzinfo=UTC)),
            "create_time_before": timestamp(datetime(2030, 1, 1, tzinfo=UTC)),
        },
    ),
    ("create_time_after", {"create_time_after": timestamp_pb2.Timestamp(seconds=-(10**12))}),
]


@pytest.mark.parametrize(
    ("field", "fields"), INVALID_LIST_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(INVALID_LIST_CASES)]
)
async def test_invalid_list_request_names_the_field(
    stub: Stub, tenant: TenantCredentials, field: str, fields: dict[str, Any]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListNotifications(N.ListNotificationsRequest(**fields), metadata=tenant.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(rich_status(caught.value))


async def test_page_token_is_only_valid_with_the_same_filters(stub: Stub, tenant: TenantCredentials) -> None:
    for _ in range(3):
        await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    first = await stub.ListNotifications(
        N.ListNotificationsRequest(page_size=1, channel=N.CHANNEL_SMS), metadata=tenant.metadata
    )
    assert first.next_page_token
    # Another page size is fine (AIP-158); other filters are not.
    await stub.ListNotifications(
        N.ListNotificationsRequest(page_size=5, channel=N.CHANNEL_SMS, page_token=first.next_page_token),
        metadata=tenant.metadata,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListNotifications(
            N.ListNotificationsRequest(page_size=1, page_token=first.next_page_token),
            metadata=tenant.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in violations(rich_status(caught.value))


async def test_list_needs_a_key(stub: Stub, tenant: TenantCredentials) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListNotifications(N.ListNotificationsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------- WatchNotification


def watch(stub: Stub, md: Any, notification_id: str, timeout: float | None = None) -> WatchCall:
    return stub.WatchNotification(
        N.WatchNotificationRequest(notification_id=notification_id), metadata=md, timeout=timeout
    )


async def next_message(call: WatchCall, timeout_s: float = 20.0) -> notify_pb2.Notification | None:
    """The next notification on the stream, or ``None`` at its end."""
    message = await asyncio.wait_for(call.read(), timeout_s)
    if not isinstance(message, notify_pb2.WatchNotificationResponse):  # grpc.aio.EOF
        return None
    return message.notification


async def collect(call: WatchCall, timeout_s: float = 30.0) -> list[notify_pb2.Notification]:
    """Every message until the stream ends."""
    messages = []
    while (message := await next_message(call, timeout_s)) is not None:
        messages.append(message)
    return messages


def delivery_statuses(messages: Iterable[notify_pb2.Notification]) -> list[list[str]]:
    return [[N.DeliveryStatus.Name(d.status) for d in m.deliveries] for m in messages]


async def set_status(
    pool: asyncpg.Pool, notification_id: str, channel: str, status: str, *, notify: bool = True
) -> None:
    """Change a delivery as a worker would (with the NOTIFY unless ``notify`` is false)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """UPDATE deliveries SET status = $3, updated_at = clock_timestamp()
                WHERE notification_id = $1 AND channel = $2""",
            uuid.UUID(notification_id),
            channel,
            status,
        )
        if notify:
            await notify_delivery_status_changed(conn, notification_id)


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail after ``timeout_s``."""

    async def check() -> bool:
        return predicate()

    await wait_for(check, timeout_s=timeout_s)


async def no_subscribers(hub: StatusHub) -> None:
    """The hub has no subscription left and has stopped listening."""
    await until(lambda: hub.subscriber_count == 0 and not hub.listening)


async def test_watch_follows_queued_sending_delivered_and_ends(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The sandbox answers in microseconds; hold each send briefly so SENDING is observable.
    original_send = SandboxProvider.send

    async def slow_send(self: SandboxProvider, event: events_pb2.DeliveryRequested) -> Any:
        await asyncio.sleep(0.5)
        return await original_send(self, event)

    monkeypatch.setattr(SandboxProvider, "send", slow_send)
    accepted = await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    call = watch(stub, tenant.metadata, accepted.notification_id, timeout=60)
    first = await next_message(call)
    assert first is not None
    assert first.status == N.NOTIFICATION_STATUS_ACCEPTED
    assert delivery_statuses([first]) == [["DELIVERY_STATUS_QUEUED"]]
    hub = status_hub_for(pool)
    await until(lambda: hub.connected.is_set())
    async with running_pipeline(pool, settings, channels=("sms",)):
        rest = await collect(call)
    assert delivery_statuses(rest) == [["DELIVERY_STATUS_SENDING"], ["DELIVERY_STATUS_DELIVERED"]]
    assert [m.status for m in rest] == [N.NOTIFICATION_STATUS_ACCEPTED, N.NOTIFICATION_STATUS_DELIVERED]
    assert rest[-1].deliveries[0].provider == "sandbox"
    assert rest[-1].deliveries[0].attempts == 1
    assert await call.code() == grpc.StatusCode.OK
    await no_subscribers(hub)


async def test_watch_of_a_final_notification_sends_it_once_and_ends(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    accepted = await stub.SendNotification(send_request(), metadata=tenant.metadata)
    await pool.execute(
        """UPDATE deliveries SET status = CASE channel WHEN 'sms' THEN 'failed' ELSE 'delivered' END
            WHERE notification_id = $1""",
        uuid.UUID(accepted.notification_id),
    )
    hub = status_hub_for(pool)
    resyncs = hub.resyncs
    messages = await collect(watch(stub, tenant.metadata, accepted.notification_id, timeout=10))
    assert [m.status for m in messages] == [N.NOTIFICATION_STATUS_PARTIALLY_DELIVERED]
    # Nothing to wait for, so nothing was listened to.
    assert hub.resyncs == resyncs
    assert hub.subscriber_count == 0


async def test_watch_of_a_fallback_chain_lasts_until_the_chain_is_final(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    accepted = await stub.SendNotification(
        send_request(channels=[], fallback_channels=[N.CHANNEL_PUSH, N.CHANNEL_SMS]), metadata=tenant.metadata
    )
    nid = accepted.notification_id
    call = watch(stub, tenant.metadata, nid, timeout=30)
    assert (await next_message(call)) is not None
    hub = status_hub_for(pool)
    await until(lambda: hub.subscriber_count == 1 and hub.connected.is_set())
    # The first channel failing is not final for a chain: the next one is created.
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE deliveries SET status = 'failed' WHERE notification_id = $1", uuid.UUID(nid)
        )
        await insert_chain_delivery(conn, tenant.tenant_id, nid, "sms", 1)
        await notify_delivery_status_changed(conn, nid)
    second = await next_message(call)
    assert second is not None
    assert second.status == N.NOTIFICATION_STATUS_ACCEPTED
    assert delivery_statuses([second]) == [["DELIVERY_STATUS_FAILED", "DELIVERY_STATUS_QUEUED"]]
    await set_status(pool, nid, "sms", "delivered")
    third = await next_message(call)
    assert third is not None
    assert third.status == N.NOTIFICATION_STATUS_DELIVERED
    assert await next_message(call) is None
    assert await call.code() == grpc.StatusCode.OK


async def insert_chain_delivery(
    conn: Connection, tenant_id: uuid.UUID, notification_id: str, channel: str, position: int
) -> None:
    await conn.execute(
        """INSERT INTO deliveries (id, notification_id, tenant_id, channel, recipient, event, chain_position)
           VALUES ($1, $2, $3, $4, 'r', $5, $6)""",
        uuid.uuid4(),
        uuid.UUID(notification_id),
        tenant_id,
        channel,
        b"",
        position,
    )


async def test_watch_respects_the_client_deadline_and_unsubscribes(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    accepted = await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    call = watch(stub, tenant.metadata, accepted.notification_id, timeout=1.5)
    assert (await next_message(call)) is not None
    hub = status_hub_for(pool)
    await until(lambda: hub.subscriber_count == 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_message(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await no_subscribers(hub)


async def test_a_client_going_away_unsubscribes(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    accepted = await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    calls = [watch(stub, tenant.metadata, accepted.notification_id) for _ in range(3)]
    for call in calls:
        assert (await next_message(call)) is not None
    hub = status_hub_for(pool)
    await until(lambda: hub.subscriber_count == 3)
    calls[0].cancel()
    await until(lambda: hub.subscriber_count == 2)
    # The others still get the change, each one copy.
    await set_status(pool, accepted.notification_id, "sms", "sending")
    for call in calls[1:]:
        message = await next_message(call)
        assert message is not None
        assert delivery_statuses([message]) == [["DELIVERY_STATUS_SENDING"]]
    for call in calls[1:]:
        call.cancel()
    await no_subscribers(hub)


async def test_a_lost_listener_connection_resyncs_every_watcher(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    accepted = await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    nid = accepted.notification_id
    call = watch(stub, tenant.metadata, nid, timeout=30)
    assert (await next_message(call)) is not None
    hub = status_hub_for(pool)
    await until(lambda: hub.subscriber_count == 1 and hub.backend_pid is not None)
    resyncs, pid = hub.resyncs, hub.backend_pid
    # A change whose NOTIFY is lost (as if sent while the listener was down) ...
    await set_status(pool, nid, "sms", "sending", notify=False)
    # ... is picked up by the re-read after the listener reconnects.
    assert await pool.fetchval("SELECT pg_terminate_backend($1)", pid)
    message = await next_message(call)
    assert message is not None
    assert delivery_statuses([message]) == [["DELIVERY_STATUS_SENDING"]]
    assert hub.resyncs == resyncs + 1
    assert hub.backend_pid != pid
    # And notifications flow again on the new connection.
    await until(lambda: hub.connected.is_set())
    await set_status(pool, nid, "sms", "delivered")
    last = await next_message(call)
    assert last is not None
    assert last.status == N.NOTIFICATION_STATUS_DELIVERED
    assert await next_message(call) is None


async def test_closing_the_hub_ends_watches_with_unavailable(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    accepted = await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    call = watch(stub, tenant.metadata, accepted.notification_id, timeout=30)
    assert (await next_message(call)) is not None
    hub = status_hub_for(pool)
    await until(lambda: hub.subscriber_count == 1)
    await close_status_hubs()  # what Gateway.stop() does
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_message(call)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert hub.closed
    assert not hub.listening
    # A new watch gets a new hub.
    again = watch(stub, tenant.metadata, accepted.notification_id, timeout=30)
    assert (await next_message(again)) is not None
    assert status_hub_for(pool) is not hub
    again.cancel()


async def test_notifications_of_other_ids_do_not_wake_a_watcher(pool: asyncpg.Pool) -> None:
    hub = StatusHub(pool, probe_interval_s=0.1)
    watched, other = uuid.uuid4(), uuid.uuid4()
    subscription = hub.subscribe(watched)
    try:
        await asyncio.wait_for(hub.connected.wait(), 10)
        assert await asyncio.wait_for(subscription.wait(), 1)  # the connect's resync
        await pool.execute("SELECT pg_notify($1, $2)", DELIVERY_STATUS_CHANNEL, str(other))
        await pool.execute("SELECT pg_notify($1, 'not-a-uuid')", DELIVERY_STATUS_CHANNEL)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(subscription.wait(), 0.5)
        await pool.execute("SELECT pg_notify($1, $2)", DELIVERY_STATUS_CHANNEL, str(watched))
        assert await asyncio.wait_for(subscription.wait(), 5)
        assert hub.notifications_seen == 2
    finally:
        hub.unsubscribe(subscription)
    await no_subscribers(hub)
    await hub.close()
    with pytest.raises(RuntimeError):
        hub.subscribe(watched)


@pytest.mark.parametrize(
    ("notification_id", "code"),
    [("nope", grpc.StatusCode.INVALID_ARGUMENT), (str(uuid.uuid4()), grpc.StatusCode.NOT_FOUND)],
)
async def test_watch_of_a_bad_or_unknown_id(
    stub: Stub, tenant: TenantCredentials, notification_id: str, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_message(watch(stub, tenant.metadata, notification_id, timeout=10))
    assert caught.value.code() == code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert "notification_id" in violations(rich_status(caught.value))


async def test_watch_of_another_tenants_notification_is_not_found(
    stub: Stub, tenant: TenantCredentials, other_tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    accepted = await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_message(watch(stub, other_tenant.metadata, accepted.notification_id, timeout=10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert status_hub_for(pool).subscriber_count == 0


async def test_watch_needs_a_key(stub: Stub, tenant: TenantCredentials) -> None:
    accepted = await stub.SendNotification(sms_request(), metadata=tenant.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_message(watch(stub, (), accepted.notification_id, timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
