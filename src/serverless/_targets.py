"""Choosing where chunks go: a URL, the current request's own app, or the local pool."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from . import _pool, _registry
from ._config import settings
from ._context import current_origin
from ._dispatch import Target
from ._exceptions import ConfigurationError

logger = logging.getLogger("serverless")


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def resolve(url: str | None = None, *, blocking: bool = False) -> Target:
    """In order: `url` / init(url=) / SERVERLESS_URL; the app serving this request; local.

    blocking: the caller will block this thread until the call is done.
    """
    config = settings()
    url = url or config.target_url()
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(f"worker URL must be http(s)://host[:port]/route: {url!r}")
        keyring = config.caller_keyring()
        if keyring is None:
            raise ConfigurationError(
                f"a secret is needed to call {url}: pass secret= to serverless.init() "
                "or set SERVERLESS_SECRET"
            )
        return Target((url,), parts.path or "/", keyring, "url", config.max_body)
    origin = current_origin.get()
    if origin is not None and origin.concurrent and not (blocking and _loop_running()):
        return Target(
            (origin.checked_url(),), origin.route, origin.keyring, "self", config.max_body
        )
    if origin is not None:
        logger.warning(
            "not calling back into %s: the server could not answer while this request waits "
            "(a single-threaded WSGI server, or a blocking call on the event loop: use "
            "`await f.aio(items)` there); using the local pool instead",
            origin.url,
        )
    pool = _pool.get_pool(config.local_processes, config.local_threads, _registry.modules())
    return Target(tuple(pool.urls), pool.route, pool.keyring, "local", config.max_body)
