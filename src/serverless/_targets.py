"""Choosing where chunks go: a URL, the current request's own app, or the local pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from . import _registry
from ._caller import http as _http
from ._caller.sharing import INLINE, SharedCall
from ._caller.transport import Target
from ._config import settings
from ._exceptions import ConfigurationError
from ._pool import byvalue as _byvalue
from ._pool import pool as _pool
from ._worker.context import Origin, current_origin
from ._worker.origin import is_loopback

# url="local": the local pool, even while serving a request (an explicit choice: a pool of
# processes inside a web server's process is never started unasked)
LOCAL = "local"


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_override: Target | None = None


@contextlib.contextmanager
def override(target: Target) -> Iterator[Target]:
    """Send every call in this process to `target` while the block runs, whatever the
    configuration: how tests put an in-process transport (`_caller/inprocess.InProcess`) under the
    calling forms without sockets."""
    global _override
    previous, _override = _override, target
    try:
        yield target
    finally:
        _override = previous


def resolve(
    url: str | None = None,
    *,
    blocking: bool = False,
    functions: Sequence[_registry.Entry] = (),
    retries: int = 0,
) -> Target:
    """In order: `url` / init(url=) / SERVERLESS_URL; the app serving this request; local.
    `url` LOCAL ("local") is the local pool, even while serving a request.

    blocking: the caller will block this thread until the call is done.
    functions: the call's functions; those of `__main__` go only to the local pool, by value.
    retries: the call's; with none, a chunk sent elsewhere is never also run here.
    """
    if _override is not None:
        return _override
    by_value = next((entry for entry in functions if _byvalue.is_main(entry)), None)
    config = settings()
    url = url or config.target_url()
    if url and url != LOCAL:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(f"worker URL must be http(s)://host[:port]/route: {url!r}")
        keyring = config.caller_keyring()
        if keyring is None:
            raise ConfigurationError(
                f"a secret is needed to call {url}: pass secret= to serverless.init() "
                "or set SERVERLESS_SECRET"
            )
        if by_value is not None:  # before any request: no code goes to a remote worker
            raise _byvalue.remote_refusal(by_value, f"the worker at {url}")
        return Target((url,), parts.path or "/", keyring, "url", config.max_body)
    origin = current_origin.get() if url != LOCAL else None
    if origin is not None and origin.concurrent and not (blocking and _loop_running()):
        url = origin.checked_url()
        # a local pool's worker calls back to itself with its caller's functions by value;
        # any other app would be sent code
        shelf = origin.endpoint.by_value if origin.endpoint is not None else None
        if by_value is not None and shelf is None:
            raise _byvalue.remote_refusal(by_value, f"the app serving this request ({url})")
        shared = None
        if blocking and origin.endpoint is not None and origin.threads is not None:
            # one host shares the replay store that makes a reclaim run at most once
            host = urlsplit(url).hostname or ""
            same_host = is_loopback(host) or _http.is_private(host)  # a local pool's worker
            shared = SharedCall(
                origin.endpoint,
                origin.threads,
                same_host or retries > 0,
                url=url,
                parent=not origin.chunk,
            )
        # a local pool's worker runs only the request ids of its slot, its own lane's too
        prefix = origin.endpoint.id_prefix if origin.endpoint is not None else ""
        return Target(
            (url,),
            origin.route,
            origin.keyring,
            "self",
            config.max_body,
            shared=shared,
            id_prefixes={url: prefix, INLINE: prefix} if prefix else None,
            shelf=shelf,
        )
    if origin is not None:  # never a pool hidden in a web server's process, unasked
        raise ConfigurationError(_cannot_call_back(origin, functions))
    if by_value is not None:
        _byvalue.require(by_value.qualname)  # before a pool starts
    pool = _pool.get_pool(
        config.local_processes,
        config.local_threads,
        _registry.modules(),
        _registry.redefinitions(),
    )
    return pool.target(config.max_body)


def _cannot_call_back(origin: Origin, functions: Sequence[_registry.Entry]) -> str:
    """Why a call made while serving a request cannot send its chunks back to the app serving
    it, and the ways out."""
    name = functions[0].name if functions else "the parallel function"
    if origin.concurrent:  # a blocking call on the event loop that serves the requests
        return (
            f"{name} was called with a blocking call (f(items), f.stream(items), ...) on the "
            "event loop that serves this app's requests: its chunks could not be served "
            "while the loop waits. In `async def` code use `await f.aio(items)` (or `async "
            "for r in f.astream(items)`), or make the view a plain `def` (the server runs it "
            f"in a thread); or send the chunks to separate workers: {_ELSEWHERE}"
        )
    return (
        f"{name} was called while serving a request on a server that runs one request at a "
        "time per process (gunicorn's default sync worker, or another single-threaded WSGI "
        "server): calling back into this app would wait on itself. Give the server threads "
        f"(gunicorn -k gthread --threads 8), or send the chunks to separate workers: {_ELSEWHERE}"
    )


_ELSEWHERE = (
    "serverless.init(url=...) or $SERVERLESS_URL naming their worker route, or "
    f'url="{LOCAL}" (init(url="{LOCAL}"), $SERVERLESS_URL={LOCAL}) to run them on a local pool '
    "of processes started inside this server process"
)
