"""The embedded local pool: worker processes speaking the same protocol on a private channel.

Each worker is a fresh interpreter (never a fork: the caller has threads) that imports the
modules with registered functions (never the caller's main script: functions of `__main__`
reach it by value, byvalue.py), then serves the ASGI endpoint under uvicorn on a Unix domain
socket in the pool's private (0700) directory (private.py), and on no TCP port: no other local
user can reach it, nor take its address once it died. Each slot of the pool has a URL that
never changes, a name in `.invalid` that this process's HTTP client maps to the slot's current
worker (_caller/http.py), so a call's retries reach the worker that replaced a dead one. Each
worker runs only the request ids signed for its slot (child.py): a request is run by at most
one of them. Where there are no Unix sockets (Windows, a temp path over 100 bytes) the workers
listen on loopback TCP instead, as before.

A script's top-level work runs once, in the caller, guarded or not. Workers die with their
parent (PR_SET_PDEATHSIG plus a watchdog), so none is ever left behind.

One thread per pool, living as long as the pool, starts every worker, probes them and replaces
the dead and the frozen: PR_SET_PDEATHSIG fires when the *thread* that spawned a child exits,
so a worker spawned by a caller's short-lived thread (a thread-per-request server) was killed
with that thread, and the next call paid for a new pool (issue 15). No exception ends that
thread: a round that fails is logged and tried again.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import json
import logging
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

from .. import _wire as p
from .._caller import http as _http
from .._caller.transport import Target
from .._exceptions import ConfigurationError
from .._wire import Keyring
from .byvalue import Shelf
from .modules import Announcer
from .private import PrivateDirectory

logger = logging.getLogger("serverless.pool")

ROUTE = "/serverless"
START_TIMEOUT = 60.0
WATCH_INTERVAL = 0.5  # seconds between rounds of the pool's thread: replace the dead, probe
PROBE_TIMEOUT = 1.0  # seconds a round waits for the workers' answers to its probe
# A worker that answered no probe for this long is frozen (SIGSTOP, a blocked event loop): it
# is killed and replaced, so calls stop paying their full timeout on it. The probe is a GET
# its event loop refuses at once (405), but a loop can wait seconds for the GIL behind dozens
# of CPU-bound threads (W4 on 2 cores: 2.7 s measured, and workers were killed mid-call, the
# call failing on the dead URL): a silent worker whose CPU time still grows is busy, not
# frozen (Linux's /proc; elsewhere silence alone decides).
FROZEN_AFTER = 3.0
BUSY_TICKS = 2  # CPU clock ticks (10 ms each, usually) in a round that make a silent worker busy
PROBE_REQUEST = "HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
UNIX_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS: TCP only beyond this

_numbers = itertools.count(1)  # pools of this process: each names its slots apart


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
        self._dir = PrivateDirectory()  # sockets, module list, pickles: mode 0700
        self.announcer = Announcer(modules, self._dir.path)  # the modules workers may import
        self.shelf = Shelf(self._dir.path)  # functions of __main__, by value
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wake = threading.Event()  # a caller wants dead workers replaced now
        self._round_done = threading.Condition()
        self._rounds = -1  # rounds of the pool's thread completed (0: the first one)
        self._error: ConfigurationError | None = None  # the last round's, for the callers
        self._answered = [0.0] * processes  # when each slot last answered a probe
        self._cpu = [-1] * processes  # each slot's CPU time (ticks) when last looked at
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * processes
        number = next(_numbers)
        # each slot's name, for the whole life of the pool: the HTTP client maps it to the
        # slot's current worker
        self._hosts = [
            f"pool{number}-worker{slot}{_http.PRIVATE_DOMAIN}" for slot in range(processes)
        ]
        self.urls: list[str] = [f"http://{host}{ROUTE}" for host in self._hosts]
        # the first hex digits of the request ids each slot's worker runs (child.py)
        self.id_prefixes = {url: f"{slot:04x}" for slot, url in enumerate(self.urls)}
        # where each slot's worker listens: its Unix socket's path, or its loopback port
        self._addresses: list[str | int | None] = [None] * processes
        self._spawned = 0
        self._warned_tcp = False
        self.code_version = 0  # the registry's redefinition count when the workers started

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def start(self) -> None:
        """Start the pool's thread and wait until it has started every worker."""
        from .._worker.uvserver import raise_open_files_limit

        # a call 10,000 wide holds a connection per chunk in flight: at the usual soft limit
        # of 1,024 descriptors it failed with "Too many open files"
        raise_open_files_limit()
        thread = threading.Thread(target=self._keep, name="serverless-pool", daemon=True)
        thread.start()
        try:
            self._await_round(0)
        except BaseException:
            self.close()
            raise

    def revive(self) -> None:
        """Have the pool's thread replace workers that died, and wait until it has."""
        with self._lock:
            if self._closed.is_set() or all(
                p is not None and p.poll() is None for p in self._procs
            ):
                return
            wanted = self._rounds + 1
        self._wake.set()
        self._await_round(wanted)

    def _await_round(self, wanted: int) -> None:
        with self._round_done:
            done = self._round_done.wait_for(
                lambda: self._rounds >= wanted or self._closed.is_set(), START_TIMEOUT + 5
            )
            error = self._error
        if error is not None:
            raise error
        if not done:
            raise ConfigurationError("the local pool's workers did not start in time")

    def _keep(self) -> None:
        """The pool's thread: every worker is its child, so they live as long as it does, and
        nothing may end it but close()."""
        while not self._closed.is_set():
            error: ConfigurationError | None = None
            try:
                self._fill()
                self._probe()
            except ConfigurationError as exc:  # the next revive() raises it to its caller
                logger.error("replacing a local worker failed: %s", exc)
                error = exc
            except BaseException:  # even SystemExit: the workers would die with the thread
                logger.exception("a round of the local pool's thread failed; trying again")
            with self._round_done:
                self._rounds += 1
                self._error = error
                self._round_done.notify_all()
            self._wake.wait(WATCH_INTERVAL)
            self._wake.clear()
        with self._round_done:
            self._round_done.notify_all()

    def _fill(self) -> None:
        """Start a worker in every empty slot and replace the ones that exited; they boot
        concurrently."""
        with self._lock:
            if self._closed.is_set():
                return
            slots = [s for s, p in enumerate(self._procs) if p is None or p.poll() is not None]
            for slot in slots:
                old = self._procs[slot]
                if old is not None:
                    logger.warning(
                        "local worker %s exited (%s); replacing it", old.pid, old.returncode
                    )
                self._forget(slot)
            started = []
            try:
                for slot in slots:
                    started.append((slot, *self._spawn(slot)))
                while started:
                    slot, proc, port_fd, unix = started.pop(0)
                    port = self._await_port(proc, port_fd)  # closes port_fd
                    self._procs[slot] = proc  # before pids show it
                    self._answered[slot] = time.monotonic()
                    self._cpu[slot] = -1
                    self._addresses[slot] = unix if unix is not None else port
                    self._route(slot)
            finally:
                for _, proc, port_fd, _ in started:  # a worker before them failed to start
                    proc.kill()
                    proc.wait()
                    os.close(port_fd)

    def _route(self, slot: int) -> None:
        """Point the slot's name at its worker (or at nothing while it is replaced)."""
        _http.reach_privately(
            self._hosts[slot], self._addresses[slot], self._wake.set, START_TIMEOUT + 5
        )

    def _forget(self, slot: int) -> None:
        """The slot's worker is gone: its name leads nowhere until the next one listens."""
        old, self._addresses[slot] = self._addresses[slot], None
        self._route(slot)
        if isinstance(old, str):
            with contextlib.suppress(OSError):
                os.unlink(old)

    def _probe(self) -> None:
        """A GET to every worker at once; kill one that has answered none for FROZEN_AFTER
        (its slot is refilled by the next round)."""
        with self._lock:
            live = [(s, p, self._addresses[s]) for s, p in enumerate(self._procs) if p is not None]
        sockets: dict[socket.socket, int] = {}
        unasked: list[int] = []  # this process was out of files: no news is not silence
        for slot, _, _ in live:
            request = f"GET {self.route} {PROBE_REQUEST.format(host=self._hosts[slot])}"
            try:
                sock = self._probe_connection(self._addresses[slot])
                if sock is None:
                    continue
                try:
                    sock.sendall(request.encode())
                except BaseException:
                    sock.close()
                    raise
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    unasked.append(slot)
                continue
            sock.setblocking(False)
            sockets[sock] = slot
        deadline = time.monotonic() + PROBE_TIMEOUT
        # a selector, not select(): a caller with a wide call holds more than FD_SETSIZE
        # (1,024) descriptors, and select() raises on any above it (workers=2000 killed the
        # pool's thread, and every worker with it)
        try:
            selector = selectors.DefaultSelector()
        except OSError:  # out of files (epoll needs one)
            unasked += sockets.values()
            for sock in sockets:
                sock.close()
            sockets = {}
            selector = None
        if selector is not None:
            with selector:
                for sock in sockets:
                    selector.register(sock, selectors.EVENT_READ, sock)
                try:
                    while sockets and (left := deadline - time.monotonic()) > 0:
                        for key, _ in selector.select(left):
                            answered: socket.socket = key.data
                            selector.unregister(answered)
                            self._answered[sockets.pop(answered)] = time.monotonic()
                            answered.close()
                finally:
                    for sock in sockets:
                        sock.close()
        for slot in unasked:
            self._answered[slot] = time.monotonic()
        now = time.monotonic()
        for slot, proc, _ in live:
            cpu = _cpu_ticks(proc.pid)
            if cpu is not None and self._cpu[slot] >= 0 and cpu - self._cpu[slot] >= BUSY_TICKS:
                self._answered[slot] = now  # silent but burning CPU: busy
            self._cpu[slot] = -1 if cpu is None else cpu
        with self._lock:
            for slot, proc, _ in live:
                silent = now - self._answered[slot]
                if self._procs[slot] is proc and silent > FROZEN_AFTER and proc.poll() is None:
                    logger.warning(
                        "local worker %s answered no probe for %.1fs (frozen?); replacing it",
                        proc.pid,
                        silent,
                    )
                    proc.send_signal(signal.SIGKILL)  # a stopped process dies of SIGKILL too
                    proc.wait()
                    self._wake.set()  # refill the slot now

    @staticmethod
    def _probe_connection(address: str | int | None) -> socket.socket | None:
        """A connection to a worker's socket (or loopback port); None if it has none yet."""
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(PROBE_TIMEOUT)
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock
        if address is not None:
            return socket.create_connection(("127.0.0.1", address), PROBE_TIMEOUT)
        return None

    def _unix_path(self) -> str | None:
        """A fresh socket path for the next worker, or None where there can be none."""
        if not hasattr(socket, "AF_UNIX"):
            return None  # pragma: no cover - Windows
        self._spawned += 1
        path = str(self._dir.path / f"w{self._spawned}.sock")
        if len(path.encode()) <= UNIX_PATH_MAX:
            return path
        if not self._warned_tcp:
            self._warned_tcp = True
            logger.warning(
                "the local pool's workers listen on loopback TCP, which any local user can "
                "reach: a socket path in %s would be longer than %d bytes (set TMPDIR to a "
                "shorter directory)",
                self._dir.path.parent,
                UNIX_PATH_MAX,
            )
        return None

    def target(self, max_body: int = p.MAX_BODY) -> Target:
        """Where a call sends its chunks to run them on this pool."""
        return Target(
            tuple(self.urls),
            self.route,
            self.keyring,
            "local",
            max_body,
            id_prefixes=self.id_prefixes,
            shelf=self.shelf,
        )

    def _spawn(self, slot: int) -> tuple[subprocess.Popen[bytes], int, str | None]:
        read_fd, write_fd = os.pipe()
        unix = self._unix_path()
        config = {
            "secret": self._secret,
            "route": self.route,
            "url": self.urls[slot],
            "threads": self.threads,
            "modules": self._modules,
            "modules_file": str(self.announcer.path),
            "id_prefix": self.id_prefixes[self.urls[slot]],
            "code_dir": str(self._dir.path),
            "sys_path": sys.path,
            "parent": os.getpid(),
            "port_fd": write_fd,
            "unix": unix,
        }
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from serverless._pool.child import child; child()"],
                stdin=subprocess.PIPE,
                env=env,
                pass_fds=(write_fd,),
                close_fds=True,
                # out of the terminal's process group: a Ctrl-C interrupts the caller, whose
                # closed requests stop the workers' work (docs/reliability.md). In the group,
                # it reached every worker, which finished its chunks item after item, then died
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
        return proc, read_fd, unix

    def _await_port(self, proc: subprocess.Popen[bytes], port_fd: int) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        data = b""
        selector = selectors.DefaultSelector()
        selector.register(port_fd, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if selector.select(0.05):
                    chunk = os.read(port_fd, 64)
                    data += chunk
                    if data.endswith(b"\n"):
                        return int(data)  # its TCP port; 0: it listens on its socket only
                    if not chunk:
                        break
        finally:
            selector.close()
            os.close(port_fd)
        proc.kill()
        proc.wait()
        raise ConfigurationError(
            f"a local worker process failed to start (exit code {proc.returncode}); "
            "see its error output above"
        )

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        with self._lock:
            self._close()
        for host in self._hosts:
            _http.forget_private(host)
        self._dir.remove()

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


def _cpu_ticks(pid: int) -> int | None:
    """User plus system CPU time of a process, in clock ticks; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # after the command's name
        return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


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
