"""`serverless worker` and the worker_asgi / worker_wsgi factories, served by real servers."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import serverless
from tests import sample_functions as sf
from tests.conftest import SECRET, TESTS, free_port, serving, test_env

MODULE = "tests.sample_functions"


@contextlib.contextmanager
def worker(*args: str, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`serverless worker` on a free port; yields the process and its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "serverless._cli", "worker", MODULE, "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, env=test_env(**env), cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    with serving(proc, port, grace=15):
        yield proc, f"http://127.0.0.1:{port}"


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def caller(reset_settings: None) -> None:
    serverless.init("/serverless", SECRET)


def test_worker_serves_signed_calls_and_a_health_route_that_reveals_nothing(caller: None) -> None:
    with worker() as (_, base):
        square = sf.square.with_options(url=f"{base}/serverless", workers=4)
        assert square(list(range(20)), 1) == [n * n + 1 for n in range(20)]
        status, headers, body = get(f"{base}/healthz")
        assert (status, body) == (200, b"ok")
        assert {k.lower() for k in headers} <= {
            "content-type",
            "content-length",
            "date",
            "connection",
        }
        assert get(f"{base}/healthz", "HEAD")[::2] == (200, b"")
        assert get(f"{base}/_ah/warmup")[::2] == (200, b"ok")  # App Engine's warmup request
        assert get(f"{base}/healthz", "POST")[0] == 405
        assert get(f"{base}/")[0] == 404
        assert get(f"{base}/serverless")[0] == 405  # the route takes signed POSTs only
        wrong = serverless.parallel(url=f"{base}/serverless")(sf.square.__wrapped__)  # type: ignore[attr-defined]
        serverless.init("/serverless", "another-secret-0123456789abcdef")
        with pytest.raises(serverless.RequestRejected) as info:
            wrong([1])
        assert info.value.status == 401


def test_worker_route_and_health_options(caller: None) -> None:
    with worker("--route", "/jobs", "--health", "/ready") as (_, base):
        serverless.init("/jobs", SECRET)
        assert sf.square.with_options(url=f"{base}/jobs")([3]) == [9]
        assert get(f"{base}/ready")[::2] == (200, b"ok")
        assert get(f"{base}/healthz")[0] == 404


def test_processes_run_under_uvicorns_supervisor(caller: None) -> None:
    with worker("--processes", "2", "--threads", "4") as (proc, base):
        pids = sf.pids.with_options(url=f"{base}/serverless", workers=8)
        served_by = set(pids(list(range(40))))
        children = _children(proc.pid)
        # Which process accepts a connection is up to the kernel, so which served is not
        # asserted; that there are two server processes under the supervisor is.
        assert len(children) == 2 and served_by <= children


def _children(pid: int) -> set[int]:
    """Server processes started by `pid` (uvicorn's supervisor), from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and "spawn_main" in (stat.parent / "cmdline").read_text():
                found.add(int(stat.parent.name))
    return found


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sigterm_finishes_in_flight_chunks(caller: None, processes: str) -> None:
    with worker("--graceful-timeout", "30", "--processes", processes) as (proc, base):
        sleepy = sf.sleepy.with_options(url=f"{base}/serverless", workers=4, retries=0)
        assert sleepy([0.0]) == [0.0]  # a server process is up and accepting
        result: dict[str, Any] = {}

        def call() -> None:
            try:
                result["value"] = sleepy([1.5] * 4)
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.6)  # the four chunks are running
        proc.send_signal(signal.SIGTERM)
        thread.join(20)
        assert result == {"value": [1.5] * 4}
        assert proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it got
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "Waiting for" in output or "Finished server process" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "0"], "at least 1"),
        (["--route", "nope"], "route must be a path"),
        (["--health", "/serverless"], "health route"),
    ],
)
def test_worker_refuses_bad_options(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serverless._cli", "worker", MODULE, "--port", "9", *args],
        env=test_env(),
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_worker_needs_a_secret_and_importable_modules() -> None:
    run = [sys.executable, "-m", "serverless._cli", "worker", "--port", "9"]
    no_secret = subprocess.run(
        [*run, MODULE], env=test_env(SERVERLESS_SECRET=""), capture_output=True, text=True
    )
    assert no_secret.returncode == 2 and "SERVERLESS_SECRET" in no_secret.stderr
    missing = subprocess.run(
        [*run, "no_such_module_here"], env=test_env(), capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no_such_module_here" in missing.stderr
    none = subprocess.run(run, env=test_env(SERVERLESS_MODULES=""), capture_output=True, text=True)
    assert none.returncode == 2 and "SERVERLESS_MODULES" in none.stderr


@pytest.mark.parametrize(
    "server",
    [
        ["uvicorn", "--factory", "serverless:worker_asgi"],
        ["gunicorn", "-k", "gthread", "-w", "2", "--threads", "4", "serverless:worker_wsgi()"],
    ],
    ids=["uvicorn-asgi", "gunicorn-wsgi"],
)
def test_factories_give_one_line_server_commands(caller: None, server: list[str]) -> None:
    port = free_port()
    bind = ["--port", str(port)] if server[0] == "uvicorn" else ["--bind", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", *server, *bind],
        env=test_env(SERVERLESS_MODULES=MODULE),
        cwd=TESTS.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    with serving(proc, port, grace=15):
        base = f"http://127.0.0.1:{port}"
        assert sf.square.with_options(url=f"{base}/serverless")([1, 2, 3]) == [1, 4, 9]
        assert get(f"{base}/healthz")[::2] == (200, b"ok")


def test_factories_read_the_environment(monkeypatch: pytest.MonkeyPatch, caller: None) -> None:
    monkeypatch.delenv("SERVERLESS_MODULES", raising=False)
    with pytest.raises(serverless.ConfigurationError, match="SERVERLESS_MODULES"):
        serverless.worker_asgi()
    monkeypatch.setenv("SERVERLESS_MODULES", MODULE)
    monkeypatch.setenv("SERVERLESS_THREADS", "lots")
    with pytest.raises(serverless.ConfigurationError, match="SERVERLESS_THREADS"):
        serverless.worker_asgi(secret=SECRET)
    monkeypatch.setenv("SERVERLESS_THREADS", "3")
    assert serverless.worker_asgi(secret=SECRET).threads == 3
    assert serverless.worker_wsgi(route="/x", secret=SECRET).endpoint.route == "/x"


def test_wsgi_health_route_in_process(caller: None) -> None:
    """The WSGI twin of the health route, called directly (no server needed for this)."""
    app = serverless.worker_wsgi([MODULE], secret=SECRET)
    for method, path, status, body in [
        ("GET", "/healthz", "200 OK", b"ok"),
        ("HEAD", "/healthz", "200 OK", b""),
        ("GET", "/_ah/warmup", "200 OK", b"ok"),
        ("POST", "/healthz", "405 Method Not Allowed", b""),
        ("GET", "/elsewhere", "404 Not Found", b""),
    ]:
        seen: list[str] = []
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "SERVER_NAME": "x"}
        environ["SERVER_PORT"] = "80"
        chunks = app(environ, lambda s, h, seen=seen: seen.append(s))
        assert (seen, b"".join(chunks)) == ([status], body), (method, path)
