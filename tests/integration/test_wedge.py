"""No fan-out wedges an app (issue 15, part 4): nested calls, and calls from request handlers
of an app whose threads are all busy, complete; the app keeps answering and stops on SIGTERM.

Before: /nested (a parallel function whose chunks call another, default workers=100) hung
under gunicorn gthread 2x16 and under uvicorn, and four concurrent parents on gunicorn 1x4
wedged the app: every thread waited on chunks queued behind it.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import TESTS, free_port, serving, test_env

GRACE = 5

SERVERS = {
    "gthread-2x16": ["gunicorn", "-k", "gthread", "-w", "2", "--threads", "16"],
    "gthread-1x4": ["gunicorn", "-k", "gthread", "-w", "1", "--threads", "4"],
    "uvicorn": ["uvicorn"],
}


@contextmanager
def app_server(kind: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    if kind == "uvicorn":
        args = ["uvicorn", "--port", str(port), "--log-level", "warning", "--no-access-log"]
        args += ["--timeout-graceful-shutdown", str(GRACE), "tests.apps.fastapi_app:app"]
    else:
        args = [*SERVERS[kind], "-b", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACE)]
        args += ["--no-control-socket", "--log-level", "warning", "tests.apps.flask_app:app"]
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        env=test_env(),
        cwd=TESTS.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with serving(proc, port, grace=30):
        yield f"http://127.0.0.1:{port}", proc


def get(url: str, timeout: float) -> object:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # the app's JSON error
        return json.loads(exc.read())


def campaign(kind: str, rounds: int, parents: int, n: int = 100) -> None:
    """`rounds` times, `parents` concurrent /nested requests; the app answers /pid meanwhile
    and stops on SIGTERM within its graceful timeout. On gunicorn 1x4 a parent that would take
    the app's last thread fails at once, saying why, and the app answers at once meanwhile."""
    with app_server(kind) as (base, proc):
        get(base + "/pid", 20)
        expected = [i + 20 for i in range(n)]
        with concurrent.futures.ThreadPoolExecutor(parents + 1) as pool:
            for _ in range(rounds):
                started = time.monotonic()
                calls = [pool.submit(timed, f"{base}/nested?n={n}") for _ in range(parents)]
                time.sleep(0.2)  # the parents are in
                pinged = time.monotonic()
                assert isinstance(get(base + "/pid", 30), int)  # the app still answers
                answered = time.monotonic() - pinged
                outcomes = [call.result(timeout=60) for call in calls]
                done = [wall for result, wall in outcomes if result == expected]
                refused = [(r, wall) for r, wall in outcomes if r != expected]
                for result, wall in refused:  # failed fast, naming the cause and the fix
                    assert isinstance(result, dict), result
                    assert "request threads already wait on parallel calls" in result["error"]
                    assert "--threads" in result["error"] and wall < 5
                if kind == "gthread-1x4":
                    assert len(done) >= 3 and answered < 2, (outcomes, answered)
                else:
                    assert not refused and answered < 30, (outcomes, answered)
                assert time.monotonic() - started < 60
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        proc.wait(GRACE + 10)
        assert time.monotonic() - started < GRACE + 2


def timed(url: str) -> tuple[object, float]:
    started = time.monotonic()
    return get(url, 60), time.monotonic() - started


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["gthread-2x16", "uvicorn"])
def test_nested_calls_with_default_options_complete(kind: str) -> None:
    campaign(kind, rounds=1, parents=2)


@pytest.mark.timeout(120)
def test_four_parents_on_a_four_thread_app_leave_it_answering() -> None:
    campaign("gthread-1x4", rounds=1, parents=4)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["gthread-2x16", "uvicorn", "gthread-1x4"])
def test_campaign_ten_runs_of_ten(kind: str) -> None:
    for _ in range(10):
        campaign(kind, rounds=1, parents=10 if kind != "gthread-1x4" else 4)
