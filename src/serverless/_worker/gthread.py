"""A gunicorn gthread worker that slow, idle and anonymous connections cannot lock up.

    gunicorn -k serverless._worker.gthread.Worker --threads 16 'app:app'

gunicorn 27's gthread worker hands a connection to a thread as soon as it is readable, and
the thread then blocks until the whole request has come: an idle connection holds a thread
for 5 s, a trickling head or body for as long as it trickles, a head has no deadline, and
callers queue behind them (the pool is first come, first served). At the open-files limit,
accept() fails with EMFILE, which ends the worker process. This worker reads each request on
its main loop, without blocking, until its head and its declared body are in (as a buffering
proxy does) and only then hands it to a thread. A request still incomplete when its deadline
passes (the header timeout for the head, `body_due` for the body) is closed; the bytes it
holds meanwhile are capped by a Budget (the oldest holder gives way); and beyond the
open-files limit less a reserve, each new connection sheds the one idle or incomplete the
longest. TLS and HTTP/2 connections, bodies without a length (chunked), bodies over the
protocol's limit and `Expect: 100-continue` go to a thread as gunicorn sends them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import selectors
import time
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

from .._wire import MAX_BODY
from .admission import MAX_HEADER_BYTES, Budget, Hold, body_due, connection_cap, header_timeout

logger = logging.getLogger("serverless.worker")

RECV = 256 * 1024  # bytes per recv() on the main loop
TICK = 0.25  # seconds between looks at the deadlines of the requests being read
_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([0-9]+)[ \t]*(?=\r\n|$)", re.IGNORECASE)
_OTHER = re.compile(rb"\r\n(?:transfer-encoding|expect)[ \t]*:", re.IGNORECASE)


def _body_length(head: bytes) -> int | None:
    """The declared body length, 0 without one; None if gunicorn must read the body itself
    (chunked, `Expect: 100-continue`, several lengths, or over the protocol's limit)."""
    if _OTHER.search(head):
        return None
    lengths = {int(m.group(1)) for m in _LENGTH.finditer(head)}
    if len(lengths) > 1 or (lengths and max(lengths) > MAX_BODY):
        return None
    return lengths.pop() if lengths else 0


class _Incoming:
    """A request being read on the main loop."""

    def __init__(self, hold: Hold, now: float) -> None:
        self.hold = hold
        self.since = now  # when it started: the head's deadline runs from here
        self.buf = bytearray()
        self.head_end = -1  # where the body starts, once the head is in
        self.need = -1  # head and body, once the head is in
        self.body_since = now
        self.last = now

    def due(self, head_timeout: float) -> float:
        if self.head_end < 0:
            return self.since + head_timeout
        return body_due(self.body_since, self.last, len(self.buf) - self.head_end)


class Worker(ThreadWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    """gthread, reading each request on the main loop before a thread runs it."""

    def init_process(self) -> None:
        self.cap = min(connection_cap(), self.cfg.worker_connections)
        self.worker_connections = 1 << 62  # never stop accepting: beyond the cap, shed
        self.head_timeout = header_timeout()
        self.budget = Budget()
        self.incoming: dict[TConn, _Incoming] = {}  # insertion order: the oldest first
        self.looked = 0.0
        self.shed_count = 0
        self.logged = 0.0
        super().init_process()

    # -- connections in --------------------------------------------------------------------

    def accept(self, listener: Any) -> None:
        try:
            sock, addr = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # gthread's own accept would exit
                if not self.shed():
                    time.sleep(0.05)  # nothing to shed: every connection runs a request
                return
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, sock, addr, listener.getsockname())
        if self._buffered(conn):
            self.wait(conn)
        else:
            self.enqueue_req(conn)
        while self.nr_conns > self.cap and self.shed(keep=conn):
            pass

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        """A kept-alive connection sends its next request: read it on the loop too."""
        if not self._buffered(conn):
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.wait(conn)
        self.on_incoming(conn)

    def _buffered(self, conn: TConn) -> bool:
        if self.cfg.is_ssl or conn.is_http2:
            return False
        return conn.parser is not None or not negotiation.prior_knowledge_allowed(
            self.cfg, conn.client
        )

    def wait(self, conn: TConn) -> None:
        conn.sock.setblocking(False)
        hold = self.budget.hold(partial(self.drop, conn))
        self.incoming[conn] = _Incoming(hold, time.monotonic())
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_incoming, conn))

    def on_incoming(self, conn: TConn, _client: Any = None) -> None:
        entry = self.incoming.get(conn)
        if entry is None:
            return
        try:
            data = conn.sock.recv(RECV)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or not entry.hold.take(len(data)):
            self.drop(conn)  # gone, or the budget is full of holders younger than it
            return
        entry.buf += data
        entry.last = time.monotonic()
        if entry.head_end < 0:
            end = entry.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(entry.buf) > MAX_HEADER_BYTES:
                    self.drop(conn)
                return
            entry.head_end = end + 4
            entry.body_since = entry.last
            length = _body_length(bytes(entry.buf[:end]))
            if length is None:
                self.hand_off(conn)
                return
            entry.need = entry.head_end + length
        if len(entry.buf) >= entry.need:
            self.hand_off(conn)

    def hand_off(self, conn: TConn) -> None:
        """The request is in (or gunicorn must read the rest): a thread runs it."""
        entry = self.incoming.pop(conn)
        self.poller.unregister(conn.sock)
        entry.hold.release()
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(entry.buf))
        conn.data_ready = True
        self.enqueue_req(conn)

    def drop(self, conn: TConn) -> None:
        entry = self.incoming.pop(conn, None)
        if entry is None:
            return
        entry.hold.release()
        self._close(conn)

    def _close(self, conn: TConn) -> None:
        with contextlib.suppress(OSError, KeyError, ValueError):  # not registered
            self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close()

    # -- deadlines and shedding ------------------------------------------------------------

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        if now - self.looked < TICK:
            return
        self.looked = now
        for conn, entry in list(self.incoming.items()):
            if entry.due(self.head_timeout) <= now or (not self.alive and entry.head_end < 0):
                self.drop(conn)

    def shed(self, keep: TConn | None = None) -> bool:
        """Close the connection idle (kept alive) or sending its request the longest."""
        idle = self.keepalived_conns[0] if self.keepalived_conns else None
        incoming = next((c for c in self.incoming if c is not keep), None)
        if idle is None and incoming is None:
            return False
        idle_since = idle.timeout - self.cfg.keepalive if idle is not None else float("inf")
        if incoming is not None and self.incoming[incoming].since < idle_since:
            self.drop(incoming)
        else:
            self._close(self.keepalived_conns.popleft())
        self.shed_count += 1
        now = time.monotonic()
        if now - self.logged >= 60:
            self.logged = now
            logger.warning(
                "at the open-files limit (%d connections): shedding the longest idle or "
                "incomplete ones (%d so far)",
                self.cap,
                self.shed_count,
            )
        return True
