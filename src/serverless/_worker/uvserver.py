"""uvicorn settings that close slow and idle connections (slowloris).

uvicorn (0.54) arms no timer until a first response: a connection that sends nothing, or its
headers one byte at a time, stays open forever (each byte even cancels the keep-alive timer),
and httptools puts no limit on header bytes. GuardedHttpTools adds, per connection, a header
deadline from the first byte of each request (or from the connection, for the first) and a
cap on header bytes; the keep-alive timeout still closes idle connections between requests.
Bodies are timed by the worker route itself (_worker/asgi.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .._exceptions import ConfigurationError

HEADER_TIMEOUT_ENV = "SERVERLESS_HEADER_TIMEOUT"
DEFAULT_HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 64 * 1024  # nginx's large_client_header_buffers is 4 x 8k


def header_timeout() -> float:
    raw = os.environ.get(HEADER_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_HEADER_TIMEOUT
    except ValueError:
        raise ConfigurationError(f"${HEADER_TIMEOUT_ENV} must be seconds, not {raw!r}") from None
    if not value > 0:
        raise ConfigurationError(f"${HEADER_TIMEOUT_ENV} must be positive, not {raw!r}")
    return value


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a header size cap."""

    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _timeout = header_timeout()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        counting = self._header_timer is not None
        super().data_received(data)
        if counting and self._header_timer is not None:  # the headers are still incomplete
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._expire()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(self._timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._disarm()
        with contextlib.suppress(AttributeError, RuntimeError):
            if not self.transport.is_closing():
                self.transport.close()


def uvicorn_settings(keep_alive: int = 75) -> dict[str, Any]:
    """Keyword arguments for uvicorn.Config / uvicorn.run: the guarded protocol and the idle
    timeout between requests."""
    return {"http": GuardedHttpTools, "timeout_keep_alive": keep_alive}


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: 1,024 idle sockets must not lock
    out every caller (the header deadline then closes them)."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
