"""Issue 4's promises, shown with real workers and real faults: streaming in order and in
bounded memory, a generator that raises, deadlines, hedged stragglers, per-item errors, a
local worker killed with SIGKILL, a fifth of requests answered 503, connections reset
mid-response, and a load of thousands of chunks through a load balancer with faults."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import serverless
from serverless import DeadlineExceeded, RemoteError, ServerlessError, WorkerTimeout
from serverless._caller.dispatch import dispatcher
from serverless._pool import pool as _pool
from tests.conftest import SECRET, free_port, haproxy, server
from tests.faults import ResetProxy
from tests.sample_functions import hang_on, reject, sleepy, square, straggle


def tasks_left() -> int:
    """Tasks still alive on the dispatcher's loop, besides the one counting."""

    async def count() -> int:
        await asyncio.sleep(0.05)  # let cancelled tasks finish unwinding
        return len(asyncio.all_tasks() - {asyncio.current_task()})

    return asyncio.run_coroutine_threadsafe(count(), dispatcher()._ensure_loop()).result(10)


# -- streaming ---------------------------------------------------------------------------------


def test_stream_yields_every_result_once_in_order() -> None:
    out = list(square.with_options(workers=8, chunk_size=7).stream(range(1000)))
    assert out == [n * n for n in range(1000)]


def test_stream_reads_a_generator_lazily_and_closing_cancels() -> None:
    pulled = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for n in range(10**9):
            pulled += 1
            yield n

    results = square.with_options(workers=4, chunk_size=10).stream(numbers())
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    assert pulled <= (4 * 2 + 16 + 2) * 10  # a bounded read-ahead, not the whole input
    results.close()  # type: ignore[attr-defined]
    assert tasks_left() == 0


def test_leaving_a_stream_early_cancels_the_chunks_in_flight() -> None:
    results = sleepy.with_options(workers=4, chunk_size=1).stream([0.0] * 2 + [5.0] * 20)
    started = time.perf_counter()
    for value in results:
        assert value == 0.0
        break
    results.close()  # type: ignore[attr-defined]
    assert tasks_left() == 0
    assert time.perf_counter() - started < 4  # did not wait for the 5 s chunks


def test_astream_in_an_event_loop() -> None:
    async def consume() -> list[int]:
        f = square.with_options(workers=3, chunk_size=4)
        return [r async for r in f.astream(range(50))]

    assert asyncio.run(consume()) == [n * n for n in range(50)]


# -- a generator that raises, deadlines, hangs -------------------------------------------------


class InputBroke(Exception):
    pass


def test_a_generator_that_raises_raises_that_exception_promptly() -> None:
    error = InputBroke("the input broke at item 4")

    def items() -> Iterator[float]:
        yield from [5.0] * 4  # chunks that take 5 s each
        raise error

    started = time.perf_counter()
    with pytest.raises(InputBroke) as info:
        sleepy.with_options(workers=10, chunk_size=1)(items())
    assert info.value is error
    assert time.perf_counter() - started < 4  # did not wait for the chunks in flight
    assert tasks_left() == 0


def test_the_deadline_bounds_the_call_and_names_what_was_running() -> None:
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded) as info:
        hang_on.with_options(workers=4, deadline=0.5)([1, 2, 3, 4], 3, 10.0)
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert "missed its deadline of 0.5s" in message
    assert "chunk 2 (items 2-2) on http://pool" in message  # the local pool's worker
    assert isinstance(info.value, TimeoutError) and tasks_left() == 0


def test_a_hanging_chunk_times_out_is_retried_and_the_error_says_where() -> None:
    with pytest.raises(WorkerTimeout) as info:
        hang_on.with_options(workers=2, timeout=0.3, retries=1)([1, 2], 2, 10.0)
    assert "chunk 1 of" in str(info.value) and "url=http://pool" in str(info.value)


# -- hedging -----------------------------------------------------------------------------------


def test_a_straggler_is_hedged_and_the_first_answer_wins(tmp_path: Path) -> None:
    f = straggle.with_options(workers=10, idempotent=True)
    started = time.perf_counter()
    out, stats = f.with_stats(list(range(100)), str(tmp_path / "marker"), 20.0)
    assert out == list(range(100))
    assert (stats.hedges, stats.count, stats.count_out) == (1, 100, 100)
    assert time.perf_counter() - started < 10  # the 20 s straggler did not hold the call
    assert tasks_left() == 0


def test_no_hedging_unless_the_function_is_idempotent(tmp_path: Path) -> None:
    out, stats = straggle.with_options(workers=10).with_stats(
        list(range(100)), str(tmp_path / "marker"), 0.6
    )
    assert out == list(range(100)) and stats.hedges == 0


# -- per-item errors ---------------------------------------------------------------------------


def test_errors_return_puts_each_failure_in_its_place() -> None:
    bad = [3, 4, 17, 29]
    out = reject.with_options(workers=3, errors="return")(list(range(30)), bad)
    assert [v for i, v in enumerate(out) if i not in bad] == [n for n in range(30) if n not in bad]
    for i in bad:
        error: object = out[i]
        assert isinstance(error, RemoteError)
        assert (error.index, error.type_name) == (i, "ValueError")
        assert f"cannot handle {i}" in str(error)


def test_errors_raise_is_the_default() -> None:
    with pytest.raises(RemoteError) as info:
        reject.with_options(workers=3)(list(range(30)), [17])
    assert info.value.index == 17


# -- crashes and faults on the wire ------------------------------------------------------------


def test_a_local_worker_killed_mid_run_loses_nothing() -> None:
    assert square([1]) == [1]  # the pool is up
    pool = _pool._pool
    assert pool is not None and len(pool.pids) >= 2
    victim = pool.pids[0]
    items = [0.02 + i * 1e-6 for i in range(300)]  # distinct values: order is checked
    f = sleepy.with_options(workers=20, chunk_size=1)
    future = f.submit(items)
    time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)
    assert future.result(60) == items
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (victim in pool.pids or len(pool.pids) < 2):
        time.sleep(0.05)
    assert victim not in pool.pids and len(pool.pids) == 2  # replaced without a new call
    assert square([2, 3]) == [4, 9]


@pytest.fixture(scope="module")
def plain_worker() -> Iterator[int]:
    port = free_port()
    args = ["uvicorn", "tests.apps.faulty_app:app", "--port", str(port), "--log-level", "warning"]
    with server(args, port, FAULT_503_RATE="0"):
        yield port


@pytest.fixture(scope="module")
def overloaded_workers() -> Iterator[list[int]]:
    """Two workers that refuse a fifth of their requests: one with 503, one with 429."""
    ports = [free_port(), free_port()]
    args = ["uvicorn", "tests.apps.faulty_app:app", "--log-level", "warning", "--port"]
    with (
        server([*args, str(ports[0])], ports[0], FAULT_503_RATE="0.2"),
        server([*args, str(ports[1])], ports[1], FAULT_503_RATE="0.2", FAULT_STATUS="429"),
    ):
        yield ports


@pytest.mark.parametrize("status, worker", [(503, 0), (429, 1)])
def test_a_fifth_of_requests_refused_loses_nothing(
    overloaded_workers: list[int], reset_settings: None, status: int, worker: int
) -> None:
    serverless.init(secret=SECRET)
    url = f"http://127.0.0.1:{overloaded_workers[worker]}/serverless"
    f = square.with_options(url=url, workers=20, chunk_size=5, retries=8)
    out, stats = f.with_stats(list(range(2000)))
    assert out == [n * n for n in range(2000)]
    assert stats.retries >= 40  # ~100 of ~500 requests were refused, and retried


def test_connections_reset_mid_response_lose_nothing(
    plain_worker: int, reset_settings: None
) -> None:
    serverless.init(secret=SECRET)
    with ResetProxy(plain_worker, rate=0.1, seed=4) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/serverless"
        f = square.with_options(url=url, workers=10, chunk_size=5, retries=8)
        out, stats = f.with_stats(list(range(1500)))
    assert out == [n * n for n in range(1500)]
    # a reset before any byte of an answer on a kept-alive connection is sent again at once
    # (signed anew); any other costs a retry
    assert proxy.resets > 0 and 0 < stats.retries <= proxy.resets


def load(chunks: int, lb: str) -> None:
    f = square.with_options(url=f"{lb}/serverless", workers=50, chunk_size=1, retries=8)
    out, stats = f.with_stats(range(chunks))  # a generator-like input: streamed
    assert out == [n * n for n in range(chunks)]
    assert stats.count == stats.count_out == chunks and stats.retries > 0


def test_load_through_a_balancer_with_faults(
    overloaded_workers: list[int], tmp_path: Path, reset_settings: None
) -> None:
    """2,000 one-item chunks through HAProxy to two workers answering 20% 503 (the slow
    test `test_load_10000_chunks` runs 10,000)."""
    serverless.init(secret=SECRET)
    with haproxy(overloaded_workers, free_port(), tmp_path) as lb:
        load(2000, lb)


@pytest.mark.slow
def test_load_10000_chunks(
    overloaded_workers: list[int], tmp_path: Path, reset_settings: None
) -> None:
    serverless.init(secret=SECRET)
    with haproxy(overloaded_workers, free_port(), tmp_path) as lb:
        load(10_000, lb)


# -- secrets -----------------------------------------------------------------------------------


def test_secrets_never_reach_logs_or_error_messages(
    plain_worker: int, caplog: pytest.LogCaptureFixture, reset_settings: None
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-workers-secret-9f8e7d6c5b4a"
    url = f"http://127.0.0.1:{plain_worker}/serverless"
    errors: list[ServerlessError] = []
    for secret in (wrong, SECRET):
        serverless.init(secret=[secret, "another-secret-for-rotation-0000"])
        try:
            reject.with_options(url=url, workers=2)(list(range(10)), [5])
        except ServerlessError as exc:
            errors.append(exc)
    assert [type(e).__name__ for e in errors] == ["RequestRejected", "RemoteError"]
    text = caplog.text + "".join(f"{e}{e!r}{e.__cause__}" for e in errors)
    for secret in (wrong, SECRET, "another-secret-for-rotation-0000"):
        assert secret not in text
