"""Adaptive chunk sizing for inputs of unknown length: the pure policy, then end to end."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from serverless._caller.chunking import AdaptiveChunks, chunk_adaptive
from tests import sample_functions as sf


def test_starts_small_then_grows_in_steps_to_the_target_compute_per_chunk() -> None:
    policy = AdaptiveChunks(start=8, target_s=0.1, growth=4)
    assert policy.next_size() == 8
    policy.observe(8, 8 * 0.001)  # 1 ms per item: the target is 100 items
    assert policy.next_size() == 32  # at most 4x the largest chunk seen so far
    policy.observe(32, 32 * 0.001)
    assert policy.next_size() == 100
    policy.observe(100, 100 * 0.001)
    assert policy.next_size() == 100  # settled: ~100 ms of compute per chunk


def test_shrinks_when_items_get_slower_and_never_below_one() -> None:
    policy = AdaptiveChunks(start=8, target_s=0.1)
    for _ in range(10):
        policy.observe(policy.next_size(), policy.next_size() * 0.0001)
    assert policy.next_size() == 1000
    for _ in range(10):
        policy.observe(policy.next_size(), policy.next_size() * 1.0)  # a second per item
    assert policy.next_size() == 1


def test_free_items_grow_to_the_cap() -> None:
    policy = AdaptiveChunks(start=8, max_size=5000)
    for _ in range(20):
        policy.observe(policy.next_size(), 0.0)
    assert policy.next_size() == 5000


@given(st.lists(st.tuples(st.integers(0, 10_000), st.floats(0, 100)), max_size=50))
def test_sizes_stay_within_bounds(observations: list[tuple[int, float]]) -> None:
    policy = AdaptiveChunks(start=8, max_size=20_000)
    for size, compute in observations:
        policy.observe(size, compute)
        assert 1 <= policy.next_size() <= 20_000


def test_chunk_adaptive_reads_lazily_and_asks_the_policy_per_chunk() -> None:
    policy = AdaptiveChunks(start=2)
    source = iter(range(100))
    chunks = chunk_adaptive(source, policy)
    assert tuple(next(chunks)) == (0, 0, [0, 1])
    assert next(source) == 2  # nothing read ahead
    policy.size = 5
    assert tuple(next(chunks)) == (1, 2, [3, 4, 5, 6, 7])  # offsets count what the chunker read
    rest = list(itertools.chain.from_iterable(c.items for c in chunks))
    assert rest == list(range(8, 100))


def test_generator_input_gets_growing_chunks_end_to_end() -> None:
    """On the local pool: tiny compute per item, so chunks grow past the start size."""
    result = sf.square(n for n in range(20_000))
    assert result == [n * n for n in range(20_000)]
    stats = sf.square.stats
    assert stats is not None
    sizes = [c.size for c in stats.chunks]
    assert sizes[0] == 8 and max(sizes) > 8 and sum(sizes) == 20_000


def test_an_explicit_chunk_size_is_kept_for_generators() -> None:
    fn = sf.square.with_options(chunk_size=7)
    assert fn(n for n in range(50)) == [n * n for n in range(50)]
    assert fn.stats is not None and [c.size for c in fn.stats.chunks] == [7] * 7 + [1]
