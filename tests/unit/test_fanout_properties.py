"""Property tests of the fan-out engine's collation: whatever the chunk sizes, the order in
which answers arrive, the transient failures, the hedges and the per-item errors, every
result comes out exactly once and in input order.

The HTTP attempt is replaced here by an in-process coroutine with random delays and
failures (the engine's seam for one attempt): that is what lets hypothesis try thousands of
schedules. The same engine is exercised against real servers in test_reliability.py."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from serverless import RemoteError, WorkerTimeout, WorkerUnavailable
from serverless._caller import fanout as _fanout
from serverless._caller.chunking import Chunk, chunk_iterable
from serverless._caller.fanout import Answer, Fanout, Tally
from serverless._caller.plan import CallPlan

URLS = ("http://a/serverless", "http://b/serverless", "http://c/serverless")


def run(
    count: int,
    chunk_size: int,
    policy: CallPlan,
    rng: random.Random,
    fail_rate: float,
    bad: set[int],
    isolate: bool = False,
) -> tuple[list[Any], Tally, list[int]]:
    sent: list[int] = []  # item offsets of every attempt that answered

    async def attempt(
        url: str, chunk: Chunk, timeout: float, pace: float | None, slot: float | None, trace: str
    ) -> Any:
        _, offset, items = chunk
        await asyncio.sleep(rng.random() * 0.002)
        roll = rng.random()
        if roll < fail_rate / 2:
            raise WorkerUnavailable("injected", url=url, status=503)
        if roll < fail_rate:
            raise WorkerTimeout("injected", url=url)
        out: list[Any] = []
        for i, item in enumerate(items):
            error = RemoteError("f", "ValueError", f"bad {item}", "tb", index=offset + i)
            if item in bad and not isolate:
                raise error
            # errors="return": the worker isolates each item and answers errors in place
            out.append(error if item in bad else item * 2)
        sent.append(offset)
        return Answer(out, "w")

    async def main() -> tuple[list[Any], Tally]:
        tally = Tally()
        engine = Fanout(
            replace(policy, timeout=1.0),
            URLS,
            chunk_iterable(range(count), chunk_size),
            attempt,
            tally,
            lazy_input=rng.random() < 0.5,
        )
        out: list[Any] = []
        async for batch in engine.results():
            out += batch
        return out, tally

    saved = _fanout.BACKOFF_BASE
    _fanout.BACKOFF_BASE = 0.0001  # the schedule, not the backoff, is under test
    try:
        out, tally = asyncio.run(main())
    finally:
        _fanout.BACKOFF_BASE = saved
    return out, tally, sent


@settings(max_examples=80, deadline=None)
@given(
    count=st.integers(0, 400),
    chunk_size=st.integers(1, 40),
    workers=st.integers(1, 12),
    seed=st.integers(0, 2**32),
    fail_rate=st.sampled_from([0.0, 0.1, 0.3]),
    hedge=st.booleans(),
)
def test_every_result_once_in_order(
    count: int, chunk_size: int, workers: int, seed: int, fail_rate: float, hedge: bool
) -> None:
    policy = CallPlan("f", workers=workers, retries=30, hedge=hedge)
    out, tally, _ = run(count, chunk_size, policy, random.Random(seed), fail_rate, set())
    assert out == [2 * n for n in range(count)]
    assert tally.count == count  # each chunk counted once, hedged or not
    assert tally.done == -(-count // chunk_size)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 300),
    chunk_size=st.integers(1, 40),
    bad=st.sets(st.integers(0, 299), max_size=12),
    seed=st.integers(0, 2**32),
)
def test_errors_return_isolates_exactly_the_failing_items(
    count: int, chunk_size: int, bad: set[int], seed: int
) -> None:
    policy = CallPlan("f", workers=5, retries=30)
    out, _, sent = run(count, chunk_size, policy, random.Random(seed), 0.1, bad, isolate=True)
    assert len(out) == count
    assert sorted(sent) == list(range(0, count, chunk_size))  # one answered run per chunk
    for n, value in enumerate(out):
        if n in bad:
            assert isinstance(value, RemoteError) and value.index == n
        else:
            assert value == 2 * n
