"""Run the workloads for ONE tool, in this process, and print one JSON line per workload.

    python -m bench._run --tool threads --workloads W1,W2t [--quick] [--runs 3] [--loops N]

bench/__main__.py starts one such process per tool, so memory and imports never mix.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import _work
from ._tools import CPUS, TOOLS, Serverless, Tool


class RSSSampler:
    """Peak resident memory of this (the caller's) process, sampled every 5 ms in a thread."""

    def __init__(self) -> None:
        try:
            import psutil

            proc = psutil.Process()
            self._read: Callable[[], int] = lambda: int(proc.memory_info().rss)
        except ImportError:  # no psutil: /proc/self/statm on Linux
            self._read = _statm_rss
        self.peak = self._read()
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._read())

    def reset(self) -> int:
        gc.collect()
        self.peak = now = self._read()
        return now

    def stop(self) -> None:
        self._stop.set()


def _statm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Sizes:
    w1_items: int
    w1_wait: float
    w1_chunk: int
    w2_items: int
    w2_chunk: int
    w2_single: int
    w3_calls: int
    w4_items: int
    w5_items: int
    w5_chunk: int
    w5_stream: int
    w5_stream_chunk: int
    w6_items: int = 3000
    w6_quota: float = 200.0  # lookups per second the service allows
    w6_latency: float = 0.02  # seconds per lookup, refused ones included


FULL = Sizes(3000, 0.1, 30, 200_000, 2000, 10_000, 300, 200, 20_000, 200, 10_000_000, 10_000)
QUICK = Sizes(
    300, 0.01, 3, 20_000, 200, 500, 30, 20, 2000, 20, 100_000, 1000, w6_items=200, w6_quota=100
)
W6_WIDTH = 100  # workers: chunks in flight for ours, threads (or thread slots) for the peers


def flat(chunks: Iterable[list[Any]]) -> list[Any]:
    return [x for c in chunks for x in c]


def split(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


SLOW_S = 60.0


class Runner:
    def __init__(self, tool: Tool, sizes: Sizes, runs: int, loops: int) -> None:
        self.tool, self.sizes, self.runs, self.loops = tool, sizes, runs, loops
        self.rss = RSSSampler()

    def mapper(self, fn: str, chunk: int, args: tuple[Any, ...]) -> Callable[[list[Any]], Any]:
        if isinstance(self.tool, _Ours):
            return lambda items: self.tool.run(fn, items, chunk, args)  # type: ignore[attr-defined]
        return lambda items: flat(self.tool.map(fn, split(items, chunk), args))

    def timed(
        self, width: int, io: bool, call: Callable[[], Any], check: Callable[[Any], None]
    ) -> dict[str, Any]:
        """Cold: pool start plus the first call; warm: the median of `runs` further calls
        (one only when the cold call took over a minute: Dask streams 10 M items at ~25 k/s)."""
        base = self.rss.reset()
        started = time.perf_counter()
        self.tool.start(width, io)
        try:
            check(call())
            cold = time.perf_counter() - started
            warm = []
            for _ in range(self.runs if cold < SLOW_S else 1):
                started = time.perf_counter()
                result = call()
                warm.append(time.perf_counter() - started)
                check(result)
                del result
        finally:
            self.tool.close()
        return {
            "cold_s": cold,
            "warm_s": statistics.median(warm),
            "warm_runs_s": warm,
            "rss_base_mb": base / 2**20,
            "rss_peak_mb": self.rss.peak / 2**20,
        }

    # -- the workloads ---------------------------------------------------------------------

    def w1(self) -> dict[str, Any]:
        s = self.sizes
        if self.tool.process_per_slot:
            return {"skipped": "needs 100 processes for 100 blocking waits at once"}
        items = list(range(s.w1_items))
        width = s.w1_items // s.w1_chunk
        run = self.mapper("wait", s.w1_chunk, (s.w1_wait,))
        row = self.timed(width, True, lambda: run(items), _equal(items))
        limit = s.w1_items * s.w1_wait / width
        row.update(metric="efficiency", value=limit / row["warm_s"], limit_s=limit)
        return row

    def w2t(self) -> dict[str, Any]:
        s = self.sizes
        items = list(range(s.w2_items))
        run = self.mapper("square", s.w2_chunk, ())
        row = self.timed(_width(self.tool, 100), False, lambda: run(items), _squares(items))
        row.update(metric="items/s", value=s.w2_items / row["warm_s"])
        return row

    def w2r(self) -> dict[str, Any]:
        s = self.sizes
        items = list(range(s.w2_single))
        run = self.mapper("square", 1, ())
        row = self.timed(_width(self.tool, 100), False, lambda: run(items), _squares(items))
        row.update(metric="us/item", value=row["warm_s"] / s.w2_single * 1e6)
        return row

    def w3(self) -> dict[str, Any]:
        latencies: list[float] = []
        run = self.mapper("square", 1, ())

        def calls() -> list[int]:
            out = []
            latencies.clear()
            for i in range(self.sizes.w3_calls):
                started = time.perf_counter()
                out += run([i])
                latencies.append(time.perf_counter() - started)
            return out

        items = list(range(self.sizes.w3_calls))
        row = self.timed(_width(self.tool, 100), False, calls, _squares(items))
        ordered = sorted(latencies)  # of the last warm run
        p50 = statistics.median(ordered)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        row.update(metric="p50/p99 ms", value=p50 * 1e3, p99_ms=p99 * 1e3, p50_ms=p50 * 1e3)
        row["warm_s"] = p50  # a call's round trip, not the 300 calls' total
        return row

    def w4(self) -> dict[str, Any]:
        s = self.sizes
        items = list(range(s.w4_items))
        sample = items[: max(5, len(items) // 8)]
        # The serial baseline: the fastest of three passes over a sample, after a warm-up, so
        # a slow first pass (a cold CPU, a busy neighbour) does not flatter the speedup
        _work.spin(sample[:5], self.loops)
        passes = []
        for _ in range(3):
            started = time.perf_counter()
            expected_sample = _work.spin(sample, self.loops)
            passes.append(time.perf_counter() - started)
        serial = min(passes) * len(items) / len(sample)

        def check(result: list[int]) -> None:
            assert len(result) == len(items), "results lost or duplicated"
            assert result[: len(sample)] == expected_sample, "wrong or out-of-order results"

        run = self.mapper("spin", 2, (self.loops,))
        row = self.timed(_width(self.tool, 100), False, lambda: run(items), check)
        row.update(metric="speedup", value=serial / row["warm_s"], serial_s=serial)
        return row

    def w5p(self) -> dict[str, Any]:
        s = self.sizes
        items = _work.make_payload(s.w5_items)
        expected = _work.payload(items)
        run = self.mapper("payload", s.w5_chunk, ())
        row = self.timed(_width(self.tool, 100), False, lambda: run(items), _equal(expected))
        row.update(metric="MB/s", value=s.w5_items * 1.03e-3 / row["warm_s"])
        return row

    def w5s(self) -> dict[str, Any]:
        s = self.sizes
        count, chunk = s.w5_stream, s.w5_stream_chunk
        ours = self.tool if isinstance(self.tool, _Ours) else None
        if ours is not None:

            def results() -> Iterator[Any]:
                return ours.stream_items("square", iter(range(count)), chunk, ())
        else:

            def results() -> Iterator[Any]:
                chunks = _lazy_chunks(count, chunk)
                return itertools.chain.from_iterable(self.tool.stream("square", chunks, ()))

        def consume() -> int:
            n = 0
            for n, x in enumerate(results(), 1):
                if x != (n - 1) * (n - 1):
                    raise AssertionError(f"item {n - 1}: got {x}, wrong or out of order")
            return n

        def check(n: int) -> None:
            assert n == count, f"{n} results for {count} items"

        # 8 chunks in flight: tiny items need no more to keep 2 processes busy, and each
        # chunk in flight (or waiting to be yielded in order) holds its items in memory
        row = self.timed(_width(self.tool, 8), False, consume, check)
        row.update(
            metric="items/s",
            value=count / row["warm_s"],
            rss_growth_mb=row["rss_peak_mb"] - row["rss_base_mb"],
        )
        return row

    def w6(self) -> list[dict[str, Any]]:
        """A downstream with a quota: the demo's geocoder allowing w6_quota lookups/s (a token
        bucket holding one second of it), 429 + Retry-After beyond, w6_latency per call.
        Every figure but the wall time is counted by the service itself."""
        if self.tool.process_per_slot:
            return [{"skipped": "needs 100 processes for 100 blocking calls at once"}]
        try:
            from serverless.demo.geocoder import Geocoder
        except ImportError as exc:  # aiohttp: the demo extra
            return [{"skipped": f"needs the demo extra: {exc.name} not installed"}]
        s = self.sizes
        items = quota_items(s.w6_items)
        with Geocoder(latency=s.w6_latency, quota=s.w6_quota) as url:
            self.tool.start(W6_WIDTH, True)
            try:
                rows: list[dict[str, Any]] = []
                for name, call in self._quota_variants(url.removeprefix("http://")):
                    if rows:  # the bucket refills: each row starts with a second of the quota
                        time.sleep(1.2)
                    rows.append(self._quota_row(name, call, items, url, s.w6_quota))
                return rows
            finally:
                self.tool.close()

    def _quota_variants(self, service: str) -> list[tuple[str, Callable[[list[int]], Any]]]:
        quota = self.sizes.w6_quota
        if isinstance(self.tool, _Ours):
            import serverless

            from . import _ours

            def ours(**options: Any) -> Callable[[list[int]], Any]:
                step = _ours.lookup.with_options(workers=W6_WIDTH, **options).partial(service)
                return lambda items: serverless.Pipeline(step).execute(items)

            _ours.square.with_options(workers=W6_WIDTH)(list(range(W6_WIDTH)))  # start the pool
            return [
                (f"rate={quota:g}", ours(rate=quota)),
                ("rate=auto", ours(rate="auto")),
                ("no rate", ours()),
            ]
        self.tool.map("square", [[n] for n in range(W6_WIDTH)], ())  # start the workers

        # one task per item, as the peers' docs map over a list of URLs
        def peer(by_hand: bool) -> Callable[[list[int]], Any]:
            return lambda items: flat(self.tool.map("lookup", split(items, 1), (service, by_hand)))

        return [("429 = item lost", peer(False)), ("retry 429s by hand", peer(True))]

    def _quota_row(
        self, name: str, call: Callable[[list[int]], Any], items: list[int], url: str, quota: float
    ) -> dict[str, Any]:
        from serverless.demo.geocoder import service_stats

        before = service_stats(url)
        started = time.perf_counter()
        out = call(items)
        wall = time.perf_counter() - started
        after = service_stats(url)
        run = out if not isinstance(out, list) else None  # ours: a PipelineRun
        result: list[list[Any]] = run.result if run is not None else out
        served = after["lookups"] - before["lookups"]
        refused = after["throttled"] - before["throttled"]
        lost = sum(1 for r in result if r[1] == _work.REFUSED)
        ordered = len(result) == len(items) and all(
            r[0] == code and (r[1] in (None, _work.REFUSED) or f"{code:05d}" in r[1])
            for r, code in zip(result, items, strict=True)
        )
        row: dict[str, Any] = {
            "variant": name,
            "wall_s": wall,
            "served": served,  # lookups the service answered (200 or 404)
            "refused": refused,  # and refused with a 429
            "quota_used": served / wall / quota,
            "refused_share": refused / max(1, served + refused),
            "lost": lost,
            "in_order": ordered and not lost,  # every item resolved, in input order
        }
        if run is not None:
            step = run.steps[0]
            row.update(throttles=step.throttles, rate=step.rate, window=step.window)
            if not row["in_order"]:
                row["error"] = "items lost, or results out of order"
        elif not ordered:
            row["error"] = "results out of order"
        return row


def quota_items(count: int) -> list[int]:
    """W6's zipcodes: random 5-digit codes, about half of them real (the demo's draw)."""
    import random

    rng = random.Random(6)
    return [rng.randint(10000, 99999) for _ in range(count)]


def _lazy_chunks(count: int, size: int) -> Iterator[list[int]]:
    items = iter(range(count))
    while chunk := list(itertools.islice(items, size)):
        yield chunk


_Ours = Serverless


def _width(tool: Tool, chunks_in_flight: int) -> int:
    """Ours: chunks in flight (the pool has a process per CPU); the peers: a process per CPU."""
    return chunks_in_flight if isinstance(tool, _Ours) else CPUS


def _equal(expected: list[Any]) -> Callable[[list[Any]], None]:
    def check(result: list[Any]) -> None:
        assert len(result) == len(expected), f"{len(result)} results for {len(expected)} items"
        assert result == expected, "wrong or out-of-order results"

    return check


def _squares(items: list[int]) -> Callable[[list[int]], None]:
    return _equal([x * x for x in items])


WORKLOADS = {
    "W1": Runner.w1,
    "W2t": Runner.w2t,
    "W2r": Runner.w2r,
    "W3": Runner.w3,
    "W4": Runner.w4,
    "W5p": Runner.w5p,
    "W5s": Runner.w5s,
}
# workloads with rows of their own columns (one per variant): printed as a table of their own
QUOTA_WORKLOADS: dict[str, Callable[[Runner], list[dict[str, Any]]]] = {"W6": Runner.w6}
ALL_WORKLOADS = [*WORKLOADS, *QUOTA_WORKLOADS]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tool", required=True, choices=sorted(TOOLS))
    parser.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loops", type=int, default=_work.SPIN_PER_ITEM)
    args = parser.parse_args()
    try:
        tool = TOOLS[args.tool]()
    except ImportError as exc:
        for name in args.workloads.split(","):
            print(json.dumps({"workload": name, "skipped": f"not installed: {exc.name}"}))
        return 0
    runner = Runner(tool, QUICK if args.quick else FULL, args.runs, args.loops)
    for name in args.workloads.split(","):
        head: dict[str, Any] = {"workload": name, "tool": args.tool, "version": tool.version}
        try:
            if name in QUOTA_WORKLOADS:
                rows = [head | r for r in QUOTA_WORKLOADS[name](runner)]
            else:
                rows = [head | WORKLOADS[name](runner)]
            for row in rows:
                row["ok"] = "skipped" not in row and "error" not in row
        except Exception as exc:
            traceback.print_exc()
            rows = [head | {"ok": False, "error": f"{type(exc).__name__}: {exc}"}]
        for row in rows:
            print(json.dumps(row), flush=True)
    runner.rss.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
