"""Issue 24: what a result store costs a call: put_many of 1,000 records, get_many of 1,000
keys (all stored, none stored), on SQLite (a temporary file) and, when `redis-server` is
installed, on a Redis server of its own on loopback. Medians of 7 rounds.

    python -m bench.store [--records 1000] [--size 100 --size 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serverless._caller.store import ResultStore, open_store
from tests.integration.conftest import REDIS_SERVER, redis_server


def keys(n: int, tag: str) -> list[bytes]:
    return [hashlib.sha256(f"{tag}{i}".encode()).digest() for i in range(n)]


def timed(work: Callable[[Any], object], arg: Any) -> float:
    start = time.perf_counter()
    work(arg)
    return time.perf_counter() - start


def measure(store: ResultStore, n: int, size: int) -> str:
    put: list[float] = []
    hit: list[float] = []
    miss: list[float] = []
    for round_ in range(7):
        stored = [(k, os.urandom(size)) for k in keys(n, f"{size}.{round_}.")]
        put.append(timed(store.put_many, stored))
        hit.append(timed(store.get_many, [k for k, _ in stored]))
        miss.append(timed(store.get_many, keys(n, f"absent.{round_}.")))
    ms = {
        name: statistics.median(v) * 1000
        for name, v in (("put", put), ("hit", hit), ("miss", miss))
    }
    return (
        f"{n} records of {size} B: put_many {ms['put']:.1f} ms, get_many {ms['hit']:.1f} ms "
        f"(all stored), {ms['miss']:.1f} ms (none stored)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--size", type=int, action="append")
    args = parser.parse_args()
    sizes = args.size or [100, 10_000]
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(os.path.join(tmp, "results.db"))
        for size in sizes:
            print("sqlite:", measure(store, args.records, size))
        store.close()
        if not Path(REDIS_SERVER).exists():
            print("redis: skipped, redis-server is not installed")
            return
        with redis_server(Path(tmp)) as (url, _):
            store = open_store(url)
            for size in sizes:
                print("redis: ", measure(store, args.records, size))
            store.close()


if __name__ == "__main__":
    main()
