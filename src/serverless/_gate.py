"""How many chunks of one sync function a worker process runs at once.

A worker runs sync functions in a large thread pool, because blocking I/O (the seed's
geocoder) needs many threads. CPU-bound Python gains nothing from more than one thread per
process (the GIL), and dozens of threads contending for it cost 10-25% of throughput
(measured, W4: 1.6-1.8x with 50 chunks in flight per process against 2.0x with 1-2). The gate
learns per function: each chunk reports its thread CPU time and wall time. If the function's
threads together keep the interpreter busy (the sum of their CPU shares is near one core),
more concurrency cannot help and the limit narrows; if they leave it idle, it widens again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time

SATURATED = 0.85  # busy share of one core at which the GIL is the bottleneck
FLOOR = 2  # keep one chunk decoding or encoding while another computes


class Limit:
    """The controller, no I/O: `observe` each chunk, read `limit`."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = self.ceiling

    def observe(self, cpu_s: float, wall_s: float, concurrent: float) -> None:
        """A chunk ran `wall_s` seconds, `cpu_s` of them on the CPU, alongside `concurrent`
        chunks of the same function on average (itself included)."""
        if wall_s <= 0:
            return
        share = min(1.0, max(0.0, cpu_s / wall_s))
        if share * concurrent >= SATURATED:
            # the interpreter is saturated: fewer threads do the same work with less contention;
            # halve rather than drop at once, so a mostly-waiting function is not starved
            wanted = max(FLOOR, int(concurrent) // 2)
        elif share > 0:
            wanted = math.floor(SATURATED / share)  # threads needed to keep one core busy
        else:
            wanted = self.ceiling
        self.limit = max(FLOOR, min(self.ceiling, wanted))


class Gate:
    """An asyncio semaphore whose size follows a Limit; FIFO, on one event loop.

    It also integrates `active` over time, so a chunk can learn how many chunks ran beside it
    on average: `area()` at its start and end, divided by its wall time.
    """

    def __init__(self, ceiling: int) -> None:
        self.control = Limit(ceiling)
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._area = 0.0
        self._since = time.perf_counter()

    def area(self) -> float:
        now = time.perf_counter()
        self._area += self.active * (now - self._since)
        self._since = now
        return self._area

    def _change(self, delta: int) -> None:
        self.area()
        self.active += delta

    async def acquire(self) -> None:
        if self.active < self.control.limit and not self._waiters:
            self._change(+1)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # we were handed a slot just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._change(-1)
        while self._waiters and self.active < self.control.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._change(+1)
                waiter.set_result(None)
