"""The caller's spans (issue 25) on every path a call can take: each call span ends exactly
once, whether the call finishes, fails, is a stream left early or never read, or had
nothing to send; and no span attribute carries a URL's password."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests import sample_functions as sf


class Open(SpanProcessor):
    """The spans started and not yet ended."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        if span.context is not None:
            self.open[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None:
            self.open.pop(span.context.span_id, None)

    def workers_done(self, within: float = 5.0) -> None:
        """Wait (bounded) for the in-process worker's threads to finish the chunks a call let
        go of: their server spans end when the chunk does, whatever the caller did."""
        deadline = time.monotonic() + within
        while any(n.startswith("serverless.run ") for n in list(self.open.values())):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


_OPEN = Open()


@pytest.fixture
def open_spans(spans: InMemorySpanExporter) -> Iterator[Open]:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    if _OPEN not in provider._active_span_processor._span_processors:
        provider.add_span_processor(_OPEN)
    _OPEN.open.clear()
    yield _OPEN
    _OPEN.open.clear()


def calls(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name.startswith("serverless.call ")]


def test_a_finished_call_ends_its_span_once(
    in_process_worker: None, spans: InMemorySpanExporter, open_spans: Open
) -> None:
    assert sf.square.with_options(chunk_size=2)([1, 2, 3]) == [1, 4, 9]
    assert len(calls(spans)) == 1
    assert open_spans.open == {}


def test_a_stream_never_read_leaves_no_span_open(
    in_process_worker: None, spans: InMemorySpanExporter, open_spans: Open
) -> None:
    stream = sf.square.with_options(chunk_size=2).stream([1, 2, 3])
    stream.close()  # type: ignore[attr-defined]
    del stream
    gc.collect()
    assert open_spans.open == {}


def test_a_stream_left_early_ends_its_span_once(
    in_process_worker: None, spans: InMemorySpanExporter, open_spans: Open
) -> None:
    stream = sf.square.with_options(chunk_size=1).stream(range(50))
    assert next(stream) == 0
    stream.close()  # type: ignore[attr-defined]
    (call,) = calls(spans)
    assert call.status.is_unset
    open_spans.workers_done()  # a chunk's thread it let go of may still be running
    assert open_spans.open == {}


PASSWORD = "hunter2-not-for-traces"


@pytest.fixture
def worker_with_password() -> Iterator[str]:
    """The in-process worker, known to the caller by a URL with a user and password."""
    from serverless import _targets
    from serverless._caller.inprocess import InProcess
    from serverless._caller.transport import Target
    from serverless._wire import Keyring
    from serverless._worker.endpoint import Endpoint
    from tests.conftest import SECRET

    keyring = Keyring(SECRET)
    transport = InProcess(Endpoint("/serverless", keyring))
    url = f"http://someone:{PASSWORD}@w/serverless?password={PASSWORD}"
    target = Target((url,), "/serverless", keyring, "in-process", transport=transport)
    with _targets.override(target):
        yield url
    transport.close()


def test_no_span_log_field_or_trace_file_shows_a_urls_password(
    worker_with_password: str,
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Any,
) -> None:
    import json
    import logging

    caplog.set_level(logging.DEBUG, logger="serverless")
    results, stats = sf.fail_on.with_options(chunk_size=1, retries=1).with_stats([1, 2, 3], 5)
    assert results == [1, 2, 3]
    shown = [repr(dict(s.attributes or {})) for s in spans.get_finished_spans()]
    assert any("someone" in attributes for attributes in shown)  # the URL is there...
    assert not any(PASSWORD in attributes for attributes in shown)  # ...not its password
    assert not any(PASSWORD in repr(vars(r)) for r in caplog.records)
    path = tmp_path / "run.json"
    stats.save_trace(path)
    json.loads(path.read_text())
    assert PASSWORD not in path.read_text()
