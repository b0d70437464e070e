"""Issue 22: every exit of the user's code (sys.exit(), KeyboardInterrupt, a CancelledError or
GeneratorExit of its own, an exception whose str() raises) reaches the caller as a signed
RemoteError, on real servers, and the worker process that ran it serves the next call. They
reached the caller as ProtocolError: an unsigned 500 from the server ("a forged answer")."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import serverless
from serverless import RemoteError
from tests import sample_functions as sf
from tests.conftest import SECRET, free_port, server
from tests.sample_functions import EXITS

pytestmark = pytest.mark.timeout(120)

GUNICORN = ["gunicorn", "-k", "sync", "-w", "1", "--no-control-socket", "--log-level", "warning"]
WORKER = ["serverless._cli", "worker", "tests.sample_functions", "--log-level", "warning"]


def _exits_fail_and_the_worker_serves_on(f: Any, how: str, workers: int = 1) -> None:
    f = f.with_options(chunk_size=10, retries=0, workers=workers)
    before = set(sf.pids.with_options(workers=workers)(list(range(workers * 4))))
    with pytest.raises(RemoteError) as info:
        f(list(range(20)), 13, how)
    error = info.value
    assert (error.type_name, error.message, error.index) == (*EXITS[how], 13)
    assert f(list(range(20)), 99, how) == list(range(20))
    assert set(sf.pids.with_options(workers=workers)(list(range(workers * 4)))) == before


@pytest.mark.usefixtures("reset_settings")
@pytest.mark.parametrize("how", list(EXITS))
@pytest.mark.parametrize("f", [sf.exits_on, sf.async_exits_on], ids=["sync", "async"])
def test_on_the_local_pool(f: Any, how: str) -> None:
    _exits_fail_and_the_worker_serves_on(f, how, workers=2)


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    """`serverless worker` (uvicorn, one process): async functions on its event loop."""
    port = free_port()
    with server([*WORKER, "--port", str(port)], port):
        yield f"http://127.0.0.1:{port}/serverless"


@pytest.fixture(scope="module")
def sync_gunicorn() -> Iterator[str]:
    """Flask under gunicorn's sync worker: chunks run in the process's main thread, where
    gunicorn's signal handlers are installed."""
    port = free_port()
    with server([*GUNICORN, "-b", f"127.0.0.1:{port}", "tests.apps.flask_app:app"], port):
        yield f"http://127.0.0.1:{port}/serverless"


@pytest.mark.usefixtures("reset_settings")
@pytest.mark.parametrize("how", list(EXITS))
@pytest.mark.parametrize("f", [sf.exits_on, sf.async_exits_on], ids=["sync", "async"])
def test_on_serverless_worker(worker: str, f: Any, how: str) -> None:
    serverless.init(secret=SECRET, url=worker)
    _exits_fail_and_the_worker_serves_on(f, how)


@pytest.mark.usefixtures("reset_settings")
@pytest.mark.parametrize("how", list(EXITS))
@pytest.mark.parametrize("f", [sf.exits_on, sf.async_exits_on], ids=["sync", "async"])
def test_in_the_main_thread_of_a_sync_gunicorn_worker(sync_gunicorn: str, f: Any, how: str) -> None:
    serverless.init(secret=SECRET, url=sync_gunicorn)
    _exits_fail_and_the_worker_serves_on(f, how)


@pytest.mark.usefixtures("reset_settings")
def test_a_signal_to_the_server_mid_chunk_is_still_the_servers(sync_gunicorn: str) -> None:
    """gunicorn's SIGINT handler leaves by sys.exit() from inside the chunk's frames: that
    exit is the server's, so the worker process still stops (the arbiter starts another),
    and the caller is told the worker went away, not that its function failed."""
    serverless.init(secret=SECRET, url=sync_gunicorn)
    (pid,) = sf.pids.with_options(workers=1)([0])
    errors: list[BaseException] = []

    def call() -> None:
        try:
            sf.sleepy.with_options(workers=1, retries=0)([5.0])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGINT)
    thread.join(30)
    assert len(errors) == 1 and not isinstance(errors[0], RemoteError), errors
    deadline = time.monotonic() + 30
    while True:  # the arbiter's next worker serves
        with contextlib.suppress(serverless.WorkerUnavailable):
            (new,) = sf.pids.with_options(workers=1)([0])
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert new != pid
