"""W1, the seed's scenario: 3,000 items, each a blocking 100 ms wait, 100 workers, on the
embedded local pool. The limit is 3.0 s (serial: 300 s). Prints a markdown table.

    python -m bench.seed [--runs 3] [--items 3000] [--workers 100] [--wait 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import serverless


@serverless.parallel
def wait(items: list[int], seconds: float) -> list[int]:
    for _ in items:
        time.sleep(seconds)
    return items


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--wait", type=float, default=0.1)
    args = parser.parse_args()
    items = list(range(args.items))
    fn = wait.with_options(workers=args.workers)
    limit = args.items * args.wait / args.workers
    rows = []
    for run in range(args.runs + 1):
        started = time.perf_counter()
        result, stats = fn.with_stats(items, args.wait)
        wall = time.perf_counter() - started
        assert result == items, "results lost, duplicated or out of order"
        rows.append(
            {
                "run": "cold" if run == 0 else f"warm {run}",
                "wall_s": wall,
                "efficiency": limit / wall,
                "speedup": stats.compute_s / wall,
                "compute_s": stats.compute_s,
                "processes": stats.processes,
            }
        )
    warm = [r["wall_s"] for r in rows[1:]]
    print(
        f"W1 seed: {args.items} items x {args.wait * 1000:.0f} ms, {args.workers} workers, "
        f"local pool of {os.cpu_count()} processes; limit {limit:.2f} s"
    )
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, simple-serverless {serverless.__version__}\n"
    )
    print("| run | wall (s) | efficiency | speedup over serial |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']:.3f} | {r['efficiency']:.1%} | {r['speedup']:.1f}x |")
    median = statistics.median(warm) if warm else rows[0]["wall_s"]
    print(f"\nwarm median: {median:.3f} s = {limit / median:.1%} of the limit")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "seed.json").write_text(json.dumps({"rows": rows, "warm_median_s": median}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
