"""The request threads of one server process: how many there are, how many are busy, and how
many chunks the process has sent to itself. A call made while serving (_caller/sharing.py)
sends to self only what these threads can take; the adapters count their requests here.

Not to be confused with a Reply's `capacity` (the chunks of sync functions an ASGI worker runs
at once, which the caller's window follows): these are the server's threads for requests."""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping
from typing import Any

from .._exceptions import WorkerUnavailable

DEFAULT_WSGI_THREADS = 8  # a threaded WSGI server that does not say how many threads it has


class RequestThreads:
    """The threads of one server process that serve requests, how many are busy, and how
    many chunks this process has sent to itself (they will need threads too).

    reserve: the server's threads serve every request of the app (a threaded WSGI server):
    one of them is kept for requests other than fan-outs, so that the app answers them (its
    health check, its pages) whatever its calls do. No chunk is sent to self that would take
    it, and a call from a request handler that would leave every thread waiting on a fan-out
    fails at once, saying so (`parents`)."""

    def __init__(self, threads: int | None = None, reserve: bool = False) -> None:
        self.threads = threads
        self.reserve = reserve
        self.busy = 0
        self.sent = 0
        self.parents = 0  # threads waiting on calls made from request handlers
        self._lock = threading.Lock()

    def _spare(self) -> int:
        """Threads kept free of fan-outs: one where reserved and there are three or more."""
        return 1 if self.reserve and (self.threads or 1) >= 3 else 0

    def enter(self) -> None:
        with self._lock:
            self.busy += 1

    def leave(self) -> None:
        with self._lock:
            self.busy -= 1

    def try_send(self) -> bool:
        """Take a slot for one chunk sent to self if the process has a thread for it."""
        with self._lock:
            if self.sent + self.busy >= (self.threads or 1) - self._spare():
                return False
            self.sent += 1
            return True

    def enter_parent(self, url: str, check: bool = True) -> None:
        """A call from a request handler starts waiting on its fan-out; it fails at once
        (`check`: at its start, not between a stream's batches) if that would leave no
        thread for the app's other requests."""
        with self._lock:
            threads = self.threads or 1
            if check and self._spare() and self.parents + 1 >= threads:
                raise WorkerUnavailable(
                    f"{self.parents} of this app process's {threads} request threads already "
                    "wait on parallel calls, and this one would take the last: the app could "
                    "then answer no other request (its health check included) until one ends. "
                    "Give the server more threads (gunicorn --threads), or send the calls to "
                    "separate workers (serverless.init(url=...) or SERVERLESS_URL)",
                    url=url,
                )
            self.parents += 1

    def leave_parent(self) -> None:
        with self._lock:
            self.parents -= 1

    def sent_done(self) -> None:
        with self._lock:
            self.sent -= 1


def wsgi_threads(environ: Mapping[str, Any]) -> int:
    """The WSGI server's threads per process. gunicorn's worker object owns the SIGTERM
    handler, and its configuration says exactly; other threaded servers get a default."""
    if not environ.get("wsgi.multithread"):
        return 1
    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    threads = getattr(getattr(owner, "cfg", None), "threads", None)
    if isinstance(threads, int) and threads > 0:
        return threads
    return DEFAULT_WSGI_THREADS
