"""Progress events (issue 25) where a call is less plain: a cached call that finds part of
its list, and a progress callable that calls serverless itself."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from serverless import Progress
from tests import sample_functions as sf


def test_a_cached_list_found_in_part_counts_each_item_once(
    in_process_worker: None, tmp_path: Path
) -> None:
    events: list[Progress] = []
    step = sf.square.with_options(chunk_size=2, cache=str(tmp_path / "c"), progress=events.append)
    assert step(list(range(10))) == [n * n for n in range(10)]
    events.clear()
    assert step(list(range(14))) == [n * n for n in range(14)]  # 10 found, 4 sent
    last = events[-1]
    assert last.finished and (last.total, last.done, last.cached) == (14, 14, 10)
    assert all(event.done <= 14 for event in events)


def test_a_progress_callable_that_calls_serverless_is_refused_not_hung(
    in_process_worker: None, caplog: Any
) -> None:
    """The callable runs on the dispatcher's thread: a blocking call there would wait on that
    thread forever. It is refused (the observer is dropped, logged) and the call goes on."""
    inner: list[Any] = []

    def report(event: Progress) -> None:
        if not inner:
            inner.append(None)
            inner.append(sf.square([5]))  # raises: never hangs

    results: list[Any] = []
    call = threading.Thread(
        target=lambda: results.append(sf.square.with_options(progress=report)([1, 2])),
        daemon=True,
    )
    call.start()
    call.join(timeout=30)  # bounded: before the fix, it never returned
    assert not call.is_alive() and results == [[1, 4]]
    assert inner == [None]
    assert "dispatcher thread" in caplog.text
