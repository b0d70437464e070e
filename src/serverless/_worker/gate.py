"""How many chunks of one sync function a worker process runs at once.

A worker runs sync functions in a large thread pool, because blocking I/O (the seed's
geocoder) needs many threads. CPU-bound Python gains nothing from more than one thread per
process (the GIL), and dozens of threads contending for it cost 10-25% of throughput
(measured, W4: 1.6-1.8x with 50 chunks in flight per process against 2.0x with 1-2). The gate
learns per function: each chunk reports its thread CPU time and wall time. If the function's
threads together keep the interpreter busy (the sum of their CPU shares is near one core),
more concurrency cannot help and the limit narrows; if they leave it idle, it widens again.

What was learned can be stale: a function CPU-bound on some inputs may wait on others, and a
long chunk reports nothing until it ends. So while chunks wait and a thread is idle, the gate
looks at the process's CPU every TICK: if the interpreter is not busy (below SATURATED of one
core) it lets the oldest waiter in at once; if it is busy, a chunk that waited PATIENCE still
gets one lane beyond the limit, so a short chunk is never stuck behind long ones (issue 15: a
10 ms chunk waited 14.5 s behind two 15 s chunks with 14 threads idle), while a CPU-bound
backlog runs at most limit + 1 at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable

SATURATED = 0.85  # busy share of one core at which the GIL is the bottleneck
FLOOR = 2  # keep one chunk decoding or encoding while another computes
TICK = 0.05  # seconds between looks at the CPU while chunks wait
PATIENCE = 0.2  # seconds a chunk waits on a busy interpreter before it takes the extra lane


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

    def __init__(
        self,
        ceiling: int,
        *,
        cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.control = Limit(ceiling)
        self.active = 0
        self._waiters: collections.deque[tuple[asyncio.Future[None], float]] = collections.deque()
        self._area = 0.0
        self._since = time.perf_counter()
        self._cpu, self._clock = cpu, clock
        self._timer: asyncio.TimerHandle | None = None
        self._sample = (0.0, 0.0)  # (process CPU seconds, clock) at the last look

    def area(self) -> float:
        now = time.perf_counter()
        self._area += self.active * (now - self._since)
        self._since = now
        return self._area

    def _change(self, delta: int) -> None:
        self.area()
        self.active += delta

    @property
    def waiting(self) -> int:
        """Chunks waiting for a slot (some may have been cancelled meanwhile)."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot if one is free now and nobody waits for it."""
        if self.active < self.control.limit and not self._waiters:
            self._change(+1)
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        loop = asyncio.get_running_loop()
        entry = (loop.create_future(), self._clock())
        self._waiters.append(entry)
        if self._timer is None:
            self._sample = (self._cpu(), self._clock())
            self._timer = loop.call_later(TICK, self._look)
        try:
            await entry[0]
        except BaseException:
            if entry[0].done() and not entry[0].cancelled():
                self.release()  # we were handed a slot just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    def release(self) -> None:
        self._change(-1)
        while self._waiters and self.active < self.control.limit:
            self._admit()

    def _admit(self) -> None:
        waiter, _ = self._waiters.popleft()
        if not waiter.done():
            self._change(+1)
            waiter.set_result(None)

    def _look(self) -> None:
        """While chunks wait: let one in if a thread is idle and the CPU is free, or if it
        has waited PATIENCE and the extra lane is free."""
        self._timer = None
        cpu, now = self._cpu(), self._clock()
        used, elapsed = cpu - self._sample[0], now - self._sample[1]
        self._sample = (cpu, now)
        while self._waiters and self._waiters[0][0].done():
            self._waiters.popleft()  # cancelled meanwhile
        if not self._waiters:
            return
        if self.active < self.control.ceiling:
            free = elapsed > 0 and used / elapsed < SATURATED
            patient = now - self._waiters[0][1] >= PATIENCE and self.active <= self.control.limit
            if free or patient:
                self._admit()
        if self._waiters:
            self._timer = asyncio.get_running_loop().call_later(TICK, self._look)
