"""The embedded local pool: worker processes on loopback speaking the same protocol.

Started on first use with the spawn start method (never fork: the caller has threads), so the
children import the caller's main script as `__mp_main__` and register its functions. Each
child serves the ASGI endpoint under uvicorn on its own port. Children die with their parent
(PR_SET_PDEATHSIG plus a watchdog) so none is ever left behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from ._exceptions import ConfigurationError
from ._protocol import Keyring

logger = logging.getLogger("serverless.pool")

ROUTE = "/serverless"
START_TIMEOUT = 60.0


class LocalPool:
    """N worker processes on 127.0.0.1, each with a thread pool for sync functions."""

    def __init__(self, processes: int, threads: int, modules: list[str]) -> None:
        if processes < 1 or threads < 1:
            raise ConfigurationError("the local pool needs at least one process and one thread")
        self.processes = processes
        self.threads = threads
        self.route = ROUTE
        self._secret = secrets.token_hex(32)
        self.keyring = Keyring(self._secret)
        self._modules = modules
        self._lock = threading.Lock()
        self._procs: list[BaseProcess | None] = [None] * processes
        self.urls: list[str] = [""] * processes

    def start(self) -> None:
        started = [self._spawn() for _ in range(self.processes)]
        for slot, (proc, conn) in enumerate(started):
            self._procs[slot] = proc
            self.urls[slot] = self._await_port(proc, conn)

    def revive(self) -> None:
        """Replace worker processes that died (killed, crashed) since the last call."""
        with self._lock:
            for slot, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive():
                    logger.warning(
                        "local worker %s exited (%s); replacing it", proc.pid, proc.exitcode
                    )
                    new, conn = self._spawn()
                    self._procs[slot] = new
                    self.urls[slot] = self._await_port(new, conn)

    def _spawn(self) -> tuple[BaseProcess, Connection]:
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        args = (child_conn, self._secret, self.route, self.threads, self._modules, os.getpid())
        proc = ctx.Process(target=serve, args=args, name="serverless-worker", daemon=True)
        proc.start()
        child_conn.close()
        return proc, parent_conn

    def _await_port(self, proc: BaseProcess, conn: Connection) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if conn.poll(0.05):
                try:
                    port = conn.recv()
                except EOFError:
                    break
                conn.close()
                return f"http://127.0.0.1:{port}{self.route}"
            if not proc.is_alive():
                break
        proc.kill()
        raise ConfigurationError(
            f"a local worker process failed to start (exit code {proc.exitcode}). If your "
            "script calls a parallel function at import time, move that call under "
            "`if __name__ == '__main__':` - workers import the script to find its functions."
        )

    def close(self) -> None:
        procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        self._procs = [None] * self.processes


_pool: LocalPool | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def get_pool(processes: int | None, threads: int, modules: list[str]) -> LocalPool:
    """The process's pool, started on first use and started anew if this process was forked."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            pool = LocalPool(processes or os.cpu_count() or 1, threads, modules)
            pool.start()
            _pool, _pool_pid = pool, os.getpid()
        pool = _pool
    pool.revive()
    return pool


def shutdown() -> None:
    """Stop the local pool, if this process started one."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.close()
        _pool = None


atexit.register(shutdown)


# -- the child -----------------------------------------------------------------------------


def serve(
    conn: Connection, secret: str, route: str, threads: int, modules: list[str], parent: int
) -> None:
    """Entry point of a local worker process."""
    _die_with_parent(parent)
    for name in modules:
        if name != "__main__":
            try:
                importlib.import_module(name)
            except Exception:
                logger.exception("local worker cannot import %s", name)
    import uvicorn

    from ._asgi import ASGIEndpoint
    from ._worker import Endpoint

    endpoint = Endpoint(route, Keyring(secret), import_modules=True)
    app = ASGIEndpoint(endpoint, threads=threads)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    conn.send(sock.getsockname()[1])
    conn.close()
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=75,
        http="httptools",
        loop="asyncio",
        backlog=4096,
    )
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="serverless-parent-watch", daemon=True).start()
