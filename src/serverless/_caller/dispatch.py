"""The caller's engine room: one event-loop thread per process, and one attempt of one chunk.

Each call's fan-out (slots, order, retries, hedges, deadline) is a _fanout.Fanout run on that
loop; this module signs a chunk, posts it through a transport (the lean keep-alive HTTP
client, or a target's own transport) and reads the answer, both halves in _protocol.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._config import ErrorMode, Rate
from .._exceptions import (
    ConfigurationError,
    ProtocolError,
    WorkerError,
    WorkerTimeout,
    WorkerUnavailable,
)
from .._registry import Bind
from .._stats import ChunkStats, TargetKind
from .._wire import protocol as p
from .._wire.values import UNTYPED, Shape
from . import http as _http
from .chunking import Chunk
from .fanout import Fanout, Policy, Tally, Throttle
from .flow import Capacities
from .sharing import INLINE, SharedCall
from .transport import Transport

logger = logging.getLogger("serverless.dispatch")
T = TypeVar("T")

# Seconds a chunk may wait for a worker's thread before the worker refuses it as busy (503,
# Retry-After: nothing ran) instead of queueing it without bound: the Call's start_by.
START_WITHIN = 1.0


@dataclass(frozen=True)
class Target:
    """Where chunks go: one or more URLs of worker routes that share `route` and keys."""

    urls: tuple[str, ...]
    route: str
    keyring: p.Keyring
    kind: TargetKind
    max_body: int = p.MAX_BODY
    transport: Transport | None = None  # None: the dispatcher's HTTP client
    # a call made while serving: its thread runs chunks too (_sharing.py)
    shared: SharedCall | None = None


@dataclass(frozen=True)
class CallSpec:
    """What every chunk of one call carries, and the call's fan-out options."""

    function: str
    bind: Bind
    args: list[Any]
    kwargs: dict[str, Any]
    workers: int
    timeout: float
    retries: int
    then: list[p.Stage] = field(default_factory=list)  # fused pipeline stages after the first
    deadline: float | None = None
    hedge: bool = False
    errors: ErrorMode = "raise"
    # called on the loop thread with (items, worker compute seconds) of each reply: the hook
    # of the adaptive chunk sizing (_chunking.AdaptiveChunks.observe)
    on_reply: Callable[[int, float], None] | None = None
    results: Shape = UNTYPED  # how the (last) function's results decode
    rate: Rate | None = None  # items per second across the call (_rate.py)
    group: str = field(default_factory=p.new_request_id)  # the call's id on its paced chunks

    def envelope(self, chunk: Chunk, timeout: float, pace: float | None = None) -> p.Call:
        """One chunk's request envelope, with a request id of its own, for an attempt that
        ends in `timeout` seconds: after that the worker must not start it. `pace`: the
        items run one by one, at most one per `pace` seconds (a fused call's never do)."""
        now = time.time()
        deadline = now + timeout
        # a call that cannot retry does not ask for a busy refusal: it would fail the call
        start_by = min(now + START_WITHIN, deadline) if self.retries > 0 else None
        return p.Call(
            v=p.VERSION,
            fn=self.function,
            id=p.new_request_id(),
            index=chunk.index,
            items=chunk.items,
            args=self.args,
            kwargs=self.kwargs,
            bind=self.bind,
            then=self.then,
            isolate=self.errors == "return",
            deadline=deadline,
            start_by=start_by,
            pace=None if self.then else pace,
            group=self.group if pace is not None and not self.then else "",
        )


class Dispatcher:
    """Owns the event-loop thread and the HTTP client; both are re-created after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._http: _http.Client | None = None  # the lean client: see _http.py
        # what the workers behind each URL said they can run at once (_flow.py)
        self.capacities = Capacities()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = _new_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="serverless-dispatch", daemon=True
                )
                thread.start()
                self._loop, self._thread, self._pid, self._http = loop, thread, os.getpid(), None
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
        with self._lock:
            loop, thread, client = self._loop, self._thread, self._http
            if loop is None or thread is None or self._pid != os.getpid():
                return
            self._loop, self._thread, self._http = None, None, None

        def stop() -> None:
            if client is not None:
                client.close()
            loop.stop()

        loop.call_soon_threadsafe(stop)
        # close the loop once its thread is done with it: a loop left for the garbage
        # collector at interpreter exit warns about a file descriptor already closed
        if thread is not threading.current_thread():
            thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()

    def _client(self) -> _http.Client:
        if self._http is None:
            self._http = _http.Client(p.MAX_REPLY)
        return self._http

    # -- the fan-out, on the loop thread ---------------------------------------------------

    def fanout(
        self,
        spec: CallSpec,
        target: Target,
        chunks: Iterator[Chunk],
        tally: Tally,
        *,
        lazy_input: bool = False,
    ) -> AsyncGenerator[list[Any], None]:
        """One call's results in order, in batches (see _fanout.py); iterate on the loop."""

        async def attempt(
            url: str, chunk: Chunk, number: int, timeout: float, pace: float | None
        ) -> tuple[list[Any], ChunkStats]:
            start = time.perf_counter()
            reply = await self._post(spec, target, url, chunk, timeout, pace)
            assert reply.results is not None
            self.capacities.observe(url, reply.worker, reply.capacity)
            stats = ChunkStats(
                index=chunk.index,
                size=len(chunk.items),
                worker=reply.worker,
                url=url,
                start=start,
                end=time.perf_counter(),
                queue_s=reply.queue_s,
                compute_s=reply.compute_s,
                attempts=number,
                stages=reply.stages or [],
            )
            if reply.throttled is not None:
                throttled = reply.throttled
                at, ran = throttled.at, min(max(throttled.at, throttled.ran), len(chunk.items))
                retry_after = throttled.retry_after
                raise Throttle(reply.results, stats, at, retry_after, ran, throttled.stopped)
            if spec.on_reply is not None:
                spec.on_reply(stats.size, stats.compute_s)
            return reply.results, stats

        policy = Policy(spec.workers, spec.retries, spec.deadline, spec.hedge, spec.rate)
        fanout = Fanout(
            spec.function,
            target.urls,
            chunks,
            attempt,
            policy,
            tally,
            lazy_input=lazy_input,
            timeout=spec.timeout,
            capacities=self.capacities,
        )
        return fanout.results()

    async def _post(
        self,
        spec: CallSpec,
        target: Target,
        url: str,
        chunk: Chunk,
        timeout: float,
        pace: float | None = None,
    ) -> p.Reply:
        """One attempt of one chunk; a server-context call's waits for a lane first: HTTP to
        self, or the caller's own thread. A chunk sent to self that was refused before it
        started goes to the caller's thread (the `start_by` hook: SharedCall.refused)."""
        shared = target.shared
        if shared is None:
            return await self._send(spec, target, url, chunk, timeout, pace)
        inline = False
        while True:
            async with shared.lane(url, inline) as lane:
                try:
                    return await self._send(spec, target, lane, chunk, timeout, pace)
                except WorkerError as exc:
                    if lane == INLINE or not shared.refused(exc):
                        raise
            inline = True

    async def _send(
        self,
        spec: CallSpec,
        target: Target,
        url: str,
        chunk: Chunk,
        timeout: float,
        pace: float | None = None,
    ) -> p.Reply:
        """Sign, post through the target's transport (or lane), read."""
        transport = target.transport or self._client()
        what = f"chunk {chunk.index} of {spec.function}"
        # retries=0: at most once. A kept-alive connection that fails before any byte of an
        # answer may still have delivered the request, so it must not be resent: such a call
        # takes a fresh connection, which is never stale.
        at_most_once = spec.retries == 0
        for fresh in (at_most_once, True):
            call = spec.envelope(chunk, timeout, pace)  # signed anew on a resend: a new id
            body, headers = p.build_request(
                target.keyring, target.route, call, time.time(), target.max_body
            )
            try:
                if target.shared is not None:
                    response = await target.shared.post(
                        url, self._client(), _http.Body(body), headers, timeout, fresh
                    )
                else:
                    response = await transport.post(
                        url, _http.Body(body), headers, timeout, fresh=fresh
                    )
                break
            except _http.StaleConnection as exc:
                if fresh:  # pragma: no cover - a fresh connection is never stale
                    raise WorkerUnavailable(f"{what} failed: {exc}", url=url) from exc
            except _http.InvalidURL as exc:
                raise ConfigurationError(f"invalid worker URL {url!r}") from exc
            except _http.ReplyTooLarge as exc:
                raise ProtocolError(f"{what}: {exc}: use a smaller chunk_size", url=url) from exc
            except (asyncio.TimeoutError, TimeoutError) as exc:
                raise WorkerTimeout(f"{what} took longer than {timeout:.3g}s", url=url) from exc
            except _http.TransportError as exc:
                raise WorkerUnavailable(f"{what} failed: {exc}", url=url) from exc
        return p.read_reply(
            response.status,
            response.content_type,
            response.body,
            response.headers,
            call,
            chunk.offset,
            url,
            target.keyring,
            spec.results,
        )


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed: its cheaper cross-thread wake-up and transports take
    ~0.07 ms off every call's round trip (W3 0.53 -> 0.46 ms); asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows, or a trimmed install
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


_dispatcher = Dispatcher()


def dispatcher() -> Dispatcher:
    return _dispatcher


atexit.register(_dispatcher.close)
