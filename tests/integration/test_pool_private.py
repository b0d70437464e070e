"""The local pool's channel is private end to end, and survives its workers (issue 22, points 4
and 5), each performed as another local user or a crash would:

- a worker dies mid-call and the test binds its old loopback port: before, the call's retries
  went there over TCP (5 signed chunks, items in clear); now nothing reaches it and the
  retries run on the worker that replaced the dead one;
- a request captured to one worker is replayed to another worker of the same pool: before, it
  ran again (per-process protection); now each worker runs only the ids signed for its slot,
  and a replacement nothing signed before it started;
- a symbolic link planted at the module list's predictable `.tmp` path: before, the caller
  wrote through it and chmodded the target; now the list lives in the pool's 0700 directory;
- a caller killed with SIGKILL: before, its `serverless-modules-*` file and `serverless-pool-*`
  directory stayed in the temp directory forever; now the next pool removes them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serverless import _targets
from serverless import _wire as p
from serverless._pool import pool as _pool
from tests import sample_functions as sf
from tests.conftest import test_env
from tests.integration.test_local_pool import MAIN_SCRIPT, _alive
from tests.integration.test_pool_unix import listening_tcp_ports, sockets, unix_post

pytestmark = pytest.mark.timeout(90)
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@contextlib.contextmanager
def fresh_pool(processes: int) -> Iterator[_pool.LocalPool]:
    pool = _pool.LocalPool(processes, 4, ["tests.sample_functions"])
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


class Squatter:
    """Another local user's listener on the dead worker's ports: records what reaches it."""

    def __init__(self, ports: list[int]) -> None:
        self.received: list[bytes] = []
        self.listeners: list[socket.socket] = []
        for port in ports:
            deadline = time.monotonic() + 5
            while True:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    break
                except OSError:  # the dead worker's socket is not closed yet
                    sock.close()
                    assert time.monotonic() < deadline
                    time.sleep(0.002)
            sock.listen(64)
            sock.settimeout(0.2)
            self.listeners.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.5)
                with contextlib.suppress(OSError):
                    self.received.append(conn.recv(1 << 20))

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()


@linux
def test_a_dead_workers_port_receives_nothing_and_the_retries_reach_its_replacement() -> None:
    with fresh_pool(1) as pool:
        victim = pool.pids[0]
        ports = listening_tcp_ports(victim)  # before: its loopback port; now: none
        target = pool.target()
        f = sf.sleepy.with_options(workers=5, chunk_size=1, retries=5, timeout=10)
        items = [0.5 + i * 1e-6 for i in range(5)]
        with _targets.override(target):
            future = f.submit(items)
            time.sleep(0.25)  # the five chunks run on the only worker
            os.kill(victim, signal.SIGKILL)
            squatter = Squatter(ports)
            try:
                assert future.result(60) == items  # the retries ran on the replacement
            finally:
                squatter.close()
        assert squatter.received == [], f"{len(squatter.received)} requests reached the port"
        assert pool.pids and pool.pids[0] != victim
        assert listening_tcp_ports(pool.pids[0]) == []


def _captured(pool: _pool.LocalPool, slot: int) -> tuple[dict[str, str], bytes]:
    """A request to square([3]) as the caller signs it for `slot`'s worker."""
    fn = "tests.sample_functions:square"
    rid = p.new_request_id(pool.id_prefixes[pool.urls[slot]])
    body = p.encode(p.Call(v=p.VERSION, fn=fn, id=rid, index=0, items=[3]), p.MSGPACK)
    return p.signed_headers(pool.keyring, pool.route, fn, rid, body, now=time.time()), body


def test_a_request_captured_to_one_worker_is_refused_by_every_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker runs only the request ids signed for its slot, and remembers those."""
    calls = tmp_path / "calls"
    monkeypatch.setenv(sf.CALLS_FILE_ENV, str(calls))
    with fresh_pool(2) as pool:
        headers, body = _captured(pool, 0)
        first, second = sockets(pool)
        statuses = [unix_post(first, pool.route, headers, body)[0]]
        for path in (second, first, second):
            statuses.append(unix_post(path, pool.route, headers, body)[0])
    assert statuses == [200, 403, 409, 403], statuses
    assert len(calls.read_text().splitlines()) == 1  # ran once, on one worker


def test_a_request_captured_to_a_dead_worker_is_refused_by_its_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replacement's replay cache starts empty: it runs nothing signed before it
    started, and a caller's request signed after it goes through."""
    calls = tmp_path / "calls"
    monkeypatch.setenv(sf.CALLS_FILE_ENV, str(calls))
    with fresh_pool(1) as pool:
        headers, body = _captured(pool, 0)
        (first,) = sockets(pool)
        assert unix_post(first, pool.route, headers, body)[0] == 200
        dead = pool.pids[0]
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (dead in pool.pids or not sockets(pool)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (replacement,) = sockets(pool)
        status, answer = unix_post(replacement, pool.route, headers, body)
        assert status == 503 and b"signed before this worker started" in answer
        assert len(calls.read_text().splitlines()) == 1  # the captured request ran once
        target = pool.target()
        with _targets.override(target):
            assert sf.square([4]) == [16]


@pytest.fixture
def private_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp directory of the test's own, short enough for socket paths."""
    path = Path(tempfile.mkdtemp(prefix="sl-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(path))
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    try:
        yield path
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def test_a_symlink_planted_in_the_temp_directory_changes_nothing(private_tmp: Path) -> None:
    victim = private_tmp / "victim.txt"  # a file of the caller's own, readable by others
    victim.write_text("precious\n")
    victim.chmod(0o644)
    with fresh_pool(1) as pool:
        # the attacker sees every name in the shared temp directory and plants a link at the
        # path each predictable name would be written through
        planted = []
        for name in os.listdir(private_tmp):
            if name.startswith("serverless-modules-"):
                link = private_tmp / (name.rsplit(".", 1)[0] + ".tmp")
                link.symlink_to(victim)
                planted.append(link)
        pool.announcer.announce(["tests.value_functions"])  # a new list is written
        module_list = pool.announcer.path
        info = module_list.parent.lstat()
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
        assert "tests.value_functions" in module_list.read_text()
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert planted == []  # nothing of the pool's lies in the shared directory itself


def test_a_killed_callers_files_are_removed_by_the_next_pool(private_tmp: Path) -> None:
    script = private_tmp.parent / f"{private_tmp.name}-script.py"
    script.write_text(MAIN_SCRIPT)
    try:
        proc = subprocess.Popen(
            [sys.executable, str(script), "wait"],
            env=test_env(TMPDIR=str(private_tmp)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = ""
        while not line.startswith("PIDS"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
        pids = [int(pid) for pid in line.split()[1:]]
        assert os.listdir(private_tmp)  # the caller's pool files
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = sorted(os.listdir(private_tmp))
        assert left, "nothing left behind to clean: the test shows nothing"
        with fresh_pool(1) as pool:
            assert sorted(os.listdir(private_tmp)) == [pool._dir.path.name]
        assert os.listdir(private_tmp) == [], f"left behind: {left}"
    finally:
        script.unlink(missing_ok=True)
