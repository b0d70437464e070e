"""The embedded local pool: worker processes on loopback speaking the same protocol.

Each worker is a fresh interpreter (never a fork: the caller has threads) that imports the
modules with registered functions and the caller's main script as `__mp_main__`, then serves
the ASGI endpoint under uvicorn on its own port. Importing the main script stops at its first
parallel call, so a script without an `if __name__ == "__main__":` guard still works and its
top-level work never runs in a worker. Workers die with their parent (PR_SET_PDEATHSIG plus a
watchdog), so none is ever left behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib
import importlib.util
import io
import json
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from typing import Any

from . import _registry
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
            "main": _main_reference(),
            "sys_path": sys.path,
            "parent": os.getpid(),
            "port_fd": write_fd,
        }
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from serverless._pool import child; child()"],
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


def get_pool(processes: int | None, threads: int, modules: list[str]) -> LocalPool:
    """The process's pool, started on first use and started anew if this process was forked."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            pool = LocalPool(processes or os.cpu_count() or 1, threads, modules)
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


def _main_reference() -> dict[str, str] | None:
    """How a worker can import the caller's main script, if it has one."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        return {"module": spec.name}  # python -m package.module
    path = getattr(main, "__file__", None)
    if path and os.path.exists(path):
        return {"path": os.path.abspath(path)}
    return None  # an interactive session: its functions cannot be imported by workers


# -- the worker process ----------------------------------------------------------------------

importing_main = False  # True in a worker while it imports the caller's main script


class StopMainImport(BaseException):
    """Raised by a step called while a worker imports the caller's main script: the functions
    defined above the call are registered, the script's top-level work is skipped."""


def check_not_importing_main() -> None:
    if importing_main:
        raise StopMainImport


def child() -> None:
    """Entry point of a local worker process: its configuration arrives on stdin."""
    config: dict[str, Any] = json.loads(sys.stdin.buffer.read())
    sys.path[:] = config["sys_path"]
    _die_with_parent(config["parent"])
    for name in config["modules"]:
        if name != "__main__":
            try:
                importlib.import_module(name)
            except Exception:
                logger.exception("local worker cannot import %s", name)
    import uvicorn  # before the main script: importing it rebinds sys.modules["__mp_main__"]

    from ._asgi import ASGIEndpoint
    from ._pool_modules import announced
    from ._uvserver import uvicorn_settings
    from ._worker import Endpoint

    if config["main"]:
        _import_main(config["main"])

    importable = announced(config["modules_file"])
    endpoint = Endpoint(config["route"], Keyring(config["secret"]), importable=importable)
    app = ASGIEndpoint(endpoint, threads=config["threads"])
    sock = listening_socket()
    uvicorn_config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_level="warning",
        loop="asyncio",
        backlog=4096,
        **uvicorn_settings(),
    )
    server = uvicorn.Server(uvicorn_config)
    os.write(config["port_fd"], f"{sock.getsockname()[1]}\n".encode())
    os.close(config["port_fd"])
    asyncio.run(server.serve(sockets=[sock]))


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket for uvicorn.

    proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the
    listening socket names TCP explicitly; without it every response whose headers and body
    go out in two writes waits ~40 ms for the client's delayed ACK (Nagle).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


def _import_main(reference: dict[str, str]) -> None:
    """Run the caller's main script as `__mp_main__`, as multiprocessing's spawn does."""
    global importing_main
    module = types.ModuleType("__mp_main__")
    try:
        if "module" in reference:
            spec = importlib.util.find_spec(reference["module"])
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot find module {reference['module']}")
            module.__spec__ = spec
            module.__file__ = spec.origin
            code = spec.loader.get_code(reference["module"])  # type: ignore[attr-defined]
        else:
            module.__file__ = reference["path"]
            with open(reference["path"], "rb") as f:
                code = compile(f.read(), reference["path"], "exec")
    except Exception:
        logger.exception("local worker cannot load the main script %s", reference)
        return
    sys.modules["__mp_main__"] = module
    _registry.set_main_module(module)
    importing_main = True
    try:  # the script's own output at import time would repeat once per worker: hide it
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, module.__dict__)
    except StopMainImport:
        pass
    except BaseException:
        logger.exception("the main script raised while a local worker imported it")
    finally:
        importing_main = False


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="serverless-parent-watch", daemon=True).start()
