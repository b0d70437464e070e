"""uvicorn settings that close slow and idle connections (slowloris).

uvicorn (0.54) arms no timer until a first response: a connection that sends nothing, or its
headers one byte at a time, stays open forever (each byte even cancels the keep-alive timer),
and httptools puts no limit on header bytes. GuardedHttpTools adds, per connection, a header
deadline from the first byte of each request (or from the connection, for the first) and a
cap on header bytes; the keep-alive timeout still closes idle connections between requests.
Bodies are timed by the worker route itself (_worker/asgi.py).

Deadlines free a connection only when they expire: meanwhile, a few hundred idle or trickling
connections can take every descriptor the process may open, and then no caller gets in (at a
1,024 limit, 1,100 idle connections refused every call until the header timeout). So each
process keeps its connections below the open-files limit, less a reserve for what else it
opens: beyond that, each new connection sheds the one that has been idle, or sending an
incomplete request, the longest. A connection whose request is complete (a chunk running)
is never shed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .admission import MAX_HEADER_BYTES, connection_cap, header_timeout

logger = logging.getLogger("serverless.worker")


class Connections:
    """A process's open connections, and those it may shed: idle, or whose request is not
    complete yet (for the worker route: not authenticated yet), longest in that state first."""

    def __init__(self) -> None:
        self.open = 0
        self.cap: int | None = None  # read at the first connection, once the limit is set
        self.sheddable: dict[GuardedHttpTools, None] = {}  # insertion order: oldest first
        self.shed_count = 0
        self._logged = 0.0

    def opened(self, conn: GuardedHttpTools) -> None:
        if self.cap is None:
            self.cap = connection_cap()
        self.open += 1
        self.mark(conn)
        while self.open > self.cap:
            oldest = next(iter(self.sheddable), None)
            if oldest is None or oldest is conn:
                break  # every other connection runs a request: the limit itself refuses
            self.shed(oldest)

    def closed(self, conn: GuardedHttpTools) -> None:
        self.sheddable.pop(conn, None)
        if not conn.shed:
            self.open -= 1

    def mark(self, conn: GuardedHttpTools) -> None:
        """`conn` is now idle or starts a request: last in line to be shed."""
        self.sheddable.pop(conn, None)
        if not conn.shed:
            self.sheddable[conn] = None

    def settle(self, conn: GuardedHttpTools) -> None:
        """`conn` holds a complete request: never shed."""
        self.sheddable.pop(conn, None)

    def shed(self, conn: GuardedHttpTools) -> None:
        self.sheddable.pop(conn, None)
        conn.shed = True
        self.open -= 1  # counted now: its close completes on a later turn of the loop
        self.shed_count += 1
        now = time.monotonic()
        if now - self._logged >= 60:
            self._logged = now
            logger.warning(
                "at the open-files limit (%d connections): shedding the longest idle or "
                "incomplete ones (%d so far)",
                self.cap,
                self.shed_count,
            )
        with contextlib.suppress(AttributeError, RuntimeError):
            conn.transport.close()


_connections = Connections()


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size cap, and shedding
    at the open-files limit."""

    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _timeout = header_timeout()
    shed = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        _connections.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        _connections.closed(self)
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
        _connections.mark(self)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.cycle is not None and not self.cycle.response_complete:
            _connections.settle(self)  # answered early: it stays sheddable

    def on_response_complete(self) -> None:
        super().on_response_complete()
        idle = self.cycle is None or self.cycle.response_complete  # no pipelined request
        if idle and not self.transport.is_closing():
            _connections.mark(self)  # until its next request

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
