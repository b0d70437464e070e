"""Splitting input into chunks. Pure functions, no I/O.

A chunk is cut by count (`workers` even parts of a list, a fixed `chunk_size`, or an adaptive
size for a generator), then re-cut by bytes where it would carry too many (`within_bytes`):
a 4 KiB item times the adaptive 20,000 made a 33.6 MB request, over the 32 MiB body limit,
in the middle of a stream (issue 22).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .._exceptions import SerializationError


@dataclass(frozen=True, slots=True)
class Chunk:
    """A slice of a call's input: its index among the chunks, the position of its first item
    in the whole input, and its items. Unpacks as `index, offset, items`."""

    index: int
    offset: int
    items: list[Any]
    nbytes: int = 0  # its items' encoded size, where measured (within_bytes); 0: unknown

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
        weights: ChunkBytes | None = None,
    ) -> None:
        self.start, self.target_s, self.max_size, self.growth = start, target_s, max_size, growth
        self.size = start
        self.weights = weights  # bytes per item each way: a chunk never reads more than fits
        self._per_item: float | None = None  # seconds of compute per item, smoothed
        self._largest_seen = 0

    def next_size(self) -> int:
        if self.weights is None:
            return self.size
        return min(self.size, self.weights.items())

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


class Sizes(Protocol):
    """How many items the next chunk of an input of unknown length takes."""

    def next_size(self) -> int: ...


def chunk_adaptive(items: Iterable[Any], policy: Sizes) -> Iterator[Chunk]:
    """Chunks of any iterable, each as large as `policy` says when it is cut; read lazily."""
    iterator = iter(items)
    offset = 0
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, policy.next_size()))
        if not chunk:
            return
        yield Chunk(index, offset, chunk)
        offset += len(chunk)


class ChunkBytes:
    """What a call's items and results weigh, encoded, and so how many items one chunk may
    carry: at most `limit` bytes of items in its request and of results in its reply.

    The request side is exact (within_bytes measures every chunk before it is sent); this
    estimate only keeps the adaptive chunker from reading far more than fits. The reply side
    is known only from replies: each reply's bytes per item raise the estimate at once and
    lower it slowly, so a chunk cut after a reply of large results carries fewer items.
    """

    DECAY = 0.9  # a lower figure moves the estimate a tenth of the way down

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.item_bytes = 0.0  # per input item, as measured
        self.result_bytes: float | None = None  # per input item, as replies carried

    def items(self) -> int:
        """The most items one chunk may carry, as far as measured (sys.maxsize: no figure)."""
        per = max(self.item_bytes, self.result_bytes or 0.0)
        return max(1, int(self.limit / per)) if per > 0 else sys.maxsize

    def expected(self, chunk: Chunk) -> int:
        """Bytes of results expected from `chunk`: what replies so far carried per item, or,
        before any reply, its own items' size."""
        if self.result_bytes is None:
            return chunk.nbytes
        return int(len(chunk.items) * self.result_bytes)

    def measured(self, items: int, nbytes: int) -> None:
        """A chunk of `items` items encodes to `nbytes` bytes."""
        if items > 0:
            self.item_bytes = _follow(self.item_bytes, nbytes / items)

    def answered(self, items: int, nbytes: int) -> None:
        """A reply to a request of `items` items was `nbytes` bytes long."""
        if items > 0 and nbytes > 0:
            per, known = nbytes / items, self.result_bytes
            self.result_bytes = per if known is None else _follow(known, per)


def _follow(estimate: float, figure: float) -> float:
    """Up at once, down slowly: an estimate that errs on the heavy side."""
    return max(figure, ChunkBytes.DECAY * estimate + (1 - ChunkBytes.DECAY) * figure)


def within_bytes(
    chunks: Iterable[Chunk],
    weights: ChunkBytes,
    measure: Callable[[Any], int],
    max_item: int,
    function: str,
) -> Iterator[Chunk]:
    """`chunks`, each re-cut where it carries more than `weights.limit` bytes of items (as
    `measure` encodes them) or more items than `weights.items()` allows for its reply; the
    pieces numbered in order, each with its size. An item over `max_item` bytes on its own
    (what a request leaves for its items) raises SerializationError: no chunk can carry it."""
    index = 0
    for chunk in chunks:
        for offset, items, nbytes in _pieces(chunk, weights, measure, max_item, function):
            yield Chunk(index, offset, items, nbytes)
            index += 1


def _pieces(
    chunk: Chunk,
    weights: ChunkBytes,
    measure: Callable[[Any], int],
    max_item: int,
    function: str,
) -> Iterator[tuple[int, list[Any], int]]:
    """(offset, items, bytes) of each piece of `chunk`: slices of as many items as replies
    allow, each measured whole (one encoding, C speed: ~20 us for 10,000 small ints), and
    measured item by item only where one is over the limit."""
    limit, most, items = weights.limit, weights.items(), chunk.items
    if not items:  # a cached call's chunk whose results were all found: it passes as it is
        yield chunk.offset, items, 0
        return
    for first in range(0, len(items), most):
        part = items[first : first + most] if most < len(items) else items
        nbytes = measure(part)
        if nbytes > limit:
            yield from _by_item(chunk.offset + first, part, weights, measure, max_item, function)
            continue
        weights.measured(len(part), nbytes)
        yield chunk.offset + first, part, nbytes


def _by_item(
    offset: int,
    items: list[Any],
    weights: ChunkBytes,
    measure: Callable[[Any], int],
    max_item: int,
    function: str,
) -> Iterator[tuple[int, list[Any], int]]:
    start, run = 0, 0
    for i, item in enumerate(items):
        size = measure(item)
        if size > max_item:
            raise SerializationError(
                f"item {offset + i} of {function} encodes to {size} bytes, over the "
                f"{max_item} bytes a request has room for: one item must fit in one request "
                f"(serverless.init(max_body=) raises the limit, where the workers accept it)",
                index=offset + i,
            )
        if i > start and run + size > weights.limit:
            weights.measured(i - start, run)
            yield offset + start, items[start:i], run
            start, run = i, 0
        run += size
    weights.measured(len(items) - start, run)
    yield offset + start, items[start:], run
