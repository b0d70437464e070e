"""Flow control and hedging with real parts (issue 15.3, 15.5): a uvicorn worker with N
threads, the local pool with a frozen (SIGSTOPped) process, a slow item among short ones."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import serverless
from serverless._caller.dispatch import dispatcher
from serverless._caller.flow import Capacities
from serverless._pool import pool as _pool
from tests.conftest import SECRET, free_port, server
from tests.sample_functions import sleepy, square, stamped

THREADS = 16


@pytest.fixture(scope="module")
def declaring_worker() -> Iterator[str]:
    """One worker process with 16 threads that says so on its replies."""
    port = free_port()
    args = ["uvicorn", "--factory", "tests.apps.capacity_app:app", "--port", str(port)]
    env = {"SERVERLESS_THREADS": str(THREADS), "SERVERLESS_MODULES": "tests.sample_functions"}
    with server([*args, "--log-level", "warning"], port, **env):
        yield f"http://127.0.0.1:{port}/serverless"


@pytest.mark.serial  # a ratio or bound of wall times: run alone
@pytest.mark.usefixtures("reset_settings")
def test_more_workers_than_the_target_has_threads_costs_no_time(declaring_worker: str) -> None:
    serverless.init(secret=SECRET)
    # 320 items of 50 ms: 16 chunks run in one round (1 s); 20 chunks on 16 threads took two
    # rounds (1.6 s) before the caller learned the worker's capacity
    items = [0.05] * 320
    f = sleepy.with_options(url=declaring_worker)
    f.with_options(workers=THREADS)([0.0] * THREADS)  # the first call learns the capacity
    started = time.perf_counter()
    assert f.with_options(workers=THREADS)(items) == items
    fitted = time.perf_counter() - started
    started = time.perf_counter()
    out, stats = f.with_options(workers=20).with_stats(items)
    wider = time.perf_counter() - started
    assert out == items and stats.retries == 0
    assert wider < 1.1 * fitted, (wider, fitted)


@pytest.mark.serial  # a ratio or bound of wall times: run alone
@pytest.mark.usefixtures("reset_settings")
def test_a_first_call_with_more_workers_than_threads_costs_little(declaring_worker: str) -> None:
    """Nothing learned yet (a fresh caller): 100 chunks on 16 threads. The worker refuses at
    once what would wait beyond a round (signed, with its capacity) instead of after the 1 s
    start_by budget: then such a first call took 20% longer than one with workers=16."""
    serverless.init(secret=SECRET)
    items = [0.25] * 160
    f = sleepy.with_options(url=declaring_worker)
    walls: dict[int, list[float]] = {}
    for workers in (THREADS, 100, THREADS, 100):
        dispatcher().capacities = Capacities()  # a caller that knows nothing of the worker
        started = time.perf_counter()
        assert f.with_options(workers=workers)(items) == items  # refusals ran nothing
        walls.setdefault(workers, []).append(time.perf_counter() - started)
    assert min(walls[100]) < 1.25 * min(walls[THREADS]), walls


@pytest.mark.serial  # a ratio or bound of wall times: run alone
def test_one_slow_item_among_400_costs_no_more_than_itself() -> None:
    items = [0.01] * 400
    items[0] = 4.0  # the head of the line: the others must not wait behind it
    f = sleepy.with_options(workers=10, chunk_size=1, idempotent=True)
    assert square([1]) == [1]  # the pool is up
    started = time.perf_counter()
    out, stats = f.with_stats(items)
    wall = time.perf_counter() - started
    assert out == items
    longest = max(c.end - c.start for c in stats.chunks)
    assert wall < 1.1 * longest, (wall, longest)


@pytest.mark.serial  # a ratio or bound of wall times: run alone
def test_a_frozen_local_worker_is_hedged_around() -> None:
    assert square([1]) == [1]  # the pool is up
    pool = _pool._pool
    assert pool is not None and len(pool.pids) >= 2
    victim = pool.pids[0]
    thaw = threading.Timer(6.0, os.kill, (victim, signal.SIGCONT))
    os.kill(victim, signal.SIGSTOP)
    thaw.start()
    try:
        items = [0.01] * 200
        f = sleepy.with_options(workers=20, chunk_size=1, idempotent=True, timeout=30)
        started = time.perf_counter()
        out, stats = f.with_stats(iter(items))
        wall = time.perf_counter() - started
    finally:  # the call is over: no need to keep it frozen the full 6 s
        thaw.cancel()
        os.kill(victim, signal.SIGCONT)
    assert out == items
    assert stats.hedges > 0 and wall < 3, (stats.hedges, wall)


@pytest.fixture(scope="module")
def narrow_worker() -> Iterator[str]:
    """One worker process with 2 threads: many concurrent callers find it busy."""
    yield from _narrow_worker()


@pytest.fixture
def fresh_narrow_worker() -> Iterator[str]:
    yield from _narrow_worker()


def _narrow_worker() -> Iterator[str]:
    port = free_port()
    args = ["uvicorn", "--factory", "tests.apps.capacity_app:app", "--port", str(port)]
    env = {"SERVERLESS_THREADS": "2", "SERVERLESS_MODULES": "tests.sample_functions"}
    with server([*args, "--log-level", "warning"], port, **env):
        yield f"http://127.0.0.1:{port}/serverless"


@pytest.mark.usefixtures("reset_settings")
def test_a_busy_refusal_is_a_wait_never_a_failure(narrow_worker: str, tmp_path: Path) -> None:
    """Issue 22.10: 8 callers at once, each 10 chunks in flight, on a worker with 2 threads.
    Its signed "busy" refusals (nothing ran) are waited out whatever `retries` says, and each
    item runs once, counted on the worker. Before, they counted as pushbacks, then retries:
    calls failed with "the worker is busy (it runs 2 at once)"."""
    serverless.init(secret=SECRET)
    log = tmp_path / "starts"
    failures: list[BaseException] = []
    lock = threading.Lock()

    def caller(k: int) -> None:
        retries = (0, 1, 3)[k % 3]
        f = stamped.with_options(url=narrow_worker, workers=10, retries=retries, deadline=120)
        items = list(range(k * 1000, k * 1000 + 40))
        try:
            assert f(items, str(log), 0.02) == items
        except BaseException as exc:  # reported below
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures[:3]
    starts = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(starts) == sorted(str(k * 1000 + n) for k in range(8) for n in range(40))


@pytest.mark.usefixtures("reset_settings")
def test_a_call_refused_busy_for_its_patience_ends(fresh_narrow_worker: str) -> None:
    """Both threads of the worker held (8 s each: as good as hung for this call): a call's
    chunks are refused busy and waited out, but not forever: after `patience=` seconds with
    none answered the call raises, naming the refusal (a wait with no deadline= never ended)."""
    serverless.init(secret=SECRET)
    narrow_worker = fresh_narrow_worker
    holder = sleepy.with_options(url=narrow_worker, workers=2, chunk_size=1)
    held = holder.submit([8.0, 8.0])
    try:
        time.sleep(1.0)  # both threads taken
        f = square.with_options(url=narrow_worker, patience=2)
        started = time.monotonic()
        with pytest.raises(serverless.WorkerUnavailable, match="busy for 2s"):
            f([1, 2, 3])
        assert time.monotonic() - started < 5
    finally:
        held.result(30)
