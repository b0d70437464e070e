"""The worker's Prometheus metrics, scraped from /metrics through the WSGI and ASGI adapters
in process and read with prometheus_client's own parser: what each kind of chunk and refusal
counts, that only registered functions of verified requests ever become a label (a flood of
random names, signed or not, creates no series), and the off switches."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import serverless
from serverless import _wire as p
from serverless._worker import metrics
from tests import sample_functions as sf
from tests import telemetry_functions as tf
from tests.conftest import SECRET
from tests.unit.test_adapters import asgi_post, wsgi_post
from tests.unit.test_worker_tracing import request

ROUTE = "/serverless"
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def wsgi_get(app: Any, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "HTTP_HOST": "testserver",
    }
    started: list[Any] = []
    body = b"".join(app(environ, lambda status, headers: started.extend([status, headers])))
    return int(started[0].split()[0]), {k.lower(): v for k, v in started[1]}, body


async def asgi_get(app: Any, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    scope = {"type": "http", "method": method, "path": path, "scheme": "http", "headers": []}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    headers = {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


class Worker:
    """A route's WSGI or ASGI app: post chunks to it, scrape it."""

    def __init__(self, kind: str, route: serverless.WorkerRoute) -> None:
        self.kind, self.route = kind, route
        self.app: Any = route.wsgi() if kind == "wsgi" else route.asgi()

    def post(self, headers: dict[str, str], body: bytes) -> tuple[int, p.Reply | None]:
        if self.kind == "wsgi":
            return wsgi_post(self.app, headers, body)
        return asyncio.run(asgi_post(self.app, headers, body))

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        if self.kind == "wsgi":
            return wsgi_get(self.app, path, method)
        return asyncio.run(asgi_get(self.app, path, method))

    def scrape(self) -> Series:
        status, headers, body = self.get("/metrics")
        assert status == 200, body
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse(body.decode())


def parse(text: str) -> Series:
    """Every sample of the serverless_worker_* families, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("serverless_worker_")
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def delta(before: Series, after: Series) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What changed, and by how much."""
    changed = {key: value - before.get(key, 0.0) for key, value in after.items()}
    return {key: value for key, value in changed.items() if value}


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


@pytest.fixture(params=["wsgi", "asgi"])
def worker(request: pytest.FixtureRequest, reset_settings: None) -> Worker:
    return Worker(request.param, serverless.init(ROUTE, SECRET, max_body=4096))


SQUARE = sf.square.entry.name
FAIL_ON = sf.fail_on.entry.name


def test_a_chunk_counts_once_its_items_and_its_times_by_function(worker: Worker) -> None:
    before = worker.scrape()
    assert worker.post(*request(SQUARE, [1, 2, 3]))[0] == 200
    changes = delta(before, worker.scrape())
    assert changes[key("serverless_worker_chunks_total", function=SQUARE, outcome="ok")] == 1
    assert changes[key("serverless_worker_items_total", function=SQUARE, outcome="ok")] == 3
    assert changes[key("serverless_worker_chunk_seconds_count", function=SQUARE)] == 1
    assert changes[key("serverless_worker_queue_seconds_count", function=SQUARE)] == 1
    assert changes[key("serverless_worker_chunk_seconds_bucket", function=SQUARE, le="+Inf")] == 1
    assert not any(name.startswith("serverless_worker_refused") for name, _ in changes)


def test_errors_throttles_and_chunks_that_never_ran_count_by_outcome(worker: Worker) -> None:
    before = worker.scrape()
    isolated = request(FAIL_ON, [1, 2, 3, 2], args=[2], isolate=True)  # errors="return"
    assert worker.post(*isolated)[0] == 200
    assert worker.post(*request(FAIL_ON, [1, 2, 3], args=[2]))[0] == 500
    throttled = request(tf.throttle_at.entry.name, [1, 2, 3], args=[2], pace=0.0)
    assert worker.post(*throttled)[0] == 200
    assert worker.post(*request(SQUARE, [1, 2], deadline=time.time() - 1))[0] == 504
    throttle = tf.throttle_at.entry.name
    changes = delta(before, worker.scrape())
    # the histograms' sums and buckets moved too: their counts say enough here
    counted = {k: v for k, v in changes.items() if not k[0].endswith(("_sum", "_bucket"))}
    assert counted == {
        key("serverless_worker_chunks_total", function=FAIL_ON, outcome="ok"): 1,
        key("serverless_worker_items_total", function=FAIL_ON, outcome="ok"): 2,
        key("serverless_worker_items_total", function=FAIL_ON, outcome="error"): 2 + 3,
        key("serverless_worker_item_errors_total", function=FAIL_ON): 2 + 1,
        key("serverless_worker_chunks_total", function=FAIL_ON, outcome="error"): 1,
        key("serverless_worker_chunks_total", function=throttle, outcome="throttled"): 1,
        key("serverless_worker_items_total", function=throttle, outcome="ok"): 1,
        key("serverless_worker_items_total", function=throttle, outcome="throttled"): 2,
        key("serverless_worker_throttles_total", function=throttle): 1,
        key("serverless_worker_chunks_total", function=SQUARE, outcome="expired"): 1,
        key("serverless_worker_items_total", function=SQUARE, outcome="expired"): 2,
        **{
            key(f"serverless_worker_{name}_count", function=function): runs
            for name in ("chunk_seconds", "queue_seconds")
            for function, runs in ((FAIL_ON, 2), (throttle, 1))
        },
    }


def test_threads_busy_counts_the_chunks_running_now(worker: Worker) -> None:
    busy = key("serverless_worker_threads_busy")
    tf.released.clear()
    tf.holding.clear()
    before = worker.scrape()[busy]
    post = threading.Thread(target=worker.post, args=request(tf.held.entry.name, [1]))
    post.start()
    try:
        assert tf.holding.wait(10)
        assert worker.scrape()[busy] == before + 1
    finally:
        tf.released.set()
        post.join(10)
    assert worker.scrape()[busy] == before


def _tampered() -> tuple[dict[str, str], bytes]:
    headers, body = request(SQUARE, [1])
    return headers, body.replace(b"\x01", b"\x02")  # the item changed after signing


def _stale() -> tuple[dict[str, str], bytes]:
    rid = p.new_request_id()
    body = p.encode(p.Call(v=p.VERSION, fn=SQUARE, id=rid, index=0, items=[1]))
    return p.signed_headers(p.Keyring(SECRET), ROUTE, SQUARE, rid, body, now=1.0), body


def _versioned() -> tuple[dict[str, str], bytes]:
    headers, body = request(SQUARE, [1])
    return {**headers, p.H_VERSION: "2"}, body


def _garbage() -> tuple[dict[str, str], bytes]:
    rid, body = p.new_request_id(), b"\xc1 not msgpack"
    return p.signed_headers(p.Keyring(SECRET), ROUTE, SQUARE, rid, body, now=time.time()), body


def _bad_input() -> tuple[dict[str, str], bytes]:
    return request(sf.fail_on.entry.name, ["not an int"], args=[2])


REFUSALS: dict[str, Callable[[], tuple[dict[str, str], bytes]]] = {
    "bad_signature": _tampered,
    "unknown_key": lambda: request(SQUARE, [1], secret="another-secret-0123456789"),
    "stale_timestamp": _stale,
    "bad_version": _versioned,
    "too_large": lambda: request(SQUARE, list(range(2000))),  # over max_body=4096
    "unknown_function": lambda: request("tests.sample_functions:absent", [1]),
    "malformed": _garbage,
    "bad_input": _bad_input,
}


@pytest.mark.parametrize("reason", sorted(REFUSALS))
def test_each_refusal_counts_under_its_reason_and_nothing_else(worker: Worker, reason: str) -> None:
    before = worker.scrape()
    status, _ = worker.post(*REFUSALS[reason]())
    assert 400 <= status < 500
    assert delta(before, worker.scrape()) == {
        key("serverless_worker_refused_total", reason=reason): 1
    }


def test_a_replay_counts_as_replayed(worker: Worker) -> None:
    headers, body = request(SQUARE, [1])
    assert worker.post(headers, body)[0] == 200
    before = worker.scrape()
    assert worker.post(headers, body)[0] == 409
    assert delta(before, worker.scrape()) == {
        key("serverless_worker_refused_total", reason="replayed"): 1
    }


def test_every_reason_is_a_series_from_the_first_scrape(worker: Worker) -> None:
    series = worker.scrape()
    assert {
        dict(labels)["reason"]
        for name, labels in series
        if name == "serverless_worker_refused_total"
    } == set(metrics.REASONS)


def test_a_flood_of_random_function_names_creates_no_series(worker: Worker) -> None:
    """The attack: requests naming random functions, unsigned (anyone who can reach the
    route) and signed (a caller with a bug), each of which would be a new series if a name
    from the request became a label."""
    worker.post(*request(SQUARE, [1]))  # the registered function's series exist
    before = worker.scrape()
    flood = 100
    for n in range(flood):
        fn = f"attack_{secrets.token_hex(8)}:f{n}"
        rid = p.new_request_id()
        body = p.encode(p.Call(v=p.VERSION, fn=fn, id=rid, index=0, items=[1]))
        digest = hashlib.sha256(body).hexdigest()
        unsigned = {
            p.H_VERSION: str(p.VERSION),
            p.H_FUNCTION: fn,
            p.H_TIMESTAMP: f"{time.time():.3f}",
            p.H_REQUEST_ID: rid,
            p.H_SIGNATURE: f"{p.key_id(SECRET)}={digest}",  # a known key id, a made-up mac
            "content-type": p.MSGPACK,
        }
        assert worker.post(unsigned, body)[0] == 401
        assert worker.post(*request(fn, [1]))[0] == 404
    after = worker.scrape()
    assert set(after) == set(before)  # not one new series
    assert delta(before, after) == {
        key("serverless_worker_refused_total", reason="bad_signature"): flood,
        key("serverless_worker_refused_total", reason="unknown_function"): flood,
    }
    assert not any("attack_" in value for _, labels in after for _, value in labels)


def test_metrics_answer_get_and_head_only(worker: Worker) -> None:
    status, headers, body = worker.get("/metrics", "HEAD")
    assert (status, body) == (200, b"") and int(headers["content-length"]) > 0
    assert worker.get("/metrics", "POST")[0] == 405


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_metrics_false_serves_none(kind: str, reset_settings: None) -> None:
    worker = Worker(kind, serverless.init(ROUTE, SECRET, metrics=False))
    assert worker.route.endpoint.metrics is metrics.OFF
    assert worker.get("/metrics")[0] == 404
    assert worker.post(*request(SQUARE, [2]))[0] == 200


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_another_metrics_path(kind: str, reset_settings: None) -> None:
    worker = Worker(kind, serverless.init(ROUTE, SECRET, metrics="/internal/metrics"))
    assert worker.get("/metrics")[0] == 404
    assert worker.get("/internal/metrics")[0] == 200


@pytest.mark.parametrize("bad", ["metrics", ROUTE, ""])
def test_a_metrics_path_must_be_a_path_other_than_the_route(bad: str, reset_settings: None) -> None:
    with pytest.raises(serverless.ConfigurationError, match="metrics must be"):
        serverless.init(ROUTE, SECRET, metrics=bad)


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_without_prometheus_client_metrics_is_an_unknown_path(
    kind: str, reset_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "installed", lambda: False)
    worker = Worker(kind, serverless.init(ROUTE, SECRET))
    assert worker.route.endpoint.metrics is metrics.OFF
    assert worker.get("/metrics")[0] == 404
    assert worker.post(*request(SQUARE, [2]))[0] == 200


def test_metrics_that_cannot_be_built_cost_the_chunks_nothing(
    worker: Worker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another set of the same names in the registry (an app that took them): the chunks
    run, and it is said once."""
    worker.scrape()  # the process's metrics are registered
    clash = metrics.Prometheus()
    monkeypatch.setattr(worker.route.endpoint, "metrics", clash)
    monkeypatch.setattr(metrics, "_warned", False)
    with caplog.at_level("WARNING", logger="serverless.worker"):
        for n in range(3):
            status, reply = worker.post(*request(SQUARE, [n]))
            assert status == 200 and reply is not None and reply.results == [n * n]
        assert worker.post(*request("tests.sample_functions:absent", [1]))[0] == 404
    assert clash.enabled is False
    (record,) = caplog.records  # the first update of the first chunk
    assert record.getMessage() == "metrics: counting busy threads failed"


def test_directories_of_workers_killed_before_cleaning_up_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `serverless worker --processes N` SIGKILLed leaves its private directory behind: the
    # next one removes this user's directories whose process is gone, and nothing else
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = 4_194_304 + 4321  # above Linux's largest pid: no such process
    left = tmp_path / f"serverless-metrics-{gone}-abc123"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "counter_1.db").write_bytes(b"x")
    alive = tmp_path / f"serverless-metrics-{os.getpid()}-def456"
    alive.mkdir()
    target = tmp_path / "someone-elses"
    target.mkdir()
    link = tmp_path / f"serverless-metrics-{gone}-link99"
    link.symlink_to(target)
    plain = tmp_path / f"serverless-metrics-{gone}-file77"
    plain.write_text("not a directory")
    other = tmp_path / "unrelated-1-abc"
    other.mkdir()
    metrics.sweep_left_behind()
    assert not left.exists()
    assert alive.is_dir() and target.is_dir() and link.is_symlink() and plain.is_file()
    assert other.is_dir()
