"""The worker's sans-I/O core: (method, path, headers, body) -> Response.

Checks run in the order of docs/protocol.md, cheapest and safest first, and nothing is decoded
before the signature checks out. The WSGI and ASGI adapters only move bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import _registry
from .._exceptions import SerializationError, Throttled
from .._wire import protocol as p
from .._wire.bounds import MAX_CONTAINERS, too_many_containers
from .._wire.protocol import Response
from .._wire.values import Mismatch, inexact_result
from .admission import MAX_FUNCTION, REQUEST_ID, Budget, known_signature, process_budget
from .origin import OriginPolicy
from .replay import ReplayGuard

logger = logging.getLogger("serverless.worker")


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

    @property
    def is_async(self) -> bool:
        """Run on the server's event loop only if no stage blocks."""
        return self.entry.is_async and all(entry.is_async for entry, _ in self.then)


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


def _text(value: str) -> str | None:
    """A header value as text: servers hand headers over as Latin-1, the caller sends UTF-8
    (a function may be called `квадрат`); None if it is not UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeEncodeError:
        return value  # already text (an in-process transport)
    except UnicodeDecodeError:
        return None


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Head:
    """A request whose headers passed every check that needs no body."""

    method: str
    function: str
    timestamp: str
    request_id: str
    signature: str
    content_type: str | None
    fmt: str
    length: int
    kid: str = ""  # the key that signed it, once authenticated: it signs the answer


class Endpoint:
    """Authenticates, decodes and runs chunks for the functions in the registry.

    Three phases, so the adapters read a body only when its headers justify it: check_head
    (no body), authenticate (the body's SHA-256, hashed as it arrived), admit (decode).
    """

    def __init__(
        self,
        route: str,
        keyring: p.Keyring,
        *,
        max_body: int = p.MAX_BODY,
        tolerance: float = p.TOLERANCE,
        importable: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
        origins: OriginPolicy | None = None,
        shared_replay: bool = True,
        max_containers: int = MAX_CONTAINERS,
        budget: Budget | None = None,
    ) -> None:
        self.route = route
        self.keyring = keyring
        self.max_body = max_body
        self.tolerance = tolerance
        # Only the local pool: modules its parent announced on a private channel, never
        # whatever a request names (docs/protocol.md section 5).
        self.importable = importable
        self.origins = origins if origins is not None else OriginPolicy.configured()
        self.max_containers = max_containers
        self.budget = budget if budget is not None else process_budget()
        # a body of max_body bytes must fit, or a legitimate chunk could never be read
        self.budget.limit = max(self.budget.limit, max_body)
        self._clock = clock
        self._replays = ReplayGuard(tolerance, shared=shared_replay)
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}  # chunks running now, by token: their deadline
        # calls (a Call's group) one of whose items was throttled here: when, and until when
        # the downstream asked to be left alone (§6.3)
        self._throttled_calls: dict[str, tuple[float, float | None]] = {}

    # -- responses -------------------------------------------------------------------------

    def reject(
        self,
        status: int,
        message: str,
        fmt: str = p.MSGPACK,
        *,
        close: bool = False,
        head: Head | None = None,
    ) -> Response:
        """A refusal. It names no worker: an anonymous client learns nothing about the host.
        close: the body was not read, so the connection cannot carry another request.
        head: the request, once authenticated: the refusal is then signed for its caller."""
        error = p.ErrorInfo(kind="rejected", type=f"HTTP{status}", message=message)
        signer = (head.kid, head.request_id) if head is not None and head.kid else None
        response = self._reply(status, p.Reply(v=p.VERSION, error=error), fmt, signer)
        if close:
            response.headers["connection"] = "close"
        if status == 503:
            response.headers["retry-after"] = "1"
        return response

    def _reply(
        self, status: int, reply: p.Reply, fmt: str, signer: tuple[str, str] | None = None
    ) -> Response:
        """The answer's bytes; signed when `signer` (key id, request id) names the request it
        answers, so that its caller can tell it from a forgery."""
        try:
            body = p.encode(reply, fmt)
        except RecursionError as exc:  # msgspec on a result nested too deep
            raise SerializationError(f"cannot encode for the wire: {exc}") from exc
        headers = {"content-type": fmt, "content-length": str(len(body))}
        if signer is not None:
            kid, request_id = signer
            message = p.reply_signing_message(status, request_id, body)
            headers[p.H_REPLY_SIGNATURE] = self.keyring.sign(message, kid)
        return Response(status, headers, body)

    # -- authentication and decoding -------------------------------------------------------

    def accept(self, method: str, headers: Mapping[str, str], body: bytes) -> Job | Response:
        """All three phases on a body already in memory (in-process transports, tests).

        `headers` must have lower-case names.
        """
        head = self.check_head(method, headers, len(body))
        if isinstance(head, Response):
            return head
        refused = self.authenticate(head, hashlib.sha256(body).hexdigest())
        return refused if refused is not None else self.admit(head, body)

    async def answer(
        self, headers: Mapping[str, str], body: bytes, threads: Executor, capacity: int
    ) -> Response:
        """A request whose body is in memory, answered as a server would (the in-process
        transport): accept, then run, a sync chunk in `threads`, of which there are
        `capacity`, an async one on this loop. `headers` must have lower-case names."""
        job = self.accept("POST", headers, body)
        if not isinstance(job, Job):
            return job
        if job.is_async:
            return await self.run_async(job)
        job.capacity = capacity
        return await asyncio.get_running_loop().run_in_executor(threads, self.run, job)

    def check_head(
        self, method: str, headers: Mapping[str, str], length: int | None
    ) -> Head | Response:
        """Every check that needs no body, cheapest first; `length` is the declared
        Content-Length (None if absent). Refusals here close the connection."""
        fmt = p.media_type(headers.get("accept")) or p.media_type(headers.get("content-type"))
        fmt = fmt or p.MSGPACK
        if length is not None and length > self.max_body:
            message = f"body of {length} bytes exceeds {self.max_body}"
            return self.reject(413, message, fmt, close=True)
        if method != "POST":
            return self.reject(405, "only POST is allowed", fmt, close=True)
        if length is None:
            return self.reject(411, "a Content-Length header is required", fmt, close=True)
        if headers.get(p.H_VERSION) != str(p.VERSION):
            message = (
                f"this worker speaks wire protocol v{p.VERSION}; the request's "
                f"{p.H_VERSION} header is {headers.get(p.H_VERSION)!r}"
            )
            return self.reject(400, message, fmt, close=True)
        timestamp = headers.get(p.H_TIMESTAMP, "")
        try:
            skew = abs(self._clock() - float(timestamp))
        except ValueError:
            return self.reject(401, "missing or malformed timestamp", fmt, close=True)
        if not skew <= self.tolerance:  # also false for NaN
            return self.reject(401, "timestamp outside the tolerance window", fmt, close=True)
        signature = headers.get(p.H_SIGNATURE, "")
        known = known_signature(signature, self.keyring.key_ids)
        if known is None:
            return self.reject(401, "malformed signature header", fmt, close=True)
        if not known:
            return self.reject(401, "no signature with a known key id", fmt, close=True)
        request_id = headers.get(p.H_REQUEST_ID, "")
        if REQUEST_ID.fullmatch(request_id) is None:
            message = "the request id must be 32 lower-case hex digits"
            return self.reject(400, message, fmt, close=True)
        function = _text(headers.get(p.H_FUNCTION, ""))
        if function is None or len(function) > MAX_FUNCTION:
            message = f"{p.H_FUNCTION} must be UTF-8, at most {MAX_FUNCTION} characters"
            return self.reject(400, message, fmt, close=True)
        content_type = headers.get("content-type")
        return Head(method, function, timestamp, request_id, signature, content_type, fmt, length)

    def authenticate(self, head: Head, digest: str) -> Response | None:
        """The signature over the body's SHA-256, then the request id's first use."""
        message = p.signing_message(
            head.method, self.route, head.function, head.timestamp, head.request_id, digest
        )
        verdict = self.keyring.verify(message, head.signature)
        if not isinstance(verdict, str):  # None cannot happen after check_head; refuse it too
            return self.reject(401, "bad signature", head.fmt)
        head.kid = verdict  # from now on, every answer is signed with this key
        fresh = self._replays.add(head.request_id, self._clock())
        if fresh is None:
            return self.reject(503, "replay protection unavailable", head.fmt, head=head)
        if not fresh:
            return self.reject(409, "request id already used", head.fmt, head=head)
        return None

    def admit(self, head: Head, body: bytes) -> Job | Response:
        """Decode an authenticated body into a Job."""
        fmt, function, request_id = head.fmt, head.function, head.request_id
        names = function.split(p.STAGE_SEPARATOR)
        entries = [self._lookup(name) for name in names]
        for name, found in zip(names, entries, strict=True):
            if found is None:
                return self.reject(
                    404, f"function {name!r} is not registered on this worker", fmt, head=head
                )
        content_fmt = p.media_type(head.content_type)
        if content_fmt is None:
            return self.reject(415, f"content type must be {p.MSGPACK} or {p.JSON}", fmt, head=head)
        if too_many_containers(body, content_fmt == p.JSON, self.max_containers):
            message = f"the envelope holds more than {self.max_containers} lists and maps"
            return self.reject(413, message, fmt, head=head)
        try:
            wire = p.decode_wire_call(body, content_fmt)
        # msgspec raises UnicodeDecodeError (a ValueError) on invalid UTF-8 and RecursionError
        # on absurd nesting, besides its own DecodeError: all are the sender's fault.
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:
            return self.reject(
                400, f"malformed envelope: {type(exc).__name__}: {exc}", fmt, head=head
            )
        if wire.v != p.VERSION or wire.fn != function or wire.id != request_id:
            return self.reject(400, "envelope does not match the signed headers", fmt, head=head)
        if [stage.fn for stage in wire.then] != names[1:]:
            return self.reject(
                400, "envelope stages do not match the signed function", fmt, head=head
            )
        if (wire.isolate or wire.pace is not None) and wire.then:  # items run one by one
            return self.reject(400, "a fused call cannot run item by item", fmt, head=head)
        if wire.pace is not None and not 0 <= wire.pace <= p.MAX_PACE:
            return self.reject(400, f"pace must be in [0, {p.MAX_PACE}]s", fmt, head=head)
        binds = [wire.bind] + [stage.bind for stage in wire.then]
        stages: list[tuple[_registry.Entry, _registry.Bind]] = []
        for name, found, wire_bind in zip(names, entries, binds, strict=True):
            assert found is not None
            bind = _registry.as_bind(wire_bind)
            if bind is None or (bind and not found.owner_path):
                return self.reject(400, f"bad binding {wire_bind!r} for {name}", fmt, head=head)
            stages.append((found, bind))
        (entry, bind), then = stages[0], stages[1:]
        try:  # the values, into the types the first function's annotations give
            call = p.typed_call(wire, entry.shape(bind), content_fmt)
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:
            return self.reject(
                400, f"malformed envelope: {type(exc).__name__}: {exc}", fmt, head=head
            )
        if isinstance(call, Mismatch):
            error = p.ErrorInfo(
                kind="input", type="SerializationError", message=call.message, index=call.index
            )
            reply = p.Reply(v=p.VERSION, worker=worker_id(), error=error)
            return self._reply(422, reply, fmt, (head.kid, head.request_id))
        return Job(call=call, entry=entry, bind=bind, fmt=fmt, then=then, kid=head.kid)

    def _lookup(self, function: str) -> _registry.Entry | None:
        entry = _registry.lookup(function)
        module = function.partition(":")[0]
        if entry is None and self.importable is not None and self.importable(module):
            try:  # announced by our parent process, which registered a function there
                importlib.import_module(module)
            except Exception:
                logger.exception("cannot import %s", module)
                return None
            entry = _registry.lookup(function)
        return entry

    # -- running ---------------------------------------------------------------------------

    def late(self, job: Job, *, waited: bool) -> Response | None:
        """A signed refusal if the chunk must not start now: past its deadline (504,
        "expired": its caller has given up) or, if it waited here for a thread, past its
        start_by (503, "busy", with Retry-After: it may go elsewhere). A chunk that finds a
        thread free starts whatever its start_by says: it may have waited in a balancer's
        queue, and sending it back would only put it at the end. Nothing has run either way."""
        now = self._clock()
        call = job.call
        if call.deadline is not None and now > call.deadline:
            return self.refusal(
                job, 504, "expired", "the chunk's deadline passed before it started"
            )
        if waited and call.start_by is not None and now > call.start_by:
            return self.refusal(job, 503, "busy", "no thread could start the chunk in time")
        return None

    def refusal(self, job: Job, status: int, kind: str, message: str) -> Response:
        error = p.ErrorInfo(kind=kind, type=f"HTTP{status}", message=message)
        reply = p.Reply(v=p.VERSION, worker=worker_id(), error=error, capacity=job.capacity)
        response = self._reply(status, reply, job.fmt, (job.kid, job.call.id))
        if status == 503:
            response.headers["retry-after"] = "1"
        return response

    def stuck(self) -> int:
        """How many chunks are still running past their callers' deadlines."""
        now = self._clock()
        with self._lock:
            return sum(1 for deadline in self._running.values() if deadline < now)

    @contextlib.contextmanager
    def _tracked(self, job: Job) -> Iterator[None]:
        if job.call.deadline is None:
            yield
            return
        token = id(job)
        with self._lock:
            self._running[token] = job.call.deadline
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(token, None)

    def run(self, job: Job) -> Response:
        """Run a chunk in this thread (async functions get their own event loop), unless its
        caller no longer wants it."""
        refused = self.late(job, waited=False)
        if refused is not None:
            return refused
        with self._tracked(job):
            if job.entry.is_async or any(entry.is_async for entry, _ in job.then):
                return asyncio.run(self._run_async(job))
            if _itemwise(job.call):
                return self._run_itemwise(job)
            return self._run(job)

    def _run(self, job: Job) -> Response:
        started = time.perf_counter()
        figures: list[p.StageFigures] = []
        items = _Tracked(job.call.items)
        args, kwargs = job.call.args, job.call.kwargs
        stage = 0
        results: list[Any] = []
        try:
            for stage, (entry, bind) in enumerate([(job.entry, job.bind), *job.then]):
                stage_started = time.perf_counter()
                if stage:
                    items, args, kwargs = _Tracked(results), [], {}
                results = _as_list(entry.bound(bind)(items, *args, **kwargs))
                figures.append(p.StageFigures(len(results), time.perf_counter() - stage_started))
        except _ResultError as exc:
            return self._failure(job, "result", exc.__cause__ or exc, None, started, stage)
        except Throttled as exc:  # the whole chunk goes again: its results so far are lost
            return self._throttled(job, [], [], 0, exc, started, _ran(items))
        except Exception as exc:
            return self._failure(job, "user", exc, _at(items), started, stage)
        return self._success(job, results, started, figures)

    async def run_async(self, job: Job) -> Response:
        """Run a chunk on this event loop, unless its caller no longer wants it."""
        refused = self.late(job, waited=False)
        if refused is not None:
            return refused
        with self._tracked(job):
            return await self._run_async(job)

    # Item by item (Call.isolate, Call.pace): each item on its own, started at most one per
    # `pace` seconds, so that one item's error costs no other item a second run (isolate: each
    # error in the reply, docs/protocol.md §6.2) and a throttle stops the chunk with the
    # results so far (§6.3). The sync and async forms differ only in sleeping and awaiting.

    def _run_itemwise(self, job: Job) -> Response:
        started = time.perf_counter()
        function, call = job.entry.bound(job.bind), job.call
        results: list[Any] = []
        errors: list[p.ItemError] = []
        for index, item in enumerate(call.items):
            wait = _pause(call, started, index)
            if wait > 0:
                time.sleep(wait)
            stop = self._stop(call, started, index)
            if stop is not None:
                return self._reply_throttled(job, results, errors, stop, started)
            try:
                results += _as_list(function(_Tracked([item]), *call.args, **call.kwargs))
            except Exception as exc:
                answer = self._item_failed(job, exc, index, item, results, errors, started)
                if answer is not None:
                    return answer
        return self._success(job, results, started, [], errors if call.isolate else None)

    async def _run_itemwise_async(self, job: Job) -> Response:
        started = time.perf_counter()
        function, call = job.entry.bound(job.bind), job.call
        results: list[Any] = []
        errors: list[p.ItemError] = []
        for index, item in enumerate(call.items):
            wait = _pause(call, started, index)
            if wait > 0:
                await asyncio.sleep(wait)
            stop = self._stop(call, started, index)
            if stop is not None:
                return self._reply_throttled(job, results, errors, stop, started)
            try:
                result = function(_Tracked([item]), *call.args, **call.kwargs)
                results += _as_list(await result if job.entry.is_async else result)
            except Exception as exc:
                answer = self._item_failed(job, exc, index, item, results, errors, started)
                if answer is not None:
                    return answer
        return self._success(job, results, started, [], errors if call.isolate else None)

    async def _run_async(self, job: Job) -> Response:
        if _itemwise(job.call):
            return await self._run_itemwise_async(job)
        started = time.perf_counter()
        figures: list[p.StageFigures] = []
        items = _Tracked(job.call.items)
        args, kwargs = job.call.args, job.call.kwargs
        stage = 0
        results: list[Any] = []
        try:
            for stage, (entry, bind) in enumerate([(job.entry, job.bind), *job.then]):
                stage_started = time.perf_counter()
                if stage:
                    items, args, kwargs = _Tracked(results), [], {}
                result = entry.bound(bind)(items, *args, **kwargs)
                results = _as_list(await result if entry.is_async else result)
                figures.append(p.StageFigures(len(results), time.perf_counter() - stage_started))
        except _ResultError as exc:
            return self._failure(job, "result", exc.__cause__ or exc, None, started, stage)
        except Throttled as exc:
            return self._throttled(job, [], [], 0, exc, started, _ran(items))
        except Exception as exc:
            return self._failure(job, "user", exc, _at(items), started, stage)
        return self._success(job, results, started, figures)

    def _item_failed(
        self,
        job: Job,
        exc: Exception,
        index: int,
        item: Any,
        results: list[Any],
        errors: list[p.ItemError],
        started: float,
    ) -> Response | None:
        """Item `index` of an item-by-item run raised: the answer that ends the chunk, or
        None where the run goes on (isolated: its error is kept in place)."""
        if isinstance(exc, _ResultError):
            return self._failure(job, "result", exc.__cause__ or exc, None, started)
        if isinstance(exc, Throttled):
            return self._throttled(job, results, errors, index, exc, started)
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
    ) -> Response:
        """The function said the downstream refused item `at`: the results so far, and the
        point from which the caller sends the chunk again."""
        ran = at if ran is None else ran
        throttle = p.Throttle(at=at, retry_after=exc.retry_after, message=str(exc), ran=ran)
        group = job.call.group
        if group:  # the call's other chunks here stop at their next item (_stop)
            now = time.perf_counter()
            until = None if exc.retry_after is None else now + exc.retry_after
            with self._lock:
                self._throttled_calls.pop(group, None)
                self._throttled_calls[group] = (now, until)
                if len(self._throttled_calls) > MAX_THROTTLED_CALLS:  # the oldest call goes
                    del self._throttled_calls[next(iter(self._throttled_calls))]
        return self._reply_throttled(job, results, errors, throttle, started)

    def _reply_throttled(
        self,
        job: Job,
        results: list[Any],
        errors: list[p.ItemError],
        throttle: p.Throttle,
        started: float,
    ) -> Response:
        isolated = errors if job.call.isolate else None
        return self._success(job, results, started, [], isolated, throttle)

    def _stop(self, call: p.Call, started: float, index: int) -> p.Throttle | None:
        """A throttle without a refusal: another chunk of this call was throttled here since
        this one started, so its next item would most likely be refused too."""
        if not call.group:
            return None
        seen = self._throttled_calls.get(call.group)  # one dict read: atomic under the GIL
        if seen is None or seen[0] < started:
            return None
        until = seen[1]
        wait = None if until is None else max(0.0, until - time.perf_counter())
        message = "another chunk of the call was throttled"
        return p.Throttle(at=index, retry_after=wait, message=message, ran=index, stopped=True)

    def _success(
        self,
        job: Job,
        results: list[Any],
        started: float,
        figures: list[p.StageFigures],
        item_errors: list[p.ItemError] | None = None,
        throttled: p.Throttle | None = None,
    ) -> Response:
        entry, bind = job.then[-1] if job.then else (job.entry, job.bind)
        try:
            inexact = inexact_result(entry.shape(bind), results)
        except SerializationError as exc:  # nested too deep to check, or to encode
            return self._failure(job, "result", exc, None, started, len(job.then))
        if inexact is not None:  # untyped results that would not arrive as returned
            error = p.ErrorInfo(
                kind="result",
                type="SerializationError",
                message=inexact.message,
                index=inexact.index,
                item=_short_repr(results[inexact.index]) if inexact.index is not None else None,
                stage=len(job.then),
            )
            reply = p.Reply(
                v=p.VERSION,
                worker=worker_id(),
                error=error,
                queue_s=started - job.received,
                compute_s=time.perf_counter() - started,
            )
            return self._reply(500, reply, job.fmt, (job.kid, job.call.id))
        done = time.perf_counter()
        reply = p.Reply(
            v=p.VERSION,
            worker=worker_id(),
            results=results,
            queue_s=started - job.received,
            compute_s=done - started,
            stages=figures if job.then else None,
            item_errors=item_errors,
            capacity=job.capacity,
            throttled=throttled,
        )
        try:
            return self._reply(200, reply, job.fmt, (job.kid, job.call.id))
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
            compute_s=time.perf_counter() - started,
            capacity=job.capacity,
        )
        return self._reply(500, reply, job.fmt, (job.kid, job.call.id))


_NONE: Any = object()  # no item to name
MAX_THROTTLED_CALLS = 1024  # calls whose throttles a worker remembers (the newest)


def _at(items: _Tracked) -> tuple[int, Any] | None:
    """The item the function was processing when it raised, if it was iterating."""
    index = items.failing_index()
    return None if index is None else (index, items[index])


def _ran(items: _Tracked) -> int:
    """Items a whole-chunk call had finished when it raised (0 if it was not iterating)."""
    index = items.failing_index()
    return 0 if index is None else index


def _itemwise(call: p.Call) -> bool:
    return call.isolate or call.pace is not None


def _pause(call: p.Call, started: float, index: int) -> float:
    """Seconds to wait before item `index` of a paced chunk may start."""
    if not call.pace or not index:
        return 0.0
    return started + index * call.pace - time.perf_counter()


def _error_info(
    exc: BaseException, index: int | None, item: Any, kind: str = "user"
) -> p.ErrorInfo:
    """The structured form of an exception the function raised on item `index`."""
    return p.ErrorInfo(
        kind=kind,
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        index=index,
        item=None if item is _NONE else _short_repr(item),
    )


class _ResultError(Exception):
    """The function returned something that is not a list of results."""


def _as_list(result: Any) -> list[Any]:
    if isinstance(result, list):
        return list(result) if isinstance(result, _Tracked) else result
    if isinstance(result, str | bytes | bytearray | dict) or not hasattr(result, "__iter__"):
        error = TypeError(f"the function must return a list, not {type(result).__name__}")
        raise _ResultError() from error
    return list(result)  # tuples, filter(), map(), generators (their errors are the user's)
