"""cache=: keys, lookups, merging in order, storing, failures and the failure budget, through
the in-process transport. The store here is a dict behind the ResultStore interface (the real
SQLite and Redis stores are tested in tests/integration/test_store.py and test_cache.py);
every function counts its executions per item in this process."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec
import pytest

import serverless
from serverless import StoreError, TooManyFailures
from serverless._caller import cache as _cache
from serverless._caller.cachekey import call_prefix, canonical, code_digest, item_keys
from serverless._caller.chunking import Chunk
from serverless._caller.store import ResultStore, StoreStats
from serverless._wire.values import UNTYPED

RUNS: Counter[Any] = Counter()  # executions per item, as the functions below count them


class DictStore:
    """A ResultStore in a dict; `fail_gets` / `fail_puts`: fail from that call on."""

    location = "memory"

    def __init__(self, fail_gets: int | None = None, fail_puts: int | None = None) -> None:
        self.data: dict[bytes, bytes] = {}
        self.lock = threading.Lock()
        self.gets = self.puts = 0
        self.fail_gets, self.fail_puts = fail_gets, fail_puts

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self.lock:
            self.gets += 1
            if self.fail_gets is not None and self.gets > self.fail_gets:
                raise StoreError("connection refused", store=self.location)
            return [self.data.get(key) for key in keys]

    def put_many(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        with self.lock:
            self.puts += 1
            if self.fail_puts is not None and self.puts > self.fail_puts:
                raise StoreError("connection refused", store=self.location)
            self.data.update(records)

    def stats(self) -> StoreStats:
        return StoreStats(self.location, len(self.data), sum(map(len, self.data.values())))

    def clear(self) -> int:
        count = len(self.data)
        self.data.clear()
        return count

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


@serverless.parallel(workers=4)
def double(numbers: Iterable[int]) -> list[int]:
    RUNS.update(("double", n) for n in numbers)
    return [2 * n for n in numbers]


@serverless.parallel(workers=4)
def pair(items):  # type: ignore[no-untyped-def]  # untyped: tuples and dates travel as Exts
    RUNS.update(("pair", repr(i)) for i in items)
    return [(i, datetime.date(2026, 1, 1 + i % 28)) for i in items]


@serverless.parallel(workers=4)
def points(numbers: list[int]) -> list[Point]:
    return [Point(n, -n) for n in numbers]


@serverless.parallel(workers=3, errors="return")
def sevens(numbers: list[int]) -> list[int]:
    """Fails on every item that ends in 7."""
    out = []
    for n in numbers:
        RUNS["sevens", n] += 1
        if n % 10 == 7:
            raise ValueError(f"no {n}")
        out.append(n + 1)
    return out


@serverless.parallel(workers=4)
def add(numbers: list[int], offset: int) -> list[int]:
    RUNS.update(("add", n) for n in numbers)
    return [n + offset for n in numbers]


@serverless.parallel(workers=4)
def inc(numbers: list[int]) -> list[int]:
    RUNS.update(("inc", n) for n in numbers)
    return [n + 1 for n in numbers]


@pytest.fixture(autouse=True)
def _fresh_counts() -> Iterator[None]:
    RUNS.clear()
    yield


def runs(name: str) -> Counter[Any]:
    return Counter({item: count for (fn, item), count in RUNS.items() if fn == name})


# -- keys ------------------------------------------------------------------------------------


def test_equal_values_share_a_key_and_different_types_never_do() -> None:
    assert canonical({"b": 1, "a": [1, 2]}) == canonical({"a": [1, 2], "b": 1})
    assert canonical({"x", "y", "z"}) == canonical({"z", "x", "y"})
    assert canonical({(1, 2): {3}}) == canonical({(1, 2): {3}})
    distinct = [1, 1.0, True, "1", b"1", [1], (1,), {1}, frozenset({1}), {"1": 1}, None]
    distinct += [datetime.date(2026, 1, 1), Point(1, 2), {1: 1}, 2**70, [2**70], -(2**70)]
    encoded = [canonical(value) for value in distinct]
    assert len(set(encoded)) == len(encoded)


def test_a_value_with_no_stable_key_is_refused_with_the_fix() -> None:
    with pytest.raises(serverless.SerializationError, match="no stable key for cache="):
        canonical(object())


def _digest_of(source: str) -> bytes:
    namespace: dict[str, Any] = {}
    exec(compile(source, "<test>", "exec"), namespace)
    return code_digest(namespace["f"])


def test_the_code_digest_ignores_docstrings_and_lines_but_not_code() -> None:
    base = _digest_of('def f(x):\n    "Doc."\n    return x + 1\n')
    assert _digest_of('\n\n\ndef f(x):\n    "Another, longer doc."\n    return x + 1\n') == base
    assert _digest_of("def f(x):\n    return x + 1\n") == base  # a docstring removed
    assert _digest_of("def f(x):\n    return x + 2\n") != base  # a constant
    assert _digest_of("def f(x):\n    return x - 1\n") != base  # an operation
    assert _digest_of("def f(y):\n    return y + 1\n") != base  # a name
    assert _digest_of("def f(x=1):\n    return x + 1\n") != base  # a default
    nested = 'def f(x):\n    def g(y):\n        "{}"\n        return y * {}\n    return g(x)\n'
    assert _digest_of(nested.format("a", 2)) == _digest_of(nested.format("b", 2))
    assert _digest_of(nested.format("a", 2)) != _digest_of(nested.format("a", 3))
    comp = "def f(x):\n    return [{} for i in x]\n"
    assert _digest_of(comp.format("'a'")) != _digest_of(comp.format("'b'"))


def test_keys_depend_on_name_code_version_arguments_and_item() -> None:
    def prefix(name: str = "m:f", code: bytes = b"c", version: str = "", args: Any = ()) -> bytes:
        return call_prefix([(name, code, version)], list(args), {})

    base = prefix()
    variants = [prefix(name="m:g"), prefix(code=b"d"), prefix(version="2"), prefix(args=[1])]
    assert len({base, *variants}) == 5
    assert item_keys(base, [1, 2, 1]) == item_keys(base, [1, 2, 1])
    first, second, again = item_keys(base, [1, 2, 1])
    assert first == again != second and len(first) == 32


# -- the engine ------------------------------------------------------------------------------


def test_a_second_call_sends_only_the_items_not_stored_and_returns_all_in_order() -> None:
    store = DictStore()
    cached = double.with_options(cache=store)
    first, stats = cached.with_stats(list(range(100)))
    assert first == [2 * n for n in range(100)]
    assert (stats.cache_hits, stats.items_sent, len(store.data)) == (0, 100, 100)
    second, stats = cached.with_stats(list(range(150)))
    assert second == [2 * n for n in range(150)]
    assert (stats.cache_hits, stats.items_sent, stats.count) == (100, 50, 150)
    assert set(runs("double").values()) == {1} and len(runs("double")) == 150
    third, stats = cached.with_stats(list(reversed(range(150))))
    assert third == [2 * n for n in reversed(range(150))]
    assert (stats.cache_hits, stats.items_sent) == (150, 0)
    assert sum(runs("double").values()) == 150  # nothing ran again


def test_a_generator_and_a_stream_are_looked_up_as_they_are_read() -> None:
    store = DictStore()
    cached = double.with_options(cache=store)
    assert cached(n for n in range(0, 400, 2)) == [2 * n for n in range(0, 400, 2)]
    streamed = list(cached.stream(iter(range(400))))
    assert streamed == [2 * n for n in range(400)]
    assert cached.stats is not None
    assert (cached.stats.cache_hits, cached.stats.items_sent) == (200, 200)
    assert cached.stats.count == 400
    assert set(runs("double").values()) == {1}


def test_a_long_fully_cached_stream_is_looked_up_in_growing_batches() -> None:
    store = DictStore()
    cached = double.with_options(cache=store)
    cached(list(range(50_000)))
    gets = store.gets
    assert list(cached.stream(iter(range(50_000)))) == [2 * n for n in range(50_000)]
    # chunks of a found run grow x4 up to the adaptive chunker's largest (20,000)
    assert store.gets - gets <= 12
    assert sum(runs("double").values()) == 50_000


def test_results_from_the_store_are_the_values_the_workers_returned() -> None:
    store = DictStore()
    cached = pair.with_options(cache=store)
    live = cached(list(range(30)))
    stored = cached(list(range(30)))
    assert stored == live and [type(r) for r in stored] == [tuple] * 30
    assert type(stored[0][1]) is datetime.date
    typed = points.with_options(cache=store)
    assert typed(list(range(5))) == typed(list(range(5))) == [Point(n, -n) for n in range(5)]
    assert all(type(p) is Point for p in typed(list(range(5))))


def test_arguments_and_version_are_part_of_the_key() -> None:
    store = DictStore()
    assert add.with_options(cache=store)([1, 2], 10) == [11, 12]
    assert add.with_options(cache=store)([1, 2], 20) == [21, 22]  # another argument: sent
    assert add.with_options(cache=store, version=2)([1, 2], 10) == [11, 12]  # another version
    assert add.with_options(cache=store)([1, 2], 10) == [11, 12]  # stored: not sent again
    assert runs("add") == Counter({1: 3, 2: 3})


def test_failures_are_never_stored_so_a_rerun_runs_exactly_them() -> None:
    store = DictStore()
    cached = sevens.with_options(cache=store)
    first, stats = cached.with_stats(list(range(60)))
    failed = [n for n in range(60) if n % 10 == 7]
    assert stats.failed == failed
    assert [r.index for r in first if isinstance(r, serverless.RemoteError)] == failed  # type: ignore[attr-defined]
    second, stats = cached.with_stats(list(range(60)))
    assert (stats.cache_hits, stats.items_sent, stats.failed) == (54, 6, failed)
    # each failure in its place, numbered by its place in the input, not among the misses
    for n, result in enumerate(second):
        if n in failed:
            assert isinstance(result, serverless.RemoteError) and result.index == n
            assert f"at item {n} " in str(result)
        else:
            assert result == n + 1
    assert runs("sevens") == Counter({n: 2 if n in failed else 1 for n in range(60)})


def test_an_error_raised_for_a_miss_names_its_place_in_the_input() -> None:
    store = DictStore()
    strict = sevens.with_options(cache=store, errors="raise")
    strict(list(range(7)))  # 0..6 stored
    with pytest.raises(serverless.RemoteError) as caught:
        strict(list(range(10)))
    assert caught.value.index == 7 and "at item 7 " in str(caught.value)
    assert caught.value.traceback and "ValueError" in caught.value.traceback


def test_max_failures_stops_the_call_with_every_failure_so_far() -> None:
    budget = sevens.with_options(max_failures=2, workers=1, chunk_size=10)
    with pytest.raises(TooManyFailures) as caught:
        budget(list(range(100)))
    error = caught.value
    assert [f.index for f in error.failures] == [7, 17, 27]
    assert all(f.type_name == "ValueError" and f.traceback for f in error.failures)
    assert error.succeeded == 27
    assert max(n for _, n in RUNS) < 40  # it stopped sending: 100 items were never all run
    assert "max_failures=2" in str(error)


def test_max_failures_as_a_fraction_of_the_input() -> None:
    assert len(sevens.with_options(max_failures=0.1)(list(range(100)))) == 100  # 10%: allowed
    with pytest.raises(TooManyFailures):
        sevens.with_options(max_failures=0.09)(list(range(100)))


def test_max_failures_needs_errors_return_and_a_valid_budget() -> None:
    with pytest.raises(serverless.ConfigurationError, match='errors="return"'):
        double.with_options(max_failures=1)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(serverless.ConfigurationError, match="max_failures"):
            sevens.with_options(max_failures=bad)  # type: ignore[arg-type]


def test_a_bad_cache_option_is_refused() -> None:
    with pytest.raises(serverless.ConfigurationError, match="cache must be"):
        double.with_options(cache=42)
    with pytest.raises(serverless.ConfigurationError, match="version must be"):
        double.with_options(version=1.5)  # type: ignore[arg-type]


def test_a_store_that_fails_during_the_call_costs_work_never_a_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = DictStore()
    double.with_options(cache=store)(list(range(40)))
    failing = DictStore(fail_gets=1)
    failing.data = dict(store.data)
    with caplog.at_level(logging.WARNING, "serverless.cache"):
        results, stats = double.with_options(cache=failing, chunk_size=10).with_stats(
            iter(range(80))  # a generator: looked up chunk by chunk as it is read
        )
    assert results == [2 * n for n in range(80)]
    assert stats.cache_error is not None and "connection refused" in stats.cache_error
    assert stats.cache_hits == 10  # the first chunk's lookup worked, then none was tried
    assert "goes on without it" in caplog.text
    unwritable = DictStore(fail_puts=0)
    results, stats = double.with_options(cache=unwritable).with_stats(list(range(20)))
    assert results == [2 * n for n in range(20)] and stats.cache_error is not None


def test_a_stored_result_that_does_not_decode_is_computed_again() -> None:
    store = DictStore()
    double.with_options(cache=store)([1, 2, 3])
    for key in store.data:
        store.data[key] = b"\xc1"  # never valid MessagePack
    assert double.with_options(cache=store)([1, 2, 3]) == [2, 4, 6]
    assert runs("double") == Counter({1: 2, 2: 2, 3: 2})


@serverless.parallel(workers=4)
def evens(numbers: list[int]) -> list[int]:
    """A filter: fewer results than items."""
    return [n for n in numbers if n % 2 == 0]


def test_a_pipeline_caches_every_parallel_step_each_in_requests_of_its_own() -> None:
    @serverless.sequential
    def total(numbers: list[int]) -> int:
        return sum(numbers)

    store = DictStore()
    pipeline = serverless.Pipeline(double, add.partial(1), total, cache=store)
    assert pipeline.run(list(range(10))) == sum(2 * n + 1 for n in range(10))
    run = pipeline.execute(list(range(10)))
    assert run.result == sum(2 * n + 1 for n in range(10))
    assert [s.cache_hits for s in run.steps[:2]] == [10, 10]
    assert sum(runs("double").values()) == sum(runs("add").values()) == 10
    # run(cache=): this run only; steps that would fuse run apart, each stored item by item
    fusable = serverless.Pipeline(double, inc)
    assert fusable.execute([1, 2]).steps[1].fused_with == 1  # uncached: one request each
    cached = fusable.execute([1, 2, 3], cache=store)
    assert cached.result == [3, 5, 7] and cached.steps[1].fused_with is None
    assert [(s.cache_hits, s.items_sent) for s in cached.steps] == [(3, 0), (0, 3)]
    assert fusable.execute([1, 2, 3], cache=store).steps[1].cache_hits == 3
    # a cached step fuses with nothing after it: a filter there is not paired with its items
    mapped_then_filtered = serverless.Pipeline(double.with_options(cache=store), evens)
    assert mapped_then_filtered.run([1, 2, 3]) == [2, 4, 6]
    # a filter cached (here by the Pipeline) cannot be stored item by item: said, not guessed
    with pytest.raises(serverless.ConfigurationError, match="set cache= on the steps that map"):
        serverless.Pipeline(inc, evens, cache=store).run([1, 2, 3])
    with pytest.raises(serverless.ConfigurationError, match="cache must be"):
        serverless.Pipeline(double, cache=3.5)


def test_the_piece_offsets_map_back_to_the_input() -> None:
    store: ResultStore = DictStore()
    cache = _cache.CallCache(store, b"p" * 32, UNTYPED)
    keys = item_keys(b"p" * 32, [1, 3])
    store.put_many([(keys[0], msgspec.msgpack.encode(10)), (keys[1], msgspec.msgpack.encode(30))])
    chunks = [Chunk(0, 0, [0, 1, 2, 3, 4]), Chunk(1, 5, [1, 3])]
    pieces = list(cache.attach(cache.lookups(iter(chunks), most=2)))
    assert [p.items for p in pieces] == [[0, 2], [4], []]
    assert [list(p.positions) for p in pieces] == [[0, 2], [4], []]
    merged = [cache.merge(p, [f"r{i}" for i in p.items]) for p in pieces]
    assert merged == [["r0", 10, "r2"], [30, "r4"], [10, 30]]


def test_a_whole_list_is_looked_up_before_the_call_and_none_missing_needs_no_worker() -> None:
    store = DictStore()
    cached = double.with_options(cache=store)
    cached(list(range(0, 100, 2)))
    gets = store.gets
    results, stats = cached.with_stats(list(range(100)))
    assert results == [2 * n for n in range(100)] and store.gets == gets + 1
    # the 50 misses were cut evenly among the workers, not left in the chunks they fell in
    assert stats.items_sent == 50 and sorted(c.size for c in stats.chunks) == [12, 12, 13, 13]
    again, stats = cached.with_stats(list(range(100)))
    assert again == results and stats.target == "none" and stats.items_sent == 0
    assert cached.submit(list(range(100))).result(timeout=10) == results
    assert sum(runs("double").values()) == 100


def test_a_store_that_fails_at_the_first_lookup_raises_before_anything_is_sent() -> None:
    with pytest.raises(StoreError, match="connection refused"):
        double.with_options(cache=DictStore(fail_gets=0))(list(range(10)))
    assert not RUNS
