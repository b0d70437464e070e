"""Result stores (`cache=`): the small interface every store implements, and how a spec opens one.

A store maps a 32-byte key (cachekey.py: the function's name, code digest and version, its
extra arguments and one item) to the encoded result of that item. It knows nothing of
functions or values: it keeps bytes under bytes, each record checksummed so that a damaged
one reads as a miss (counted in `stats().corrupted`), never as another result. A store is
used from several threads of one process (the call's lookups and its writer) and by several
processes at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

KEY_BYTES = 32  # a SHA-256 digest


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


def shared_store(spec: str) -> ResultStore:
    """The store a string spec names, opened once per process (stub until the stores land)."""
    raise NotImplementedError(f"no store for {spec!r} yet")
