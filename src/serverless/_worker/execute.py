"""Running an admitted chunk: its stages (a fused call), whole or item by item, and the reply.

The work is written once, as a generator (`Runner.work`) that runs the user's functions and
asks its driver only to wait: it yields seconds to sleep (a paced chunk) or an awaitable to
resolve (an async function's coroutine), and is sent the result or thrown the exception. A
sync driver in a thread (`drive`) and an async one on the event loop (`drive_async`) are a
few lines each, so the two paths cannot drift apart (h11's one state machine, thin drivers).
A sync chunk with no pace yields nothing: it costs what a plain loop costs.

The clock is injected (`perf_counter` by default): timings, pacing and the memory of
throttled calls read it, and nothing here does I/O but through the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import _registry
from .. import _wire as p
from .._exceptions import SerializationError, Throttled
from .._wire import Response
from .._wire.values import Mismatch, wire_results
from .pacing import Arrivals, Turns

logger = logging.getLogger("serverless.worker")

MAX_THROTTLED_CALLS = 1024  # calls whose throttles a worker remembers (the newest)
LATE_STOP = "the chunk's turns passed before these items could start"
GONE_STOP = "the caller went away"

# What the work asks its driver for: seconds to sleep, or an awaitable to resolve.
Wait = float | Awaitable[Any]
Work = Generator[Wait, Any, Response]


@dataclass
class Job:
    """An authenticated, decoded chunk, ready to run."""

    call: p.Call
    entry: _registry.Entry
    bind: _registry.Bind
    fmt: str
    received: float = field(default_factory=time.perf_counter)
    kid: str = ""  # the key that signed the request: it signs the answer
    # further stages of a fused call, each run on the previous stage's results
    then: list[tuple[_registry.Entry, _registry.Bind]] = field(default_factory=list)
    capacity: int | None = None  # chunks of sync functions the adapter runs at once (a Reply's)
    # whether the caller went away (its connection closed: Ctrl-C, a cancelled call, a closed
    # stream), where the adapter can tell: an item-by-item chunk stops before its next item,
    # and a chunk not yet started never starts. Read from the thread that runs the chunk.
    gone: Callable[[], bool] = field(default=lambda: False)  # False: nothing tells
    span: Any = None  # its OpenTelemetry span while it runs, where traced (telemetry.py)

    @property
    def itemwise(self) -> bool:
        """Run item by item: each error kept in place (isolate), or each item in its turn."""
        return self.call.isolate or self.call.pace is not None

    @property
    def is_async(self) -> bool:
        """Run on the server's event loop only if no stage blocks."""
        return self.entry.is_async and all(entry.is_async for entry, _ in self.then)


# The endpoint's: encode and sign the answer to a job (raises SerializationError where the
# reply cannot be encoded).
Sign = Callable[[int, p.Reply, Job], Response]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Tracked(list[Any]):
    """The chunk as the user's function sees it: a list that remembers where iteration is,
    so an exception can name the item being processed.

    It hands out the native list iterator (a Python generator here cost 63 ns per item, more
    than decoding the chunk) and reads the position from it only when something failed: a
    list iterator's __reduce__ gives the index of the next item, or no index once exhausted.
    """

    _iterator: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        self._iterator = list.__iter__(self)
        return self._iterator

    def failing_index(self) -> int | None:
        if self._iterator is None:
            return None
        state = self._iterator.__reduce__()
        if len(state) < 3 or not state[2]:  # exhausted, or not started
            return None
        return int(state[2]) - 1


class Throttles:
    """The calls (a Call's group) one of whose items was throttled here: when, and until when
    the downstream asked to be left alone (docs/protocol.md §6.3). The call's other chunks on
    this worker stop before their next item, which would most likely be refused too."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, tuple[float, float | None]] = {}

    def note(self, group: str, retry_after: float | None) -> None:
        now = self._clock()
        until = None if retry_after is None else now + retry_after
        with self._lock:
            self._calls.pop(group, None)
            self._calls[group] = (now, until)
            if len(self._calls) > MAX_THROTTLED_CALLS:  # the oldest call goes
                del self._calls[next(iter(self._calls))]

    def stop(self, call: p.Call, started: float, index: int) -> p.Throttle | None:
        """A throttle without a refusal: another chunk of this call was throttled here since
        this one started, so its next item would most likely be refused too."""
        if not call.group:
            return None
        seen = self._calls.get(call.group)  # one dict read: atomic under the GIL
        if seen is None or seen[0] < started:
            return None
        until = seen[1]
        wait = None if until is None else max(0.0, until - self._clock())
        message = "another chunk of the call was throttled"
        return p.Throttle(at=index, retry_after=wait, message=message, ran=index, stopped=True)


class Runner:
    """Runs jobs and builds their replies, signed through `sign`."""

    def __init__(self, sign: Sign, clock: Callable[[], float] = time.perf_counter) -> None:
        self._sign = sign
        self._clock = clock
        self.throttles = Throttles(clock)
        self.arrivals = Arrivals(clock)

    def run(self, job: Job) -> Response:
        """Run a chunk in this thread; one with an async stage gets its own event loop."""
        if job.entry.is_async or any(entry.is_async for entry, _ in job.then):
            return asyncio.run(self.run_async(job))
        return drive(self.work(job))

    async def run_async(self, job: Job) -> Response:
        """Run a chunk on this event loop."""
        return await drive_async(self.work(job))

    def work(self, job: Job) -> Work:
        """The chunk's work, for a driver: item by item (Call.isolate, Call.pace), or whole."""
        return self._itemwise(job) if job.itemwise else self._whole(job)

    def _whole(self, job: Job) -> Work:
        """Every stage on the whole chunk, each on the previous stage's results."""
        clock = self._clock
        started = clock()
        figures: list[p.StageFigures] = []
        items = _Tracked(job.call.items)
        args, kwargs = job.call.args, job.call.kwargs
        stage = 0
        results: list[Any] = []
        states = [job.call.state, *(later.state for later in job.call.then)]
        try:
            for stage, (entry, bind) in enumerate([(job.entry, job.bind), *job.then]):
                stage_started = clock()
                if stage:
                    items, args, kwargs = _Tracked(results), [], {}
                result = entry.bound(bind, states[stage])(items, *args, **kwargs)
                if entry.is_async:
                    result = yield result
                results = _as_list(result)
                figures.append(p.StageFigures(len(results), clock() - stage_started))
        except _ResultError as exc:
            return self._failure(job, "result", exc.__cause__ or exc, None, started, stage)
        except Throttled as exc:  # the whole chunk goes again: its results so far are lost
            return self._throttled(job, [], [], 0, exc, started, _ran(items))
        except BaseException as exc:  # sys.exit(), KeyboardInterrupt... are the user's too
            if not users_exit(exc):
                raise
            return self._failure(job, "user", exc, _at(items), started, stage)
        return self._success(job, results, started, figures)

    def _itemwise(self, job: Job) -> Work:
        """Each item on its own, started at most one per `pace` seconds, so that one item's
        error costs no other item a second run (isolate: each error in the reply,
        docs/protocol.md §6.2) and a throttle stops the chunk with the results so far (§6.3).
        A fused call never runs item by item (the endpoint refuses it)."""
        clock, stop = self._clock, self.throttles.stop
        started = clock()
        call, is_async = job.call, job.entry.is_async
        try:  # the receiver, rebuilt once for the chunk: its __new__ or __setstate__ may raise
            function = job.entry.bound(job.bind, call.state)
        except BaseException as exc:
            if not users_exit(exc):
                raise
            return self._failure(job, "user", exc, None, started)
        results: list[Any] = []
        errors: list[p.ItemError] = []
        turns, waited = None, 0.0  # waited: for turns, not computing (the Reply's compute_s)
        if call.pace:  # each item in its turn, never a burst of overdue ones (pacing.py)
            late = 0.0
            if call.slot is not None and call.group:
                late = self.arrivals.lateness(call.group, call.slot)
            turns = Turns(started - late, call.pace, len(call.items))
        for index, item in enumerate(call.items):
            if turns is not None:
                wait = turns.wait(clock())
                if wait is None:  # its turns have passed: the caller grants new ones
                    rest = p.Throttle(at=index, message=LATE_STOP, ran=index, stopped=True)
                    return self._reply_throttled(job, results, errors, rest, started, waited)
                if wait > 0:
                    before = clock()
                    yield wait
                    waited += clock() - before
            stopped = stop(call, started, index)
            if stopped is None and job.gone():  # nobody reads the answer: it says why
                stopped = p.Throttle(at=index, message=GONE_STOP, ran=index, stopped=True)
            if stopped is not None:
                return self._reply_throttled(job, results, errors, stopped, started, waited)
            try:
                result = function(_Tracked([item]), *call.args, **call.kwargs)
                if is_async:
                    result = yield result
                results += _as_list(result)
            except BaseException as exc:
                if not users_exit(exc):
                    raise
                answer = self._item_failed(job, exc, index, item, results, errors, started, waited)
                if answer is not None:
                    return answer
        isolated = errors if call.isolate else None
        return self._success(job, results, started, [], isolated, waited=waited)

    def _item_failed(
        self,
        job: Job,
        exc: BaseException,
        index: int,
        item: Any,
        results: list[Any],
        errors: list[p.ItemError],
        started: float,
        waited: float,
    ) -> Response | None:
        """Item `index` of an item-by-item run raised: the answer that ends the chunk, or
        None where the run goes on (isolated: its error is kept in place)."""
        if isinstance(exc, _ResultError):
            return self._failure(job, "result", exc.__cause__ or exc, None, started)
        if isinstance(exc, Throttled):
            return self._throttled(job, results, errors, index, exc, started, waited=waited)
        if not job.call.isolate:
            return self._failure(job, "user", exc, (index, item), started)
        errors.append(p.ItemError(index, len(results), _error_info(exc, index, item)))
        return None

    def _throttled(
        self,
        job: Job,
        results: list[Any],
        errors: list[p.ItemError],
        at: int,
        exc: Throttled,
        started: float,
        ran: int | None = None,
        waited: float = 0.0,
    ) -> Response:
        """The function said the downstream refused item `at`: the results so far, and the
        point from which the caller sends the chunk again."""
        ran = at if ran is None else ran
        message = _text(exc)
        throttle = p.Throttle(at=at, retry_after=exc.retry_after, message=message, ran=ran)
        if job.call.group:  # the call's other chunks here stop at their next item
            self.throttles.note(job.call.group, exc.retry_after)
        return self._reply_throttled(job, results, errors, throttle, started, waited)

    def _reply_throttled(
        self,
        job: Job,
        results: list[Any],
        errors: list[p.ItemError],
        throttle: p.Throttle,
        started: float,
        waited: float = 0.0,
    ) -> Response:
        isolated = errors if job.call.isolate else None
        return self._success(job, results, started, [], isolated, throttle, waited)

    def _success(
        self,
        job: Job,
        results: list[Any],
        started: float,
        figures: list[p.StageFigures],
        item_errors: list[p.ItemError] | None = None,
        throttled: p.Throttle | None = None,
        waited: float = 0.0,
    ) -> Response:
        """The results, signed; `waited`: seconds of a paced chunk spent waiting for its
        items' turns, which its compute_s leaves out."""
        entry, bind = job.then[-1] if job.then else (job.entry, job.bind)
        try:  # untyped results: built-in types as extension types (the reply's format allowing)
            sent = wire_results(entry.shape(bind), results, job.fmt)
        except SerializationError as exc:  # nested too deep to check, or to encode
            return self._failure(job, "result", exc, None, started, len(job.then))
        if isinstance(sent, Mismatch):  # untyped results that would not arrive as returned
            error = p.ErrorInfo(
                kind="result",
                type="SerializationError",
                message=sent.message,
                index=sent.index,
                item=_short_repr(results[sent.index]) if sent.index is not None else None,
                stage=len(job.then),
            )
            reply = p.Reply(
                v=p.VERSION,
                worker=worker_id(),
                error=error,
                queue_s=started - job.received,
                compute_s=self._clock() - started,
            )
            return self._sign(500, reply, job)
        done = self._clock()
        reply = p.Reply(
            v=p.VERSION,
            worker=worker_id(),
            results=sent,
            queue_s=started - job.received,
            compute_s=done - started - waited,
            stages=figures if job.then else None,
            item_errors=item_errors,
            capacity=job.capacity,
            throttled=throttled,
        )
        try:
            return self._sign(200, reply, job)
        except SerializationError as exc:
            return self._failure(job, "result", exc, None, started)

    def _failure(
        self,
        job: Job,
        kind: str,
        exc: BaseException,
        at: tuple[int, Any] | None,
        started: float,
        stage: int = 0,
    ) -> Response:
        """A failed chunk; `at`: the item being processed when it failed (index, item)."""
        index, item = at if at is not None else (None, _NONE)
        error = _error_info(exc, index, item, kind)
        error.stage = stage
        logger.debug("%s failed on %s: %s", job.entry.name, worker_id(), error.traceback)
        reply = p.Reply(
            v=p.VERSION,
            worker=worker_id(),
            error=error,
            queue_s=started - job.received,
            compute_s=self._clock() - started,
            capacity=job.capacity,
        )
        return self._sign(500, reply, job)


def drive(work: Work) -> Response:
    """Drive the work in this thread: it may only ask to sleep (no stage is async)."""
    try:
        wait = next(work)
        while True:
            if not isinstance(wait, int | float):
                raise TypeError("an async stage needs drive_async")
            time.sleep(wait)
            wait = work.send(None)
    except StopIteration as done:
        response: Response = done.value
        return response


async def drive_async(work: Work) -> Response:
    """Drive the work on this event loop: sleeps and awaits here, the function's exceptions
    back into the work, where they are judged as in a sync run.

    A cancellation of this task (its client gone, the server shutting down) is not the
    function's: the work is abandoned and the cancellation goes on. A CancelledError the
    function raised of its own, with no cancellation pending, is its error (Python 3.10
    cannot tell the two apart: there every CancelledError is taken as a cancellation)."""
    task = asyncio.current_task()
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            wait = work.send(value) if error is None else work.throw(error)
            value, error = None, None
            try:
                if isinstance(wait, int | float):
                    await asyncio.sleep(wait)
                else:
                    value = await wait
            except BaseException as exc:
                if _cancelled(task, exc) or not users_exit(exc):
                    _abandon(work)
                    raise
                error = exc
    except StopIteration as done:
        response: Response = done.value
        return response


def _cancelled(task: asyncio.Task[Any] | None, exc: BaseException) -> bool:
    """Whether `exc` left an await because the driving task was cancelled."""
    cancelling = getattr(task, "cancelling", None)
    if cancelling is None:  # Python 3.10
        return isinstance(exc, asyncio.CancelledError)
    return bool(cancelling())


class _Abandoned(BaseException):
    """Thrown into a work whose driver stops driving it: not the user's, so not answered."""


def _abandon(work: Work) -> None:
    with contextlib.suppress(_Abandoned, StopIteration):
        work.throw(_Abandoned())
    work.close()


def users_exit(exc: BaseException) -> bool:
    """Whether an exception that left the user's code is the user's, answered as a failed
    chunk, or the process's, which goes on (the worker's own way out, or a signal: Ctrl-C,
    a server's shutdown handler). Every Exception is the user's, and so is every exit in a
    thread other than the main one, where no signal is delivered. In the main thread, an
    exit raised through a signal handler (its frame in the traceback) is the process's, and
    so is a KeyboardInterrupt under Python's default Ctrl-C handler, which leaves no frame:
    there a Ctrl-C must stop the server, and a function's own KeyboardInterrupt cannot be
    told from it."""
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, _Abandoned):
        return False
    if threading.current_thread() is not threading.main_thread():
        return True
    default_ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if isinstance(exc, KeyboardInterrupt) and default_ctrl_c:
        return False
    handlers = set()
    for signum in signal.valid_signals():
        with contextlib.suppress(ValueError, OSError):
            code = getattr(signal.getsignal(signum), "__code__", None)
            if code is not None:
                handlers.add(code)
    frames = traceback.walk_tb(exc.__traceback__)
    return not any(frame.f_code in handlers for frame, _ in frames)


_NONE: Any = object()  # no item to name


def _at(items: _Tracked) -> tuple[int, Any] | None:
    """The item the function was processing when it raised, if it was iterating."""
    index = items.failing_index()
    return None if index is None else (index, items[index])


def _ran(items: _Tracked) -> int:
    """Items a whole-chunk call had finished when it raised (0 if it was not iterating)."""
    index = items.failing_index()
    return 0 if index is None else index


def _short_repr(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a user's type whose repr() raises
        text = f"<repr() raised {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(exc: BaseException) -> str:
    """str(exc), which a user's exception may make raise."""
    try:
        return str(exc)
    except Exception as failed:
        return f"<str() raised {type(failed).__name__}>"


def _error_info(
    exc: BaseException, index: int | None, item: Any, kind: str = "user"
) -> p.ErrorInfo:
    """The structured form of an exception the function raised on item `index`."""
    return p.ErrorInfo(
        kind=kind,
        type=type(exc).__name__,
        message=_text(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        index=index,
        item=None if item is _NONE else _short_repr(item),
        status=_http_status(exc),
    )


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status that an exception of a common HTTP client carries, found by its
    attributes without importing the client: urllib's `code`, aiohttp's `status`, requests'
    and httpx's `response.status_code`. The caller names the fix for a 429 (RemoteError)."""
    for owner in (exc, getattr(exc, "response", None)):
        for name in ("status_code", "status", "code"):
            try:
                value = getattr(owner, name, None)
            except Exception:  # a user's property that raises
                continue
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600:
                return value
    return None


class _ResultError(Exception):
    """The function returned something that is not a list of results."""


def _as_list(result: Any) -> list[Any]:
    if isinstance(result, list):
        return list(result) if isinstance(result, _Tracked) else result
    if isinstance(result, str | bytes | bytearray | dict) or not hasattr(result, "__iter__"):
        error = TypeError(f"the function must return a list, not {type(result).__name__}")
        raise _ResultError() from error
    return list(result)  # tuples, filter(), map(), generators (their errors are the user's)
