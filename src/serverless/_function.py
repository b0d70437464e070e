"""The steps, @parallel and @sequential, and the one path every parallel call takes.

A call is prepared once, in the caller's thread (binding, items, options, target), into an
`Invocation`; one async generator of ordered result batches runs it on the dispatcher's loop
and records its statistics when it ends. `__call__`, `with_stats`, `submit`, `aio`, `stream`
and `astream` are thin shells over that generator. A method bound to an instance or a class
is the same step carrying its binding, so every calling form keeps it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

from . import _registry
from . import _wire as p
from ._caller.cache import CallCache
from ._caller.cachekey import call_prefix, code_digest
from ._caller.chunking import AdaptiveChunks, Chunk, ChunkBytes
from ._caller.dispatch import dispatcher
from ._caller.fanout import Tally, close_batches, next_batch
from ._caller.metrics import meter
from ._caller.plan import CallPlan, make_plan
from ._caller.progress import reporter
from ._caller.sharing import run_shared
from ._caller.store import shared_store
from ._caller.tracing import call_spans
from ._caller.transport import Target
from ._caller.watch import Watch
from ._config import DEFAULT_BUFFER, DEFAULT_PATIENCE, ErrorMode, OptionChanges, Options
from ._exceptions import ConfigurationError, SerializationError
from ._pool import byvalue as _byvalue
from ._registry import BIND_CLASS, BIND_INSTANCE, BIND_NONE, BIND_STATE, Bind
from ._stats import StepKind, StepStats, TargetKind
from ._targets import resolve
from ._wire.values import Shape, check_items, wire_args, wire_items

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from 3.11 on

logger = logging.getLogger("serverless")
dispatch_log = logging.getLogger("serverless.dispatch")  # the calls' events (watch.py)
P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")
S = TypeVar("S", bound="_Step[Any, Any]")

# how the function was declared: plain (a function, or a method bound when looked up),
# @staticmethod or @classmethod under the decorator
Declared = Literal["plain", "static", "class"]

_NOT_ITEMS = (str, bytes, bytearray, dict)


class _LastStats:
    """The statistics of a step's last run, shared by the step and its bound copies."""

    stats: StepStats | None = None


class _Step(Generic[P, R]):
    """What @parallel and @sequential share: the wrapped function, its binding, its last
    statistics."""

    kind: StepKind
    __name__: str

    def __init__(self, func: Callable[P, R]) -> None:
        self._func, self._declared = _unwrap(func)
        functools.update_wrapper(self, self._func)
        self._bind: Bind = BIND_NONE
        self._receiver: Any = None
        self._last = _LastStats()
        self._owner: type | None = None  # the class whose body defined the step

    def __set_name__(self, owner: type, name: str) -> None:
        self._owner = owner

    def __reduce__(self) -> tuple[Any, ...]:
        """How a step travels inside a function sent by value (a global it calls, an attribute
        of its class): one of `__main__` with its code, any other by its module's name (the
        worker imports it); its binding, bound arguments and options with it."""
        state = {
            "_bind": self._bind,
            "_receiver": self._receiver,
            **{k: v for k, v in vars(self).items() if k in _SENT_STATE},
        }
        options = state.get("options")
        if isinstance(options, Options) and options.cache is not None:
            # a worker never stores results: its copy needs no store (an open one won't pickle)
            state["options"] = options.changed({"cache": None})
        if _byvalue.is_main_name(self._func):
            return (_revive, (type(self), self._sent(), state))
        return (_revive_named, (type(self), self._func.__module__, self._key(), state))

    def _key(self) -> str:
        return self._func.__qualname__

    def _sent(self) -> _byvalue.Sent:
        """What the function of `__main__` travels as (_pool/byvalue.py)."""
        return (None, self._func, self._declared, self._owner_class())

    def _owner_class(self) -> type | None:
        """The class the method was defined in (None: a function)."""
        if self._owner is not None or "." not in self._func.__qualname__:
            return self._owner
        path = self._func.__qualname__.rsplit(".", 1)[0]
        if self._bind == BIND_CLASS and isinstance(self._receiver, type):
            mro = self._receiver.__mro__
        elif self._bind == BIND_INSTANCE:
            mro = type(self._receiver).__mro__
        else:
            mro = ()
        for cls in mro:
            if cls.__qualname__ == path:
                return cls
        target: Any = _registry.module_object("__main__")
        for part in path.split("."):
            target = vars(target).get(part) if hasattr(target, "__dict__") else None
        return target if isinstance(target, type) else None

    # The seed's main.py reads these from the step after pipeline.run(); they describe the
    # last run in any thread. PipelineRun.steps holds per-run statistics.
    @property
    def stats(self) -> StepStats | None:
        return self._last.stats

    @property
    def duration(self) -> float:
        return self.stats.duration if self.stats else 0.0

    @property
    def workers(self) -> int:
        return self.stats.workers if self.stats else 0

    @property
    def count(self) -> int:
        return self.stats.count if self.stats else 0

    def _get(self: S, instance: object, owner: type | None) -> S:
        """The step as `instance.name` or `owner.name` yields it (the subclasses' __get__)."""
        if self._declared == "static":
            return self
        if self._declared == "class":
            return self._bound_to(BIND_CLASS, owner)
        if instance is None:
            return self
        if isinstance(instance, type) and owner is type(instance):  # classmethod(parallel(f))
            return self._bound_to(BIND_CLASS, instance)
        return self._bound_to(BIND_INSTANCE, instance)

    def _clone(self: S) -> S:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def _bound_to(self: S, bind: Bind, receiver: Any) -> S:
        clone = self._clone()
        clone._bind, clone._receiver = bind, receiver
        return clone

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.with_stats(*args, **kwargs)[0]

    def with_stats(self, *args: Any, **kwargs: Any) -> tuple[R, StepStats]:
        """Call the step and also return the statistics of this very call."""
        raise NotImplementedError

    def stage(self) -> StageInfo | None:
        """How this step can run inside a Pipeline's fused request (None: it cannot)."""
        return None

    def _split(self, args: tuple[Any, ...]) -> tuple[Bind, Any, tuple[Any, ...]]:
        """The binding, the receiver and the remaining arguments. An unbound plain method
        called with an explicit receiver, as in `Cls.method(obj, items)`, is bound to it."""
        if self._bind != BIND_NONE:
            return self._bind, self._receiver, args
        if self._declared == "plain" and len(args) >= 2 and "." in self._func.__qualname__:
            owner_path = self._func.__qualname__.rsplit(".", 1)[0]
            first = args[0]
            if isinstance(first, type) and first.__qualname__ == owner_path:
                return BIND_CLASS, first, args[1:]
            if any(c.__qualname__ == owner_path for c in type(first).__mro__):
                return BIND_INSTANCE, first, args[1:]
        return BIND_NONE, None, args


@dataclass(frozen=True)
class StageInfo:
    """A parallel step as a Pipeline sees it: where its chunks go, and whether it can run
    as a later stage of another step's requests (bound arguments only travel with the
    first stage's)."""

    step: ParallelFunction[Any, Any]
    url: str | None
    first_only: bool
    # paced (rate=): its chunks run item by item; cached (cache=): its results are stored per
    # item, which a later stage that filters or expands them would make unpairable
    alone: bool = False


class ParallelFunction(_Step[P, R]):
    """A function whose list argument is split into chunks run by workers in parallel."""

    kind: StepKind = "parallel"

    def __init__(
        self,
        func: Callable[P, R],
        options: Options,
        name: str | None = None,
        entry: _registry.Entry | None = None,  # received by value: registered nowhere
    ) -> None:
        super().__init__(func)
        self.options = options
        self._name = name
        if entry is not None:
            self.entry, self._declared = entry, cast(Declared, entry.declared)
        else:
            self.entry = _registry.register(self._func, name, self._declared)
        if name is not None:  # statistics and reports call the step by this name
            self.__name__ = name.rpartition(".")[2]
        self._bound_args: tuple[Any, ...] = ()
        self._bound_kwargs: dict[str, Any] = {}

    def _key(self) -> str:
        return self.entry.name

    def _sent(self) -> _byvalue.Sent:
        return (self._name, self._func, self._declared, self._owner_class())

    def with_options(self, **options: Unpack[OptionChanges]) -> ParallelFunction[P, R]:
        """The same registered function with other options, e.g. `f.with_options(workers=8)`;
        None clears what the decorator set: `deadline=None` (or url, chunk_size, rate...)
        unsets it, `workers=None` (or timeout, retries...) puts the default back."""
        clone = self._clone()
        clone.options = self.options.changed(options)
        clone._last = _LastStats()
        return clone

    def partial(self, *args: Any, **kwargs: Any) -> ParallelFunction[P, R]:
        """The same function with extra arguments bound, as functools.partial does after the
        items: `Pipeline(geolocate.partial(geocoder_url), cleanup, sort)`."""
        clone = self.with_options()
        clone._bound_args = (*self._bound_args, *args)
        clone._bound_kwargs = {**self._bound_kwargs, **kwargs}
        return clone

    def stage(self) -> StageInfo:
        bound = bool(self._bound_args or self._bound_kwargs)
        alone = self.options.rate is not None or self.options.cache is not None
        return StageInfo(self, self.options.url, bound, alone)

    # Typed as Python binds a method: looked up on an instance, it loses its first parameter.
    # mypy sees a @classmethod or @staticmethod under the decorator as a plain function, so
    # look a staticmethod up on the class, and a classmethod on an instance, to type them.
    @overload
    def __get__(self, instance: None, owner: type | None = None) -> ParallelFunction[P, R]: ...
    @overload
    def __get__(
        self: ParallelFunction[Concatenate[Any, Q], R], instance: object, owner: type | None = None
    ) -> ParallelFunction[Q, R]: ...
    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return self._get(instance, owner)

    # -- the calling forms: thin shells over Invocation.batches ----------------------------

    def with_stats(self, *args: Any, **kwargs: Any) -> tuple[R, StepStats]:
        call = self._prepare(args, kwargs, blocking=True)
        results = call.run()
        return cast(R, results), call.stats[0]

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[list[Any]]:
        """Start the call and return a concurrent.futures.Future of its result list."""
        call = self._prepare(args, kwargs, blocking=False)
        if call.target is None:  # nothing to send (an empty input, or every result stored)
            future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
            future.set_result(call.run())
            return future
        return dispatcher().submit(call.collect())

    async def aio(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The async form: `await fn.aio(items)` from any event loop."""
        call = self._prepare(args, kwargs, blocking=False)
        if call.target is None:
            return call.run()
        return await dispatcher().arun(call.collect())

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """The results one by one, in input order, as soon as each chunk in order is done.

        Memory stays bounded whatever the input's length: a generator is read as slots free,
        and at most a few times `workers` chunks are held. Closing the iterator (or leaving
        the loop early) cancels the chunks in flight.
        """
        return self._prepare(args, kwargs, blocking=True, whole=False).stream()

    def astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """`async for result in fn.astream(items)`: stream() for event loops."""
        return self._prepare(args, kwargs, blocking=False, whole=False).astream()

    def _prepare(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        blocking: bool,
        then: Sequence[ParallelFunction[Any, Any]] = (),
        whole: bool = True,
    ) -> Invocation:
        """The call, prepared once; `then`: further steps fused into the same requests;
        `whole`: its results are all collected (not a stream)."""
        bind, receiver, args = self._split(args)
        args, kwargs = _items_by_keyword(self.__name__, self._func, bind, args, kwargs)
        items = _items_argument(self.__name__, args)
        steps = [self, *then]
        # only the first stage's input and the last stage's results cross the wire
        shape = self.entry.shape(bind)
        last = then[-1].entry.shape(then[-1]._bind) if then else shape
        # untyped values as the wire carries them (values.py), or an error naming the one that
        # cannot travel: before any request, and before a pool starts
        raw_args = [*args[1:], *self._bound_args], {**self._bound_kwargs, **kwargs}
        call_args, call_kwargs = wire_args(shape, *raw_args)
        count: int | None = None
        convert = True
        if isinstance(items, Sequence):  # a list whose items all travel as they are is not
            count, convert = len(items), check_items(shape, items)  # walked again per chunk
        # each receiver checked and encoded once per call, before any request
        binds = [self._wire_binding(bind, receiver)]
        binds += [step._wire_binding(step._bind, step._receiver) for step in then]

        def locate(retries: int) -> tuple[Target, int | None]:
            # chosen here, in the caller's thread: it may be the app serving the request this
            # thread is handling
            target = self._target(steps, blocking, retries)
            return target, dispatcher().capacities.total(target.urls)

        # a cached call looks its items up first; a whole list's at once, before the call is
        # planned, so that only its misses are cut evenly (and none needs no worker at all)
        cache, sent, planned = None, items, count
        if self.options.cache is not None and count != 0:  # a cached step is never fused
            cache = _call_cache(steps, binds, raw_args, last)
            if whole and isinstance(items, Sequence):
                sent = cache.look_up_all(items)
                planned = len(sent)

        plan = make_plan(
            [
                (step.entry.name, b, state, step.options)
                for step, (b, state) in zip(steps, binds, strict=True)
            ],
            call_args,
            call_kwargs,
            last,
            planned,
            locate,
            _by_value(steps),
        )
        # each chunk's untyped items converted as it is cut (a generator's: checked then too),
        # before it is weighed
        wire = None
        if convert and shape.items is None:
            wire = functools.partial(_wire_chunk, shape)
        chunks, sizer, weights = plan.chunks(sent, wire, cache)
        watching = functools.partial(
            _watch, plan, self.options, steps, count, (count or 0) - (planned or 0)
        )
        if whole:
            return Invocation(steps, plan, chunks, count, sizer, weights, cache, watching())
        # a stream is watched from its first read (in the caller's thread or task: its span's
        # parent): one never read never runs, so would never end its span nor its progress
        return Invocation(steps, plan, chunks, count, sizer, weights, cache, watching=watching)

    def _wire_binding(self, bind: Bind, receiver: Any) -> tuple[Bind, dict[str, Any]]:
        """The binding the workers get, and the receiver's state: an instance travels as
        its attributes (BIND_STATE), rebuilt there without __init__ (_wire/receiver.py)."""
        if bind != BIND_INSTANCE:
            return bind, {}
        owner = self._func.__qualname__.rpartition(".")[0]
        kind = type(receiver)
        module = _registry.module_name(kind.__module__)
        if kind.__qualname__ != owner or module != self.entry.module:
            raise SerializationError(
                f"{self.entry.name} is called on a {kind.__qualname__}, a subclass of "
                f"{owner}: the workers rebuild its receiver as a {owner}, the class the "
                f"method is defined in, and would lose what {kind.__qualname__} changes. "
                f"Decorate a method of {kind.__qualname__} itself, or make this one a "
                "staticmethod that takes what it needs as arguments."
            )
        return BIND_STATE, p.encode_state(receiver, self.entry.name)

    def _target(
        self, steps: list[ParallelFunction[Any, Any]], blocking: bool, retries: int
    ) -> Target:
        """Where the chunks go, for a call of `steps` with that many retries."""
        entries = [step.entry for step in steps]
        return resolve(self.options.url, blocking=blocking, functions=entries, retries=retries)


class Invocation:
    """One prepared call of one or more fused parallel steps, and its statistics once done."""

    def __init__(
        self,
        steps: list[ParallelFunction[Any, Any]],
        plan: CallPlan,
        chunks: Iterator[Chunk],
        count: int | None,  # None: an iterator, read off the loop thread
        sizer: AdaptiveChunks | None = None,
        weights: ChunkBytes | None = None,
        cache: CallCache | None = None,
        watch: Watch | None = None,
        watching: Callable[[], Watch | None] | None = None,  # a stream's, made at its start
    ) -> None:
        self.steps, self.plan, self.chunks, self.count = steps, plan, chunks, count
        self.target, self.sizer, self.weights = plan.target, sizer, weights
        self.cache, self.watch, self.watching = cache, watch, watching
        self.started, self.wall = time.perf_counter(), time.time()
        self.stats: list[StepStats] = []  # one per step, once the call is done

    async def batches(self, bounded: bool = False) -> AsyncIterator[list[Any]]:
        """THE primitive: the results in input order, in batches, on the dispatcher's loop.
        `bounded`: a stream, which holds at most the plan's `buffer` of results; a call that
        collects every result holds them all anyway, so it never waits on its consumer."""
        tally = Tally()
        produced = 0
        if self.target is not None:
            fanout = dispatcher().fanout(
                self.plan,
                self.chunks,
                tally,
                lazy_input=self.count is None,
                sizer=self.sizer,
                weights=self.weights,
                hold=self.plan.buffer if bounded else None,
                cache=self.cache,
                count=self.count,
                watch=self.watch,
            )
            try:
                async with contextlib.aclosing(fanout):  # cancels what is in flight if closed
                    async for batch in fanout:
                        produced += len(batch)
                        yield batch
                        batch = []  # the consumer has it: not kept while the next one comes
            finally:
                if self.cache is not None:  # what came back is stored before the call ends
                    await asyncio.get_running_loop().run_in_executor(None, self.cache.close)
        else:
            produced = len(self.found)
            if self.watch is not None:  # nothing sent: the engine never saw the call
                self.watch.finished(None)
            if self.found:
                yield self.found
        self._finish(produced, tally)

    async def collect(self) -> list[Any]:
        results: list[Any] = []
        async for batch in self.batches():
            results += batch
        return results

    @property
    def found(self) -> list[Any]:
        """Every result, where the store had them all (a list looked up whole)."""
        cache = self.cache
        return cache.all_found.found if cache is not None and cache.all_found else []

    def run(self) -> list[Any]:
        """The whole call from a thread that blocks until it is done."""
        if self.target is None:  # nothing to send: no loop, no pool
            found = self.found
            if self.watch is not None:
                self.watch.finished(None)
            self._finish(len(found), Tally())
            return found
        engine, shared = dispatcher(), self.target.shared
        engine.check_blocking(self.plan.function)
        return run_shared(shared, lambda: engine.submit(self.collect()))

    def _watched(self) -> None:
        if self.watching is not None:
            self.watch, self.watching = self.watching(), None

    def stream(self) -> Iterator[Any]:
        engine = dispatcher()
        engine.check_blocking(self.plan.function)
        self._watched()
        shared = self.target.shared if self.target is not None else None
        batches = self.batches(bounded=True)
        try:
            while (
                batch := run_shared(shared, lambda: engine.submit(next_batch(batches)))
            ) is not None:
                yield from batch
                batch = None  # let it go before the next one comes: the buffer's bound holds
        finally:
            engine.run(close_batches(batches))

    async def astream(self) -> AsyncIterator[Any]:
        self._watched()
        engine = dispatcher()
        batches = self.batches(bounded=True)
        try:
            while (batch := await engine.arun(next_batch(batches))) is not None:
                for result in batch:
                    yield result
                batch = None  # as in stream()
        finally:
            await engine.arun(close_batches(batches))

    def _finish(self, produced: int, tally: Tally) -> None:
        """Each step's statistics. In a fused call the worker measured every stage's output
        count and compute time; the call's wall time is shared among the steps in proportion
        to their compute, so the steps' durations add up to the call's."""
        duration = time.perf_counter() - self.started
        fused = len(self.steps) > 1
        hits = self.cache.hits if self.cache is not None else 0
        counts = [self.count if self.count is not None else tally.count + hits]
        counts += tally.stage_counts if fused else [produced]
        computes = tally.stage_compute_s if fused else [tally.compute_s]
        if fused and not tally.done:
            counts, computes = [counts[0]] + [0] * len(self.steps), [0.0] * len(self.steps)
        total = sum(computes)
        kind: TargetKind = self.target.kind if self.target is not None else "none"
        chunks = tally.in_order()
        shared = self.target.shared if self.target is not None else None
        inline = shared.inline_runs if shared is not None else 0
        if shared is not None and tally.done > 1 and inline >= tally.done:
            # not silently serial: the app it calls back into had no thread to spare
            logger.warning(
                "%s ran all %d of its chunks in the calling thread, one after another: every "
                "request thread of this app process was taken. Give the server more "
                "threads (gunicorn --threads) or send the calls to separate workers "
                "(serverless.init(url=...) or SERVERLESS_URL)",
                self.plan.function,
                tally.done,
            )
        self.stats = []
        for n, step in enumerate(self.steps):
            share = computes[n] / total if total > 0 else 1.0 / len(self.steps)
            stats = StepStats(
                name=step.__name__,
                kind=step.kind,
                duration=duration * share,
                workers=min(tally.done, step.options.workers),
                count=counts[n],
                count_out=counts[n + 1],
                compute_s=computes[n],
                retries=tally.retries,
                busy=tally.busy,
                hedges=tally.hedges,
                target=kind,
                chunks=chunks,
                throttles=tally.throttles,
                rate=tally.rate,
                window=tally.window,
                buffered=tally.buffered,
                inline=inline,
                failed=tally.failed,
                cache_hits=hits,
                items_sent=tally.count,
                cache_error=self.cache.error if self.cache is not None else None,
                started=self.wall,
            )
            step._last.stats = stats
            self.stats.append(stats)
        _summarize(self.plan, self.stats[0], duration)


def _watch(
    plan: CallPlan,
    options: Options,
    steps: Sequence[ParallelFunction[Any, Any]],
    count: int | None,
    found: int,
) -> Watch | None:
    """The call's observers (None: nobody watches: no progress=, no DEBUG log, no tracer,
    no caller metrics). `found`: results the store held before the call was planned."""
    report = reporter(options.progress)
    log = dispatch_log.isEnabledFor(logging.DEBUG)
    spans = call_spans(plan.function, lambda: _span_attributes(plan, options, count))
    metered = meter()
    metrics = metered.call(plan.function) if metered is not None else None
    if report is None and not log and spans is None and metrics is None:
        return None
    call = plan.group[:12]
    name = "+".join(step.__name__ for step in steps)
    return Watch(
        plan.function,
        call,
        report=report,
        step=(name, 1, 1),
        total=count,
        cached=found,
        log=log,
        spans=spans,
        metrics=metrics,
    )


def _span_attributes(plan: CallPlan, options: Options, count: int | None) -> dict[str, Any]:
    """The call span's attributes: the step, its items, its target and its options, these
    in one string (each attribute costs the SDK a check and a lock: 11 of them took 20 us a
    call here, a fifth of what tracing added to a one-item call)."""
    attributes: dict[str, Any] = {
        "serverless.function": plan.function,
        "serverless.call": plan.group[:12],  # the id in the call's log lines
        "serverless.options": _options_text(options, plan.hedge),
    }
    if count is not None:
        attributes["serverless.items"] = count
    if plan.target is not None:
        attributes["serverless.target"] = plan.target.kind
    return attributes


def _options_text(options: Options, hedge: bool) -> str:
    """The options that shape a call's requests, as `name=value` pairs (those not set left out)."""
    shown = {
        "workers": options.workers,
        "chunk_size": options.chunk_size,
        "timeout": options.timeout,
        "retries": options.retries,
        "deadline": options.deadline,
        "errors": options.errors,
        "hedge": hedge,
        "rate": options.rate,
        "cache": options.cache is not None,
    }
    return " ".join(f"{k}={v}" for k, v in shown.items() if v is not None)


def _summarize(plan: CallPlan, stats: StepStats, duration: float) -> None:
    """One line per call: at INFO where something went wrong along the way (retries, busy
    refusals, hedges, throttles, failed items), else at DEBUG; never one per chunk at INFO."""
    eventful = stats.retries or stats.busy or stats.hedges or stats.throttles or stats.failed
    level = logging.INFO if eventful else logging.DEBUG
    if not dispatch_log.isEnabledFor(level):
        return
    function = plan.function
    dispatch_log.log(
        level,
        "%s: %d items in %.3fs on %d chunks: %d retries, %d busy refusals, %d hedges, "
        "%d throttles, %d failed",
        function,
        stats.count,
        duration,
        stats.workers,
        stats.retries,
        stats.busy,
        stats.hedges,
        stats.throttles,
        len(stats.failed),
        extra={
            "call": plan.group[:12],
            "function": function,
            "items": stats.count,
            "seconds": duration,
            "retries": stats.retries,
            "busy": stats.busy,
            "hedges": stats.hedges,
            "throttles": stats.throttles,
            "failed": len(stats.failed),
        },
    )


def run_fused(
    steps: Sequence[ParallelFunction[Any, Any]], data: Iterable[Any]
) -> tuple[list[Any], list[StepStats]]:
    """Run consecutive parallel steps in one request per chunk (a Pipeline's fused group)."""
    first, *rest = steps
    call = first._prepare((data,), {}, blocking=True, then=rest)
    return call.run(), call.stats


class SequentialFunction(_Step[P, R]):
    """A step that runs in the caller, timed like a parallel one."""

    kind: StepKind = "sequential"

    # Typed as Python binds a method: looked up on an instance, it loses its first parameter.
    # mypy sees a @classmethod or @staticmethod under the decorator as a plain function, so
    # look a staticmethod up on the class, and a classmethod on an instance, to type them.
    @overload
    def __get__(self, instance: None, owner: type | None = None) -> SequentialFunction[P, R]: ...
    @overload
    def __get__(
        self: SequentialFunction[Concatenate[Any, Q], R],
        instance: object,
        owner: type | None = None,
    ) -> SequentialFunction[Q, R]: ...
    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return self._get(instance, owner)

    def with_stats(self, *args: Any, **kwargs: Any) -> tuple[R, StepStats]:
        args, kwargs = _items_by_keyword(self.__name__, self._func, self._bind, args, kwargs)
        items = _items_argument(self.__name__, args)
        fn: Callable[..., R] = self._func
        if self._bind != BIND_NONE:
            owner = self._receiver if self._bind == BIND_CLASS else type(self._receiver)
            fn = fn.__get__(self._receiver, owner)
        started, wall = time.perf_counter(), time.time()
        result = fn(*args, **kwargs)
        duration = time.perf_counter() - started
        stats = StepStats(
            name=self.__name__,
            kind=self.kind,
            duration=duration,
            workers=1,
            count=len(items) if isinstance(items, Sequence) else 0,
            count_out=len(result) if isinstance(result, Sequence) else 0,
            compute_s=duration,
            target="caller",
            started=wall,
        )
        self._last.stats = stats
        return result, stats


def _call_cache(
    steps: Sequence[ParallelFunction[Any, Any]],
    binds: Sequence[tuple[Bind, dict[str, Any]]],
    arguments: tuple[list[Any], dict[str, Any]],
    results: Shape,
) -> CallCache:
    """The call's use of its result store: keys made of every stage's name, code and
    version, the call's arguments and receivers, and the type its results decode into."""
    spec = steps[0].options.cache
    store = spec if not isinstance(spec, str | os.PathLike) else shared_store(os.fspath(spec))
    stages = [
        (step.entry.name, code_digest(step._func), str(step.options.version or ""))
        for step in steps
    ]
    stages.append(("results", b"", repr(results.result)))
    prefix = call_prefix(stages, [*arguments, [state for _, state in binds]], {})
    return CallCache(store, prefix, results)


def _by_value(steps: Sequence[ParallelFunction[Any, Any]]) -> Callable[[Target], str] | None:
    """For a call of functions of `__main__`: how they go to a target that takes code by value
    (the local pool): pickled now (a redefined cell, a changed global: the next call sends
    the new one) into its private directory; the digest every request carries, signed."""
    sent = [(step.entry.name, step._sent) for step in steps if _byvalue.is_main(step.entry)]
    if not sent:
        return None

    def stow(target: Target) -> str:
        if target.shelf is None:  # an in-process endpoint (tests): it has them registered
            return ""
        return target.shelf.put(_byvalue.dumps([(name, of()) for name, of in sent]))

    return stow


# what a step sent by value keeps of its state besides its binding (see _Step.__reduce__)
_SENT_STATE = frozenset({"options", "_bound_args", "_bound_kwargs", "__name__"})


def _revive(cls: type[_Step[Any, Any]], sent: _byvalue.Sent, state: dict[str, Any]) -> Any:
    """A step of `__main__` received by value, registered nowhere (see _Step.__reduce__)."""
    name, func, declared, owner = sent
    wrapped = _declared_as(func, declared)
    if issubclass(cls, ParallelFunction):
        entry = _registry.detached(func, name, declared, owner)
        step: _Step[Any, Any] = cls(wrapped, state.get("options", Options()), name, entry)
    else:
        step = cls(wrapped)
    step._owner = owner
    vars(step).update(state)
    return step


def _declared_as(func: Callable[..., Any], declared: str) -> Any:
    if declared == "static":
        return staticmethod(func)
    if declared == "class":
        return classmethod(func)
    return func


def _revive_named(cls: type[_Step[Any, Any]], module: str, key: str, state: dict[str, Any]) -> Any:
    """A step of a module, found in the worker's import of it (see _Step.__reduce__)."""
    importlib.import_module(module)
    if issubclass(cls, ParallelFunction):
        entry = _registry.lookup(key)
        if entry is None:
            raise ConfigurationError(f"{key} is not registered where it was unpickled")
        wrapped = _declared_as(entry.func, entry.declared)
        step: _Step[Any, Any] = cls(wrapped, state.get("options", Options()), None, entry)
    else:
        target: Any = _registry.module_object(module)
        for part in key.split("."):
            target = vars(target)[part]
        if not isinstance(target, _Step):
            raise ConfigurationError(f"{module}.{key} is not a step where it was unpickled")
        step = target._clone()
    vars(step).update(state)
    return step


def _unwrap(func: Any) -> tuple[Callable[..., Any], Declared]:
    if isinstance(func, staticmethod):
        return func.__func__, "static"
    if isinstance(func, classmethod):
        return func.__func__, "class"
    if isinstance(func, _Step):
        raise ConfigurationError(f"{func.__name__} is already decorated")
    if not callable(func):
        raise TypeError(f"@serverless.parallel/sequential decorate functions, not {func!r}")
    return func, "plain"


def _wire_chunk(shape: Shape, chunk: Chunk) -> Chunk:
    items = wire_items(shape, chunk.items, chunk.offset)
    return chunk if items is chunk.items else Chunk(chunk.index, chunk.offset, items, chunk.nbytes)


ITEMS = "items"  # the keyword that passes a step's items whatever its parameter's name


def _items_by_keyword(
    name: str, func: Callable[..., Any], bind: Bind, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The items passed by keyword (`f(items=[...])`, or by the parameter's own name, as in
    `f(zipcodes=[...])`) moved to the front of the positional arguments, as the chunks take
    them; anything else as it was. `bind`: the function's receiver is bound, not in `args`."""
    if args and not kwargs:  # the usual call: nothing to look up
        return args, kwargs
    param = _items_parameter(func, bind != BIND_NONE)
    keys = [key for key in (param, ITEMS) if key is not None and key in kwargs]
    if ITEMS in keys and param != ITEMS and _takes_keyword(func, ITEMS):
        keys.remove(ITEMS)  # the function's own parameter named `items`: not an alias
    if not keys and not args:
        ways = "as first argument, as items=" + (f" or as {param}=" if param else "")
        got = f"; got only {', '.join(f'{key}=' for key in kwargs)}" if kwargs else ""
        raise TypeError(f"{name}() needs the list of items to process, {ways}{got}")
    if not keys:
        return args, kwargs
    if len(keys) > 1 or args:
        given = " and ".join(f"{key}=" for key in keys)
        first = f"as first argument and as {given}" if args else f"as {given}"
        method = (
            " (a method called on its class with the instance passed explicitly takes its "
            "items positionally: Cls.method(obj, items))"
            if args and bind == BIND_NONE and "." in func.__qualname__
            else ""
        )
        raise TypeError(f"{name}() got its items twice, {first}: pass them once{method}")
    rest = dict(kwargs)
    return (rest.pop(keys[0]),), rest


@functools.lru_cache(maxsize=1024)
def _items_parameter(func: Callable[..., Any], bound: bool) -> str | None:
    """The name of the parameter that takes a step's items (after a `bound` receiver), if it
    can be passed by keyword."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin): only items= then
        return None
    params = params[1:] if bound else params
    if not params or params[0].kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
        return None
    return params[0].name


def _takes_keyword(func: Callable[..., Any], keyword: str) -> bool:
    try:
        param = inspect.signature(func).parameters.get(keyword)
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind is not inspect.Parameter.POSITIONAL_ONLY


def _items_argument(name: str, args: tuple[Any, ...]) -> Iterable[Any]:
    if not args:
        raise TypeError(f"{name}() needs the list of items to process as first argument")
    items = args[0]
    if isinstance(items, _NOT_ITEMS) or not isinstance(items, Iterable):
        raise TypeError(
            f"the first argument of {name}() must be a list or iterable of items, "
            f"not {type(items).__name__}"
        )
    return items


# -- decorators ------------------------------------------------------------------------------


class _ParallelDecorator(Protocol):
    """@serverless.parallel(...) with options: a decorator typed like the bare form."""

    @overload
    def __call__(self, func: Callable[P, Coroutine[Any, Any, R]], /) -> ParallelFunction[P, R]: ...
    @overload
    def __call__(self, func: Callable[P, R], /) -> ParallelFunction[P, R]: ...


# An async function's step returns what the coroutine returns: the call awaits it on a worker.
@overload
def parallel(func: Callable[P, Coroutine[Any, Any, R]], /) -> ParallelFunction[P, R]: ...
@overload
def parallel(func: Callable[P, R], /) -> ParallelFunction[P, R]: ...
@overload
def parallel(
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    url: str | None = None,
    deadline: float | None = None,
    idempotent: bool | None = None,
    hedge: bool | None = None,
    errors: ErrorMode | None = None,
    rate: float | str | None = None,
    patience: float | None = DEFAULT_PATIENCE,
    buffer: int | None = DEFAULT_BUFFER,
    cache: Any = None,
    version: str | int | None = None,
    max_failures: int | float | None = None,
    name: str | None = None,
) -> _ParallelDecorator: ...
def parallel(
    func: Callable[P, R] | None = None,
    /,
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    url: str | None = None,
    deadline: float | None = None,
    idempotent: bool | None = None,
    hedge: bool | None = None,
    errors: ErrorMode | None = None,
    rate: float | str | None = None,
    patience: float | None = DEFAULT_PATIENCE,
    buffer: int | None = DEFAULT_BUFFER,
    cache: Any = None,
    version: str | int | None = None,
    max_failures: int | float | None = None,
    name: str | None = None,
) -> Any:
    """Run the function on chunks of its first argument, in parallel, on HTTP workers.

    Use bare (`@serverless.parallel`) or with options (see `serverless.Options`). `name`
    registers the function under that name in its module instead of its own (a lambda's is
    `<lambda>`); workers find it by that name, as their import of the module runs this too.
    `patience=None` waits for a refusing downstream for as long as it takes, `buffer=None`
    bounds no stream, as with_options(patience=None, buffer=None) do.
    """
    options = (
        Options()
        .merged(
            workers=workers,
            chunk_size=chunk_size,
            timeout=timeout,
            retries=retries,
            url=url,
            deadline=deadline,
            idempotent=idempotent,
            hedge=hedge,
            errors=errors,
            rate=rate,
            cache=cache,
            version=version,
            max_failures=max_failures,
        )
        .changed({"patience": patience, "buffer": buffer})
    )
    if func is not None:
        return ParallelFunction(func, options, name)
    return lambda f: ParallelFunction(f, options, name)


def sequential(func: Callable[P, R]) -> SequentialFunction[P, R]:
    """Run the function in the caller, recording the same statistics as a parallel step."""
    return SequentialFunction(func)
