"""The caller's spans (issue 25.3), with the real OpenTelemetry SDK and an in-memory exporter,
through the in-process transport: a call span under the user's, a client span per request
whose traceparent travels in the signed envelope, retries and hedges as linked siblings, the
call's status, and telemetry that never raises into the call."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import serverless
from serverless import WorkerUnavailable, _targets
from serverless import _wire as p
from serverless._caller.http import Body
from serverless._caller.inprocess import InProcess
from serverless._caller.transport import Target
from serverless._wire import Keyring, Response
from serverless._worker.endpoint import Endpoint
from tests.conftest import SECRET
from tests.telemetry_functions import fails_on_three, plus_one, traced
from tests.unit.conftest import ROUTE, URLS

RUNS: dict[int, int] = {}
RUNS_LOCK = threading.Lock()


@serverless.parallel(workers=8, chunk_size=1, idempotent=True)
def first_run_of_zero_stalls(numbers: list[int], stall: float) -> list[int]:
    """Item 0's first run stalls: a straggler for a hedge to overtake."""
    with RUNS_LOCK:
        first = 0 in numbers and RUNS.setdefault(0, 0) == 0
        if 0 in numbers:
            RUNS[0] += 1
    if first:
        time.sleep(stall)
    return [n * 10 for n in numbers]


@pytest.fixture
def exporter(spans: InMemorySpanExporter) -> InMemorySpanExporter:
    """The SDK as this process's tracer provider, exporting to memory (tests/conftest.py):
    the spans this test ended."""
    return spans


class Recording(InProcess[Endpoint]):
    """Keeps each request's envelope `trace`; the first `fail` requests get a 502 from the
    front (a balancer whose upstream died), never reaching the worker."""

    def __init__(self, endpoint: Endpoint, fail: int = 0) -> None:
        super().__init__(endpoint)
        self.fail = fail
        self.traces: list[str] = []

    async def post(
        self,
        url: str,
        body: Body,
        headers: Mapping[str, str],
        timeout: float,
        *,
        fresh: bool = False,
    ) -> Response:
        data = body.take()
        self.traces.append(p.decode_wire_call(data, p.MSGPACK).trace)
        if self.fail > 0:
            self.fail -= 1
            self.requests += 1
            raise WorkerUnavailable("bad gateway", url=url, status=502)
        return await super().post(url, Body(data), headers, timeout)


@pytest.fixture
def recording() -> Iterator[Recording]:
    keyring = Keyring(SECRET)
    transport = Recording(Endpoint(ROUTE, keyring))
    with _targets.override(Target(URLS, ROUTE, keyring, "in-process", transport=transport)):
        yield transport
    transport.close()


def spans_of(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one call span, and its requests' client spans in the order they started."""
    spans = exporter.get_finished_spans()
    calls = [s for s in spans if s.name.startswith("serverless.call ")]
    assert len(calls) == 1, [s.name for s in spans]
    clients = sorted(
        (s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0
    )
    return calls[0], clients


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def traceparent(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_a_call_span_under_the_users_and_a_client_span_per_request_in_the_envelope(
    exporter: InMemorySpanExporter, recording: Recording
) -> None:
    plus_one([0])  # the endpoint decides at its first chunk whether it traces
    exporter.clear()
    recording.traces.clear()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("user") as user:
        assert plus_one(list(range(6))) == list(range(1, 7))
    call, clients = spans_of(exporter)
    user_context = user.get_span_context()
    assert call.parent is not None and call.parent.span_id == user_context.span_id
    assert call.context is not None and call.context.trace_id == user_context.trace_id
    assert call.name == f"serverless.call {plus_one.entry.name}"
    attributes = attrs(call)
    assert attributes["serverless.function"] == plus_one.entry.name
    assert attributes["serverless.items"] == 6
    options = str(attributes["serverless.options"]).split()
    assert "workers=4" in options and "chunk_size=2" in options and "retries=3" in options
    assert attributes["serverless.target"] == "in-process"
    assert call.status.status_code == StatusCode.UNSET
    assert len(clients) == 3
    for client in clients:
        assert client.parent is not None and client.parent.span_id == call.context.span_id
        a = attrs(client)
        assert a["serverless.items"] == 2 and a["serverless.request"] == 1
        assert a["serverless.outcome"] == "ok" and "serverless.hedge" not in a
        assert str(a["url.full"]) in URLS and a["serverless.worker"]
        assert not client.links
    assert sorted(attrs(c)["serverless.chunk"] for c in clients) == [0, 1, 2]
    # each request carried its own client span's traceparent, signed with the body
    assert sorted(recording.traces) == sorted(traceparent(c) for c in clients)
    # and the worker (here in this process) continued it: a server span under each
    servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert sorted(s.parent.span_id for s in servers if s.parent) == sorted(
        c.context.span_id for c in clients if c.context
    )
    assert {s.context.trace_id for s in servers if s.context} == {user_context.trace_id}


def test_the_functions_own_span_nests_in_the_workers_under_the_callers(
    exporter: InMemorySpanExporter,
) -> None:
    traced([0])  # the endpoint decides at its first chunk whether it traces
    exporter.clear()
    assert traced.with_options(chunk_size=5)(list(range(10))) == list(range(1, 11))
    call, clients = spans_of(exporter)
    by_id = {s.context.span_id: s for s in exporter.get_finished_spans() if s.context}
    inner = [s for s in by_id.values() if s.name == "inner sync"]
    assert len(inner) == 2 and len(clients) == 2
    for span in inner:
        assert span.parent is not None
        server = by_id[span.parent.span_id]
        assert server.kind == SpanKind.SERVER and server.parent is not None
        client = by_id[server.parent.span_id]
        assert client.kind == SpanKind.CLIENT and client.parent is not None
        assert client.parent.span_id == call.context.span_id


def test_a_retry_is_a_sibling_client_span_linked_to_the_first(
    exporter: InMemorySpanExporter, recording: Recording
) -> None:
    recording.fail = 1
    assert plus_one.with_options(chunk_size=10)(list(range(4))) == [1, 2, 3, 4]
    call, clients = spans_of(exporter)
    assert len(clients) == 2
    first, second = clients
    assert first.parent == second.parent and first.parent is not None
    assert first.parent.span_id == call.context.span_id
    assert attrs(first)["serverless.outcome"] == "retried"
    assert first.status.status_code == StatusCode.ERROR
    assert attrs(second)["serverless.outcome"] == "ok"
    assert attrs(second)["serverless.request"] == 2
    assert [link.context.span_id for link in second.links] == [first.context.span_id]
    assert recording.traces == [traceparent(first), traceparent(second)]
    assert call.status.status_code == StatusCode.UNSET  # the call succeeded


def test_a_hedge_is_a_sibling_client_span_linked_to_the_straggler(
    exporter: InMemorySpanExporter,
) -> None:
    RUNS.clear()
    out, stats = first_run_of_zero_stalls.with_stats(list(range(12)), 2.0)
    assert out == [10 * n for n in range(12)] and stats.hedges >= 1
    # the straggler's request ends as its cancellation lands, maybe after the call returned
    deadline = time.monotonic() + 5
    while True:
        call, clients = spans_of(exporter)
        zero = [c for c in clients if attrs(c)["serverless.chunk"] == 0]
        if len(zero) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(zero) == 2
    straggler, hedge = zero
    assert attrs(hedge)["serverless.hedge"] is True
    assert attrs(hedge)["serverless.outcome"] == "ok"
    assert [link.context.span_id for link in hedge.links] == [straggler.context.span_id]
    assert hedge.parent == straggler.parent == call.context
    # the straggler lost the race: cancelled, which is no failure of its own
    assert attrs(straggler)["serverless.outcome"] == "lost"
    assert straggler.status.status_code == StatusCode.UNSET


def test_a_failed_call_marks_its_span_an_error_with_the_exception(
    exporter: InMemorySpanExporter,
) -> None:
    with pytest.raises(serverless.RemoteError):
        fails_on_three(list(range(6)))
    call, clients = spans_of(exporter)
    assert call.status.status_code == StatusCode.ERROR
    assert [e.name for e in call.events] == ["exception"]
    assert attrs(call.events[0])["exception.type"].endswith("RemoteError")
    failed = [c for c in clients if attrs(c)["serverless.outcome"] == "failed"]
    assert [attrs(c)["serverless.chunk"] for c in failed] == [3]
    assert failed[0].status.status_code == StatusCode.ERROR


def test_a_stream_closed_early_is_not_an_error(exporter: InMemorySpanExporter) -> None:
    stream = plus_one.with_options(chunk_size=1, workers=2).stream(list(range(100)))
    assert next(stream) == 1
    stream.close()  # type: ignore[attr-defined]
    call, clients = spans_of(exporter)
    assert call.status.status_code == StatusCode.UNSET and not call.events
    assert call.end_time is not None
    assert all(c.status.status_code == StatusCode.UNSET for c in clients)
    assert len(clients) < 100


class RaisingExporter(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        raise RuntimeError("the collector is down")


class RaisingProcessor(SpanProcessor):
    def __init__(self, when: str) -> None:
        self.when = when

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.when == "start":
            raise RuntimeError("a span processor failed on start")

    def on_end(self, span: ReadableSpan) -> None:
        if self.when == "end":
            raise RuntimeError("a span processor failed on end")


@pytest.mark.parametrize("broken", ["exporter", "processor on start", "processor on end"])
def test_a_failing_sdk_never_raises_into_the_call(
    broken: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    provider = TracerProvider()
    if broken == "exporter":  # the SDK's own processor catches and logs its exporter's error
        provider.add_span_processor(SimpleSpanProcessor(RaisingExporter()))
    else:
        provider.add_span_processor(RaisingProcessor(broken.rpartition(" ")[2]))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    with caplog.at_level(logging.WARNING):
        assert plus_one(list(range(40))) == list(range(1, 41))
    # the caller's lines (the worker, in this process here, may log its own once)
    ours = [r for r in caplog.records if r.name == "serverless.dispatch"]
    if broken == "exporter":
        assert not ours
        assert any(r.name.startswith("opentelemetry") for r in caplog.records)
    else:  # one line for the call, then it goes on untraced
        assert [r.levelname for r in ours] == ["WARNING"], [r.getMessage() for r in ours]


def test_without_a_tracer_provider_a_call_has_no_spans_and_sends_no_traceparent(
    recording: Recording, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)  # the API alone: no SDK behind it
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert plus_one(list(range(6))) == list(range(1, 7))
    assert recording.traces == ["", "", ""]
