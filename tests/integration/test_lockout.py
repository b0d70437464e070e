"""Issue 22, point 7: anonymous connections cannot lock callers out, on each server.

Each attack runs against a real server on loopback (`serverless worker`, Flask under gunicorn
gthread, FastAPI under uvicorn) while a legitimate caller keeps calling: at least 95% of its
calls succeed. The attacks are the issue's at a scale that fits a small machine: the server's
open-files limit is lowered to 256 and a few hundred sockets attack it. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serverless import _wire as p
from tests.conftest import SECRET, TESTS, free_port, serving, test_env

pytestmark = pytest.mark.timeout(180)

ROUTE = "/serverless"
KEYRING = p.Keyring(SECRET)
SQUARE = "tests.sample_functions:square"
FD_LIMIT = 256
# docs/deploy.md's recipes: uvicorn's protocol and gunicorn's worker class
PROTOCOL = "serverless._worker.uvserver:GuardedHttpTools"
GTHREAD = "serverless._worker.gthread.Worker"

SERVERS: dict[str, list[str]] = {
    "serverless worker": ["serverless._cli", "worker", "tests.sample_functions"],
    "flask/gunicorn": ["gunicorn", "-k", GTHREAD, "-w", "1", "--threads", "8"],
    # gunicorn's own gthread: what the app itself does (the budget, the body's deadline)
    "flask/gthread": ["gunicorn", "-k", "gthread", "-w", "1", "--threads", "8"],
    "fastapi/uvicorn": ["uvicorn", "tests.apps.fastapi_app:app", "--http", PROTOCOL],
}


def _command(kind: str, port: int) -> list[str]:
    args = list(SERVERS[kind])
    if kind.startswith("flask/"):
        return [
            *args,
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "tests.apps.flask_app:app",
        ]
    return [*args, "--port", str(port), "--log-level", "warning"]


def _limit_files() -> None:  # in the server process, before it starts
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@contextlib.contextmanager
def running(kind: str, tmp: str, **env: str) -> Iterator[int]:
    """The server, with at most FD_LIMIT open files; yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", *_command(kind, port)],
        env=test_env(SERVERLESS_STATE_DIR=tmp, **env),
        cwd=TESTS.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_limit_files,
    )
    with serving(proc, port):
        assert proc.stdout is not None
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # never a full pipe
        for _ in range(3):
            assert call(port), "the server does not answer before the attack"
        yield port


def call(port: int, timeout: float = 10) -> bool:
    """One legitimate signed call on a new connection; whether it succeeded."""
    rid = p.new_request_id()
    body = p.encode(p.Call(v=p.VERSION, fn=SQUARE, id=rid, index=0, items=[1, 2, 3]), p.MSGPACK)
    headers = p.signed_headers(KEYRING, ROUTE, SQUARE, rid, body, now=time.time())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", ROUTE, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def calls_during(port: int, seconds: float, every: float = 0.5) -> tuple[int, int]:
    """Call for `seconds`; (successes, calls)."""
    ok = calls = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        calls += 1
        ok += call(port)
        time.sleep(every)
    return ok, calls


def head(declared: int) -> bytes:
    """A request that passes every header check, with the public key id and a forged
    signature: it can only be refused once its body is read."""
    return (
        f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Type: {p.MSGPACK}\r\n"
        f"Content-Length: {declared}\r\n{p.H_VERSION}: {p.VERSION}\r\n"
        f"{p.H_TIMESTAMP}: {time.time():.3f}\r\n{p.H_REQUEST_ID}: {secrets.token_hex(16)}\r\n"
        f"{p.H_FUNCTION}: {SQUARE}\r\n{p.H_SIGNATURE}: {KEYRING.key_ids[0]}={'ab' * 32}\r\n\r\n"
    ).encode()


class Attack:
    """Attacking sockets, kept open (and fed by `feed`, if any) on a thread until closed."""

    def __init__(self, port: int, feed: Callable[[socket.socket], None] | None, every: float):
        self.port = port
        self.feed = feed
        self.every = every
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def open(self, n: int, first: bytes = b"") -> None:
        for _ in range(n):
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                if first:
                    sock.sendall(first)
            except OSError:
                continue
            sock.setblocking(False)
            self.socks.append(sock)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            if self.feed is not None:
                for sock in self.socks:
                    with contextlib.suppress(OSError):
                        self.feed(sock)

    def still_open(self) -> int:
        """How many of the sockets the server has not closed."""
        n = 0
        for sock in self.socks:
            try:
                sock.recv(65536)  # b"": closed; else an answer (408, 503), then closed
            except BlockingIOError:
                n += 1
            except OSError:
                pass
        return n

    def __enter__(self) -> Attack:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.socks:
            sock.close()


def _byte(sock: socket.socket) -> None:
    sock.send(b"\0")


def assert_mostly_ok(ok: int, calls: int) -> None:
    assert calls >= 5
    assert ok >= 0.95 * calls, f"only {ok} of {calls} legitimate calls succeeded"


# -- the pre-authentication budget ------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_two_stalled_uploads_do_not_hold_the_budget(kind: str, tmp_path: Path) -> None:
    """Two anonymous uploads of 23 MiB each, then a byte every second, took the whole 48 MiB
    budget under gunicorn (nothing evicts a holder blocked in a read): every call was a 503.
    The oldest holder now gives way under WSGI as under ASGI."""
    with running(kind, str(tmp_path)) as port, Attack(port, _byte, 1.0) as attack:
        for _ in range(2):
            attack.open(1, head(32 << 20))
            with contextlib.suppress(OSError):
                attack.socks[-1].setblocking(True)
                attack.socks[-1].sendall(b"\0" * (23 << 20))
                attack.socks[-1].setblocking(False)
        time.sleep(1.5)  # older than the budget's min_age: they may now be evicted
        ok, calls = calls_during(port, 6)
    assert_mostly_ok(ok, calls)


# -- bodies that trickle ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_a_trickling_body_is_closed_by_its_deadline(kind: str, tmp_path: Path) -> None:
    """A body sent a byte at a time, faster than the idle timeout, was never closed (1,010 of
    1,100 open after 30 s). Its rate now falls below the minimum once the grace has passed.
    Here the grace (the idle timeout) is 2 s and a byte comes every 0.5 s."""
    with (
        running(kind, str(tmp_path), SERVERLESS_BODY_TIMEOUT="2") as port,
        Attack(port, _byte, 0.5) as attack,
    ):
        attack.open(20, head(1 << 20))
        # closed after the 2 s grace; the bound leaves room for a loaded 2-core machine (2 of
        # 20 on `serverless worker` were still open at 8 s once in six runs of the suite)
        deadline = time.monotonic() + 15
        while attack.still_open() and time.monotonic() < deadline:
            time.sleep(0.25)
        still_open = attack.still_open()
        assert call(port)
    assert still_open == 0, f"{still_open} of 20 trickling bodies still open after 15 s"


# -- the open-files limit ---------------------------------------------------------------------


# gunicorn's own gthread cannot shed: docs/deploy.md names the worker class that does
AT_THE_LIMIT = sorted(set(SERVERS) - {"flask/gthread"})


@pytest.mark.parametrize("kind", AT_THE_LIMIT)
def test_trickling_bodies_at_the_open_files_limit(kind: str, tmp_path: Path) -> None:
    """At a 1,024-descriptor limit, 1,100 bodies sent a byte every 8 s failed 14 of 14
    calls. Here: 300 such bodies (a byte every 2 s) at a 256 limit."""
    with running(kind, str(tmp_path)) as port, Attack(port, _byte, 2.0) as attack:
        attack.open(300, head(1 << 20))
        ok, calls = calls_during(port, 8)
    assert_mostly_ok(ok, calls)


@pytest.mark.parametrize("kind", AT_THE_LIMIT)
def test_idle_connections_at_the_open_files_limit(kind: str, tmp_path: Path) -> None:
    """1,100 idle connections at a 1,024 limit blocked every call until the header timeout.
    Here: 300 at a 256 limit, which send nothing."""
    with running(kind, str(tmp_path)) as port, Attack(port, None, 1.0) as attack:
        attack.open(300)
        ok, calls = calls_during(port, 8)
    assert_mostly_ok(ok, calls)
