"""The worker route: `serverless.init()` configures this process and returns it, to mount."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._config import configure, secrets_from_env
from .._exceptions import ConfigurationError
from .._wire import DEFAULT_ROUTE, MAX_BODY, TOLERANCE, Keyring
from . import metrics as _metrics
from .asgi import ASGIApp, ASGIEndpoint
from .endpoint import Endpoint
from .origin import OriginPolicy
from .wsgi import WSGIApp, WSGIEndpoint


class WorkerRoute:
    """The worker endpoint returned by init(), ready to mount in a WSGI or ASGI app.

    app.wsgi_app = route.wsgi(app.wsgi_app)        # Flask
    application = route.wsgi(get_wsgi_application())  # Django, in wsgi.py
    app.add_middleware(route.asgi)                  # FastAPI / Starlette
    """

    def __init__(self, endpoint: Endpoint, threads: int) -> None:
        self.endpoint = endpoint
        self.threads = threads

    @property
    def route(self) -> str:
        return self.endpoint.route

    def wsgi(self, app: WSGIApp | None = None) -> WSGIEndpoint:
        """A WSGI app serving the route; wraps `app` for every other path, if given."""
        return WSGIEndpoint(self.endpoint, app)

    def asgi(self, app: ASGIApp | None = None) -> ASGIEndpoint:
        """An ASGI app serving the route; wraps `app` for every other path, if given."""
        return ASGIEndpoint(self.endpoint, app, threads=self.threads)


def init(
    route: str = DEFAULT_ROUTE,
    secret: str | Sequence[str] | None = None,
    url: str | None = None,
    *,
    max_body: int = MAX_BODY,
    tolerance: float = TOLERANCE,
    threads: int = 64,
    local_processes: int | None = None,
    local_threads: int | None = None,
    self_url: str | None = None,
    trusted_hosts: Sequence[str] | None = None,
    metrics: bool | str = True,
) -> WorkerRoute:
    """Configure this process as caller and return the worker route to mount.

    route: the path of the worker route (also signed, so both sides must agree).
    secret: the HMAC secret, or several during a key rotation (the first signs, all verify);
        defaults to $SERVERLESS_SECRET (several separated by commas).
    url: send chunks to this URL (a load balancer in front of workers) instead of calling
        back into the current request's app or using the local pool; or $SERVERLESS_URL.
        "local": the local pool, also for calls made while serving a request where the
        server cannot take its own chunks (a sync worker, a blocking call on the event loop).
    threads: threads of the ASGI adapter for sync functions (WSGI uses the server's).
    self_url, trusted_hosts: where call-back-to-self may go ($SERVERLESS_SELF_URL,
        $SERVERLESS_TRUSTED_HOSTS); never taken from a request's headers (docs/security.md).
    metrics: serve the worker's Prometheus metrics at /metrics (a path: there instead; False:
        nowhere) where prometheus_client is installed. Unauthenticated, as a health route is:
        it tells who can reach it the functions' names and counts (docs/deploy.md).
    """
    if not isinstance(route, str) or not route.startswith("/"):
        raise ConfigurationError(f"route must be a path starting with '/', not {route!r}")
    secret = secret or secrets_from_env()
    if not secret:
        raise ConfigurationError("serverless.init() needs a secret (or set SERVERLESS_SECRET)")
    keyring = Keyring(secret)
    changes: dict[str, Any] = {
        "route": route,
        "keyring": keyring,
        "url": url,
        "max_body": max_body,
        "local_processes": local_processes,
    }
    if local_threads is not None:
        changes["local_threads"] = local_threads
    configure(**changes)
    origins = OriginPolicy.configured(self_url, trusted_hosts)
    endpoint = Endpoint(
        route,
        keyring,
        max_body=max_body,
        tolerance=tolerance,
        origins=origins,
        metrics=metrics_path(metrics, route),
    )
    return WorkerRoute(endpoint, threads)


def metrics_path(metrics: bool | str, route: str) -> str | None:
    """Where init(metrics=) serves the metrics: a path other than the route, or None."""
    if metrics is False:
        return None
    path = _metrics.DEFAULT_PATH if metrics is True else metrics
    if not isinstance(path, str) or not path.startswith("/") or path == route:
        raise ConfigurationError(
            f"metrics must be True, False or a path starting with '/' other than the route, "
            f"not {metrics!r}"
        )
    return path
