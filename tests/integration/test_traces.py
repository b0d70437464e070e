"""One trace across processes (issue 25.3), read for its parent/child links: the caller's
spans (this process, the SDK exporting to memory) and the workers' (exported over OTLP/HTTP
to a receiver the test runs, the SDK set up from OTEL_EXPORTER_OTLP_ENDPOINT in their
environment), through the local pool, `serverless worker` behind HAProxy, and a Flask app
that traces itself and calls back into itself.

The shape asked for: one call span, child of the user's span; one CLIENT span per request,
children of the call span; each worker's SERVER span the child of a client span of the same
trace; the function's own span the child of its server span; a retry (a local worker
SIGKILLed mid-chunk; a request through HAProxy that timed out) a sibling client span linked
to the chunk's first.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import serverless
from tests import sample_functions as sf
from tests import telemetry_functions as tf
from tests.conftest import SECRET, TESTS, free_port, haproxy, server, serving, test_env
from tests.integration.conftest import OtlpReceiver

pytestmark = pytest.mark.timeout(120)

ROUTE = "/serverless"
MODULES = ["tests.telemetry_functions", "tests.sample_functions"]
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # ms between the workers' batches
Span = dict[str, Any]
TRACED = tf.traced.entry.name


def as_dict(span: Any) -> Span:
    """An SDK span in the receiver's form (tests/integration/conftest.py OtlpReceiver)."""
    context, parent = span.get_span_context(), span.parent
    return {
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else "",
        "name": span.name,
        "kind": span.kind.name,
        "attributes": dict(span.attributes or {}),
        "links": [
            {"trace_id": f"{x.context.trace_id:032x}", "span_id": f"{x.context.span_id:016x}"}
            for x in span.links
        ],
        "status": span.status.status_code.name,
        "service": "caller",
    }


def user_span(name: str) -> Any:
    return trace.get_tracer("tests.test_traces").start_as_current_span(name)


def ids(span: Any) -> tuple[str, str]:
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def check_tree(
    spans: list[Span], trace_id: str, user_id: str, function: str, chunks: int, inner: str
) -> dict[str, list[Span]]:
    """The links the issue asks for; each kind of span, for further checks."""
    spans = [s for s in spans if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in spans}
    calls = [s for s in spans if s["name"] == f"serverless.call {function}"]
    assert len(calls) == 1, [s["name"] for s in spans]
    (call,) = calls
    assert call["parent_span_id"] == user_id
    assert call["attributes"]["serverless.function"] == function
    clients = [s for s in spans if s["kind"] == "CLIENT"]
    assert clients and all(c["parent_span_id"] == call["span_id"] for c in clients)
    assert {c["attributes"]["serverless.chunk"] for c in clients} == set(range(chunks))
    servers = [s for s in spans if s["kind"] == "SERVER"]
    answered = [c for c in clients if c["attributes"]["serverless.outcome"] == "ok"]
    assert len(answered) == chunks
    for server_ in servers:  # each under a client span, of the same trace
        parent = by_id.get(server_["parent_span_id"])
        assert parent is not None and parent["kind"] == "CLIENT", server_
        assert server_["name"] == f"serverless.run {function}"
        assert server_["attributes"]["serverless.chunk"] == parent["attributes"]["serverless.chunk"]
    # every answered request's server span arrived, and the function's span under it
    assert {s["parent_span_id"] for s in servers} >= {c["span_id"] for c in answered}
    inners = [s for s in spans if s["name"] == inner]
    assert len(inners) >= chunks
    for span in inners:
        assert by_id[span["parent_span_id"]]["kind"] == "SERVER"
    return {"call": calls, "clients": clients, "servers": servers, "inner": inners}


def check_retries(clients: list[Span]) -> int:
    """Within each chunk, the requests after the first are siblings linked to the first; the
    ones that failed are errors. How many chunks were sent more than once."""
    resent = 0
    for chunk in {c["attributes"]["serverless.chunk"] for c in clients}:
        tries = sorted(
            (c for c in clients if c["attributes"]["serverless.chunk"] == chunk),
            key=lambda c: c["attributes"]["serverless.request"],
        )
        first = tries[0]
        assert len({c["parent_span_id"] for c in tries}) == 1  # siblings
        for later in tries[1:]:
            assert [link["span_id"] for link in later["links"]] == [first["span_id"]]
        for failed in tries[:-1]:
            assert failed["attributes"]["serverless.outcome"] == "retried"
            assert failed["status"] == "ERROR"
        assert tries[-1]["attributes"]["serverless.outcome"] == "ok"
        resent += len(tries) > 1
    return resent


def warm_up() -> None:
    """Every worker process takes a chunk before the call under test: a process decides at
    its first chunk whether it traces (_worker/telemetry.py), and chunks that arrive while
    it decides may go untraced. 32 one-item chunks, 8 at a time, reach every process."""
    assert tf.traced.with_options(chunk_size=1, workers=8)(list(range(32))) == list(range(1, 33))


def resent_and_traced(
    receiver: OtlpReceiver, spans: InMemorySpanExporter, trace_id: str, function: str
) -> tuple[list[Span], list[Span]]:
    """A call with a retry: its client spans, once the worker's span has come for the
    request that answered a chunk sent more than once (a fresh process that got two at
    once may trace only the first: see warm_up)."""
    mine = caller_spans(spans)
    clients = [s for s in mine if s["kind"] == "CLIENT" and s["trace_id"] == trace_id]
    assert check_retries(clients) >= 1  # the killed process's chunk, at least, went again
    chunks = [c["attributes"]["serverless.chunk"] for c in clients]
    answered_resent = {
        c["span_id"]
        for c in clients
        if c["attributes"]["serverless.outcome"] == "ok"
        and chunks.count(c["attributes"]["serverless.chunk"]) > 1
    }
    name = f"serverless.run {function}"
    received = receiver.wait(
        lambda got: any(s["name"] == name and s["parent_span_id"] in answered_resent for s in got)
    )
    by_id = {s["span_id"]: s for s in mine}
    servers = [s for s in received if s["trace_id"] == trace_id and s["name"] == name]
    for server_ in servers:  # every one that came is under one of the call's requests
        assert by_id[server_["parent_span_id"]]["kind"] == "CLIENT"
    return clients, servers


def caller_spans(spans: InMemorySpanExporter) -> list[Span]:
    return [as_dict(s) for s in spans.get_finished_spans()]


def wait_for(receiver: OtlpReceiver, trace_id: str, count: int, *names: str) -> list[Span]:
    """The spans received, once `count` of each name in the trace have come."""

    def found(got: list[Span]) -> bool:
        return all(
            sum(s["trace_id"] == trace_id and s["name"] == name for s in got) >= count
            for name in names
        )

    return receiver.wait(found)


def traced_spans(receiver: OtlpReceiver, trace_id: str, count: int) -> list[Span]:
    """`count` chunks of tests.telemetry_functions.traced: their server and own spans."""
    return wait_for(receiver, trace_id, count, "inner sync", f"serverless.run {TRACED}")


# -- the local pool --------------------------------------------------------------------------


@pytest.fixture
def traced_pool(otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The local pool's workers export to the receiver (their environment is this one's)."""
    serverless.shutdown()  # a pool started before has the wrong environment
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    for name, value in FAST_EXPORT.items():
        monkeypatch.setenv(name, value)
    warm_up()
    yield
    serverless.shutdown()


def test_a_trace_through_the_local_pool(
    traced_pool: None, otlp_receiver: OtlpReceiver, spans: InMemorySpanExporter
) -> None:
    with user_span("user") as user:
        assert tf.traced.with_options(chunk_size=5, workers=4)(list(range(20))) == list(
            range(1, 21)
        )
    trace_id, user_id = ids(user)
    worker = traced_spans(otlp_receiver, trace_id, 4)
    found = check_tree(caller_spans(spans) + worker, trace_id, user_id, TRACED, 4, "inner sync")
    assert len(found["clients"]) == 4 and len(found["servers"]) == 4
    assert {s["service"] for s in found["servers"]} == {"serverless-worker"}
    assert check_retries(found["clients"]) == 0


def test_a_retry_after_a_local_worker_is_killed_is_a_linked_sibling(
    traced_pool: None, otlp_receiver: OtlpReceiver, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    marker = str(tmp_path / "died")
    with user_span("user") as user:
        f = sf.die_once.with_options(chunk_size=2, workers=3, retries=3)
        assert f(list(range(6)), marker) == list(range(6))
    trace_id, user_id = ids(user)
    resent_and_traced(otlp_receiver, spans, trace_id, sf.die_once.entry.name)
    mine = caller_spans(spans)
    (call,) = [s for s in mine if s["name"].startswith("serverless.call ")]
    assert call["parent_span_id"] == user_id and call["status"] == "UNSET"


# -- `serverless worker` behind HAProxy ------------------------------------------------------


@contextlib.contextmanager
def worker(port: int, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "serverless._cli", "worker", *MODULES, "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=test_env(**env), cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drained
    with serving(proc, port, grace=15):
        yield proc


@pytest.fixture
def balanced(otlp_receiver: OtlpReceiver, tmp_path: Path, reset_settings: None) -> Iterator[str]:
    """Two `serverless worker`s exporting to the receiver, behind HAProxy: its route's URL."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url, **FAST_EXPORT}
    ports = [free_port(), free_port()]
    with (
        worker(ports[0], **env),
        worker(ports[1], **env),
        haproxy(ports, free_port(), tmp_path) as lb,
    ):
        serverless.init(ROUTE, SECRET, url=lb + ROUTE)
        warm_up()
        yield lb + ROUTE


def test_a_trace_through_serverless_worker_behind_haproxy(
    balanced: str, otlp_receiver: OtlpReceiver, spans: InMemorySpanExporter
) -> None:
    with user_span("user") as user:
        assert tf.traced.with_options(chunk_size=5, workers=4)(list(range(20))) == list(
            range(1, 21)
        )
    trace_id, user_id = ids(user)
    worker_spans = traced_spans(otlp_receiver, trace_id, 4)
    found = check_tree(
        caller_spans(spans) + worker_spans,
        trace_id,
        user_id,
        TRACED,
        4,
        "inner sync",
    )
    assert {c["attributes"]["url.full"] for c in found["clients"]} == {balanced}
    # both workers took chunks, each answering as itself
    assert len({s["attributes"]["serverless.worker"] for s in found["servers"]}) == 2


def test_a_retry_through_haproxy_after_a_timeout_is_a_linked_sibling(
    balanced: str, otlp_receiver: OtlpReceiver, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    """HAProxy resends a request whose worker died before answering (an empty response):
    the caller's own retry is shown with a request that times out instead."""
    marker = str(tmp_path / "stalled")
    with user_span("user") as user:
        f = sf.straggle.with_options(chunk_size=2, workers=2, timeout=1.0, hedge=False)
        assert f(list(range(4)), marker, 2.0) == list(range(4))
    trace_id, _ = ids(user)
    clients, _ = resent_and_traced(otlp_receiver, spans, trace_id, sf.straggle.entry.name)
    (timed_out,) = [c for c in clients if c["attributes"]["serverless.outcome"] == "retried"]
    assert timed_out["attributes"]["serverless.chunk"] == 0


# -- an app that calls back into itself -------------------------------------------------------

GUNICORN = ["gunicorn", "-k", "gthread", "--threads", "16", "-w", "2", "--graceful-timeout", "5"]
GUNICORN += ["--no-control-socket", "--log-level", "warning"]


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_a_trace_through_an_app_calling_back_into_itself(otlp_receiver: OtlpReceiver) -> None:
    port = free_port()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url, **FAST_EXPORT}
    command = [*GUNICORN, "-b", f"127.0.0.1:{port}", "tests.apps.traced_app:app"]
    with server(command, port, **env) as proc:
        assert proc.stdout is not None
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        pids: set[int] = set()
        deadline = time.monotonic() + 20
        while len(pids) < 2:  # both processes booted, each with its SDK
            assert time.monotonic() < deadline
            pids.add(get(base + "/pid"))
        get(base + "/traced?n=40")  # the warm-up: see warm_up
        answer = get(base + "/traced?n=40")
        assert answer["results"] == list(range(1, 41))
        trace_id, view_id = answer["trace_id"], answer["span_id"]
        traced_spans(otlp_receiver, trace_id, 8)
        received = wait_for(otlp_receiver, trace_id, 1, "view", f"serverless.call {TRACED}")
    found = check_tree(received, trace_id, view_id, TRACED, 8, "inner sync")
    assert {s["service"] for s in found["call"] + found["servers"]} == {"traced-app"}
    (view,) = [s for s in received if s["span_id"] == view_id]
    assert view["parent_span_id"] == ""  # the trace starts at the app's own span
    assert check_retries(found["clients"]) == 0
