"""Issue 22.8, bounded streams, on the local pool: chunks are cut by bytes as well as by time
(a generator of 4 KiB items grew its chunks to 8,192 items, a 33.6 MB request over the 32 MiB
body limit, mid-stream), and a stream holds at most its `buffer=` of results behind a
straggler (1.2 KiB items and one 3 s straggler took the caller to 0.9-1.2 GB)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from serverless import SerializationError
from serverless._wire import MAX_BODY
from tests.conftest import test_env
from tests.sample_functions import blob, echo_blobs

ROOT = Path(__file__).parents[2]
QUARTER = MAX_BODY // 4


def blobs(count: int, size: int) -> Iterator[bytes]:
    for index in range(count):
        yield blob(index, size)


def in_order(results: Iterator[bytes], size: int) -> int:
    count = 0
    for result in results:
        assert len(result) == size and int.from_bytes(result[:8], "big") == count
        count += 1
    return count


def test_a_stream_of_4_kib_items_keeps_every_request_under_a_quarter_of_the_limit() -> None:
    # the adaptive size grows 8, 32, ... 8,192: that chunk alone was 33.6 MB
    f = echo_blobs.with_options(workers=4)
    assert in_order(f.stream(blobs(30_000, 4096)), 4096) == 30_000
    stats = f.stats
    assert stats is not None and sum(c.size for c in stats.chunks) == 30_000
    assert max(c.size for c in stats.chunks) * (4096 + 3) <= QUARTER


def test_a_list_of_large_items_is_cut_by_bytes_as_well_as_by_workers() -> None:
    # two even chunks of 9,000 x 4 KiB: 37 MB each, over the limit
    f = echo_blobs.with_options(workers=2)
    results = f([blob(n, 4096) for n in range(18_000)])
    assert in_order(iter(results), 4096) == 18_000
    assert f.stats is not None
    assert max(c.size for c in f.stats.chunks) * (4096 + 3) <= QUARTER


def test_an_item_no_request_can_carry_is_named() -> None:
    with pytest.raises(SerializationError) as info:
        echo_blobs([blob(0, 100), blob(1, MAX_BODY + 1)])
    message = str(info.value)
    assert "item 1 of tests.sample_functions:echo_blobs encodes to" in message
    assert "one item must fit in one request" in message


def test_a_straggler_never_makes_a_stream_hold_more_than_its_buffer() -> None:
    buffer = 4 * 2**20
    f = echo_blobs.with_options(workers=20, buffer=buffer)
    # chunk of item 50 waits 2 s while 40 MB of later results could pile up behind it
    assert in_order(f.stream(blobs(40_000, 1024), 50, 2.0), 1024) == 40_000
    assert f.stats is not None
    assert 2**20 < f.stats.buffered <= buffer  # it held results, and no more than its bound


def test_a_call_that_collects_its_results_is_not_held_back_by_the_buffer() -> None:
    # its results are all kept anyway: a straggler does not stop the other chunks of a list
    f = echo_blobs.with_options(workers=20, buffer=2**20)
    assert in_order(iter(f(list(blobs(20_000, 1024)), 50, 2.0)), 1024) == 20_000
    assert f.stats is not None and f.stats.buffered > 10 * 2**20


def test_a_stream_behind_a_straggler_stays_in_bounded_memory() -> None:
    """bench/streams.py in a process of its own: 300,000 results of 1.2 KiB with workers=100
    and one 3 s straggler; the caller peaked at 883 MB before the buffer was bounded."""
    args = ["--count", "300000", "--size", "1200", "--stall-at", "100", "--stall", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.streams", *args],
        cwd=ROOT,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout)
    assert figures["results"] == 300_000
    assert figures["buffered_mib"] <= 64
    assert figures["peak_rss_mb"] < 450, figures
