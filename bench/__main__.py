"""The benchmark suite: workloads W1-W5 on simple-serverless and its peers, in one run.

    python -m bench [--quick] [--tools serverless,threads,...] [--workloads W1,W2t,...]
                    [--runs 3] [--json PATH]

Each tool runs in its own subprocess (bench/_run.py), so imports and memory never mix; peers
that are not installed (`pip install .[bench]`) are reported as skipped. Prints one markdown
table and writes bench/results/latest.json. Workloads:

    W1   3,000 items, each a blocking 100 ms wait, 100 in flight (chunks of 30); limit 3.0 s
    W2t  200,000 integers squared, chunks of 2,000: throughput
    W2r  10,000 integers squared, one item per request, 100 in flight: cost per item
    W3   300 sequential calls on a one-item list: round trip p50 / p99
    W4   200 items of ~20 ms pure-Python CPU (chunks of 2): speedup over serial
    W5p  20,000 dicts with a 1 KB string each (chunks of 200): caller peak RSS
    W5s  a generator of 10,000,000 integers streamed through (chunks of 10,000): RSS growth
    W6   3,000 lookups from a service with a 200/s quota (429 + Retry-After beyond it) and
         20 ms latency, 100 workers: ours with rate=200, rate="auto" and no rate (Throttled
         on 429); the peers one task per item, a 429 lost or retried by hand. Its own table:
         quota used, 429s, items lost, counted by the service
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import _work
from ._run import ALL_WORKLOADS, QUOTA_WORKLOADS, WORKLOADS
from ._tools import TOOLS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OURS = "serverless"


def calibrate(target_s: float = 0.020) -> int:
    """Loops of _work.spin_one that take `target_s` here (the best of five tries)."""
    loops = 50_000
    best = min(_timed(loops) for _ in range(5))
    return max(1000, int(loops * target_s / best))


def _timed(loops: int) -> float:
    started = time.perf_counter()
    _work.spin_one(1, loops)
    return time.perf_counter() - started


def run_tool(tool: str, args: argparse.Namespace, loops: int) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "bench._run", "--tool", tool, "--workloads", args.workloads]
    cmd += ["--runs", str(args.runs), "--loops", str(loops)] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout
        )
        out, err, why = done.stdout, done.stderr, f"exit {done.returncode}"
        failed = done.returncode != 0
    except subprocess.TimeoutExpired as exc:
        # keep the workloads that finished before the time ran out
        out, err = _text(exc.stdout), _text(exc.stderr)
        why, failed = f"timeout {args.timeout:.0f}s", True
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if failed:
        sys.stderr.write(err[-3000:])
        done_names = {r["workload"] for r in rows}
        rows += [
            {"workload": w, "ok": False, "error": why}
            for w in args.workloads.split(",")
            if w not in done_names
        ]
    for row in rows:
        row["tool"] = tool
    return rows


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def with_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio = warm time / the best peer's warm time for the same workload (lower is better)."""
    for workload in {r["workload"] for r in rows} & set(WORKLOADS):
        peers = [
            r["warm_s"]
            for r in rows
            if r["workload"] == workload and r["tool"] != OURS and r.get("ok")
        ]
        for r in rows:
            if r["workload"] == workload and r.get("ok") and peers:
                r["ratio_to_best_peer"] = r["warm_s"] / min(peers)


def _metric(row: dict[str, Any]) -> str:
    metric, value = row["metric"], row["value"]
    if metric == "efficiency":
        return f"{value:.1%} efficiency"
    if metric == "items/s":
        extra = f", RSS +{row['rss_growth_mb']:.0f} MB" if "rss_growth_mb" in row else ""
        return f"{value / 1e6:.2f} M items/s{extra}"
    if metric == "p50/p99 ms":
        return f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms"
    if metric == "speedup":
        return f"{value:.2f}x"
    if metric == "us/item":
        return f"{value:.0f} us/item"
    return f"{value:.1f} {metric}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | tool | warm | cold | speedup or throughput | caller peak RSS | "
        "ratio to best peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["workload"] in QUOTA_WORKLOADS:
            continue
        head = f"| {r['workload']} | {r['tool']} "
        if not r.get("ok"):
            why = r.get("skipped") or f"FAILED: {r.get('error', '?')}"
            lines.append(head + f"| {why} | | | | |")
            continue
        warm = f"{r['warm_s'] * 1e3:.2f} ms" if r["workload"] == "W3" else f"{r['warm_s']:.3f} s"
        ratio = r.get("ratio_to_best_peer")
        lines.append(
            head + f"| {warm} | {r['cold_s']:.2f} s | {_metric(r)} | {r['rss_peak_mb']:.0f} MB "
            f"| {'' if ratio is None else f'{ratio:.2f}'} |"
        )
    return "\n".join(lines)


def quota_table(rows: list[dict[str, Any]]) -> str:
    """W6: the quota used (lookups the service served per second of the run / its quota),
    the share of downstream calls it refused (429), items lost, and whether every item came
    back resolved, in input order."""
    lines = [
        "| workload | tool | variant | wall | quota used | 429s of calls | items lost | "
        "all resolved, in order |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["workload"] not in QUOTA_WORKLOADS:
            continue
        head = f"| {r['workload']} | {r['tool']} | {r.get('variant', '')} "
        if "wall_s" not in r:
            why = r.get("skipped") or f"FAILED: {r.get('error', '?')}"
            lines.append(head + f"| {why} | | | | |")
            continue
        lines.append(
            head + f"| {r['wall_s']:.2f} s | {r['quota_used']:.1%} ({r['served']} served) | "
            f"{r['refused_share']:.1%} ({r['refused']}) | {r['lost']} | "
            f"{'yes' if r['in_order'] else 'no'} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--runs", type=int, default=3, help="warm runs (median reported)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per tool")
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in TOOLS] + [
        w for w in args.workloads.split(",") if w not in ALL_WORKLOADS
    ]
    if unknown:
        parser.error(f"unknown tools or workloads: {', '.join(unknown)}")
    loops = calibrate(0.002 if args.quick else 0.020)
    rows: list[dict[str, Any]] = []
    for tool in tools:
        rows += run_tool(tool, args, loops)
    order = {w: n for n, w in enumerate(ALL_WORKLOADS)}
    rows.sort(key=lambda r: (order.get(r["workload"], 99), tools.index(r["tool"])))
    with_ratios(rows)
    info = machine()
    versions = {r["tool"]: r["version"] for r in rows if r.get("version")}
    print(
        f"{info['machine']}, {info['cpus']} CPUs, Python {info['python']}, "
        f"load average {info['load_avg'][0]:.1f}, {info['date']}"
        f"{', quick sizes' if args.quick else ''}; versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    if any(r["workload"] in WORKLOADS for r in rows):
        print()
        print(table(rows))
    if any(r["workload"] in QUOTA_WORKLOADS for r in rows):
        print()
        print(quota_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": info,
                "quick": args.quick,
                "spin_loops": loops,
                "versions": versions,
                "rows": rows,
            },
            indent=2,
        )
    )
    failed = [r for r in rows if not r.get("ok") and "skipped" not in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
