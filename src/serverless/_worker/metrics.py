"""Prometheus metrics of a worker, served at `/metrics` beside the health route.

Only where `prometheus_client` (the `metrics` extra) is installed and the route asks for it
(`serverless.init(metrics=...)`, `serverless worker --metrics/--no-metrics`): otherwise the
recorder is `OFF`, which does nothing, nothing is imported, and `/metrics` is a 404 like any
other unknown path. Even then, nothing is imported nor registered before the first chunk or
scrape, so a process that only calls pays nothing.

Labels are bounded by construction: `function` is only ever the registered name of the first
function of a chunk that passed every check (a fused chunk counts under its first stage), and
a refusal before that is counted by `reason`, one of the fixed `REASONS`; no request id, URL
or port is ever a label. A flood of requests naming random functions, signed or not, adds to
`serverless_worker_refused_total` and creates no series.

Where several processes serve one port (`serverless worker --processes N`, gunicorn), each
writes its figures to the directory named by PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode), and any process's `/metrics` reports their sum; the gauge of busy threads
sums the live processes only. The cost is a few updates per chunk, none per item.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, Literal

from .. import _wire as p

logger = logging.getLogger("serverless.worker")

DEFAULT_PATH = "/metrics"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Why a request was refused before its chunk was admitted (docs/protocol.md §7).
Reason = Literal[
    "too_large",  # Content-Length over max_body (check 1)
    "bad_method",  # not a POST (check 2)
    "bad_version",  # Serverless-Version is not ours (check 4)
    "bad_headers",  # no or a bad Content-Length, timestamp, signature header, request id...
    "stale_timestamp",  # outside the tolerance window (check 6)
    "unknown_key",  # no signature with a key id this worker knows (check 8)
    "overloaded",  # too many unauthenticated bytes held in this process (503)
    "slow_body",  # the body came too slowly (408)
    "bad_body",  # shorter or longer than its Content-Length, or the client left
    "bad_signature",  # no signature matches (check 11)
    "replayed",  # the request id was seen already (check 12)
    "wrong_worker",  # signed for another local pool worker, or before this one started
    "replay_unavailable",  # the replay store failed
    "unknown_function",  # authenticated, but names no registered function (check 13)
    "malformed",  # authenticated, but the envelope is wrong (checks 14 to 18)
    "bad_input",  # authenticated, but a value does not fit its annotation (check 19)
]
REASONS: tuple[Reason, ...] = Reason.__args__  # type: ignore[attr-defined]

Outcome = Literal["ok", "error", "throttled", "busy", "expired"]
OUTCOMES: tuple[Outcome, ...] = Outcome.__args__  # type: ignore[attr-defined]

# seconds: a chunk runs for milliseconds to minutes; a queue holds it for microseconds to
# its start_by (a second by default) or a balancer's timeout
CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def installed() -> bool:
    """Whether prometheus_client can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("prometheus_client") is not None
    except (ImportError, ValueError):  # an import hook that refuses it; a module left half-set
        return False


class Recorder:
    """Where a worker counts what it does; this one counts nothing (`OFF`)."""

    enabled = False

    def refused(self, reason: Reason) -> None:
        """A request refused before its chunk was admitted."""

    def answered(self, function: str, items: int, status: int, reply: p.Reply) -> None:
        """An admitted chunk of `items` items of `function`, answered with `reply`."""

    def busy(self, delta: int) -> None:
        """A thread starts (+1) or ends (-1) a chunk."""


OFF = Recorder()


class Prometheus(Recorder):
    """The process's metrics, in prometheus_client's default registry (an app that serves
    its own /metrics from it shows them too), created at first use."""

    enabled = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built = False
        self._children: dict[tuple[str, ...], Any] = {}  # labelled metrics, by their labels
        self.enabled = True  # False once building them failed (a name the app took already)

    def _build(self) -> None:
        with self._lock:
            if self._built:
                return
            from prometheus_client import Counter, Gauge, Histogram

            sweep_dead(os.environ.get(MULTIPROC_ENV))
            labels = ("function", "outcome")
            self._chunks = Counter(
                "serverless_worker_chunks",
                "Chunks answered, by function and outcome (ok, error, throttled, busy, expired)",
                labels,
            )
            self._items = Counter(
                "serverless_worker_items",
                "Items of the chunks answered, by function and outcome (error: no result; "
                "throttled, busy, expired: not run, sent back to the caller)",
                labels,
            )
            self._item_errors = Counter(
                "serverless_worker_item_errors",
                "Items whose run raised (each one under errors='return', else the chunk's)",
                ("function",),
            )
            self._throttles = Counter(
                "serverless_worker_throttles",
                "Chunks stopped by a Throttled the function raised",
                ("function",),
            )
            self._seconds = Histogram(
                "serverless_worker_chunk_seconds",
                "Seconds a chunk's functions ran (a paced chunk's waits left out)",
                ("function",),
                buckets=CHUNK_BUCKETS,
            )
            self._queue = Histogram(
                "serverless_worker_queue_seconds",
                "Seconds from a chunk's admission to its start (waiting for a thread)",
                ("function",),
                buckets=QUEUE_BUCKETS,
            )
            self._busy = Gauge(
                "serverless_worker_threads_busy",
                "Threads running a chunk of a sync function now",
                multiprocess_mode="livesum",
            )
            self._refused = Counter(
                "serverless_worker_refused",
                "Requests refused before their chunk was admitted, by reason",
                ("reason",),
            )
            for reason in REASONS:  # every series from the start, so rates see the first
                self._refused.labels(reason)
            self._built = True

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (str(id(metric)), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def refused(self, reason: Reason) -> None:
        if not self.enabled:
            return
        try:
            self._ready()
            self._child(self._refused, reason).inc()
        except Exception:
            _warn_once("counting a refusal")

    def answered(self, function: str, items: int, status: int, reply: p.Reply) -> None:
        if not self.enabled:
            return
        try:
            self._ready()
            self._answered(function, items, reply)
        except Exception:
            _warn_once("counting a chunk")

    def busy(self, delta: int) -> None:
        if not self.enabled:
            return
        try:
            self._ready()
            self._busy.inc(delta)
        except Exception:
            _warn_once("counting busy threads")

    def _ready(self) -> None:
        if not self._built:
            try:
                self._build()
            except Exception:
                self.enabled = False  # said once by the caller; no retry on every chunk
                raise

    def _answered(self, function: str, items: int, reply: p.Reply) -> None:
        error, throttle = reply.error, reply.throttled
        child = self._child
        if error is not None:
            outcome: Outcome = (
                "busy"
                if error.kind == "busy"
                else "expired"
                if error.kind == "expired"
                else "error"
            )
            child(self._chunks, function, outcome).inc()
            child(self._items, function, outcome).inc(items)
            if outcome == "error":  # it ran
                if error.kind == "user":
                    child(self._item_errors, function).inc()
                child(self._seconds, function).observe(reply.compute_s)
                child(self._queue, function).observe(reply.queue_s)
            return
        failed = len(reply.item_errors) if reply.item_errors else 0
        sent_back = max(0, items - throttle.at) if throttle is not None else 0
        child(self._chunks, function, "ok" if throttle is None else "throttled").inc()
        child(self._items, function, "ok").inc(max(0, items - failed - sent_back))
        if failed:
            child(self._items, function, "error").inc(failed)
            child(self._item_errors, function).inc(failed)
        if throttle is not None:
            child(self._items, function, "throttled").inc(sent_back)
            if not throttle.stopped:
                child(self._throttles, function).inc()
        child(self._seconds, function).observe(reply.compute_s)
        child(self._queue, function).observe(reply.queue_s)


_warned = False


def _warn_once(what: str) -> None:
    """Metrics never fail a chunk: a failure is said once, and the chunk goes on."""
    global _warned
    if not _warned:
        _warned = True
        logger.warning("metrics: %s failed", what, exc_info=True)


_process: Prometheus | None = None
_process_lock = threading.Lock()


def _metrics() -> Prometheus:
    global _process
    with _process_lock:
        if _process is None:
            _process = Prometheus()
        return _process


def recorder(enabled: bool) -> Recorder:
    """The process's recorder where metrics are asked for and prometheus_client is
    installed; OFF otherwise. Its metrics are built now, as the endpoint is made: built at
    the first chunk, the import of prometheus_client held every thread's first chunk behind
    its lock (~0.1 s), long enough for a caller calling back into the app to take back those
    chunks as not started (the server's copies then refused, 409)."""
    if not (enabled and installed()):
        return OFF
    metrics = _metrics()
    try:
        metrics._ready()
    except Exception:
        _warn_once("building the metrics")
    return metrics


def exposition() -> tuple[bytes, str]:
    """The text a scrape gets, and its content type: this process's registry, or in
    multiprocess mode the sum over every process's files."""
    _metrics()._build()
    from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, REGISTRY, generate_latest

    registry: Any = REGISTRY
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


# -- several processes behind one port -----------------------------------------------------

_LIVE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def sweep_dead(path: str | None) -> None:
    """Forget the busy threads of processes that died without saying so (a crash, SIGKILL):
    the live gauges' files whose process no longer exists."""
    if not path:
        return
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = _LIVE_FILE.fullmatch(os.path.basename(name))
        if match is None:
            continue
        pid = int(match[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.remove(name)
        except OSError:  # another user's process: alive
            pass


MULTIPROC_PREFIX = "serverless-metrics-"
_LEFT = re.compile(re.escape(MULTIPROC_PREFIX) + r"(\d+)-\w+")


def sweep_left_behind() -> None:
    """Remove the directories of `serverless worker`s SIGKILLed before they could: this
    user's own (never a link, never another user's), whose process no longer exists."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        match = _LEFT.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(root, name)
        try:
            info = os.lstat(path)
            os.kill(int(match[1]), 0)
        except ProcessLookupError:  # its process is gone: left behind
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # gone already, or another user's process: alive
            pass


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[str]:
    """For the processes the library starts behind one port: a fresh private (0700)
    directory in PROMETHEUS_MULTIPROC_DIR while the block runs, removed after. One the
    operator set is used as it is, and kept."""
    if os.environ.get(MULTIPROC_ENV):
        yield os.environ[MULTIPROC_ENV]
        return
    sweep_left_behind()
    # mode 0700, a random name; the pid tells a later sweep whether its owner still runs
    path = tempfile.mkdtemp(prefix=f"{MULTIPROC_PREFIX}{os.getpid()}-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def scrape(method: str) -> p.Response:
    """The answer to a request for the metrics path: GET (or HEAD) only. Unauthenticated,
    as the health route is: it tells who can reach it the functions' names and counts."""
    if method not in ("GET", "HEAD"):
        return p.Response(405, {"content-type": "text/plain", "content-length": "0"})
    try:
        body, content_type = exposition()
    except Exception:  # telemetry never takes a worker down: the scrape fails, logged
        logger.warning("cannot render the metrics", exc_info=True)
        return p.Response(500, {"content-type": "text/plain", "content-length": "0"})
    headers = {"content-type": content_type, "content-length": str(len(body))}
    return p.Response(200, headers, b"" if method == "HEAD" else body)
