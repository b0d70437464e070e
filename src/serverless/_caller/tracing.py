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

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .._stats import Outcome
from .watch import Request

TRACER = "serverless"
# a lost request (its hedge won, or the call ended: a stream closed early) failed at nothing
_FAILED: frozenset[Outcome] = frozenset({"failed", "retried", "busy"})
logger = logging.getLogger("serverless.dispatch")


class CallSpans:
    """One call's spans. Made in the caller's thread (its span's parent is whatever span is
    current there); its requests' spans start and end on the dispatcher's loop."""

    def __init__(
        self, trace: Any, tracer: Any, function: str, attributes: Mapping[str, Any]
    ) -> None:
        self._trace = trace
        self.function = function
        self.tracer = tracer
        # attributes set after the start, not passed to it: the SDK checks a mapping passed
        # to start_span against the Sequence and Mapping ABCs, 10 us a span here (a sampler
        # therefore sees none: ours are for reading, not for sampling on)
        self.span = tracer.start_span(f"serverless.call {function}", kind=trace.SpanKind.INTERNAL)
        if self.span.is_recording():
            self.span.set_attributes(attributes)
        self.context = trace.set_span_in_context(self.span)
        self._first: dict[int, Any] = {}  # chunk index: its first request's span context

    @property
    def valid(self) -> bool:
        return bool(self.span.get_span_context().is_valid)

    def sending(self, request: Request) -> None:
        trace = self._trace
        first = self._first.get(request.chunk)
        links = [trace.Link(first)] if first is not None else None
        attributes = {
            "serverless.chunk": request.chunk,
            "serverless.request": request.number,
            "serverless.items": request.items,
            "url.full": request.url,
        }
        if request.hedge:  # only on hedges: each attribute costs the SDK a check
            attributes["serverless.hedge"] = True
        span = self.tracer.start_span(
            f"serverless.chunk {self.function}",
            context=self.context,
            kind=trace.SpanKind.CLIENT,
            links=links,
        )
        if span.is_recording():
            span.set_attributes(attributes)
        context = span.get_span_context()
        if first is None:
            self._first[request.chunk] = context
        # the W3C traceparent, as the propagator writes it (no tracestate travels), without
        # a Context and a carrier per request
        request.span = span
        request.trace = (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        )

    def ended(self, request: Request, outcome: Outcome, worker: str) -> None:
        span = request.span
        if span is None:
            return
        if worker:  # one call, one lock
            span.set_attributes({"serverless.outcome": outcome, "serverless.worker": worker})
        else:
            span.set_attribute("serverless.outcome", outcome)
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


_tracers: tuple[Any, Any] = (None, None)  # the global tracer provider, and our tracer from it


def _tracer(trace: Any) -> Any:
    """The library's tracer from the global provider, asked for again only when the provider
    changes (an SDK's get_tracer builds a new tracer each time: 15 us here)."""
    global _tracers
    provider = trace.get_tracer_provider()
    cached, tracer = _tracers
    if provider is not cached:
        tracer = provider.get_tracer(TRACER)
        _tracers = (provider, tracer)
    return tracer


def call_spans(function: str, attributes: Callable[[], Mapping[str, Any]]) -> CallSpans | None:
    """The call's spans, where the application traces (None: it does not, or has no SDK, or
    its SDK failed: logged, never raised into the call). `attributes` are built only here."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    # the API's own providers: no SDK set up, every span a no-op (the API imported by some
    # library, no provider set: 30 us a call for nothing otherwise)
    if isinstance(
        trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    ):
        return None
    try:
        spans = CallSpans(trace, _tracer(trace), function, attributes())
        if not spans.valid:
            spans.span.end()
            return None
    except Exception as exc:
        logger.warning(
            "%s: the call's span could not be started; the call goes on untraced: %r",
            function,
            exc,
            exc_info=True,
        )
        return None
    return spans
