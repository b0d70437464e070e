"""One call's fan-out, on the dispatcher's loop: slots, order, retries, hedges, deadline.

Chunks are read from the input as slots free (a generator is never materialised), at most
`workers` run at once, and results come out in input order through a bounded reorder buffer,
so a stream of any length runs in bounded memory. A chunk is retried on transient failures,
and hedged when it straggles at the tail of the call. Whatever ends the call (an error, the
deadline, the consumer closing the stream), every request still in flight is cancelled
before the call returns.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._chunking import Chunk
from ._config import ErrorMode
from ._exceptions import DeadlineExceeded, WorkerError
from ._stats import ChunkStats

logger = logging.getLogger("serverless.dispatch")

BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
HEDGE_AFTER = 0.75  # hedge only once this share of the chunks is done...
HEDGE_FACTOR = 2.0  # ...for a chunk running this many times the median chunk time...
HEDGE_FLOOR = 0.1  # ...and at least this many seconds more than the median
MAX_KEPT_STATS = 10_000  # per-chunk statistics kept for one call (counters are exact)


@dataclass(frozen=True)
class Policy:
    workers: int
    retries: int
    deadline: float | None = None
    hedge: bool = False
    errors: ErrorMode = "raise"  # or "return": a failed item's RemoteError in its place


@dataclass
class Tally:
    """What the call measured: exact counters, and per-chunk statistics up to a bound."""

    chunks: list[ChunkStats] = field(default_factory=list)
    count: int = 0
    compute_s: float = 0.0
    retries: int = 0
    hedges: int = 0
    sent: int = 0  # requests sent, retries and hedges included
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


# One attempt of one chunk on one URL: (results, the attempt's ChunkStats) or an exception.
Attempt = Callable[[str, Chunk, int, float], Awaitable[tuple[list[Any], ChunkStats]]]


class _Chunk:
    """A chunk and the tasks working on it (its first run, and a hedge)."""

    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk
        self.tasks: list[asyncio.Task[list[Any]]] = []
        self.urls: list[str] = []  # where its tasks are sending now
        self.counted_by: int | None = None  # the task (lane) whose statistics count
        self.started = time.perf_counter()

    @property
    def index(self) -> int:
        return self.chunk.index

    def describe(self) -> str:
        index, offset, items = self.chunk
        where = ", ".join(sorted(set(self.urls))) or "not sent yet"
        return f"chunk {index} (items {offset}-{offset + len(items) - 1}) on {where}"


class Fanout:
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
    ) -> None:
        self.function = function
        self.chunks = chunks
        self.attempt = attempt
        self.policy = policy
        self.tally = tally
        self.lazy_input = lazy_input
        self.timeout = timeout
        self.load = dict.fromkeys(urls, 0)
        self.down: set[str] = set()  # URLs that lost a connection during this call
        self.started = time.perf_counter()
        self.deadline_at = None if policy.deadline is None else self.started + policy.deadline
        self.running: dict[int, _Chunk] = {}
        self.ready: dict[int, list[Any]] = {}
        self.durations: list[float] = []
        self.submitted = 0
        self.exhausted = False

    # -- the driver ----------------------------------------------------------------------

    async def results(self) -> AsyncGenerator[list[Any], None]:
        """Yield the results in input order, a batch of whole chunks at a time."""
        next_out = 0
        # Chunks launched but not yet yielded, at most: the ones in flight plus some slack for
        # answers that arrive out of order. This bounds the call's memory, whatever its input.
        ahead = self.policy.workers + max(8, self.policy.workers // 4)
        try:
            while True:
                while (
                    not self.exhausted
                    and len(self.running) < self.policy.workers
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
            await self._cancel_all()

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
        pending = sorted(self.running.values(), key=lambda c: c.index)
        listed = "; ".join(c.describe() for c in pending[:5])
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        what = f"still running: {listed}{more}" if pending else doing
        return DeadlineExceeded(
            f"{self.function} missed its deadline of {self.policy.deadline}s ({what})"
        )

    async def _wait(self) -> None:
        tasks = {t for c in self.running.values() for t in c.tasks}
        tick = self._hedge_tick()
        if self.deadline_at is not None:
            left = self.deadline_at - _now()
            if left <= 0:
                raise self._deadline_error("")
            tick = left if tick is None else min(tick, left)
        done, _ = await asyncio.wait(tasks, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            self._settle(task)
        self._maybe_hedge()

    def _settle(self, task: asyncio.Task[list[Any]]) -> None:
        owner = next((c for c in self.running.values() if task in c.tasks), None)
        if owner is None:
            return  # its chunk was already settled by a sibling
        exc = task.exception()
        if exc is None:
            self.ready[owner.index] = task.result()
            self.durations.append(time.perf_counter() - owner.started)
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
        avoid = set(chunk.urls) if hedge else set()
        task = asyncio.create_task(self._run(chunk, chunk.chunk, avoid, len(chunk.tasks)))
        chunk.tasks.append(task)

    # -- one chunk: retries ----------------------------------------------------------------
    # errors="return" needs nothing here: the worker runs such a chunk item by item and its
    # reply carries each failed item's RemoteError in place (_protocol.read_reply), so no item
    # that succeeded is ever sent again.

    async def _run(self, owner: _Chunk, chunk: Chunk, avoid: set[str], lane: int) -> list[Any]:
        return await self._attempts(owner, chunk, avoid, lane)

    async def _attempts(self, owner: _Chunk, chunk: Chunk, avoid: set[str], lane: int) -> list[Any]:
        failed = set(avoid)
        for attempt in range(1, self.policy.retries + 2):
            url = min(self.load, key=lambda u: (u in failed, u in self.down, self.load[u]))
            self.load[url] += 1
            owner.urls.append(url)
            timeout = self.timeout
            if self.deadline_at is not None:
                timeout = min(timeout, max(0.001, self.deadline_at - _now()))
            try:
                self.tally.sent += 1
                results, stats = await self.attempt(url, chunk, attempt, timeout)
            except WorkerError as exc:
                if not exc.retryable or attempt > self.policy.retries:
                    raise
                logger.info("retrying chunk %d of %s: %s", chunk.index, self.function, exc)
                failed.add(url)
                if exc.status is None:  # no HTTP answer at all: send elsewhere from now on
                    self.down.add(url)
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: no herd
                continue
            finally:
                self.load[url] -= 1
                owner.urls.remove(url)
            stats.start -= self.started  # seconds since the call started
            stats.end -= self.started
            if owner.counted_by in (None, lane):  # a hedge that also finished is not counted
                owner.counted_by = lane
                self.tally.add(stats)
            return results
        raise AssertionError("unreachable")  # pragma: no cover

    # -- hedging ------------------------------------------------------------------------

    def _hedge_tick(self) -> float | None:
        if not self.policy.hedge or not self.exhausted or not self.durations:
            return None
        return max(0.01, statistics.median(self.durations) / 4)

    def _maybe_hedge(self) -> None:
        """Duplicate a straggler at the tail: the first answer wins, the other is cancelled."""
        if not self.policy.hedge or not self.exhausted or not self.durations:
            return
        if len(self.durations) < HEDGE_AFTER * self.submitted:
            return
        median = statistics.median(self.durations)
        limit = max(HEDGE_FACTOR * median, median + HEDGE_FLOOR)
        now = time.perf_counter()
        busy = sum(len(c.tasks) for c in self.running.values())
        for chunk in sorted(self.running.values(), key=lambda c: c.started):
            if busy >= self.policy.workers:
                break
            if len(chunk.tasks) == 1 and now - chunk.started > limit:
                logger.info("hedging %s of %s", chunk.describe(), self.function)
                self.tally.hedges += 1
                self._launch(chunk, hedge=True)
                busy += 1

    async def _cancel_all(self) -> None:
        tasks = [t for c in self.running.values() for t in c.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.running.clear()


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
