"""One call's fan-out, on the dispatcher's loop: slots, order, retries, hedges, deadline.

Chunks are read from the input as slots free (a generator is never materialised), at most
`workers` run at once (fewer where a URL's window says so: _flow.py), and results come out in
input order through a reorder buffer, bounded for a generator, so a stream of any length
runs in bounded memory. A chunk is retried on transient failures, and hedged when it runs far
past its peers. Whatever ends the call (an error, the deadline, the consumer closing the
stream), every request still in flight is cancelled before the call returns.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import heapq
import itertools
import logging
import random
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .._config import Rate
from .._exceptions import DeadlineExceeded, WorkerError, WorkerUnavailable
from .._stats import ChunkStats
from .chunking import Chunk
from .flow import Capacities, Window
from .rate import Pacer

logger = logging.getLogger("serverless.dispatch")

BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
HEDGE_PEERS = 3  # hedge once this many chunks are done (or half of them, if fewer)...
HEDGE_FACTOR = 2.0  # ...a chunk running this many times their median time...
HEDGE_FLOOR = 0.1  # ...and at least this many seconds more than the median
PUSHBACKS = 8  # 429/503 answers a chunk may get before they count as retries
SLOT_POLL = 0.5  # seconds: the longest a task waits for room before it looks again
MAX_KEPT_STATS = 10_000  # per-chunk statistics kept for one call (counters are exact)


@dataclass(frozen=True)
class Policy:
    workers: int
    retries: int
    deadline: float | None = None
    hedge: bool = False
    rate: Rate | None = None


@dataclass
class Tally:
    """What the call measured: exact counters, and per-chunk statistics up to a bound."""

    chunks: list[ChunkStats] = field(default_factory=list)
    count: int = 0
    compute_s: float = 0.0
    retries: int = 0
    hedges: int = 0
    throttles: int = 0  # items the downstream refused (the function raised Throttled)
    rate: float | None = None  # items/s the call was paced at when it ended (None: unpaced)
    window: int = 0  # chunks it could keep in flight when it ended
    sent: int = 0  # requests sent, retries, hedges and resends after throttles included
    done: int = 0  # chunks answered
    stage_counts: list[int] = field(default_factory=list)  # a fused call's, per stage: items out
    stage_compute_s: list[float] = field(default_factory=list)

    def add(self, stats: ChunkStats) -> None:
        self.done += 1
        self.count += stats.size
        self.compute_s += stats.compute_s
        self.retries += stats.attempts - 1
        for stage, figures in enumerate(stats.stages):
            if stage == len(self.stage_counts):
                self.stage_counts.append(0)
                self.stage_compute_s.append(0.0)
            self.stage_counts[stage] += figures.count
            self.stage_compute_s[stage] += figures.compute_s
        if len(self.chunks) < MAX_KEPT_STATS:
            self.chunks.append(stats)

    def in_order(self) -> list[ChunkStats]:
        """The kept per-chunk statistics, in chunk order (they are added as answers come)."""
        return sorted(self.chunks, key=lambda c: c.index)


# One attempt of one chunk on one URL, with its pace (a Call's): (results, the attempt's
# ChunkStats), or an exception (Throttle: the function said the downstream refused an item).
Attempt = Callable[
    [str, Chunk, int, float, "float | None"], Awaitable[tuple[list[Any], ChunkStats]]
]


class Throttle(Exception):
    """An attempt stopped by the function's Throttled: the results of its first `at` items,
    the attempt's statistics, and the seconds the downstream asked to wait."""

    def __init__(
        self,
        results: list[Any],
        stats: ChunkStats,
        at: int,
        retry_after: float | None,
        ran: int,
        stopped: bool = False,
    ) -> None:
        super().__init__(f"throttled at item {at} of chunk {stats.index}")
        self.results, self.stats, self.at, self.retry_after = results, stats, at, retry_after
        self.ran = ran  # items the downstream served before it
        self.stopped = stopped  # nothing refused: the worker saw another chunk throttled


class _Chunk:
    """A chunk and the tasks working on it (its first run, and a hedge)."""

    __slots__ = ("chunk", "counted_by", "settled", "started", "tasks", "urls")

    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk
        self.tasks: list[asyncio.Task[list[Any]]] = []
        self.urls: list[str] = []  # where its tasks are sending now
        self.counted_by: int | None = None  # the task (lane) whose statistics count
        self.started = _now()
        self.settled = False  # its results are in (or the call is over)

    @property
    def index(self) -> int:
        return self.chunk.index

    def describe(self) -> str:
        index, offset, items = self.chunk
        where = ", ".join(sorted(set(self.urls))) or "not sent yet"
        return f"chunk {index} (items {offset}-{offset + len(items) - 1}) on {where}"


class _Durations:
    """The median of the most recent chunk durations, O(RECENT) per new one: the peers a
    straggler is compared with, however long the call (and following drifts in speed)."""

    RECENT = 63

    def __init__(self) -> None:
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def add(self, seconds: float) -> None:
        self._order.append(seconds)
        bisect.insort(self._sorted, seconds)
        if len(self._order) > self.RECENT:
            del self._sorted[bisect.bisect_left(self._sorted, self._order.popleft())]

    def median(self) -> float:
        return self._sorted[len(self._sorted) // 2]


class Fanout:
    """The engine. Its cost per completed chunk does not grow with the number in flight
    (issue 16): each task's completion is queued by a callback that knows its chunk, the
    straggler check looks only at the oldest running chunk (a heap by start time), the
    reorder buffer is a dict by chunk index, and the windows are per URL."""

    def __init__(
        self,
        function: str,
        urls: tuple[str, ...],
        chunks: Iterator[Chunk],
        attempt: Attempt,
        policy: Policy,
        tally: Tally,
        *,
        lazy_input: bool,
        timeout: float,
        capacities: Capacities | None = None,
    ) -> None:
        self.function = function
        self.chunks = chunks
        self.attempt = attempt
        self.policy = policy
        self.tally = tally
        self.lazy_input = lazy_input
        self.timeout = timeout
        self.capacities = capacities
        self.load = dict.fromkeys(urls, 0)
        self.windows = {url: Window(self._ceiling(url)) for url in urls}
        self.down: set[str] = set()  # URLs that lost a connection during this call
        self.slow: set[str] = set()  # URLs holding a hedged straggler, until they answer
        self.started = _now()
        self.deadline_at = None if policy.deadline is None else self.started + policy.deadline
        self.running: dict[int, _Chunk] = {}
        self.ready: dict[int, list[Any]] = {}
        self.durations = _Durations()
        self.submitted = 0
        self.exhausted = False
        self.busy = 0  # tasks alive: first runs, hedges, and retries waiting for a slot
        self._finished: deque[tuple[_Chunk, asyncio.Task[list[Any]]]] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._by_start: list[tuple[float, int, _Chunk]] = []  # hedging candidates, a heap
        self.pacer = Pacer(policy.rate)  # rate= and throttles: _rate.py

    # -- the driver ----------------------------------------------------------------------

    async def results(self) -> AsyncGenerator[list[Any], None]:
        """Yield the results in input order, a batch of whole chunks at a time."""
        next_out = 0
        # A generator's chunks launched but not yet yielded, at most: the ones in flight plus
        # some slack for answers that arrive out of order. This bounds the call's memory,
        # whatever its input. A list is in memory already, and so will its results be: no
        # bound, so one slow chunk never holds up the rest of the call.
        ahead = self.policy.workers + max(8, self.policy.workers // 4)
        if not self.lazy_input:
            ahead = sys.maxsize
        try:
            while True:
                while (
                    not self.exhausted
                    and self.busy < self._room()
                    and self.submitted - next_out < ahead
                ):
                    chunk = await self._read()
                    if chunk is None:
                        self.exhausted = True
                    else:
                        self._launch(_Chunk(chunk))
                batch: list[Any] = []
                while next_out in self.ready:
                    batch += self.ready.pop(next_out)
                    next_out += 1
                if batch:
                    yield batch
                    continue
                if self.exhausted and not self.running:
                    return
                await self._wait()
        finally:
            self.tally.rate, self.tally.window = self.pacer.rate, self._room()
            self.tally.throttles = self.pacer.throttles
            await self._cancel_all()

    def _room(self) -> int:
        """Tasks the call may have alive now: `workers`, or less where the URLs' windows
        are smaller (what their workers said they can take, or shrunk by 429/503)."""
        room = sum(window.size() for window in self.windows.values())
        return min(self.policy.workers, room)

    def _ceiling(self, url: str) -> int:
        known = self.capacities.of(url) if self.capacities is not None else None
        return min(self.policy.workers, known or self.policy.workers)

    async def _read(self) -> Chunk | None:
        """The next chunk; a generator runs in a thread so a slow one never blocks the loop."""
        if not self.lazy_input:
            return next(self.chunks, None)
        read = asyncio.get_running_loop().run_in_executor(None, next, self.chunks, None)
        chunk: Chunk | None = await self._within_deadline(read, "reading the input")
        return chunk

    async def _within_deadline(self, awaitable: Awaitable[Any], doing: str) -> Any:
        if self.deadline_at is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, max(0.0, self.deadline_at - _now()))
        except asyncio.TimeoutError:
            raise self._deadline_error(doing) from None

    def _deadline_error(self, doing: str) -> DeadlineExceeded:
        pending = sorted(self.running.values(), key=lambda c: c.index)  # once, at the end
        listed = "; ".join(c.describe() for c in pending[:5])
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        what = f"still running: {listed}{more}" if pending else doing
        return DeadlineExceeded(
            f"{self.function} missed its deadline of {self.policy.deadline}s ({what})"
        )

    async def _wait(self) -> None:
        """Until a task finishes, a straggler is due for a hedge, or the deadline."""
        if not self._finished:
            tick = self._hedge_due()
            if self.deadline_at is not None:
                left = self.deadline_at - _now()
                if left <= 0:
                    raise self._deadline_error("")
                tick = left if tick is None else min(tick, left)
            loop = asyncio.get_running_loop()
            self._wake = wake = loop.create_future()
            timer = None if tick is None else loop.call_later(tick, _resolve, wake)
            try:
                await wake
            finally:
                self._wake = None
                if timer is not None:
                    timer.cancel()
        while self._finished:
            self._settle(*self._finished.popleft())
        self._maybe_hedge()

    def _finish(self, owner: _Chunk, task: asyncio.Task[list[Any]]) -> None:
        """A task's done callback: queue it for the driver, which knows it by its chunk."""
        self.busy -= 1
        self._finished.append((owner, task))
        if self._wake is not None:
            _resolve(self._wake)

    def _settle(self, owner: _Chunk, task: asyncio.Task[list[Any]]) -> None:
        if task.cancelled():
            return  # a lost hedge, or the end of the call: both cancelled here
        exc = task.exception()  # retrieved even when unused: asyncio would log it
        if owner.settled:
            return  # its chunk was already settled by a sibling
        if exc is None:
            owner.settled = True
            self.ready[owner.index] = task.result()
            self.durations.add(_now() - owner.started)
            del self.running[owner.index]
            for other in owner.tasks:
                if other is not task:
                    other.cancel()  # the hedge lost: its answer will be ignored
            return
        owner.tasks.remove(task)
        if owner.tasks and isinstance(exc, WorkerError):
            return  # its sibling may still succeed
        raise exc

    def _launch(self, chunk: _Chunk, hedge: bool = False) -> None:
        if not hedge:
            self.running[chunk.index] = chunk
            self.submitted += 1
            if self.policy.hedge:
                heapq.heappush(self._by_start, (chunk.started, chunk.index, chunk))
        avoid = set(chunk.urls) if hedge else set()
        task = asyncio.create_task(self._attempts(chunk, chunk.chunk, avoid, len(chunk.tasks)))
        task.add_done_callback(functools.partial(self._finish, chunk))
        chunk.tasks.append(task)
        self.busy += 1

    # -- slots: which URL, and whether it has room ----------------------------------------

    def _pick(self, failed: set[str]) -> str | None:
        """The URL with room that is least loaded for its window, preferring those that
        neither failed this chunk, lost a connection, nor hold a straggler; O(URLs)."""
        now = _now()
        best, best_key = None, None
        for url, window in self.windows.items():
            load = self.load[url]
            size = window.size()
            if load >= size or window.paused_until > now:
                continue
            key = (url in failed, url in self.down, url in self.slow, load / size)
            if best_key is None or key < best_key:
                best, best_key = url, key
        return best

    async def _slot(self, failed: set[str]) -> str:
        """A URL to send to, waiting for room (or for a Retry-After to pass) if none has it."""
        loop = asyncio.get_running_loop()
        while True:
            url = self._pick(failed)
            if url is not None:
                return url
            waiter = loop.create_future()
            self._slot_waiters.append(waiter)
            now = _now()
            pauses = [w.paused_until - now for w in self.windows.values() if w.paused_until > now]
            # woken by an attempt that ends; the bound also covers a wake-up lost to a
            # cancelled waiter and the end of a pause
            await asyncio.wait([waiter], timeout=min([SLOT_POLL, *pauses]))
            waiter.cancel()

    def _release(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- one chunk: retries ----------------------------------------------------------------
    # errors="return" needs nothing here: the worker runs such a chunk item by item and its
    # reply carries each failed item's RemoteError in place (_protocol.read_reply), so no item
    # that succeeded is ever sent again.

    async def _attempts(self, owner: _Chunk, chunk: Chunk, avoid: set[str], lane: int) -> list[Any]:
        failed = set(avoid)
        retried = pushed_back = throttled = throttles = parts = 0
        # a paced chunk goes in parts of what the rate allows in a short while (a part that
        # lasts long would hold a stale pace); a throttled one from its first refused item
        size, before = len(chunk.items), []  # before: results of the parts done, in order
        compute_s = 0.0  # worker time spent on it in those parts
        whole, began = chunk, _now()
        for attempt in itertools.count(1):
            part = self.pacer.part(len(whole.items))
            chunk = whole if part == len(whole.items) else whole.head(part)
            if self.pacer.rate is not None:  # unpaced: no await, no lock (the common case)
                await self.pacer.take(len(chunk.items))
            url = await self._slot(failed)
            window = self.windows[url]
            number = window.send()
            self.load[url] += 1
            owner.urls.append(url)
            timeout = self.timeout
            if self.deadline_at is not None:
                timeout = min(timeout, max(0.001, self.deadline_at - _now()))
            epoch = self.pacer.sent()
            try:
                self.tally.sent += 1
                tries = attempt - throttles - parts  # neither a part nor a resend is a retry
                results, stats = await self.attempt(url, chunk, tries, timeout, self.pacer.pace())
            except Throttle as exc:
                # the items before it ran: keep their results, send the rest once the
                # downstream's wait is over, at a lower rate (it never counts as a retry)
                throttles += 1
                throttled += 0 if exc.stopped else 1
                before += exc.results
                compute_s += exc.stats.compute_s
                self.pacer.succeeded(exc.ran)
                if not exc.stopped:  # a stop is no news of the downstream: no decrease
                    self.pacer.throttled(epoch)
                whole = whole.tail(exc.at)
                logger.info("%s of %s throttled: %s", owner.describe(), self.function, exc)
                if exc.retry_after:
                    await asyncio.sleep(exc.retry_after)
                continue
            except WorkerError as exc:
                overloaded = isinstance(exc, WorkerUnavailable) and exc.status in (429, 503)
                if overloaded:
                    assert isinstance(exc, WorkerUnavailable)
                    if exc.capacity and self.capacities is not None:
                        # a signed "busy" says what the worker can take: the window is capped
                        # to that, not shrunk below it (68 such refusals on a first call took
                        # a 16-slot window to 1, and the call from 2.5 s to 6 s)
                        self.capacities.observe(url, exc.worker, exc.capacity)
                        window.cap(self._ceiling(url))
                    else:
                        window.overloaded(number, _now(), exc.retry_after)
                if not exc.retryable or self.policy.retries == 0:
                    raise
                # "not now" from an overloaded target is flow control, not a failure: the
                # window has shrunk; it costs a retry only once the pushbacks run out
                if overloaded and pushed_back < PUSHBACKS:
                    pushed_back += 1
                elif retried < self.policy.retries:
                    retried += 1
                else:
                    raise
                logger.info("retrying chunk %d of %s: %s", chunk.index, self.function, exc)
                failed.add(url)
                if exc.status is None:  # no HTTP answer at all: send elsewhere from now on
                    self.down.add(url)
                if overloaded and isinstance(exc, WorkerUnavailable) and exc.capacity:
                    continue  # a signed "busy" capped the window: waiting for a slot is enough
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: no herd
                continue
            finally:
                self.load[url] -= 1
                owner.urls.remove(url)
                self.pacer.answered(epoch)
                self._release()
            window.succeeded()
            self.pacer.succeeded(len(chunk.items))
            self.slow.discard(url)
            if chunk is not whole:  # a part: the rest goes next
                parts += 1
                before += results
                compute_s += stats.compute_s
                whole = whole.tail(len(chunk.items))
                continue
            if self.capacities is not None:
                ceiling = self._ceiling(url)
                if ceiling != window.ceiling:
                    window.cap(ceiling)
            if parts or throttles:  # its timings span every request it took, waits included
                stats.start = began
            stats.start -= self.started  # seconds since the call started
            stats.end -= self.started
            stats.size, stats.compute_s = size, stats.compute_s + compute_s
            stats.throttles = throttled
            results = before + results if before else results
            if owner.counted_by in (None, lane):  # a hedge that also finished is not counted
                owner.counted_by = lane
                self.tally.add(stats)
            return results
        raise AssertionError("unreachable")  # pragma: no cover

    # -- hedging ------------------------------------------------------------------------

    def _hedge_limit(self) -> float | None:
        """How long a chunk may run before it is hedged: far past its peers' median."""
        if not self.policy.hedge:
            return None
        if len(self.durations) < max(1, min(HEDGE_PEERS, self.submitted // 2)):
            return None
        median = self.durations.median()
        return max(HEDGE_FACTOR * median, median + HEDGE_FLOOR)

    def _oldest(self) -> _Chunk | None:
        """The running chunk that started first and has no hedge yet (the heap's top)."""
        heap = self._by_start
        while heap:
            chunk = heap[0][2]
            if not chunk.settled and len(chunk.tasks) == 1:
                return chunk
            heapq.heappop(heap)  # settled, or hedged already: never a candidate again
        return None

    def _hedge_due(self) -> float | None:
        """Seconds until the oldest running chunk is due for a hedge, if one may be sent."""
        limit = self._hedge_limit()
        oldest = self._oldest() if limit is not None else None
        if limit is None or oldest is None or self.busy >= self._room():
            return None  # a task's end wakes the driver: it may free room for a hedge
        return max(0.001, oldest.started + limit - _now())

    def _maybe_hedge(self) -> None:
        """Duplicate the stragglers, oldest first: the first answer wins, the other is
        cancelled. A hedge takes the room of the next new chunk, so it goes first."""
        limit = self._hedge_limit()
        if limit is None:
            return
        now = _now()
        while self.busy < self._room():
            chunk = self._oldest()
            if chunk is None or now - chunk.started <= limit:
                return
            heapq.heappop(self._by_start)
            logger.info("hedging %s of %s", chunk.describe(), self.function)
            self.slow.update(chunk.urls)
            self.tally.hedges += 1
            self._launch(chunk, hedge=True)

    async def _cancel_all(self) -> None:
        tasks = [t for c in self.running.values() for t in c.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for chunk in self.running.values():
            chunk.settled = True
        self.running.clear()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _now() -> float:
    return time.perf_counter()


async def next_batch(batches: AsyncIterator[list[Any]]) -> list[Any] | None:
    """The next batch of results, or None at the end (for a caller on another thread)."""
    try:
        return await batches.__anext__()
    except StopAsyncIteration:
        return None


async def close_batches(batches: AsyncIterator[list[Any]]) -> None:
    """Close the results early: every chunk in flight is cancelled before this returns."""
    aclose = getattr(batches, "aclose", None)
    for _ in range(1000):
        try:
            if aclose is not None:
                await aclose()
            return
        except RuntimeError:  # still unwinding a cancelled step: let it finish
            await asyncio.sleep(0.005)
