"""Cross-process invalidation of tenant caches (PostgreSQL LISTEN/NOTIFY).

Every admin change that matters to other processes commits a
``NOTIFY switchboard_tenant_changes, '<tenant id>'`` (tenants/store.py).
:class:`TenantChangeListener` keeps one dedicated connection LISTENing and
calls ``on_change(tenant_id)`` for each notification. NOTIFY is not durable:
whatever is sent while the connection is down is lost, so after every
(re)connect it calls ``on_resync()`` — a full invalidation — before relying on
notifications again. A cheap liveness probe every ``probe_interval_s`` finds a
dead connection within that time. Each notification received is logged at
INFO (``tenant change received``, with the tenant id), so a process's log shows
when a change reached it; the connection is named ``switchboard-tenant-listener``
in ``pg_stat_activity``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

import asyncpg
import structlog

from tenants.store import TENANT_CHANGES_CHANNEL

log = structlog.get_logger(__name__)

APPLICATION_NAME = "switchboard-tenant-listener"
"""``application_name`` of the listening connection (visible in ``pg_stat_activity``)."""


class TenantChangeListener:
    """LISTENs for tenant changes on ``dsn`` until :meth:`stop`.

    ``connected`` is set while the connection is up (after the resync that follows each
    connect); ``disconnected`` is set while it is not (at first, and from the moment a lost
    connection is noticed until the next connect). ``changes_seen`` counts notifications,
    ``resyncs`` (re)connects.
    """

    def __init__(
        self,
        dsn: str,
        on_change: Callable[[uuid.UUID], None],
        on_resync: Callable[[], None],
        *,
        probe_interval_s: float = 1.0,
        reconnect_backoff_s: float = 0.5,
    ) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._on_resync = on_resync
        self._probe_interval_s = probe_interval_s
        self._reconnect_backoff_s = reconnect_backoff_s
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnected.set()
        self.changes_seen = 0
        self.resyncs = 0
        self._change_seen = asyncio.Event()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            tenant_id = uuid.UUID(str(payload))
        except ValueError:
            log.warning("ignoring malformed tenant change notification")
            return
        self.changes_seen += 1
        self._change_seen.set()
        log.info("tenant change received", tenant_id=str(tenant_id))
        self._on_change(tenant_id)

    async def wait_for_changes(self, count: int) -> None:
        """Return once ``changes_seen`` is at least ``count`` (notifications received since start)."""
        while self.changes_seen < count:
            self._change_seen.clear()
            await self._change_seen.wait()

    def stop(self) -> None:
        """Close the connection and return from :meth:`run`."""
        self._stopping.set()

    async def run(self) -> None:
        """Listen, probe, reconnect and resync until stopped."""
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._probe_interval_s * 5,
                    server_settings={"application_name": APPLICATION_NAME},
                )
                await conn.add_listener(TENANT_CHANGES_CHANNEL, self._notified)
                # Anything may have changed while we were not listening.
                self.resyncs += 1
                self._on_resync()
                self.disconnected.clear()
                self.connected.set()
                while not self._stopping.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self._probe_interval_s)
                    await asyncio.wait_for(conn.execute("SELECT 1"), self._probe_interval_s * 5)
            except Exception as exc:  # connection lost or refused: resync after reconnecting
                log.warning("tenant change listener reconnecting", error=repr(exc))
                self.connected.clear()
                self.disconnected.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._reconnect_backoff_s)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)
        self.connected.clear()
        self.disconnected.set()
