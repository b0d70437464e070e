"""The pacer that holds one call to its `rate=` (parsed in _config.py). No I/O.

One caller dispatches every chunk of a call, so a rate held here is global by construction:
whatever the number of workers, the downstream sees at most `rate` items per second from this
call. The pacer hands out items as tokens on a virtual clock (a chunk of n items takes n
tokens, and the next chunk waits until the debt is paid), and each chunk tells its worker to
start its items at most one per 1/rate seconds, so the downstream sees a smooth rate, not a
burst at each chunk's start.

When the function raises `serverless.Throttled` (the downstream said "too many"), the rate
follows TCP's congestion control: it drops to BACKOFF times itself once per episode (the
throttles of items sent before a decrease do not decrease it again), or down to what got
through over the last second if that is lower (at most halving it), and grows by GROWTH
times that figure per second while calls succeed (AIMD), never above the user's `rate`, nor
above twice what got through lately (growth follows deliveries, as TCP's window grows on
acks). An unpaced call (no `rate=`, or "auto") starts from BACKOFF times the rate it
achieved when the first throttle came, a rough figure (the call may be milliseconds old), so
it then doubles every DOUBLING seconds until the next throttle (slow start). A worker that
sees one item of a call throttled stops the call's other item-by-item chunks before their
next item (the Call's `group`), so the downstream is not hit again by requests sent at the
old rate.

A downstream that refuses everything (a spent daily quota, a revoked key) is never flooded:
an unpaced call whose first throttle comes before anything got through starts from START
(it resent 2,900 requests/s before), each further episode with nothing completed in between
also pauses the call, twice as long each time with jitter (up to REFUSED_PAUSE_CAP), and after
REFUSED_SLOW seconds of refusals the call starts at most one item per second. `stalled()`
says how long it has been refused with nothing completing: the fan-out gives up after the
call's `patience`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable

from .._config import Rate
from .._wire import LATE_START, MAX_PACE

BACKOFF = 0.8  # a throttle sets the rate to this times the rate achieved over the last second
GROWTH = 0.08  # per second without throttles, the rate grows by this share of that figure
WINDOW = 1.0  # seconds of successes the achieved rate is measured over
PART_S = 0.25  # seconds of the rate one request of a paced chunk carries at most
START = 1.0  # items per second: a throttle never sets the rate below this
HOLD = 1.0  # seconds the requests of an episode may delay the next decrease
DOUBLING = 0.1  # seconds: after the first throttle episode the rate doubles this often (its
# first figure may be far too low: the call can be milliseconds old)
REFUSED_PAUSE = 0.25  # seconds: the pause after a second episode with nothing completed...
REFUSED_PAUSE_CAP = 10.0  # ...doubling with each further one, up to this
REFUSED_SLOW = 10.0  # seconds of refusals with nothing completed: then at most START items/s
FIT = 0.5  # of LATE_START, the lag a paced request's items may build up (item times vary)


class Pacer:
    """The rate of one call, on the dispatcher's loop. `rate` is None while the call is
    unpaced (no `rate=` and no throttle yet)."""

    def __init__(
        self,
        rate: Rate | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        itemwise: bool = False,
    ) -> None:
        self._clock, self._sleep = clock, sleep
        # item by item, even unpaced: "auto", retries=0 (`itemwise`), and once throttled
        self.auto = rate == "auto" or itemwise
        self.ceiling = rate if isinstance(rate, float) else None  # the user's rate=
        self.rate: float | None = self.ceiling
        self.throttles = 0  # downstream refusals (Throttled) seen by the call
        self._tokens = 0.0  # items that may start now; negative: a debt the clock pays off
        self._stamp = clock()
        self.epoch = 0  # rate decreases so far
        self._in_flight = 0  # requests sent and not yet answered
        self._older = 0  # ...of them, sent before the last decrease
        self._decreased = -math.inf  # when
        self._started = clock()
        self._slow = False  # slow start: the rate doubles each DOUBLING seconds
        self._grow_by = 0.0  # items/s gained per second since the last decrease
        self._done: deque[tuple[float, int]] = deque()  # (when, items) succeeded recently
        self._done_items = 0
        self._lock = asyncio.Lock()  # FIFO: chunks start in the order they asked
        self.completed = 0  # items that came back without a throttle
        self.last_refusal = ""  # the last throttle's message (and Retry-After)
        self._refused_since: float | None = None  # the first throttle since an item completed
        self._refused_episodes = 0  # decreases since then
        self._paused_until = -math.inf  # no item starts before (consecutive refusals)
        self._item_s: float | None = None  # seconds one item of a paced request runs
        self._guessed = False  # the rate is START for want of a figure (nothing got through)

    @property
    def itemwise(self) -> bool:
        """Whether the worker must call the function item by item: a paced or throttled
        call, so that a throttle never costs a rerun of an item that succeeded."""
        return self.auto or self.rate is not None

    def pace(self) -> float | None:
        """Seconds between item starts within a chunk (the Call's `pace`): None for an
        unpaced call (the function gets the whole chunk), 0 for item by item, unpaced."""
        if not self.itemwise:
            return None
        if self.rate is None:
            return 0.0
        return min(1.0 / self.rate, MAX_PACE)  # below 4/s a request carries one item anyway

    def part(self, items: int) -> int:
        """How many of a chunk's `items` one request carries: all of them unpaced, else what
        the rate starts in PART_S (at least one), so no request holds a stale pace long, and
        no more than its items were seen to start in their turns (`late`)."""
        if self.rate is None:
            return items
        most = int(self.rate * PART_S)
        lag = (self._item_s or 0.0) - 1.0 / self.rate
        if lag > 0:
            # a request's items run one after the other, each starting `lag` later than its
            # turn: the worker returns those past LATE_START unstarted, so send what fits
            most = min(most, 1 + int(FIT * LATE_START / lag))
        return max(1, min(items, most))

    def ran(self, items: int, compute_s: float) -> None:
        """A paced request ran `items` in `compute_s` seconds (its waits for turns left out)."""
        if items > 0:
            each = compute_s / items
            self._item_s = each if self._item_s is None else 0.8 * self._item_s + 0.2 * each

    def _refill(self, now: float) -> None:
        if self.rate is None:
            return
        grown = now - self._stamp  # seconds of growth since the last look
        if self.epoch and grown > 0:
            if self._slow:  # the first episode's estimate is rough: double until the next
                raised = self.rate * 2.0 ** (grown / DOUBLING)
            else:
                raised = self.rate + self._grow_by * grown
            # growth follows deliveries, as TCP's window grows on acks: never above twice
            # what got through lately (a call waiting out a Retry-After delivers nothing,
            # and slow start ran to 38,000/s against a 200/s quota during one such wait)
            raised = min(raised, max(self.rate, 2.0 * self._achieved(now)))
            self.rate = min(raised, self.ceiling) if self.ceiling is not None else raised
        if self._refused_since is not None and now - self._refused_since >= REFUSED_SLOW:
            self.rate = min(self.rate, START)
        # a burst of at most one item: the downstream sees the rate, not a backlog
        self._tokens = min(1.0, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, items: int | Callable[[], int]) -> int:
        """Wait until `items` more may start, in the order the chunks asked; how many (a
        function of the rate: asked when the turn comes, as the rate and what a request
        can carry change while a request waits; a first wave of ten-item requests whose
        items take 20 ms at 200/s held the call to 60/s for 3 s)."""
        if self.rate is None:
            return items() if callable(items) else items
        async with self._lock:
            while True:
                now = self._clock()
                self._refill(now)
                if now < self._paused_until:
                    await self._sleep(self._paused_until - now)
                    continue
                if self.rate is None or self._tokens > -1e-9:  # float dust is no debt
                    break
                # the rate may change meanwhile (a throttle): look again within 0.1 s
                await self._sleep(min(0.1, -self._tokens / self.rate))
            count = items() if callable(items) else items
            self._tokens -= count
            return count

    def succeeded(self, items: int) -> None:
        """`items` came back without a throttle."""
        now = self._clock()
        self._done.append((now, items))
        self._done_items += items
        self._forget(now)
        if items:
            self.completed += items
            self._refused_since, self._refused_episodes = None, 0
            if self._guessed and self.rate is not None:  # a figure at last: start from it
                self._guessed = False
                self.rate = max(self.rate, BACKOFF * self._achieved(now))

    def stalled(self) -> float:
        """Seconds the call has been refused with no item completing since (0: it is not)."""
        since = self._refused_since
        return 0.0 if since is None else max(1e-9, self._clock() - since)

    def _forget(self, now: float) -> None:
        while self._done and self._done[0][0] < now - WINDOW:
            self._done_items -= self._done.popleft()[1]

    def _achieved(self, now: float) -> float:
        """Items per second that got through: over the last second, or since the start."""
        self._forget(now)
        return self._done_items / max(0.01, min(WINDOW, now - self._started))

    def sent(self) -> int:
        """A request goes out now: the epoch it belongs to (pass it to `answered`)."""
        self._in_flight += 1
        return self.epoch

    def answered(self, epoch: int) -> None:
        self._in_flight -= 1
        if epoch < self.epoch:
            self._older -= 1

    def throttled(self, epoch: int, retry_after: float | None = None, message: str = "") -> None:
        """The downstream refused an item sent in `epoch`: back off, once per episode. The
        requests sent before the last decrease were sent too fast for it: their throttles
        belong to the episode it answered (TCP's one decrease per window), and so do those
        of later requests while older ones still run (a long chunk sent before the decrease
        keeps spending the quota after it), for up to HOLD seconds. `retry_after` and
        `message`: what the function's Throttled said."""
        self.throttles += 1
        now = self._clock()
        waited = f" (Retry-After: {retry_after:g}s)" if retry_after is not None else ""
        self.last_refusal = f"{message}{waited}"
        if self._refused_since is None:
            self._refused_since = now
        if epoch < self.epoch or (self._older > 0 and now - self._decreased < HOLD):
            return
        self._refill(now)
        achieved = self._achieved(now)
        self.auto = True  # item by item from now on: a throttle then costs no rerun
        if self.rate is None:
            # unpaced so far: start from what got through, or from START if nothing did (a
            # call that waited for a figure resent 2,900 requests/s to a refusing downstream)
            self.rate, self._slow = max(START, BACKOFF * achieved), True
            self._guessed = not achieved  # the first figure that comes replaces it
        else:
            lowered = BACKOFF * self.rate
            if achieved and now - self._started >= WINDOW:
                # far above what gets through (a slow start that overshot a bucket's burst):
                # towards that faster than by 0.8 an episode (616/s to 200/s took nine), but
                # at most halved: what came back lags what got through (long chunks, and
                # chunks waiting out a Retry-After), and once took 656/s to 28/s
                lowered = max(min(lowered, achieved), 0.5 * self.rate)
            # a call younger than WINDOW has no figure worth keeping yet: still slow start
            # (an episode 2 ms after the first, from 100/s, left a 300/s quota at 74/s)
            young = self._slow and now - self._started < WINDOW
            self.rate, self._slow = max(START, lowered), young
        if self.ceiling is not None:
            self.rate = min(self.rate, self.ceiling)
        self.epoch += 1
        self._older, self._decreased = self._in_flight, now
        self._grow_by = GROWTH * self.rate / BACKOFF
        self._tokens = min(self._tokens, 0.0)
        self._stamp = now
        self._refused_episodes += 1
        if self._refused_episodes > 1 and retry_after is None:
            # refused again with nothing completed since: pause the whole call, twice as long
            # each time, jittered so that callers sharing a downstream do not come back in step
            pause = REFUSED_PAUSE * 2.0 ** (self._refused_episodes - 2)
            pause = min(REFUSED_PAUSE_CAP, pause) * random.uniform(0.5, 1.0)
            self._paused_until = max(self._paused_until, now + pause)
