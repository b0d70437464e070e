"""Where the time goes per chunk: py-spy on the caller and on one local-pool worker while a
workload runs, then the time per category (signing, encoding, HTTP, event loop, compute...).

    python -m bench.profile [--workload W2r|W3|W2t] [--seconds 10] [--rate 250]

Needs py-spy (`pip install .[bench]`) and permission to ptrace (root, or
kernel.yama.ptrace_scope=0). Prints one markdown table per process; raw stacks go to
bench/results/profile-*.txt.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import _ours

RESULTS = Path(__file__).resolve().parent / "results"

# First match wins, tested against each frame from the leaf up: the leaf's own category.
CATEGORIES = [
    ("idle: waiting for events", ("EpollSelector.select", "Condition.wait", "_worker (concurrent")),
    ("signing (HMAC, SHA-256)", ("Keyring.", "string_to_sign", "signed_headers")),
    ("encoding and decoding", ("serverless/_wire/", "msgspec")),
    ("user function (compute)", ("bench/_work.py", "bench/_ours.py")),
    ("socket writes (kernel)", ("Transport.write", "sock_send")),
    ("socket reads", ("_read_ready",)),
    ("HTTP client (_caller/http.py)", ("serverless/_caller/http.py",)),
    ("HTTP server (uvicorn, httptools)", ("uvicorn/", "httptools")),
    ("worker checks and run (_worker/)", ("serverless/_worker/",)),
    ("dispatcher (_caller/, _function)", ("serverless/",)),
    ("thread pool handoff", ("concurrent/futures", "threading.py")),
    ("asyncio event loop", ("asyncio/",)),
]


def categorise(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, keys in CATEGORIES:
            if any(key in frame for key in keys):
                return name
    return "other"


def summarise(path: Path) -> list[tuple[str, float]]:
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[categorise(stack.split(";"))] += int(n)
    busy = sum(v for k, v in counts.items() if not k.startswith("idle"))
    return [(k, v / busy) for k, v in counts.most_common() if not k.startswith("idle")]


def load(workload: str, stop: threading.Event) -> None:
    items = list(range(10_000 if workload != "W2t" else 200_000))
    square = _ours.square.with_options(
        chunk_size={"W2r": 1, "W2t": 2000}.get(workload, 1), workers=100
    )
    while not stop.is_set():
        if workload == "W3":
            for i in range(300):
                square([i])
        else:
            assert square(items) == [x * x for x in items]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="W2r", choices=["W2r", "W2t", "W3"])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=int, default=250)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed: pip install .[bench]")
        return 2
    from serverless._pool import pool as _pool

    _ours.square([1])  # start the local pool
    assert _pool._pool is not None
    worker = _pool._pool.pids[0]
    stop = threading.Event()
    thread = threading.Thread(target=load, args=(args.workload, stop), daemon=True)
    thread.start()
    time.sleep(1)
    RESULTS.mkdir(exist_ok=True)
    outputs = {"caller": RESULTS / "profile-caller.txt", "worker": RESULTS / "profile-worker.txt"}
    procs = [
        subprocess.Popen(
            [
                spy,
                "record",
                "-p",
                str(pid),
                "-d",
                str(args.seconds),
                "-r",
                str(args.rate),
                "-f",
                "raw",
                "-o",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid, out in ((os.getpid(), outputs["caller"]), (worker, outputs["worker"]))
    ]
    for proc in procs:
        proc.wait()
    stop.set()
    thread.join(30)
    print(
        f"{args.workload}: share of busy (non-idle) samples per category, "
        f"{args.seconds:.0f} s at {args.rate} Hz\n"
    )
    for side, path in outputs.items():
        if not path.exists():
            print(f"{side}: no profile (py-spy needs ptrace permission)")
            continue
        print(f"| {side} | share |\n|---|---|")
        for name, share in summarise(path):
            print(f"| {name} | {share:.1%} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
