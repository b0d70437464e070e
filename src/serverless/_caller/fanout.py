"""One call's fan-out, on the dispatcher's loop: slots, order, retries, hedges, deadline.

Chunks are read from the input as slots free (a generator is never materialised), at most
`workers` run at once (fewer where a URL's window says so: flow.py), and results come out in
input order through a reorder buffer, bounded for a generator, so a stream of any length
runs in bounded memory; a stream's buffer is bounded in bytes too (`hold`): once the results
waiting behind a slower chunk, with those expected from the chunks in flight, reach it, no
chunk is sent until the consumer takes some. A chunk is retried on transient failures, and
hedged when it runs far past its peers. Whatever ends the call (an error, the deadline, the
consumer closing the stream), every request still in flight is cancelled before the call
returns.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import heapq
import logging
import random
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import (
    DeadlineExceeded,
    RemoteError,
    SerializationError,
    StillThrottled,
    TooManyFailures,
    WorkerError,
    WorkerUnavailable,
)
from .._stats import ChunkStats, Outcome, Try
from .._wire import StageFigures, Throttle
from .cache import CallCache, Piece
from .chunking import AdaptiveChunks, Chunk, ChunkBytes
from .flow import Capacities, Window
from .plan import CallPlan
from .store import redact
from .watch import Watch

logger = logging.getLogger("serverless.dispatch")

BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
HEDGE_PEERS = 3  # hedge once this many chunks are done (or half of them, if fewer)...
HEDGE_FACTOR = 2.0  # ...a chunk running this many times their median time...
HEDGE_FLOOR = 0.1  # ...and at least this many seconds more than the median
PUSHBACKS = 8  # unsigned 429/503 answers a chunk may get before they count as retries
BUSY_BASE = 0.05  # seconds: a chunk refused busy again waits this, doubling, with jitter...
BUSY_CAP = 1.0  # ...up to the worker's Retry-After
SLOT_POLL = 0.5  # seconds: the longest a task waits for room before it looks again
MAX_KEPT_STATS = 10_000  # per-chunk statistics kept for one call (counters are exact)


@dataclass
class Tally:
    """What the call measured: exact counters, and per-chunk statistics up to a bound."""

    chunks: list[ChunkStats] = field(default_factory=list)
    count: int = 0
    compute_s: float = 0.0
    retries: int = 0  # requests sent again after a failure
    busy: int = 0  # signed "busy" refusals waited out (not retries)
    hedges: int = 0
    throttles: int = 0  # items the downstream refused (the function raised Throttled)
    rate: float | None = None  # items/s the call was paced at when it ended (None: unpaced)
    window: int = 0  # chunks it could keep in flight when it ended
    sent: int = 0  # requests sent, retries, hedges and resends after throttles included
    done: int = 0  # chunks answered
    stage_counts: list[int] = field(default_factory=list)  # a fused call's, per stage: items out
    stage_compute_s: list[float] = field(default_factory=list)
    buffered: int = 0  # the most bytes of results held at once, waiting for an earlier chunk
    failed: list[int] = field(default_factory=list)  # errors="return": failed items' indices

    def add(self, stats: ChunkStats) -> None:
        self.done += 1
        self.count += stats.size
        self.compute_s += stats.compute_s
        self.retries += stats.attempts - 1
        self.busy += stats.busy
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


@dataclass(frozen=True, slots=True)
class Answer:
    """What one request of a chunk brought back: its results (those before the throttle, if
    the function said the downstream refused an item) and the worker's figures."""

    results: list[Any]
    worker: str = ""
    queue_s: float = 0.0
    compute_s: float = 0.0
    stages: list[StageFigures] = field(default_factory=list)  # a fused call's, per stage
    throttle: Throttle | None = None
    size: int = 0  # bytes of the reply that carried them


# One request of one chunk: (URL, the chunk or the part of it sent, timeout, the Call's pace
# and slot, its W3C traceparent or "") -> its Answer, or an exception (a WorkerError: no
# usable answer).
Attempt = Callable[[str, Chunk, float, "float | None", "float | None", str], Awaitable[Answer]]


class _Record:
    """One chunk's statistics, written in one place (Fanout._attempts) as the requests of one
    of its lanes are answered; its ChunkStats derive from it when the chunk is done."""

    __slots__ = (
        "attempts", "began", "busy", "compute_s", "end", "index", "nbytes", "queue_s", "size",
        "spans", "stages", "start", "throttles", "url", "worker",
    )  # fmt: skip

    def __init__(self, chunk: Chunk, began: float) -> None:
        self.index, self.size = chunk.index, len(chunk.items)
        self.began = self.start = self.end = began  # its first request; the last one's
        self.url = self.worker = ""
        self.queue_s = self.compute_s = 0.0  # compute: every request's, added up
        self.attempts = 1  # 1 + retries (a busy refusal, a part or a throttle is none)
        self.busy = 0  # signed "busy" refusals waited out
        self.throttles = 0  # requests the function stopped with Throttled
        self.spans = False  # sent in parts or again after throttles: timed from `began`
        self.stages: list[StageFigures] = []  # per stage, added up over its parts
        self.nbytes = 0  # bytes of the replies that carried its results

    def answered(self, url: str, answer: Answer, start: float, end: float) -> None:
        self.url, self.worker, self.queue_s = url, answer.worker, answer.queue_s
        self.nbytes += answer.size
        self.start, self.end = start, end
        self.compute_s += answer.compute_s
        for stage, figures in enumerate(answer.stages):
            if stage == len(self.stages):
                self.stages.append(StageFigures(0, 0.0))
            self.stages[stage].count += figures.count
            self.stages[stage].compute_s += figures.compute_s

    def stats(self, origin: float, tries: list[Try]) -> ChunkStats:
        """As ChunkStats, its times in seconds since `origin` (the call's start); `tries`:
        the chunk's requests, kept where there was more than one."""
        start = self.began if self.spans else self.start
        return ChunkStats(
            index=self.index,
            size=self.size,
            worker=self.worker,
            url=self.url,
            start=start - origin,
            end=self.end - origin,
            queue_s=self.queue_s,
            compute_s=self.compute_s,
            attempts=self.attempts,
            stages=self.stages,
            throttles=self.throttles,
            busy=self.busy,
            tries=tries,
        )


class _Chunk:
    """A chunk and the tasks working on it (its first run, and a hedge)."""

    __slots__ = (
        "answered", "chunk", "counted_by", "expected", "settled", "started", "tasks", "tries",
        "urls",
    )  # fmt: skip

    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk
        self.expected = self.answered = 0  # bytes of its results: before, and as answered
        self.tasks: list[asyncio.Task[list[Any]]] = []
        self.urls: list[str] = []  # where its tasks are sending now
        self.counted_by: int | None = None  # the task (lane) whose statistics count
        self.started = _now()
        self.settled = False  # its results are in (or the call is over)
        self.tries: list[Try] = []  # its requests, every lane's, as they end

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
        plan: CallPlan,
        urls: tuple[str, ...],
        chunks: Iterator[Chunk],
        attempt: Attempt,
        tally: Tally,
        *,
        lazy_input: bool,
        capacities: Capacities | None = None,
        sizer: AdaptiveChunks | None = None,  # fed each answer's size and compute time
        weights: ChunkBytes | None = None,  # fed each answer's bytes
        hold: int | None = None,  # bytes of results the call may hold (None: no bound)
        cache: CallCache | None = None,  # the call's result store: chunks carry only misses
        count: int | None = None,  # items in the input (None: a stream)
        watch: Watch | None = None,  # the call's observers (None: nobody watches)
    ) -> None:
        self.plan = plan
        self.function = plan.function
        self.chunks = chunks
        self.attempt = attempt
        self.tally = tally
        self.lazy_input = lazy_input
        self.capacities = capacities
        self.sizer = sizer
        self.weights = weights
        self.hold = hold
        self.cache = cache
        self.count = count
        self.watch = watch
        # errors="return": every failed item so far, kept only for a max_failures= report
        # (a stream that yielded them must not hold them all), and their places in the input
        self.failures: list[RemoteError] = []
        self.failed_at: list[int] = []
        self.succeeded = 0  # items with a result so far (errors="return")
        self.held = 0  # bytes of results: waiting in `ready`, and expected from those running
        self.waiting = 0  # bytes of results in `ready`
        self.load = dict.fromkeys(urls, 0)
        self.windows = {url: Window(self._ceiling(url)) for url in urls}
        self.down: set[str] = set()  # URLs that lost a connection during this call
        self.slow: set[str] = set()  # URLs holding a hedged straggler, until they answer
        self.started = _now()
        self.deadline_at = None if plan.deadline is None else self.started + plan.deadline
        self.running: dict[int, _Chunk] = {}
        self.ready: dict[int, tuple[list[Any], int]] = {}  # index: (results, their bytes)
        self.durations = _Durations()
        self.submitted = 0
        self.exhausted = False
        self.busy = 0  # tasks alive: first runs, hedges, and retries waiting for a slot
        self._busy_since: float | None = None  # refused busy since, with no answer in between
        self._last_busy: WorkerUnavailable | None = None
        self._finished: deque[tuple[_Chunk, asyncio.Task[list[Any]]]] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._by_start: list[tuple[float, int, _Chunk]] = []  # hedging candidates, a heap
        self.pacer = plan.pacer()  # rate= and throttles: rate.py

    # -- the driver ----------------------------------------------------------------------

    async def results(self) -> AsyncGenerator[list[Any], None]:
        """Yield the results in input order, a batch of whole chunks at a time."""
        next_out = 0
        # A generator's chunks launched but not yet yielded, at most: the ones in flight plus
        # some slack for answers that arrive out of order. This bounds the call's memory,
        # whatever its input. A list is in memory already, and so will its results be: no
        # bound, so one slow chunk never holds up the rest of the call.
        ahead = self.plan.workers + max(8, self.plan.workers // 4)
        if not self.lazy_input:
            ahead = sys.maxsize
        error: BaseException | None = None
        if self.watch is not None:
            self.watch.begin(self)
        try:
            while True:
                while (
                    not self.exhausted
                    and self.busy < self._room()
                    and self.submitted - next_out < ahead
                    and self._may_hold(next_out)
                ):
                    chunk = await self._read()
                    if chunk is None:
                        self.exhausted = True
                    else:
                        self._launch(_Chunk(chunk))
                batch: list[Any] = []
                while next_out in self.ready:
                    results, nbytes = self.ready.pop(next_out)
                    batch += results
                    self.held -= nbytes
                    self.waiting -= nbytes
                    next_out += 1
                if batch:
                    yield batch
                    batch = []  # the consumer has it: not kept while the next one comes
                    continue
                if self.exhausted and not self.running:
                    return
                await self._wait()
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.tally.rate, self.tally.window = self.pacer.rate, self._room()
            self.tally.throttles = self.pacer.throttles
            self.tally.failed = sorted(self.failed_at)
            await self._cancel_all()
            if self.watch is not None:
                self.watch.finished(error)

    def live(self) -> tuple[int, int, int, int, int, int]:
        """Chunks in flight, the window, retries, busy refusals, hedges, throttles so far."""
        tally = self.tally
        return (
            len(self.running),
            self._room(),
            tally.retries,
            tally.busy,
            tally.hedges,
            self.pacer.throttles,
        )

    def rate(self) -> float | None:
        """Items per second the pacer allows now (None: unpaced), for the caller's metrics."""
        return self.pacer.rate

    def _may_hold(self, next_out: int) -> bool:
        """Whether the results held and expected leave room for one more chunk's (at most
        `weights.limit`: chunking.py). With nothing outstanding one always goes, so a chunk
        heavier than the bound still runs; the consumer taking results makes room, and the
        chunk it waits for is in flight."""
        if self.hold is None or self.submitted == next_out:
            return True
        heaviest = self.weights.limit if self.weights is not None else 0
        return self.held + heaviest <= self.hold

    def _room(self) -> int:
        """Tasks the call may have alive now: `workers`, or less where the URLs' windows
        are smaller (what their workers said they can take, or shrunk by 429/503)."""
        room = sum(window.size() for window in self.windows.values())
        return min(self.plan.workers, room)

    def _ceiling(self, url: str) -> int:
        known = self.capacities.of(url) if self.capacities is not None else None
        return min(self.plan.workers, known or self.plan.workers)

    async def _read(self) -> Chunk | None:
        """The next chunk; a generator runs in a thread so a slow one never blocks the loop,
        and so do a cached call's lookups."""
        if not self.lazy_input and self.cache is None:
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
            f"{self.function} missed its deadline of {self.plan.deadline}s ({what})"
        )

    async def _wait(self) -> None:
        """Until a task finishes, a straggler is due for a hedge, the deadline, or the end
        of the call's patience with a refusing downstream."""
        patience = self._patience_left()
        if not self._finished:
            tick = self._hedge_due()
            if self.deadline_at is not None:
                left = self.deadline_at - _now()
                if left <= 0:
                    raise self._deadline_error("")
                tick = left if tick is None else min(tick, left)
            if patience is not None:
                tick = patience if tick is None else min(tick, patience)
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

    def _patience_left(self) -> float | None:
        """Seconds the call may still be refused with nothing completing (None: no bound, or
        nothing is refused); raises StillThrottled once they are spent."""
        busy = self._busy_left()
        stalled = self.pacer.stalled()
        if self.plan.patience is None or not stalled:
            return busy
        left = self.plan.patience - stalled
        if left > 0:
            return left if busy is None else min(left, busy)
        pacer = self.pacer
        raise StillThrottled(
            f"{self.function}: the downstream refused every item for {self.plan.patience:g}s"
            f" with none completing ({pacer.throttles} refusals; the last: "
            f"{pacer.last_refusal}); {pacer.completed} of the call's items had completed. "
            "patience= sets how long a call waits (None: for as long as it takes)",
            last=pacer.last_refusal,
            completed=pacer.completed,
            throttles=pacer.throttles,
        )

    def _busy_left(self) -> float | None:
        """The same bound for a call whose chunks every worker refuses as busy (their threads
        all held: by other callers, or hung) with none answered meanwhile."""
        if self.plan.patience is None or self._busy_since is None:
            return None
        left = self.plan.patience - (_now() - self._busy_since)
        if left > 0:
            return left
        last = self._last_busy
        raise WorkerUnavailable(
            f"{self.function}: every worker refused its chunks as busy for "
            f"{self.plan.patience:g}s with none answered (the last: {last}). patience= sets "
            "how long a call waits (None: for as long as it takes)",
            url=last.url if last is not None else "",
            status=last.status if last is not None else None,
        )

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
            nbytes = owner.answered
            results = task.result()
            self.ready[owner.index] = (results, nbytes)
            self.held += nbytes - owner.expected  # now as answered, no longer as expected
            self.waiting += nbytes
            self.tally.buffered = max(self.tally.buffered, self.waiting)
            if owner.chunk.items:  # a piece found whole in the store took no worker's time
                self.durations.add(_now() - owner.started)
            del self.running[owner.index]
            for other in owner.tasks:
                if other is not task:
                    other.cancel()  # the hedge lost: its answer will be ignored
            failed = self._count_failures(results) if self.plan.isolate else 0
            if self.watch is not None:  # items in: a fused call's last stage may filter
                sent = len(owner.chunk.items)
                # a list looked up whole had its finds counted before the call (the Watch's
                # `cached`): those merged back in here are not counted twice
                merged = self.cache is not None and self.cache.all_found is None
                found = len(results) - sent if merged else 0
                self.watch.settled(sent + found, failed, found)
            return
        owner.tasks.remove(task)
        if owner.tasks and isinstance(exc, WorkerError):
            return  # its sibling may still succeed
        raise exc

    def _count_failures(self, results: list[Any]) -> int:
        """errors="return": the failures so far, and the end of the call once they are more
        than max_failures allows (what is in flight is cancelled as the driver unwinds).
        Returns how many of `results` failed."""
        failures = [result for result in results if isinstance(result, RemoteError)]
        self.failed_at += [e.index for e in failures if e.index is not None]
        self.succeeded += len(results) - len(failures)
        if self.plan.max_failures is None:
            return len(failures)
        self.failures += failures
        failed, answered = len(self.failures), self.succeeded + len(self.failures)
        if not failures or not self.plan.too_many_failures(failed, answered, self.count):
            return len(failures)
        ordered = sorted(self.failures, key=lambda e: -1 if e.index is None else e.index)
        first = ordered[0]
        raise TooManyFailures(
            f"{self.function}: {failed} items failed, more than max_failures="
            f"{self.plan.max_failures} allows; the call stopped with {self.succeeded} "
            f"succeeded. The first: {first}",
            failures=ordered,
            succeeded=self.succeeded,
        )

    def _launch(self, chunk: _Chunk, hedge: bool = False) -> None:
        if not hedge:
            self.running[chunk.index] = chunk
            self.submitted += 1
            weights = self.weights
            chunk.expected = weights.expected(chunk.chunk) if weights else chunk.chunk.nbytes
            if isinstance(chunk.chunk, Piece):  # with what it found in the store
                chunk.expected += chunk.chunk.found_bytes
            self.held += chunk.expected
            if self.plan.hedge:
                heapq.heappush(self._by_start, (chunk.started, chunk.index, chunk))
        avoid = set(chunk.urls) if hedge else set()
        lane = len(chunk.tasks)
        if self.cache is None:
            task = asyncio.create_task(self._attempts(chunk, chunk.chunk, avoid, lane))
        else:
            task = asyncio.create_task(self._cached(self.cache, chunk, avoid, lane))
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

    async def _cached(
        self, cache: CallCache, owner: _Chunk, avoid: set[str], lane: int
    ) -> list[Any]:
        """A cached call's piece: its results found in the store with those of its items
        (misses) in their places; a piece with no items sends nothing."""
        chunk = owner.chunk
        if not chunk.items:
            results: list[Any] = []
        else:
            try:
                results = await self._attempts(owner, chunk, avoid, lane)
            except (RemoteError, SerializationError) as exc:  # numbered among the misses
                raise cache.placed(chunk, exc) from exc.__cause__
        sent = owner.answered  # the reply's bytes: what its results queue for the store
        owner.answered += chunk.found_bytes if isinstance(chunk, Piece) else 0
        merged = cache.merge(chunk, results, sent)
        await cache.room(self.hold)  # a slower store holds the call back, not its memory
        return merged

    # -- one chunk: retries ----------------------------------------------------------------
    # errors="return" needs nothing here: the worker runs such a chunk item by item and its
    # reply carries each failed item's RemoteError in place (_wire/exchange.read_reply), so no item
    # that succeeded is ever sent again.

    async def _attempts(self, owner: _Chunk, chunk: Chunk, avoid: set[str], lane: int) -> list[Any]:
        plan, pacer = self.plan, self.pacer
        failed = set(avoid)
        retried = pushed_back = refused = 0  # refused: signed "busy" answers in a row
        # a paced chunk goes in parts of what the rate allows in a short while (a part that
        # lasts long would hold a stale pace); a throttled one from its first refused item
        whole, before = chunk, []  # before: results of the parts done, in order
        record = _Record(chunk, _now())
        watch, requests = self.watch, 0

        def tried(outcome: Outcome, worker: str, ended: float | None = None) -> None:
            """The loop's current request ended: kept for the chunk's timeline (its `tries`),
            and told to the watchers."""
            assert started is not None  # only a request that was sent ends
            ended = _now() if ended is None else ended
            origin, items = self.started, len(chunk.items)
            owner.tries.append(
                Try(
                    started - origin,
                    ended - origin,
                    self._shown(url),
                    worker,
                    outcome,
                    items,
                    lane > 0,
                )
            )
            if request is not None and watch is not None:
                watch.ended(request, outcome, worker)

        while True:
            url = await self._slot(failed)
            window = self.windows[url]
            number = window.send()
            self.load[url] += 1
            owner.urls.append(url)
            epoch = started = request = None
            outcome: Outcome | None = None  # how a request that failed ended
            by = ""  # the worker that refused it, where one did
            try:
                # the rate's turns last: a grant is not spent waiting for a URL with room
                slot, size = None, functools.partial(plan.part, pacer, len(whole.items))
                if pacer.rate is not None:  # unpaced: no await, no lock (the common case)
                    part = await pacer.take(size)
                    slot = time.time()  # item 0's turn, for the worker (pacing.py)
                else:
                    part = size()
                chunk = whole if part == len(whole.items) else whole.head(part)
                timeout = plan.timeout
                if self.deadline_at is not None:
                    timeout = min(timeout, max(0.001, self.deadline_at - _now()))
                epoch = pacer.sent()
                requests += 1
                trace = ""
                if watch is not None:
                    shown = self._shown(url)
                    request = watch.sending(
                        owner.index, requests, len(chunk.items), shown, lane > 0
                    )
                    trace = request.trace
                started = _now()
                self.tally.sent += 1
                answer = await self.attempt(url, chunk, timeout, plan.pace(pacer), slot, trace)
            except WorkerError as exc:
                outcome, by = "failed", getattr(exc, "worker", "")
                overloaded = isinstance(exc, WorkerUnavailable) and exc.status in (429, 503)
                busy = isinstance(exc, WorkerUnavailable) and bool(exc.capacity)
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
                if busy:
                    # a signed "busy" proves nothing ran: a wait for a slot, never a failure,
                    # whatever `retries` says (at most once too); only the deadline ends it.
                    # Other callers may hold the worker's threads (6 parents on one app: 2 to
                    # 4 failed when these counted as retries), so a chunk refused again backs
                    # off, with jitter, up to the worker's Retry-After
                    outcome = "busy"
                    record.busy += 1
                    failed.add(url)
                    refused += 1
                    if self._busy_since is None:  # the driver times the call's patience
                        self._busy_since = _now()
                        if self._wake is not None:
                            _resolve(self._wake)
                    self._last_busy = exc if isinstance(exc, WorkerUnavailable) else None
                    if refused > 1:
                        delay = min(BUSY_CAP, BUSY_BASE * 2 ** (refused - 2))
                        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    continue
                if not exc.retryable or plan.at_most_once:
                    raise
                # "not now" from an overloaded target is flow control, not a failure: the
                # window has shrunk; it costs a retry only once the pushbacks run out
                if overloaded and pushed_back < PUSHBACKS:
                    pushed_back += 1
                elif retried < plan.retries:
                    retried += 1
                else:
                    raise
                logger.debug("retrying chunk %d of %s: %s", chunk.index, self.function, exc)
                outcome = "retried"
                record.attempts += 1
                failed.add(url)
                if exc.status is None:  # no HTTP answer at all: send elsewhere from now on
                    self.down.add(url)
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (record.attempts - 2))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: no herd
                continue
            except BaseException as exc:  # the function's error, or cancelled (a lost hedge)
                outcome = "lost" if isinstance(exc, asyncio.CancelledError) else "failed"
                raise
            finally:
                self.load[url] -= 1
                owner.urls.remove(url)
                if epoch is not None:
                    pacer.answered(epoch)
                self._release()
                if outcome is not None and started is not None:  # it was sent
                    tried(outcome, by)
            ended = _now()
            record.answered(url, answer, started, ended)
            before += answer.results
            throttle = answer.throttle
            if slot is not None:  # how long its items take: how many fit a request
                ran = len(chunk.items) if throttle is None else throttle.ran
                pacer.ran(ran, answer.compute_s)
            if throttle is not None:
                # the items before it ran: keep their results, send the rest once the
                # downstream's wait is over, at a lower rate (it never counts as a retry)
                ran = min(max(throttle.at, throttle.ran), len(chunk.items))
                pacer.succeeded(ran)
                if not throttle.stopped:  # a stop is no news of the downstream: no decrease
                    record.throttles += 1
                    pacer.throttled(epoch, throttle.retry_after, throttle.message)
                    if self._wake is not None:  # the driver times the call's patience
                        _resolve(self._wake)
                record.spans = True
                whole = whole.tail(throttle.at)
                tried("throttled", answer.worker, ended)
                logger.debug(
                    "%s of %s throttled at item %d", owner.describe(), self.function, throttle.at
                )
                if throttle.retry_after:
                    await asyncio.sleep(throttle.retry_after)
                continue
            window.succeeded()
            pacer.succeeded(len(chunk.items))
            self._busy_since = None
            self.slow.discard(url)
            if self.sizer is not None:
                self.sizer.observe(len(chunk.items), answer.compute_s)
            if self.weights is not None:
                self.weights.answered(len(chunk.items), answer.size)
            if chunk is not whole:  # a part: the rest goes next
                tried("part", answer.worker, ended)
                record.spans = True
                whole = whole.tail(len(chunk.items))
                continue
            if owner.tries or len(owner.tasks) > 1 or request is not None:
                # a chunk answered by its only request keeps no list: its ChunkStats say it
                tried("ok", answer.worker, ended)
            if self.capacities is not None:
                ceiling = self._ceiling(url)
                if ceiling != window.ceiling:
                    window.cap(ceiling)
            if owner.counted_by in (None, lane):  # a hedge that also finished is not counted
                owner.counted_by = lane
                kept = owner.tries if len(owner.tries) > 1 or len(owner.tasks) > 1 else []
                stats = record.stats(self.started, kept)
                self.tally.add(stats)
                if watch is not None:
                    watch.answered(stats)
            owner.answered = record.nbytes
            return before

    @staticmethod
    def _shown(url: str) -> str:
        """The URL as the timeline, the spans and the log show it: without its password."""
        if "@" not in url and "?" not in url:  # nothing to hide (redact parses: 20 us a call)
            return url
        return _redacted(url)

    # -- hedging ------------------------------------------------------------------------

    def _hedge_limit(self) -> float | None:
        """How long a chunk may run before it is hedged: far past its peers' median."""
        if not self.plan.hedge:
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
            logger.debug("hedging %s of %s", chunk.describe(), self.function)
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


_redacted = functools.lru_cache(maxsize=256)(redact)  # a process's few worker URLs, each once


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
