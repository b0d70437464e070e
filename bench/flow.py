"""Flow control and the fan-out engine's cost per chunk (issues 15.3 and 16).

    python -m bench.flow engine [--chunks 30000]     # caller CPU per chunk vs chunks in flight
    python -m bench.flow threads [--threads 32]      # workers=100 vs workers=N, N threads
    python -m bench.flow demo                        # docs/deploy.md: 3 x 32 behind HAProxy

`engine` drives `_caller/fanout.Fanout` through a fake attempt that answers after a random 1-10 ms,
no sockets, so it needs no cores: what grows with the number in flight is the engine's own
work. Run it with PYTHONPATH pointing at another checkout's src/ to compare engines.
`threads` and `demo` use real servers: workers that declare their capacity on each reply
(tests/apps/capacity_app.py, the worker half of issue 15.3) and Debian's HAProxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-flow-secret-0123456789abcdef"


def engine(chunks: int, widths: list[int]) -> list[dict[str, Any]]:
    from serverless._caller.chunking import Chunk, chunk_iterable
    from serverless._caller.fanout import Answer, Fanout, Tally
    from serverless._caller.plan import CallPlan

    rng = random.Random(7)

    async def attempt(
        url: str, chunk: Chunk, timeout: float, pace: float | None, slot: float | None, trace: str
    ) -> Any:
        await asyncio.sleep(rng.uniform(0.001, 0.010))
        return Answer(chunk.items, "w")

    async def one(width: int) -> None:
        urls = tuple(f"http://h{n}/serverless" for n in range(4))
        policy = CallPlan("f", workers=width, retries=3, hedge=True)
        fanout = Fanout(
            policy, urls, chunk_iterable(range(chunks), 1), attempt, Tally(), lazy_input=False,
        )  # fmt: skip
        async for _ in fanout.results():
            pass

    rows = []
    for width in widths:
        cpu, wall = time.process_time(), time.perf_counter()
        asyncio.run(one(width))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        rows.append({"in_flight": width, "cpu_us_per_chunk": cpu / chunks * 1e6, "wall_s": wall})
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@contextlib.contextmanager
def _workers(count: int, threads: int, modules: str) -> Iterator[list[int]]:
    """`count` worker processes (each a host: its own replay store) declaring `threads`."""
    ports = [_free_port() for _ in range(count)]
    procs = []
    env = dict(os.environ, SERVERLESS_SECRET=SECRET, SERVERLESS_THREADS=str(threads))
    env["SERVERLESS_MODULES"] = modules
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    try:
        for port in ports:
            env["SERVERLESS_STATE_DIR"] = tempfile.mkdtemp()
            cmd = [sys.executable, "-m", "uvicorn", "--factory", "tests.apps.capacity_app:app"]
            cmd += ["--port", str(port), "--log-level", "warning"]
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
        for port in ports:
            _wait_port(port)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def threads(count: int, seconds: float, width: int) -> dict[str, float]:
    import serverless
    from bench._ours import wait

    serverless.init(secret=SECRET)
    with _workers(1, width, "bench._ours") as (port,):
        f = wait.with_options(url=f"http://127.0.0.1:{port}/serverless")
        f.with_options(workers=width)(list(range(width)), 0.0)  # learns the capacity
        out = {}
        for workers in (width, 100, width, 100):
            started = time.perf_counter()
            f.with_options(workers=workers)(list(range(count)), seconds)
            out[f"workers={workers}"] = time.perf_counter() - started
        return out


def demo(workers: list[int]) -> dict[str, float]:
    import shutil

    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    config = (ROOT / "deploy/local/haproxy.cfg").read_text()
    with _workers(3, 32, "serverless.demo.pipeline") as ports, tempfile.TemporaryDirectory() as tmp:
        front = _free_port()
        config = config.replace("127.0.0.1:8080", f"127.0.0.1:{front}")
        for n, port in enumerate(ports):
            config = config.replace(f"127.0.0.1:{8001 + n}", f"127.0.0.1:{port}")
        (Path(tmp) / "haproxy.cfg").write_text(config)
        proxy = subprocess.Popen([haproxy, "-db", "-f", f"{tmp}/haproxy.cfg"])
        try:
            _wait_port(front)
            out = {}
            env = dict(os.environ, SERVERLESS_SECRET=SECRET, NO_PROGRESS="1")
            for n in workers:
                cmd = [sys.executable, "-m", "serverless._cli", "demo", "--json"]
                cmd += ["--workers", str(n)]
                cmd += ["--url", f"http://127.0.0.1:{front}/serverless", "--seed", "1"]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(done.stderr[-2000:])
                figures = json.loads(done.stdout)
                out[f"workers={n}"] = round(figures["speedup"], 1)
            return out
        finally:
            proxy.terminate()
            proxy.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["engine", "threads", "demo"])
    parser.add_argument("--chunks", type=int, default=30_000)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()
    if args.what == "engine":
        rows = engine(args.chunks, [100, 1000, 10_000])
        print("| chunks in flight | caller CPU per chunk | wall |\n|---|---|---|")
        for row in rows:
            print(
                f"| {row['in_flight']} | {row['cpu_us_per_chunk']:.1f} us | {row['wall_s']:.2f} s |"
            )
    elif args.what == "threads":
        print(threads(args.threads * 100, 0.01, args.threads))
    else:
        print(demo([96, 100, 96, 100]))


if __name__ == "__main__":
    main()
