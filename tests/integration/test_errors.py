"""Common mistakes, each performed with real parts, get errors that say what to fix (issue 23,
item 5): a wrong secret, a skewed clock, a URL without the route or with another one, a
function the worker does not know, a 429 from a common HTTP client inside the function, and a
call made while serving a request on a server that cannot take its own chunks."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import serverless
from tests import error_functions as ef
from tests import sample_functions as sf
from tests.conftest import SECRET, free_port, serving, test_env

pytestmark = pytest.mark.timeout(90)

WRONG = "another-secret-0123456789"


def _worker(clock_shift: float = 0.0) -> Iterator[str]:
    """`serverless worker tests.sample_functions` on a free port, its clock `clock_shift`
    seconds ahead of this machine's; yields its base URL (no route)."""
    port = free_port()
    shift = (
        f"import time; _t = time.time; time.time = lambda: _t() + {clock_shift}; "
        if clock_shift
        else ""
    )
    code = (
        f"{shift}import sys; from serverless._cli import main; "
        f"sys.exit(main(['worker', 'tests.sample_functions', '--port', '{port}']))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=test_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with serving(proc, port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    yield from _worker()


def _refusal(url: str, secret: str = SECRET, step: Any = sf.square) -> str:
    serverless.init(secret=secret, url=url)
    with pytest.raises(serverless.RequestRejected) as info:
        step(list(range(4)))
    return str(info.value)


def test_a_wrong_secret_names_the_secret_and_where_to_set_it(
    worker: str, reset_settings: None
) -> None:
    message = _refusal(worker + "/serverless", WRONG)
    assert "wrong or missing secret" in message
    assert "serverless.init(secret=...)" in message and "$SERVERLESS_SECRET" in message
    assert "clock skew" in message.lower()  # the other cause of a 401, named too
    # the worker's own words, shown as a claim: the answer is not signed
    assert "unverified, says 'no signature with a known key id'" in message


def test_a_skewed_clock_is_named_as_clock_skew(reset_settings: None) -> None:
    for base in _worker(clock_shift=3600):
        message = _refusal(base + "/serverless")
        assert "clock skew" in message and "synchronise" in message
        assert "'timestamp outside the tolerance window'" in message


@pytest.mark.parametrize("path", ["", "/"])
def test_a_url_without_the_route_says_so_and_names_the_route(
    worker: str, path: str, reset_settings: None
) -> None:
    message = _refusal(worker + path)
    assert f"the URL {worker}{path} has no route" in message
    assert f"use {worker}/serverless" in message and "init(route=...)" in message


def test_a_url_with_another_route_names_its_path(worker: str, reset_settings: None) -> None:
    message = _refusal(worker + "/serverles")
    assert "nothing serves the worker route at '/serverles'" in message
    assert "default /serverless" in message


def test_a_function_the_worker_does_not_know_is_not_a_wrong_route(
    worker: str, reset_settings: None
) -> None:
    # the worker's signed 404: the route is right, the function is not registered there
    message = _refusal(worker + "/serverless", step=ef.fetch.partial("requests"))
    assert "'tests.error_functions:fetch' is not registered on this worker" in message
    assert "import tests.error_functions in the worker app" in message
    assert "route" not in message


def test_a_refused_connection_names_the_url(reset_settings: None) -> None:
    url = f"http://127.0.0.1:{free_port()}/serverless"  # nothing listens there
    serverless.init(secret=SECRET, url=url)
    with pytest.raises(serverless.WorkerUnavailable) as info:
        sf.square.with_options(retries=0)([1])
    assert url in str(info.value) and "nothing listens" in str(info.value)


# -- a 429 inside the function -------------------------------------------------------------------


@contextlib.contextmanager
def _throttling() -> Iterator[str]:
    """A real HTTP server that answers every GET 429 Too Many Requests."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/quota"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.mark.parametrize("client", ["requests", "urllib", "aiohttp"])
def test_a_429_from_a_common_client_points_to_throttled(client: str) -> None:
    # on the local pool, a parallel call whose function gets a 429 and raises the client's error
    with _throttling() as url, pytest.raises(serverless.RemoteError) as info:
        if client == "aiohttp":
            ef.afetch([url] * 4)
        else:
            ef.fetch([url] * 4, client)
    error = info.value
    assert error.status == 429
    assert "serverless.Throttled(retry_after=...)" in str(error) and "rate=" in str(error)
    assert error.type_name in ("HTTPError", "ClientResponseError")


def test_a_429_returned_in_place_points_to_throttled_too() -> None:
    with _throttling() as url:
        results = ef.fetch.with_options(errors="return")([url] * 2, "requests")
    assert all(isinstance(r, serverless.RemoteError) and r.status == 429 for r in results)
    assert "serverless.Throttled" in str(results[0])


# -- a call made while serving a request that cannot call back ----------------------------------


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a local pool's workers, if one was started)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
                if int(fields[1]) == pid:
                    found.append(int(entry))
    return found


def _get(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


@contextlib.contextmanager
def _app(args: list[str], port: int, **env: str) -> Iterator[tuple[str, list[bytes]]]:
    """A server (`python -m args`) on loopback; yields its base URL and its output so far."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        env=test_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log: list[bytes] = []
    assert proc.stdout is not None
    drain = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    drain.start()
    with serving(proc, port):
        yield f"http://127.0.0.1:{port}", log
    drain.join(10)


def _wait_for(log: list[bytes], text: str) -> str:
    deadline = time.monotonic() + 15
    while text not in b"".join(log).decode(errors="replace"):
        assert time.monotonic() < deadline, b"".join(log).decode(errors="replace")
        time.sleep(0.1)
    return b"".join(log).decode(errors="replace")


SYNC_GUNICORN = ["gunicorn", "-k", "sync", "-w", "1", "--no-control-socket"]


def test_gunicorns_sync_worker_raises_naming_the_fix_and_starts_no_pool() -> None:
    port = free_port()
    command = [*SYNC_GUNICORN, "-b", f"127.0.0.1:{port}", "tests.apps.flask_app:app"]
    with _app(command, port) as (base, log):
        status, _, _ = _get(base + "/square?n=8")
        pid = json.loads(_get(base + "/pid")[1])
        assert status == 500
        output = _wait_for(log, "ConfigurationError")
        assert "one request at a time" in output and "gunicorn -k gthread --threads" in output
        assert "SERVERLESS_URL" in output
        assert _children(pid) == []  # no local pool inside the web server's process


def test_gunicorns_sync_worker_uses_a_local_pool_when_configured_to() -> None:
    port = free_port()
    command = [*SYNC_GUNICORN, "-b", f"127.0.0.1:{port}", "tests.apps.flask_app:app"]
    with _app(command, port, SERVERLESS_URL="local") as (base, _):
        status, body, headers = _get(base + "/square?n=8")
        assert status == 200 and json.loads(body) == [n * n for n in range(8)]
        assert headers["X-Serverless-Target"] == "local"
        assert _children(json.loads(_get(base + "/pid")[1]))  # the pool it was told to start


def test_a_blocking_call_on_uvicorns_event_loop_raises_naming_aio_and_starts_no_pool() -> None:
    port = free_port()
    command = ["uvicorn", "--port", str(port), "tests.apps.errors_app:app"]
    with _app(command, port) as (base, _):
        status, body, _ = _get(base + "/blocking")
        assert status == 500, body
        assert "blocking call" in body and "await f.aio(items)" in body
        assert "SERVERLESS_URL" in body
        assert _children(json.loads(_get(base + "/pid")[1])) == []
