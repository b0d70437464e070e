"""The caller's Prometheus metrics: what this process's calls did, read at scrape time.

`serverless.caller_metrics()` turns them on: it registers one collector with a
prometheus_client registry (the default one unless told), and from then on every call of
this process counts what happens to it into a `Meter` (a few integer additions per request,
on the dispatcher's loop). A scrape reads those counts and asks each running call for its
live figures (chunks in flight, window, rate): one collector read at scrape time, not a
metric object updated per request. Until it is called, no call has a meter (its `Watch`
has none, or the call has no Watch at all) and prometheus_client is never imported: it is
an extra (`pip install 'simple-serverless[metrics]'`).

Labels are bounded: `function` (a registered name, fused stages joined) and `outcome` (one
of a fixed few). Never a request id, a URL or a port.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from .._exceptions import ConfigurationError
from .._stats import Outcome
from .watch import Live, Request

PREFIX = "serverless_caller_"
CALL_OUTCOMES = ("ok", "failed", "closed")  # closed: a stream closed early, or cancelled
REQUEST_OUTCOMES: tuple[Outcome, ...] = (
    "ok",
    "part",
    "throttled",
    "busy",
    "retried",
    "failed",
    "lost",
)


class _Counts:
    """One function's counts since metrics were turned on."""

    __slots__ = (
        "busy",
        "calls",
        "chunks",
        "ended",
        "failed",
        "hedges",
        "items",
        "requests",
        "results",
        "seconds",
        "settled",
    )

    def __init__(self) -> None:
        self.calls = 0  # started
        self.ended = dict.fromkeys(CALL_OUTCOMES, 0)
        self.chunks = self.settled = self.items = self.results = self.failed = 0
        self.hedges = self.busy = 0
        self.requests: dict[Outcome, int] = dict.fromkeys(REQUEST_OUTCOMES, 0)
        self.seconds = 0.0  # requests' durations, summed


class Meter:
    """The process's caller metrics: counts by function, and the calls running now."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # calls end in the caller's thread or on the loop
        self.counts: dict[str, _Counts] = {}
        # a call dropped by its Watch (its meter failed) leaves with its objects
        self.running: weakref.WeakSet[CallMeter] = weakref.WeakSet()

    def call(self, function: str) -> CallMeter:
        with self.lock:
            counts = self.counts.get(function)
            if counts is None:
                counts = self.counts[function] = _Counts()
        return CallMeter(self, function, counts)


class CallMeter:
    """One call's side of the meter (a `watch.Metrics`)."""

    __slots__ = ("__weakref__", "counts", "function", "live", "meter", "started")

    def __init__(self, meter: Meter, function: str, counts: _Counts) -> None:
        self.meter, self.function, self.counts = meter, function, counts
        self.live: Live | None = None
        self.started = False

    def begin(self, live: Live) -> None:
        self.live = live
        self._start()

    def _start(self) -> None:
        meter = self.meter
        with meter.lock:
            self.started = True
            self.counts.calls += 1
            meter.running.add(self)

    def sending(self, request: Request) -> None:
        counts = self.counts
        with self.meter.lock:
            counts.items += request.items
            if request.number == 1:  # a chunk's (or a hedge's) first request
                if request.hedge:
                    counts.hedges += 1
                else:
                    counts.chunks += 1

    def ended(self, request: Request, outcome: Outcome) -> None:
        counts = self.counts
        seconds = time.perf_counter() - request.started
        with self.meter.lock:
            counts.requests[outcome] += 1
            counts.seconds += seconds

    def settled(self, results: int, failed: int) -> None:
        counts = self.counts
        with self.meter.lock:
            counts.settled += 1
            counts.results += results
            counts.failed += failed

    def finished(self, error: BaseException | None) -> None:
        if not self.started:  # nothing was sent (every result was in the store)
            self._start()
        if error is None:
            outcome = "ok"
        elif isinstance(error, GeneratorExit | asyncio.CancelledError):
            outcome = "closed"
        else:
            outcome = "failed"
        meter = self.meter
        with meter.lock:
            self.counts.ended[outcome] += 1
            meter.running.discard(self)
        self.live = None


_meter: Meter | None = None  # None: nobody turned the caller's metrics on
_collector: Collector | None = None
_registries: weakref.WeakSet[Any] = weakref.WeakSet()
_setup = threading.Lock()


def meter() -> Meter | None:
    """The process's meter, once `caller_metrics()` turned it on (None: off, no cost)."""
    return _meter


def caller_metrics(registry: Any = None) -> Collector:
    """Expose this process's calls as Prometheus metrics: register the caller's collector
    with `registry` (prometheus_client's default REGISTRY unless given) and return it.
    Calling it again, with the same registry or another, registers the same collector
    where it is not yet; every call made from then on is counted.

    Needs prometheus_client (`pip install 'simple-serverless[metrics]'`). Serve the
    registry as usual, e.g. `prometheus_client.start_http_server(9100)`."""
    global _meter, _collector
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            "serverless.caller_metrics() needs prometheus_client: "
            "pip install 'simple-serverless[metrics]'"
        ) from exc
    with _setup:
        if _meter is None:
            _meter = Meter()
            _collector = Collector(_meter)
        assert _collector is not None
        target = prometheus_client.REGISTRY if registry is None else registry
        if target not in _registries:
            target.register(_collector)
            _registries.add(target)
        return _collector


class Collector:
    """A prometheus_client collector: each scrape reads the meter's counts and the running
    calls' live figures."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def describe(self) -> Iterator[Any]:
        """The families, without samples (what a registry checks names against)."""
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        meter = self.meter
        with meter.lock:
            counts = [(function, _copy(c)) for function, c in meter.counts.items()]
            running = [(call.function, call.live) for call in meter.running]
        families = self._families()
        (calls, ended, chunks, settled, items, results, failed) = families[:7]
        (requests, retries, busy, hedges, throttles, seconds) = families[7:13]
        (active, in_flight, window, rate) = families[13:]
        for function, c in counts:
            calls.add_metric([function], c.calls)
            for outcome, n in c.ended.items():
                ended.add_metric([function, outcome], n)
            chunks.add_metric([function], c.chunks)
            settled.add_metric([function], c.settled)
            items.add_metric([function], c.items)
            results.add_metric([function], c.results)
            failed.add_metric([function], c.failed)
            for outcome, n in c.requests.items():
                requests.add_metric([function, outcome], n)
            retries.add_metric([function], c.requests["retried"])
            busy.add_metric([function], c.requests["busy"])
            hedges.add_metric([function], c.hedges)
            throttles.add_metric([function], c.requests["throttled"])
            seconds.add_metric([function], sum(c.requests.values()), c.seconds)
        live: dict[str, list[float]] = {}  # function: calls, in flight, window, rate
        paced: set[str] = set()
        for function, figures in running:
            sums = live.setdefault(function, [0.0, 0.0, 0.0, 0.0])
            sums[0] += 1
            if figures is None:
                continue
            try:  # read from the scrape's thread: a call may be ending meanwhile
                chunks_now, room = figures.live()[:2]
                allowed = figures.rate()
            except Exception:
                continue
            sums[1] += chunks_now
            sums[2] += room
            if allowed is not None:
                sums[3] += allowed
                paced.add(function)
        for function, sums in live.items():
            active.add_metric([function], sums[0])
            in_flight.add_metric([function], sums[1])
            window.add_metric([function], sums[2])
            if function in paced:
                rate.add_metric([function], sums[3])
        yield from families

    @staticmethod
    def _families() -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        def counter(name: str, doc: str, outcome: bool = False) -> Any:
            labels = ["function", "outcome"] if outcome else ["function"]
            return CounterMetricFamily(PREFIX + name, doc, labels=labels)

        def gauge(name: str, doc: str) -> Any:
            return GaugeMetricFamily(PREFIX + name, doc, labels=["function"])

        return [
            counter("calls_started", "Calls started"),
            counter("calls_finished", "Calls ended: ok, failed, or closed early", True),
            counter("chunks_sent", "Chunks sent (each once, whatever its retries)"),
            counter("chunks_answered", "Chunks whose results are in"),
            counter("items_sent", "Items in the requests sent (a resend counts again)"),
            counter("results", "Results that came back (a filter's fewer)"),
            counter("items_failed", 'Items that failed (errors="return")'),
            counter("requests", "Requests ended, by how they ended", True),
            counter("retries", "Requests sent again after a failure"),
            counter("busy", "Requests refused busy by a worker, waited out"),
            counter("hedges", "Hedges: duplicates of a straggling chunk"),
            counter("throttles", "Requests the function throttled (rate=)"),
            SummaryMetricFamily(
                PREFIX + "request_seconds", "Requests' durations", labels=["function"]
            ),
            gauge("calls_running", "Calls running now"),
            gauge("chunks_in_flight", "Chunks in flight now, over the running calls"),
            gauge("window", "Chunks the running calls may have in flight, summed"),
            gauge("rate", "Items per second the running paced calls allow, summed"),
        ]


def _copy(counts: _Counts) -> _Counts:
    copy = _Counts()
    for name in _Counts.__slots__:
        value = getattr(counts, name)
        setattr(copy, name, dict(value) if isinstance(value, dict) else value)
    return copy
