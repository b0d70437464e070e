"""A standalone worker server: `serverless worker MODULE...` and the app factories behind it.

The factories read their settings from the environment so that every server command is one
line: `uvicorn --factory serverless:worker_asgi`, `gunicorn 'serverless:worker_wsgi()'`, or
`serverless worker` itself, which runs uvicorn (with its own process supervisor for
`--processes N`) on `worker_asgi`.

SERVERLESS_MODULES  modules to import, comma-separated (their @parallel functions register)
SERVERLESS_SECRET   the HMAC secret, or several separated by commas during a key rotation
SERVERLESS_ROUTE    the worker route (default /serverless)
SERVERLESS_THREADS  threads per process for sync functions (ASGI; default 64)
SERVERLESS_HEALTH   the health route (default /healthz)
SERVERLESS_SELF_URL, SERVERLESS_TRUSTED_HOSTS  where a function that fans out again from a
                    worker may call back (docs/security.md)
SERVERLESS_HEADER_TIMEOUT  seconds a request's headers may take (default 10)
SERVERLESS_BODY_TIMEOUT, SERVERLESS_BODY_MIN_RATE, SERVERLESS_BODY_DEADLINE  how an
                    unauthenticated body must come (default 10 s idle, 64 KiB/s, 60 s in all)
SERVERLESS_STATE_DIR  the directory of the per-host replay store
SERVERLESS_METRICS  the path of the Prometheus metrics (default /metrics), or "off"; served
                    where prometheus_client is installed (_worker/metrics.py)
OTEL_*              where OTEL_TRACES_EXPORTER=otlp or an OTEL_EXPORTER_OTLP_ENDPOINT asks for
                    traces and the SDK is installed, each chunk's span goes there (telemetry.py)
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._config import secrets_from_env
from .._exceptions import ConfigurationError
from .._wire import DEFAULT_ROUTE
from . import metrics as _metrics
from .asgi import ASGIEndpoint, Receive, Scope, Send
from .route import WorkerRoute, init
from .telemetry import configure_sdk, flush_sdk_async
from .wsgi import StartResponse, WSGIEndpoint

logger = logging.getLogger("serverless.serve")

DEFAULT_HEALTH = "/healthz"
DEFAULT_THREADS = 64
WARMUP = "/_ah/warmup"  # App Engine's warmup request; answered like the health route

_OK = b"ok"
_STUCK = b"stuck: every thread runs a chunk past its deadline"
_HEADERS = [("content-type", "text/plain"), ("content-length", str(len(_OK)))]


def import_modules(modules: Iterable[str]) -> list[str]:
    """Import each module (registering its functions); the ones that registered none."""
    from .. import _registry

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `serverless worker app` finds ./app.py, as uvicorn does
    wanted = [m for m in modules if m]
    for name in wanted:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import worker module {name!r}: {exc}") from exc
    registered = set(_registry.modules())
    return [m for m in wanted if m not in registered]


def _env_modules() -> list[str]:
    return [m.strip() for m in os.environ.get("SERVERLESS_MODULES", "").split(",") if m.strip()]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ConfigurationError(f"${name} must be an integer, not {raw!r}") from None
    if value < 1:
        raise ConfigurationError(f"${name} must be at least 1, not {value}")
    return value


def _env_metrics() -> str | None:
    """$SERVERLESS_METRICS: the metrics' path, None for "off"."""
    raw = os.environ.get("SERVERLESS_METRICS", "").strip()
    if raw.lower() in ("off", "false", "0", "no"):
        return None
    return raw or _metrics.DEFAULT_PATH


def _route(
    modules: Sequence[str] | None,
    route: str | None,
    secret: str | Sequence[str] | None,
    threads: int | None,
    serving: bool = True,  # False: only check the settings (the parent of --processes N)
) -> tuple[WorkerRoute, str]:
    if serving:
        configure_sdk()  # before the modules: a function's own tracer finds the provider
    mods = list(modules) if modules is not None else _env_modules()
    if not mods:
        raise ConfigurationError("name the modules to serve (or set SERVERLESS_MODULES)")
    secret = secret or secrets_from_env()
    if not secret:
        raise ConfigurationError("the worker needs a secret: set SERVERLESS_SECRET")
    missing = import_modules(mods)
    if missing:
        logger.warning("no @serverless.parallel function registered by %s", ", ".join(missing))
    threads = threads or _env_int("SERVERLESS_THREADS", DEFAULT_THREADS)
    metrics = _env_metrics()
    worker = init(
        route or os.environ.get("SERVERLESS_ROUTE") or DEFAULT_ROUTE,
        secret,
        threads=threads,
        metrics=(metrics or False) if serving else False,
    )
    if worker.endpoint.replay_refusal:  # a dedicated worker refuses to start (fail closed)
        raise ConfigurationError(worker.endpoint.replay_refusal)
    health = os.environ.get("SERVERLESS_HEALTH") or DEFAULT_HEALTH
    if not health.startswith("/") or health == worker.route:
        raise ConfigurationError("the health route must be a path other than the worker route")
    if metrics is not None and (not metrics.startswith("/") or metrics in (health, WARMUP)):
        raise ConfigurationError(
            "the metrics path must be a path other than the worker and health routes"
        )
    return worker, health


def worker_asgi(
    modules: Sequence[str] | None = None,
    *,
    route: str | None = None,
    secret: str | Sequence[str] | None = None,
    threads: int | None = None,
) -> ASGIEndpoint:
    """An ASGI app serving the worker route and the health route; arguments default to the
    environment (see the module docstring). `uvicorn --factory serverless:worker_asgi`."""
    worker, health = _route(modules, route, secret, threads)
    probe = _AsgiHealth(health)
    app = worker.asgi(probe)
    probe.ready = app.ready  # the health route runs on the loop: it must ask the threads
    return app


def worker_wsgi(
    modules: Sequence[str] | None = None,
    *,
    route: str | None = None,
    secret: str | Sequence[str] | None = None,
) -> WSGIEndpoint:
    """A WSGI app serving the worker route and the health route; arguments default to the
    environment. `gunicorn -k gthread --threads 16 'serverless:worker_wsgi()'`."""
    worker, health = _route(modules, route, secret, None)  # threads: the WSGI server's
    return worker.wsgi(_WsgiHealth(health))


class _AsgiHealth:
    """GET/HEAD on the health (or warmup) path: 200 "ok", nothing else; 404 elsewhere.
    503 "stuck" when every thread runs a chunk past its caller's deadline (a gthread WSGI
    server needs no such check: its health request waits for a thread, and times out)."""

    def __init__(self, path: str) -> None:
        self.paths = (path, WARMUP)
        self.ready: Callable[[], bool] = lambda: True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rpartition(".")[2]
                if kind == "shutdown":
                    await flush_sdk_async()  # the last spans, before uvicorn ends the process
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        found = scope["path"] in self.paths
        status = 200 if found and scope["method"] in ("GET", "HEAD") else 405 if found else 404
        if status == 200 and not self.ready():
            status = 503
        body = _OK if status == 200 else _STUCK if status == 503 else b""
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )


class _WsgiHealth:
    """The WSGI twin of _AsgiHealth."""

    def __init__(self, path: str) -> None:
        self.paths = (path, WARMUP)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        found = environ.get("PATH_INFO") in self.paths
        method = environ.get("REQUEST_METHOD", "")
        if found and method in ("GET", "HEAD"):
            start_response("200 OK", _HEADERS)
            return [] if method == "HEAD" else [_OK]
        status = "405 Method Not Allowed" if found else "404 Not Found"
        start_response(status, [("content-type", "text/plain"), ("content-length", "0")])
        return []


def serve(
    modules: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    route: str = DEFAULT_ROUTE,
    health: str = DEFAULT_HEALTH,
    processes: int = 1,
    threads: int = DEFAULT_THREADS,
    graceful_timeout: int = 300,
    keep_alive: int = 75,
    log_level: str = "info",
    metrics: str | None = _metrics.DEFAULT_PATH,
) -> None:
    """Run uvicorn on worker_asgi until SIGTERM/SIGINT, then finish in-flight chunks.

    modules: those to import; if empty, $SERVERLESS_MODULES (comma-separated).
    metrics: the path of the Prometheus metrics (None: none). With several processes, they
    share a private directory of figures (prometheus_client's multiprocess mode), removed at
    the end, so that any process's answer sums them all.
    """
    import uvicorn

    if processes < 1 or threads < 1:
        raise ConfigurationError("--processes and --threads must be at least 1")
    modules = list(modules) or _env_modules()
    if not modules:
        raise ConfigurationError("name the modules to serve (or set SERVERLESS_MODULES)")
    # Check everything here, in the parent, so a mistake is one clear error, not N crashes;
    # the environment then carries the settings to uvicorn's worker processes.
    os.environ["SERVERLESS_MODULES"] = ",".join(modules)
    os.environ["SERVERLESS_ROUTE"] = route
    os.environ["SERVERLESS_HEALTH"] = health
    os.environ["SERVERLESS_THREADS"] = str(threads)
    os.environ["SERVERLESS_METRICS"] = metrics or "off"
    _route(modules, route, None, threads, serving=False)
    from .uvserver import raise_open_files_limit, uvicorn_settings  # uvicorn: only to serve

    raise_open_files_limit()
    shared = metrics is not None and processes > 1 and _metrics.installed()
    with _metrics.multiprocess_dir() if shared else contextlib.nullcontext():
        uvicorn.run(
            "serverless._worker.serve:worker_asgi",
            factory=True,
            host=host,
            port=port,
            workers=processes,
            lifespan="on",  # its shutdown flushes the last spans
            access_log=False,
            log_level=log_level,
            timeout_graceful_shutdown=graceful_timeout,
            backlog=4096,
            server_header=False,
            **uvicorn_settings(keep_alive),
        )
