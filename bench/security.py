"""Issue 14's targets, measured against a real worker (uvicorn on loopback):

- 100 anonymous uploads of 32 MiB that stall: the worker's RSS growth, and the legitimate
  calls that succeed meanwhile (target: at most 64 MB, all succeed);
- 2,000 slowloris connections (half silent, half trickling header bytes): how many are still
  open after the header timeout, and when the last one closed;
- the per-host replay store: cost per request (a claim in SQLite) against the in-process cache.

    python -m bench.security [--uploads 100] [--slowloris 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serverless._worker.replay import HostReplayStore, SeenIds
from tests.conftest import free_port, serving, test_env
from tests.integration.test_security import slowloris, stalled_uploads

ROOT = Path(__file__).resolve().parent.parent


def _serve(args: list[str], port: int, state: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        env=test_env(SERVERLESS_STATE_DIR=str(state), **env),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def uploads(count: int, state: Path) -> None:
    port = free_port()
    args = ["uvicorn", "tests.security_app:app", "--port", str(port), "--log-level", "warning"]
    proc = _serve(args, port, state)
    with serving(proc, port):
        growth, ok, calls = stalled_uploads(port, proc.pid, count, 31 << 20)
    print(f"{count} stalled 32 MiB uploads: RSS +{growth:.1f} MB; {ok}/{calls} calls succeeded")


def connections(count: int, state: Path, timeout: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 256)), hard))
    port = free_port()
    args = ["serverless._cli", "worker", "tests.sample_functions", "--port", str(port)]
    proc = _serve(args, port, state, SERVERLESS_HEADER_TIMEOUT=str(timeout))
    with serving(proc, port):
        still_open, last = slowloris(port, count, timeout=timeout + 10)
    print(
        f"{count} slowloris connections, header timeout {timeout:g} s: {still_open} still open, "
        f"the last closed after {last:.2f} s"
    )


def replay_cost(state: Path, n: int = 20000) -> None:
    store, local = HostReplayStore(300, state / "bench"), SeenIds(300)
    ids = [f"{i:032x}" for i in range(n)]
    started = time.perf_counter()
    for i in ids:
        local.add(i, 1000.0)
    local_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for i in ids:
        store.claim(i, 1000.0)
    store_us = (time.perf_counter() - started) / n * 1e6
    print(f"replay check per request: in-process {local_us:.1f} us, host store {store_us:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--slowloris", type=int, default=2000)
    parser.add_argument("--header-timeout", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        replay_cost(state)
        uploads(args.uploads, state)
        connections(args.slowloris, state, args.header_timeout)


if __name__ == "__main__":
    main()
