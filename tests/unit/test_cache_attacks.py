"""cache=, attacked: inputs and options meant to make a cached call return a wrong result, lose,
duplicate or misplace one, run an item more often than promised, or number an error by its
place among the misses instead of its place in the input. Through the in-process transport,
with the dict store of test_cache.py; every function counts its executions per item."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import serverless
from serverless import RemoteError, SerializationError, TooManyFailures
from serverless._caller.cachekey import canonical, code_digest
from serverless._caller.sqlitestore import SQLiteStore
from serverless._exceptions import StoreError
from tests.quota import DOWNSTREAM
from tests.unit.test_cache import DictStore

RUNS: Counter[Any] = Counter()
_LOCK = threading.Lock()


def _count(name: str, items: Any) -> None:
    with _LOCK:
        RUNS.update((name, repr(i)) for i in items)


def runs(name: str) -> Counter[str]:
    return Counter({item: n for (fn, item), n in RUNS.items() if fn == name})


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    RUNS.clear()
    yield


@dataclasses.dataclass(frozen=True)
class Box:
    n: int


class Pair(msgspec.Struct, frozen=True):
    a: int
    b: str


@serverless.parallel(workers=4)
def kind_of(items):  # type: ignore[no-untyped-def]  # untyped: 1, 1.0 and True travel apart
    _count("kind_of", items)
    return [f"{type(i).__name__}:{i!r}" for i in items]


@serverless.parallel(workers=4)
def echo(items):  # type: ignore[no-untyped-def]  # untyped: returns what it got, any type
    _count("echo", items)
    return list(items)


@serverless.parallel(workers=4)
def maybe(numbers: list[int]) -> list[int | None]:
    _count("maybe", numbers)
    return [None if n % 3 == 0 else n for n in numbers]


@serverless.parallel(workers=4)
def boxes(numbers: list[int]) -> list[Box]:
    _count("boxes", numbers)
    return [Box(n) for n in numbers]


@serverless.parallel(workers=4)
def pairs(numbers: list[int]) -> list[Pair]:
    _count("pairs", numbers)
    return [Pair(n, str(n)) for n in numbers]


@serverless.parallel(workers=4)
def unbox(items: list[Box]) -> list[int]:
    _count("unbox", items)
    return [b.n for b in items]


@serverless.parallel(workers=4)
def padded(items: list[str]) -> list[int]:
    """Items of any size: returns each one's length."""
    _count("padded", [len(s) for s in items])
    return [len(s) for s in items]


@serverless.parallel(workers=4, errors="return")
def sevens(numbers: list[int]) -> list[int]:
    _count("sevens", numbers)
    out = []
    for n in numbers:
        if n % 10 == 7:
            raise ValueError(f"no {n}")
        out.append(n + 1)
    return out


@serverless.parallel(workers=4)
def slow_first(numbers: list[int], stall: float) -> list[int]:
    """Item 0's first run stalls `stall` seconds (a straggler for a hedge to overtake)."""
    _count("slow_first", numbers)
    if 0 in numbers and RUNS["slow_first", "0"] == 1:
        time.sleep(stall)
    return [n * 10 for n in numbers]


@serverless.parallel(workers=4)
def sleepy(numbers: list[int], seconds: float) -> list[int]:
    _count("sleepy", numbers)
    time.sleep(seconds)
    return [n + 100 for n in numbers]


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @serverless.parallel(workers=2)
    def scale(self, numbers: list[int]) -> list[int]:
        _count("scale", numbers)
        return [n * self.factor for n in numbers]


def _stored_values(store: DictStore) -> list[Any]:
    from serverless import _wire
    from serverless._wire.values import decoder

    decode = decoder(Any, _wire.MSGPACK).decode
    return [decode(raw) for raw in store.data.values()]


# -- the order of results: hits interleaved with misses, pieces re-cut ----------------------


def test_hits_interleaved_with_misses_in_every_pattern_come_back_in_order() -> None:
    store = DictStore()
    cached = echo.with_options(cache=store, chunk_size=7)
    cached([n for n in range(100) if n % 3 == 0])  # every third stored
    cached([n for n in range(100) if n % 5 == 1])  # and a second, overlapping pattern
    items = list(range(100))
    out, stats = cached.with_stats(items)
    assert out == items
    assert stats.cache_hits == len({n for n in items if n % 3 == 0 or n % 5 == 1})
    assert set(runs("echo").values()) == {1}  # no item ran twice over the three calls


def test_large_misses_recut_by_bytes_between_hits_keep_their_places() -> None:
    """Items of 200 KiB and 1 byte alternate; the small ones are stored first: the misses of
    each chunk are re-cut by bytes (within_bytes) into pieces of a few, between the hits."""
    big = "x" * 200_000
    items = [big + str(n) if n % 2 else str(n) for n in range(40)]
    store = DictStore()
    cached = padded.with_options(cache=store, workers=2, buffer=8 << 20)  # 256 KiB a piece
    cached([s for s in items if len(s) < 10])
    out, stats = cached.with_stats(items)
    assert out == [len(s) for s in items]
    assert stats.cache_hits == 20 and stats.items_sent == 20
    assert len(stats.chunks) > 2  # re-cut: more pieces than the 2 chunks cut by count
    assert cached(items) == [len(s) for s in items]  # all stored now, each under its own key


def test_the_same_item_twice_in_a_chunk_and_across_chunks() -> None:
    store = DictStore()
    cached = kind_of.with_options(cache=store, chunk_size=3)
    items = [5, 5, 6, 5, 6, 7, 5]
    out = cached(items)
    assert out == [f"int:{n}" for n in items]
    assert len(store.data) == 3  # one record per distinct key, however often it came
    again = cached(items)
    assert again == out
    # runs: each copy of a miss in the first call ran (no dedup promised), none in the second
    assert runs("kind_of") == Counter({"5": 4, "6": 2, "7": 1})


def test_equal_items_of_different_types_never_share_a_result() -> None:
    store = DictStore()
    cached = kind_of.with_options(cache=store)
    items: list[Any] = [1, 1.0, True, "1", b"1", (1,), [1], 0, False, 0.0, -0.0, None]
    first = cached(items)
    assert first == [f"{type(i).__name__}:{i!r}" for i in items]
    assert cached(items) == first
    assert cached(list(reversed(items))) == list(reversed(first))


def test_an_empty_input_and_a_one_item_input() -> None:
    store = DictStore()
    cached = echo.with_options(cache=store)
    assert cached([]) == []
    assert cached(iter([])) == []
    assert store.gets == 0
    assert cached([42]) == [42] and cached([42]) == [42]
    assert list(cached.stream(iter([42]))) == [42]
    assert runs("echo") == Counter({"42": 1})


# -- what comes back from the store is what the workers returned ----------------------------


def test_untyped_results_of_every_built_in_type_come_back_the_same_from_the_store() -> None:
    zone = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    values: list[Any] = [
        (1, (2, 3)),
        {1, 2},
        frozenset({"a"}),
        {1: "a", (2, 3): {4}},
        datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=zone),
        datetime.time(1, 2, 3),
        datetime.timedelta(days=-1, microseconds=5),
        decimal.Decimal("1.10"),
        uuid.UUID(int=7),
        2**64 - 1,
        -(2**63),
        b"\x00\xff",
        float("inf"),
        -0.0,
        None,
        [],
        {},
        "",
    ]
    store = DictStore()
    cached = echo.with_options(cache=store)
    live = cached(values)
    stored = cached(values)
    assert sum(runs("echo").values()) == len(values)  # the second call ran nothing
    for fresh, again in zip(live, stored, strict=True):
        assert type(again) is type(fresh) and again == fresh
        if isinstance(fresh, float):
            assert repr(again) == repr(fresh)  # -0.0 stays -0.0


def test_typed_results_optional_dataclass_and_struct_come_back_typed() -> None:
    store = DictStore()
    for step, expected in (
        (maybe, [None if n % 3 == 0 else n for n in range(9)]),
        (boxes, [Box(n) for n in range(9)]),
        (pairs, [Pair(n, str(n)) for n in range(9)]),
    ):
        cached = step.with_options(cache=store)
        assert cached(list(range(9))) == expected
        again, stats = cached.with_stats(list(range(9)))
        assert again == expected and stats.cache_hits == 9
        assert [type(r) for r in again] == [type(r) for r in expected]
    # the three functions share a store and the items 0..8: never each other's results
    assert len(store.data) == 27


def test_dataclass_items_are_keyed_by_value() -> None:
    store = DictStore()
    cached = unbox.with_options(cache=store)
    assert cached([Box(1), Box(2)]) == [1, 2]
    assert cached([Box(2), Box(3)]) == [2, 3]
    assert runs("unbox") == Counter({"Box(n=1)": 1, "Box(n=2)": 1, "Box(n=3)": 1})


def test_a_wrong_shaped_record_under_a_typed_key_is_a_miss() -> None:
    """A record planted (or left by another version) that decodes as MessagePack but not as
    a Box: computed again, never returned."""
    store = DictStore()
    cached = boxes.with_options(cache=store)
    cached([1, 2])
    for key in store.data:
        store.data[key] = msgspec.msgpack.encode({"m": "not a box"})
    assert cached([1, 2]) == [Box(1), Box(2)]
    assert runs("boxes") == Counter({"1": 2, "2": 2})


# -- errors and indices: places in the input, never among the misses ------------------------


def test_errors_return_with_hits_interleaved_numbers_every_failure_by_its_input_place() -> None:
    store = DictStore()
    cached = sevens.with_options(cache=store, chunk_size=4)
    cached([n for n in range(80) if n % 2 == 0])  # the evens stored (none ends in 7)
    out, stats = cached.with_stats(list(range(80)))
    failed = [n for n in range(80) if n % 10 == 7]
    assert stats.failed == failed
    for n, result in enumerate(out):
        if n in failed:
            assert isinstance(result, RemoteError) and result.index == n, (n, result)
        else:
            assert result == n + 1
    # no item ran twice; the failures never went into the store
    assert runs("sevens") == Counter({str(n): 1 for n in range(80)})
    assert len(store.data) == 80 - len(failed)


def test_too_many_failures_names_input_places_with_hits_interleaved() -> None:
    store = DictStore()
    sevens.with_options(cache=store)([n for n in range(100) if n % 10 != 7 and n % 3 == 0])
    budget = sevens.with_options(cache=store, max_failures=2, workers=1, chunk_size=10)
    with pytest.raises(TooManyFailures) as caught:
        budget(list(range(100)))
    assert [f.index for f in caught.value.failures] == [7, 17, 27]
    # the successes before it stopped are stored: a rerun sends none of them again
    assert all(not isinstance(v, RemoteError) for v in _stored_values(store))


def test_throttled_partial_chunks_with_hits_interleaved_and_errors_return() -> None:
    """counted_or_throttled: a downstream quota (Throttled mid-chunk, the rest resent) and a
    ValueError on n % 7 == 3. With half the items stored: every result in its place, every
    error numbered by its place in the input, no item served twice by the downstream."""
    from tests import sample_functions as sf

    store = DictStore()
    DOWNSTREAM.reset(rate=2000.0, burst=1000.0)
    cached = sf.counted_or_throttled.with_options(cache=store, errors="return", chunk_size=10)
    cached([n for n in range(120) if n % 2 == 0])
    DOWNSTREAM.reset(rate=400.0, burst=3.0)
    out, stats = cached.with_stats(list(range(120)))
    for n, value in enumerate(out):
        if n % 7 == 3 and (n % 2 == 1 or True):
            assert isinstance(value, RemoteError) and value.index == n, (n, value)
        else:
            assert value == n
    # the odd items only were sent (and the even failures again: never stored)
    sent = {n for n in range(120) if n % 2 == 1 or n % 7 == 3}
    assert DOWNSTREAM.served == dict.fromkeys(sent, 1)
    assert stats.failed == [n for n in range(120) if n % 7 == 3]


def test_a_paced_cached_call_sends_only_the_misses_item_by_item() -> None:
    from tests import sample_functions as sf

    store = DictStore()
    DOWNSTREAM.reset(rate=1000.0, burst=1000.0)
    cached = sf.quota_lookup.with_options(cache=store, rate=200)
    cached(list(range(0, 60, 3)))
    out, stats = cached.with_stats(list(range(60)))
    assert out == [2 * n for n in range(60)]
    assert stats.cache_hits == 20 and stats.items_sent == 40
    assert DOWNSTREAM.served == dict.fromkeys(range(60), 1)


def test_a_serialization_error_names_the_items_place_in_the_input() -> None:
    """An item too large for any request, after stored items: the error names its place in
    the input (10), not its place among the misses (5)."""
    store = DictStore()
    cached = padded.with_options(cache=store, chunk_size=20)
    cached([str(n) for n in range(5)])
    items = [str(n) for n in range(10)] + ["y" * (40 << 20)]
    with pytest.raises(SerializationError) as caught:
        cached(items)
    assert "item 10 " in str(caught.value), str(caught.value)


def test_an_item_that_does_not_fit_the_type_is_named_by_its_input_place() -> None:
    store = DictStore()
    cached = unbox.with_options(cache=store, chunk_size=20)
    cached([Box(n) for n in range(5)])
    items: list[Any] = [Box(n) for n in range(10)] + ["not a box"]
    with pytest.raises(SerializationError) as caught:
        cached(items)
    assert "10" in str(caught.value) and " 5" not in str(caught.value), str(caught.value)


# -- items that have no key ------------------------------------------------------------------


def test_an_item_with_no_stable_key_raises_before_anything_is_sent() -> None:
    store = DictStore()
    with pytest.raises(SerializationError, match="item 2 "):  # the wire's check, first
        echo.with_options(cache=store)([1, 2, object()])
    with pytest.raises(SerializationError, match="no stable key"):  # a generator's: the key's
        echo.with_options(cache=store)(iter([1, 2, object()]))
    assert not runs("echo") and not store.data


def test_a_generator_that_raises_midway_ends_the_call_and_the_store_stays_right() -> None:
    store = DictStore()
    cached = echo.with_options(cache=store, chunk_size=5)

    def numbers() -> Iterator[int]:
        yield from range(23)
        raise RuntimeError("the input broke")

    with pytest.raises(RuntimeError, match="the input broke"):
        cached(numbers())
    assert all(isinstance(v, int) for v in _stored_values(store))
    assert cached(list(range(30))) == list(range(30))


def test_a_dataclass_item_with_a_big_int_has_a_key() -> None:
    """canonical() falls back to digits for ints beyond 64 bits, but only inside lists,
    tuples and dicts: one inside a dataclass or Struct raised OverflowError."""
    assert canonical(Box(2**70)) != canonical(Box(2**71))
    assert canonical({"k": Box(2**70)}) != canonical({"k": Box(-(2**70))})
    assert canonical(Pair(2**70, "x")) != canonical(Pair(2**71, "x"))
    assert canonical(Box(1)) == canonical(Box(1))


# -- keys: what makes two calls the same call ------------------------------------------------


def test_instances_with_different_state_never_share_results() -> None:
    store = DictStore()
    two = Scaler(2).scale.with_options(cache=store)
    three = Scaler(3).scale.with_options(cache=store)
    assert two([1, 2]) == [2, 4]
    assert three([1, 2]) == [3, 6]
    assert Scaler(2).scale.with_options(cache=store)([1, 2]) == [2, 4]
    assert runs("scale") == Counter({"1": 2, "2": 2})


def test_keyword_and_positional_arguments_never_give_a_wrong_result() -> None:
    store = DictStore()
    cached = sleepy.with_options(cache=store)
    assert cached([1], 0.0) == [101]
    assert cached([1], seconds=0.0) == [101]
    assert cached(items=[1], seconds=0.0) == [101]  # type: ignore[call-arg]
    assert cached([1], 0) == [101]  # 0 is not 0.0 for a key: a miss, never a wrong value


_HELPER = """
FACTOR = {factor}

def helper(x):
    return x * {inner}

def f(items):
    return [helper(i) + FACTOR for i in items]
"""


def _digest(factor: int, inner: int) -> bytes:
    namespace: dict[str, Any] = {"__name__": "attack_module"}
    exec(compile(_HELPER.format(factor=factor, inner=inner), "<attack>", "exec"), namespace)
    return code_digest(namespace["f"])


def test_a_changed_helper_or_constant_of_the_same_module_changes_the_key() -> None:
    """Before, code_digest covered the function's own code only: a changed helper of the
    same module, or a module constant, kept the key, and the call returned old results."""
    assert _digest(1, 2) == _digest(1, 2)  # compiled again: the same
    assert _digest(1, 2) != _digest(1, 3)  # the helper's code changed
    assert _digest(1, 2) != _digest(5, 2)  # a module constant changed


_CONTEXT = """
import json
TABLE = {table}
LIMITS = (1, ("a", {limit}))
SEEN = []

def even(n):
    "Doc {doc}."
    return n == 0 or odd(n - 1)

def odd(n):
    return n != 0 and even(n - 1)

def f(items):
    SEEN.append(1)
    return [json.dumps([even(i), TABLE.get(i), LIMITS]) for i in items]
"""


def _context_digest(table: str = "{}", limit: int = 2, doc: str = "a", seen: int = 0) -> bytes:
    namespace: dict[str, Any] = {"__name__": "attack_context"}
    exec(compile(_CONTEXT.format(table=table, limit=limit, doc=doc), "<c>", "exec"), namespace)
    namespace["SEEN"].extend([0] * seen)
    return code_digest(namespace["f"])


def test_the_digest_follows_constants_and_helpers_but_not_mutable_globals_or_modules() -> None:
    base = _context_digest()
    assert _context_digest(doc="another") == base  # a helper's docstring: still a hit
    assert _context_digest(seen=3) == base  # a list the function appends to: not followed
    assert _context_digest(table="{1: 2}") == base  # a dict: not followed (version= is)
    assert _context_digest(limit=3) != base  # a nested tuple constant: by value
    # even and odd call each other: followed once each, the digest terminates


def _closure(k: int) -> Any:
    def f(items: list[int]) -> list[int]:
        return [i * k for i in items]

    return f


def test_closures_with_different_cell_values_have_different_digests() -> None:
    assert code_digest(_closure(2)) != code_digest(_closure(3))
    assert code_digest(_closure(2)) == code_digest(_closure(2))


# -- hedging, deadlines, streams closed early ------------------------------------------------


def test_a_hedged_straggler_with_cache_gives_each_result_once_in_order() -> None:
    store = DictStore()
    cached = slow_first.with_options(cache=store, idempotent=True, chunk_size=1, workers=8)
    cached([5, 6], 1.5)  # two hits among the misses
    started = time.monotonic()
    out, stats = cached.with_stats(list(range(12)), 1.5)
    assert out == [10 * n for n in range(12)]
    assert stats.hedges >= 1 and time.monotonic() - started < 1.5  # the hedge won
    assert sorted(_stored_values(store)) == [10 * n for n in range(12)]
    assert cached(list(range(12)), 1.5) == out
    assert runs("slow_first")["0"] == 2 and runs("slow_first")["1"] == 1


def test_a_deadline_hit_mid_call_leaves_only_right_results_in_the_store() -> None:
    store = DictStore()
    cached = sleepy.with_options(cache=store, chunk_size=1, workers=2, deadline=0.5)
    with pytest.raises(serverless.DeadlineExceeded):
        cached(list(range(20)), 0.1)
    stored = _stored_values(store)
    assert stored and all(v >= 100 for v in stored) and len(stored) < 20
    out = sleepy.with_options(cache=store, workers=20, chunk_size=1)(list(range(20)), 0.0)
    assert out == [n + 100 for n in range(20)]


def test_a_stream_closed_early_stores_right_results_only_and_a_rerun_completes() -> None:
    store = DictStore()
    cached = sleepy.with_options(cache=store, chunk_size=2, workers=3)
    stream = cached.stream(iter(range(40)), 0.02)
    taken = [next(stream) for _ in range(5)]
    stream.close()  # type: ignore[attr-defined]
    assert taken == [n + 100 for n in range(5)]
    stored = _stored_values(store)
    assert all(v >= 100 for v in stored) and 6 <= len(stored) < 40
    out, stats = cached.with_stats(list(range(40)), 0.02)
    assert out == [n + 100 for n in range(40)]
    assert stats.cache_hits == len(stored)


def test_a_fused_pipeline_with_different_bound_arguments_never_shares_results() -> None:
    from tests.unit.test_cache import add, inc

    store = DictStore()
    one = serverless.Pipeline(add.partial(1), inc, cache=store)
    two = serverless.Pipeline(add.partial(2), inc, cache=store)
    assert one.run([1, 2]) == [3, 4]
    assert two.run([1, 2]) == [4, 5]
    assert one.run([1, 2]) == [3, 4]
    assert serverless.Pipeline(add.partial(1), cache=store).run([1, 2]) == [2, 3]


# -- the SQLite store's file: what another local user could plant ---------------------------


def test_a_symlink_planted_at_the_rollback_journal_of_a_new_store_is_never_followed(
    tmp_path: Path,
) -> None:
    """A new store's tables are made before WAL is on, in a rollback journal (`-journal`),
    a name _check_file does not create or check: SQLite opens it without following links."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    Path(f"{tmp_path / 'c.db'}-journal").symlink_to(victim)
    store = SQLiteStore(tmp_path / "c.db")
    store.put_many([(b"k" * 32, b"v")])
    assert store.get_many([b"k" * 32]) == [b"v"]
    store.close()
    assert victim.read_bytes() == b"precious"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_a_store_in_a_folder_another_user_controls_is_refused(tmp_path: Path) -> None:
    """Before, only the file and its companions were checked: a folder that another user
    owns (or anyone may write, without the sticky bit), at any level, let them swap the
    store for one of theirs after the checks (a connection opened later reads it)."""
    theirs = tmp_path / "theirs"
    (theirs / "mine").mkdir(parents=True)
    os.chown(theirs, 65534, 65534)
    for path in (theirs / "c.db", theirs / "mine" / "c.db", theirs / "new" / "c.db"):
        with pytest.raises(StoreError, match="belongs to another user"):
            SQLiteStore(path)
        assert not path.exists()
    assert not (theirs / "new").exists()  # refused before any folder was made there
    anyone = tmp_path / "anyone"
    anyone.mkdir()
    anyone.chmod(0o777)
    with pytest.raises(StoreError, match="written by anyone"):
        SQLiteStore(anyone / "c.db")
    anyone.chmod(0o1777)  # sticky, as /tmp: nobody can rename another's file there
    store = SQLiteStore(anyone / "c.db")
    store.close()


def test_a_record_planted_by_a_writer_of_the_store_is_returned_as_is() -> None:
    """The trust boundary: a record's checksum catches damage, not forgery (it is not keyed).
    Whoever may write the store decides its results, as the README/docs must say."""
    store = DictStore()
    echo.with_options(cache=store)([1, 2])
    from serverless._caller.store import seal, unseal

    for key in list(store.data):
        store.data[key] = msgspec.msgpack.encode("forged")
    assert echo.with_options(cache=store)([1, 2]) == ["forged", "forged"]
    assert unseal(b"k" * 32, seal(b"k" * 32, b"any payload")) == b"any payload"


class SlowStore(DictStore):
    """A store that writes slower than the workers answer: each record takes `per` seconds.
    Records the most result bytes a single put_many was handed (the writer's backlog)."""

    def __init__(self, per: float) -> None:
        super().__init__()
        self.per = per
        self.most = 0

    def put_many(self, records: Any) -> None:
        self.most = max(self.most, sum(len(payload) for _, payload in records))
        time.sleep(self.per * len(records))
        super().put_many(records)


@serverless.parallel(workers=4)
def heavy(numbers: list[int]) -> list[str]:
    return [str(n).rjust(8192, "x") for n in numbers]


def test_a_slow_store_never_makes_a_stream_hold_more_than_its_buffer() -> None:
    """Before, the writer's queue was unbounded and outside the stream's buffer: with a store
    slower than the workers, results waiting to be stored piled up without bound."""
    store = SlowStore(per=0.002)
    buffer = 256 << 10
    cached = heavy.with_options(cache=store, buffer=buffer)
    count = 0
    for result in cached.stream(iter(range(600))):
        count += len(result) > 0
    assert count == 600
    assert store.most <= 4 * buffer, f"{store.most} bytes queued for one put, buffer {buffer}"


# -- functions that do not return one result per item ----------------------------------------


@serverless.parallel(workers=2)
def twice(items: list[int]) -> list[int]:
    """Two results per item (list-in/list-out allows it: count_out differs from count)."""
    _count("twice", items)
    return [x for i in items for x in (i, -i)]


@serverless.parallel(workers=2)
def odds(items: list[int]) -> list[int]:
    """A filter: fewer results than items."""
    _count("odds", items)
    return [i for i in items if i % 2]


def test_without_cache_a_function_may_return_more_or_fewer_results_than_items() -> None:
    assert twice([1, 2]) == [1, -1, 2, -2]
    assert odds([1, 2, 3]) == [1, 3]


@pytest.mark.parametrize("step", [twice, odds])
def test_cache_never_stores_results_paired_with_the_wrong_items(step: Any) -> None:
    """Before, merge paired the i-th result with the i-th miss: twice([1, 2]) with cache=
    returned [1, -1], dropped 2 and -2 and stored -1 as the result of 2; odds raised a bare
    RuntimeError (StopIteration in a coroutine). A function whose answer does not hold one
    result per item is refused with the reason, and nothing is stored."""
    store = DictStore()
    with pytest.raises(serverless.ConfigurationError, match="one result per item"):
        step.with_options(cache=store, workers=1)([1, 2, 3])
    assert not store.data


def test_a_fused_cached_group_counts_the_items_found_in_each_stage() -> None:
    """Before, a fused group's per-stage counts were the workers' only: 8 of 10 items found
    reported 2 elements out of each stage, and 10 of 10 reported 0. Cached steps now run
    unfused, each its own call, and each still counts every item, found or sent."""
    from tests.unit.test_cache import double, inc

    store = DictStore()
    fused = serverless.Pipeline(double, inc)
    fused.run(list(range(8)), cache=store)
    for _ in range(2):  # 8 of 10 found, then all 10
        run = fused.execute(list(range(10)), cache=store)
        assert run.result == [2 * n + 1 for n in range(10)]
        assert [(s.count, s.count_out) for s in run.steps] == [(10, 10), (10, 10)]


class WidestStore(DictStore):
    """Records the most keys one lookup asked for."""

    widest = 0

    def get_many(self, keys: Any) -> list[bytes | None]:
        self.widest = max(self.widest, len(keys))
        return super().get_many(keys)


def test_a_fully_cached_stream_of_large_results_reads_within_its_buffer() -> None:
    """Before, KnownRuns grew a found run's chunks x4 up to 20,000 items whatever they
    weighed: here 812 results of 8 KiB (6.5 MiB) in one lookup for buffer=1 MiB, and up to
    20,000 on a longer stream."""
    store = WidestStore()
    cached = heavy.with_options(cache=store, buffer=1 << 20)
    cached(list(range(1500)))
    store.widest = 0
    results = 0
    for result in cached.stream(iter(range(1500))):
        results += len(result) > 0
    assert results == 1500
    assert store.widest * 8192 <= 4 << 20, f"{store.widest} items of 8 KiB in one lookup"


@serverless.parallel(workers=4, errors="return")
def halves(numbers: list[int]) -> list[int]:
    """Fails on every odd item."""
    for n in numbers:
        if n % 2:
            raise ValueError(f"odd {n}")
    return list(numbers)


def test_a_stream_with_errors_return_does_not_keep_every_failure() -> None:
    """Before, Fanout.failures kept every RemoteError of an errors="return" call (its
    traceback text included) for max_failures=, even with none set and after the stream
    had yielded them: 3,000 alive here, growing with the stream."""
    import gc

    alive = 0
    for n, result in enumerate(halves.stream(iter(range(6000)))):
        assert (n % 2 == 1) == isinstance(result, RemoteError)
        if n == 5900:
            del result
            gc.collect()
            alive = sum(isinstance(o, RemoteError) for o in gc.get_objects())
    assert alive < 1000, f"{alive} RemoteErrors alive after 2,950 failures went by"
