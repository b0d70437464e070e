"""Statistics of chunks, steps and pipeline runs: measured, never estimated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ._wire import StageFigures

StepKind = Literal["parallel", "sequential"]
# where a step's chunks went: a URL, the app's own route, the local pool, the caller itself
# (a sequential step), a worker endpoint in this process (tests), or nowhere (an empty input)
TargetKind = Literal["url", "self", "local", "caller", "in-process", "none"]


@dataclass
class ChunkStats:
    """One chunk as measured: caller-side times are seconds since the call started."""

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


@dataclass
class StepStats:
    """One run of one step.

    duration: wall time in the caller; in a fused group (steps that ran in the same
    requests), the group's wall time shared among its steps in proportion to the compute
    each measured on the workers, so the steps' durations add up to the group's.
    workers: chunks sent (1 for a sequential step); count / count_out: elements in and out;
    compute_s: the sum of worker-side compute time; retries: extra attempts beyond one per
    chunk; hedges: duplicates sent for stragglers; chunks: per-chunk measurements (the first
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


@dataclass
class PipelineRun:
    """One run of a Pipeline: its result and the statistics of every step, in order."""

    result: Any
    steps: list[StepStats]
    duration: float

    @property
    def compute_s(self) -> float:
        return sum(s.compute_s for s in self.steps)

    def report(self) -> str:
        lines = [f"Pipeline took {self.duration:.2f}s", "Details per pipeline step:"]
        lines += [f"  {n} - {s.line()}" for n, s in enumerate(self.steps, 1)]
        return "\n".join(lines)
