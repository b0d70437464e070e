"""The worker's sans-I/O front: (method, headers, body) -> a Job to run, or a signed refusal.

Checks run in the order of docs/protocol.md, cheapest and safest first, and nothing is decoded
before the signature checks out. Every answer leaves through `_reply`, which signs it for the
request it answers once that request is authenticated. Running an admitted chunk is
_worker/execute.py's; the WSGI and ASGI adapters only move bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

import msgspec

from .. import _registry
from .. import _wire as p
from .._exceptions import SerializationError
from .._wire import Response
from .._wire.bounds import MAX_CONTAINERS, too_many_containers
from .._wire.values import Mismatch
from .admission import MAX_FUNCTION, REQUEST_ID, Budget, known_signature, process_budget
from .execute import Job, Runner, worker_id
from .metrics import Reason, recorder
from .origin import OriginPolicy
from .replay import ReplayGuard
from .telemetry import Tracing

__all__ = ["Endpoint", "Head", "Job", "worker_id"]

logger = logging.getLogger("serverless.worker")


def _text(value: str) -> str | None:
    """A header value as text: servers hand headers over as Latin-1, the caller sends UTF-8
    (a function may be called `квадрат`); None if it is not UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeEncodeError:
        return value  # already text (an in-process transport)
    except UnicodeDecodeError:
        return None


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
    """Authenticates and decodes chunks for the functions in the registry, and signs every
    answer; `run` and `run_async` hand an admitted chunk to its Runner (_worker/execute.py)
    unless its caller no longer wants it.

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
        shared_replay: bool = True,  # False: this process's cache only (replay.py)
        id_prefix: str = "",  # only request ids that begin so (a local pool worker's slot)
        not_before: float | None = None,  # no request signed before (a replacement's start)
        max_containers: int = MAX_CONTAINERS,
        budget: Budget | None = None,
        timer: Callable[[], float] = time.perf_counter,
        by_value: _registry.CodeShelf | None = None,  # a local pool worker's (byvalue.py)
        metrics: str | None = None,  # the path of /metrics (_worker/metrics.py); None: none
    ) -> None:
        self.route = route
        self.keyring = keyring
        self.max_body = max_body
        self.tolerance = tolerance
        # Only the local pool: modules its parent announced on a private channel, never
        # whatever a request names (docs/protocol.md section 5).
        self.importable = importable
        # Only the local pool too: functions of its caller's `__main__`, by value, from its
        # private directory (docs/security.md); every other worker refuses a request for one.
        self.by_value = by_value
        self.origins = origins if origins is not None else OriginPolicy.configured()
        self.max_containers = max_containers
        self.budget = budget if budget is not None else process_budget()
        # a body of max_body bytes must fit, or a legitimate chunk could never be read
        self.budget.limit = max(self.budget.limit, max_body)
        self._clock = clock
        self._replays = ReplayGuard(tolerance, shared=shared_replay)
        self.id_prefix, self.not_before = id_prefix, not_before
        self.replay_refusal = self._replays.refusal  # set: every chunk is refused (503)
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}  # chunks running now, by token: their deadline
        self._timer = timer  # queue and compute times, pacing (the wall clock is `clock`)
        self.runner = Runner(self._sign, timer)
        # Prometheus figures where asked for and installed; the adapters serve them at
        # metrics_path (None: no such path, a 404 as any other)
        self.metrics = recorder(metrics is not None)
        self.metrics_path = metrics if self.metrics.enabled else None
        self.tracing = Tracing()  # a span per chunk run, where the process has OpenTelemetry

    # -- responses -------------------------------------------------------------------------

    def reject(
        self,
        status: int,
        message: str,
        fmt: str = p.MSGPACK,
        *,
        close: bool = False,
        head: Head | None = None,
        reason: Reason | None = None,
    ) -> Response:
        """A refusal. It names no worker: an anonymous client learns nothing about the host.
        close: the body was not read, so the connection cannot carry another request.
        head: the request, once authenticated: the refusal is then signed for its caller.
        reason: why a request to the route was refused (counted; None: not such a refusal)."""
        if reason is not None:
            self.metrics.refused(reason)
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

    def _sign(self, status: int, reply: p.Reply, job: Job) -> Response:
        """A job's answer, signed for its request (the runner's way out), and counted."""
        response = self._reply(status, reply, job.fmt, (job.kid, job.call.id))
        self._answered(job, status, reply)
        return response

    def _answered(self, job: Job, status: int, reply: p.Reply) -> None:
        """An admitted chunk's answer, in the metrics and on its span."""
        if self.metrics.enabled:
            self.metrics.answered(job.entry.name, len(job.call.items), status, reply)
        if job.span is not None:
            self.tracing.answered(job.span, status, reply)

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
        left = threading.Event()
        job.gone = left.is_set
        try:
            return await asyncio.get_running_loop().run_in_executor(threads, self.run, job)
        except asyncio.CancelledError:  # the caller went away: as a closed connection
            left.set()
            raise

    def check_head(
        self, method: str, headers: Mapping[str, str], length: int | None
    ) -> Head | Response:
        """Every check that needs no body, cheapest first; `length` is the declared
        Content-Length (None if absent). Refusals here close the connection."""
        fmt = p.media_type(headers.get("accept")) or p.media_type(headers.get("content-type"))
        fmt = fmt or p.MSGPACK
        if length is not None and length > self.max_body:
            message = f"body of {length} bytes exceeds {self.max_body}"
            return self.reject(413, message, fmt, close=True, reason="too_large")
        if method != "POST":
            return self.reject(405, "only POST is allowed", fmt, close=True, reason="bad_method")
        if length is None:
            message = "a Content-Length header is required"
            return self.reject(411, message, fmt, close=True, reason="bad_headers")
        if headers.get(p.H_VERSION) != str(p.VERSION):
            message = (
                f"this worker speaks wire protocol v{p.VERSION}; the request's "
                f"{p.H_VERSION} header is {headers.get(p.H_VERSION)!r}"
            )
            return self.reject(400, message, fmt, close=True, reason="bad_version")
        timestamp = headers.get(p.H_TIMESTAMP, "")
        try:
            skew = abs(self._clock() - float(timestamp))
        except ValueError:
            message = "missing or malformed timestamp"
            return self.reject(401, message, fmt, close=True, reason="bad_headers")
        if not skew <= self.tolerance:  # also false for NaN
            message = "timestamp outside the tolerance window"
            return self.reject(401, message, fmt, close=True, reason="stale_timestamp")
        signature = headers.get(p.H_SIGNATURE, "")
        known = known_signature(signature, self.keyring.key_ids)
        if known is None:
            message = "malformed signature header"
            return self.reject(401, message, fmt, close=True, reason="bad_headers")
        if not known:
            message = "no signature with a known key id"
            return self.reject(401, message, fmt, close=True, reason="unknown_key")
        request_id = headers.get(p.H_REQUEST_ID, "")
        if REQUEST_ID.fullmatch(request_id) is None:
            message = "the request id must be 32 lower-case hex digits"
            return self.reject(400, message, fmt, close=True, reason="bad_headers")
        function = _text(headers.get(p.H_FUNCTION, ""))
        if function is None or len(function) > MAX_FUNCTION:
            message = f"{p.H_FUNCTION} must be UTF-8, at most {MAX_FUNCTION} characters"
            return self.reject(400, message, fmt, close=True, reason="bad_headers")
        content_type = headers.get("content-type")
        return Head(method, function, timestamp, request_id, signature, content_type, fmt, length)

    def authenticate(self, head: Head, digest: str) -> Response | None:
        """The signature over the body's SHA-256, then the request id's first use."""
        message = p.signing_message(
            head.method, self.route, head.function, head.timestamp, head.request_id, digest
        )
        verdict = self.keyring.verify(message, head.signature)
        if not isinstance(verdict, str):  # None cannot happen after check_head; refuse it too
            return self.reject(401, "bad signature", head.fmt, reason="bad_signature")
        head.kid = verdict  # from now on, every answer is signed with this key
        if not head.request_id.startswith(self.id_prefix):
            why = "the request was signed for another worker"
            return self.reject(403, why, head.fmt, head=head, reason="wrong_worker")
        if self.not_before is not None and float(head.timestamp) < self.not_before:
            # a request signed for this slot before this process started was meant for the
            # one it replaced, whose replay cache died with it: signed anew, it goes through
            why = "the request was signed before this worker started: sign it anew"
            return self.reject(503, why, head.fmt, head=head, reason="wrong_worker")
        fresh = self._replays.add(head.request_id, self._clock())
        if fresh is None:
            why = self._replays.refusal or "the replay store failed (see the worker's log)"
            why = f"replay protection unavailable: {why}"
            return self.reject(503, why, head.fmt, head=head, reason="replay_unavailable")
        if not fresh:
            why = "request id already used"
            return self.reject(409, why, head.fmt, head=head, reason="replayed")
        return None

    def admit(self, head: Head, body: bytes) -> Job | Response:
        """Decode an authenticated body into a Job, or a signed refusal (counted)."""
        job = self._admit(head, body)
        if isinstance(job, Response) and self.metrics.enabled:
            status = job.status
            self.metrics.refused(
                "unknown_function"
                if status == 404
                else "bad_input"
                if status == 422
                else "malformed"
            )
        return job

    def _admit(self, head: Head, body: bytes) -> Job | Response:
        fmt, function, request_id = head.fmt, head.function, head.request_id
        names = function.split(p.STAGE_SEPARATOR)
        # a pool worker finds its caller's functions of __main__ in the call's signed pickle
        later = self.by_value is not None and any(n.startswith("__main__:") for n in names)
        entries = [None if later else self._lookup(name) for name in names]
        if not later and (missing := self._missing(names, entries, fmt, head)) is not None:
            return missing
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
        if wire.slot is not None and not math.isfinite(wire.slot):
            return self.reject(400, "slot must be a finite time", fmt, head=head)
        if wire.code and self.by_value is None:
            why = (
                "this worker runs only functions it imports, never code sent by value (only "
                "a local pool's workers do): put the function in a module that it imports"
            )
            return self.reject(400, why, fmt, head=head)
        if later:  # every check that needs no unpickling has passed
            loaded = self._by_value(wire.code, names)
            if isinstance(loaded, str):
                return self.reject(400, loaded, fmt, head=head)
            entries = loaded
            if (missing := self._missing(names, entries, fmt, head)) is not None:
                return missing
        binds = [(wire.bind, wire.state)] + [(stage.bind, stage.state) for stage in wire.then]
        stages: list[tuple[_registry.Entry, _registry.Bind]] = []
        for name, found, (wire_bind, state) in zip(names, entries, binds, strict=True):
            assert found is not None
            bind = _registry.as_bind(wire_bind)
            if bind is None:
                return self.reject(400, f"bad binding {wire_bind!r} for {name}", fmt, head=head)
            first = not stages  # later stages get the previous stage's results, nothing else
            misfit = found.misfit(
                bind, len(wire.args) if first else 0, wire.kwargs if first else (), state
            )
            if misfit is not None:  # refused before it runs: nothing of the user's has
                return self.reject(400, misfit, fmt, head=head)
            stages.append((found, bind))
        (entry, bind), then = stages[0], stages[1:]
        # the classes whose instances are rebuilt from a state (misfit found them)
        receivers = [e.owner() if b == _registry.BIND_STATE else None for e, b in stages]
        try:  # the values, into the types the first function's annotations give
            call = p.typed_call(wire, entry.shape(bind), content_fmt, receivers)
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
        received = self._timer()
        return Job(call, entry, bind, fmt, received=received, kid=head.kid, then=then)

    def _by_value(self, code: str, names: list[str]) -> list[_registry.Entry | None] | str:
        """The call's functions: those of __main__ from the pickle its signed `code` names
        (byvalue.py checks the file before unpickling it), the others from the registry."""
        if not code:
            return [self._lookup(name) for name in names]
        assert self.by_value is not None
        loaded = self.by_value.load(code)
        if isinstance(loaded, str):
            return loaded
        return [loaded.get(n) if n.startswith("__main__:") else self._lookup(n) for n in names]

    def _missing(
        self, names: list[str], entries: list[_registry.Entry | None], fmt: str, head: Head
    ) -> Response | None:
        """The 404 for the first function not found, if any."""
        for name, found in zip(names, entries, strict=True):
            if found is None:
                return self.reject(
                    404, f"function {name!r} is not registered on this worker", fmt, head=head
                )
        return None

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
        """A signed refusal if the chunk must not start now: its caller went away or it is
        past its deadline (504, "expired": its caller has given up) or, if it waited here
        for a thread, past its start_by (503, "busy", with Retry-After: it may go
        elsewhere). A chunk that finds a thread free starts whatever its start_by says: it
        may have waited in a balancer's queue, and sending it back would only put it at the
        end. Nothing has run either way."""
        now = self._clock()
        call = job.call
        if job.gone():
            return self.refusal(job, 504, "expired", "the caller went away")
        if call.deadline is not None and now > call.deadline:
            return self.refusal(
                job, 504, "expired", "the chunk's deadline passed before it started"
            )
        if waited and call.start_by is not None and now > call.start_by:
            return self.refusal(job, 503, "busy", "no thread could start the chunk in time")
        return None

    def refusal(self, job: Job, status: int, kind: str, message: str) -> Response:
        """An admitted chunk that did not start (kind "busy" or "expired"), signed."""
        error = p.ErrorInfo(kind=kind, type=f"HTTP{status}", message=message)
        reply = p.Reply(v=p.VERSION, worker=worker_id(), error=error, capacity=job.capacity)
        response = self._reply(status, reply, job.fmt, (job.kid, job.call.id))
        self._answered(job, status, reply)
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
        caller no longer wants it; its span, if traced, current meanwhile."""
        refused = self.late(job, waited=False)
        if refused is not None:
            return refused
        opened = self.tracing.begin(job)
        metrics = self.metrics
        if metrics.enabled:
            metrics.busy(1)
        try:
            with self._tracked(job):
                return self.runner.run(job)
        finally:
            if metrics.enabled:
                metrics.busy(-1)
            if opened is not None:
                self.tracing.end(opened)

    async def run_async(self, job: Job) -> Response:
        """Run a chunk on this event loop, unless its caller no longer wants it; its span, if
        traced, current meanwhile (in this task)."""
        refused = self.late(job, waited=False)
        if refused is not None:
            return refused
        opened = self.tracing.begin(job)
        try:
            with self._tracked(job):
                return await self.runner.run_async(job)
        finally:
            if opened is not None:
                self.tracing.end(opened)
