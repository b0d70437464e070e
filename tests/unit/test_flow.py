"""The caller adapts to what the target can take (issue 15.3), and hedges a chunk that runs
far past its peers whatever the input's length and the reorder window (issue 15.5).

The flow-control policy is pure (_flow.py); the engine's behaviour is shown through its seam
for one attempt, a coroutine standing for a worker with a given number of threads, and end
to end through the in-process transport."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from serverless import WorkerUnavailable
from serverless import _wire as p
from serverless._caller import fanout as _fanout
from serverless._caller.chunking import Chunk, chunk_iterable, chunk_sequence
from serverless._caller.dispatch import dispatcher
from serverless._caller.fanout import Answer, Attempt, Fanout, Tally
from serverless._caller.flow import Capacities, Window
from serverless._caller.inprocess import InProcess
from serverless._caller.plan import CallPlan
from serverless._wire import Response
from serverless._worker.endpoint import Endpoint
from tests.sample_functions import sleepy

A, B = "http://a/serverless", "http://b/serverless"


# -- the policy ------------------------------------------------------------------------------


def test_a_window_shrinks_with_the_share_refused_and_grows_back_additively() -> None:
    window = Window(32)
    for _ in range(32):  # a whole round refused: halved
        window.overloaded(window.send(), 0.0, None)
    assert window.size() == 16
    for _ in range(16):
        window.overloaded(window.send(), 0.0, None)
    assert window.size() == 8
    for _ in range(9):
        window.succeeded()
    assert window.size() == 9  # about a window's worth of successes: one more
    for _ in range(10_000):
        window.succeeded()
    assert window.size() == 32  # never above the ceiling (the call's `workers`)


def test_stray_refusals_among_many_successes_do_not_collapse_the_window() -> None:
    # 20% of answers 503 at random (the load test's faulty workers): the window settles
    # near 2(1-p)/p = 8 instead of halving every round down to 1 or 2
    window = Window(100)
    for n in range(20_000):
        if n % 5 == 0:
            window.overloaded(window.send(), 0.0, None)
        else:
            window.succeeded()
    assert 6 <= window.size() <= 12


def test_retry_after_holds_the_url_and_a_capacity_caps_the_window() -> None:
    window = Window(100)
    window.overloaded(window.send(), now=5.0, retry_after=2.0)
    assert window.paused_until == 7.0
    window.cap(24)
    assert window.size() == 24  # learned: the workers take 24 at once


def test_a_urls_capacity_is_the_sum_over_the_workers_heard_from_behind_it() -> None:
    now = [0.0]
    capacities = Capacities(clock=lambda: now[0])
    assert capacities.of(A) is None
    for worker in ("h0:1", "h1:1", "h2:1", "h0:1"):
        capacities.observe(A, worker, 32)
    capacities.observe(B, "h3:1", None)  # a worker that does not say: unknown
    assert capacities.of(A) == 96 and capacities.of(B) is None
    assert capacities.total((A,)) == 96 and capacities.total((A, B)) is None
    now[0] = 1000.0
    capacities.observe(A, "h0:1", 32)  # the others were not heard from since: forgotten
    assert capacities.of(A) == 32


# -- the engine, through its seam for one attempt -------------------------------------------


class Threads:
    """A worker with `threads` threads that refuses what it cannot start at once with 503 and
    Retry-After, as a worker with a queueing budget does; records when each URL was sent to."""

    def __init__(self, threads: int, seconds: float, retry_after: float | None) -> None:
        self.threads, self.seconds, self.retry_after = threads, seconds, retry_after
        self.running: dict[str, int] = {}
        self.sent: list[tuple[str, float]] = []
        self.refused: list[tuple[str, float]] = []
        self.most = 0

    async def __call__(
        self,
        url: str,
        chunk: Chunk,
        timeout: float,
        pace: float | None,
        slot: float | None,
        trace: str,
    ) -> Any:
        now = time.perf_counter()
        self.sent.append((url, now))
        if self.running.get(url, 0) >= self.threads:
            self.refused.append((url, now))
            raise WorkerUnavailable("busy", url=url, status=503, retry_after=self.retry_after)
        self.running[url] = self.running.get(url, 0) + 1
        self.most = max(self.most, self.running[url])
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.running[url] -= 1
        return Answer(chunk.items, "w")


def drive(
    attempt: Attempt,
    chunks: Iterator[Chunk],
    policy: CallPlan,
    *,
    urls: tuple[str, ...] = (A,),
    lazy: bool = False,
    capacities: Capacities | None = None,
) -> tuple[list[Any], Tally, float]:
    async def main() -> list[Any]:
        engine = Fanout(
            replace(policy, timeout=30.0),
            urls,
            chunks,
            attempt,
            tally,
            lazy_input=lazy,
            capacities=capacities,
        )
        out: list[Any] = []
        async for batch in engine.results():
            out += batch
        return out

    tally = Tally()
    started = time.perf_counter()
    out = asyncio.run(main())
    return out, tally, time.perf_counter() - started


def test_503s_with_retry_after_shrink_the_window_and_no_call_fails() -> None:
    # 32 chunks in flight against 4 threads: before, every chunk refused 4 times failed
    # the call (retries=3); now the window follows the refusals down
    worker = Threads(threads=4, seconds=0.02, retry_after=None)
    out, tally, _ = drive(
        worker, chunk_iterable(range(120), 1), CallPlan("f", workers=32, retries=3)
    )
    assert out == list(range(120)) and tally.done == 120
    assert len(worker.refused) < 60  # the caller stopped pushing


def test_no_request_goes_to_a_url_before_its_retry_after_has_passed() -> None:
    worker = Threads(threads=2, seconds=0.01, retry_after=0.3)
    saved = _fanout.BACKOFF_BASE
    _fanout.BACKOFF_BASE = 0.001  # the backoff alone would resend within milliseconds
    try:
        out, _, _ = drive(worker, chunk_iterable(range(12), 1), CallPlan("f", workers=6, retries=3))
    finally:
        _fanout.BACKOFF_BASE = saved
    assert out == list(range(12)) and worker.refused
    last_refusal = worker.refused[-1][1]
    for _, when in worker.sent:
        assert not last_refusal < when < last_refusal + 0.29, "sent during Retry-After"


def test_the_window_never_exceeds_a_declared_capacity() -> None:
    capacities = Capacities()
    capacities.observe(A, "h0:1", 3)
    capacities.observe(B, "h1:1", 5)
    worker = Threads(threads=100, seconds=0.005, retry_after=None)
    policy = CallPlan("f", workers=50, retries=0)
    out, _, _ = drive(
        worker, chunk_iterable(range(200), 1), policy, urls=(A, B), capacities=capacities
    )
    assert out == list(range(200))
    assert worker.most == 5  # at most what each said; the call's 50 never reached


def test_a_chunk_far_past_its_peers_is_hedged_however_long_the_input() -> None:
    # a generator of 200 one-item chunks, one of two URLs frozen for 6 s: before, hedging
    # waited for the whole input to be read, and the reorder window stopped reading it
    frozen_until = time.perf_counter() + 6.0

    async def attempt(
        url: str, chunk: Chunk, timeout: float, pace: float | None, slot: float | None, trace: str
    ) -> Any:
        await asyncio.sleep(0.01)
        if url == A:
            await asyncio.sleep(frozen_until - time.perf_counter())
        return Answer(chunk.items, "w")

    policy = CallPlan("f", workers=20, retries=3, hedge=True)
    chunks = chunk_iterable(range(200), 1)
    out, tally, wall = drive(attempt, chunks, policy, urls=(A, B), lazy=True)
    assert out == list(range(200))
    assert tally.hedges > 0 and wall < 3


def test_one_slow_item_among_many_takes_the_call_no_longer_than_itself() -> None:
    # the head-of-line chunk runs 1 s; the 399 others (10 ms each, 9 at a time) need 0.45 s
    async def attempt(
        url: str, chunk: Chunk, timeout: float, pace: float | None, slot: float | None, trace: str
    ) -> Any:
        await asyncio.sleep(1.0 if chunk.index == 0 else 0.01)
        return Answer(chunk.items, "w")

    policy = CallPlan("f", workers=10, retries=0, hedge=True)
    out, _, wall = drive(attempt, chunk_sequence(list(range(400)), 10, 1), policy)
    assert out == list(range(400))
    assert wall < 1.1


# -- end to end, in process ------------------------------------------------------------------


class Declaring(Endpoint):
    """A worker endpoint that says, on each signed reply, that it runs `capacity` at once
    (the worker half of issue 15.3)."""

    capacity = 3

    def _reply(
        self, status: int, reply: p.Reply, fmt: str, signer: tuple[str, str] | None = None
    ) -> Response:
        if reply.worker:
            reply.capacity = self.capacity
        return super()._reply(status, reply, fmt, signer)


def test_a_list_is_cut_into_as_many_chunks_as_the_target_can_run(
    in_process: InProcess[Endpoint],
) -> None:
    # both unit-test URLs reach one endpoint in this process: 3 + 3 slots
    in_process.endpoint.__class__ = Declaring
    capacities = dispatcher().capacities
    saved = dict(capacities._totals)
    try:
        f = sleepy.with_options(workers=20)
        first, stats = f.with_stats([0.0] * 40)  # nothing known yet: 20 chunks
        assert first == [0.0] * 40 and len(stats.chunks) == 20
        _, stats = f.with_stats([0.0] * 40)
        assert len(stats.chunks) == 6  # not 20 chunks for 6 slots: one round, not four
    finally:
        in_process.endpoint.__class__ = Endpoint
        capacities._totals.clear()
        capacities._totals.update(saved)
