"""ASGI adapter: the worker route as an ASGI app, or as middleware around the user's app;
it also answers the metrics path where the endpoint has one (_worker/metrics.py).

It moves bytes: headers and body in (the body hashed as it arrives, within the process's
budget), the endpoint's answer out. When an admitted chunk starts, and on which thread, is
the Scheduler's (_worker/schedule.py).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._wire import Response
from .admission import Hold, body_due
from .context import Origin, current_origin
from .endpoint import Endpoint
from .metrics import scrape
from .origin import resolve_origin
from .schedule import Scheduler
from .telemetry import flush_sdk_async
from .threads import RequestThreads

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Bodies up to this size are decoded on the event loop (well under a millisecond); a larger
# one in a thread, so that the loop answers meanwhile: a body of the limit's size took the
# loop for up to 1.9 s (issue 22.12). A single msgspec decode still holds the GIL while it runs.
INLINE_BODY = 256 * 1024


class ASGIEndpoint:
    """Serves POSTs to the route; passes every other request to `app` (404 if there is none)."""

    def __init__(self, endpoint: Endpoint, app: ASGIApp | None = None, threads: int = 64) -> None:
        self.endpoint = endpoint
        self.app = app
        self.threads = threads
        self.scheduler = Scheduler(endpoint, threads)
        self.request_threads = RequestThreads(threads)  # every chunk request takes one

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.endpoint.route:
            token = current_origin.set(self._origin(scope, chunk=True))
            self.request_threads.enter()
            try:
                await _send(await self._handle(scope, receive), send)
            finally:
                self.request_threads.leave()
                current_origin.reset(token)
        elif scope["type"] == "http" and scope["path"] == self.endpoint.metrics_path:
            loop = asyncio.get_running_loop()  # reading other processes' files: off the loop
            await _send(await loop.run_in_executor(None, scrape, scope["method"]), send)
        elif self.app is not None:
            token = current_origin.set(self._origin(scope) if scope["type"] == "http" else None)
            try:
                await self.app(scope, receive, send)
            finally:
                current_origin.reset(token)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await _send(self.endpoint.reject(404, "not found"), send)

    async def _handle(self, scope: Scope, receive: Receive) -> Response:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        endpoint = self.endpoint
        try:
            length = int(headers["content-length"]) if "content-length" in headers else None
        except ValueError:
            return endpoint.reject(400, "bad Content-Length", close=True, reason="bad_headers")
        head = endpoint.check_head(scope["method"], headers, length)
        if isinstance(head, Response):
            return head
        body = await _read_body(endpoint, receive, head.length, head.fmt)
        if isinstance(body, Response):
            return body
        chunks, digest, hold = body
        try:
            refused = endpoint.authenticate(head, digest)
        finally:
            hold.release()  # authenticated or refused: no longer anonymous bytes
        if refused is not None:
            return refused
        raw = b"".join(chunks)
        if len(raw) > INLINE_BODY:  # decoding and bounds checks, off the event loop
            job = await asyncio.get_running_loop().run_in_executor(None, endpoint.admit, head, raw)
        else:
            job = endpoint.admit(head, raw)
        if isinstance(job, Response):
            return job
        return await self.scheduler.run(job, functools.partial(_disconnected, receive))

    def ready(self) -> bool:
        """False once every thread runs a chunk past its caller's deadline: a health route
        then answers 503, so a balancer stops sending this worker chunks it cannot start."""
        return self.endpoint.stuck() < self.threads

    def _origin(self, scope: Scope, chunk: bool = False) -> Origin:
        host = ""
        for name, value in scope.get("headers") or ():
            if name == b"host":
                host = value.decode("latin-1")
        server = scope.get("server")
        route = self.endpoint.route
        url, refusal = resolve_origin(
            self.endpoint.origins,
            route,
            host,
            scope.get("scheme", "http"),
            scope.get("root_path", ""),
            (str(server[0]), int(server[1])) if server and server[1] is not None else None,
        )
        return Origin(
            url or "",
            route,
            self.endpoint.keyring,
            refusal=refusal,
            endpoint=self.endpoint,
            threads=self.request_threads,
            chunk=chunk,
        )


async def _read_body(
    endpoint: Endpoint, receive: Receive, length: int, fmt: str
) -> tuple[list[bytes], str, Hold] | Response:
    """Read a body of the declared `length`, hashing it as it arrives, within the process's
    budget for unauthenticated bytes and within `body_due` (slow or stalled uploads)."""
    task = asyncio.current_task()
    assert task is not None
    state: list[str] = []  # why the task was interrupted, if it was

    def interrupt(reason: str) -> None:
        if not state:
            state.append(reason)
            task.cancel()

    hold = endpoint.budget.hold(lambda: interrupt("evicted"))
    hasher = hashlib.sha256()
    chunks: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    start = last = loop.time()
    try:
        while True:
            timer = loop.call_at(body_due(start, last, size), interrupt, "slow")
            try:
                message = await receive()
            except asyncio.CancelledError:
                if not state:
                    raise
                uncancel = getattr(task, "uncancel", None)
                if uncancel is not None:
                    uncancel()
                hold.release()
                if state[0] == "slow":
                    return endpoint.reject(
                        408, "request body timed out", fmt, close=True, reason="slow_body"
                    )
                return endpoint.reject(
                    503, "too many uploads in progress", fmt, close=True, reason="overloaded"
                )
            finally:
                timer.cancel()
            if message["type"] == "http.disconnect":
                hold.release()
                return endpoint.reject(
                    400, "client disconnected", fmt, close=True, reason="bad_body"
                )
            chunk = message.get("body", b"")
            if chunk:
                last = loop.time()
            size += len(chunk)
            if size > length:
                hold.release()
                return endpoint.reject(
                    400, "body longer than Content-Length", fmt, close=True, reason="bad_body"
                )
            if chunk and not hold.take(len(chunk)):
                hold.release()
                return endpoint.reject(
                    503, "too many uploads in progress", fmt, close=True, reason="overloaded"
                )
            hasher.update(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except BaseException:
        hold.release()
        raise
    if state:  # interrupted after the last receive: the cancellation is still pending
        hold.release()
        return endpoint.reject(
            503, "too many uploads in progress", fmt, close=True, reason="overloaded"
        )
    return chunks, hasher.hexdigest(), hold


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(response: Response, send: Send) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await flush_sdk_async()  # the last spans, before uvicorn ends the process
            await send({"type": "lifespan.shutdown.complete"})
            return
