"""The fan-out client: one HTTP client per process on a background event-loop thread.

Chunks go out with at most `workers` in flight, each to the least-loaded URL of the target;
transient failures are retried on another URL with backoff; results are collated in order.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from . import _http
from . import _protocol as p
from ._chunking import Chunk
from ._exceptions import (
    ConfigurationError,
    ProtocolError,
    RemoteError,
    RequestRejected,
    SerializationError,
    WorkerError,
    WorkerTimeout,
    WorkerUnavailable,
)

logger = logging.getLogger("serverless.dispatch")
T = TypeVar("T")

BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0


@dataclass(frozen=True)
class Target:
    """Where chunks go: one or more URLs of worker routes that share `route` and keys."""

    urls: tuple[str, ...]
    route: str
    keyring: p.Keyring
    kind: str  # "url", "self" or "local"
    max_body: int = p.MAX_BODY


@dataclass(frozen=True)
class CallSpec:
    function: str
    bind: str
    args: list[Any]
    kwargs: dict[str, Any]
    workers: int
    timeout: float
    retries: int
    then: list[p.Stage] = field(default_factory=list)  # fused pipeline stages after the first
    # called on the loop thread with (items, worker compute seconds) of each reply: the hook
    # of the adaptive chunk sizing (_chunking.AdaptiveChunks.observe)
    on_reply: Callable[[int, float], None] | None = None


@dataclass
class ChunkStats:
    """One chunk as measured: caller-side times are seconds since the call started."""

    index: int
    size: int
    worker: str
    url: str
    start: float
    end: float
    queue_s: float
    compute_s: float
    attempts: int
    stages: list[p.StageFigures] = field(default_factory=list)  # a fused call's, per stage


@dataclass
class MapResult:
    results: list[Any]
    chunks: list[ChunkStats] = field(default_factory=list)


class Dispatcher:
    """Owns the event-loop thread and the HTTP client; both are re-created after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: _http.Client | None = None  # the lean client: see _http.py

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="serverless-dispatch", daemon=True
                )
                thread.start()
                self._loop, self._http, self._pid = loop, None, os.getpid()
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the loop thread and wait; interrupting the wait cancels the work."""
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await from any event loop; cancelling the awaiting task cancels the work."""
        future = self.submit(coro)
        try:
            return await asyncio.wrap_future(future)
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        loop, client = self._loop, self._http
        if loop is None or self._pid != os.getpid():
            return
        if client is not None:
            loop.call_soon_threadsafe(client.close)
        loop.call_soon_threadsafe(loop.stop)
        self._loop = self._http = None

    def _client(self) -> _http.Client:
        if self._http is None:
            self._http = _http.Client()
        return self._http

    # -- the fan-out, on the loop thread ---------------------------------------------------

    async def map(self, spec: CallSpec, target: Target, chunks: Iterator[Chunk]) -> MapResult:
        t0 = time.perf_counter()
        load = dict.fromkeys(target.urls, 0)
        slots = asyncio.Semaphore(spec.workers)
        results: dict[int, list[Any]] = {}
        stats: list[ChunkStats] = []
        pending: set[asyncio.Task[None]] = set()
        failed: list[BaseException] = []

        async def one(index: int, offset: int, items: list[Any]) -> None:
            try:
                results[index], chunk_stats = await self._chunk(
                    spec, target, load, (index, offset, items), t0
                )
                stats.append(chunk_stats)
                if spec.on_reply is not None:
                    spec.on_reply(chunk_stats.size, chunk_stats.compute_s)
            finally:
                slots.release()

        def done(task: asyncio.Task[None]) -> None:
            pending.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())  # type: ignore[arg-type]

        try:
            for chunk in chunks:
                await slots.acquire()
                if failed:
                    slots.release()
                    break
                task = asyncio.create_task(one(*chunk))
                pending.add(task)
                task.add_done_callback(done)
            while pending and not failed:
                await asyncio.wait(set(pending), return_when=asyncio.FIRST_EXCEPTION)
            if failed:
                raise failed[0]
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        ordered = [item for index in sorted(results) for item in results[index]]
        return MapResult(ordered, sorted(stats, key=lambda s: s.index))

    async def _chunk(
        self,
        spec: CallSpec,
        target: Target,
        load: dict[str, int],
        chunk: Chunk,
        t0: float,
    ) -> tuple[list[Any], ChunkStats]:
        index, _, items = chunk
        failed_urls: set[str] = set()
        for attempt in range(1, spec.retries + 2):
            url = min(load, key=lambda u: (u in failed_urls, load[u]))
            load[url] += 1
            start = time.perf_counter()
            try:
                reply = await self._post(spec, target, url, chunk)
            except WorkerError as exc:
                if not exc.retryable or attempt > spec.retries:
                    raise
                logger.info("retrying chunk %d of %s: %s", index, spec.function, exc)
                failed_urls.add(url)
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            finally:
                load[url] -= 1
            assert reply.results is not None
            stats = ChunkStats(
                index=index,
                size=len(items),
                worker=reply.worker,
                url=url,
                start=start - t0,
                end=time.perf_counter() - t0,
                queue_s=reply.queue_s,
                compute_s=reply.compute_s,
                attempts=attempt,
                stages=reply.stages or [],
            )
            return reply.results, stats
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(
        self,
        spec: CallSpec,
        target: Target,
        url: str,
        chunk: Chunk,
    ) -> p.Reply:
        index, offset, items = chunk
        request_id = p.new_request_id()
        call = p.Call(
            v=p.VERSION,
            fn=spec.function,
            id=request_id,
            index=index,
            items=items,
            args=spec.args,
            kwargs=spec.kwargs,
            bind=spec.bind,
            then=spec.then,
        )
        body = p.encode(call)
        if len(body) > target.max_body:
            raise ConfigurationError(
                f"chunk {index} of {spec.function} encodes to {len(body)} bytes, over the "
                f"{target.max_body}-byte request limit: use a smaller chunk_size or more workers"
            )
        headers = p.signed_headers(target.keyring, target.route, spec.function, request_id, body)
        what = f"chunk {index} of {spec.function}"
        try:
            response = await self._client().post(url, body, headers, spec.timeout)
        except _http.InvalidURL as exc:
            raise ConfigurationError(f"invalid worker URL {url!r}") from exc
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise WorkerTimeout(f"{what} took longer than {spec.timeout}s", url=url) from exc
        except _http.TransportError as exc:
            raise WorkerUnavailable(f"{what} failed: {exc}", url=url) from exc
        raw, status, content_type = response.body, response.status, response.content_type
        return _interpret(spec.function, what, url, offset, status, content_type, raw)


def _interpret(
    function: str, what: str, url: str, offset: int, status: int, ctype: str | None, raw: bytes
) -> p.Reply:
    fmt = p.media_type(ctype)
    reply: p.Reply | None = None
    if fmt is not None:
        try:
            reply = p.decode_reply(raw, fmt)
        except msgspec.DecodeError:
            reply = None
    if status == 200 and reply is not None and reply.results is not None:
        return reply
    error = reply.error if reply is not None else None
    if status in (502, 503, 504):
        raise WorkerUnavailable(f"{what}: worker unavailable", url=url, status=status)
    if error is not None and reply is not None and error.kind == "user":
        names = function.split(p.STAGE_SEPARATOR)  # a fused call names every stage
        stage = error.stage if 0 < error.stage < len(names) else 0
        index = None if error.index is None or stage else offset + error.index
        raise RemoteError(
            names[stage] if stage else function,
            error.type,
            error.message,
            error.traceback,
            index=index,
            item=error.item,
            worker=reply.worker,
        )
    if error is not None and reply is not None and error.kind == "result":
        raise SerializationError(
            f"{function} returned a bad result on worker {reply.worker}: "
            f"{error.type}: {error.message}"
        )
    detail = error.message if error is not None else raw[:200].decode("utf-8", "replace")
    if 400 <= status < 500:
        raise RequestRejected(f"{what} was refused: {detail}", url=url, status=status)
    raise ProtocolError(f"{what}: not a protocol v1 answer: {detail!r}", url=url, status=status)


_dispatcher = Dispatcher()


def dispatcher() -> Dispatcher:
    return _dispatcher


atexit.register(_dispatcher.close)
