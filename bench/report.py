"""Tables and PNG plots from ``python -m bench accept`` results.

``python -m bench report [LABEL ...]`` reads ``bench/results/accept-<label>.json``
(the last label is the current state; earlier ones are "before"), prints the
Markdown tables BENCHMARKS.md uses, and writes ``docs/bench/throughput-<last label>.png``
(accepted notifications/s against concurrency) and
``docs/bench/latency-cdf-<last label>.png`` (RPC latency at 32 in flight, end-to-end
latency per channel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
PLOTS = REPO_ROOT / "docs" / "bench"


def load(label: str) -> dict[str, Any]:
    """The results saved under ``label``."""
    data: dict[str, Any] = json.loads((RESULTS / f"accept-{label}.json").read_text(encoding="utf-8"))
    return data


def _at(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    return next(
        (r for r in rows if r["concurrency"] == concurrency), {"accepted_per_s": 0.0, "latency_ms": {}}
    )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _lat(lat: dict[str, float], digits: int = 1) -> list[str]:
    return [f"{lat[k]:.{digits}f}" for k in ("p50", "p90", "p99", "max")]


def sweep_table(r: dict[str, Any], mode: str) -> list[str]:
    """Markdown rows: ours vs the bare gRPC baseline per concurrency level."""
    lines = [
        _row("in flight", "Switchboard /s", "p50 ms", "p90 ms", "p99 ms", "max ms")[:-2]
        + " | bare gRPC /s | ratio | 2 processes /s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r.get(mode, []):
        c = row["concurrency"]
        base = _at(r.get(f"noop_{mode}", []), c)["accepted_per_s"]
        two = _at(r.get(f"two_{mode}", []), c)["accepted_per_s"]
        ours = row["accepted_per_s"]
        lines.append(
            _row(
                c, f"{ours:,.0f}", *_lat(row["latency_ms"]), f"{base:,.0f}", _ratio(ours, base), f"{two:,.0f}"
            )
        )
    return lines


def baseline_rows(r: dict[str, Any]) -> list[str]:
    """Markdown rows: each headline figure against its baseline and target."""
    unary32 = _at(r.get("unary", []), 32)["accepted_per_s"]
    noop32 = _at(r.get("noop_unary", []), 32)["accepted_per_s"]
    best_batch = max((x["accepted_per_s"] for x in r.get("batch", [])), default=0.0)
    rows = [
        _row("figure", "ours", "baseline", "ratio", "target"),
        "| --- | ---: | ---: | ---: | --- |",
        _row(
            "unary accept, 32 in flight / bare grpc.aio",
            f"{unary32:,.0f}/s",
            f"{noop32:,.0f}/s",
            _ratio(unary32, noop32),
            ">= 0.5x",
        ),
    ]
    if "raw_asyncpg" in r:
        raw = r["raw_asyncpg"]
        rows.append(
            _row(
                "unary accept, 32 in flight / raw asyncpg, 1 per transaction",
                f"{unary32:,.0f}/s",
                f"{raw['unary_per_s']:,.0f}/s",
                _ratio(unary32, raw["unary_per_s"]),
                "",
            )
        )
        rows.append(
            _row(
                f"best batch accept / raw asyncpg, {raw['batch']} per transaction",
                f"{best_batch:,.0f}/s",
                f"{raw['batch_per_s']:,.0f}/s",
                _ratio(best_batch, raw["batch_per_s"]),
                ">= 20,000/s",
            )
        )
    if "relay" in r:
        rl = r["relay"]
        rows.append(
            _row(
                "relay / raw aiokafka produce",
                f"{rl['relay_per_s']:,.0f}/s",
                f"{rl['raw_produce_per_s']:,.0f}/s",
                _ratio(rl["relay_per_s"], rl["raw_produce_per_s"]),
                ">= 0.7x",
            )
        )
    if "two_unary" in r:
        two32 = _at(r["two_unary"], 32)["accepted_per_s"]
        rows.append(
            _row(
                "unary, 32 in flight: 2 gateway processes / 1",
                f"{two32:,.0f}/s",
                f"{unary32:,.0f}/s",
                _ratio(two32, unary32),
                "",
            )
        )
        two_batch = max((x["accepted_per_s"] for x in r.get("two_batch", [])), default=0.0)
        rows.append(
            _row(
                "best batch: 2 gateway processes / 1",
                f"{two_batch:,.0f}/s",
                f"{best_batch:,.0f}/s",
                _ratio(two_batch, best_batch),
                "",
            )
        )
    rss = r.get("gateway_rss_mib", {})
    rows.append(
        _row("gateway RSS under load (max, one process)", f"{rss.get('max', 0):.0f} MiB", "", "", "<= 200 MB")
    )
    return rows


def report(labels: list[str]) -> str:
    """Markdown for the results of ``labels`` (the last is the current state)."""
    runs = [load(label) for label in labels]
    r = runs[-1]
    m = r["machine"]
    out = [
        f"### Run `{r['label']}`",
        "",
        f"Machine: {m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB; Python {m['python']}, "
        f"grpcio {m['grpcio']}, protobuf {m['protobuf']}, asyncpg {m['asyncpg']}, aiokafka {m['aiokafka']}, "
        f"uvloop {m['uvloop']}; PostgreSQL {m['postgres']}; broker {m['kafka']}.",
        "",
        "Unary `SendNotification` (one notification per RPC):",
        "",
        *sweep_table(r, "unary"),
        "",
        f"`SendNotificationBatch` ({r['options']['batch_size']} notifications per RPC; notifications/s):",
        "",
        *sweep_table(r, "batch"),
    ]
    if "rates" in r:
        out += ["", "Fixed offered rates (open loop, unary):", ""]
        out += [
            _row("offered /s", "accepted /s", "p50 ms", "p90 ms", "p99 ms", "max ms"),
            "| ---: " * 6 + "|",
        ]
        for row in r["rates"]:
            out.append(
                _row(
                    f"{row['offered_per_s']:,.0f}", f"{row['accepted_per_s']:,.0f}", *_lat(row["latency_ms"])
                )
            )
    out += ["", "Against the three baselines:", "", *baseline_rows(r)]
    titles = {
        "e2e": "half the best unary accept rate",
        "e2e_one_tenant": "the same rate, one tenant",
        "e2e_low": "a low rate",
        "e2e_mid": "about half of what the delivery side sustains",
    }
    for key, title in titles.items():
        if key not in r:
            continue
        e = r[key]
        out += [
            "",
            f"End to end, ACCEPTED -> fake provider received, open loop at {e['offered_per_s']:,.0f}/s "
            f"({title}) over {e.get('tenants', 1)} tenant(s), relay and workers running; "
            f"{e['received']:,} of {e['accepted']:,} received, delivered at "
            f"{e.get('delivered_per_s', 0):,.0f}/s:",
            "",
            _row("channel", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"),
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for channel, p in e["per_channel"].items():
            out.append(_row(channel, f"{p['count']:,}", *_lat(p, 0)))
    cpu_runs = [key for key in titles if "cpu_ms_per_notification" in r.get(key, {})]
    if cpu_runs:
        components = list(r[cpu_runs[0]]["cpu_ms_per_notification"])
        out += [
            "",
            "CPU per notification received (ms of user + system time of each component's process tree,"
            " from the start of the traffic to the last receipt), per end-to-end run:",
            "",
            _row("run", *components, "total"),
            "| --- |" + " ---: |" * (len(components) + 1),
        ]
        for key in cpu_runs:
            cpu = r[key]["cpu_ms_per_notification"]
            cells = [f"{cpu.get(c, 0.0):.2f}" for c in components]
            label = f"{r[key]['offered_per_s']:,.0f}/s, {r[key].get('tenants', 1)} tenant(s)"
            out.append(_row(label, *cells, f"{sum(cpu.values()):.2f}"))
    if len(runs) > 1:
        levels = (1, 8, 32, 128)
        out += ["", "Before and after (accepted notifications/s):", ""]
        out.append(_row("run", *(f"unary {c}" for c in levels), *(f"batch {c}" for c in levels)))
        out.append("| --- |" + " ---: |" * 8)
        for run in runs:
            cells = [
                f"{_at(run.get(mode, []), c)['accepted_per_s']:,.0f}"
                for mode in ("unary", "batch")
                for c in levels
            ]
            out.append(_row(run["label"], *cells))
    return "\n".join(out)


def plot(labels: list[str]) -> list[Path]:
    """Write the throughput and latency-CDF PNGs; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load(label) for label in labels]
    r = runs[-1]
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("unary", "batch"), strict=True):
        series: list[tuple[str, list[dict[str, Any]], str | None]] = [
            ("bare grpc.aio", r.get(f"noop_{mode}", []), "k--")
        ]
        shown = [runs[0], runs[-1]] if len(runs) > 1 else runs
        series += [(f"Switchboard ({run['label']})", run.get(mode, []), None) for run in shown]
        series += [("Switchboard, 2 processes", r.get(f"two_{mode}", []), "g-.")]
        for name, rows, style in series:
            if not rows:
                continue
            xs = [row["concurrency"] for row in rows]
            ys = [row["accepted_per_s"] for row in rows]
            if style:
                ax.plot(xs, ys, style, marker="o", label=name)
            else:
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY_TICKS), [str(c) for c in CONCURRENCY_TICKS])
        ax.set_xlabel("RPCs in flight")
        ax.set_ylabel("notifications accepted / s")
        ax.set_title(f"{mode} ({r['options']['batch_size']} per RPC)" if mode == "batch" else "unary")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    throughput = PLOTS / f"throughput-{r['label']}.png"
    fig.savefig(throughput, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for name, rows in (("Switchboard", r.get("unary", [])), ("bare grpc.aio", r.get("noop_unary", []))):
        row = _at(rows, 32)
        lat = row.get("latency_ms", {})
        if lat:
            ax.plot(
                [lat["p50"], lat["p90"], lat["p99"], lat["max"]],
                [0.5, 0.9, 0.99, 1.0],
                marker="o",
                label=name,
            )
    ax.set_xlabel("RPC latency, ms (unary, 32 in flight)")
    ax.set_ylabel("fraction of RPCs")
    ax.set_title("RPC latency (p50 / p90 / p99 / max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, style in (("e2e_low", ":"), ("e2e_mid", "-"), ("e2e", "--")):
        run = r.get(key, {})
        for channel, values in run.get("cdf_ms", {}).items():
            if values:
                n = len(values)
                label = f"{channel} at {run['offered_per_s']:,.0f}/s"
                ax.plot(values, [(i + 1) / n for i in range(n)], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ACCEPTED -> provider received, ms")
    ax.set_ylabel("fraction of notifications")
    ax.set_title("end-to-end latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    cdf = PLOTS / f"latency-cdf-{r['label']}.png"
    fig.savefig(cdf, dpi=110)
    plt.close(fig)
    return [throughput, cdf]


CONCURRENCY_TICKS = (1, 8, 32, 128)


def main(labels: list[str]) -> None:
    """Print the tables and write the plots."""
    print(report(labels))
    for path in plot(labels):
        print(f"wrote {path}")
