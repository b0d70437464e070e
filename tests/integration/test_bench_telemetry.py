"""bench/telemetry.py's smoke test: a quick run of both parts prints the table and writes the
JSON, with spans exported while tracing was on (the targets are for full runs only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import test_env

ROOT = Path(__file__).parents[2]


def test_quick_telemetry_bench_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "telemetry.json"
    cmd = [sys.executable, "-m", "bench.telemetry", "--quick", "--rounds", "1", "--json", str(out)]
    cmd += ["--baseline", "HEAD"]  # a shallow clone has no older revision
    done = subprocess.run(
        cmd, cwd=ROOT, env=test_env(), capture_output=True, text=True, timeout=170
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: a target missed
    data = json.loads(out.read_text())
    parts = {(r["part"], r["workload"]) for r in data["rows"]}
    for mode in ("batch", "simple"):
        assert {(f"tracing ({mode})", w) for w in ("W1", "W3 p50", "W3 p99")} <= parts
        assert data["raw"]["tracing"]["spans"][mode] > 0
    assert {("all off", w) for w in ("W1", "W3 p50", "W3 p99")} <= parts
    assert "| tracing (batch) | W3 p50 |" in done.stdout
