"""cache= on a real redis-server, attacked: values of the wrong shape under a call's keys
(another type, too short, sealed but not a result of this function, a record moved from
another key) read as misses, and the call's own results then replace them."""

from __future__ import annotations

from typing import Any

import msgspec

from serverless._caller.cache import MISSING, CallCache
from serverless._caller.cachekey import item_keys
from serverless._caller.chunking import Chunk
from serverless._caller.store import open_store, seal
from serverless._wire.values import Shape


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
    assert all(result is MISSING for result in pieces[0].span)
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
