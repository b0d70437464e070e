"""Seeing a call run (issue 25): progress events, the log's events, the kept requests of
each chunk, busy refusals counted apart from retries, and the Chrome trace a run writes.

The engine's behaviour is shown through its seam for one attempt (a coroutine standing for
the workers), and end to end through the in-process transport."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

import serverless
from serverless import Progress, WorkerTimeout, WorkerUnavailable
from serverless._caller import fanout as _fanout
from serverless._caller.chunking import Chunk, chunk_iterable
from serverless._caller.fanout import Answer
from serverless._caller.plan import CallPlan
from serverless._caller.watch import Watch
from serverless._stats import ChunkStats, StepStats, Try, chrome_trace
from tests.sample_functions import fail_on, square
from tests.unit.test_flow import drive

A, B = "http://a/serverless", "http://b/serverless"


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fanout, "BACKOFF_BASE", 0.001)
    monkeypatch.setattr(_fanout, "BUSY_BASE", 0.001)


# -- retries, busy refusals, each request kept ---------------------------------------------


def test_busy_refusals_are_counted_apart_from_retries_and_each_request_is_kept(
    quick_backoff: None,
) -> None:
    # chunk 0: refused busy twice, then answered; chunk 1: timed out once, then answered;
    # chunk 2: answered at once
    plan: dict[int, list[str]] = {0: ["busy", "busy"], 1: ["timeout"], 2: []}

    async def attempt(
        url: str, chunk: Chunk, timeout: float, pace: float | None, slot: float | None, trace: str
    ) -> Answer:
        await asyncio.sleep(0.001)
        pending = plan[chunk.index]
        if pending:
            what = pending.pop(0)
            if what == "busy":  # a worker's signed "busy": it says what it can run at once
                raise WorkerUnavailable("busy", url=url, status=503, capacity=4, worker="w9")
            raise WorkerTimeout("slow", url=url)
        return Answer(chunk.items, "w1")

    out, tally, _ = drive(attempt, chunk_iterable(range(3), 1), CallPlan("f", workers=3, retries=3))
    assert out == [0, 1, 2]
    assert tally.retries == 1, "only the timed-out request was a retry"
    assert tally.busy == 2
    chunks = {c.index: c for c in tally.in_order()}
    assert [t.outcome for t in chunks[0].tries] == ["busy", "busy", "ok"]
    assert chunks[0].attempts == 1 and chunks[0].busy == 2
    assert chunks[0].tries[0].worker == "w9" and chunks[0].tries[-1].worker == "w1"
    assert [t.outcome for t in chunks[1].tries] == ["retried", "ok"]
    assert chunks[1].attempts == 2 and chunks[1].busy == 0
    assert chunks[2].tries == [], "a chunk answered at once keeps no list"
    for chunk in chunks.values():
        for before, after in zip(chunk.tries, chunk.tries[1:], strict=False):
            assert before.start <= before.end <= after.start


def test_step_stats_say_retries_and_busy_refusals_apart(quick_backoff: None) -> None:
    refused: set[int] = set()

    async def attempt(
        url: str, chunk: Chunk, timeout: float, pace: float | None, slot: float | None, trace: str
    ) -> Answer:
        if chunk.index not in refused:
            refused.add(chunk.index)
            raise WorkerUnavailable("busy", url=url, status=503, capacity=2, worker="w")
        return Answer(chunk.items, "w")

    out, tally, _ = drive(attempt, chunk_iterable(range(5), 1), CallPlan("f", workers=5, retries=0))
    assert out == list(range(5))
    assert (tally.retries, tally.busy) == (0, 5), "retries=0 waits busy refusals out"


# -- progress ---------------------------------------------------------------------------------


def test_progress_events_count_every_item_and_chunk_once() -> None:
    events: list[Progress] = []
    results, stats = square.with_options(progress=events.append, chunk_size=7).with_stats(
        list(range(200))
    )
    assert results == [n * n for n in range(200)]
    assert len(events) >= 2 and events[0].done == 0 and not events[0].finished
    assert events[-1].finished and sum(e.finished for e in events) == 1
    last = events[-1]
    assert (last.total, last.done, last.failed, last.chunks_done) == (200, 200, 0, 29)
    assert (last.step, last.step_number, last.steps) == ("square", 1, 1)
    dones = [e.done for e in events]
    assert dones == sorted(dones), "done never goes back"
    seen = [c.index for e in events for c in e.new_chunks]
    assert sorted(seen) == list(range(29)), "each chunk's statistics come once"
    assert all(isinstance(c, ChunkStats) for e in events for c in e.new_chunks)
    assert last.in_flight == 0 and last.eta == 0.0 and last.items_per_s > 0
    assert stats.count == 200


def test_progress_counts_failures_with_errors_return() -> None:
    events: list[Progress] = []
    call = fail_on.with_options(progress=events.append, errors="return", chunk_size=5)
    results = call(list(range(20)), 7)
    assert isinstance(results[7], serverless.RemoteError)
    assert events[-1].failed == 1 and events[-1].done == 20


def test_a_progress_callable_that_raises_never_reaches_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    def broken(event: Progress) -> None:
        calls.append(event)
        raise RuntimeError("the user's progress hook is broken")

    with caplog.at_level(logging.WARNING, logger="serverless"):
        results = square.with_options(progress=broken, chunk_size=3)(list(range(30)))
    assert results == [n * n for n in range(30)]
    assert len(calls) == 1, "a hook that raised is dropped for the rest of the call"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "observer" in warnings[0].getMessage()


def test_progress_true_draws_nothing_where_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert square.with_options(progress=True)(list(range(50))) == [n * n for n in range(50)]
    assert capsys.readouterr().err == ""
    square.with_options(progress="always")(list(range(50)))
    err = capsys.readouterr().err
    assert "square" in err and "50/50" in err and "retries 0" in err


def test_bad_progress_values_are_refused() -> None:
    for bad in ("yes", 1.5, [print]):
        with pytest.raises(serverless.ConfigurationError, match="progress"):
            square.with_options(progress=bad)
    with pytest.raises(serverless.ConfigurationError, match="progress"):
        serverless.Pipeline(square).run([1], progress="sometimes")


def test_a_pipeline_reports_each_step_in_its_place() -> None:
    @serverless.sequential
    def total(numbers: list[int]) -> list[int]:
        return [sum(numbers)]

    events: list[Progress] = []
    pipeline = serverless.Pipeline(square, total, fuse=False)
    assert pipeline.run(list(range(10)), progress=events.append) == [285]
    finished = [e for e in events if e.finished]
    assert [(e.step, e.step_number, e.steps) for e in finished] == [
        ("square", 1, 2),
        ("total", 2, 2),
    ]
    assert finished[0].done == 10 and finished[1].done == 10


def test_an_empty_input_and_a_stream_report_too() -> None:
    events: list[Progress] = []
    assert square.with_options(progress=events.append)([]) == []
    assert events[-1].finished and events[-1].done == 0 and events[-1].total == 0
    events.clear()
    streamed = list(square.with_options(progress=events.append).stream(iter(range(40))))
    assert streamed == [n * n for n in range(40)]
    assert events[-1].finished and events[-1].total is None and events[-1].done == 40


# -- the log ----------------------------------------------------------------------------------


def test_debug_events_carry_structured_fields_and_info_says_nothing_per_chunk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="serverless"):
        square.with_options(chunk_size=2)(list(range(10)))
    requests = [r for r in caplog.records if getattr(r, "status", None) == "ok"]
    assert len(requests) == 5
    for record in requests:
        assert record.levelno == logging.DEBUG and record.name == "serverless.dispatch"
        assert {"call", "chunk", "attempt", "worker", "seconds"} <= set(vars(record))
    assert len({r.call for r in requests}) == 1  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serverless"):
        square.with_options(chunk_size=1)(list(range(50)))
        fail_on.with_options(errors="return", chunk_size=1)(list(range(20)), 3)
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1, "one line for the call that had a failure, none per chunk"
    assert "1 failed" in infos[0].getMessage() and infos[0].failed == 1  # type: ignore[attr-defined]


# -- the timeline -----------------------------------------------------------------------------


def test_save_trace_writes_chrome_trace_json(tmp_path: Path) -> None:
    _, stats = square.with_options(chunk_size=4).with_stats(list(range(40)))
    path = tmp_path / "trace.json"
    stats.save_trace(path)
    trace = json.loads(path.read_text())
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] != 0]
    assert sorted(int(e["name"].split()[1]) for e in slices) == list(range(10))
    for event in slices:
        assert event["dur"] >= 0 and event["ts"] >= 0 and event["args"]["items"] == 4
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {c.worker for c in stats.chunks} <= names, "one track per worker process"


def test_retries_hedges_and_busy_refusals_are_marked_in_the_trace() -> None:
    chunk = ChunkStats(
        0, 4, "w1", A, 0.0, 0.3, 0.0, 0.1, 2, busy=1,
        tries=[
            Try(0.0, 0.05, A, "w2", "busy", 4),
            Try(0.06, 0.1, A, "", "retried", 4),
            Try(0.12, 0.3, A, "w1", "ok", 4),
            Try(0.2, 0.25, B, "w3", "lost", 4, hedge=True),
        ],
    )  # fmt: skip
    step = StepStats("f", "parallel", 0.3, 1, 4, 4, 0.1, retries=1, busy=1, chunks=[chunk])
    events = chrome_trace([step])["traceEvents"]
    slices = {e["name"]: e for e in events if e["ph"] == "X" and e["tid"] != 0}
    assert set(slices) == {
        "chunk 0 (busy)", "chunk 0 (retried)", "chunk 0", "chunk 0 (hedge) (lost)",
    }  # fmt: skip
    assert slices["chunk 0 (hedge) (lost)"]["cat"] == "hedge"
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["tid"]}
    assert tracks[slices["chunk 0 (retried)"]["tid"]] == f"no answer: {A}"


def test_ten_thousand_chunks_stay_under_five_megabytes(tmp_path: Path) -> None:
    chunks = [
        ChunkStats(i, 30, f"127.0.0.1:{4000 + i % 16}", A, i * 1e-3, i * 1e-3 + 0.1, 0.001, 0.1, 1)
        for i in range(10_000)
    ]
    for chunk in chunks[::10]:  # one in ten retried once
        chunk.tries = [
            Try(chunk.start, chunk.start + 0.01, A, "", "retried", 30),
            Try(chunk.start + 0.01, chunk.end, A, chunk.worker, "ok", 30),
        ]
    step = StepStats("f", "parallel", 10.0, 100, 300_000, 300_000, 1000.0, chunks=chunks)
    run = serverless.PipelineRun(None, [step], 10.0)
    path = tmp_path / "big.json"
    run.save_trace(path)
    assert path.stat().st_size < 5_000_000
    events = json.loads(path.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" and e["tid"] != 0 for e in events) == 11_000


def test_a_pipeline_run_lays_its_steps_out_in_time(tmp_path: Path) -> None:
    first = StepStats("a", "parallel", 1.0, 1, 1, 1, 0.1, started=100.0)
    second = StepStats("b", "parallel", 1.0, 1, 1, 1, 0.1, started=101.5)
    events = chrome_trace([first, second])["traceEvents"]
    calls = [e for e in events if e["ph"] == "X" and e["tid"] == 0]
    assert [(e["pid"], e["ts"]) for e in calls] == [(1, 0.0), (2, 1_500_000.0)]


def test_nothing_watches_a_call_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # no progress=, the log above DEBUG, no tracer: the engine gets no Watch at all
    monkeypatch.delitem(sys.modules, "opentelemetry.trace", raising=False)
    logging.getLogger("serverless.dispatch").setLevel(logging.INFO)
    made: list[Any] = []
    original = Watch.__init__

    def spy(self: Watch, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Watch, "__init__", spy)
    try:
        assert square(list(range(10))) == [n * n for n in range(10)]
        assert made == []
        square.with_options(progress=lambda event: None)(list(range(10)))
        assert len(made) == 1
    finally:
        logging.getLogger("serverless.dispatch").setLevel(logging.NOTSET)


def test_a_fused_group_reports_the_items_it_took_in() -> None:
    from tests.sample_functions import odd_only

    events: list[Progress] = []
    pipeline = serverless.Pipeline(square, odd_only)
    assert pipeline.run(list(range(100)), progress=events.append) == [
        n * n for n in range(100) if n % 2
    ]
    last = events[-1]
    assert last.finished and last.step == "square+odd_only" and last.done == last.total == 100
