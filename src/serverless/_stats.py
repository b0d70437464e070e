"""Statistics of chunks, steps and pipeline runs: measured, never estimated; and the
timeline a run's `save_trace` writes from them.

The timeline is Chrome's Trace Event Format (read by Perfetto and chrome://tracing): one
process per step, one thread (track) per worker process that answered, one complete ("X")
slice per request of a chunk. Retries, busy refusals, throttled requests, a paced chunk's
parts and hedges are slices of their own, named and coloured by how they ended; a request
no worker answered sits on a track for its URL. Keys are short and the JSON compact: a
10,000-chunk call writes about 2 MB (issue 25 asks for under 5 MB).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._wire import StageFigures

StepKind = Literal["parallel", "sequential"]
# where a step's chunks went: a URL, the app's own route, the local pool, the caller itself
# (a sequential step), a worker endpoint in this process (tests), or nowhere (an empty input)
TargetKind = Literal["url", "self", "local", "caller", "in-process", "none"]


# how one request of a chunk ended: answered whole ("ok"); answered up to a Throttled (its
# items from there were sent again); answered as a part of a paced chunk (the rest followed);
# refused "busy" by a signed answer (nothing ran; waited out and sent again); failed and sent
# again ("retried"); failed for good; or cancelled unanswered ("lost": a hedge whose sibling
# won, or the call ended first)
Outcome = Literal["ok", "throttled", "part", "busy", "retried", "failed", "lost"]


@dataclass
class Try:
    """One request of a chunk, where the chunk took more than one or was hedged: times are
    seconds since the call started; `worker` is "" where no worker answered."""

    start: float
    end: float
    url: str
    worker: str
    outcome: Outcome
    items: int
    hedge: bool = False  # sent by a hedge (a duplicate for a straggler), not the first run


@dataclass
class ChunkStats:
    """One chunk as measured: caller-side times are seconds since the call started.

    attempts: 1 + the times it was sent again after a failure (busy refusals, throttles and
    a paced chunk's parts are not retries); busy: signed "busy" refusals it waited out;
    tries: each of its requests, where it took more than one or was hedged (else empty)."""

    index: int
    size: int
    worker: str
    url: str
    start: float
    end: float
    queue_s: float
    compute_s: float
    attempts: int
    stages: list[StageFigures] = field(default_factory=list)  # a fused call's, per stage
    throttles: int = 0  # times the function raised Throttled on this chunk (none retried)
    busy: int = 0
    tries: list[Try] = field(default_factory=list)


@dataclass
class StepStats:
    """One run of one step.

    duration: wall time in the caller; in a fused group (steps that ran in the same
    requests), the group's wall time shared among its steps in proportion to the compute
    each measured on the workers, so the steps' durations add up to the group's.
    workers: chunks sent (1 for a sequential step); count / count_out: elements in and out;
    compute_s: the sum of worker-side compute time; retries: requests sent again after a
    failure (a lost connection, a timeout, a 502/503/504, an unsigned 429); busy: signed
    "busy" refusals waited out (nothing ran; not retries: they never use up `retries`);
    hedges: duplicates sent for stragglers; chunks: per-chunk measurements (the first
    10,000 of a call; the counters are exact); fused_with: in a Pipeline, the number of the
    step whose requests also ran this one (None when it had requests of its own).
    throttles: items the downstream refused (the function raised serverless.Throttled; each
    was sent again); rate: the items per second the call was paced at when it ended (its
    `rate=`, or where throttles settled it; None: unpaced); window: the chunks it could keep
    in flight when it ended; items_per_s: the rate it achieved (count / duration).
    buffered: the most bytes of results (as encoded on the wire) the call held at once
    waiting for an earlier chunk, to keep the input order (a stream holds at most about its
    `buffer=`).
    inline: chunks that ran in the caller's own thread (a call made while serving a request,
    on the app it calls back into), where the app had no free thread to send them to.
    failed: errors="return": the input indices of the items that failed, in order.
    cache_hits: items whose results came from the result store (cache=); items_sent: items
    that workers answered (the misses); cache_error: why the store stopped being used during
    the call, if it did (the call went on uncached).
    started: the Unix time the call started (a timeline puts the steps of a run in place).
    """

    name: str
    kind: StepKind
    duration: float
    workers: int
    count: int
    count_out: int
    compute_s: float
    retries: int = 0
    hedges: int = 0
    target: TargetKind = "local"
    chunks: list[ChunkStats] = field(default_factory=list)
    fused_with: int | None = None
    throttles: int = 0
    rate: float | None = None
    window: int = 0
    buffered: int = 0
    inline: int = 0
    failed: list[int] = field(default_factory=list)
    cache_hits: int = 0
    items_sent: int = 0
    cache_error: str | None = None
    busy: int = 0
    started: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.count / self.duration if self.duration > 0 else 0.0

    @property
    def processes(self) -> int:
        """Distinct worker processes that answered."""
        return len({c.worker for c in self.chunks}) or 1

    def line(self) -> str:
        plural = "s" if self.workers != 1 else ""
        shared = f" (in the same requests as step {self.fused_with})" if self.fused_with else ""
        return (
            f'Step "{self.name}" took {self.duration:.2f}s for {self.workers} worker{plural} '
            f"and {self.count} elements{shared}"
        )

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Write this run as Chrome trace JSON (opens in Perfetto and chrome://tracing)."""
        save_trace([self], path)


@dataclass
class PipelineRun:
    """One run of a Pipeline: its result and the statistics of every step, in order."""

    result: Any
    steps: list[StepStats]
    duration: float

    @property
    def compute_s(self) -> float:
        return sum(s.compute_s for s in self.steps)

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Write the run as Chrome trace JSON, its steps one after the other."""
        save_trace(self.steps, path)

    def report(self) -> str:
        lines = [f"Pipeline took {self.duration:.2f}s", "Details per pipeline step:"]
        lines += [f"  {n} - {s.line()}" for n, s in enumerate(self.steps, 1)]
        return "\n".join(lines)


@dataclass(frozen=True)
class Progress:
    """Where a running call (or a Pipeline's step) stands: what `progress=callable` gets, at
    most every PROGRESS_EVERY seconds, plus a first event and a last (`finished`).

    step, step_number, steps: the step's name and place (1 of 1 for a lone call); total:
    items in the input (None: a stream); done: items answered, failures and results found in
    the store included; failed: items that failed (errors="return"); cached: results found in
    the store; chunks_done; in_flight: chunks in flight now; window: chunks it may have in
    flight now; retries, busy, hedges, throttles: as in StepStats, so far; elapsed: seconds
    since the step started; items_per_s: done / elapsed; eta: seconds left at that rate (None:
    unknown); new_chunks: the chunks answered since the previous event, each once (a timeline
    grows from them).
    """

    step: str
    step_number: int
    steps: int
    total: int | None
    done: int
    failed: int
    cached: int
    chunks_done: int
    in_flight: int
    window: int
    retries: int
    busy: int
    hedges: int
    throttles: int
    elapsed: float
    items_per_s: float
    eta: float | None
    finished: bool
    new_chunks: tuple[ChunkStats, ...] = ()


# -- the timeline ---------------------------------------------------------------------------

# Chrome's reserved colour names (the viewer's palette): how a request ended
_COLOURS = {
    "ok": "good",
    "part": "good",
    "throttled": "bad",
    "busy": "yellow",
    "retried": "terrible",
    "failed": "terrible",
    "lost": "grey",
}


def save_trace(steps: Sequence[StepStats], path: str | os.PathLike[str]) -> None:
    """Write `steps` (one call's, or a Pipeline run's in order) to `path`."""
    with open(path, "w", encoding="utf-8") as out:
        json.dump(chrome_trace(steps), out, separators=(",", ":"))


def chrome_trace(steps: Sequence[StepStats]) -> dict[str, Any]:
    """The trace as a JSON-ready dict: {"traceEvents": [...], "displayTimeUnit": "ms"}."""
    origin = min((s.started for s in steps if s.started), default=0.0)
    events: list[dict[str, Any]] = []
    for number, step in enumerate(steps, 1):
        if step.fused_with is not None:
            continue  # its chunks are its group's first step's: drawn there
        offset = (step.started - origin) if step.started else 0.0
        events += _step_events(number, step, offset)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _step_events(pid: int, step: StepStats, offset: float) -> Iterator[dict[str, Any]]:
    yield _meta(pid, 0, "process_name", f'step {pid} "{step.name}"')
    yield _meta(pid, 0, "thread_name", "call")
    yield {
        "ph": "X",
        "pid": pid,
        "tid": 0,
        "name": step.name,
        "ts": _us(offset),
        "dur": _us(step.duration),
        "args": {
            "items": step.count,
            "chunks": step.workers,
            "retries": step.retries,
            "busy": step.busy,
            "hedges": step.hedges,
            "throttles": step.throttles,
            "target": step.target,
        },
    }
    tracks: dict[str, int] = {}
    for chunk in step.chunks:
        for request in _requests(chunk):
            track = request.worker or f"no answer: {request.url}"
            tid = tracks.get(track)
            if tid is None:
                tid = tracks[track] = len(tracks) + 1
                yield _meta(pid, tid, "thread_name", track)
            yield _slice(pid, tid, chunk, request, offset)


def _requests(chunk: ChunkStats) -> list[Try]:
    """The chunk's requests: its tries, or the one request its statistics describe."""
    if chunk.tries:
        return chunk.tries
    return [Try(chunk.start, chunk.end, chunk.url, chunk.worker, "ok", chunk.size)]


def _slice(pid: int, tid: int, chunk: ChunkStats, request: Try, offset: float) -> dict[str, Any]:
    name = f"chunk {chunk.index}"
    if request.hedge:
        name += " (hedge)"
    if request.outcome not in ("ok", "part"):
        name += f" ({request.outcome})"
    args: dict[str, Any] = {"items": request.items, "outcome": request.outcome}
    if request.outcome in ("ok", "part") and not chunk.tries:
        args["queue_ms"] = round(chunk.queue_s * 1000, 3)
        args["compute_ms"] = round(chunk.compute_s * 1000, 3)
    return {
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "name": name,
        "cat": "hedge" if request.hedge else request.outcome,
        "ts": _us(offset + request.start),
        "dur": _us(max(0.0, request.end - request.start)),
        "cname": _COLOURS[request.outcome],
        "args": args,
    }


def _meta(pid: int, tid: int, kind: str, name: str) -> dict[str, Any]:
    return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)
