"""WSGI adapter: the worker route as a WSGI app, or as middleware around the user's app."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from ._context import Origin, current_origin
from ._worker import Endpoint, Job, Response

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class WSGIEndpoint:
    """Serves POSTs to the route; passes every other request to `app` (404 if there is none)."""

    def __init__(self, endpoint: Endpoint, app: WSGIApp | None = None) -> None:
        self.endpoint = endpoint
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        token = current_origin.set(self._origin(environ))
        try:
            if environ.get("PATH_INFO", "") != self.endpoint.route:
                if self.app is None:
                    return _send(self.endpoint.reject(404, "not found"), start_response)
                return self.app(environ, start_response)
            return _send(self._handle(environ), start_response)
        finally:
            current_origin.reset(token)

    def _handle(self, environ: dict[str, Any]) -> Response:
        try:
            length: int | None = int(environ.get("CONTENT_LENGTH") or 0) or None
        except ValueError:
            return self.endpoint.reject(400, "bad Content-Length")
        rejected = self.endpoint.too_large(length)
        if rejected is not None:
            return rejected
        stream = environ["wsgi.input"]
        body = stream.read(length) if length else stream.read(self.endpoint.max_body + 1)
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if "CONTENT_TYPE" in environ:
            headers["content-type"] = environ["CONTENT_TYPE"]
        job = self.endpoint.accept(environ.get("REQUEST_METHOD", ""), headers, body)
        return job if isinstance(job, Response) else self._run(job)

    def _run(self, job: Job) -> Response:
        return self.endpoint.run(job)

    def _origin(self, environ: dict[str, Any]) -> Origin:
        host = environ.get("HTTP_HOST") or f"{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"
        base = f"{environ.get('wsgi.url_scheme', 'http')}://{host}{environ.get('SCRIPT_NAME', '')}"
        route = self.endpoint.route
        concurrent = bool(environ.get("wsgi.multithread") or environ.get("wsgi.multiprocess"))
        return Origin(base + route, route, self.endpoint.keyring, concurrent)


def _send(response: Response, start_response: StartResponse) -> list[bytes]:
    start_response(f"{response.status} {HTTPStatus(response.status).phrase}", response.headers)
    return [response.body]
