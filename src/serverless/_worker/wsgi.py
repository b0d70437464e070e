"""WSGI adapter: the worker route as a WSGI app, or as middleware around the user's app;
it also answers the metrics path where the endpoint has one (_worker/metrics.py)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Literal

from .._wire import Response
from .admission import BODY_IDLE, body_due
from .context import Origin, current_origin
from .endpoint import Endpoint, Job
from .metrics import scrape
from .origin import resolve_origin
from .threads import RequestThreads, wsgi_threads

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Cut = Literal["evicted", "slow", "done"]  # why a body's read ended early, or that it ended

# bytes per read of the body: the budget is taken, and progress counted, piece by piece (a
# piece is a second at the minimum rate, so the watchdog sees a slow body's progress)
READ_SIZE = 64 * 1024
TICK = 0.25  # seconds between the watchdog's looks at the bodies being read


class WSGIEndpoint:
    """Serves POSTs to the route; passes every other request to `app` (404 if there is none)."""

    def __init__(self, endpoint: Endpoint, app: WSGIApp | None = None) -> None:
        self.endpoint = endpoint
        self.app = app
        # every request takes one of the server's threads: one is kept for the app's own
        self.request_threads = RequestThreads(reserve=True)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if self.request_threads.threads is None:
            self.request_threads.threads = wsgi_threads(environ)
        token = current_origin.set(self._origin(environ))
        self.request_threads.enter()
        try:
            path = environ.get("PATH_INFO", "")
            if path == self.endpoint.metrics_path:
                return _send(scrape(environ.get("REQUEST_METHOD", "")), start_response)
            if path != self.endpoint.route:
                if self.app is None:
                    return _send(self.endpoint.reject(404, "not found"), start_response)
                return self.app(environ, start_response)
            return _send(self._handle(environ), start_response)
        finally:
            self.request_threads.leave()
            current_origin.reset(token)

    def _handle(self, environ: dict[str, Any]) -> Response:
        endpoint = self.endpoint
        raw = environ.get("CONTENT_LENGTH")
        try:
            length = int(raw) if raw else None
        except ValueError:
            return endpoint.reject(400, "bad Content-Length", close=True, reason="bad_headers")
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if "CONTENT_TYPE" in environ:
            headers["content-type"] = environ["CONTENT_TYPE"]
        head = endpoint.check_head(environ.get("REQUEST_METHOD", ""), headers, length)
        if isinstance(head, Response):
            return head
        body = self._read(environ, head.length, head.fmt)
        if isinstance(body, Response):
            return body
        refused = endpoint.authenticate(head, hashlib.sha256(body).hexdigest())
        if refused is not None:
            return refused
        job = endpoint.admit(head, body)
        return job if isinstance(job, Response) else self._run(job, environ)

    def _read(self, environ: dict[str, Any], length: int, fmt: str) -> bytes | Response:
        """Read the declared body within the process's budget for unauthenticated bytes and
        within `body_due`, where the server hands us its socket (gunicorn, werkzeug): an idle
        timeout on the socket, and the watchdog cuts a body too slow, or evicted."""
        endpoint = self.endpoint
        stream = environ["wsgi.input"]
        sock = _client_socket(environ)
        saved = sock.gettimeout() if sock is not None else None
        if sock is not None:
            sock.settimeout(BODY_IDLE)
        read = _Read(sock)
        # a blocked read can only be interrupted through the socket: no socket, no eviction
        hold = endpoint.budget.hold(read.evict if sock is not None else None)
        if sock is not None:
            _watchdog.add(read)
        chunks: list[bytes] = []
        try:
            remaining = length
            while remaining > 0:
                size = min(remaining, READ_SIZE)
                if not hold.take(size):
                    return endpoint.reject(
                        503, "too many uploads in progress", fmt, close=True, reason="overloaded"
                    )
                chunk = stream.read(size)
                if not chunk or read.cut is not None:
                    return self._short(read, fmt)
                chunks.append(chunk)
                remaining -= len(chunk)
                read.received += len(chunk)
                read.last = time.monotonic()
        except OSError:  # the idle timeout, or the connection lost
            return endpoint.reject(
                408, "request body timed out", fmt, close=True, reason="slow_body"
            )
        finally:
            read.stop("done")  # from now on, neither the watchdog nor an eviction cuts it
            _watchdog.remove(read)
            hold.release()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.settimeout(saved)
        return b"".join(chunks)

    def _short(self, read: _Read, fmt: str) -> Response:
        if read.cut == "evicted":
            return self.endpoint.reject(
                503, "too many uploads in progress", fmt, close=True, reason="overloaded"
            )
        if read.cut == "slow":
            return self.endpoint.reject(
                408, "request body timed out", fmt, close=True, reason="slow_body"
            )
        return self.endpoint.reject(
            400, "body shorter than Content-Length", fmt, close=True, reason="bad_body"
        )

    def _run(self, job: Job, environ: dict[str, Any]) -> Response:
        sock = _client_socket(environ)
        if sock is not None and job.itemwise:  # it stops before its next item once gone
            job.gone = functools.partial(_hung_up, sock)
        return self.endpoint.run(job)

    def _origin(self, environ: dict[str, Any]) -> Origin:
        route = self.endpoint.route
        url, refusal = resolve_origin(
            self.endpoint.origins,
            route,
            environ.get("HTTP_HOST", ""),
            environ.get("wsgi.url_scheme", "http"),
            environ.get("SCRIPT_NAME", ""),
            _server_socket(environ),
        )
        concurrent = bool(environ.get("wsgi.multithread") or environ.get("wsgi.multiprocess"))
        return Origin(
            url or "",
            route,
            self.endpoint.keyring,
            concurrent,
            refusal,
            self.endpoint,
            self.request_threads,
            chunk=environ.get("PATH_INFO", "") == route,
        )


class _Read:
    """A body being read: its progress, and why it was cut short (if it was)."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.start = self.last = time.monotonic()
        self.received = 0
        self.cut: Cut | None = None
        self._lock = threading.Lock()

    def evict(self) -> None:
        self.stop("evicted")

    def stop(self, reason: Cut) -> None:
        """Make the blocked read return short: shutting the socket's read side wakes a
        thread blocked in recv(), where closing it could hand its number to another
        connection. The answer can still be written; the connection closes after it."""
        with self._lock:
            if self.cut is not None:
                return
            self.cut = reason
        if self.sock is not None and reason != "done":
            with contextlib.suppress(OSError):  # closed meanwhile
                self.sock.shutdown(socket.SHUT_RD)


class _Watchdog:
    """One thread per process that cuts the bodies past `body_due`; it sleeps while none
    is being read."""

    def __init__(self) -> None:
        self._reads: dict[int, _Read] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, read: _Read) -> None:
        with self._wake:
            self._reads[id(read)] = read
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="serverless-body-watchdog", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def remove(self, read: _Read) -> None:
        with self._wake:
            self._reads.pop(id(read), None)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._reads:
                    self._wake.wait()
                reads = list(self._reads.values())
            now = time.monotonic()
            for read in reads:
                if body_due(read.start, read.last, read.received) <= now:
                    read.stop("slow")
            time.sleep(TICK)


_watchdog = _Watchdog()


def _client_socket(environ: dict[str, Any]) -> socket.socket | None:
    for key in ("gunicorn.socket", "werkzeug.socket"):
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


def _hung_up(sock: socket.socket) -> bool:
    """Whether the client closed the connection (Ctrl-C, a cancelled call): its end of file
    is readable. A caller sends nothing more while it waits for the answer, so any byte
    waiting is not a hang-up. poll, never select(): descriptors above 1,024 (issue 22)."""
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError, ValueError, AttributeError):  # TLS; no poll()
        return False
    except OSError:  # reset by the peer
        return True


def _server_socket(environ: dict[str, Any]) -> tuple[str, int] | None:
    """The accepted connection's local address, where the server gives us its socket.
    SERVER_NAME is not used: several servers fill it from the Host header."""
    sock = _client_socket(environ)
    if sock is None:
        return None
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return None


def _send(response: Response, start_response: StartResponse) -> list[bytes]:
    # PEP 3333 forbids hop-by-hop headers from applications; gunicorn closes a connection
    # whose body was left unread once its keep-alive times out.
    headers = [(k, v) for k, v in response.headers.items() if k != "connection"]
    start_response(f"{response.status} {HTTPStatus(response.status).phrase}", headers)
    return [response.body]
