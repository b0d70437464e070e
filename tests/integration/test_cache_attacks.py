"""cache= on a real redis-server, attacked: values of the wrong shape under a call's keys
(another type, too short, sealed but not a result of this function, a record moved from
another key) read as misses, and the call's own results then replace them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from serverless._caller.cache import CallCache
from serverless._caller.cachekey import item_keys
from serverless._caller.chunking import Chunk
from serverless._caller.store import open_store, seal
from serverless._wire.values import Shape
from tests import sample_functions as sf


def test_redis_values_of_the_wrong_shape_are_misses_then_replaced(redis_url: str) -> None:
    import redis

    store = open_store(redis_url)
    raw = redis.Redis.from_url(redis_url)
    prefix = b"p" * 32
    items = list(range(6))
    keys = item_keys(prefix, items)
    names = [b"serverless:" + key for key in keys]
    raw.rpush(names[0], b"a list")  # another Redis type: MGET reads it as nil
    raw.hset(names[1], "field", "a hash")
    raw.set(names[2], b"short")  # shorter than a checksum
    raw.set(names[3], seal(keys[3], b"\xc1"))  # sealed, but not MessagePack
    raw.set(names[4], seal(keys[0], msgspec.msgpack.encode(99)))  # sealed for another key
    raw.set(names[5], seal(keys[5], msgspec.msgpack.encode("not an int")))  # a wrong type
    shape = Shape(function="m:f", items_name="items", items=int, result=int)
    cache = CallCache(store, prefix, shape)
    pieces = list(cache.attach(cache.lookups(iter([Chunk(0, 0, items)]))))
    assert [p.items for p in pieces] == [items] and cache.hits == 0
    assert pieces[0].span is None  # found nothing: its results are the output as they come
    assert cache.merge(pieces[0], [10 * n for n in items]) == [10 * n for n in items]
    cache.close()
    assert cache.error is None and cache.stored == 6
    again = CallCache(store, prefix, shape)
    found: list[Any] = list(again.attach(again.lookups(iter([Chunk(0, 0, items)]))))
    assert found[0].items == [] and found[0].span == [10 * n for n in items]
    assert again.merge(found[0], []) == [10 * n for n in items]
    again.close()
    raw.close()
    store.close()


def test_a_worker_killed_mid_chunk_on_the_local_pool_costs_a_retry_never_a_result(
    tmp_path: Path,
) -> None:
    """die_once SIGKILLs the first worker process that runs it, mid-chunk; the evens are
    stored first (under the same marker argument, which is part of the key): the retried
    piece's results land in their places between the hits, and are all stored."""
    spec = str(tmp_path / "results.db")
    marker = str(tmp_path / "marker")
    cached = sf.die_once.with_options(cache=spec, chunk_size=4, workers=3, retries=3)
    Path(marker).touch()  # no death while the evens are stored
    assert cached([n for n in range(40) if n % 2 == 0], marker) == list(range(0, 40, 2))
    Path(marker).unlink()
    out, stats = cached.with_stats(list(range(40)), marker)
    assert out == list(range(40))
    assert Path(marker).exists() and stats.retries >= 1
    assert (stats.cache_hits, stats.items_sent) == (20, 20)
    again, stats = cached.with_stats(list(range(40)), marker)
    assert again == out and stats.items_sent == 0
