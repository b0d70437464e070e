"""One call's plan: every decision about a call, made once, in the caller's thread.

`make_plan` turns the options of the call's steps (one, or several fused into the same
requests), its binding, its arguments, the last step's declared result types and the target
into a frozen `CallPlan`: how the input is cut into chunks, how long an attempt may take,
how often it may be retried, the deadline, hedging, whether the worker runs the items one by
one (isolated errors, pacing) or the function gets the whole chunk, the rate, and what every
request carries. The engine (dispatch.py, fanout.py) executes the plan and never decides
these again; the only thing that changes during a call is the pacer's rate (rate.py), and the
plan says what a given rate means for a request (`pace`, `part`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _wire as p
from .._config import Options, Rate
from .._registry import BIND_NONE, Bind
from .._wire.values import UNTYPED, Shape
from .cache import CallCache, KnownRuns
from .chunking import (
    AdaptiveChunks,
    Chunk,
    ChunkBytes,
    chunk_adaptive,
    chunk_iterable,
    chunk_sequence,
    within_bytes,
)
from .rate import Pacer
from .transport import Target

# Seconds a chunk may wait for a worker's thread before the worker refuses it as busy (503,
# Retry-After: nothing ran) instead of queueing it without bound: the Call's start_by.
START_WITHIN = 1.0
PACED_CHUNK_S = 0.05  # seconds of its rate= one chunk of a paced list holds
# A chunk carries at most 1/BODY_SHARE of the body limit each way (its items; its results, as
# far as the replies so far tell): room for results that weigh more than their items. And at
# most 1/BUFFER_SHARE of a stream's buffer, so that the buffer keeps many chunks in flight,
# not a few: 1,000,000 items of 4 KiB behind a 3 s straggler streamed in 24 s with chunks of
# 2 MiB, in 33 s with chunks of 8 MiB (bench/streams.py, the default 64 MiB buffer).
BODY_SHARE = 4
BUFFER_SHARE = 32
MIN_ANSWERED = 100  # items a stream answers before a max_failures= fraction applies


@dataclass(frozen=True)
class CallPlan:
    """What every request of one call carries, and how the engine runs the call."""

    function: str  # the registered name; fused stages joined by p.STAGE_SEPARATOR
    bind: Bind = BIND_NONE
    state: dict[str, Any] = field(default_factory=dict)  # the receiver's, encoded once
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    then: list[p.Stage] = field(default_factory=list)  # fused stages after the first
    results: Shape = UNTYPED  # how the (last) function's results decode
    target: Target | None = None  # where the chunks go (None: nowhere, an empty input)
    workers: int = 100  # chunks in flight at most
    parts: int = 100  # a list is cut into at most this many even chunks...
    chunk_size: int | None = None  # ...or into chunks of this size; an iterator: adaptive
    timeout: float = 300.0  # seconds one attempt may take
    retries: int = 3
    deadline: float | None = None
    hedge: bool = False
    isolate: bool = False  # errors="return": each item's error in its place
    rate: Rate | None = None  # items per second across the call, or "auto"
    patience: float | None = None  # seconds of refusals with no item completing, at most
    buffer: int | None = None  # bytes of results a stream may hold (None: no bound)
    group: str = field(default_factory=p.new_request_id)  # the call's id on its paced chunks
    # the SHA-256 of the pickle of the call's functions of `__main__`, in the local pool's
    # private directory (_pool/byvalue.py); "": every function is found by its name
    code: str = ""
    max_failures: int | float | None = None  # errors="return": failures the call may have

    def too_many_failures(self, failed: int, answered: int, count: int | None) -> bool:
        """Whether `failed` items (of `answered`, of `count` in all; None: a stream) are more
        than max_failures allows: a count, or a fraction of the input (of a stream: of the
        items answered so far, once there are MIN_ANSWERED, so a first failure is no 100%)."""
        budget = self.max_failures
        if budget is None or not self.isolate:
            return False
        if isinstance(budget, int):
            return failed > budget
        if count is not None:
            return failed > budget * count
        return answered >= MIN_ANSWERED and failed > budget * answered

    @property
    def fused(self) -> bool:
        return bool(self.then)

    @property
    def at_most_once(self) -> bool:
        """retries=0: nothing is sent again once it may have reached a worker."""
        return self.retries == 0

    def pacer(self) -> Pacer:
        """The call's pacer. retries=0 runs item by item (a fused call: one item per request)
        from the first request, not only once throttled: a whole chunk that the function
        leaves with Throttled loses the results of the items before the refused one, which
        could only be had again by running them again (5 of 40 items ran twice)."""
        return Pacer(self.rate, itemwise=self.at_most_once)

    # -- what a rate means for one request ---------------------------------------------------

    def pace(self, pacer: Pacer) -> float | None:
        """The Call's `pace`: None, the function gets the whole chunk; a number, the worker
        calls it item by item, at most one start per that many seconds. A fused call's
        stages run on whole chunks, so its requests are never paced: they are cut (`part`)."""
        return None if self.fused else pacer.pace()

    def part(self, pacer: Pacer, items: int) -> int:
        """How many of a chunk's remaining `items` the next request carries. A paced call's
        requests carry what the rate starts in a short while (rate.PART_S); a fused call,
        whose worker cannot pace or stop between items, sends one item per request once it
        is paced or has been throttled: the token clock then spaces them, and a throttle
        costs no rerun of an item that got through (whole chunks of a fused step took 28 s
        for 100 items against a 300/s quota, with 211 downstream calls)."""
        if self.fused:
            return 1 if pacer.itemwise else items
        return pacer.part(items)

    # -- the requests ------------------------------------------------------------------------

    def envelope(
        self,
        chunk: Chunk,
        timeout: float,
        now: float,
        pace: float | None,
        slot: float | None = None,
        trace: str = "",
        id_prefix: str = "",
    ) -> p.Call:
        """One chunk's request envelope, with a request id of its own, for an attempt sent at
        `now` that ends in `timeout` seconds: after that the worker must not start it. A
        paced one's items take their turns from `slot`, when the rate let the first start."""
        deadline = now + timeout
        # retries=0 too: a signed busy refusal proves nothing ran, so it is resent (fanout.py)
        start_by = min(now + START_WITHIN, deadline)
        return p.Call(
            v=p.VERSION,
            fn=self.function,
            id=p.new_request_id(id_prefix),
            index=chunk.index,
            items=chunk.items,
            args=self.args,
            kwargs=self.kwargs,
            bind=self.bind,
            state=self.state,
            then=self.then,
            isolate=self.isolate,
            deadline=deadline,
            start_by=start_by,
            pace=pace,
            group=self.group if pace is not None else "",
            slot=slot if pace else None,
            code=self.code,
            trace=trace,
        )

    def chunks(
        self,
        items: Iterable[Any],
        wire: Callable[[Chunk], Chunk] | None = None,
        cache: CallCache | None = None,
    ) -> tuple[Iterator[Chunk], AdaptiveChunks | None, ChunkBytes]:
        """The input cut as planned, read lazily unless it is a list, each chunk made what
        the wire carries by `wire` as it is cut (values.py: its untyped items converted, or a
        SerializationError), then re-cut where it weighs too much (chunking.py); for an
        input of unknown length with no chunk_size, the sizer the replies feed; and the
        weights of items and results, which the replies feed too. With a `cache`, each chunk
        is looked up as it is cut and only its misses go on (cache.py)."""
        max_body = self.target.max_body if self.target is not None else p.MAX_BODY
        limit = min(max_body, p.MAX_REPLY) // BODY_SHARE
        if self.buffer is not None:
            limit = min(limit, self.buffer // BUFFER_SHARE)
        # what every request carries besides its items (arguments, names): not theirs
        bare = len(p.encode(self.envelope(Chunk(0, 0, []), self.timeout, 0.0, None)))
        weights = ChunkBytes(max(1, limit - bare))
        sizer = runs = None
        if isinstance(items, Sequence):
            cut = chunk_sequence(items, self.parts, self.chunk_size)
        elif self.chunk_size is not None:
            cut = chunk_iterable(items, self.chunk_size)
        else:
            sizer = AdaptiveChunks(weights=weights)
            runs = KnownRuns(sizer) if cache is not None else None
            cut = chunk_adaptive(items, runs or sizer)
        if cache is not None and cache.all_found is None:  # else only the misses come here
            cut = cache.lookups(cut, runs)
        if wire is not None:
            cut = map(wire, cut)
        room = max(1, max_body - bare - 16)  # 16: the items' array header, with margin
        pieces: Iterator[Chunk] = within_bytes(cut, weights, _encoded_size, room, self.function)
        if cache is not None:
            pieces = cache.attach(pieces)
        return pieces, sizer, weights


def _encoded_size(value: Any) -> int:
    return len(p.encode(value))


def make_plan(
    steps: Sequence[tuple[str, Bind, dict[str, Any], Options]],
    args: list[Any],
    kwargs: dict[str, Any],
    results: Shape,
    count: int | None,
    locate: Callable[[int], tuple[Target, int | None]] | None = None,
    by_value: Callable[[Target], str] | None = None,
) -> CallPlan:
    """The plan of a call of `steps` (registered name, binding, receiver's encoded state,
    options; more than one: fused into the same requests, the first step's options cut the
    input) on `count` items (None: an iterator). `locate(retries)`: where a call with that
    many retries sends its chunks, and how many its workers said they run at once (None:
    unknown); not asked for an empty input, which goes nowhere. `by_value(target)`: the
    digest of the call's functions of `__main__`, stored where that target's workers read
    them (the local pool's)."""
    (_, bind, state, first), later = steps[0], steps[1:]
    every = [options for *_, options in steps]
    fused = bool(later)
    timeout = max(options.timeout for options in every)
    retries = min(options.retries for options in every)
    target, capacity = locate(retries) if locate is not None and count != 0 else (None, None)
    code = by_value(target) if by_value is not None and target is not None else ""
    # an item that failed in one stage has no input for the next; a fused call is never paced
    rate = None if fused else first.items_per_s
    parts = first.workers
    if count is not None and first.chunk_size is None:
        if capacity:
            # as many even chunks as the target can run at once, where its workers said it
            # (docs/deploy.md's 96 slots with workers=100: not a second round of 4)
            parts = min(parts, capacity)
        if isinstance(rate, float):
            # a paced chunk holds PACED_CHUNK_S of the rate: short enough that the last ones
            # end together, long enough that a request carries several items
            longest = max(1, int(rate * min(PACED_CHUNK_S, timeout / 4)))
            parts = max(parts, -(-count // longest))
    return CallPlan(
        function=p.STAGE_SEPARATOR.join(step[0] for step in steps),
        bind=bind,
        state=state,
        args=args,
        kwargs=kwargs,
        then=[p.Stage(fn=name, bind=step_bind, state=s) for name, step_bind, s, _ in later],
        results=results,
        target=target,
        workers=first.workers,
        parts=parts,
        chunk_size=first.chunk_size,
        timeout=timeout,
        retries=retries,
        deadline=first.deadline,
        hedge=all(options.hedging for options in every),
        isolate=first.errors == "return" and not fused,
        rate=rate,
        patience=_strictest(options.patience for options in every),
        buffer=first.buffer,
        code=code,
        max_failures=first.max_failures,
    )


def _strictest(bounds: Iterable[float | None]) -> float | None:
    """The smallest of the bounds that are set (None: none is)."""
    return min((bound for bound in bounds if bound is not None), default=None)
