"""The load generator: separate OS processes driving SendNotification(Batch).

Each generator process has its own event loop (uvloop) and its own gRPC
channels, so the client never shares the server's loop or core scheduling
with it. A run is either **closed-loop** (``concurrency`` requests always in
flight) or **open-loop** (``offered_rate`` requests per second started on a
fixed schedule, however slowly answers come; latency then includes queueing,
which is what a caller at that rate sees).

Every notification carries a marker (in the email subject, the SMS body and
``push.data``) so the fake providers' journal can be joined with the
ACCEPTED times recorded here: that join is the end-to-end latency.

Processes are started with the ``spawn`` method (a fresh interpreter: gRPC is
not fork-safe) and report a :class:`LoadResult` through a queue.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

#: Marker plumbing shared with the journaling fakes (tests/chaos_harness.py).
MARKER_PREFIX = "chaos "
PUSH_MARKER_KEY = "chaos"
CHANNELS = ("email", "sms", "push")


@dataclass(frozen=True)
class LoadSpec:
    """One run of one generator process.

    ``mode`` is ``"unary"`` (SendNotification) or ``"batch"``
    (SendNotificationBatch with ``batch_size`` notifications per call).
    ``concurrency`` RPCs in flight (closed loop) unless ``offered_rate`` (RPC/s)
    is set (open loop). Latencies are recorded after ``warmup_s`` for
    ``duration_s`` seconds. ``channel_mix`` picks each notification's channel
    in rotation. ``connections``: gRPC channels (TCP connections) to spread
    the RPCs over, so that several gateway processes sharing a port
    (SO_REUSEPORT) each get some. ``extra_api_keys``: other tenants' keys;
    RPCs rotate over ``api_key`` and these.
    """

    target: str
    api_key: str = field(repr=False)
    mode: str
    concurrency: int
    duration_s: float
    warmup_s: float = 1.0
    offered_rate: float | None = None
    batch_size: int = 100
    channel_mix: tuple[str, ...] = ("email",)
    connections: int = 1
    record_markers: bool = False
    seed: str = ""
    extra_api_keys: tuple[str, ...] = field(default=(), repr=False)


@dataclass
class LoadResult:
    """What one generator process measured (times in seconds, latencies in ms).

    ``accepted``: notifications answered ACCEPTED in the measured window;
    ``rpcs``: RPCs completed OK in the window; ``latencies_ms``: each such RPC's
    latency; ``errors``: failed RPCs by status code name (all windows);
    ``markers``: marker -> (channel, wall-clock time of the ACCEPTED answer).
    """

    accepted: int = 0
    rpcs: int = 0
    window_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    markers: dict[str, tuple[str, float]] = field(default_factory=dict)
    late_starts: int = 0


def _notification(spec: LoadSpec, n: int) -> tuple[Any, str, str]:
    from switchboard.notify.v1 import notify_pb2

    channel = spec.channel_mix[n % len(spec.channel_mix)]
    marker = f"{spec.seed}-{n}"
    text = f"{MARKER_PREFIX}{marker}"
    request = notify_pb2.SendNotificationRequest(request_id=marker)
    if channel == "email":
        request.channels.append(notify_pb2.CHANNEL_EMAIL)
        request.recipient.email = f"user{n % 1000}@example.com"
        request.email.subject = text
        request.email.text = "Your order has shipped. Track it in the app."
    elif channel == "sms":
        request.channels.append(notify_pb2.CHANNEL_SMS)
        request.recipient.phone_number = f"+1415555{n % 10000:04d}"
        request.sms.text = text
    else:
        request.channels.append(notify_pb2.CHANNEL_PUSH)
        request.recipient.fcm_token = f"bench-token-{n % 1000}"
        request.push.title = "Order shipped"
        request.push.body = "Track it in the app."
        request.push.data[PUSH_MARKER_KEY] = marker
    request.metadata["source"] = "bench"
    return request, marker, channel


async def _run(spec: LoadSpec) -> LoadResult:
    import grpc

    from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc

    result = LoadResult()
    keys = (spec.api_key, *spec.extra_api_keys)
    metadatas = [(("authorization", f"Bearer {key}"),) for key in keys]
    calls = 0
    options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    channels = [grpc.aio.insecure_channel(spec.target, options=options) for _ in range(spec.connections)]
    stubs = [notify_pb2_grpc.NotificationServiceStub(c) for c in channels]
    for c in channels:
        await asyncio.wait_for(c.channel_ready(), 30)
    counter = 0
    start = time.perf_counter()
    measure_from = start + spec.warmup_s
    measure_to = measure_from + spec.duration_s

    async def one_call(stub: Any) -> None:
        nonlocal counter, calls
        metadata = metadatas[calls % len(metadatas)]
        calls += 1
        items = []
        for _ in range(spec.batch_size if spec.mode == "batch" else 1):
            items.append(_notification(spec, counter))
            counter += 1
        sent = time.perf_counter()
        try:
            if spec.mode == "batch":
                request = notify_pb2.SendNotificationBatchRequest(requests=[i[0] for i in items])
                reply = await stub.SendNotificationBatch(request, metadata=metadata, timeout=30)
                outcomes = [r.HasField("response") for r in reply.results]
            else:
                await stub.SendNotification(items[0][0], metadata=metadata, timeout=30)
                outcomes = [True]
        except grpc.aio.AioRpcError as exc:
            name = exc.code().name
            result.errors[name] = result.errors.get(name, 0) + 1
            return
        done = time.perf_counter()
        if measure_from <= sent and done <= measure_to:
            result.rpcs += 1
            result.latencies_ms.append((done - sent) * 1000)
            result.accepted += sum(outcomes)
        if spec.record_markers:
            wall = time.time()
            for (_, marker, channel), ok in zip(items, outcomes, strict=True):
                if ok:
                    result.markers[marker] = (channel, wall)

    async def closed_loop(worker: int) -> None:
        stub = stubs[worker % len(stubs)]
        while time.perf_counter() < measure_to:
            await one_call(stub)

    async def open_loop() -> None:
        assert spec.offered_rate is not None
        interval = 1.0 / spec.offered_rate
        tasks: set[asyncio.Task[None]] = set()
        n = 0
        while True:
            due = start + n * interval
            if due >= measure_to:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                result.late_starts += 1
            task = asyncio.create_task(one_call(stubs[n % len(stubs)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks)

    if spec.offered_rate is None:
        await asyncio.gather(*(closed_loop(i) for i in range(spec.concurrency)))
    else:
        await open_loop()
    result.window_s = spec.duration_s
    for c in channels:
        await c.close(None)
    return result


def _process_main(spec: LoadSpec, queue: Any) -> None:
    import uvloop

    try:
        queue.put(uvloop.run(_run(spec)))
    except BaseException as exc:  # report, never hang the parent
        queue.put(exc)
        raise


def run_generators(specs: list[LoadSpec], timeout_s: float = 300.0) -> LoadResult:
    """Run one generator process per spec at the same time; return the merged result.

    Raises ``RuntimeError`` if a generator fails or does not report within ``timeout_s``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_process_main, args=(s, queue), daemon=True) for s in specs]
    for p in processes:
        p.start()
    merged = LoadResult()
    try:
        for _ in processes:
            got = queue.get(timeout=timeout_s)
            if isinstance(got, BaseException):
                raise RuntimeError(f"load generator failed: {got!r}")
            merged.accepted += got.accepted
            merged.rpcs += got.rpcs
            merged.window_s = max(merged.window_s, got.window_s)
            merged.latencies_ms += got.latencies_ms
            merged.late_starts += got.late_starts
            merged.markers.update(got.markers)
            for k, v in got.errors.items():
                merged.errors[k] = merged.errors.get(k, 0) + v
    finally:
        for p in processes:
            p.join(10)
            if p.is_alive():
                p.kill()
    return merged


def split(
    spec: LoadSpec,
    processes: int,
) -> list[LoadSpec]:
    """Divide ``spec``'s concurrency (or offered rate) and connections over ``processes`` generators."""
    processes = max(1, min(processes, spec.concurrency))
    out = []
    for i in range(processes):
        share = spec.concurrency // processes + (1 if i < spec.concurrency % processes else 0)
        rate = spec.offered_rate / processes if spec.offered_rate is not None else None
        out.append(
            LoadSpec(
                target=spec.target,
                api_key=spec.api_key,
                mode=spec.mode,
                concurrency=share,
                duration_s=spec.duration_s,
                warmup_s=spec.warmup_s,
                offered_rate=rate,
                batch_size=spec.batch_size,
                channel_mix=spec.channel_mix,
                connections=max(1, spec.connections // processes),
                record_markers=spec.record_markers,
                seed=f"{spec.seed or uuid.uuid4().hex[:8]}p{i}",
                extra_api_keys=spec.extra_api_keys,
            )
        )
    return out
