"""Issue 15 with real servers: a worker never starts a chunk its caller no longer wants, a hung
worker says so on its health route, a retries=0 chunk runs once when its worker process dies
mid-chunk, and the CPU gate does not hold a short chunk behind long ones. Executions are
counted on the worker side, per item (tests/sample_functions.py, `_record_item`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

import serverless
from serverless import ServerlessError, WorkerTimeout, WorkerUnavailable
from tests import sample_functions as sf
from tests.conftest import SECRET
from tests.integration.test_serve import get, worker


@pytest.fixture
def calls(tmp_path: Path, reset_settings: None) -> Path:
    serverless.init("/serverless", SECRET)
    path = tmp_path / "calls"
    path.touch()
    return path


def test_no_chunk_starts_after_its_call_has_given_up(calls: Path) -> None:
    """8 one-second items on a 2-thread worker, timeout=1.5, retries=3: 26 executions, 12 of
    them after the call had raised. Each chunk now carries its deadline and start_by: the
    worker refuses what it cannot start in time, and drops what its caller hung up on. (The
    caller now also keeps no more in flight than the worker's 2 threads, so the call would
    succeed in ~4 s: its deadline of 2.5 s makes it give up with work still queued.)"""
    with worker("--threads", "2", SERVERLESS_TEST_CALLS=str(calls)) as (_, base):
        f = sf.counted_sleep.with_options(
            url=f"{base}/serverless", timeout=1.5, retries=3, deadline=2.5
        )
        items = [1.0 + n / 1000 for n in range(8)]
        with pytest.raises(ServerlessError):
            f(items)
        ended = time.time()
        time.sleep(2.0)  # anything still queued on the worker would start by now
    starts = [t for ts in sf.executions(str(calls), "counted_sleep").values() for t in ts]
    assert starts and not [t for t in starts if t > ended], sorted(starts)
    # each of the 2 threads starts a one-second item at most once a second while the call runs
    assert len(starts) <= 2 * math.ceil(ended - min(starts)) + 2, sorted(starts)


def test_a_worker_whose_threads_are_all_stuck_reports_not_ready(calls: Path) -> None:
    """Four hanging chunks on --threads 4: /healthz answered 200 while no chunk could run."""
    with worker("--threads", "4") as (_, base):
        assert get(f"{base}/healthz")[0] == 200
        f = sf.counted_sleep.with_options(url=f"{base}/serverless", timeout=0.5, retries=0)
        started = time.monotonic()
        with pytest.raises(WorkerTimeout):
            f([2.5, 2.501, 2.502, 2.503])
        status, _, body = get(f"{base}/healthz")
        assert (status, body[:5]) == (503, b"stuck")
        while time.monotonic() - started < 15 and get(f"{base}/healthz")[0] != 200:
            time.sleep(0.2)
        assert get(f"{base}/healthz")[0] == 200  # the chunks ended: ready again
        assert time.monotonic() - started > 2.0


def test_three_stuck_of_four_threads_is_still_ready(calls: Path) -> None:
    with worker("--threads", "4") as (_, base):
        f = sf.counted_sleep.with_options(url=f"{base}/serverless", timeout=0.3, retries=0)
        with pytest.raises(WorkerTimeout):
            f([2.0, 2.001, 2.002])
        assert get(f"{base}/healthz")[0] == 200


def test_retries_0_runs_once_when_the_worker_process_dies_mid_chunk(
    calls: Path, tmp_path: Path
) -> None:
    """Behind `serverless worker --processes 2`, a retries=0 chunk ran twice when its process
    was SIGKILLed mid-chunk: the client resent it on a fresh connection to the other one."""
    with worker("--processes", "2", SERVERLESS_TEST_CALLS=str(calls)) as (_, base):
        url = f"{base}/serverless"
        assert sf.square.with_options(url=url)([1, 2]) == [1, 4]  # a kept-alive connection
        f = sf.die_once.with_options(url=url, retries=0)
        with pytest.raises(WorkerUnavailable):
            f([7], str(tmp_path / "marker"))
    assert {k: len(v) for k, v in sf.executions(str(calls), "die_once").items()} == {"7": 1}


@pytest.mark.parametrize("long", [-3.0, 2.0], ids=["sleeping", "cpu-bound"])
def test_the_cpu_gate_does_not_hold_a_short_chunk_behind_long_ones(
    calls: Path, long: float
) -> None:
    """Once the gate learned the function was CPU-bound, a 10 ms chunk waited 14.5 s behind
    two 15 s chunks on a 16-thread worker with 14 threads idle."""
    with worker("--threads", "16") as (_, base):
        f = sf.burn_or_sleep.with_options(url=f"{base}/serverless", retries=0)
        f([0.3])  # the gate learns: CPU-bound, two at once
        running = f.with_options(chunk_size=1).submit([long, long + 0.001])
        time.sleep(0.3)
        started = time.perf_counter()
        assert f([0.01]) == [0.01]
        waited = time.perf_counter() - started
        assert waited < 1.5, waited
        running.result(30)
