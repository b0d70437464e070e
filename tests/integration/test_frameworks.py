"""The worker route mounted in real Flask, Django and FastAPI apps, under real servers.

Flask and Django run under gunicorn's threaded workers (2 processes x 16 threads), FastAPI
under uvicorn, each on loopback. The test process calls them as a client would call a load
balancer (init(url=)); the apps' own views call back into themselves (the seed's
call-back-to-self).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any, cast

import pytest

import serverless
from tests import sample_functions as sf
from tests.conftest import SECRET, free_port, server
from tests.faults import Attacker

pytestmark = pytest.mark.timeout(60)

ROUTE = "/serverless"
GTHREAD = ["-k", "gthread", "--threads", "16", "-w", "2", "--graceful-timeout", "5"]
GUNICORN = ["gunicorn", *GTHREAD, "--no-control-socket", "--log-level", "warning"]
UVICORN = ["uvicorn", "--log-level", "warning", "--no-access-log"]
UVICORN += ["--timeout-graceful-shutdown", "5"]

APPS: dict[str, tuple[list[str], str, int]] = {
    # name: (server command, app, worker processes)
    "flask": (GUNICORN, "tests.apps.flask_app:app", 2),
    "django": (GUNICORN, "tests.apps.django_app:application", 2),
    "fastapi": (UVICORN, "tests.apps.fastapi_app:app", 1),
}


@dataclass
class App:
    name: str
    base: str  # http://127.0.0.1:port
    proc: Popen[bytes]
    pids: set[int]  # the server's worker processes

    @property
    def worker_url(self) -> str:
        return self.base + ROUTE


def get(url: str, timeout: float = 30) -> tuple[bytes, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read(), {k.lower(): v for k, v in response.headers.items()}


def pid_of(worker: str) -> int:
    """The pid in a worker id ("host:pid")."""
    return int(worker.rsplit(":", 1)[1])


def _serve(name: str) -> Iterator[App]:
    command, target, processes = APPS[name]
    port = free_port()
    bind = ["-b", f"127.0.0.1:{port}"] if command is GUNICORN else ["--port", str(port)]
    log: list[bytes] = []
    with server([*command, *bind, target], port) as proc:
        assert proc.stdout is not None
        # Drain the server's output so a full pipe never blocks it; closed once it exits.
        drain = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
        drain.start()
        base = f"http://127.0.0.1:{port}"
        # Wait until every worker process has booted and answers (each request is a new
        # connection, which any of them may accept), so all of them can take chunks.
        pids: set[int] = set()
        deadline = time.monotonic() + 20
        while len(pids) < processes:
            assert time.monotonic() < deadline, f"{name}: only {pids} answered: {log}"
            pids.add(json.loads(get(base + "/pid", timeout=10)[0]))
        assert proc.pid not in pids or processes == 1
        yield App(name, base, proc, pids)
    drain.join(10)
    proc.stdout.close()


@pytest.fixture(scope="module")
def flask_server() -> Iterator[App]:
    yield from _serve("flask")


@pytest.fixture(scope="module")
def django_server() -> Iterator[App]:
    yield from _serve("django")


@pytest.fixture(scope="module")
def fastapi_server() -> Iterator[App]:
    yield from _serve("fastapi")


@pytest.fixture(scope="module", params=list(APPS))
def app(request: pytest.FixtureRequest) -> App:
    return request.getfixturevalue(f"{request.param}_server")  # type: ignore[no-any-return]


@pytest.fixture
def caller(app: App, reset_settings: None) -> App:
    """This process sends chunks to the app's worker route, as to a load balancer."""
    serverless.init(ROUTE, SECRET, url=app.worker_url)
    return app


def test_chunks_run_on_the_apps_workers_complete_and_in_order(caller: App) -> None:
    items = list(range(1000))
    assert sf.square(items, 1, scale=2) == [(n * n + 1) * 2 for n in items]
    stats = sf.square.stats
    assert stats is not None
    assert (stats.workers, stats.count, stats.count_out, stats.target) == (100, 1000, 1000, "url")
    assert [c.index for c in stats.chunks] == list(range(100))
    assert [c.size for c in stats.chunks] == [10] * 100
    assert {c.url for c in stats.chunks} == {caller.worker_url}
    assert stats.compute_s > 0 and stats.retries == 0
    # every worker process of the server took chunks, and nothing ran in this process
    assert {pid_of(c.worker) for c in stats.chunks} == caller.pids
    assert stats.processes == len(caller.pids)


def test_a_view_calls_back_into_its_own_app(app: App) -> None:
    body, headers = get(app.base + "/square?n=300")
    assert json.loads(body) == [n * n for n in range(300)]
    assert headers["x-serverless-target"] == "self"  # neither the local pool nor a URL
    assert 1 <= int(headers["x-serverless-processes"]) <= len(app.pids)


@pytest.mark.parametrize("header", ["Host", "X-Forwarded-Host"])
def test_a_forged_host_never_redirects_call_back_to_self(app: App, header: str) -> None:
    """Issue 14, finding 1: `Host: 127.0.0.1:<attacker>` made the app POST its chunks, signed
    with its secret, to the attacker, and serve the attacker's forged results. The callback
    now goes to the server's own loopback socket, whatever the request says."""
    with Attacker() as attacker:
        request = urllib.request.Request(
            app.base + "/square?n=6", headers={header: f"127.0.0.1:{attacker.port}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body, target = response.read(), response.headers["X-Serverless-Target"]
    assert attacker.requests == [], "signed chunks went to the attacker"
    assert json.loads(body) == [n * n for n in range(6)] and target == "self"


def test_remote_error_carries_type_message_traceback_and_index(caller: App) -> None:
    with pytest.raises(serverless.RemoteError) as info:
        sf.fail_on(list(range(100)), 57)
    exc = info.value
    assert (exc.type_name, exc.index, exc.item) == ("ValueError", 57, "57")
    assert "cannot handle 57" in exc.message and "cannot handle 57" in str(exc)
    assert "Traceback" in exc.traceback and "fail_on" in exc.traceback
    assert pid_of(exc.worker) in caller.pids


def test_methods_static_and_class(caller: App) -> None:
    geo = sf.Geo()
    geo.factor = 99  # the instance's state travels with it (issue 23): the seed used 10
    assert geo.scaled([1, 2, 3]) == [99, 198, 297]
    assert sf.Geo.scaled(geo, [4]) == [396]
    assert sf.Geo.negated([1, 2]) == [-1, -2]
    # typed as methods: a staticmethod on an instance, a classmethod on the class (_function)
    assert cast(Any, geo).negated([3]) == [-3]
    assert cast(Any, sf.Geo).named([1, 2]) == ["Geo1", "Geo2"]
    assert sf.Geo.scaled.stats is not None and sf.Geo.scaled.stats.target == "url"


def test_async_function(caller: App) -> None:
    assert sf.async_double(list(range(50))) == [2 * n for n in range(50)]


def test_a_wrong_secret_is_rejected_and_runs_nothing(app: App, reset_settings: None) -> None:
    serverless.init(ROUTE, "not-the-secret-0123456789abcdef", url=app.worker_url)
    with pytest.raises(serverless.RequestRejected) as info:
        sf.square([1, 2])
    assert info.value.status == 401


def number(pattern: str, line: str) -> float:
    match = re.fullmatch(pattern, line)
    assert match, line
    return float(match[1])


STEP = (
    r'  (\d) - Step "(\w+)" took (\d+\.\d\d)s for (\d+) workers? and (\d+) elements'
    r"( \(in the same requests as step \d\))?"
)


def test_the_seed_pipeline_demo_in_flask(flask_server: App) -> None:
    body, headers = get(flask_server.base + "/demo?count=300&seed=7")
    report, _, rest = body.decode().partition("\n\n")
    lines = report.splitlines()
    assert lines[:2] == ["*Serverless Pipeline Demo*", "Number of zipcodes = 300"]
    regular = number(r"Regular duration = (\d+\.\d\d)s", lines[2])
    parallel = number(r"Parallel duration = (\d+\.\d\d)s", lines[3])
    speedup = number(r"Speedup = (\d+\.\d)X", lines[4])
    assert regular >= 300 * 0.01 - 0.01  # each lookup sleeps 10 ms
    assert 0 < parallel < regular and speedup > 1
    assert lines[5] == "Details per pipeline step:"
    steps = [re.fullmatch(STEP, line) for line in lines[6:]]
    assert all(steps) and len(steps) == 3, lines
    found = [(int(m[1]), m[2], int(m[4]), int(m[5]), m[6]) for m in steps if m]
    known = len(rest.splitlines())
    assert found == [
        (1, "geolocate", 100, 300, None),
        (2, "cleanup", 100, 300, " (in the same requests as step 1)"),
        (3, "sort", 1, known, None),
    ]
    assert 0 < known < 300  # cleanup dropped the codes that do not exist
    addresses = rest.splitlines()
    assert addresses == sorted(addresses)
    assert all(re.fullmatch(r"Springfield, [A-Z]{2} \d{5}, USA", a) for a in addresses)
    assert headers["x-serverless-targets"] == "self,self,caller"


def test_a_cancelled_call_stops_its_item_by_item_chunks(caller: App, tmp_path: Path) -> None:
    """Issue 22.11 under each server: once the caller gives up (its connections closed), no
    item-by-item chunk starts its next item 1 s later: gunicorn's threads look for the client
    socket's end of file before each item, uvicorn's watch for http.disconnect."""
    path = tmp_path / "stamps"
    fn = sf.stamped.with_options(errors="return", workers=4, chunk_size=40)  # 2 s a chunk
    future = fn.submit(list(range(400)), str(path), 0.05)
    deadline = time.monotonic() + 30
    while not path.exists() or len(path.read_text().splitlines()) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    future.cancel()
    given_up = time.time()
    time.sleep(3)
    starts = [float(line.split()[1]) for line in path.read_text().splitlines()]
    late = [round(start - given_up, 2) for start in starts if start > given_up + 1.0]
    assert late == [], f"{len(late)} of {len(starts)} items started after 1 s: {late[:10]}"


def test_concurrent_async_parents_calling_back_into_fastapi_all_succeed(
    fastapi_server: App,
) -> None:
    """Issue 22.10: 6 requests at once, each awaiting f.aio(...) over 400 items sent back to
    the same app. Its worker runs 64 at once and refuses the rest as busy (signed: nothing
    ran); before, 2 to 4 of the 6 failed with "the worker is busy (it runs 64 at once)"."""
    answers: list[object] = []
    lock = threading.Lock()

    def parent() -> None:
        try:
            body = get(fastapi_server.base + "/aio?n=400&seconds=0.05", timeout=50)[0]
            out: object = json.loads(body)
        except Exception as exc:  # reported below
            out = exc
        with lock:
            answers.append(out)

    threads = [threading.Thread(target=parent, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=55)
    assert answers == [400] * 6, answers


def _parents(base: str, query: str, n: int, timeout: float) -> list[tuple[float, Any]]:
    """`n` requests to `base + query` at once: each one's wall time and answer (or error)."""
    answers: list[tuple[float, Any]] = []
    lock = threading.Lock()

    def parent() -> None:
        started = time.perf_counter()
        try:
            body, headers = get(base + query, timeout=timeout)
            out: Any = (json.loads(body), headers)
        except Exception as exc:  # reported below
            out = exc
        with lock:
            answers.append((time.perf_counter() - started, out))

    threads = [threading.Thread(target=parent, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout + 5)
    return answers


def _gunicorn(
    threads: int, tmp_path: Any, worker: str = "gthread"
) -> Iterator[tuple[str, list[bytes]]]:
    """Flask under `gunicorn -k gthread -w 1 --threads N`, with its access log in tmp_path."""
    port = free_port()
    command = ["gunicorn", "-k", worker, "-w", "1", "--threads", str(threads)]
    command += ["--no-control-socket", "--graceful-timeout", "5", "-b", f"127.0.0.1:{port}"]
    command += ["--access-logfile", str(tmp_path / "access.log"), "tests.apps.flask_app:app"]
    log: list[bytes] = []
    with server(command, port) as proc:
        assert proc.stdout is not None
        drain = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
        drain.start()
        yield f"http://127.0.0.1:{port}", log
    drain.join(10)
    proc.stdout.close()


@pytest.mark.serial  # a bound on wall time: run alone
@pytest.mark.timeout(90)
@pytest.mark.parametrize("worker", ["gthread", "serverless._worker.gthread.Worker"])
def test_concurrent_parents_share_a_threaded_apps_free_threads(tmp_path: Any, worker: str) -> None:
    """Issue 22.10: 6 requests at once, each calling back into its own app (gunicorn gthread,
    1 process x 16 threads) with 400 items of 50 ms: 120 s of work for the 10 threads the
    parents leave free. Before, the first call held every lane to the app and the other 5
    ran their chunks serially on their own threads: 20.2 s each, the serial time."""
    for base, _ in _gunicorn(16, tmp_path, worker):
        answers = _parents(base, "/sleepy?n=400&seconds=0.05", 6, 60)
        assert [out[0] for _, out in answers] == [400] * 6, answers
        bound = 1.5 * 6 * 400 * 0.05 / (16 - 6)
        assert max(wall for wall, _ in answers) < bound, [wall for wall, _ in answers]
        statuses = [line.split()[8] for line in (tmp_path / "access.log").read_text().splitlines()]
        assert set(statuses) == {"200"}, statuses  # no 409 in normal call-back-to-self


@pytest.mark.timeout(60)
def test_a_call_the_app_cannot_help_says_so(tmp_path: Any) -> None:
    """Two parents on an app with two threads: no thread is left for their chunks, which run
    in the parents' own threads. The call says so, in the log and in its statistics."""
    for base, log in _gunicorn(2, tmp_path):
        answers = _parents(base, "/sleepy?n=40&seconds=0.01", 2, 30)
        for _, (count, headers) in answers:
            assert count == 40
            chunks = int(headers["x-serverless-chunks"])
            assert chunks > 1 and int(headers["x-serverless-inline"]) == chunks
        time.sleep(0.5)  # the log's last lines
        text = b"".join(log).decode(errors="replace")
        assert "ran all" in text and "in the calling thread" in text, text[-2000:]
