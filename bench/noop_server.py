"""The bare-gRPC baseline: a grpc.aio server whose NotificationService does nothing.

``python -m bench.noop_server --port N`` serves SendNotification and
SendNotificationBatch with the generated servicer, decoding each request and
answering a fixed ACCEPTED response (one per batch item), on uvloop like the
gateway. What separates our accept path from this ceiling is exactly our own
work: authentication, validation, idempotency and the durable commit.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import grpc
import uvloop

from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc

_ID = str(uuid.UUID(int=1))


def _accepted(request: notify_pb2.SendNotificationRequest) -> notify_pb2.SendNotificationResponse:
    response = notify_pb2.SendNotificationResponse(
        notification_id=_ID, status=notify_pb2.NOTIFICATION_STATUS_ACCEPTED
    )
    for channel in request.channels:
        response.deliveries.add(channel=channel, delivery_id=_ID)
    return response


class NoopNotificationService(notify_pb2_grpc.NotificationServiceServicer):
    """Answers ACCEPTED without looking at anything but the requested channels."""

    async def SendNotification(
        self, request: notify_pb2.SendNotificationRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> notify_pb2.SendNotificationResponse:
        return _accepted(request)

    async def SendNotificationBatch(
        self,
        request: notify_pb2.SendNotificationBatchRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> notify_pb2.SendNotificationBatchResponse:
        reply = notify_pb2.SendNotificationBatchResponse()
        for item in request.requests:
            reply.results.add(response=_accepted(item))
        return reply

    async def GetNotification(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "baseline serves the Send methods only")

    async def ListNotifications(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "baseline serves the Send methods only")

    def WatchNotification(self, request: Any, context: Any) -> Any:
        """Not part of the baseline."""
        raise NotImplementedError


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until cancelled."""
    server = grpc.aio.server()
    notify_pb2_grpc.add_NotificationServiceServicer_to_server(NoopNotificationService(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    """Parse ``--port`` and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.noop_server")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
