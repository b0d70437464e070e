"""Splitting input into chunks. Pure functions, no I/O."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Chunk:
    """A slice of a call's input: its index among the chunks, the position of its first item
    in the whole input, and its items. Unpacks as `index, offset, items`."""

    index: int
    offset: int
    items: list[Any]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.index, self.offset, self.items))

    def head(self, count: int) -> Chunk:
        """Its first `count` items, as a part of the same chunk."""
        return Chunk(self.index, self.offset, self.items[:count])

    def tail(self, start: int) -> Chunk:
        """Its items from `start` on, as a part of the same chunk."""
        return Chunk(self.index, self.offset + start, self.items[start:])


def even_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of at most `parts` non-empty chunks whose sizes differ by at most one."""
    parts = max(1, min(parts, count))
    size, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts if count else 0):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def chunk_sequence(items: Sequence[Any], workers: int, chunk_size: int | None) -> Iterator[Chunk]:
    """Chunks of a list: `workers` even chunks, or fixed `chunk_size` ones if given."""
    if chunk_size is None:
        bounds = even_bounds(len(items), workers)
    else:
        bounds = [(s, min(s + chunk_size, len(items))) for s in range(0, len(items), chunk_size)]
    for index, (start, stop) in enumerate(bounds):
        yield Chunk(index, start, list(items[start:stop]))


def chunk_iterable(items: Iterable[Any], chunk_size: int) -> Iterator[Chunk]:
    """Chunks of any iterable, read lazily: a generator is never materialised whole."""
    iterator = iter(items)
    offset = 0
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, chunk_size))
        if not chunk:
            return
        yield Chunk(index, offset, chunk)
        offset += len(chunk)


class AdaptiveChunks:
    """Chunk sizes for an input of unknown length when the user set no chunk_size.

    Starts small, so the first replies come back fast and every worker gets work at once; then
    sizes each further chunk so that it carries about `target_s` of worker-side compute, as
    measured on the replies so far (a moving estimate of seconds per item). Per-request
    overhead (signing, encoding, the round trip: ~0.2-0.5 ms) then stays a small fraction of
    each request, and no chunk grows so large that one slow worker holds up the end.
    A pure policy: the dispatcher reports each reply through `observe`.
    """

    def __init__(
        self,
        start: int = 8,
        target_s: float = 0.075,
        max_size: int = 20_000,
        growth: float = 4.0,
    ) -> None:
        self.start, self.target_s, self.max_size, self.growth = start, target_s, max_size, growth
        self.size = start
        self._per_item: float | None = None  # seconds of compute per item, smoothed
        self._largest_seen = 0

    def next_size(self) -> int:
        return self.size

    def observe(self, size: int, compute_s: float) -> None:
        """One reply: `size` items took `compute_s` seconds on the worker."""
        if size <= 0:
            return
        rate = max(compute_s, 0.0) / size
        self._per_item = rate if self._per_item is None else 0.5 * self._per_item + 0.5 * rate
        self._largest_seen = max(self._largest_seen, size)
        wanted = self.target_s / self._per_item if self._per_item > 0 else float(self.max_size)
        ceiling = max(self.start, self._largest_seen * self.growth)  # grow in steps, not leaps
        self.size = int(max(1, min(wanted, ceiling, self.max_size)))


def chunk_adaptive(items: Iterable[Any], policy: AdaptiveChunks) -> Iterator[Chunk]:
    """Chunks of any iterable, each as large as `policy` says when it is cut; read lazily."""
    iterator = iter(items)
    offset = 0
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, policy.next_size()))
        if not chunk:
            return
        yield Chunk(index, offset, chunk)
        offset += len(chunk)
