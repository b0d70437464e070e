"""The local pool's lifetime (issue 15, parts 5 and 6): one pool per process whatever thread
calls, its workers dying only with the process, and a frozen worker replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from serverless import _targets
from serverless._pool import pool as _pool
from tests import sample_functions as sf
from tests.integration.test_local_pool import _alive, run_script

pytestmark = pytest.mark.timeout(60)

THREADS_SCRIPT = """
import threading, time
import serverless
from serverless import _config
from serverless._pool import pool as _pool
from tests import sample_functions as sf

_config.configure(local_processes=2)
seen = set()

def call():
    seen.update(sf.pids(list(range(8))))
    seen.update(_pool._pool.pids)

if __name__ == "__main__":
    for _ in range(30):  # a thread-per-request server: each call on a thread that then exits
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
        time.sleep(0.02)  # time for a parent-death signal to land, had one been sent
    print("SEEN", len(seen), flush=True)
    print("PIDS", " ".join(str(pid) for pid in _pool._pool.pids), flush=True)
    time.sleep(60)
"""


def test_calls_from_short_lived_threads_keep_the_same_two_workers(tmp_path: Path) -> None:
    """Before: the first call's thread spawned the workers, and PR_SET_PDEATHSIG (per thread)
    killed both when it exited: 30 calls from 30 threads saw a new pair of workers each time.
    The workers still die with the process: SIGKILL of the caller leaves no orphan."""
    proc = run_script(tmp_path, THREADS_SCRIPT, "wait")
    assert proc.stdout is not None
    try:
        lines: dict[str, str] = {}
        while "PIDS" not in lines:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            key, _, rest = line.partition(" ")
            lines[key] = rest.strip()
        assert lines["SEEN"] == "2"  # the same two worker processes served all 30 calls
        pids = [int(p) for p in lines["PIDS"].split()]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)], "orphaned local workers"


def test_a_frozen_worker_is_replaced_and_calls_stop_paying_its_timeout() -> None:
    """Before: after SIGSTOP of one local worker, every call paid the full timeout on it,
    forever. The pool's probe kills and replaces it within a few seconds."""
    pool = _pool.LocalPool(2, 4, ["tests.sample_functions"])
    pool.start()
    frozen = pool.pids[0]
    os.kill(frozen, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        while frozen in pool.pids and time.monotonic() - stopped < 15:
            time.sleep(0.05)
        replaced_after = time.monotonic() - stopped
        assert frozen not in pool.pids and len(pool.pids) == 2
        assert replaced_after < _pool.FROZEN_AFTER + 3 * (_pool.WATCH_INTERVAL + 1)
        assert not _alive(frozen)
        fn = sf.pids.with_options(timeout=5, workers=4)
        target = pool.target()
        for _ in range(4):
            started = time.monotonic()
            with _targets.override(target):
                served = set(fn(list(range(8))))
            assert time.monotonic() - started < 2.5  # not the 5 s timeout
            assert served == set(pool.pids)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
            os.kill(frozen, signal.SIGKILL)
        pool.close()


def test_a_silent_worker_burning_cpu_is_busy_not_frozen() -> None:
    """Before: a worker whose event loop could not answer probes for 3 s was killed, busy or
    not (W4 on 2 cores: loops starved of the GIL by CPU-bound threads), and the call failed on
    its dead URL. A silent worker whose CPU time grows is left alone; SIGSTOP still is not."""
    pool = _pool.LocalPool(1, 2, ["tests.sample_functions"])
    pool.start()
    try:
        worker = pool.pids[0]
        target = pool.target()
        fn = sf.burn_on_the_loop.with_options(timeout=30, retries=0)
        with _targets.override(target):
            assert fn([_pool.FROZEN_AFTER + 2]) == [worker]
        assert pool.pids == [worker]
    finally:
        pool.close()
