"""Shared machinery of the fake provider servers: an aiohttp app on 127.0.0.1
with per-request fault injection and a record of what was received.

Each fake (switchboard/fakes/<provider>.py) checks the provider's documented
wire format, answers like the provider, and records every accepted request.
Tests and ``switchboard dev`` inject faults that apply to the next requests:

- ``Fault.status(503)`` / ``Fault.status(500, body=...)``: an HTTP error answer;
- ``Fault.rate_limited(retry_after_s=2)``: 429 with ``Retry-After``;
- ``Fault.slow(delay_s=...)``: answer only after the delay (past a client timeout);
- ``Fault.reset()``: close the connection without answering;
- ``Fault.malformed()``: 200 with a body that is not the documented JSON;
- ``Fault.lost_response()``: do the work (record it), then reset the connection.

``hold_requests()`` parks every request (before faults and work) until the
returned :class:`Gate` is opened; its events tell a test that a request
reached the provider, so tests wait for that instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

#: Set on a request whose answer must be lost after the work is recorded.
LOST_RESPONSE = web.RequestKey("lost_response", bool)


@dataclass(frozen=True)
class Fault:
    """One injected fault; ``kind`` is status, rate_limited, slow, reset, malformed or lost_response."""

    kind: str
    status: int = 500
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    @classmethod
    def http_status(cls, status: int, body: str = "", headers: dict[str, str] | None = None) -> Fault:
        """Answer ``status`` with ``body`` (JSON text) instead of doing the work."""
        return cls("status", status=status, body=body, headers=headers or {})

    @classmethod
    def rate_limited(cls, retry_after_s: int = 1, headers: dict[str, str] | None = None) -> Fault:
        """429 Too Many Requests with ``Retry-After`` (RFC 9110 section 10.2.3) in seconds."""
        return cls("status", status=429, headers={"Retry-After": str(retry_after_s), **(headers or {})})

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        """Do nothing for ``delay_s`` s, then answer normally."""
        return cls("slow", delay_s=delay_s)

    @classmethod
    def reset(cls) -> Fault:
        """Close the connection without an answer; nothing is recorded."""
        return cls("reset")

    @classmethod
    def malformed(cls) -> Fault:
        """200 OK with a body that is not the documented JSON; nothing is recorded."""
        return cls("malformed")

    @classmethod
    def lost_response(cls) -> Fault:
        """Do the work and record it, then close the connection without answering."""
        return cls("lost_response")


class Gate:
    """Parks requests until :meth:`open`: ``reached`` is set once a request waits at it,
    ``waiting`` counts the requests waiting now. Once open, requests pass straight through."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()
        self.waiting = 0

    def open(self) -> None:
        """Let the parked requests (and every later one) go on."""
        self.opened.set()

    async def pass_through(self) -> None:
        """Wait here until the gate is open."""
        if self.opened.is_set():
            return
        self.waiting += 1
        self.reached.set()
        try:
            await self.opened.wait()
        finally:
            self.waiting -= 1


@dataclass
class Received:
    """One request the fake accepted: method, path, headers, and the parsed body."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeProviderServer:
    """Base class: subclasses add routes in :meth:`routes` and call :meth:`apply_faults`.

    ``received`` lists accepted requests in order; ``faults`` is a FIFO of
    faults for the next requests (one per request).
    """

    #: When set, every accepted request is also appended to this JSON-lines file
    #: (the dev stack shows where demo messages landed).
    journal: Path | None = None

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.received: list[Received] = []
        self.faults: deque[Fault] = deque()
        self.requests_seen = 0
        self.gate: Gate | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` once started."""
        return f"http://{self.host}:{self.port}"

    def inject(self, *faults: Fault) -> None:
        """Queue faults for the next requests, in order."""
        self.faults.extend(faults)

    def hold_requests(self) -> Gate:
        """Park every request from now on at a new :class:`Gate` (returned) until it is opened."""
        self.gate = Gate()
        return self.gate

    def routes(self, app: web.Application) -> None:  # pragma: no cover - abstract
        """Register the provider's endpoints on ``app``."""
        raise NotImplementedError

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 picks a free one, stored in ``port``)."""
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def apply_faults(self, request: web.Request) -> web.StreamResponse | None:
        """Apply the next queued fault, if any: a response to return instead of
        the normal one, or ``None`` to carry on (after a delay for ``slow``).

        ``lost_response`` is returned to the caller as ``None`` too, with
        ``request[LOST_RESPONSE]`` set: the handler records the work and then
        calls :meth:`drop_connection`.
        """
        self.requests_seen += 1
        if self.gate is not None:
            await self.gate.pass_through()
        if not self.faults:
            return None
        fault = self.faults.popleft()
        if fault.kind == "status":
            return web.Response(
                status=fault.status,
                text=fault.body or json.dumps({"error": f"injected {fault.status}"}),
                content_type="application/json",
                headers=fault.headers,
            )
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay_s)
            return None
        if fault.kind == "reset":
            self.drop_connection(request)
            return web.Response(status=500)  # never reaches the client
        if fault.kind == "malformed":
            return web.Response(status=200, text="<html>not json", content_type="text/html")
        if fault.kind == "lost_response":
            request[LOST_RESPONSE] = True
            return None
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    @staticmethod
    def drop_connection(request: web.Request) -> None:
        """Abort the TCP connection under ``request`` (the client sees a reset/EOF)."""
        transport = request.transport
        if transport is not None:
            transport.abort()

    def record(self, request: web.Request, body: Any) -> None:
        """Remember an accepted request."""
        self.received.append(
            Received(method=request.method, path=request.path, headers=dict(request.headers), body=body)
        )
        if self.journal is not None:
            line = {"fake": type(self).__name__, "method": request.method, "path": request.path, "body": body}
            with self.journal.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(line, default=str) + "\n")
