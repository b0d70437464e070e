"""When each item of a paced chunk may start on this worker (docs/protocol.md §6.3).

The caller's pacer grants a paced chunk's items turns on its token clock: item i's turn is
at the Call's `slot` (the caller's time.time()) plus i * `pace`. A chunk that reaches the
worker late (slow in transit, queued, a stopped worker) or an item that comes late (the one
before took long: a latency spike) must not start its items back to back: their starts would
add to those of the turns granted since to other chunks (rate=200 saw 381 starts in one
second after a 1 s spike). So an item starts in its turn, or at most LATE after it; a later
one takes the chunk's next turn still ahead, and when the chunk has none left, the rest goes
back to the caller unstarted (a Throttle with `stopped`), which grants it new turns.

The caller's clock is not this one, so how late a chunk arrived is measured against the
earliest any chunk of the same call arrived here (its transit plus the clocks' offset),
which rises by DRIFT per second so that a lasting change of the path's delay is taken in.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from .._wire import LATE_START

LATE = LATE_START  # seconds an item may start after its turn: 4% of a second's starts
DRIFT = 0.01  # seconds per second the earliest arrival of a call is let rise
MAX_CALLS = 1024  # calls whose arrivals a worker remembers (the newest)


class Arrivals:
    """How late the chunks of each paced call reach this worker."""

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._calls: dict[str, tuple[float, float]] = {}  # group: (earliest offset, when)

    def lateness(self, group: str, slot: float) -> float:
        """Seconds after its turn that a chunk of call `group` granted at `slot` arrives,
        compared with the earliest of the call's chunks (0 for its first here)."""
        now, offset = self._clock(), self._wall() - slot
        with self._lock:
            known = self._calls.pop(group, None)
            earliest = offset
            if known is not None:
                earliest = min(offset, known[0] + DRIFT * (now - known[1]))
            self._calls[group] = (earliest, now)
            if len(self._calls) > MAX_CALLS:  # the oldest call goes
                del self._calls[next(iter(self._calls))]
        return max(0.0, offset - earliest)


class Turns:
    """One paced chunk's turns, on this worker's clock: `origin` is item 0's."""

    __slots__ = ("count", "next", "origin", "pace")

    def __init__(self, origin: float, pace: float, count: int) -> None:
        self.origin, self.pace, self.count = origin, pace, count
        self.next = 0  # the next turn to give

    def wait(self, now: float) -> float | None:
        """Seconds until the next item may start (0: now); None: no turn is left."""
        due = self.origin + self.next * self.pace
        if now > due + LATE:  # its turn is past: the first one ahead
            self.next = max(self.next, math.ceil((now - self.origin) / self.pace))
            due = self.origin + self.next * self.pace
        if self.next >= self.count:
            return None
        self.next += 1
        return max(0.0, due - now)
