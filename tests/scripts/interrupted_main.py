"""A call on the local pool that its caller gives up on, as a user's script would (run by
tests/integration/test_interrupt.py): `interrupted_main.py FORM KIND PATH`.

FORM is how the caller gives up once the work has begun: "call" (Ctrl-C: SIGINT to the
script's process group, as a terminal sends it), "aio" (the awaiting task is cancelled),
"submit" (the future is cancelled) or "stream" (the stream is closed early). KIND is the call:
"return" (errors="return", item by item), "rate" (rate=, paced parts of several items) or
"plain" (one-item chunks, many queued). Each item appends its start time to PATH (stamped).
Prints the pool's worker pids ("before"), "stopped <time>" when it gave up, then, 3 s later,
a small call's results ("after") and the pids that serve it ("pids"): the same workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests import sample_functions as sf

ITEMS = list(range(400))


def call(kind: str) -> tuple[Any, float]:
    """The function, and the seconds each item takes."""
    if kind == "return":  # chunks of 40 items, run item by item: 2 s each
        return sf.stamped.with_options(errors="return", workers=4, chunk_size=40), 0.05
    if kind == "rate":  # each request of a paced chunk carries 10 items of 0.3 s
        return sf.stamped.with_options(rate=40, workers=4), 0.3
    return sf.stamped.with_options(workers=4, chunk_size=1), 0.05


def begun(path: Path, items: int = 8) -> None:
    """Wait until `items` items have started."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= items:
            return
        time.sleep(0.01)
    raise TimeoutError("the call did not start")


def stopped() -> None:
    print("stopped", time.time(), flush=True)


def main(form: str, kind: str, path: Path) -> None:
    sf.stamped([0], str(path) + ".warm")  # the pool is up before the call
    print("before", sorted(set(sf.pids(list(range(200))))), flush=True)
    fn, seconds = call(kind)
    if form == "call":

        def interrupt() -> None:
            begun(path)
            stopped()
            os.killpg(os.getpgid(0), signal.SIGINT)

        threading.Thread(target=interrupt, daemon=True).start()
        with contextlib.suppress(KeyboardInterrupt):
            fn(ITEMS, str(path), seconds)
    elif form == "aio":

        async def cancel() -> None:
            task = asyncio.ensure_future(fn.aio(ITEMS, str(path), seconds))
            await asyncio.get_running_loop().run_in_executor(None, begun, path)
            stopped()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(cancel())
    elif form == "submit":
        future = fn.submit(ITEMS, str(path), seconds)
        begun(path)
        stopped()
        future.cancel()
    else:
        stream = fn.stream(ITEMS, str(path), seconds)
        next(stream)
        begun(path)
        stopped()
        stream.close()
    time.sleep(3)  # the workers had this long to go on
    print("after", sf.square([1, 2, 3]), flush=True)
    print("pids", sorted(set(sf.pids(list(range(200))))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
