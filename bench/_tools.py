"""One adapter per tool: start a pool of a given width, map chunks in order, stream, close.

Each adapter uses the tool's ordinary public API the way its documentation suggests for a
parallel map; the workload code in _run.py is the same for all of them.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import _work

Chunks = list[list[Any]]
CPUS = os.cpu_count() or 1


def windowed(
    submit: Callable[[list[Any]], Any],
    get: Callable[[Any], list[Any]],
    chunks: Iterable[list[Any]],
    window: int,
) -> Iterator[list[Any]]:
    """Ordered results with at most `window` chunks in flight: the usual bounded-memory idiom
    for pools whose own map reads (and keeps) the whole input up front."""
    queue: collections.deque[Any] = collections.deque()
    for chunk in chunks:
        queue.append(submit(chunk))
        if len(queue) >= window:
            yield get(queue.popleft())
    while queue:
        yield get(queue.popleft())


class Tool:
    name = ""
    process_per_slot = False  # True: 100 blocking waits at once would need 100 processes
    version = ""

    def start(self, width: int, io: bool) -> None:
        raise NotImplementedError

    def map(self, fn: str, chunks: Chunks, args: tuple[Any, ...]) -> Chunks:
        raise NotImplementedError

    def stream(
        self, fn: str, chunks: Iterable[list[Any]], args: tuple[Any, ...]
    ) -> Iterator[list[Any]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _fn(name: str) -> Callable[..., list[Any]]:
    return getattr(_work, name)  # type: ignore[no-any-return]


class Serverless(Tool):
    name = "serverless"

    def __init__(self) -> None:
        import serverless

        from . import _ours

        self._sl, self._ours = serverless, _ours
        self.version = serverless.__version__
        self.width = 100

    def start(self, width: int, io: bool) -> None:
        self._sl.shutdown()  # the next call starts the local pool: that is the cold start
        self.width = width

    def run(self, fn: str, items: list[Any], chunk: int, args: tuple[Any, ...]) -> list[Any]:
        step = getattr(self._ours, fn).with_options(workers=self.width, chunk_size=chunk)
        return step(items, *args)  # type: ignore[no-any-return]

    def stream_items(
        self, fn: str, items: Iterable[Any], chunk: int, args: tuple[Any, ...]
    ) -> Iterator[Any]:
        step = getattr(self._ours, fn).with_options(workers=self.width, chunk_size=chunk)
        return step.stream(items, *args)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._sl.shutdown()


class Threads(Tool):
    name = "threads"

    def start(self, width: int, io: bool) -> None:
        import concurrent.futures

        self.pool = concurrent.futures.ThreadPoolExecutor(width)
        self.width = width

    def map(self, fn: str, chunks: Chunks, args: tuple[Any, ...]) -> Chunks:
        f = _fn(fn)
        return list(self.pool.map(lambda c: f(c, *args), chunks))

    def stream(
        self, fn: str, chunks: Iterable[list[Any]], args: tuple[Any, ...]
    ) -> Iterator[list[Any]]:
        f = _fn(fn)
        return windowed(
            lambda c: self.pool.submit(f, c, *args), lambda x: x.result(), chunks, 2 * self.width
        )

    def close(self) -> None:
        self.pool.shutdown()


class Processes(Threads):
    name = "processes"
    process_per_slot = True

    def start(self, width: int, io: bool) -> None:
        import concurrent.futures

        self.pool = concurrent.futures.ProcessPoolExecutor(width)  # type: ignore[assignment]
        self.width = width

    def map(self, fn: str, chunks: Chunks, args: tuple[Any, ...]) -> Chunks:
        return list(self.pool.map(_fn(fn), chunks, *[[a] * len(chunks) for a in args]))


class MultiprocessingPool(Tool):
    name = "multiprocessing"
    process_per_slot = True

    def start(self, width: int, io: bool) -> None:
        import multiprocessing

        self.pool = multiprocessing.get_context("spawn").Pool(width)
        self.width = width

    def map(self, fn: str, chunks: Chunks, args: tuple[Any, ...]) -> Chunks:
        return self.pool.starmap(_fn(fn), [(c, *args) for c in chunks])

    def stream(
        self, fn: str, chunks: Iterable[list[Any]], args: tuple[Any, ...]
    ) -> Iterator[list[Any]]:
        f = _fn(fn)
        return windowed(
            lambda c: self.pool.apply_async(f, (c, *args)),
            lambda r: r.get(),
            chunks,
            2 * self.width,
        )

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class Joblib(Tool):
    name = "joblib"
    process_per_slot = True

    def __init__(self) -> None:
        import joblib

        self.version = joblib.__version__

    def start(self, width: int, io: bool) -> None:
        import joblib

        self.parallel = joblib.Parallel(n_jobs=width)  # loky, its default backend
        self.parallel.__enter__()  # keep the workers between calls
        self.width = width

    def map(self, fn: str, chunks: Chunks, args: tuple[Any, ...]) -> Chunks:
        import joblib

        f = joblib.delayed(_fn(fn))
        return list(self.parallel(f(c, *args) for c in chunks))

    def stream(
        self, fn: str, chunks: Iterable[list[Any]], args: tuple[Any, ...]
    ) -> Iterator[list[Any]]:
        import joblib

        f = joblib.delayed(_fn(fn))
        gen = joblib.Parallel(n_jobs=self.width, return_as="generator")
        return iter(gen(f(c, *args) for c in chunks))

    def close(self) -> None:
        self.parallel.__exit__(None, None, None)


class Dask(Tool):
    name = "dask"

    def __init__(self) -> None:
        import distributed

        self.version = str(getattr(distributed, "__version__", "?"))

    def start(self, width: int, io: bool) -> None:
        from distributed import Client, LocalCluster

        procs = min(CPUS, width)
        self.cluster = LocalCluster(
            n_workers=procs,
            threads_per_worker=max(1, width // procs),
            processes=True,
            dashboard_address=None,
        )
        self.client = Client(self.cluster)
        self.width = width

    def map(self, fn: str, chunks: Chunks, args: tuple[Any, ...]) -> Chunks:
        futures = self.client.map(_fn(fn), chunks, *[[a] * len(chunks) for a in args], pure=False)
        return self.client.gather(futures)  # type: ignore[no-any-return]

    def stream(
        self, fn: str, chunks: Iterable[list[Any]], args: tuple[Any, ...]
    ) -> Iterator[list[Any]]:
        f = _fn(fn)
        return windowed(
            lambda c: self.client.submit(f, c, *args, pure=False),
            lambda x: x.result(),
            chunks,
            2 * self.width,
        )

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


class Ray(Tool):
    name = "ray"

    def __init__(self) -> None:
        import ray

        self.version = ray.__version__
        self._ray = ray

    def start(self, width: int, io: bool) -> None:
        ray = self._ray
        ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
        self.width = width
        self.task = ray.remote(_run_named)
        self.actors: list[Any] = []
        if io:  # blocking waits: threaded actors, as Ray's docs suggest for I/O concurrency
            per = max(1, width // CPUS)
            cls = ray.remote(_Runner).options(max_concurrency=per, num_cpus=0)
            self.actors = [cls.remote() for _ in range(CPUS)]

    def _submit(self, fn: str, chunk: list[Any], args: tuple[Any, ...], n: int) -> Any:
        if self.actors:
            return self.actors[n % len(self.actors)].run.remote(fn, chunk, *args)
        return self.task.remote(fn, chunk, *args)

    def map(self, fn: str, chunks: Chunks, args: tuple[Any, ...]) -> Chunks:
        refs = [self._submit(fn, c, args, n) for n, c in enumerate(chunks)]
        return self._ray.get(refs)  # type: ignore[no-any-return, unused-ignore]

    def stream(
        self, fn: str, chunks: Iterable[list[Any]], args: tuple[Any, ...]
    ) -> Iterator[list[Any]]:
        return windowed(
            lambda c: self._submit(fn, c, args, 0), self._ray.get, chunks, 2 * self.width
        )

    def close(self) -> None:
        self._ray.shutdown()


def _run_named(fn: str, chunk: list[Any], *args: Any) -> list[Any]:
    return _fn(fn)(chunk, *args)


class _Runner:
    def run(self, fn: str, chunk: list[Any], *args: Any) -> list[Any]:
        return _fn(fn)(chunk, *args)


TOOLS: dict[str, type[Tool]] = {
    t.name: t for t in (Serverless, Threads, Processes, MultiprocessingPool, Joblib, Dask, Ray)
}
