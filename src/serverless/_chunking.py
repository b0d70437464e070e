"""Splitting input into chunks. Pure functions, no I/O."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

Chunk = tuple[int, int, list[Any]]  # (chunk index, offset of its first item, items)


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
        yield index, start, list(items[start:stop])


def chunk_iterable(items: Iterable[Any], chunk_size: int) -> Iterator[Chunk]:
    """Chunks of any iterable, read lazily: a generator is never materialised whole."""
    iterator = iter(items)
    offset = 0
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, chunk_size))
        if not chunk:
            return
        yield index, offset, chunk
        offset += len(chunk)
