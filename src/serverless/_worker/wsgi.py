"""WSGI adapter: the worker route as a WSGI app, or as middleware around the user's app."""

from __future__ import annotations

import contextlib
import hashlib
import socket
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from .._wire import Response
from .admission import BODY_IDLE
from .context import Origin, current_origin
from .endpoint import Endpoint, Job
from .origin import resolve_origin
from .threads import RequestThreads, wsgi_threads

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

READ_SIZE = 1 << 20  # bytes per read of the body: the budget is taken piece by piece


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
            if environ.get("PATH_INFO", "") != self.endpoint.route:
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
            return endpoint.reject(400, "bad Content-Length", close=True)
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
        return job if isinstance(job, Response) else self._run(job)

    def _read(self, environ: dict[str, Any], length: int, fmt: str) -> bytes | Response:
        """Read the declared body within the process's budget for unauthenticated bytes,
        with an idle timeout where the server hands us its socket (gunicorn)."""
        endpoint = self.endpoint
        stream = environ["wsgi.input"]
        sock = environ.get("gunicorn.socket")
        saved = sock.gettimeout() if isinstance(sock, socket.socket) else None
        if isinstance(sock, socket.socket):
            sock.settimeout(BODY_IDLE)
        hold = endpoint.budget.hold()  # a blocked read cannot be interrupted: no eviction
        chunks: list[bytes] = []
        try:
            remaining = length
            while remaining > 0:
                size = min(remaining, READ_SIZE)
                if not hold.take(size):
                    return endpoint.reject(503, "too many uploads in progress", fmt, close=True)
                chunk = stream.read(size)
                if not chunk:
                    return endpoint.reject(400, "body shorter than Content-Length", fmt, close=True)
                chunks.append(chunk)
                remaining -= len(chunk)
        except OSError:  # the idle timeout, or the connection lost
            return endpoint.reject(408, "request body timed out", fmt, close=True)
        finally:
            hold.release()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.settimeout(saved)
        return b"".join(chunks)

    def _run(self, job: Job) -> Response:
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


def _server_socket(environ: dict[str, Any]) -> tuple[str, int] | None:
    """The accepted connection's local address, where the server gives us its socket.
    SERVER_NAME is not used: several servers fill it from the Host header."""
    for key in ("gunicorn.socket", "werkzeug.socket"):
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
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
