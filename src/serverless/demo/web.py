"""`serverless demo --web`: the seed's architecture for real.

One Starlette app serves the page, an API that runs the pipeline, and the worker route, all
from the same uvicorn processes: the parallel steps call back into the app itself (target
"self"), as the seed's App Engine app did. Several uvicorn processes share the port, so the
chunks spread over them like requests over App Engine instances.

So a second request (a poll, an event stream opened by run id) may reach another process than
the one running the pipeline: the run's progress goes back on the request that runs it. With
`Accept: application/x-ndjson` (the page), POST /api/run answers with one JSON object per
line as the run goes (`_stream`), read by the page through fetch's body reader; without it
(scripts), with the figures alone, as `serverless demo --json` prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import fields
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import serverless
from serverless._worker.uvserver import raise_open_files_limit, uvicorn_settings

from .pipeline import measure_serial, notes, report, run

ROUTE = "/serverless"
LIMITS = {"count": (0, 20000), "workers": (1, 500), "latency": (0.0, 2.0)}
# Each worker's share of the codes goes in this many chunks, so that chunks are answered all
# along the run and the page's timeline grows (with one chunk each, they all come back at
# its end: 100 chunks of 30 lookups at 0.1 s end together after 3 s).
LIVE_SHARE = 5
NDJSON = "application/x-ndjson"

logger = logging.getLogger("serverless.demo")
Message = dict[str, Any]
Parameters = tuple[int, int, float, int | None]
_running: set[asyncio.Task[None]] = set()  # runs whose page went away: kept until they end


def _page(request: Request) -> Response:
    return HTMLResponse(files(__package__).joinpath("page.html").read_text(encoding="utf-8"))


async def _run(request: Request) -> Response:
    """POST /api/run?count=&workers=&latency=&seed=: run the pipeline once.

    Streamed (Accept: application/x-ndjson): {"type": "serial"} (the serial sample), then
    {"type": "progress"} events with the chunks answered since the last one, then
    {"type": "result", "figures": ...} or {"type": "error", "error": ...}. Otherwise the
    figures, as `serverless demo --json` (502 with {"error"} if the run failed)."""
    params = _parameters(request.query_params)
    if isinstance(params, str):
        return JSONResponse({"error": params}, status_code=400)
    if NDJSON in request.headers.get("accept", ""):
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # no proxy buffers it
        return StreamingResponse(_stream(params), media_type=NDJSON, headers=headers)
    try:
        # a thread with this request's context: the steps see the app serving this request
        # and call back into it (Starlette's run_in_threadpool copies the contextvars)
        return JSONResponse(await run_in_threadpool(_figures, params, None))
    except serverless.ServerlessError as exc:
        return JSONResponse({"error": str(exc)}, status_code=502)


async def _stream(params: Parameters) -> AsyncIterator[bytes]:
    """The run's messages, one JSON object per line, as they come from its thread."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Message | None] = asyncio.Queue()

    def send(message: Message | None) -> None:  # from the run's threads
        loop.call_soon_threadsafe(queue.put_nowait, message)

    async def work() -> None:
        try:
            figures = await run_in_threadpool(_figures, params, send)  # this request's context
            message: Message = {"type": "result", "figures": figures}
        except Exception as exc:  # the page shows it; a bug is also logged
            if not isinstance(exc, serverless.ServerlessError):
                logger.exception("the demo's run failed")
            message = {"type": "error", "error": f"{type(exc).__name__}: {exc}"}
        queue.put_nowait(message)
        queue.put_nowait(None)

    task = asyncio.create_task(work())
    _running.add(task)
    task.add_done_callback(_running.discard)
    while (message := await queue.get()) is not None:
        yield (json.dumps(message, separators=(",", ":")) + "\n").encode()


def _figures(params: Parameters, send: Callable[[Message], None] | None) -> Message:
    """Run once (in a thread that carries the request's context), telling `send` how it goes."""
    count, workers, latency, seed = params
    geocoder = f"{os.environ['SERVERLESS_DEMO_GEOCODER']}/?latency={latency}"
    quota = float(os.environ.get("SERVERLESS_DEMO_QUOTA") or 0) or None  # --quota, --rate
    rate = os.environ.get("SERVERLESS_DEMO_RATE") or None
    serial = measure_serial(geocoder) if count else None
    if send is not None and serial is not None:
        send({"type": "serial", **serial})
    live = _Live(send) if send is not None else None
    result = run(
        geocoder,
        count,
        workers,
        seed,
        rate=rate,
        quota=quota,
        serial=serial,
        share=LIVE_SHARE,
        progress=live,
    )
    result["latency"] = latency
    result["report"] = "\n".join([report(result), *notes(result)])
    return result


class _Live:
    """progress= for the page: each serverless.Progress event as a message, its new chunks
    placed on the run's timeline as the figures place them (seconds since the run started).
    Called on the library's thread: it only builds a dict and hands it over."""

    def __init__(self, send: Callable[[Message], None]) -> None:
        self.send = send
        self.started = time.perf_counter()
        self.offsets: dict[int, float] = {}  # when each step started, in the run

    def __call__(self, event: serverless.Progress) -> None:
        offset = self.offsets.setdefault(
            event.step_number, time.perf_counter() - self.started - event.elapsed
        )
        chunks = [
            {
                "step": event.step,
                "index": c.index,
                "size": c.size,
                "worker": c.worker,
                "start": offset + c.start,
                "end": offset + c.end,
                "attempts": c.attempts,
                "throttles": c.throttles,
            }
            for c in event.new_chunks
        ]
        message = {f.name: getattr(event, f.name) for f in fields(event) if f.name != "new_chunks"}
        self.send({"type": "progress", **message, "offset": offset, "chunks": chunks})


def _parameters(query: Any) -> Parameters | str:
    try:
        count = int(query.get("count", 3000))
        workers = int(query.get("workers", 100))
        latency = float(query.get("latency", 0.1))
        seed = int(query["seed"]) if query.get("seed") else None
    except ValueError:
        return "count, workers and seed must be integers, latency a number"
    for name, value in (("count", count), ("workers", workers), ("latency", latency)):
        low, high = LIMITS[name]
        if not low <= value <= high:
            return f"{name} must be between {low} and {high}"
    return count, workers, latency, seed


def self_url(host: str, port: int) -> str:
    """The worker route on the address the server binds (loopback for a wildcard)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{ROUTE}"


def create_app() -> Any:
    """The ASGI app: uvicorn's factory (each process builds its own)."""
    route = serverless.init(ROUTE, threads=256)  # secret from $SERVERLESS_SECRET
    app = Starlette(
        routes=[Route("/", _page), Route("/api/run", _run, methods=["POST"])],
    )
    return route.asgi(app)


def serve(args: argparse.Namespace, geocoder_url: str) -> int:
    import uvicorn

    os.environ["SERVERLESS_DEMO_GEOCODER"] = geocoder_url
    os.environ["SERVERLESS_DEMO_QUOTA"] = repr(args.quota) if args.quota else ""
    os.environ["SERVERLESS_DEMO_RATE"] = str(args.rate) if args.rate else ""
    os.environ.setdefault("SERVERLESS_SECRET", secrets.token_hex(32))
    # The steps call back into this very server, through its own address: never to the Host
    # a browser (or anyone) sends (docs/security.md).
    os.environ.setdefault("SERVERLESS_SELF_URL", self_url(args.host, args.port))
    raise_open_files_limit()
    uvicorn.run(
        "serverless.demo.web:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.processes,
        backlog=2048,
        log_level="warning",
        timeout_graceful_shutdown=5,
        **uvicorn_settings(keep_alive=5),
    )
    return 0
