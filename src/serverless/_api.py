"""The public API: @parallel, @sequential, Pipeline and init."""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypeVar, overload

from . import _pool, _registry
from ._asgi import ASGIApp, ASGIEndpoint
from ._chunking import AdaptiveChunks, Chunk, chunk_adaptive, chunk_iterable, chunk_sequence
from ._config import Options, configure, secrets_from_env
from ._dispatch import CallSpec, ChunkStats, MapResult, Target, dispatcher
from ._exceptions import ConfigurationError, ProtocolError
from ._fanout import Tally, close_batches, next_batch
from ._origin import OriginPolicy
from ._protocol import MAX_BODY, STAGE_SEPARATOR, TOLERANCE, Keyring, Stage
from ._stats import PipelineRun, StepStats
from ._targets import resolve
from ._worker import Endpoint
from ._wsgi import WSGIApp, WSGIEndpoint

P = ParamSpec("P")
R = TypeVar("R")

_NOT_ITEMS = (str, bytes, bytearray, dict)


class _Step(Generic[P, R]):
    """What @parallel and @sequential share: the wrapped function and its last statistics."""

    kind = ""
    __name__: str

    def __init__(self, func: Callable[P, R]) -> None:
        self._func, self._binding = _unwrap(func)
        functools.update_wrapper(self, self._func)
        self.stats: StepStats | None = None

    # The seed's main.py reads these from the step after pipeline.run(); they describe the
    # last run in any thread. PipelineRun.steps holds per-run statistics.
    @property
    def duration(self) -> float:
        return self.stats.duration if self.stats else 0.0

    @property
    def workers(self) -> int:
        return self.stats.workers if self.stats else 0

    @property
    def count(self) -> int:
        return self.stats.count if self.stats else 0

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if self._binding == "static":
            return self
        if self._binding == "class":
            return _Bound(self, _registry.BIND_CLASS, owner)
        if instance is None:
            return self
        if isinstance(instance, type) and owner is type(instance):  # classmethod(parallel(f))
            return _Bound(self, _registry.BIND_CLASS, instance)
        return _Bound(self, _registry.BIND_INSTANCE, instance)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.with_stats(*args, **kwargs)[0]

    def with_stats(self, *args: Any, **kwargs: Any) -> tuple[R, StepStats]:
        """Call the step and also return the statistics of this very call."""
        _pool.check_not_importing_main()
        bind, receiver, args = self._split(args)
        return self._run(bind, receiver, args, kwargs)

    def _split(self, args: tuple[Any, ...]) -> tuple[str, Any, tuple[Any, ...]]:
        """Recognise an explicit receiver, as in `Cls.method(obj, items)`."""
        if self._binding == "auto" and len(args) >= 2 and "." in self._func.__qualname__:
            owner_path = self._func.__qualname__.rsplit(".", 1)[0]
            first = args[0]
            if isinstance(first, type) and first.__qualname__ == owner_path:
                return _registry.BIND_CLASS, first, args[1:]
            if any(c.__qualname__ == owner_path for c in type(first).__mro__):
                return _registry.BIND_INSTANCE, first, args[1:]
        return _registry.BIND_NONE, None, args

    def _run(
        self, bind: str, receiver: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[R, StepStats]:
        raise NotImplementedError

    def _record(self, stats: StepStats) -> None:
        self.stats = stats


class _Bound:
    """A step bound to an instance or class, as a method call makes it."""

    def __init__(self, step: _Step[Any, Any], bind: str, receiver: Any) -> None:
        self._step, self._bind, self._receiver = step, bind, receiver
        functools.update_wrapper(self, step._func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.with_stats(*args, **kwargs)[0]

    def with_stats(self, *args: Any, **kwargs: Any) -> tuple[Any, StepStats]:
        _pool.check_not_importing_main()
        return self._step._run(self._bind, self._receiver, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)


class ParallelFunction(_Step[P, R]):
    """A function whose list argument is split into chunks run by workers in parallel."""

    kind = "parallel"

    def __init__(self, func: Callable[P, R], options: Options) -> None:
        super().__init__(func)
        self.options = options
        self.entry = _registry.register(self._func)

    def with_options(self, **options: Any) -> ParallelFunction[P, R]:
        """The same registered function with other options, e.g. `f.with_options(workers=8)`."""
        clone = copy.copy(self)
        clone.options = self.options.merged(**options)
        clone.stats = None
        return clone

    def partial(self, *args: Any, **kwargs: Any) -> ParallelFunction[P, R]:
        """The same function with extra arguments bound, as functools.partial does after the
        items: `Pipeline(geolocate.partial(geocoder_url), cleanup, sort)`."""
        clone = self.with_options()
        clone._bound_args = (*self._bound_args, *args)
        clone._bound_kwargs = {**self._bound_kwargs, **kwargs}
        return clone

    _bound_args: tuple[Any, ...] = ()
    _bound_kwargs: dict[str, Any] = {}  # noqa: RUF012 - replaced, never mutated

    def _run(
        self, bind: str, receiver: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[R, StepStats]:
        call = self._prepare(bind, args, kwargs)
        if call.count == 0:
            return self._finish([], Tally(), call, "none")
        target = resolve(self.options.url, blocking=True)
        mapped = dispatcher().run(call.map(target))
        return self._finish(mapped.results, mapped.tally, call, target.kind)

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[list[Any]]:
        """Start the call and return a concurrent.futures.Future of its result list."""
        bind, _, args = self._split(args)
        call = self._prepare(bind, args, kwargs)
        target = resolve(self.options.url)  # here, in the caller's request context
        future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

        async def go() -> list[Any]:
            mapped = await call.map(target)
            self._finish(mapped.results, mapped.tally, call, target.kind)
            return mapped.results

        if call.count == 0:
            future.set_result([])
            return future
        return dispatcher().submit(go())

    async def aio(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The async form: `await fn.aio(items)` from any event loop."""
        bind, _, args = self._split(args)
        call = self._prepare(bind, args, kwargs)
        if call.count == 0:
            return []
        target = resolve(self.options.url)
        mapped = await dispatcher().arun(call.map(target))
        self._finish(mapped.results, mapped.tally, call, target.kind)
        return mapped.results

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """The results one by one, in input order, as soon as each chunk in order is done.

        Memory stays bounded whatever the input's length: a generator is read as slots free,
        and at most a few times `workers` chunks are held. Closing the iterator (or leaving
        the loop early) cancels the chunks in flight.
        """
        bind, _, args = self._split(args)
        call = self._prepare(bind, args, kwargs)
        target = resolve(self.options.url, blocking=True)
        return self._stream(call, target)

    def _stream(self, call: _Call, target: Target) -> Iterator[Any]:
        if call.count == 0:
            return
        tally = Tally()
        engine = dispatcher()
        batches = call.fanout(target, tally)
        produced = 0
        try:
            while (batch := engine.run(next_batch(batches))) is not None:
                produced += len(batch)
                yield from batch
        finally:
            engine.run(close_batches(batches))
        self._finish(produced, tally, call, target.kind)

    async def astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """`async for result in fn.astream(items)`: stream() for event loops."""
        bind, _, args = self._split(args)
        call = self._prepare(bind, args, kwargs)
        if call.count == 0:
            return
        target = resolve(self.options.url)
        tally = Tally()
        engine = dispatcher()
        batches = call.fanout(target, tally)
        produced = 0
        try:
            while (batch := await engine.arun(next_batch(batches))) is not None:
                produced += len(batch)
                for result in batch:
                    yield result
        finally:
            await engine.arun(close_batches(batches))
        self._finish(produced, tally, call, target.kind)

    def _prepare(self, bind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        _pool.check_not_importing_main()
        items = _items_argument(self.__name__, args)
        opts = self.options
        spec = CallSpec(
            function=self.entry.name,
            bind=bind,
            args=[*args[1:], *self._bound_args],
            kwargs={**self._bound_kwargs, **kwargs},
            workers=opts.workers,
            timeout=opts.timeout,
            retries=opts.retries,
            deadline=opts.deadline,
            hedge=opts.hedging,
            errors=opts.errors,
        )
        if isinstance(items, Sequence):
            chunks = chunk_sequence(items, opts.workers, opts.chunk_size)
            return _Call(spec, chunks, len(items), False)
        if opts.chunk_size is None:  # unknown length: sizes follow the measured compute
            policy = AdaptiveChunks()
            spec = dataclasses.replace(spec, on_reply=policy.observe)
            return _Call(spec, chunk_adaptive(items, policy), None, True)
        return _Call(spec, chunk_iterable(items, opts.chunk_size), None, True)

    def _finish(
        self, results: list[Any] | int, tally: Tally, call: _Call, kind: str
    ) -> tuple[R, StepStats]:
        stats = StepStats(
            name=self.__name__,
            kind=self.kind,
            duration=time.perf_counter() - call.started,
            workers=min(tally.done, self.options.workers),
            count=call.count if call.count is not None else tally.count,
            count_out=results if isinstance(results, int) else len(results),
            compute_s=tally.compute_s,
            retries=tally.retries,
            hedges=tally.hedges,
            target=kind,
            chunks=tally.in_order(),
        )
        self._record(stats)
        return results, stats  # type: ignore[return-value]


@dataclass
class _Call:
    """One call, prepared: what to send, its chunks, the item count if known."""

    spec: CallSpec
    chunks: Iterator[Chunk]
    count: int | None
    lazy: bool  # a generator or other iterator: read it off the loop thread
    started: float = field(default_factory=time.perf_counter)

    def map(self, target: Target) -> Coroutine[Any, Any, MapResult]:
        """The whole call, to run on the dispatcher's loop."""
        return dispatcher().map(self.spec, target, self.chunks, lazy_input=self.lazy)

    def fanout(self, target: Target, tally: Tally) -> AsyncIterator[list[Any]]:
        """The call's results in batches, in order, to iterate on the dispatcher's loop."""
        return dispatcher().fanout(self.spec, target, self.chunks, tally, lazy_input=self.lazy)


class SequentialFunction(_Step[P, R]):
    """A step that runs in the caller, timed like a parallel one."""

    kind = "sequential"

    def _run(
        self, bind: str, receiver: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[R, StepStats]:
        items = _items_argument(self.__name__, args)
        fn: Callable[..., Any] = self._func
        if bind:
            fn = fn.__get__(receiver, receiver if bind == _registry.BIND_CLASS else type(receiver))
        started = time.perf_counter()
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
        )
        self._record(stats)
        return result, stats


def _unwrap(func: Any) -> tuple[Callable[..., Any], str]:
    if isinstance(func, staticmethod):
        return func.__func__, "static"
    if isinstance(func, classmethod):
        return func.__func__, "class"
    if isinstance(func, _Step):
        raise ConfigurationError(f"{func.__name__} is already decorated")
    if not callable(func):
        raise TypeError(f"@serverless.parallel/sequential decorate functions, not {func!r}")
    return func, "auto"


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
    errors: str | None = None,
) -> Callable[[Callable[P, R]], ParallelFunction[P, R]]: ...
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
    errors: str | None = None,
) -> ParallelFunction[P, R] | Callable[[Callable[P, R]], ParallelFunction[P, R]]:
    """Run the function on chunks of its first argument, in parallel, on HTTP workers.

    Use bare (`@serverless.parallel`) or with options (see `serverless.Options`).
    """
    options = Options().merged(
        workers=workers,
        chunk_size=chunk_size,
        timeout=timeout,
        retries=retries,
        url=url,
        deadline=deadline,
        idempotent=idempotent,
        hedge=hedge,
        errors=errors,
    )
    if func is not None:
        return ParallelFunction(func, options)
    return lambda f: ParallelFunction(f, options)


def sequential(func: Callable[P, R]) -> SequentialFunction[P, R]:
    """Run the function in the caller, recording the same statistics as a parallel step."""
    return SequentialFunction(func)


class Pipeline:
    """Steps run one after the other, each on the previous step's result.

    Consecutive @parallel steps that go to the same place are fused: each chunk runs through
    all of them in one request, so the data crosses the network once per group instead of
    once per step. @sequential steps are the only barriers. Statistics stay per step: the
    worker measures each stage's output count and compute time. `fuse=False` opts out.
    """

    def __init__(self, *steps: Any, fuse: bool = True) -> None:
        for step in steps:
            if not isinstance(step, _Step | _Bound):
                raise TypeError(
                    f"Pipeline steps must be decorated with @serverless.parallel or "
                    f"@serverless.sequential: {getattr(step, '__name__', step)!r} is not"
                )
        if not steps:
            raise TypeError("a Pipeline needs at least one step")
        self.steps = steps
        self.fuse = fuse
        self.last_run: PipelineRun | None = None

    def run(self, data: Iterable[Any]) -> Any:
        """Run every step and return the last one's result (statistics in `last_run`)."""
        return self.execute(data).result

    def execute(self, data: Iterable[Any]) -> PipelineRun:
        """Run every step; the returned PipelineRun holds this run's own statistics."""
        started = time.perf_counter()
        stats: list[StepStats] = []
        for group in _fusion_groups(self.steps) if self.fuse else [[s] for s in self.steps]:
            if len(group) > 1:
                data, group_stats = _run_fused(group, data)
                stats += group_stats
            else:
                data, step_stats = group[0].with_stats(data)
                stats.append(step_stats)
        run = PipelineRun(result=data, steps=stats, duration=time.perf_counter() - started)
        self.last_run = run
        return run


def _parallel_part(step: Any) -> tuple[ParallelFunction[Any, Any], str] | None:
    """The parallel function and binding behind a pipeline step, if it is a parallel one."""
    if isinstance(step, _Bound) and isinstance(step._step, ParallelFunction):
        return step._step, step._bind
    if isinstance(step, ParallelFunction):
        return step, _registry.BIND_NONE
    return None


def _fusion_groups(steps: Sequence[Any]) -> list[list[Any]]:
    """Runs of consecutive parallel steps with the same target; anything else alone. A step
    with bound arguments (`partial`) may only open a group: a later stage carries none."""
    groups: list[list[Any]] = []
    for step in steps:
        part, last = _parallel_part(step), _parallel_part(groups[-1][-1]) if groups else None
        bound = part is not None and bool(part[0]._bound_args or part[0]._bound_kwargs)
        if part and last and not bound and part[0].options.url == last[0].options.url:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def _run_fused(group: list[Any], data: Any) -> tuple[list[Any], list[StepStats]]:
    """One request per chunk runs every step of the group; statistics per step."""
    parts = [part for part in map(_parallel_part, group) if part]
    first, bind = parts[0]
    call = first._prepare(bind, (data,), {})
    spec = dataclasses.replace(
        call.spec,
        function=STAGE_SEPARATOR.join(fn.entry.name for fn, _ in parts),
        then=[Stage(fn=fn.entry.name, bind=b) for fn, b in parts[1:]],
        timeout=max(fn.options.timeout for fn, _ in parts),
        retries=min(fn.options.retries for fn, _ in parts),
        hedge=all(fn.options.hedging for fn, _ in parts),
        errors="raise",  # an item that failed in one stage has no input for the next
    )
    call = dataclasses.replace(call, spec=spec)
    tally = Tally()
    results: list[Any] = []
    done: list[ChunkStats] = []
    kind = "none"
    if call.count != 0:
        target = resolve(first.options.url, blocking=True)
        mapped = dispatcher().run(call.map(target))
        results, kind, tally = mapped.results, target.kind, mapped.tally
        done = tally.in_order()
        if any(len(c.stages) != len(parts) for c in done):
            raise ProtocolError(
                f"a worker ran {spec.function} without per-stage figures", url=done[0].url
            )
    duration = time.perf_counter() - call.started
    # the tally's totals, exact however many chunks there were (per-chunk stats are bounded)
    counts = [call.count if call.count is not None else tally.count]
    counts += tally.stage_counts or [0] * len(parts)
    stats = []
    for stage, (fn, _) in enumerate(parts):
        step_stats = StepStats(
            name=fn.__name__,
            kind=fn.kind,
            duration=duration,  # the group's: its steps ran interleaved, chunk by chunk
            workers=min(tally.done, fn.options.workers),
            count=counts[stage],
            count_out=counts[stage + 1],
            compute_s=tally.stage_compute_s[stage] if tally.stage_compute_s else 0.0,
            retries=tally.retries,
            hedges=tally.hedges,
            target=kind,
            chunks=done,
        )
        fn._record(step_stats)
        stats.append(step_stats)
    return results, stats


# -- the worker route --------------------------------------------------------------------------


class WorkerRoute:
    """The worker endpoint returned by init(), ready to mount in a WSGI or ASGI app.

    app.wsgi_app = route.wsgi(app.wsgi_app)        # Flask
    application = route.wsgi(get_wsgi_application())  # Django, in wsgi.py
    app.add_middleware(route.asgi)                  # FastAPI / Starlette
    """

    def __init__(self, endpoint: Endpoint, threads: int) -> None:
        self.endpoint = endpoint
        self.threads = threads

    @property
    def route(self) -> str:
        return self.endpoint.route

    def wsgi(self, app: WSGIApp | None = None) -> WSGIEndpoint:
        """A WSGI app serving the route; wraps `app` for every other path, if given."""
        return WSGIEndpoint(self.endpoint, app)

    def asgi(self, app: ASGIApp | None = None) -> ASGIEndpoint:
        """An ASGI app serving the route; wraps `app` for every other path, if given."""
        return ASGIEndpoint(self.endpoint, app, threads=self.threads)


def init(
    route: str = "/serverless",
    secret: str | Sequence[str] | None = None,
    url: str | None = None,
    *,
    max_body: int = MAX_BODY,
    tolerance: float = TOLERANCE,
    threads: int = 64,
    local_processes: int | None = None,
    local_threads: int | None = None,
    self_url: str | None = None,
    trusted_hosts: Sequence[str] | None = None,
) -> WorkerRoute:
    """Configure this process as caller and return the worker route to mount.

    route: the path of the worker route (also signed, so both sides must agree).
    secret: the HMAC secret, or several during a key rotation (the first signs, all verify);
        defaults to $SERVERLESS_SECRET (several separated by commas).
    url: send chunks to this URL (a load balancer in front of workers) instead of calling
        back into the current request's app or using the local pool; or $SERVERLESS_URL.
    threads: threads of the ASGI adapter for sync functions (WSGI uses the server's).
    self_url, trusted_hosts: where call-back-to-self may go ($SERVERLESS_SELF_URL,
        $SERVERLESS_TRUSTED_HOSTS); never taken from a request's headers (docs/security.md).
    """
    if not isinstance(route, str) or not route.startswith("/"):
        raise ConfigurationError(f"route must be a path starting with '/', not {route!r}")
    secret = secret or secrets_from_env()
    if not secret:
        raise ConfigurationError("serverless.init() needs a secret (or set SERVERLESS_SECRET)")
    keyring = Keyring(secret)
    changes: dict[str, Any] = {
        "route": route,
        "keyring": keyring,
        "url": url,
        "max_body": max_body,
        "local_processes": local_processes,
    }
    if local_threads is not None:
        changes["local_threads"] = local_threads
    configure(**changes)
    origins = OriginPolicy.configured(self_url, trusted_hosts)
    endpoint = Endpoint(route, keyring, max_body=max_body, tolerance=tolerance, origins=origins)
    return WorkerRoute(endpoint, threads)
