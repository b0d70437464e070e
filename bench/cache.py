"""Issue 24's figures: results stored as they come back (`cache=`), on the local pool.

    python -m bench.cache [--parts resume,rerun,stream,w1,redis] [--quick]
                          [--stream-count N] [--uncached-count N] [--rounds 5] [--json PATH]

Every caller is a fresh process (`python -m bench.cache child ...`), so a cached rerun pays
its own start, and a caller can be SIGKILLed. The workers append each item's execution to a
log as it starts (bench/_ours.counted), so executions are counted where they happen, not
inferred from the results. Parts:

    resume  3,000 items of 20 ms (20 workers, chunks of 10) on SQLite, the caller SIGKILLed
            once half of them have started, then run again: its results byte for byte an
            uninterrupted run's, in order; the executions over both runs against 3,000
    rerun   100,000 items stored, then the same call in a fresh process: its wall time
            (target: under 2 s)
    stream  a stream of 10,000,000 small items, every result stored, streamed again: the
            caller's peak RSS against an uncached stream (target: within 64 MB)
    w1      W1 (3,000 x 100 ms, 100 workers) with cache= (a new SQLite file each run) and
            without, interleaved in one process: the ratio of the medians (target: <= 1.03)
    redis   redis-server on loopback and two callers: the second sends only what the first
            did not store (the first runs 2,000 of the 3,000 items; or it is SIGKILLed)

Prints a markdown table and writes bench/results/cache.json. Run from a checkout with
PYTHONPATH=src (the children get this directory and src/ on their path).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STORE_MB = 64  # the stream's target: a cached stream's caller within this much of an uncached


def expected(start: int, stop: int) -> list[list[int]]:
    """What bench/_ours.counted returns for the items start..stop-1."""
    return [[item, item * item % 1_000_003] for item in range(start, stop)]


# -- the callers: one process each ----------------------------------------------------------


def child_call(args: argparse.Namespace) -> dict[str, Any]:
    """counted() over items start..count-1; the results, encoded, written to --out."""
    import msgspec

    from . import _ours

    options: dict[str, Any] = {"workers": args.workers}
    if args.chunk:
        options["chunk_size"] = args.chunk
    if args.store:
        options["cache"] = args.store
    step = _ours.counted.with_options(**options)
    started = time.perf_counter()
    results, stats = step.with_stats(list(range(args.start, args.count)), args.seconds)
    wall = time.perf_counter() - started
    if args.out:
        Path(args.out).write_bytes(msgspec.msgpack.encode(results))
    return {
        "wall_s": wall,
        "in_order": results == expected(args.start, args.count),
        "hits": stats.cache_hits,
        "sent": stats.items_sent,
        "cache_error": stats.cache_error,
        "processes": stats.processes,
        "peak_rss_mb": _peak_rss_mb(),
    }


def child_stream(args: argparse.Namespace) -> dict[str, Any]:
    """square() over a generator of `count` integers, streamed, each result checked."""
    from . import _ours

    step = _ours.square.with_options(cache=args.store) if args.store else _ours.square
    started = time.perf_counter()
    done = 0
    for result in step.stream(iter(range(args.count))):
        if result != done * done:
            raise AssertionError(f"result {done} is out of place")
        done += 1
    stats = step.stats
    return {
        "wall_s": time.perf_counter() - started,
        "results": done,
        "hits": getattr(stats, "cache_hits", 0),
        "sent": getattr(stats, "items_sent", 0),
        "cache_error": getattr(stats, "cache_error", None),
        "peak_rss_mb": _peak_rss_mb(),
    }


def child_fill(args: argparse.Namespace) -> dict[str, Any]:
    """square() with cache= over 0..count-1 as list calls of --chunk items: each call waits
    for its results to be stored, so the store ends up whole."""
    from . import _ours

    step = _ours.square.with_options(cache=args.store)
    started = time.perf_counter()
    hits = sent = 0
    errors = []
    for first in range(0, args.count, args.chunk):
        items = list(range(first, min(args.count, first + args.chunk)))
        results, stats = step.with_stats(items)
        if results != [x * x for x in items]:
            raise AssertionError("results lost, duplicated or out of order")
        hits, sent = hits + stats.cache_hits, sent + stats.items_sent
        errors += [stats.cache_error] if stats.cache_error else []
    return {
        "wall_s": time.perf_counter() - started,
        "hits": hits,
        "sent": sent,
        "cache_error": "; ".join(errors) or None,
        "peak_rss_mb": _peak_rss_mb(),
    }


def child_w1(args: argparse.Namespace) -> dict[str, Any]:
    """W1 with and without cache= in turns (which goes first alternates), on one warm pool;
    each cached run on a new SQLite file, so every item is looked up, sent and stored."""
    from . import _ours

    items = list(range(args.count))
    plain = _ours.wait.with_options(workers=args.workers)
    plain(items, args.seconds)  # the pool starts: no part of the figures
    walls: dict[str, list[float]] = {"plain": [], "cached": []}
    sent = []
    for round_ in range(args.rounds):
        order = ("plain", "cached") if round_ % 2 == 0 else ("cached", "plain")
        for kind in order:
            step = plain
            if kind == "cached":
                step = plain.with_options(cache=str(Path(args.dir) / f"w1-{round_}.db"))
            started = time.perf_counter()
            results, stats = step.with_stats(items, args.seconds)
            walls[kind].append(time.perf_counter() - started)
            if results != items:
                raise AssertionError("results lost, duplicated or out of order")
            if kind == "cached":
                sent.append(stats.items_sent)
    return {"walls": walls, "sent": sent}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the parts: run from the parent --------------------------------------------------------


class Bench:
    def __init__(self, tmp: Path, quick: bool) -> None:
        self.tmp, self.quick = tmp, quick
        self.rows: list[dict[str, Any]] = []  # part, figure, value, target, ok

    def row(
        self, part: str, figure: str, value: str, target: str = "", ok: bool | None = None
    ) -> None:
        self.rows.append(
            {"part": part, "figure": figure, "value": value, "target": target, "ok": ok}
        )

    def env(self, log: Path) -> dict[str, str]:
        env = dict(os.environ)
        path = [str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
        env["BENCH_CACHE_LOG"] = str(log)
        return env

    def command(self, kind: str, **options: Any) -> list[str]:
        command = [sys.executable, "-m", "bench.cache", "child", kind]
        for name, value in options.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        return command

    def child(self, kind: str, log: Path, timeout: float = 600, **options: Any) -> dict[str, Any]:
        done = subprocess.run(
            self.command(kind, **options),
            env=self.env(log),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"child {kind} {options} failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
        return result

    def killed(self, log: Path, at: int, **options: Any) -> int:
        """A caller SIGKILLed once `at` executions are logged; the executions it caused."""
        proc = subprocess.Popen(
            self.command("call", **options),
            env=self.env(log),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 120
            while _lines(log) < at:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the caller to kill ended or stalled first")
                time.sleep(0.005)
            proc.kill()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            assert proc.stderr is not None
            proc.stderr.close()
        time.sleep(0.5)  # its workers die with it (PR_SET_PDEATHSIG): nothing more is logged
        return _lines(log)

    # resume ----------------------------------------------------------------------------

    def resume(self, store: str | None = None, part: str = "resume") -> None:
        """A caller SIGKILLed half way, then run again (on `store`: a SQLite file if None)."""
        count, seconds = (300, 0.01) if self.quick else (3000, 0.02)
        slow = {"count": count, "seconds": seconds, "workers": 20, "chunk": 10}
        base = self.tmp / f"{part}-resume"
        base.mkdir()
        store = store or str(base / "results.db")
        reference = self.child("call", base / "reference.log", **slow, out=base / "ref.bin")
        first = self.killed(base / "first.log", count // 2, **slow, store=store)
        again = self.child("call", base / "again.log", **slow, store=store, out=base / "out.bin")
        ran = {name: _executions(base / f"{name}.log") for name in ("first", "again")}
        same = (base / "out.bin").read_bytes() == (base / "ref.bin").read_bytes()
        lost = first - again["hits"]  # started by the first caller, not stored: in flight
        total = first + sum(ran["again"].values())
        whole = set(ran["first"]) | set(ran["again"]) == set(range(count))
        once = max(ran["again"].values(), default=1) == 1 and again["sent"] == len(ran["again"])
        self.row(
            part,
            f"{count} x {seconds * 1000:.0f} ms, 20 workers, chunks of 10: the caller killed "
            "after this many executions, then run again",
            f"{first} executed before the kill; rerun: {again['hits']} from the store, "
            f"{again['sent']} sent, {again['wall_s']:.2f} s (uninterrupted: "
            f"{reference['wall_s']:.2f} s)",
        )
        self.row(
            part,
            "results of the rerun against an uninterrupted run (encoded bytes), in order",
            "identical" if same and again["in_order"] else "DIFFERENT",
            "identical",
            same and again["in_order"],
        )
        self.row(
            part,
            "executions over both runs (each item at least once; the rerun ran each item it "
            "sent once)",
            f"{total} for {count} items: +{total - count} = items in flight at the kill "
            f"({lost}; at most 20 chunks x 10 = 200)",
            f"{count} + in flight",
            whole and once and total - count == lost <= 200,
        )

    # rerun -----------------------------------------------------------------------------

    def rerun(self) -> None:
        count = 10_000 if self.quick else 100_000
        base = self.tmp / "rerun"
        base.mkdir()
        store = str(base / "results.db")
        fill = self.child("call", base / "fill.log", count=count, store=store)
        walls, calls = [], []
        for run in range(3):
            started = time.perf_counter()
            again = self.child("call", base / f"rerun{run}.log", count=count, store=store)
            walls.append(time.perf_counter() - started)
            calls.append(again["wall_s"])
            executed = _lines(base / f"rerun{run}.log")
            if executed or again["hits"] != count or not again["in_order"]:
                raise AssertionError(f"a cached rerun executed {executed} items: {again}")
        self.row(
            "rerun",
            f"{count:,} items stored (first run {fill['wall_s']:.2f} s), the same call in a "
            "fresh process, 3 runs: the call's wall time (the process's, start included)",
            f"{statistics.median(calls):.2f} s median ({_list(calls)}); process "
            f"{statistics.median(walls):.2f} s; 0 executions, {count:,} from the store",
            "< 2 s",
            statistics.median(calls) < 2.0,
        )

    # stream ----------------------------------------------------------------------------

    def stream(self, count: int, uncached: int) -> None:
        """An uncached stream; a stream that stores as it goes (its first run); the rest
        stored by list calls that each wait for their writes; then the stream fully cached."""
        base = self.tmp / "stream"
        base.mkdir()
        store = str(base / "results.db")
        log = base / "none.log"
        plain = self.child("stream", log, timeout=3600, count=uncached)
        first = self.child("stream", log, timeout=3600, count=count, store=store)
        fill = self.child("fill", log, timeout=3600, count=count, store=store, chunk=250_000)
        cached = self.child("stream", log, timeout=3600, count=count, store=store)
        size = os.path.getsize(store) / 2**20
        self.row(
            "stream",
            f"uncached: a stream of {uncached:,} small items (square)",
            f"peak RSS {plain['peak_rss_mb']:.0f} MB, {plain['wall_s']:.0f} s",
        )
        self.row(
            "stream",
            "its first run with cache= (empty SQLite file): stores as it goes",
            f"peak RSS {first['peak_rss_mb']:.0f} MB, {first['wall_s']:.0f} s; "
            f"{fill['hits']:,} of {count:,} stored by its end; store error: "
            f"{first['cache_error'] or 'none'}",
            f"(none set; {plain['peak_rss_mb'] + STORE_MB:.0f} MB would be within {STORE_MB})",
        )
        self.row(
            "stream",
            f"the rest stored by list calls of 250,000 ({fill['wall_s']:.0f} s, store error: "
            f"{fill['cache_error'] or 'none'}, file {size:,.0f} MB); then the stream of "
            f"{count:,} again, fully cached, in a fresh process",
            f"peak RSS {cached['peak_rss_mb']:.0f} MB, {cached['wall_s']:.0f} s "
            f"({cached['hits']:,} from the store, {cached['sent']} sent): "
            f"{cached['peak_rss_mb'] - plain['peak_rss_mb']:+.0f} MB against uncached",
            f"within {STORE_MB} MB",
            cached["hits"] == count
            and cached["results"] == count
            and cached["peak_rss_mb"] - plain["peak_rss_mb"] <= STORE_MB,
        )

    # w1 --------------------------------------------------------------------------------

    def w1(self, rounds: int) -> None:
        count, seconds = (300, 0.01) if self.quick else (3000, 0.1)
        base = self.tmp / "w1"
        base.mkdir()
        got = self.child(
            "w1",
            base / "none.log",
            timeout=3600,
            count=count,
            seconds=seconds,
            workers=100,
            rounds=rounds,
            dir=base,
        )
        plain, cached = got["walls"]["plain"], got["walls"]["cached"]
        ratio = statistics.median(cached) / statistics.median(plain)
        self.row(
            "w1",
            f"W1 ({count} x {seconds * 1000:.0f} ms, 100 workers), {rounds} rounds, "
            "interleaved: cache= on a new SQLite file each run, against none",
            f"cached {statistics.median(cached):.3f} s median ({_list(cached)}), none "
            f"{statistics.median(plain):.3f} s ({_list(plain)}): ratio {ratio:.3f}",
            "<= 1.03",
            ratio <= 1.03 and got["sent"] == [count] * rounds,
        )

    # redis -----------------------------------------------------------------------------

    def redis(self) -> None:
        if not shutil.which("redis-server"):
            self.row("redis", "two callers on one Redis store", "skipped: no redis-server")
            return
        port = _free_port()
        base = self.tmp / "redis"
        base.mkdir()
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(base)]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            _wait_for_port(port)
            count = 300 if self.quick else 3000
            part = count * 2 // 3
            spec = f"redis://127.0.0.1:{port}/0"
            first = self.child("call", base / "a.log", count=part, store=spec)
            second = self.child("call", base / "b.log", count=count, store=spec)
            ran = _executions(base / "b.log")
            exact = ran == collections.Counter(range(part, count))
            self.row(
                "redis",
                f"caller A runs items 0-{part - 1}, then caller B (another process) all "
                f"{count}, on one Redis store: B's executions",
                f"A sent {first['sent']}; B: {second['hits']} from the store, "
                f"{second['sent']} sent, executed {sum(ran.values())} "
                f"({'exactly' if exact else 'NOT'} items {part}-{count - 1}, once each)",
                f"B executes items {part}-{count - 1} only",
                exact and second["in_order"] and second["sent"] == count - part,
            )
            self.resume(f"redis://127.0.0.1:{port}/1", part="redis")
        finally:
            server.terminate()
            server.wait(10)


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as log:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: log.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _executions(path: Path) -> collections.Counter[int]:
    if not path.exists():
        return collections.Counter()
    return collections.Counter(int(line) for line in path.read_text().split())


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| part | what | measured | target | ok |", "|---|---|---|---|---|"]
    for r in rows:
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "**NO**")
        lines.append(f"| {r['part']} | {r['figure']} | {r['value']} | {r['target']} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return _child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="resume,rerun,stream,w1,redis")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--stream-count", type=int, default=None, help="default 10,000,000")
    parser.add_argument("--uncached-count", type=int, default=None, help="default: the same")
    parser.add_argument("--rounds", type=int, default=5, help="w1: rounds of each")
    parser.add_argument("--json", type=Path, default=RESULTS / "cache.json")
    args = parser.parse_args(argv)
    stream = args.stream_count or (100_000 if args.quick else 10_000_000)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        bench = Bench(Path(tmp), args.quick)
        for part in args.parts.split(","):
            started = time.perf_counter()
            if part == "stream":
                bench.stream(stream, args.uncached_count or stream)
            elif part == "w1":
                bench.w1(2 if args.quick else args.rounds)
            else:
                getattr(bench, part)()
            sys.stderr.write(f"{part}: {time.perf_counter() - started:.0f} s\n")
    print(
        f"cache= on the local pool; {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}\n"
    )
    print(table(bench.rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": bench.rows}, indent=2))
    return 0 if all(r["ok"] is not False for r in bench.rows) else 1


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache child")
    parser.add_argument("kind", choices=["call", "stream", "fill", "w1"])
    parser.add_argument("--store", default="")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    run = {"call": child_call, "stream": child_stream, "fill": child_fill, "w1": child_w1}
    json.dump(run[args.kind](args), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
