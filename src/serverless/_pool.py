"""The embedded local pool: worker processes on loopback speaking the same protocol.

Each worker is a fresh interpreter (never a fork: the caller has threads) that imports the
modules with registered functions and the caller's main script as `__mp_main__`, then serves
the ASGI endpoint under uvicorn on its own port. Importing the main script stops at its first
parallel call, so a script without an `if __name__ == "__main__":` guard still works and its
top-level work never runs in a worker. Workers die with their parent (PR_SET_PDEATHSIG plus a
watchdog), so none is ever left behind.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import select
import subprocess
import sys
import threading
import time

from . import _mainscript
from ._exceptions import ConfigurationError
from ._pool_modules import Announcer
from ._protocol import Keyring

logger = logging.getLogger("serverless.pool")

ROUTE = "/serverless"
START_TIMEOUT = 60.0
WATCH_INTERVAL = 0.25  # seconds between checks that every local worker is alive


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
        self.announcer = Announcer(modules)  # which modules workers may import, and no other
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * processes
        self.urls: list[str] = [""] * processes
        self.code_version = 0  # the registry's redefinition count when the workers started

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def start(self) -> None:
        started = [self._spawn() for _ in range(self.processes)]  # they boot concurrently
        for slot, (proc, port_fd) in enumerate(started):
            self._procs[slot] = proc
            self.urls[slot] = self._await_port(proc, port_fd)
        threading.Thread(target=self._watch, name="serverless-pool-watch", daemon=True).start()

    def _watch(self) -> None:
        """Replace a worker that dies (killed, crashed) at once, not at the next call: the
        call running now retries its chunks on the others, the next one finds a full pool."""
        while not self._closed.wait(WATCH_INTERVAL):
            try:
                self.revive()
            except Exception:  # logged; the next call's revive() raises it to the caller
                logger.exception("replacing a local worker failed")

    def revive(self) -> None:
        """Replace worker processes that died (killed, crashed) since the last call."""
        with self._lock:
            if self._closed.is_set():
                return
            for slot, proc in enumerate(self._procs):
                if proc is not None and proc.poll() is not None:
                    logger.warning(
                        "local worker %s exited (%s); replacing it", proc.pid, proc.returncode
                    )
                    new, port_fd = self._spawn()
                    self._procs[slot] = new
                    self.urls[slot] = self._await_port(new, port_fd)

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int]:
        read_fd, write_fd = os.pipe()
        config = {
            "secret": self._secret,
            "route": self.route,
            "threads": self.threads,
            "modules": self._modules,
            "modules_file": str(self.announcer.path),
            "main": _mainscript.reference(),
            "sys_path": sys.path,
            "parent": os.getpid(),
            "port_fd": write_fd,
        }
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from serverless._local_worker import child; child()"],
                stdin=subprocess.PIPE,
                env=env,
                pass_fds=(write_fd,),
                close_fds=True,
            )
        finally:
            os.close(write_fd)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
        return proc, read_fd

    def _await_port(self, proc: subprocess.Popen[bytes], port_fd: int) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        data = b""
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                ready, _, _ = select.select([port_fd], [], [], 0.05)
                if ready:
                    chunk = os.read(port_fd, 64)
                    data += chunk
                    if data.endswith(b"\n"):
                        return f"http://127.0.0.1:{int(data)}{self.route}"
                    if not chunk:
                        break
        finally:
            os.close(port_fd)
        proc.kill()
        proc.wait()
        raise ConfigurationError(
            f"a local worker process failed to start (exit code {proc.returncode}); "
            "see its error output above"
        )

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._close()
        self.announcer.remove()

    def _close(self) -> None:
        procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # uvicorn finishes in-flight requests on SIGTERM
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = [None] * self.processes


_pool: LocalPool | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def get_pool(
    processes: int | None, threads: int, modules: list[str], code_version: int = 0
) -> LocalPool:
    """The process's pool, started on first use and started anew if this process was forked
    or if `code_version` changed (a function was redefined: its workers hold the old code)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is not None and _pool_pid == os.getpid() and _pool.code_version != code_version:
            logger.info("restarting the local pool: a function was redefined (module reloaded)")
            _pool.close()
            _pool = None
        if _pool is None or _pool_pid != os.getpid():
            pool = LocalPool(processes or os.cpu_count() or 1, threads, modules)
            pool.code_version = code_version
            pool.start()
            _pool, _pool_pid = pool, os.getpid()
        pool = _pool
    pool.announcer.announce(modules)
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
