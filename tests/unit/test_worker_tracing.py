"""The worker's spans (OpenTelemetry SDK, in-memory exporter), through the WSGI and ASGI
adapters in process: a chunk continues the trace of its signed envelope in a SERVER span, the
function's own spans nest inside it (sync in a worker thread, async on the loop), item errors
are events, and nothing but an authenticated chunk gets a span."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import serverless
from serverless import _wire as p
from serverless._worker import telemetry
from tests import sample_functions as sf
from tests import telemetry_functions as tf
from tests.conftest import SECRET
from tests.unit.test_adapters import asgi_post, wsgi_post

ROUTE = "/serverless"


def traceparent() -> tuple[str, str, str]:
    """A fresh traceparent, its trace id and its span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def request(
    fn: str, items: list[Any], *, secret: str = SECRET, **fields: Any
) -> tuple[dict[str, str], bytes]:
    rid = p.new_request_id()
    call = p.Call(v=p.VERSION, fn=fn, id=rid, index=fields.pop("index", 0), items=items, **fields)
    body = p.encode(call)
    headers = p.signed_headers(p.Keyring(secret), ROUTE, fn, rid, body, now=time.time())
    return headers, body


@pytest.fixture
def route(reset_settings: None) -> serverless.WorkerRoute:
    return serverless.init(ROUTE, SECRET, metrics=False)


@pytest.fixture(params=["wsgi", "asgi"])
def post(request: pytest.FixtureRequest, route: serverless.WorkerRoute) -> Any:
    """POST to a fresh route's WSGI or ASGI adapter (a sync function runs in the server's
    thread, or in the ASGI adapter's thread pool)."""
    if request.param == "wsgi":
        app = route.wsgi()
        return lambda headers, body: wsgi_post(app, headers, body)
    asgi = route.asgi()
    return lambda headers, body: asyncio.run(asgi_post(asgi, headers, body))


def server_spans(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name.startswith("serverless.run ")]


def test_a_chunk_continues_the_trace_of_its_envelope_in_a_server_span(
    post: Any, spans: InMemorySpanExporter
) -> None:
    parent, trace_id, span_id = traceparent()
    status, reply = post(*request(sf.square.entry.name, [1234567, 2], index=5, trace=parent))
    assert status == 200 and reply is not None and reply.results == [1234567**2, 4]
    (span,) = server_spans(spans)
    assert span.name == f"serverless.run {sf.square.entry.name}"
    assert span.kind == SpanKind.SERVER
    assert span.context is not None and span.parent is not None
    assert f"{span.context.trace_id:032x}" == trace_id
    assert f"{span.parent.span_id:016x}" == span_id and span.parent.is_remote
    attributes = dict(span.attributes or {})
    assert attributes["serverless.function"] == sf.square.entry.name
    assert attributes["serverless.chunk"] == 5 and attributes["serverless.items"] == 2
    assert attributes["serverless.worker"] == reply.worker
    assert attributes["serverless.status"] == 200
    assert span.status.status_code == StatusCode.UNSET
    assert "1234567" not in repr(attributes)  # never an item
    assert SECRET not in repr(attributes)


@pytest.mark.parametrize("function", [tf.traced, tf.traced_async], ids=["sync", "async"])
def test_the_functions_own_spans_nest_inside_the_chunks_span(
    post: Any, spans: InMemorySpanExporter, function: serverless.ParallelFunction[Any, Any]
) -> None:
    parent, trace_id, _ = traceparent()
    status, reply = post(*request(function.entry.name, [1, 2], trace=parent))
    assert status == 200 and reply is not None and reply.results == [2, 3]
    (server,) = server_spans(spans)
    (inner,) = [s for s in spans.get_finished_spans() if s.name.startswith("inner ")]
    assert server.context is not None and inner.context is not None and inner.parent is not None
    assert inner.parent.span_id == server.context.span_id
    assert f"{inner.context.trace_id:032x}" == trace_id


def test_item_errors_are_events_and_a_failed_chunk_is_an_error(
    post: Any, spans: InMemorySpanExporter
) -> None:
    status, reply = post(*request(sf.fail_on.entry.name, [1, 2, 3, 2], args=[2], isolate=True))
    assert status == 200 and reply is not None and reply.item_errors is not None
    (isolated,) = server_spans(spans)
    events = [e for e in isolated.events if e.name == "exception"]
    assert [dict(e.attributes or {}) for e in events] == [
        {
            "exception.type": "ValueError",
            "exception.message": "cannot handle 2",
            "serverless.item_index": index,
        }
        for index in (1, 3)
    ]
    assert (isolated.attributes or {})["serverless.item_errors"] == 2
    assert isolated.status.status_code == StatusCode.UNSET  # the chunk itself answered

    spans.clear()
    status, reply = post(*request(sf.fail_on.entry.name, [1, 2, 3], args=[2]))
    assert status == 500 and reply is not None and reply.error is not None
    (failed,) = server_spans(spans)
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "ValueError: cannot handle 2"
    (event,) = [e for e in failed.events if e.name == "exception"]
    attributes = dict(event.attributes or {})
    assert attributes["exception.type"] == "ValueError"
    assert attributes["serverless.item_index"] == 1
    assert "cannot handle 2" in str(attributes["exception.stacktrace"])


def test_a_throttle_is_an_event(post: Any, spans: InMemorySpanExporter) -> None:
    status, reply = post(*request(tf.throttle_at.entry.name, [1, 2, 3], args=[2], pace=0.0))
    assert status == 200 and reply is not None and reply.throttled is not None
    (span,) = server_spans(spans)
    (event,) = [e for e in span.events if e.name == "throttled"]
    assert dict(event.attributes or {}) == {
        "serverless.at": 1,
        "serverless.stopped": False,
        "serverless.retry_after": 2.0,
    }


def test_fused_stages_are_named_on_the_span(post: Any, spans: InMemorySpanExporter) -> None:
    names = [sf.square.entry.name, sf.odd_only.entry.name]
    fn = p.STAGE_SEPARATOR.join(names)
    status, _ = post(*request(fn, [1, 2, 3], then=[p.Stage(fn=names[1])]))
    assert status == 200
    (span,) = server_spans(spans)
    assert span.name == f"serverless.run {names[0]}"
    assert list((span.attributes or {})["serverless.stages"]) == names  # type: ignore[arg-type]


BAD_TRACES = [
    "",
    "garbage",
    "01-{t}-{s}-01",  # a version this worker does not know
    "00-{T}-{s}-01",  # upper case
    "00-{t}-{s}-01-extra",
    "00-{t}-{s}-1",
    "00-" + "0" * 32 + "-{s}-01",  # the invalid all-zero ids
    "00-{t}-" + "0" * 16 + "-01",
    " 00-{t}-{s}-01",
]


@pytest.mark.parametrize("bad", BAD_TRACES)
def test_a_malformed_trace_is_ignored_and_the_chunk_runs_in_a_root_span(
    post: Any, spans: InMemorySpanExporter, bad: str
) -> None:
    _, trace_id, span_id = traceparent()
    value = bad.format(t=trace_id, T=trace_id.upper(), s=span_id)
    status, reply = post(*request(sf.square.entry.name, [3], trace=value))
    assert status == 200 and reply is not None and reply.results == [9]
    (span,) = server_spans(spans)
    assert span.parent is None
    assert span.context is not None and f"{span.context.trace_id:032x}" != trace_id


def test_no_span_for_a_refused_request(
    post: Any, route: serverless.WorkerRoute, spans: InMemorySpanExporter
) -> None:
    parent, _, _ = traceparent()
    headers, body = request(sf.square.entry.name, [3], trace=parent)
    forged = request(sf.square.entry.name, [3], trace=parent, secret="another-secret-0123456789")
    unknown = request("tests.sample_functions:nothing_here", [3], trace=parent)
    expired = request(sf.square.entry.name, [3], trace=parent, deadline=time.time() - 1)
    assert post(*forged)[0] == 401
    assert post(*unknown)[0] == 404
    assert post(*expired)[0] == 504  # authenticated, but it never ran
    assert post(headers, body)[0] == 200
    assert post(headers, body)[0] == 409  # the replay
    assert len(server_spans(spans)) == 1  # the one chunk that ran


def test_a_failing_tracer_costs_the_chunk_nothing(
    route: serverless.WorkerRoute,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Telemetry never raises into a chunk: it runs untraced, and it is said once."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("exporter on fire")

    app = route.wsgi()
    assert wsgi_post(app, *request(sf.square.entry.name, [2]))[0] == 200  # tracing decided
    tools = route.endpoint.tracing._tools
    assert tools is not None
    monkeypatch.setattr(tools.tracer, "start_span", broken)
    monkeypatch.setattr(telemetry, "_warned", False)
    spans.clear()
    with caplog.at_level(logging.WARNING, logger="serverless.worker"):
        for _ in range(3):
            status, reply = wsgi_post(app, *request(sf.square.entry.name, [4]))
            assert status == 200 and reply is not None and reply.results == [16]
    assert server_spans(spans) == []
    assert [r.getMessage() for r in caplog.records] == [
        "tracing disabled for a chunk: starting a span failed"
    ]


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False),
    ],
)
def test_traceparent_is_checked_strictly(value: str, valid: bool) -> None:
    assert telemetry.valid_traceparent(value) is valid


def test_a_span_the_app_started_for_the_request_is_linked_not_the_parent(
    route: serverless.WorkerRoute, spans: InMemorySpanExporter
) -> None:
    """A framework's instrumentation traced the HTTP request: the chunk's span still
    continues the caller's trace, and links the framework's span."""
    from opentelemetry import trace

    parent, _, span_id = traceparent()
    with trace.get_tracer("a framework").start_as_current_span("POST /serverless") as outer:
        status, _ = wsgi_post(route.wsgi(), *request(sf.square.entry.name, [2], trace=parent))
    assert status == 200
    (span,) = server_spans(spans)
    assert span.parent is not None and f"{span.parent.span_id:016x}" == span_id
    assert [link.context.span_id for link in span.links] == [outer.get_span_context().span_id]


@pytest.mark.parametrize("function", [sf.square, tf.traced_async], ids=["sync", "async"])
def test_a_call_through_the_in_process_transport_is_one_trace(
    spans: InMemorySpanExporter, function: serverless.ParallelFunction[Any, Any]
) -> None:
    """The caller's side and the worker's meet: each chunk's server span is the child of the
    client span of the request that carried it."""
    assert function.with_options(workers=2, chunk_size=2)([1, 2, 3, 4]) is not None
    finished = spans.get_finished_spans()
    clients = {s.context.span_id: s for s in finished if s.kind == SpanKind.CLIENT and s.context}
    servers = server_spans(spans)
    assert len(servers) == 2 and len(clients) == 2
    for server in servers:
        assert server.parent is not None and server.parent.span_id in clients
        assert server.context is not None and server.context.trace_id == server.parent.trace_id
