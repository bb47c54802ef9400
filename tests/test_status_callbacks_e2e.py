"""Status callbacks end to end: set through the admin API, every state change POSTed, signed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from aiohttp import web

from channels.callbacks import SIGNATURE_HEADER, verify_signature
from gateway.relay import make_callback_dispatcher
from gateway.server import Gateway
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import new_request_id, running_pipeline, send_request, wait_for
from tests.test_admin_api import OPERATOR

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, Any], str, bytes]]]]:
    """A callback endpoint on loopback recording (event, signature header, raw body)."""
    events: list[tuple[dict[str, Any], str, bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        events.append((json.loads(body), request.headers.get(SIGNATURE_HEADER, ""), body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks/switchboard", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hooks/switchboard", events
    await runner.cleanup()


async def test_every_state_change_is_posted_signed_and_delivery_never_waits(
    gateway: Gateway,
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    settings: Settings,
    receiver: tuple[str, list[tuple[dict[str, Any], str, bytes]]],
) -> None:
    url, events = receiver
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        admin = tenants_pb2_grpc.TenantAdminServiceStub(channel)
        created = await admin.SetStatusCallback(
            tenants_pb2.SetStatusCallbackRequest(
                request_id=new_request_id(), tenant_id=str(tenant.tenant_id), url=url
            ),
            metadata=OPERATOR,
        )
        got = await admin.GetStatusCallback(
            tenants_pb2.GetStatusCallbackRequest(tenant_id=str(tenant.tenant_id)), metadata=OPERATOR
        )
    secret = bytes.fromhex(created.signing_secret)
    assert got.callback.url == url
    assert created.signing_secret.encode() not in got.SerializeToString()

    accepted = await stub.SendNotification(
        send_request(channels=[notify_pb2.CHANNEL_SMS]), metadata=tenant.metadata
    )
    delivery_id = accepted.deliveries[0].delivery_id
    async with running_pipeline(pool, settings, channels=("sms",)):
        # Delivery completes with no dispatcher running at all: callbacks never block it.
        async def delivered() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT status = 'delivered' FROM deliveries WHERE id = $1::uuid", delivery_id
                )
            )

        await wait_for(delivered, timeout_s=60)
    assert events == []

    dispatcher = make_callback_dispatcher(pool, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await wait_for(lambda: _async(len(events) >= 2), timeout_s=30)
    finally:
        stop.set()
        await task
        await dispatcher.aclose()
    statuses = [event["status"] for event, _, _ in events]
    assert statuses == ["sending", "delivered"]
    for event, header, body in events:
        assert event["delivery_id"] == delivery_id
        assert verify_signature(secret, header, body)
        assert not verify_signature(b"x" * 32, header, body)


async def _async(value: bool) -> bool:
    return value
