"""The caller's engine room: one event-loop thread per process, and one attempt of one chunk.

Each call's fan-out (slots, order, retries, hedges, deadline) is a fanout.Fanout run on that
loop, executing the call's plan (plan.py); this module signs a chunk, posts it through a
transport (the lean keep-alive HTTP client, or a target's own transport) and reads the
answer, both halves in _wire (exchange.py).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Coroutine, Iterator
from typing import Any, TypeVar

from .. import _wire as p
from .._exceptions import (
    ConfigurationError,
    ProtocolError,
    WorkerError,
    WorkerTimeout,
    WorkerUnavailable,
)
from . import http as _http
from .cache import CallCache
from .chunking import AdaptiveChunks, Chunk, ChunkBytes
from .fanout import Answer, Fanout, Tally
from .flow import Capacities
from .plan import CallPlan
from .sharing import INLINE
from .transport import Target
from .watch import Watch

logger = logging.getLogger("serverless.dispatch")
T = TypeVar("T")
# a request's Call.pace and Call.slot (paced), and Call.trace (its traceparent, or "")
Pacing = tuple["float | None", "float | None", str]


class Dispatcher:
    """Owns the event-loop thread and the HTTP client; both are re-created after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._http: _http.Client | None = None  # the lean client: see _http.py
        # what the workers behind each URL said they can run at once (flow.py)
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

    def check_blocking(self, what: str) -> None:
        """Refuse a call that would block the loop's own thread (a progress= callable runs
        there): it would wait forever for work only that thread can do."""
        if self._thread is threading.current_thread():
            raise ConfigurationError(
                f"{what} was called on serverless's dispatcher thread (from a progress= "
                "callable?), where waiting for it would never end: call it from another thread"
            )

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
        plan: CallPlan,
        chunks: Iterator[Chunk],
        tally: Tally,
        *,
        lazy_input: bool = False,
        sizer: AdaptiveChunks | None = None,
        weights: ChunkBytes | None = None,
        hold: int | None = None,
        cache: CallCache | None = None,
        count: int | None = None,
        watch: Watch | None = None,
    ) -> AsyncGenerator[list[Any], None]:
        """One call's results in order, in batches (see fanout.py); iterate on the loop."""
        target = plan.target
        assert target is not None  # an empty input, which has none, is never sent

        async def attempt(
            url: str,
            chunk: Chunk,
            timeout: float,
            pace: float | None,
            slot: float | None,
            trace: str,
        ) -> Answer:
            reply, size = await self._post(plan, target, url, chunk, timeout, (pace, slot, trace))
            assert reply.results is not None
            self.capacities.observe(url, reply.worker, reply.capacity)
            return Answer(
                reply.results,
                reply.worker,
                reply.queue_s,
                reply.compute_s,
                reply.stages or [],
                reply.throttled,
                size,
            )

        fanout = Fanout(
            plan,
            target.urls,
            chunks,
            attempt,
            tally,
            lazy_input=lazy_input,
            capacities=self.capacities,
            sizer=sizer,
            weights=weights,
            hold=hold,
            cache=cache,
            count=count,
            watch=watch,
        )
        return fanout.results()

    async def _post(
        self,
        plan: CallPlan,
        target: Target,
        url: str,
        chunk: Chunk,
        timeout: float,
        pacing: Pacing = (None, None, ""),
    ) -> tuple[p.Reply, int]:
        """One attempt of one chunk, and its reply's size; a server-context call's waits for
        a lane first: HTTP to self, or the caller's own thread. A chunk sent to self that was
        refused before it started goes to the caller's thread (the `start_by` hook:
        SharedCall.refused)."""
        shared = target.shared
        if shared is None:
            return await self._send(plan, target, url, chunk, timeout, pacing)
        inline = False
        while True:
            async with shared.lane(url, inline) as lane:
                try:
                    return await self._send(plan, target, lane, chunk, timeout, pacing)
                except WorkerError as exc:
                    if lane == INLINE or not shared.refused(exc):
                        raise
            inline = True

    async def _send(
        self,
        plan: CallPlan,
        target: Target,
        url: str,
        chunk: Chunk,
        timeout: float,
        pacing: Pacing = (None, None, ""),
    ) -> tuple[p.Reply, int]:
        """Sign, post through the target's transport (or lane), read; and the reply's size."""
        transport = target.transport or self._client()
        what = f"chunk {chunk.index} of {plan.function}"
        prefix = target.id_prefixes.get(url, "") if target.id_prefixes else ""
        # retries=0: at most once. A kept-alive connection that fails before any byte of an
        # answer may still have delivered the request, so it must not be resent: such a call
        # takes a fresh connection, which is never stale.
        for fresh in (plan.at_most_once, True):
            now = time.time()
            # signed anew on a resend: a new id
            call = plan.envelope(chunk, timeout, now, *pacing, id_prefix=prefix)
            body, headers = p.build_request(
                target.keyring, target.route, call, now, target.max_body
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
        reply = p.read_reply(
            response.status,
            response.content_type,
            response.body,
            response.headers,
            call,
            chunk.offset,
            url,
            target.keyring,
            plan.results,
        )
        return reply, len(response.body)


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
