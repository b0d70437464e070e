"""A call's observers: its progress, its per-request log lines, its spans, its metrics.

The engine (fanout.py) tells a call's `Watch` four things: a request is being sent, a
request ended (and how), a chunk's results are in, the call ended. A call that nobody
watches (the default: no progress=, the log below DEBUG, no tracer, no metrics) has no
Watch at all, so the engine's only cost is a check for None. Whatever an observer does, it
never raises into the call: a failing one is logged once and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from .._stats import ChunkStats, Outcome, Progress

logger = logging.getLogger("serverless.dispatch")

PROGRESS_EVERY = 0.1  # seconds: progress events come at most this often...
PROGRESS_TICK = 0.5  # ...and at least this often while the call runs (elapsed, ETA)


class Live(Protocol):
    """What the engine shows of a running call, read when a progress event is built."""

    def live(self) -> tuple[int, int, int, int, int, int]:
        """Chunks in flight, the window, retries, busy refusals, hedges, throttles so far."""
        ...

    def rate(self) -> float | None:
        """Items per second the call's pacer allows now (None: unpaced)."""
        ...


class Request:
    """One request as the observers know it: when it went, and their handles on it."""

    __slots__ = ("chunk", "hedge", "items", "number", "span", "started", "trace", "url")

    def __init__(self, chunk: int, number: int, items: int, url: str, hedge: bool) -> None:
        self.chunk, self.number, self.items, self.url, self.hedge = chunk, number, items, url, hedge
        self.started = time.perf_counter()
        self.span: Any = None  # the tracer's client span (tracing.py)
        self.trace = ""  # its W3C traceparent, for the envelope


class Spans(Protocol):
    """The tracer's side of a call (tracing.py): a client span per request."""

    def sending(self, request: Request) -> None: ...

    def ended(self, request: Request, outcome: Outcome, worker: str) -> None: ...

    def finished(self, error: BaseException | None) -> None: ...


class Metrics(Protocol):
    """The process's caller metrics' side of a call (metrics.py): counts a scrape reads."""

    def begin(self, live: Live) -> None: ...

    def sending(self, request: Request) -> None: ...

    def ended(self, request: Request, outcome: Outcome) -> None: ...

    def settled(self, results: int, failed: int) -> None: ...

    def finished(self, error: BaseException | None) -> None: ...


class Watch:
    """One call's observers, fed by the engine on the dispatcher's loop."""

    def __init__(
        self,
        function: str,
        call: str,
        *,
        report: Callable[[Progress], None] | None = None,
        step: tuple[str, int, int] = ("", 1, 1),  # the step's name and place in a Pipeline
        total: int | None = None,
        cached: int = 0,  # results found before the call was planned (a list looked up)
        log: bool = False,
        spans: Spans | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.function, self.call = function, call
        self.report, self.step, self.total = report, step, total
        self.log, self.spans, self.metrics = log, spans, metrics
        self.live: Live | None = None
        self.started = time.perf_counter()
        self.done = self.cached = cached  # found before the call: done already
        self.failed = self.chunks = 0
        self._new: list[ChunkStats] = []
        self._last = 0.0  # when the last progress event went
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, live: Live) -> None:
        """The call starts on the loop: its first progress event, and a tick until its last."""
        self.live = live
        if self.metrics is not None:
            self._guard(self.metrics.begin, live)
        if self.report is not None:
            self.progress(False)
            self._timer = asyncio.get_running_loop().call_later(PROGRESS_TICK, self._tick)

    def _tick(self) -> None:
        if time.perf_counter() - self._last >= PROGRESS_TICK:
            self.progress(False)
        if self.report is not None:
            self._timer = asyncio.get_running_loop().call_later(PROGRESS_TICK, self._tick)

    # -- from the engine -------------------------------------------------------------------

    def sending(self, chunk: int, number: int, items: int, url: str, hedge: bool) -> Request:
        request = Request(chunk, number, items, url, hedge)
        if self.spans is not None:
            self._guard(self.spans.sending, request)
        if self.metrics is not None:
            self._guard(self.metrics.sending, request)
        return request

    def ended(self, request: Request, outcome: Outcome, worker: str) -> None:
        if self.log:
            logger.debug(
                "chunk %d of %s: request %d %s",
                request.chunk,
                self.function,
                request.number,
                outcome,
                extra={
                    "call": self.call,
                    "chunk": request.chunk,
                    "attempt": request.number,
                    "worker": worker or request.url,
                    "status": outcome,
                    "seconds": time.perf_counter() - request.started,
                },
            )
        if self.spans is not None:
            self._guard(self.spans.ended, request, outcome, worker)
        if self.metrics is not None:
            self._guard(self.metrics.ended, request, outcome)

    def answered(self, stats: ChunkStats) -> None:
        """A chunk's statistics, as counted (the timeline's new bar)."""
        if self.report is not None:
            self._new.append(stats)

    def settled(self, results: int, failed: int, found: int) -> None:
        """A chunk's results are in: `found` of them from the store, `failed` failures."""
        self.done += results
        self.failed += failed
        self.cached += found
        self.chunks += 1
        if self.metrics is not None:
            self._guard(self.metrics.settled, results, failed)
        if self.report is not None and time.perf_counter() - self._last >= PROGRESS_EVERY:
            self.progress(False)

    def finished(self, error: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.report is not None:
            self.progress(True)
            self.report = None  # nothing after the last event
        if self.spans is not None:
            self._guard(self.spans.finished, error)
        if self.metrics is not None:
            self._guard(self.metrics.finished, error)

    # -- progress ----------------------------------------------------------------------------

    def progress(self, finished: bool) -> None:
        report = self.report
        if report is None:
            return
        now = time.perf_counter()
        self._last = now
        in_flight, window, retries, busy, hedges, throttles = (
            self.live.live() if self.live is not None else (0, 0, 0, 0, 0, 0)
        )
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = None if self.total is None else max(0, self.total - self.done)
        eta = None if left is None or rate <= 0 else left / rate
        name, number, steps = self.step
        new, self._new = tuple(self._new), []
        event = Progress(
            step=name or self.function,
            step_number=number,
            steps=steps,
            total=self.total,
            done=self.done,
            failed=self.failed,
            cached=self.cached,
            chunks_done=self.chunks,
            in_flight=0 if finished else in_flight,
            window=window,
            retries=retries,
            busy=busy,
            hedges=hedges,
            throttles=throttles,
            elapsed=elapsed,
            items_per_s=rate,
            eta=0.0 if finished else eta,
            finished=finished,
            new_chunks=new,
        )
        self._guard(report, event)

    def _guard(self, hook: Callable[..., None], *args: Any) -> None:
        """Run an observer; one that raises is logged once and dropped for the rest of the call."""
        try:
            hook(*args)
        except Exception as exc:
            logger.warning(
                "%s: an observer of the call failed and is turned off for it: %r",
                self.function,
                exc,
                exc_info=True,
            )
            owner = getattr(hook, "__self__", None)
            if self.spans is not None and owner is self.spans:
                self.spans = None
            elif self.metrics is not None and owner is self.metrics:
                self.metrics = None
            else:
                self.report = None
