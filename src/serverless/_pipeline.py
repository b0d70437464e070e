"""Pipeline: steps run one after the other, consecutive parallel ones fused into one request."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._caller.progress import reporter
from ._config import Options
from ._function import ParallelFunction, StageInfo, _Step, run_fused
from ._stats import PipelineRun, Progress, StepStats


class Pipeline:
    """Steps run one after the other, each on the previous step's result.

    Consecutive @parallel steps that go to the same place are fused: each chunk runs through
    all of them in one request, so the data crosses the network once per group instead of
    once per step. @sequential steps are the only barriers. Statistics stay per step: the
    worker measures each stage's output count and compute time, and the report says which
    steps shared requests. `fuse=False` opts out.

    `cache=` (a path, a redis:// URL or a store) stores the results of every parallel step
    that has no cache of its own; `run(data, cache=...)` does so for one run. A cached step
    runs in requests of its own (never fused): its results are stored item by item, so each
    must return one result per item (a filtering step raises: cache the steps that map
    instead, with `step.with_options(cache=...)`; docs/reliability.md).
    """

    def __init__(self, *steps: _Step[Any, Any], fuse: bool = True, cache: Any = None) -> None:
        for step in steps:
            if not isinstance(step, _Step):
                raise TypeError(
                    f"Pipeline steps must be decorated with @serverless.parallel or "
                    f"@serverless.sequential: {getattr(step, '__name__', step)!r} is not"
                )
        if not steps:
            raise TypeError("a Pipeline needs at least one step")
        Options(cache=cache)  # a bad spec is refused here, not at the first run
        self.steps = steps
        self.fuse = fuse
        self.cache = cache
        self.last_run: PipelineRun | None = None

    def run(self, data: Iterable[Any], cache: Any = None, progress: Any = None) -> Any:
        """Run every step and return the last one's result (statistics in `last_run`).
        `progress`: as the option of @parallel (True: a bar per step on a terminal; a
        callable: Progress events, each naming its step and its place)."""
        return self.execute(data, cache, progress).result

    def execute(self, data: Iterable[Any], cache: Any = None, progress: Any = None) -> PipelineRun:
        """Run every step; the returned PipelineRun holds this run's own statistics."""
        started = time.perf_counter()
        stats: list[StepStats] = []
        Options(progress=progress)  # a bad value is refused before any step runs
        report = reporter(progress)
        steps = _cached(self.steps, cache if cache is not None else self.cache)
        groups = _fusion_groups(steps) if self.fuse else [[s] for s in steps]
        number = 0
        for group in groups:
            place = (number + 1, len(steps), "+".join(step.__name__ for step in group))
            number += len(group)
            if report is not None:
                group = _reporting(group, report, place)
            if len(group) > 1:
                data, group_stats = run_fused([_stage(step).step for step in group], data)
                for later in group_stats[1:]:
                    later.fused_with = len(stats) + 1  # the number of the group's first step
                stats += group_stats
            elif report is not None and not isinstance(group[0], ParallelFunction):
                data, step_stats = _sequential(group[0], data, report, place)
                stats.append(step_stats)
            else:
                data, step_stats = group[0].with_stats(data)
                stats.append(step_stats)
        run = PipelineRun(result=data, steps=stats, duration=time.perf_counter() - started)
        self.last_run = run
        return run


def _cached(steps: Sequence[_Step[Any, Any]], cache: Any) -> Sequence[_Step[Any, Any]]:
    """The steps, each parallel one without a cache of its own storing its results in `cache`."""
    if cache is None:
        return steps
    Options(cache=cache)  # a bad spec: ConfigurationError before any step runs
    return [
        step.with_options(cache=cache)
        if isinstance(step, ParallelFunction) and step.options.cache is None
        else step
        for step in steps
    ]


Place = tuple[int, int, str]  # a group's first step's number, the steps in all, its name


def _reporting(
    group: list[_Step[Any, Any]], report: Callable[[Progress], None], place: Place
) -> list[_Step[Any, Any]]:
    """The group with its progress going to `report`, each event naming its place in the run:
    fused steps share one line (they share their requests)."""
    number, steps, name = place

    def placed(event: Progress) -> None:
        report(dataclasses.replace(event, step=name, step_number=number, steps=steps))

    return [
        step.with_options(progress=placed) if isinstance(step, ParallelFunction) else step
        for step in group
    ]


def _sequential(
    step: _Step[Any, Any], data: Any, report: Callable[[Progress], None], place: Place
) -> tuple[Any, StepStats]:
    """A sequential step, with a first and a last progress event around it."""
    number, steps, name = place
    total = len(data) if isinstance(data, Sequence) else None
    first = Progress(
        name, number, steps, total, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0.0, 0.0, None, False
    )
    report(first)
    data, stats = step.with_stats(data)
    done = stats.count if total is not None else stats.count_out
    report(
        dataclasses.replace(
            first,
            done=done,
            chunks_done=1,
            in_flight=0,
            elapsed=stats.duration,
            items_per_s=stats.items_per_s,
            eta=0.0,
            finished=True,
        )
    )
    return data, stats


def _stage(step: _Step[Any, Any]) -> StageInfo:
    info = step.stage()
    assert info is not None  # only parallel steps are grouped
    return info


def _fusion_groups(steps: Sequence[_Step[Any, Any]]) -> list[list[_Step[Any, Any]]]:
    """Runs of consecutive parallel steps with the same target; anything else alone. A step
    with bound arguments (`partial`) may only open a group: a later stage carries none; a
    paced step (rate=) runs item by item, alone; a cached one (cache=) too: its results are
    stored item by item, as it returned them."""
    groups: list[list[_Step[Any, Any]]] = []
    for step in steps:
        info = step.stage()
        last = groups[-1][-1].stage() if groups else None
        fusable = info and last and not (info.first_only or info.alone or last.alone)
        if fusable and info and last and info.url == last.url:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups
