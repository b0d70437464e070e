"""OpenTelemetry on the caller: a span per call, a client span per request, and the W3C
traceparent each request carries to its worker (in the signed envelope: `Call.trace`).

Used only where the application has imported `opentelemetry.trace` itself (to set up its
SDK): `import serverless` never imports it, and a call in a process without it costs one
dict lookup. A call whose span is not valid (the API with no SDK behind it) gets no spans at
all; a sampled-out one still passes its traceparent on, so its workers do not record either.
Retries, busy refusals and hedges of a chunk are siblings under the call's span, each linked
to the chunk's first request.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from .._stats import Outcome
from .watch import Request

TRACER = "serverless"
_FAILED: frozenset[Outcome] = frozenset({"failed", "retried", "busy", "lost"})


class CallSpans:
    """One call's spans. Made in the caller's thread (its span's parent is whatever span is
    current there); its requests' spans start and end on the dispatcher's loop."""

    def __init__(self, function: str, attributes: Mapping[str, Any]) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self.function = function
        self.tracer = trace.get_tracer(TRACER)
        self.span = self.tracer.start_span(
            f"serverless.call {function}", kind=trace.SpanKind.INTERNAL, attributes=attributes
        )
        self.context = trace.set_span_in_context(self.span)
        self._first: dict[int, Any] = {}  # chunk index: its first request's span context

    @property
    def valid(self) -> bool:
        return bool(self.span.get_span_context().is_valid)

    def sending(self, request: Request) -> None:
        trace = self._trace
        first = self._first.get(request.chunk)
        links = [trace.Link(first)] if first is not None else None
        span = self.tracer.start_span(
            f"serverless.chunk {self.function}",
            context=self.context,
            kind=trace.SpanKind.CLIENT,
            links=links,
            attributes={
                "serverless.chunk": request.chunk,
                "serverless.request": request.number,
                "serverless.items": request.items,
                "serverless.hedge": request.hedge,
                "url.full": request.url,
            },
        )
        if first is None:
            self._first[request.chunk] = span.get_span_context()
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        request.span, request.trace = span, carrier.get("traceparent", "")

    def ended(self, request: Request, outcome: Outcome, worker: str, error: Any) -> None:
        span = request.span
        if span is None:
            return
        span.set_attribute("serverless.outcome", outcome)
        if worker:
            span.set_attribute("serverless.worker", worker)
        if outcome in _FAILED:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, outcome))
        if outcome == "ok":
            self._first.pop(request.chunk, None)
        span.end()

    def finished(self, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, GeneratorExit):  # not a stream closed
            self.span.record_exception(error)
            status = self._trace.StatusCode.ERROR
            self.span.set_status(self._trace.Status(status, type(error).__name__))
        self.span.end()


def call_spans(function: str, attributes: Mapping[str, Any]) -> CallSpans | None:
    """The call's spans, where the application traces (None: it does not, or has no SDK)."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    spans = CallSpans(function, attributes)
    if not spans.valid:
        spans.span.end()
        return None
    return spans
