"""One call's use of a result store (`cache=`): look items up, send only the misses, store
what comes back.

Where it sits in the chunk pipeline (plan.py `CallPlan.chunks`):

    cut -> lookups -> (wire, re-cut by bytes) -> attach -> the fan-out

`lookups` takes each chunk as cut from the input, computes its items' keys (cachekey.py),
asks the store for them in one `get_many`, and passes on only the items it did not find, in
"miss coordinates" (their offset among the call's misses), splitting a long run of misses
into parts the size the call would send. A chunk whose items were all found passes on
empty, so the pipeline stays lazy: a stream of any length is looked up as it is read, never
whole. `attach` pairs each piece that comes out of the re-cut with the results found for the
items around it, so each piece the fan-out settles yields its part of the output in input
order: the found results with the workers' in their places (`merge`). A piece with no items
is settled without a request.

Results are stored as each piece's answer arrives, on a writer thread (one `put_many`, one
transaction, per answer); an item that failed (errors="return") is never stored, so calling
again reruns exactly the failures. A store that fails at the call's first lookup raises
StoreError: nothing was sent. One that fails later (unreachable, damaged) is not used for the
rest of the call: it goes on uncached, logs a warning, and its statistics say why
(`StepStats.cache_error`): a store can cost work, never a wrong result.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from .. import _wire as p
from .._exceptions import ConfigurationError, RemoteError, SerializationError, StoreError
from .._wire.values import Shape, decoder, to_wire
from .cachekey import item_keys
from .chunking import AdaptiveChunks, Chunk
from .store import KEY_BYTES, ResultStore

logger = logging.getLogger("serverless.cache")

MISSING: Final = object()  # an item whose result the store did not have
CLOSE_WITHIN = 60.0  # seconds a call waits, at its end, for its results to be stored
LOOKUP_WINDOW = 2_000  # keys per get_many of a list looked up whole
WRITE_BATCH = 20_000  # records per put_many at most, however many answers queued up
WRITE_BACKLOG = 8 * 1024 * 1024  # bytes of replies whose results a call may queue...
# ...and records: small results weigh little on the wire, ~150 bytes each queued (its key,
# its tuple); a 10,000,000-item stream storing as it went peaked at 766 MB with bytes alone
WRITE_BACKLOG_RECORDS = 50_000
BACKLOG_POLL = 0.01  # ...before its next answered chunk waits, looking again this often


@dataclass(frozen=True, slots=True)
class Piece(Chunk):
    """A chunk of a cached call as the fan-out gets it: its items are misses (offsets in miss
    coordinates); `span` is its part of the output, the found results with MISSING where its
    items' results go (None: it found none, its results are the output as they come);
    `positions` are its items' places in the input, `keys` their keys end to end. Compact, as
    a stream holds many pieces in flight: a range, 32 bytes a key, no span where none was
    found (a storing stream of 2,000,000 small items peaked at 680 MB with lists of each)."""

    span: list[Any] | None = None
    positions: Sequence[int] = range(0)
    keys: bytes = b""
    found_bytes: int = 0  # what its found results weighed, stored: a stream's buffer counts it

    def key(self, item: int) -> bytes:
        return self.keys[item * KEY_BYTES : (item + 1) * KEY_BYTES]


class _Lookup:
    """One cut chunk, looked up: its results as found, and where its misses are."""

    __slots__ = ("base", "found", "keys", "misses", "nbytes", "offset", "start")

    def __init__(
        self,
        offset: int,
        found: list[Any],
        keys: Sequence[bytes] | Mapping[int, bytes],  # at least the misses'
        base: int,
        nbytes: int,
    ) -> None:
        self.offset, self.found, self.keys, self.base = offset, found, keys, base
        self.misses = [i for i, result in enumerate(found) if result is MISSING]
        self.nbytes = nbytes  # of the found results, as stored
        self.start = 0  # where the next piece's part of the output begins


class KnownRuns:
    """An input of unknown length, cut adaptively: while every item is found, chunks grow
    (x4 up to the sizer's largest, and to what a chunk may weigh in found results: a
    stream's buffer bounds them too) so a cached stream is looked up in large batches; the
    misses still go out in chunks of the size the replies call for (`lookups` splits them)."""

    def __init__(self, sizer: AdaptiveChunks) -> None:
        self.sizer = sizer
        self.run = 0

    def next_size(self) -> int:
        return max(self.sizer.next_size(), self.run)

    def found(self, all_found: bool, item_bytes: float = 0.0) -> None:
        """A chunk looked up: whether all its items were found, and what each weighed."""
        if not all_found:
            self.run = 0
            return
        longest = self.sizer.max_size
        weights = self.sizer.weights
        if weights is not None and item_bytes > 0:
            longest = min(longest, max(1, int(weights.limit / item_bytes)))
        self.run = min(longest, max(self.sizer.start, self.run * 4))


class CallCache:
    """The store, as one call uses it; `close()` once the call is over."""

    def __init__(self, store: ResultStore, prefix: bytes, shape: Shape) -> None:
        self.store, self.prefix, self.shape = store, prefix, shape
        self.typed = shape.result is not None
        self.decoder: Any = decoder(shape.result if self.typed else Any, p.MSGPACK)
        self.hits = 0
        self.stored = 0
        self.error: str | None = None  # why the store stopped being used, if it did
        self._looked_up = False  # a lookup has worked: a failure now falls back
        self.all_found: _Lookup | None = None  # a list looked up whole (look_up_all)
        self._pending: deque[_Lookup] = deque()
        # (records, the bytes of the replies that carried them), or None: the call is over
        self._writes: queue.SimpleQueue[tuple[list[tuple[bytes, Any]], int] | None] = (
            queue.SimpleQueue()
        )
        self._queued = 0  # bytes of the replies whose results are queued for the store
        self._queued_records = 0
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None

    # -- reading: on the thread that reads the input -------------------------------------

    def lookups(
        self, cut: Iterator[Chunk], runs: KnownRuns | None = None, most: int | None = None
    ) -> Iterator[Chunk]:
        """Each chunk's misses (`most` at a time at most, or as many as `runs`' sizer says),
        in miss coordinates; an empty chunk where every item was found."""
        base = 0
        index = 0
        for chunk in cut:
            keys = self._keys(chunk)
            found, nbytes = self._found(keys)
            lookup = _Lookup(chunk.offset, found, keys, base, nbytes)
            self._pending.append(lookup)
            misses = [chunk.items[i] for i in lookup.misses]
            self.hits += len(found) - len(misses)
            if runs is not None:
                runs.found(not misses, nbytes / max(1, len(found)))
            step = most or (runs.sizer.next_size() if runs is not None else len(misses))
            for first in range(0, len(misses), max(1, step)) if misses else (0,):
                part = misses[first : first + step] if step < len(misses) else misses
                yield Chunk(index, base + first, part)
                index += 1
            base += len(misses)

    def look_up_all(self, items: Sequence[Any]) -> list[Any]:
        """A list's items looked up before the call is planned (a call that returns every
        result holds them anyway): its misses, which alone are then cut into chunks, sent and
        attached; none, and the call needs no worker at all (no pool is even started)."""
        found: list[Any] = []
        keys: dict[int, bytes] = {}  # the misses' only: a list of 10M keeps 10M results, not keys
        nbytes = 0
        for start in range(0, len(items), LOOKUP_WINDOW):
            window = Chunk(0, start, list(items[start : start + LOOKUP_WINDOW]))
            window_keys = self._keys(window)
            window_found, window_bytes = self._found(window_keys)
            for i, result in enumerate(window_found):
                if result is MISSING:
                    keys[start + i] = window_keys[i]
            found += window_found
            nbytes += window_bytes
        lookup = _Lookup(0, found, keys, 0, nbytes)
        self.hits += len(found) - len(lookup.misses)
        self._pending.append(lookup)
        self.all_found = lookup
        return [items[i] for i in lookup.misses]

    def _keys(self, chunk: Chunk) -> list[bytes]:
        try:
            return item_keys(self.prefix, chunk.items)
        except SerializationError as exc:  # which item: only then is each tried alone
            for i, item in enumerate(chunk.items):
                try:
                    item_keys(self.prefix, [item])
                except SerializationError:
                    index = chunk.offset + i
                    name = self.shape.function or "the function"
                    raise SerializationError(
                        f"item {index} of {name}: {exc}", index=index
                    ) from None
            raise

    def _found(self, keys: list[bytes]) -> tuple[list[Any], int]:
        """The results stored under `keys` (MISSING where none), and their bytes."""
        if self.error is None:
            try:
                payloads = self.store.get_many(keys)
            except StoreError as exc:
                if not self._looked_up:  # nothing sent yet: say so rather than run uncached
                    raise
                self._failed(exc)
            else:
                self._looked_up = True
                found = [MISSING if raw is None else self._decoded(raw) for raw in payloads]
                return found, sum(len(raw) for raw in payloads if raw is not None)
        return [MISSING] * len(keys), 0

    def _decoded(self, raw: bytes) -> Any:
        try:
            return self.decoder.decode(raw)
        except (msgspec.DecodeError, ValueError):  # not what this function returns: recompute
            return MISSING

    def attach(self, pieces: Iterator[Chunk]) -> Iterator[Piece]:
        """Each piece with its part of the output (see the module's docstring)."""
        while True:
            try:
                piece = next(pieces)
            except StopIteration:
                return
            except SerializationError as exc:
                raise self._in_input(exc) from None
            lookup = self._pending[0]
            first = piece.offset - lookup.base
            stop = first + len(piece.items)
            misses = lookup.misses
            last = stop == len(misses)
            end = len(lookup.found) if last else misses[stop - 1] + 1
            mine = misses[first:stop]
            share = lookup.nbytes * (end - lookup.start) // max(1, len(lookup.found))
            # its part of the output holds found results unless it is its misses alone
            alone = end - lookup.start == len(mine)
            positions: Sequence[int]
            if not mine or mine[-1] - mine[0] == len(mine) - 1:  # contiguous: a range
                start = lookup.offset + (mine[0] if mine else 0)
                positions = range(start, start + len(mine))
            else:
                positions = [lookup.offset + i for i in mine]
            yield Piece(
                piece.index,
                piece.offset,
                piece.items,
                piece.nbytes,
                span=None if alone else lookup.found[lookup.start : end],
                positions=positions,
                keys=b"".join(lookup.keys[i] for i in mine),
                found_bytes=share,
            )
            lookup.start = end
            if last:
                self._pending.popleft()

    # -- answers: on the dispatcher's loop ------------------------------------------------

    def merge(self, chunk: Chunk, results: list[Any], nbytes: int = 0) -> list[Any]:
        """A piece's part of the output: its found results with `results` (its items') in
        their places, each failed item's RemoteError renumbered to its place in the input;
        the successes queued for the store. A function that did not return one result per
        item (a filter) is refused: nothing is stored."""
        assert isinstance(chunk, Piece)
        if len(results) != len(chunk.items):  # pairing them would store wrong results
            raise ConfigurationError(
                f"cache= needs one result per item: {self.shape.function or 'the function'} "
                f"returned {len(results)} results for {len(chunk.items)} items. A function "
                "that filters or expands its input cannot be cached item by item: cache "
                "a step that maps each item to one result, or drop cache= (in a "
                "Pipeline(cache=...), set cache= on the steps that map instead)"
            )
        span = chunk.span
        places: Sequence[int]
        # where each of its items' results goes: in order, or in the span's MISSING places
        if span is None:  # nothing found around its items
            out, places = list(results), range(len(results))
        else:
            out = list(span)
            places = [i for i, found in enumerate(span) if found is MISSING]
        saved: list[tuple[bytes, Any]] = []
        for item, (place, result) in enumerate(zip(places, results, strict=True)):
            if isinstance(result, RemoteError):
                out[place] = self.placed(chunk, result)
            else:
                out[place] = result
                saved.append((chunk.key(item), result))
        if saved and self.error is None:
            self._write(saved, nbytes)
        return out

    async def room(self, limit: int | None) -> None:
        """Wait while the results queued for the store weigh more than WRITE_BACKLOG (or a
        stream's smaller buffer): a store slower than the workers slows the call down to its
        pace instead of holding their results without bound."""
        bound = WRITE_BACKLOG if limit is None else min(limit, WRITE_BACKLOG)
        while (
            self._queued > bound or self._queued_records > WRITE_BACKLOG_RECORDS
        ) and self.error is None:
            await asyncio.sleep(BACKLOG_POLL)

    def placed(
        self, chunk: Chunk, error: RemoteError | SerializationError
    ) -> RemoteError | SerializationError:
        """`error` (its index counted in miss coordinates) with its item's index in the input:
        a RemoteError, or a SerializationError that names an item or its result."""
        assert isinstance(chunk, Piece)
        at = None if error.index is None else error.index - chunk.offset
        if at is None or not 0 <= at < len(chunk.positions):
            return error
        if isinstance(error, SerializationError):
            return error.renumbered(chunk.positions[at])
        placed = RemoteError(
            error.function,
            error.type_name,
            error.message,
            error.traceback,
            index=chunk.positions[at],
            item=error.item,
            worker=error.worker,
            status=error.status,
        )
        return placed

    def _in_input(self, error: SerializationError) -> SerializationError:
        """An error the chunk pipeline raised about a miss (numbered among the misses, while
        cut), naming the item by its place in the input."""
        for lookup in self._pending:
            at = -1 if error.index is None else error.index - lookup.base
            if 0 <= at < len(lookup.misses):
                return error.renumbered(lookup.offset + lookup.misses[at])
        return error

    # -- writing: on the call's writer thread ---------------------------------------------

    def _write(self, records: list[tuple[bytes, Any]], nbytes: int) -> None:
        if self._writer is None:
            writer = threading.Thread(target=self._drain, name="serverless-cache", daemon=True)
            self._writer = writer
            writer.start()
        with self._lock:
            self._queued += nbytes
            self._queued_records += len(records)
        self._writes.put((records, nbytes))

    def _drain(self) -> None:
        """Store each answer's results, one transaction each (several, if they queued up
        while the last was written: all or none of each answer still holds)."""
        while True:
            batch = self._writes.get()
            done = batch is None
            records, nbytes = ([], 0) if batch is None else batch
            while not done and len(records) < WRITE_BATCH:  # what else waits, in the same one
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                else:
                    records += more[0]
                    nbytes += more[1]
            if records and self.error is None:
                self._put(records)
            with self._lock:
                self._queued -= nbytes
                self._queued_records -= len(records)
            if done:
                return

    def _put(self, records: list[tuple[bytes, Any]]) -> None:
        encode = p.encode
        try:
            if self.typed:
                payloads = [(key, encode(result)) for key, result in records]
            else:
                payloads = [(key, encode(to_wire(result))) for key, result in records]
            self.store.put_many(payloads)
        except Exception as exc:  # a StoreError, or anything else: never fail the call
            self._failed(exc)
        else:
            self.stored += len(records)

    def _failed(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "the result store %s failed (%s): this call goes on without it, and results "
                "from now on are not stored",
                self.store.location,
                self.error,
            )

    def close(self) -> None:
        """Wait until every result queued is stored (or the store has failed)."""
        writer = self._writer
        if writer is None:
            return
        self._writes.put(None)
        writer.join(CLOSE_WITHIN)
        if writer.is_alive():  # pragma: no cover - a store that hangs past its own timeouts
            self._failed(TimeoutError(f"results not stored within {CLOSE_WITHIN:g}s"))
