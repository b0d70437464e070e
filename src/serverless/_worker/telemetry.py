"""OpenTelemetry on the worker: a SERVER span around each authenticated chunk it runs,
continuing the trace its caller put in the signed envelope (`Call.trace`, docs/protocol.md
§5.5), and the SDK set up from the standard environment in the worker processes the library
starts itself.

Tracing is on only where the process has already imported `opentelemetry.trace` (the app
configured it, or `configure_sdk` did): `import serverless` never imports OpenTelemetry, and
a worker without it pays one attribute read per chunk. Each endpoint decides once, at its
first chunk, so an app that sets up OpenTelemetry after `serverless.init()` is still traced.

The span is current while the user's function runs (the thread of a sync function, the task
of an async one), so the spans the function starts nest inside it. It carries the function,
the chunk's index and size, the worker and the fused stages, never an item or the secret; an
event per item error (errors="return"), and status ERROR when the chunk fails. Telemetry
never raises into a chunk: a failure is logged once at WARNING and the chunk runs untraced.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from .. import _wire as p
from .execute import Job, worker_id

logger = logging.getLogger("serverless.worker")

SERVICE_NAME = "serverless-worker"  # where OTEL_SERVICE_NAME names none
MAX_ITEM_EVENTS = 100  # item-error events per span; the count is an attribute regardless
# W3C Trace Context, version 00: exactly this, lower-case (the propagator alone is lenient
# about versions it does not know); the all-zero ids are invalid
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16

FLUSH_MS = 10_000  # how long a worker that stops waits for its last spans to leave

_warned = False
_flush: Callable[[], object] | None = None  # configure_sdk's provider's, once set up


def valid_traceparent(value: str) -> bool:
    """Whether `value` is a W3C traceparent of version 00 with non-zero ids."""
    match = _TRACEPARENT.fullmatch(value)
    return match is not None and match[1] != _ZERO_TRACE and match[2] != _ZERO_SPAN


def _warn_once(what: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning("tracing disabled for a chunk: %s failed", what, exc_info=True)


class _Tools:
    """OpenTelemetry's pieces, imported once tracing is on."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context = context
        self.trace = trace
        self.tracer = trace.get_tracer("serverless")  # follows the global provider, once set
        self.propagator = TraceContextTextMapPropagator()


class Opened:
    """A chunk's span while its chunk runs, and the token that made it current."""

    __slots__ = ("span", "token")

    def __init__(self, span: Any, token: object) -> None:
        self.span = span
        self.token = token


class Tracing:
    """One endpoint's spans: on or off, decided at its first chunk."""

    def __init__(self) -> None:
        self._tools: _Tools | None = None
        self._decided = False

    def _decide(self) -> _Tools | None:
        # decided once the tools exist: a chunk that comes meanwhile decides too (the tools
        # are the same either way), never runs untraced because another is half-way
        tools = None
        if "opentelemetry.trace" in sys.modules:
            try:
                tools = _Tools()
            except Exception:
                _warn_once("setting up OpenTelemetry")
        self._tools = tools
        self._decided = True
        return tools

    def begin(self, job: Job) -> Opened | None:
        """Start the chunk's span and make it current (None where tracing is off)."""
        tools = self._tools if self._decided else self._decide()
        if tools is None:
            return None
        try:
            trace = tools.trace
            call = job.call
            current = trace.get_current_span().get_span_context()
            parent = None  # the current context: the app's own request span, if any
            links = None
            if call.trace and valid_traceparent(call.trace):
                parent = tools.propagator.extract({"traceparent": call.trace})
                # the app's instrumentation traced the request too: its span, linked
                if current.is_valid and f"{current.span_id:016x}" != call.trace[36:52]:
                    links = [trace.Link(current)]
            name = job.entry.name
            attributes: dict[str, Any] = {
                "serverless.function": name,
                "serverless.chunk": call.index,
                "serverless.items": len(call.items),
                "serverless.worker": worker_id(),
                "serverless.request_id": call.id,
            }
            if job.then:
                attributes["serverless.stages"] = [name, *(e.name for e, _ in job.then)]
            span = tools.tracer.start_span(
                f"serverless.run {name}", context=parent, kind=trace.SpanKind.SERVER, links=links
            )
            # set after the start: a mapping passed to start_span is checked against the
            # Sequence and Mapping ABCs (10 us a span here; a sampler sees none of them)
            if span.is_recording():
                span.set_attributes(attributes)
            token = tools.context.attach(trace.set_span_in_context(span))
        except Exception:
            _warn_once("starting a span")
            return None
        job.span = span
        return Opened(span, token)

    def end(self, opened: Opened) -> None:
        """Leave the chunk's span (in the context that entered it) and end it."""
        tools = self._tools
        assert tools is not None
        try:
            tools.context.detach(opened.token)
            opened.span.end()
        except Exception:
            _warn_once("ending a span")

    def answered(self, span: Any, status: int, reply: p.Reply) -> None:
        """What the chunk's answer says, on its span: item errors as events, a failure as
        status ERROR, a throttle, the worker-side timings."""
        tools = self._tools
        if tools is None or not span.is_recording():
            return
        try:
            span.set_attributes(
                {
                    "serverless.status": status,
                    "serverless.queue_s": reply.queue_s,
                    "serverless.compute_s": reply.compute_s,
                }
            )
            if reply.item_errors:
                span.set_attribute("serverless.item_errors", len(reply.item_errors))
                for failed in reply.item_errors[:MAX_ITEM_EVENTS]:
                    span.add_event("exception", _error_attributes(failed.error, failed.index))
            if reply.throttled is not None:
                throttle = reply.throttled
                attributes: dict[str, Any] = {
                    "serverless.at": throttle.at,
                    "serverless.stopped": throttle.stopped,
                }
                if throttle.retry_after is not None:
                    attributes["serverless.retry_after"] = throttle.retry_after
                span.add_event("throttled", attributes)
            error = reply.error
            if error is not None:
                attributes = _error_attributes(error, error.index)
                if error.traceback:
                    attributes["exception.stacktrace"] = error.traceback
                span.add_event("exception", attributes)
                description = f"{error.type}: {error.message}"
                span.set_status(tools.trace.Status(tools.trace.StatusCode.ERROR, description))
        except Exception:
            _warn_once("recording a chunk's answer")


def _error_attributes(error: p.ErrorInfo, index: int | None) -> dict[str, Any]:
    """An exception event's attributes (OpenTelemetry's names): its type and message, and
    the item's index in the chunk, never the item itself."""
    attributes: dict[str, Any] = {
        "exception.type": error.type,
        "exception.message": error.message,
    }
    if index is not None:
        attributes["serverless.item_index"] = index
    if error.stage:
        attributes["serverless.stage"] = error.stage
    return attributes


# -- the SDK in the worker processes the library starts -------------------------------------


def _asked_for() -> bool:
    """Whether the environment asks for traces to be exported over OTLP."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporters:
        return "otlp" in [e.strip() for e in exporters.split(",")]
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_sdk() -> bool:
    """In a worker process the library started (the local pool's, `serverless worker`'s):
    where the environment asks for it (OTEL_TRACES_EXPORTER=otlp, or an
    OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT) and the SDK is installed, export this process's
    spans over OTLP/HTTP in batches, every setting read from the environment by the SDK
    itself, the service named by OTEL_SERVICE_NAME or "serverless-worker". Leaves alone a
    tracer provider set up already (`opentelemetry-instrument`). Whether it set one up: its
    spans are then flushed when the server stops (`flush_sdk`) and at a clean exit."""
    global _flush
    if not _asked_for():
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        logger.warning(
            "the environment asks for OpenTelemetry traces, but %s is not installed: "
            "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http",
            exc.name or "the SDK",
        )
        return False
    try:
        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return False  # configured already: that provider exports
        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE: SERVICE_NAME}))
        provider = TracerProvider(resource=resource)  # shuts down (flushes) at exit
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    except Exception:
        logger.warning("cannot set up OpenTelemetry from the environment", exc_info=True)
        return False
    _flush = functools.partial(provider.force_flush, FLUSH_MS)
    return True


def flush_sdk() -> None:
    """Export the spans still batched by configure_sdk's provider, if it set one up."""
    if _flush is None:
        return
    try:
        _flush()
    except Exception:
        logger.warning("cannot flush the last spans", exc_info=True)


async def flush_sdk_async() -> None:
    """flush_sdk, off the event loop: the ASGI lifespan's shutdown, once the server has
    stopped serving. It cannot wait for the exit: uvicorn then raises again the signal that
    stopped it, and a process killed by its own SIGTERM runs no atexit handler."""
    if _flush is not None:
        await asyncio.get_running_loop().run_in_executor(None, flush_sdk)
