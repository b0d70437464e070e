"""Statistics of steps and pipeline runs: measured, never estimated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._dispatch import ChunkStats


@dataclass
class StepStats:
    """One run of one step.

    duration: wall time in the caller; workers: chunks sent (1 for a sequential step);
    count / count_out: elements in and out; compute_s: the sum of worker-side compute time;
    retries: extra attempts beyond one per chunk; hedges: duplicates sent for stragglers;
    chunks: per-chunk measurements (the first 10,000 of a call; the counters are exact).
    """

    name: str
    kind: str  # "parallel" or "sequential"
    duration: float
    workers: int
    count: int
    count_out: int
    compute_s: float
    retries: int = 0
    hedges: int = 0
    target: str = "local"
    chunks: list[ChunkStats] = field(default_factory=list)

    @property
    def processes(self) -> int:
        """Distinct worker processes that answered."""
        return len({c.worker for c in self.chunks}) or 1

    def line(self) -> str:
        plural = "s" if self.workers != 1 else ""
        return (
            f'Step "{self.name}" took {self.duration:.2f}s for {self.workers} worker{plural} '
            f"and {self.count} elements"
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
