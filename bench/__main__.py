"""``python -m bench <name>``: run one benchmark and print its results.

- ``tenant-cache``: auth and provider-cache cost against a dict and a round trip;
- ``accept``: accept throughput, RPC and end-to-end latency against the bare
  gRPC, raw asyncpg and raw aiokafka baselines (``bench/results/accept-<label>.json``);
- ``report``: tables and PNG plots from the ``accept`` results (``docs/bench/``).
"""

from __future__ import annotations

import argparse
import asyncio

from bench.tenant_cache import run as run_tenant_cache


def main() -> None:
    """Parse the benchmark name and its options, and run it."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    sub.add_parser("tenant-cache", help="auth and provider cache")
    accept = sub.add_parser("accept", help="accept throughput and latency against baselines")
    accept.add_argument("--label", default="current", help="name of this run (results/accept-<label>.json)")
    accept.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    accept.add_argument("--batch-size", type=int, default=100, help="notifications per batch RPC")
    accept.add_argument("--e2e-duration", type=float, default=15.0, help="seconds of end-to-end traffic")
    accept.add_argument("--relay-rows", type=int, default=50_000, help="outbox rows for the relay run")
    accept.add_argument("--profile", action="store_true", help="also record a py-spy flame graph")
    accept.add_argument("--phases", default="", help="comma-separated subset of phases (default: all)")
    report = sub.add_parser("report", help="tables and plots from accept results")
    report.add_argument("labels", nargs="*", default=["current"], help="result labels, before to after")
    args = parser.parse_args()
    if args.name == "tenant-cache":
        asyncio.run(run_tenant_cache())
    elif args.name == "accept":
        from bench.accept import Options, run

        opts = Options(
            duration_s=args.duration,
            batch_size=args.batch_size,
            e2e_duration_s=args.e2e_duration,
            relay_rows=args.relay_rows,
            label=args.label,
            profile=args.profile,
        )
        if args.phases:
            opts.phases = set(args.phases.split(","))
        run(opts)
    else:
        from bench.report import main as report_main

        report_main(args.labels)


if __name__ == "__main__":
    main()
