"""A stream of large items on the local pool (issue 22): its wall time, the caller's peak RSS,
and the most bytes of results it held, optionally behind one straggling chunk.

    python -m bench.streams                                    # 1,000,000 items of 4 KiB
    python -m bench.streams --count 300000 --size 1200 --stall-at 100 --stall 3
    python -m bench.streams ... --buffer 16777216              # buffer= in bytes

Prints one JSON object. The items come from a generator and each result is checked for its
place and then dropped, so what the caller holds is what the stream holds. Run it with
PYTHONPATH pointing at another checkout's src/ to compare (a checkout without `buffer=`
runs it with --buffer left out).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

from . import _work


def items(count: int, size: int) -> Iterator[bytes]:
    for index in range(count):
        yield _work.blob(index, size)


def run(
    count: int, size: int, workers: int, stall_at: int, stall: float, buffer: int | None
) -> dict[str, Any]:
    from . import _ours

    options: dict[str, Any] = {"workers": workers}
    if buffer is not None:
        options["buffer"] = buffer
    step = _ours.echo.with_options(**options)
    started = time.perf_counter()
    done, error = 0, None
    try:
        for result in step.stream(items(count, size), stall_at, stall):
            if len(result) != size or _work.blob_index(result) != done:
                raise AssertionError(f"result {done} is out of place")
            done += 1
    except Exception as exc:  # reported, not raised: the figure is how far it got
        error = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - started
    stats = step.stats
    chunks = stats.chunks if stats is not None else []
    return {
        "count": count,
        "size": size,
        "workers": workers,
        "stall": stall if stall_at >= 0 else 0.0,
        "results": done,
        "error": error,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "buffered_mib": round(getattr(stats, "buffered", 0) / 2**20, 1),
        "largest_chunk_items": max((c.size for c in chunks), default=0),
        "chunks": len(chunks),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per item (at least 8)")
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--stall-at", type=int, default=-1, help="the item whose chunk waits")
    parser.add_argument("--stall", type=float, default=0.0, help="seconds it waits")
    parser.add_argument("--buffer", type=int, default=None, help="buffer= in bytes")
    args = parser.parse_args(argv)
    figures = run(
        args.count, max(8, args.size), args.workers, args.stall_at, args.stall, args.buffer
    )
    json.dump(figures, sys.stdout)
    sys.stdout.write("\n")
    return 0 if figures["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
