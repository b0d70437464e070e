"""The worker's telemetry with real servers: `serverless worker` and the local pool export
each chunk's span over OTLP/HTTP to a receiver the test runs, continuing the trace set in the
signed envelope, and flush at a clean exit; /metrics is scraped with prometheus_client's
parser during and after a run, summed over `serverless worker --processes 2` and over a
mounted app's gunicorn workers; a worker without OpenTelemetry or prometheus_client imports
neither."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
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
from prometheus_client.parser import text_string_to_metric_families

import serverless
from serverless import _wire as p
from serverless._pool import pool as _pool
from tests import sample_functions as sf
from tests.conftest import SECRET, TESTS, free_port, server, serving, test_env
from tests.integration.conftest import OtlpReceiver
from tests.integration.test_pool_unix import sockets, unix_post

pytestmark = pytest.mark.timeout(120)

ROUTE = "/serverless"
MODULE = "tests.sample_functions"
SQUARE = sf.square.entry.name
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # ms between the SDK's batches


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def signed(
    fn: str,
    items: list[Any],
    *,
    keyring: p.Keyring | None = None,
    prefix: str = "",
    **fields: Any,
) -> tuple[dict[str, str], bytes]:
    """A request as the protocol helpers build it, with the envelope's fields set by hand."""
    rid = p.new_request_id(prefix)
    fields.setdefault("index", 0)
    body = p.encode(p.Call(v=p.VERSION, fn=fn, id=rid, items=items, **fields))
    keys = keyring or p.Keyring(SECRET)
    return p.signed_headers(keys, ROUTE, fn, rid, body, now=time.time()), body


def post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, p.Reply]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, p.decode_reply(response.read(), p.MSGPACK)
    except urllib.error.HTTPError as exc:
        return exc.code, p.decode_reply(exc.read(), p.MSGPACK)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextlib.contextmanager
def worker(*args: str, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`serverless worker` on a free port; its output drained; yields it and its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "serverless._cli", "worker", MODULE, "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, env=test_env(**env), cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output: list[bytes] = []
    assert proc.stdout is not None
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    try:
        with serving(proc, port, grace=15):
            yield proc, f"http://127.0.0.1:{port}"
    except BaseException:
        print(b"".join(output).decode(errors="replace"))
        raise


def server_span(spans: list[dict[str, Any]], trace_id: str) -> dict[str, Any] | None:
    for span in spans:
        if span["trace_id"] == trace_id and span["name"].startswith("serverless.run "):
            return span
    return None


# -- traces over OTLP -----------------------------------------------------------------------


def test_serverless_worker_exports_a_server_span_continuing_the_envelopes_trace(
    otlp_receiver: OtlpReceiver,
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url, **FAST_EXPORT}
    with worker(**env) as (_, base):
        parent, trace_id, span_id = traceparent()
        status, reply = post(base + ROUTE, *signed(SQUARE, [3, 4], index=7, trace=parent))
        assert status == 200 and reply.results == [9, 16]
        spans = otlp_receiver.wait(lambda spans: server_span(spans, trace_id) is not None)
    span = server_span(spans, trace_id)
    assert span is not None
    assert span["parent_span_id"] == span_id and span["kind"] == "SERVER"
    assert span["name"] == f"serverless.run {SQUARE}"
    assert span["service"] == "serverless-worker"
    attributes = span["attributes"]
    assert attributes["serverless.function"] == SQUARE
    assert attributes["serverless.chunk"] == 7 and attributes["serverless.items"] == 2
    assert attributes["serverless.worker"] == reply.worker


def test_serverless_worker_flushes_its_spans_at_a_clean_exit(otlp_receiver: OtlpReceiver) -> None:
    """Batches every minute: the span can only arrive through the flush at SIGTERM."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
        "OTEL_SERVICE_NAME": "flushed-worker",
    }
    parent, trace_id, span_id = traceparent()
    with worker(**env) as (proc, base):
        assert post(base + ROUTE, *signed(SQUARE, [5], trace=parent))[0] == 200
        time.sleep(0.5)
        assert server_span(otlp_receiver.spans(), trace_id) is None  # still in its batch
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM  # uvicorn stops, then dies of the signal
    span = server_span(otlp_receiver.spans(), trace_id)
    assert span is not None and span["parent_span_id"] == span_id
    assert span["service"] == "flushed-worker"


def test_the_local_pools_workers_export_a_server_span_continuing_the_trace(
    otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    for name, value in FAST_EXPORT.items():
        monkeypatch.setenv(name, value)
    pool = _pool.LocalPool(1, 4, [MODULE])
    pool.start()
    try:
        parent, trace_id, span_id = traceparent()
        prefix = pool.id_prefixes[pool.urls[0]]
        headers, body = signed(SQUARE, [6], keyring=pool.keyring, prefix=prefix, trace=parent)
        (path,) = sockets(pool)
        status, answer = unix_post(path, pool.route, headers, body)
        assert status == 200 and p.decode_reply(answer, p.MSGPACK).results == [36]
        spans = otlp_receiver.wait(lambda spans: server_span(spans, trace_id) is not None)
        pids = pool.pids
    finally:
        pool.close()
    span = server_span(spans, trace_id)
    assert span is not None and span["parent_span_id"] == span_id and span["kind"] == "SERVER"
    assert span["service"] == "serverless-worker"
    assert int(span["attributes"]["serverless.worker"].rsplit(":", 1)[1]) in pids


# -- /metrics -------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("serverless_worker_")
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(base + "/metrics")
    assert status == 200, text
    return samples(text)


def value(
    series: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return series.get((name, tuple(sorted(labels.items()))), 0.0)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry))
    return found


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.partition(b"=") for item in f.read().split(b"\0") if item]
    return {k.decode(): v.decode() for k, _, v in pairs}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serverless_worker_processes_2_metrics_are_the_sum_over_processes() -> None:
    with worker("--processes", "2", "--threads", "4") as (proc, base):
        deadline = time.monotonic() + 30
        while len(children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        dirs = {environ(child).get("PROMETHEUS_MULTIPROC_DIR") for child in children(proc.pid)}
        (directory,) = dirs  # one, shared by both processes
        assert directory and Path(directory).is_dir()
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700  # private, a random name
        assert Path(directory).parent == Path(os.environ.get("TMPDIR", "/tmp"))
        assert Path(directory).name.startswith("serverless-metrics-")

        # during a run: chunks that sleep, from several connections at once
        sleeping: list[tuple[int, p.Reply]] = []
        sleepers = [
            threading.Thread(
                target=lambda: sleeping.append(
                    post(base + ROUTE, *signed(sf.sleepy.entry.name, [1.0]))
                )
            )
            for _ in range(6)
        ]
        for thread in sleepers:
            thread.start()
        busy = 0.0
        deadline = time.monotonic() + 10
        while busy < 1 and time.monotonic() < deadline:
            busy = value(scrape(base), "serverless_worker_threads_busy")
        assert busy >= 1  # seen during the run
        for thread in sleepers:
            thread.join(30)

        workers = {reply.worker for _, reply in sleeping}
        chunks = 40
        for n in range(chunks):  # each on a new connection: either process may take it
            status, reply = post(base + ROUTE, *signed(SQUARE, [n, n]))
            assert status == 200
            workers.add(reply.worker)
        assert len(workers) == 2, workers  # both processes ran chunks

        for _ in range(6):  # whichever process answers, it reports the sum
            after = scrape(base)
            assert (
                value(after, "serverless_worker_chunks_total", function=SQUARE, outcome="ok")
                == chunks
            )
            assert (
                value(after, "serverless_worker_items_total", function=SQUARE, outcome="ok")
                == 2 * chunks
            )
            assert (
                value(
                    after,
                    "serverless_worker_chunks_total",
                    function=sf.sleepy.entry.name,
                    outcome="ok",
                )
                == 6
            )
            assert value(after, "serverless_worker_threads_busy") == 0

        # the flood: random function names, unsigned and signed, add no series
        for n in range(30):
            fn = f"flood_{secrets.token_hex(6)}:f{n}"
            headers, body = signed(fn, [1])
            assert post(base + ROUTE, headers, body)[0] == 404
            forged, body = signed(fn, [1], keyring=p.Keyring("not-the-secret-0123456789"))
            assert post(base + ROUTE, forged, body)[0] == 401
        flooded = scrape(base)
        assert set(flooded) == set(after)
        assert value(flooded, "serverless_worker_refused_total", reason="unknown_function") == 30
        assert value(flooded, "serverless_worker_refused_total", reason="unknown_key") == 30
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    assert not Path(directory).exists()  # removed at exit


def test_serverless_worker_no_metrics() -> None:
    with worker("--no-metrics") as (_, base):
        assert get(base + "/metrics")[0] == 404
        assert get(base + "/healthz")[0] == 200


def test_metrics_path_may_not_be_the_health_route() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "serverless._cli", "worker", MODULE, "--metrics", "/healthz"],
        env=test_env(),
        cwd=TESTS.parent,
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 2 and b"metrics path" in run.stderr


def test_a_mounted_apps_metrics_sum_its_gunicorn_workers(
    tmp_path: Path, reset_settings: None
) -> None:
    """A Flask app under gunicorn (2 processes x 16 threads), with PROMETHEUS_MULTIPROC_DIR
    set as docs/deploy.md says; the test process calls it as a caller would."""
    port = free_port()
    command = ["gunicorn", "-k", "gthread", "--threads", "16", "-w", "2", "--log-level", "warning"]
    command += ["--graceful-timeout", "5", "-b", f"127.0.0.1:{port}", "tests.apps.flask_app:app"]
    multiproc = tmp_path / "metrics"
    multiproc.mkdir(mode=0o700)
    with server(command, port, PROMETHEUS_MULTIPROC_DIR=str(multiproc)):
        base = f"http://127.0.0.1:{port}"
        serverless.init(ROUTE, SECRET)
        square = sf.square.with_options(url=base + ROUTE, workers=8, chunk_size=5)
        result, stats = square.with_stats(list(range(200)))
        assert result == [n * n for n in range(200)]
        assert len(stats.chunks) == 40
        workers = {chunk.worker for chunk in stats.chunks}
        posted = 0
        while len(workers) < 2 and posted < 200:  # new connections, until both took chunks
            status, reply = post(base + ROUTE, *signed(SQUARE, [posted]))
            assert status == 200
            workers.add(reply.worker)
            posted += 1
        assert len(workers) == 2, workers
        for _ in range(4):  # whichever process answers, it reports the sum
            series = scrape(base)
            ok = value(series, "serverless_worker_chunks_total", function=SQUARE, outcome="ok")
            items = value(series, "serverless_worker_items_total", function=SQUARE, outcome="ok")
            assert (ok, items) == (40 + posted, 200 + posted)


# -- nothing imported where nothing is wanted or installed -----------------------------------

SERVE_A_CHUNK = """
import asyncio, sys, time
from tests.conftest import SECRET
import serverless
from serverless import _wire as p
from tests import sample_functions as sf
from tests.unit.test_adapters import asgi_post

async def get_status(app, path):
    sent = []
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    async def send(message):
        sent.append(message)
    await app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
    return sent[0]["status"]

route = serverless.init("/serverless", SECRET)
app = route.asgi()
rid = p.new_request_id()
body = p.encode(p.Call(v=p.VERSION, fn=sf.square.entry.name, id=rid, index=0, items=[3],
                       trace="00-" + "a" * 32 + "-" + "b" * 16 + "-01"))
headers = p.signed_headers(p.Keyring(SECRET), "/serverless", sf.square.entry.name, rid, body,
                           now=time.time())
status, reply = asyncio.run(asgi_post(app, headers, body))
assert status == 200 and reply.results == [9], (status, reply)
print("metrics", asyncio.run(get_status(app, "/metrics")))
optional = {"opentelemetry", "prometheus_client"}
print("imported", sorted({m.split(".")[0] for m in sys.modules} & optional))
"""

HIDE = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {%s}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
"""


def run_script(script: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=test_env(),
        cwd=TESTS.parent,
        capture_output=True,
        timeout=60,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_a_worker_that_never_imported_opentelemetry_does_not_import_it() -> None:
    lines = run_script(SERVE_A_CHUNK)
    assert lines == ["metrics 200", "imported ['prometheus_client']"]


def test_without_prometheus_client_nothing_is_imported_and_metrics_is_unknown() -> None:
    lines = run_script(HIDE % "'prometheus_client'" + SERVE_A_CHUNK)
    assert lines == ["metrics 404", "imported []"]
