"""Result stores (`cache=`): the small interface every store implements, and how a spec opens one.

A store maps a 32-byte key (cachekey.py: the function's name, code digest and version, its
extra arguments and one item) to the encoded result of that item. It knows nothing of
functions or values: it keeps bytes under bytes, each record checksummed so that a damaged
one reads as a miss (counted in `stats().corrupted`), never as another result. A store is
used from several threads of one process (the call's lookups and its writer) and by several
processes at once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

from .._exceptions import ConfigurationError

KEY_BYTES = 32  # a SHA-256 digest
CHECK_BYTES = 16  # a record is sha256(key + payload)[:16] followed by the payload

log = logging.getLogger("serverless.cache")


@dataclass(frozen=True)
class StoreStats:
    """What `serverless cache stats` prints. records: results stored (expired ones included
    until they are swept); nbytes: their payloads' bytes; corrupted: records read since the
    store was opened in this process whose checksum did not match (each read as a miss)."""

    location: str
    records: int
    nbytes: int
    corrupted: int = 0
    ttl: float | None = None


@runtime_checkable
class ResultStore(Protocol):
    """Bytes under 32-byte keys. Every method may raise StoreError (unreachable, damaged)."""

    location: str  # a path or URL, never with a password in it: it appears in messages

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The payload stored under each key, in order; None where there is none, it has
        expired, or its record is damaged."""
        ...

    def put_many(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Store (key, payload) pairs, all or none (one transaction): a caller killed at any
        moment leaves each reply's results either wholly stored or not at all."""
        ...

    def stats(self) -> StoreStats: ...

    def clear(self) -> int:
        """Remove every record; how many there were."""
        ...

    def close(self) -> None: ...


def seal(key: bytes, payload: bytes) -> bytes:
    """The stored record of a payload: its checksum (bound to its key, so that a record moved
    under another key reads as damaged too), then the payload."""
    return hashlib.sha256(key + payload).digest()[:CHECK_BYTES] + payload


def unseal(key: bytes, record: bytes) -> bytes | None:
    """The payload of a record, or None when its checksum does not match."""
    payload = record[CHECK_BYTES:]
    if len(record) < CHECK_BYTES or seal(key, payload)[:CHECK_BYTES] != record[:CHECK_BYTES]:
        return None
    return payload


class Unsealer:
    """Reads a store's records into payloads: a damaged one becomes a miss, is counted, and
    the first one is logged at WARNING (once per store and process)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.damaged = 0
        self._lock = threading.Lock()
        _unsealers.add(self)

    def payloads(
        self, keys: Sequence[bytes], records: Sequence[bytes | None]
    ) -> list[bytes | None]:
        payloads = [None if r is None else unseal(k, r) for k, r in zip(keys, records, strict=True)]
        damaged = sum(p is None and r is not None for p, r in zip(payloads, records, strict=True))
        if damaged:
            with self._lock:
                first = self.damaged == 0
                self.damaged += damaged
            if first:
                log.warning(
                    "the result store %s holds damaged records: they read as misses, their "
                    "items run again and their new results replace them (logged once)",
                    self.location,
                )
        return payloads


def open_store(spec: str | ResultStore, ttl: float | None = None) -> ResultStore:
    """The store a `cache=` spec names: a ResultStore as is; `redis://` or `rediss://` (TLS) a
    Redis server; `sqlite:///abs/path`, `sqlite://relative` or any other string a SQLite file.
    A `?ttl=SECONDS` query sets the records' time to live, as `ttl` does."""
    if not isinstance(spec, str):
        if isinstance(spec, ResultStore):
            return spec
        raise ConfigurationError(
            f"cache= takes a path, a sqlite:// or redis:// URL, or a ResultStore; got {spec!r}"
        )
    target, ttl = _split_ttl(spec, ttl)
    scheme = _scheme(target)
    if scheme in ("redis", "rediss"):
        from .redisstore import RedisStore

        return RedisStore(target, ttl=ttl)
    if scheme not in ("", "sqlite"):
        raise ConfigurationError(
            f"cache={redact(spec)!r}: unknown scheme {scheme!r}; use a path, sqlite:///path, "
            "redis://host:port/db or rediss://..."
        )
    path = sqlite_path(target)
    if not path:
        raise ConfigurationError(f"cache={spec!r} names no file")
    from .sqlitestore import SQLiteStore

    return SQLiteStore(path, ttl=ttl)


def sqlite_path(spec: str) -> str | None:
    """The file a SQLite spec names (without its query); None for another scheme."""
    target = spec.partition("?")[0]
    scheme = _scheme(target)
    if scheme == "sqlite":
        return target[len("sqlite://") :]
    return None if scheme else target


def _scheme(spec: str) -> str:
    return spec.partition("://")[0].lower() if "://" in spec else ""


def _split_ttl(spec: str, ttl: float | None) -> tuple[str, float | None]:
    """The spec without its `?ttl=` query, and the ttl (the query's, or the argument's)."""
    target, _, query = spec.partition("?")
    if query:
        options = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(options) - {"ttl"})
        if unknown or "ttl" not in options:
            raise ConfigurationError(
                f"cache={redact(spec)!r}: the only query option is ?ttl=SECONDS, "
                f"not {', '.join(unknown) or query!r}"
            )
        try:
            queried = float(options["ttl"])
        except ValueError:
            raise ConfigurationError(
                f"cache={redact(spec)!r}: ttl={options['ttl']!r} is not a number of seconds"
            ) from None
        if ttl is not None and ttl != queried:
            raise ConfigurationError(
                f"cache={redact(spec)!r} says ttl={queried:g} but ttl={ttl:g} was passed too"
            )
        ttl = queried
    if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
        raise ConfigurationError(
            f"cache={redact(spec)!r}: ttl must be a positive number of seconds"
        )
    return target, ttl


def redact(url: str) -> str:
    """The URL without its password (it appears in messages and `location`)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}"
    query = "&".join(
        f"{name}=***" if name.lower() == "password" else f"{name}={value}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return parts._replace(netloc=netloc, query=query).geturl()


_shared: dict[tuple[int, str, float | None], ResultStore] = {}
_shared_lock = threading.Lock()


def shared_store(spec: str | ResultStore, ttl: float | None = None) -> ResultStore:
    """One opened store per process for each string spec, reused by every call that names it
    (a forked child opens its own: an inherited connection is not safe to use)."""
    if not isinstance(spec, str):
        return open_store(spec, ttl)
    key = (os.getpid(), spec, ttl)
    with _shared_lock:
        store = _shared.get(key)
        if store is None:
            store = _shared[key] = open_store(spec, ttl)
        return store


_unsealers: weakref.WeakSet[Unsealer] = weakref.WeakSet()


def _after_fork() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()  # another thread may have held them at the fork
    for unsealer in list(_unsealers):
        unsealer._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
