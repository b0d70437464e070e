"""Chunks cut by bytes as well as by count, and a stream's buffer bounded in bytes (issue
22.8): the pure parts (chunking.py), then the engine with an in-process attempt."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serverless import SerializationError
from serverless import _wire as p
from serverless._caller.chunking import (
    AdaptiveChunks,
    Chunk,
    ChunkBytes,
    chunk_adaptive,
    chunk_iterable,
    chunk_sequence,
    within_bytes,
)
from serverless._caller.fanout import Answer, Fanout, Tally
from serverless._caller.plan import CallPlan


def size(value: Any) -> int:
    return len(p.encode(value))


def cut(chunks: Any, weights: ChunkBytes, max_item: int = 10**9) -> list[Chunk]:
    return list(within_bytes(chunks, weights, size, max_item, "m:f"))


def test_a_chunk_over_the_limit_is_cut_into_numbered_pieces_under_it() -> None:
    items = [bytes(1000)] * 50  # 1,003 bytes each encoded: 10 fit in 10,240
    pieces = cut(chunk_sequence(items, 2, None), ChunkBytes(10_240))
    assert [c.index for c in pieces] == list(range(len(pieces)))
    assert [len(c.items) for c in pieces] == [10, 10, 5, 10, 10, 5]
    assert [c.offset for c in pieces] == [0, 10, 20, 25, 35, 45]
    assert all(1003 * len(c.items) <= c.nbytes <= 10_240 for c in pieces)
    assert list(itertools.chain.from_iterable(c.items for c in pieces)) == items


def test_chunks_under_the_limit_go_whole_and_carry_their_size() -> None:
    pieces = cut(chunk_sequence(list(range(1000)), 4, None), ChunkBytes(10_240))
    assert [(c.index, c.offset, len(c.items)) for c in pieces] == [
        (0, 0, 250), (1, 250, 250), (2, 500, 250), (3, 750, 250),
    ]  # fmt: skip
    assert pieces[0].nbytes == size(list(range(250)))


def test_an_item_over_what_a_request_has_room_for_is_named() -> None:
    items = [b"small", bytes(5000), b"small"]
    with pytest.raises(SerializationError) as info:
        cut(chunk_sequence(items, 1, None), ChunkBytes(1000), max_item=4000)
    assert "item 1 of m:f encodes to 5003 bytes" in str(info.value)


def test_an_item_over_the_share_but_within_a_request_goes_alone() -> None:
    items = [b"a", bytes(5000), b"b"]
    pieces = cut(chunk_sequence(items, 1, None), ChunkBytes(1000), max_item=6000)
    assert [c.items for c in pieces] == [[b"a"], [bytes(5000)], [b"b"]]


def test_replies_of_large_results_make_later_chunks_carry_fewer_items() -> None:
    weights = ChunkBytes(10_000)
    assert weights.items() > 10**9  # nothing measured yet
    weights.answered(10, 20_000)  # 2,000 bytes of results per item
    assert weights.items() == 5
    pieces = cut(chunk_iterable(range(20), 10), weights)
    assert [len(c.items) for c in pieces] == [5, 5, 5, 5]
    weights.answered(10, 100)  # lighter results lower the estimate slowly, not at once
    assert weights.items() < 10


def test_the_adaptive_chunker_never_reads_more_than_fits() -> None:
    weights = ChunkBytes(8 * 2**20)
    policy = AdaptiveChunks(weights=weights)
    chunks = within_bytes(
        chunk_adaptive((bytes(4096) for _ in range(100_000)), policy),
        weights,
        size,
        10**9,
        "m:f",
    )
    for chunk in chunks:
        assert chunk.nbytes <= weights.limit
        policy.observe(len(chunk.items), 0.0)  # free items: time alone says 20,000
    assert policy.next_size() == weights.limit // 4099


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 3000), max_size=60),
    parts=st.integers(1, 8),
    limit=st.integers(1, 6000),
)
def test_every_item_once_in_order_and_each_piece_within_the_limit_or_alone(
    lengths: list[int], parts: int, limit: int
) -> None:
    items = [bytes(n) for n in lengths]
    pieces = cut(chunk_sequence(items, parts, None), ChunkBytes(limit))
    assert list(itertools.chain.from_iterable(c.items for c in pieces)) == items
    assert [c.index for c in pieces] == list(range(len(pieces)))
    offset = 0
    for piece in pieces:
        assert piece.offset == offset
        offset += len(piece.items)
        assert size(piece.items) <= limit + 5 or len(piece.items) == 1  # 5: the array header


# -- the engine: a stream's buffer ---------------------------------------------------------


def stalled_stream(hold: int | None, count: int = 100) -> tuple[list[int], int, Tally]:
    """Chunks of 10 items whose results weigh 1,000 bytes an item; chunk 0 waits until the
    engine has nothing more it may send. Returns the results, the chunks sent while chunk 0
    waited, and the tally."""
    sent: list[int] = []
    release = asyncio.Event()

    async def attempt(
        url: str, chunk: Chunk, timeout: float, pace: float | None, slot: float | None, trace: str
    ) -> Answer:
        sent.append(chunk.index)
        if chunk.index == 0:
            await release.wait()
        else:
            await asyncio.sleep(0.001)
        return Answer(list(chunk.items), "w", size=1000 * len(chunk.items))

    async def main() -> tuple[list[int], int, Tally]:
        tally = Tally()
        weights = ChunkBytes(10_000)
        chunks = (Chunk(n, 10 * n, list(range(10 * n, 10 * n + 10)), 10_000) for n in range(count))
        plan = CallPlan("f", workers=20, retries=0)
        engine = Fanout(
            plan, ("http://a",), chunks, attempt, tally,
            lazy_input=True, weights=weights, hold=hold,
        )  # fmt: skip

        async def unstall() -> int:
            while True:  # until nothing new has been sent for a while
                seen = len(sent)
                await asyncio.sleep(0.1)
                if len(sent) == seen:
                    release.set()
                    return seen

        waiting = asyncio.create_task(unstall())
        out = [n async for batch in engine.results() for n in batch]
        return out, await waiting, tally

    return asyncio.run(main())


def test_a_stream_sends_nothing_more_once_its_buffer_is_full_and_loses_nothing() -> None:
    out, sent_while_stalled, tally = stalled_stream(hold=50_000)
    assert out == list(range(1000))
    assert sent_while_stalled == 5  # chunk 0 and four more: 50,000 bytes of results
    assert tally.buffered <= 50_000


def test_without_a_bound_a_straggler_holds_up_nothing_but_the_order() -> None:
    out, sent_while_stalled, tally = stalled_stream(hold=None)
    assert out == list(range(1000))
    assert sent_while_stalled == 20 + 8  # workers + max(8, workers / 4) ahead (lazy input)
    assert tally.buffered > 50_000
