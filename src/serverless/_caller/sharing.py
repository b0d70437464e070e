"""Work-sharing: a call made in a server context never leaves its thread idle on chunks that
no thread can run (issue 15: no fan-out wedges an app).

A call made while serving a request of an app with the route mounted, or inside a chunk, holds
one of the server's threads while it waits; if every thread waits on chunks sent back to the
same server, nothing runs them (nested calls hung 4 of 5 times under gunicorn gthread 2x16).
So the waiting thread works: the chunks of its own fan-out go either to the app over HTTP, at
most as many as the process has free threads, or to the caller's own thread, which runs them
in-process through the same `Endpoint` (accept, then run), the request signed as for HTTP.

When the caller's thread has nothing left to run, it reclaims chunks it sent that have not
started: it presents the very request (same id) to its endpoint, and the replay store decides
who runs it: the first to claim an id runs it, the other is refused (409). On one host that
store is shared by the server's processes, so a chunk still queued in the server runs inline
and is refused when dequeued, and one already running is left alone: at most once, with no
timing guess. Across hosts (a configured self URL behind a balancer) the store is per host,
so reclaiming is left to calls that allow a second run (`retries > 0`).

A chunk sent to self carries the call's `start_by` (_caller/dispatch.py): a 503 proves it
never started, and `refused()` puts it back in line, where the caller's thread takes it.

The endpoint and the thread count are the worker side's (_worker/endpoint.py and threads.py);
the top level hands them over, so this module sees them only through the protocols below.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .._exceptions import WorkerError
from .._wire import Response
from .http import Body

if TYPE_CHECKING:
    import concurrent.futures

    from .http import Client

T = TypeVar("T")

INLINE = "inline:"  # the lane of the caller's own thread


class Endpoint(Protocol):
    """The app's own worker endpoint, which runs chunks in this process."""

    def accept(self, method: str, headers: Mapping[str, str], body: bytes) -> object:
        """A job to `run`, or the Response that refuses the request."""

    def run(self, job: Any) -> Response: ...


class Threads(Protocol):
    """The request threads of the server process this call is made in."""

    def try_send(self) -> bool: ...
    def sent_done(self) -> None: ...
    def enter_parent(self, url: str, check: bool = True) -> None: ...
    def leave_parent(self) -> None: ...


@dataclass
class _Sent:
    """A chunk in flight over HTTP to self: its signed bytes, for a reclaim."""

    data: bytes
    headers: dict[str, str]
    claimed: asyncio.Future[None]  # the caller's thread claimed its id: it runs inline
    result: asyncio.Future[Response]
    open: bool = True  # still reclaimable (guarded by SharedCall._lock)
    tried: bool = False  # the caller's thread presented it to its endpoint
    taken: bool = False  # ...which accepted it: it runs inline (the server's copy gets 409)


@dataclass
class _Job:
    """Work for the caller's thread: run `data` through the endpoint."""

    data: bytes
    headers: dict[str, str]
    result: asyncio.Future[Response]
    sent: _Sent | None = None  # a reclaim of this chunk sent over HTTP


@dataclass
class SharedCall:
    """One server-context call's lanes: HTTP to self (bounded by `threads`) and the caller's
    own thread (`work`). Loop-side methods run on the dispatcher's loop."""

    endpoint: Endpoint
    threads: Threads
    reclaim: bool  # may the caller's thread claim chunks already sent (see the docstring)
    url: str = ""  # the app's own worker route
    parent: bool = False  # made from a request handler (not a chunk, not inside another call)
    _admitted: bool = False  # its first wait passed enter_parent's check
    _loop: asyncio.AbstractEventLoop | None = None
    _waiters: collections.deque[asyncio.Future[str]] = field(default_factory=collections.deque)
    _queued: bool = False  # in its process's turns for an HTTP lane (_turns)
    _asked: bool = False  # the caller's thread wants work and none was pending (loop side)
    _jobs: collections.deque[_Job] = field(default_factory=collections.deque)
    _sent: list[_Sent] = field(default_factory=list)
    _lock: threading.Condition = field(default_factory=threading.Condition)
    inline_runs: int = 0  # chunks the caller's thread ran (statistics, tests)
    reclaims: int = 0

    # -- loop side -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lane(self, url: str, inline: bool = False) -> AsyncIterator[str]:
        """Wait for a lane for one attempt of one chunk: `url` (HTTP to self) or INLINE."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._notify()  # the caller's thread can now ask for work
        chosen = await self._take(url, inline)
        try:
            yield chosen
        finally:
            if chosen != INLINE:
                self.threads.sent_done()
                self._wake(url)

    async def _take(self, url: str, inline: bool) -> str:
        if self._asked:
            self._asked = False
            return INLINE
        turns = _turns.setdefault(self.threads, collections.deque())
        if not inline and not turns and self.threads.try_send():
            return url  # no other call waits for a lane: no turn to take
        self.url = self.url or url
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if not inline:
            if not self._queued:
                self._queued = True
                turns.append(self)
            _hand_out(self.threads)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a lane as we were cancelled
                if waiter.result() == INLINE:
                    self._offer()
                else:
                    self.threads.sent_done()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _wake(self, url: str) -> None:
        """An HTTP slot was freed: hand it to the next call in turn, if the process has one."""
        _hand_out(self.threads)

    def _offer(self) -> None:
        """The caller's thread is free: give it the next waiting chunk, else a reclaim."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(INLINE)
                return
        self._asked = True
        with self._lock:
            candidates = [s for s in self._sent if s.open and not s.tried] if self.reclaim else []
        if candidates:
            self._asked = False
            loop = asyncio.get_running_loop()
            for sent in candidates:  # oldest first: the most likely to be stuck in a queue
                self._push(_Job(sent.data, sent.headers, loop.create_future(), sent))

    def refused(self, exc: WorkerError) -> bool:
        """Whether a refusal of a chunk sent to self means it never started, so the caller's
        thread may run it: a 503 (a worker answers every 503 before the chunk runs), where
        a second run is allowed anyway (`reclaim`)."""
        return exc.status == 503 and self.reclaim

    async def post(
        self,
        lane: str,
        http: Client,
        body: Body,
        headers: Mapping[str, str],
        timeout: float,
        fresh: bool = False,
    ) -> Response:
        """Post one signed chunk on the lane it got (`fresh`: on a new connection)."""
        loop = asyncio.get_running_loop()
        lowered = {k.lower(): v for k, v in headers.items()}
        if lane == INLINE:
            result: asyncio.Future[Response] = loop.create_future()
            self._push(_Job(body.take(), lowered, result))
            return await result  # no timeout: it runs on the caller's own thread
        data = body.take()
        sent = _Sent(data, lowered, loop.create_future(), loop.create_future())
        with self._lock:
            self._sent.append(sent)
        request = asyncio.ensure_future(http.post(lane, Body(data), headers, timeout, fresh=fresh))
        try:
            either: set[asyncio.Future[Any]] = {request, sent.claimed}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            with self._lock:
                sent.open = False
                self._sent.remove(sent)
                taken = sent.taken
            if taken:  # it runs here; the server refuses its copy (409)
                request.cancel()
                return await sent.result
            return request.result()
        finally:
            request.cancel()

    def _push(self, job: _Job) -> None:
        with self._lock:
            self._jobs.append(job)
            self._lock.notify_all()

    # -- the caller's thread ---------------------------------------------------------------

    def work(self, future: concurrent.futures.Future[T]) -> T:
        """Wait for `future` (the call, on the loop) running this call's chunks meanwhile."""
        future.add_done_callback(lambda _: self._notify())
        asked = False
        while not future.done():
            with self._lock:
                if not self._jobs and not future.done():
                    if not asked and self._loop is not None:
                        self._loop.call_soon_threadsafe(self._offer)
                        asked = True
                    self._lock.wait(0.05 if self._loop is None else None)
                job = self._jobs.popleft() if self._jobs else None
            if job is not None:
                self._run(job)
                asked = False
        return future.result()

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _run(self, job: _Job) -> None:
        loop = self._loop
        assert loop is not None
        if job.sent is not None:
            with self._lock:  # against the HTTP answer arriving at the same time
                if not job.sent.open:
                    return
                accepted = self.endpoint.accept("POST", job.headers, job.data)
                job.sent.tried = True
                if not isinstance(accepted, Response):
                    job.sent.open, job.sent.taken = False, True
                    loop.call_soon_threadsafe(_resolve, job.sent.claimed, None)
            if isinstance(accepted, Response):  # 409: it started elsewhere; leave it
                return
            self.reclaims += 1
            target = job.sent.result
        else:
            accepted = self.endpoint.accept("POST", job.headers, job.data)
            target = job.result
        self.inline_runs += 1
        try:
            answer = accepted if isinstance(accepted, Response) else self.endpoint.run(accepted)
        except Exception as exc:  # the endpoint answers every failure; this is a bug's path
            loop.call_soon_threadsafe(_fail, target, exc)
            return
        loop.call_soon_threadsafe(_resolve, target, answer)


# The calls of this process waiting for an HTTP lane to self, per server process: a lane that
# frees goes to them in turn. Each call used to wake only its own waiters, so the first call
# held every lane and the later ones ran all their chunks on their own threads (6 parents of
# 400 x 50 ms under gunicorn gthread: one took 3.1 s, five 20.2 s, the serial time). Loop side.
_turns: weakref.WeakKeyDictionary[Threads, collections.deque[SharedCall]] = (
    weakref.WeakKeyDictionary()
)


def _hand_out(threads: Threads) -> None:
    """Give the process's free HTTP lanes to the waiting calls, one chunk per call in turn."""
    turns = _turns.get(threads)
    while turns:
        call = turns[0]
        waiters = call._waiters
        while waiters and waiters[0].done():  # cancelled, or taken by the caller's thread
            waiters.popleft()
        if not waiters:
            turns.popleft()
            call._queued = False
            continue
        if not threads.try_send():
            return
        turns.rotate(-1)
        waiters.popleft().set_result(call.url)


def _fail(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


_waiting = threading.local()  # whether this thread already waits on a server-context call


def run_shared(shared: SharedCall | None, submit: Callable[[], concurrent.futures.Future[T]]) -> T:
    """Wait for a call's future; a server-context call's thread works meanwhile."""
    if shared is None:
        future = submit()
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise
    # a call from a request handler counts against the app's threads; one made inside a
    # chunk this thread runs for its own call (or inside a worker's chunk) does not
    parent = shared.parent and not getattr(_waiting, "depth", 0)
    if parent:
        shared.threads.enter_parent(shared.url, check=not shared._admitted)
        shared._admitted = True
    _waiting.depth = getattr(_waiting, "depth", 0) + 1
    try:
        future = submit()
        try:
            return shared.work(future)
        except BaseException:
            future.cancel()
            raise
    finally:
        _waiting.depth -= 1
        if parent:
            shared.threads.leave_parent()
