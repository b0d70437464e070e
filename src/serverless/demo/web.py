"""`serverless demo --web`: the seed's architecture for real.

One Starlette app serves the page, a JSON API that runs the pipeline, and the worker route,
all from the same uvicorn processes: the parallel steps call back into the app itself
(target "self"), as the seed's App Engine app did. Several uvicorn processes share the port,
so the chunks spread over them like requests over App Engine instances.
"""

from __future__ import annotations

import argparse
import os
import secrets
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

import serverless
from serverless._worker.uvserver import raise_open_files_limit, uvicorn_settings

from .pipeline import run

ROUTE = "/serverless"
LIMITS = {"count": (0, 20000), "workers": (1, 500), "latency": (0.0, 2.0)}


def _page(request: Request) -> Response:
    return HTMLResponse(files(__package__).joinpath("page.html").read_text(encoding="utf-8"))


def _run(request: Request) -> Response:
    """POST /api/run {count, workers, latency, seed}: the figures, as `serverless demo --json`.

    A sync handler: Starlette runs it in a thread with the request's context, so the steps
    see the app serving this request and call back into it."""
    params = _parameters(request.query_params)
    if isinstance(params, str):
        return JSONResponse({"error": params}, status_code=400)
    count, workers, latency, seed = params
    geocoder = f"{os.environ['SERVERLESS_DEMO_GEOCODER']}/?latency={latency}"
    quota = float(os.environ.get("SERVERLESS_DEMO_QUOTA") or 0) or None  # --quota, --rate
    rate = os.environ.get("SERVERLESS_DEMO_RATE") or None
    try:
        result = run(geocoder, count, workers, seed, rate=rate, quota=quota)
    except serverless.ServerlessError as exc:
        return JSONResponse({"error": str(exc)}, status_code=502)
    result["latency"] = latency
    return JSONResponse(result)


def _parameters(query: Any) -> tuple[int, int, float, int | None] | str:
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
