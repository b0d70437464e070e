"""A lean HTTP/1.1 client for the dispatcher's one request shape: POST bytes, read bytes.

Keep-alive connections per host, request head and body in one write, responses parsed by
httptools (already installed with uvicorn). Profiled on the W2 one-item-per-request workload,
aiohttp spent ~70% of the caller's ~300 us per request in its own machinery; this client does
the same job in a fraction of that (docs/performance.md). It does not follow redirects, use
proxies or decompress: the worker route needs none of that.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from .._wire import Response

_COPY_LIMIT = 64 * 1024  # smaller bodies are joined to the head: one write, one segment
_FILES_POLL = 0.5  # the longest a request at the open-files limit waits before it tries again

# Host names this process reaches at an address their owner sets, never through a resolver
# or a port someone else could take: the local pool's workers, one name per slot
# (_pool/pool.py), each the worker's Unix socket in the pool's 0700 directory. A request over
# it skips the TCP stack (W3's round trip ~0.04 ms shorter), and no other local user can bind
# it: after a worker died, its loopback port was bound by another user and received the
# retries' signed chunks, items in clear (issue 22). The names lie in `.invalid`, which no
# resolver answers (RFC 6761): one this process does not know is refused at once. When the
# worker behind a name dies, a connection waits for its replacement. The pid guards against a
# forked child using its parent's pool.
PRIVATE_DOMAIN = ".invalid"
_REPLACED_POLL = 0.02  # seconds between looks for the replacement of a dead worker


@dataclass
class _Private:
    address: str | int | None  # a Unix socket's path, a loopback port; None: being replaced
    pid: int
    gone: Callable[[], None]  # tells the owner its worker is gone: replace it now
    patience: float  # seconds a connection waits for a replacement


_private: dict[str, _Private] = {}


def reach_privately(
    host: str,
    address: str | int | None,
    gone: Callable[[], None] = lambda: None,
    patience: float = 60.0,
) -> None:
    """Reach http://host/ (a name in PRIVATE_DOMAIN) at `address`: a Unix socket's path, or a
    port on 127.0.0.1 where there is no Unix socket; None while its worker is replaced."""
    assert host.endswith(PRIVATE_DOMAIN), host
    _private[host] = _Private(address, os.getpid(), gone, patience)


def forget_private(host: str) -> None:
    """`host` is no way to anything any more (its pool was closed)."""
    _private.pop(host, None)


def is_private(host: str) -> bool:
    """Whether this process reaches `host` through reach_privately (so: on this host)."""
    entry = _private.get(host)
    return entry is not None and entry.pid == os.getpid()


class TransportError(Exception):
    """The connection failed or the answer was not HTTP: a retry elsewhere may help."""


class _OutOfFiles(TransportError):
    """The process is at its open-files limit (EMFILE, ENFILE): a connection frees one."""


def _connect_error(what: str, exc: OSError) -> TransportError:
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return _OutOfFiles(f"cannot connect to {what}: {exc}")
    hint = ""
    if isinstance(exc, ConnectionRefusedError):
        hint = ": nothing listens there (is the worker running? check the URL's host and port)"
    elif isinstance(exc, socket.gaierror):
        hint = ": the host name does not resolve (check the URL's host)"
    return TransportError(f"cannot connect to {what}: {exc}{hint}")


class StaleConnection(TransportError):
    """A kept-alive connection failed before any byte of an answer: most often the server
    closed it while idle, so sending again on a fresh one is right; but the server may have
    received the request, so the caller sends it again signed anew (a new request id), never
    the same bytes, which a worker would refuse as a replay."""


class InvalidURL(ValueError):
    pass


class ReplyTooLarge(Exception):
    """The answer is larger than the caller accepts: nothing a retry would change."""


@dataclass(frozen=True)
class _Origin:
    host: str
    port: int
    tls: bool
    path: str
    prefix: str  # the request line and Host: the same for every request


class Body:
    """A request body the connection lets go of once written, so a caller with many chunks in
    flight holds each encoded chunk only until the kernel (or asyncio's buffer) has taken it."""

    __slots__ = ("_data", "size")

    def __init__(self, data: bytes) -> None:
        self._data, self.size = data, len(data)

    def take(self) -> bytes:
        data, self._data = self._data, b""
        return data


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, max_reply: int) -> None:
        self.max_reply = max_reply
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._received = False
        self._framed = False  # Content-Length or chunked: the end is not the connection's close

    # -- protocol callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's, always

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransportError(f"malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._status and not self._framed:  # a body delimited by the connection's close
            self._complete()
        else:
            self._fail(TransportError(f"connection lost: {exc!r}" if exc else "connection closed"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        # kept: the content type; the reply's signature (Serverless-*) and Retry-After (how
        # long an overloaded target asks the caller to hold off), at most 16 of those
        if lower == b"content-type" or (
            (lower == b"retry-after" or lower.startswith(b"serverless-"))
            and len(self._headers) < 16
        ):
            self._headers[lower.decode("latin-1")] = value.decode("latin-1")
        elif lower == b"content-length":
            self._framed = True
            if value.strip().isdigit() and int(value) > self.max_reply:
                self._too_large(f"announces {int(value)} bytes")
        elif lower == b"transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_reply:
            self._too_large(f"exceeds {self.max_reply} bytes")
            return
        self._body.append(body)

    def _too_large(self, what: str) -> None:
        """Stop reading at once: an answer is held in memory, so its size is bounded."""
        self._body = []
        self._fail(ReplyTooLarge(f"the answer {what}, over the {self.max_reply}-byte limit"))
        self.close()

    def on_message_complete(self) -> None:
        self._framed = True
        if not self._parser.should_keep_alive():
            self.close()
        self._complete()

    # -- requests --------------------------------------------------------------------------

    def _complete(self) -> None:
        self._disarm()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            self._body = []  # an idle connection must not keep its last answer alive
            waiter.set_result(Response(self._status, self._headers, body))

    def _fail(self, exc: Exception) -> None:
        self._disarm()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self._fail(asyncio.TimeoutError())
        self.close()  # an answer may still be on its way: this stream is unusable

    def send(self, head: bytes, body: bytes, deadline: float) -> asyncio.Future[Response]:
        """Write the request; the future fails with asyncio.TimeoutError at `deadline` (the
        loop's clock). A timer on the future, not asyncio.wait_for: on Python < 3.12 that
        wraps every request in a task of its own (~10 us of the caller's CPU per request)."""
        assert self.transport is not None and self._waiter is None
        if self.closed or self.transport.is_closing():  # closed by the server on arrival (a
            raise TransportError("connection closed")  # worker at its open-files limit)
        self._reset()
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._timer = loop.call_at(deadline, self._expire)
        if len(body) <= _COPY_LIMIT:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        return self._waiter

    @property
    def received_anything(self) -> bool:
        return self._received

    def close(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()


class Client:
    """Keep-alive connection pools per origin; use from one event loop."""

    def __init__(self, max_reply: int) -> None:
        self.max_reply = max_reply
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._out_of_files: collections.deque[asyncio.Future[None]] = collections.deque()

    def _origin(self, url: str) -> _Origin:
        origin = self._origins.get(url)
        if origin is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidURL(url)
            tls = parts.scheme == "https"
            try:
                port = parts.port or (443 if tls else 80)
            except ValueError as exc:
                raise InvalidURL(url) from exc
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.netloc.rpartition("@")[2]
            prefix = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            origin = _Origin(parts.hostname, port, tls, path, prefix)
            self._origins[url] = origin
        return origin

    async def _connect(self, origin: _Origin) -> _Connection:
        context: Any = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        if origin.host.endswith(PRIVATE_DOMAIN):
            return await self._connect_private(origin)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self.max_reply), origin.host, origin.port, ssl=context
            )
        except OSError as exc:
            raise _connect_error(f"{origin.host}:{origin.port}", exc) from exc
        return conn

    async def _connect_private(self, origin: _Origin) -> _Connection:
        """Connect to the address behind a private name; if its worker is gone, to the one
        that replaces it (never to the dead one's address, and never over DNS or TCP to a
        port the name was not given)."""
        loop = asyncio.get_running_loop()
        waited_since: float | None = None
        while True:
            entry = _private.get(origin.host)
            if entry is None or entry.pid != os.getpid():
                raise TransportError(
                    f"{origin.host} is unknown to this process (a closed local pool, or one "
                    "started by the process this one was forked from)"
                )
            address = entry.address
            if address is not None:
                try:
                    if isinstance(address, str):
                        _, conn = await loop.create_unix_connection(
                            lambda: _Connection(self.max_reply), address
                        )
                    else:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(self.max_reply), "127.0.0.1", address
                        )
                    return conn
                except (ConnectionRefusedError, FileNotFoundError):
                    pass  # nothing listens there any more: its worker died
                except OSError as exc:
                    raise _connect_error(origin.host, exc) from exc
            entry.gone()
            now = loop.time()
            waited_since = now if waited_since is None else waited_since
            if now - waited_since > entry.patience:
                raise TransportError(
                    f"{origin.host}: its worker died and was not replaced within "
                    f"{entry.patience:.0f}s"
                )
            while _private.get(origin.host) is entry and entry.address == address:
                await asyncio.sleep(_REPLACED_POLL)
                if loop.time() - waited_since > entry.patience:
                    break

    def _take(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def post(
        self,
        url: str,
        body: bytes | Body,
        headers: Mapping[str, str],
        timeout: float,
        *,
        fresh: bool = False,
    ) -> Response:
        """POST `body`; raises TransportError, InvalidURL or asyncio.TimeoutError.
        fresh: on a new connection (never StaleConnection), not a kept-alive one."""
        body = body if isinstance(body, Body) else Body(body)
        origin = self._origin(url)
        fields = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        head = f"{origin.prefix}{fields}Content-Length: {body.size}\r\n\r\n"
        deadline = asyncio.get_running_loop().time() + timeout
        if not fresh:  # one turn of the loop: a close the server sent after its last answer is
            await asyncio.sleep(0)  # read first (the transport is then closing)
        taken = None if fresh else self._take(origin)
        if taken is not None:
            conn, reused = taken, True
        else:
            conn, reused = await asyncio.wait_for(self._open(origin, fresh), timeout)
        try:
            # UTF-8: a function may have a non-ASCII name
            response = await conn.send(head.encode(), body.take(), deadline)
        except TransportError as exc:
            conn.close()
            if reused and not conn.received_anything:
                raise StaleConnection(str(exc)) from exc
            raise
        except BaseException:  # cancelled or timed out mid-request: the stream is unusable
            conn.close()
            raise
        finally:
            self._freed()
        if not conn.closed:
            self._idle.setdefault(origin, []).append(conn)
        return response

    async def _open(self, origin: _Origin, fresh: bool) -> tuple[_Connection, bool]:
        """A new connection (and False), or at the open-files limit an idle one (and True):
        a call 10,000 wide holds a connection per chunk in flight, and where the hard limit
        is lower (4,096) a connection failed with "Too many open files". At the limit, an idle
        connection to another origin is closed, or the request waits for one to end."""
        while True:
            try:
                return await self._connect(origin), False
            except _OutOfFiles:
                conn = None if fresh else self._take(origin)
                if conn is not None:
                    return conn, True
                if self._drop_idle():
                    await asyncio.sleep(0)  # the loop closes its descriptor
                    continue
                waiter = asyncio.get_running_loop().create_future()
                self._out_of_files.append(waiter)
                try:  # woken when a request ends; the bound covers a wake-up lost elsewhere
                    await asyncio.wait([waiter], timeout=_FILES_POLL)
                finally:
                    waiter.cancel()

    def _drop_idle(self) -> bool:
        """Close one idle connection, to free its descriptor; False if there is none."""
        for idle in self._idle.values():
            while idle:
                conn = idle.pop(0)
                if not conn.closed:
                    conn.close()
                    return True
        return False

    def _freed(self) -> None:
        """A request ended: its connection is idle or closed; wake one waiting for a file."""
        while self._out_of_files:
            waiter = self._out_of_files.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
