"""Flow control: how many chunks the caller keeps in flight to each worker URL. Pure, no I/O.

A `Window` per URL follows the answers (AIMD, as TCP does): 429s and 503s shrink it in
proportion to the share of a round they are (a round wholly refused halves it, as DCTCP does)
and hold the URL for their Retry-After; each success grows it additively; it never exceeds
the call's `workers`, nor what the URL's workers said they can run at once. `Capacities`
keeps that last figure for the process: each signed reply may carry its worker process's
capacity (`Reply.capacity`), and behind a balancer the replies come from several processes,
so a URL's capacity is the sum over the worker ids heard from recently. Sending more than
that only queues chunks inside busy workers (and, for a list cut into `workers` even chunks,
leaves a second round of a few chunks: docs/deploy.md's 96 slots with `workers=100` ran at
half speed).
"""

from __future__ import annotations

import time
from collections.abc import Callable

# slots each 429/503 takes off: a window's worth of them halves it. Halving at the first one
# of a round instead collapsed a window to ~2 under 20% stray 503s (the 10,000-chunk load
# test through HAProxy went from 23 s to over 120 s); this settles near 2(1-p)/p instead.
SHRINK = 0.5
FORGET_AFTER = 300.0  # seconds: a worker id not heard from since no longer counts


class Window:
    """The in-flight limit for one URL during one call."""

    __slots__ = ("ceiling", "limit", "paused_until", "sent")

    def __init__(self, ceiling: int) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = float(self.ceiling)
        self.paused_until = 0.0  # no request goes there before this time (Retry-After)
        self.sent = 0  # requests sent so far

    def size(self) -> int:
        return max(1, min(self.ceiling, int(self.limit)))

    def cap(self, ceiling: int) -> None:
        """A new ceiling (a capacity learned or grown): the limit follows it down, and up
        where it was at the old ceiling, since nothing said the URL was overloaded."""
        ceiling = max(1, ceiling)
        if self.limit >= self.ceiling or self.limit > ceiling:
            self.limit = float(ceiling)
        self.ceiling = ceiling

    def send(self) -> int:
        """Number one request to this URL."""
        self.sent += 1
        return self.sent

    def succeeded(self) -> None:
        """About one more request in flight per round of successful ones."""
        if self.limit < self.ceiling:
            self.limit = min(float(self.ceiling), self.limit + 1.0 / self.limit)

    def overloaded(self, number: int, now: float, retry_after: float | None) -> None:
        """The URL answered request `number` with 429/503: shrink by half a slot, and hold
        the URL for its Retry-After."""
        if retry_after is not None:
            self.paused_until = max(self.paused_until, now + retry_after)
        self.limit = max(1.0, self.limit - SHRINK)


class Capacities:
    """What the workers behind each URL said they can run at once; one per process.

    Written on the dispatcher's loop thread, read by callers' threads as they cut a list into
    chunks: a reader only does one dict lookup, which the GIL makes atomic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heard: dict[str, dict[str, tuple[int, float]]] = {}  # url: worker: (cap, when)
        self._totals: dict[str, int] = {}
        self._swept = clock()

    def observe(self, url: str, worker: str, capacity: int | None) -> None:
        """A signed reply from `worker` at `url` said it runs `capacity` chunks at once."""
        if capacity is None or capacity < 1:
            return
        now = self._clock()
        heard = self._heard.setdefault(url, {})
        known = heard.get(worker)
        heard[worker] = (capacity, now)
        if known is None or known[0] != capacity:
            self._totals[url] = sum(c for c, _ in heard.values())
        if now - self._swept > FORGET_AFTER / 4:  # amortised: rarely, whatever the rate
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._swept = now
        for url, heard in self._heard.items():
            gone = [w for w, (_, when) in heard.items() if now - when > FORGET_AFTER]
            for worker in gone:
                del heard[worker]
            if gone:
                self._totals[url] = sum(c for c, _ in heard.values())

    def of(self, url: str) -> int | None:
        """The chunks `url` can run at once, as far as its workers said; None if unknown."""
        return self._totals.get(url) or None

    def total(self, urls: tuple[str, ...]) -> int | None:
        """The chunks all of `urls` can run at once; None unless every one of them said."""
        figures = [self.of(url) for url in urls]
        if not figures or any(f is None for f in figures):
            return None
        return sum(f for f in figures if f is not None)
