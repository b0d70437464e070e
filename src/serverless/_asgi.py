"""ASGI adapter: the worker route as an ASGI app, or as middleware around the user's app.

Sync user functions run in a thread pool sized for the wanted concurrency; async ones run on
the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ._context import Origin, current_origin
from ._gate import Gate
from ._worker import Endpoint, Job, Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ASGIEndpoint:
    """Serves POSTs to the route; passes every other request to `app` (404 if there is none)."""

    def __init__(self, endpoint: Endpoint, app: ASGIApp | None = None, threads: int = 64) -> None:
        self.endpoint = endpoint
        self.app = app
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._gates: dict[str, Gate] = {}  # per sync function: chunks at once (see _gate.py)

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:  # threads start lazily, so an idle endpoint costs nothing
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="serverless")
        return self._executor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.endpoint.route:
            token = current_origin.set(self._origin(scope))
            try:
                await _send(await self._handle(scope, receive), send)
            finally:
                current_origin.reset(token)
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
        try:
            length: int | None = int(headers.get("content-length") or 0) or None
        except ValueError:
            return self.endpoint.reject(400, "bad Content-Length")
        rejected = self.endpoint.too_large(length)
        if rejected is not None:
            return rejected
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return self.endpoint.reject(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.endpoint.max_body:
                return self.endpoint.reject(413, f"body exceeds {self.endpoint.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        job = self.endpoint.accept(scope["method"], headers, b"".join(chunks))
        if isinstance(job, Response):
            return job
        if job.is_async:
            return await self.endpoint.run_async(job)
        context = contextvars.copy_context()  # carries the origin into the worker thread
        loop = asyncio.get_running_loop()
        gate = self._gates.get(job.entry.name)
        if gate is None:
            gate = self._gates[job.entry.name] = Gate(self.threads)
        await gate.acquire()
        try:
            area = gate.area()
            response, cpu_s, wall_s = await loop.run_in_executor(
                self.executor, context.run, _timed_run, self.endpoint, job
            )
            concurrent = (gate.area() - area) / wall_s if wall_s > 0 else 1.0
        finally:
            gate.release()
        gate.control.observe(cpu_s, wall_s, concurrent)
        return response

    def _origin(self, scope: Scope) -> Origin:
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not host and scope.get("server"):
            host = "{}:{}".format(*scope["server"])
        base = f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}"
        route = self.endpoint.route
        return Origin(url=base + route, route=route, keyring=self.endpoint.keyring)


def _timed_run(endpoint: Endpoint, job: Job) -> tuple[Response, float, float]:
    """Run a chunk in this thread: its response, thread CPU seconds and wall seconds."""
    wall, cpu = time.perf_counter(), time.thread_time()
    response = endpoint.run(job)
    return response, time.thread_time() - cpu, time.perf_counter() - wall


async def _send(response: Response, send: Send) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
