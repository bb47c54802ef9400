"""WatchNotification: live notification status over PostgreSQL LISTEN/NOTIFY.

Every transaction that changes a delivery's status also runs
``pg_notify('switchboard_delivery_status', '<notification id>')``
(:func:`notify_delivery_status_changed`, called from channels/delivery.py).
PostgreSQL delivers a NOTIFY only after its transaction commits, so whoever
receives one can read the change.

:class:`StatusHub` keeps ONE listening connection per gateway process (per
pool, see :func:`status_hub_for`) and fans the notifications out to the
watching streams: each stream holds a :class:`Subscription`, an
``asyncio.Event`` registered under its notification id, which the hub sets on
every NOTIFY for that id. An event, unlike a queue, coalesces a burst of
changes into one wake-up, so a slow client costs one re-read and no memory;
the stream always re-reads the whole notification and sends it only if it
differs from what it sent last.

NOTIFY is not durable: whatever is sent while the listening connection is down
is lost. So after every (re)connect the hub wakes every subscription (a
resync) and each stream re-reads its notification before relying on
notifications again, as tenants/invalidation.py does for the tenant cache. A
``SELECT 1`` probe every ``probe_interval_s`` finds a dead connection.

Lifecycle: the hub starts listening on the first subscription, stops (and
returns the connection to the pool) when the last subscription ends, and
:meth:`StatusHub.close` stops it for good, ending every watch with
UNAVAILABLE (a client watches again, on another gateway if need be).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

import asyncpg
import grpc
import structlog
from google.rpc import status_pb2
from grpc_status import rpc_status

from gateway.errors import RpcError, not_found, unavailable
from gateway.rpc import database_errors_as_unavailable
from gateway.status_queries import FINAL_NOTIFICATION_STATUSES, get_notification
from switchboard.db.pool import Connection, read_snapshot
from switchboard.notify.v1 import notify_pb2

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: The LISTEN/NOTIFY channel; the payload is the notification id (text UUID).
DELIVERY_STATUS_CHANNEL = "switchboard_delivery_status"
#: How long a client should wait before watching again after the hub closed.
SHUTDOWN_RETRY_AFTER_MS = 1_000


async def notify_delivery_status_changed(tx: Connection, notification_id: str | uuid.UUID) -> None:
    """Announce a delivery status change of ``notification_id``; call it inside the
    transaction that makes the change (the NOTIFY is sent only if it commits)."""
    await tx.execute("SELECT pg_notify($1, $2)", DELIVERY_STATUS_CHANNEL, str(notification_id))


class Subscription:
    """One watching stream's registration for ``notification_id`` in a :class:`StatusHub`."""

    def __init__(self, notification_id: uuid.UUID) -> None:
        self.notification_id = notification_id
        self._changed = asyncio.Event()
        self._closed = False

    def _wake(self, *, closed: bool = False) -> None:
        self._closed = self._closed or closed
        self._changed.set()

    async def wait(self) -> bool:
        """Wait until the notification may have changed; ``False`` if the hub closed instead.

        Wake-ups that arrived since the previous call are coalesced into one.
        """
        await self._changed.wait()
        self._changed.clear()
        return not self._closed


class StatusHub:
    """Fans ``channel`` notifications (default ``switchboard_delivery_status``; payment
    watches use ``switchboard_payment_status``) out to subscriptions keyed by the UUID
    in the payload.

    Listens on one connection taken from ``pool`` while there is at least one
    subscription. ``connected`` is set while that connection is LISTENing;
    ``resyncs`` counts (re)connects, each of which woke every subscription.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        probe_interval_s: float = 1.0,
        reconnect_backoff_s: float = 0.5,
        channel: str = DELIVERY_STATUS_CHANNEL,
    ) -> None:
        self._pool = pool
        self._channel = channel
        self._probe_interval_s = probe_interval_s
        self._reconnect_backoff_s = reconnect_backoff_s
        self._subscriptions: dict[uuid.UUID, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        self._closed = False
        self.connected = asyncio.Event()
        self.resyncs = 0
        self.notifications_seen = 0
        #: The server process id of the listening connection (``None`` when not listening).
        self.backend_pid: int | None = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def subscriber_count(self) -> int:
        """How many subscriptions are registered."""
        return sum(len(s) for s in self._subscriptions.values())

    @property
    def listening(self) -> bool:
        """Whether the listener task is running (it stops when nobody watches)."""
        return self._task is not None

    def subscribe(self, notification_id: uuid.UUID) -> Subscription:
        """Register a subscription and start listening if not yet; raises ``RuntimeError`` once closed."""
        if self._closed:
            raise RuntimeError("the status hub is closed")
        subscription = Subscription(notification_id)
        self._subscriptions.setdefault(notification_id, set()).add(subscription)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="status-hub-listener")
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Remove ``subscription``; the listener stops once none is left."""
        found = self._subscriptions.get(subscription.notification_id)
        if found is not None:
            found.discard(subscription)
            if not found:
                del self._subscriptions[subscription.notification_id]
        if not self._subscriptions:
            self._poke.set()

    async def close(self) -> None:
        """Stop listening for good: every subscription's ``wait`` returns ``False``."""
        self._closed = True
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription._wake(closed=True)
        self._poke.set()
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def _wanted(self) -> bool:
        return bool(self._subscriptions) and not self._closed

    def _wake_all(self) -> None:
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription._wake()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            notification_id = uuid.UUID(str(payload))
        except ValueError:
            log.warning("ignoring malformed delivery status notification")
            return
        self.notifications_seen += 1
        for subscription in self._subscriptions.get(notification_id, ()):
            subscription._wake()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` unless poked (last subscription gone, or closed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._poke.wait(), seconds)
        self._poke.clear()

    async def _run(self) -> None:
        cancelled = False
        try:
            while self._wanted():
                try:
                    async with self._pool.acquire(timeout=self._probe_interval_s * 5) as conn:
                        await conn.add_listener(self._channel, self._notified)
                        try:
                            self.backend_pid = conn.get_server_pid()
                            # Anything may have changed while we were not listening.
                            self.resyncs += 1
                            self._wake_all()
                            self.connected.set()
                            while self._wanted():
                                await self._pause(self._probe_interval_s)
                                if self._wanted():
                                    await asyncio.wait_for(
                                        conn.execute("SELECT 1"), self._probe_interval_s * 5
                                    )
                        finally:
                            # UNLISTEN before the connection goes back to the pool (a
                            # broken one is discarded by the pool anyway).
                            with contextlib.suppress(Exception):
                                await asyncio.wait_for(
                                    conn.remove_listener(self._channel, self._notified),
                                    self._probe_interval_s * 5,
                                )
                except Exception as exc:  # connection lost or refused: resync after reconnecting
                    log.warning("status listener reconnecting", channel=self._channel, error=repr(exc))
                    self.connected.clear()
                    if self._wanted():
                        await self._pause(self._reconnect_backoff_s)
                finally:
                    self.connected.clear()
                    self.backend_pid = None
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._task = None
            # A subscription that arrived while we were leaving found the task still
            # set and started nothing: start again for it.
            if self._wanted() and not cancelled:
                self._task = asyncio.create_task(self._run(), name="status-hub-listener")


_hubs: dict[tuple[int, str], tuple[asyncpg.Pool, StatusHub]] = {}


def status_hub_for(pool: asyncpg.Pool, channel: str = DELIVERY_STATUS_CHANNEL) -> StatusHub:
    """The process's shared hub for ``pool`` and ``channel`` (created on first use; a
    closed one is replaced)."""
    entry = _hubs.get((id(pool), channel))
    if entry is None or entry[0] is not pool or entry[1].closed:
        entry = (pool, StatusHub(pool, channel=channel))
        _hubs[(id(pool), channel)] = entry  # the pool is kept alive with it, so its id is not reused
    return entry[1]


async def close_status_hubs() -> None:
    """Close every hub of this process (gateway shutdown); watches end with UNAVAILABLE."""
    hubs = [hub for _, hub in _hubs.values()]
    _hubs.clear()
    await asyncio.gather(*(hub.close() for hub in hubs))


def _shutting_down() -> status_pb2.Status:
    return unavailable("the gateway is shutting down; watch again", SHUTDOWN_RETRY_AFTER_MS)


async def _read(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, notification_id: uuid.UUID
) -> notify_pb2.Notification:
    async with database_errors_as_unavailable(), read_snapshot(pool) as conn:
        notification = await get_notification(conn, tenant_id, notification_id)
    if notification is None:
        raise RpcError(not_found("notification", str(notification_id)))
    return notification


async def watch_notification(
    pool: asyncpg.Pool, hub: StatusHub, tenant_id: uuid.UUID, notification_id: uuid.UUID
) -> AsyncGenerator[notify_pb2.Notification, None]:
    """Yield ``notification_id`` of ``tenant_id`` now, then again after each change;
    return after yielding a final one (DELIVERED, PARTIALLY_DELIVERED or FAILED,
    fallback chains as in ``notification_status``).

    Raises ``RpcError``: NOT_FOUND (unknown, or another tenant's: ids never
    cross tenants), UNAVAILABLE (database down, or the hub closed). The
    subscription is removed however the iteration ends, including cancellation
    when the client's deadline passes or it goes away.
    """
    notification = await _read(pool, tenant_id, notification_id)
    yield notification
    if notification.status in FINAL_NOTIFICATION_STATUSES:
        return
    last = notification
    try:
        subscription = hub.subscribe(notification_id)
    except RuntimeError:
        raise RpcError(_shutting_down()) from None
    try:
        while True:
            # Subscribed before this read: a change after it wakes the subscription,
            # and so does the resync of the listener's (re)connect.
            notification = await _read(pool, tenant_id, notification_id)
            if notification != last:
                yield notification
                last = notification
            if notification.status in FINAL_NOTIFICATION_STATUSES:
                return
            if not await subscription.wait():
                raise RpcError(_shutting_down())
    finally:
        hub.unsubscribe(subscription)


async def stream_answer(
    context: grpc.aio.ServicerContext[Any, Any], stream: AsyncGenerator[T, None]
) -> AsyncIterator[T]:
    """Relay ``stream`` for a server-streaming servicer method; an ``RpcError`` aborts
    the RPC with its rich status (AIP-193 details in ``grpc-status-details-bin``),
    like ``gateway.rpc.answer`` for unary methods. ``stream`` is closed however
    the relay ends."""
    try:
        async with contextlib.aclosing(stream):
            async for item in stream:
                yield item
    except RpcError as exc:
        status = rpc_status.to_status(exc.status)
        await context.abort(status.code, status.details, status.trailing_metadata)
