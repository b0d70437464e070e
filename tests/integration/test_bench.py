"""The benchmark suite's smoke test: `python -m bench --quick` on us and one peer produces the
table and the JSON, and every result was checked for correctness and order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import test_env

ROOT = Path(__file__).parents[2]


def test_quick_bench_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--runs",
            "1",
            "--tools",
            "serverless,threads",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| workload | tool | warm | cold |" in done.stdout
    data = json.loads(out.read_text())
    rows = {(r["workload"], r["tool"]): r for r in data["rows"]}
    for workload in ("W1", "W2t", "W2r", "W3", "W4", "W5p"):
        for tool in ("serverless", "threads"):
            row = rows[(workload, tool)]
            assert row["ok"], row  # ok means every result was checked: complete and in order
            assert row["warm_s"] > 0 and row["cold_s"] > 0 and row["rss_peak_mb"] > 0
            assert f"| {workload} | {tool} | " in done.stdout
    stream = rows[("W5s", "serverless")]
    assert stream["ok"] or stream["skipped"] == "n/a: needs f.stream"
    assert rows[("W5s", "threads")]["ok"]
    assert "ratio_to_best_peer" in rows[("W1", "serverless")]
    # W6, a service with a quota (100/s at quick sizes, 200 items), its own table; the
    # figures are the service's own counts
    assert "| workload | tool | variant | wall | quota used | 429s of calls |" in done.stdout
    quota = {(r["tool"], r["variant"]): r for r in data["rows"] if r["workload"] == "W6"}
    assert set(quota) == {
        ("serverless", "rate=100"),
        ("serverless", "rate=auto"),
        ("serverless", "no rate"),
        ("threads", "429 = item lost"),
        ("threads", "retry 429s by hand"),
    }
    for (tool, variant), row in quota.items():
        assert f"| W6 | {tool} | {variant} | " in done.stdout
        if tool == "serverless":  # every item resolved, in order; the caller saw every 429
            assert row["ok"] and row["in_order"] and row["lost"] == 0, row
            assert row["throttles"] == row["refused"] and row["served"] >= 200
        else:  # a 429 is a lost item, unless the thread sleeps its Retry-After and asks again
            assert row["ok"] and row["lost"] == (row["refused"] if "lost" in variant else 0)
    paced = quota[("serverless", "rate=100")]
    assert paced["refused"] == 0 and paced["served"] == 200
    assert quota[("threads", "429 = item lost")]["lost"] > 0
