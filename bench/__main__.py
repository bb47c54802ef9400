"""``python -m bench <name>``: run one benchmark and print its table."""

from __future__ import annotations

import argparse
import asyncio

from bench.tenant_cache import run as run_tenant_cache

BENCHMARKS = {"tenant-cache": run_tenant_cache}


def main() -> None:
    """Parse the benchmark name and run it."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    args = parser.parse_args()
    asyncio.run(BENCHMARKS[args.name]())


if __name__ == "__main__":
    main()
