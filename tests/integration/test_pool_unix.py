"""The local pool over Unix domain sockets (issue 16, part 4; issue 22, point 5): the caller
reaches its workers through sockets in a private directory, under one name per slot that no
resolver knows; the workers listen on no TCP port; the probes and a worker's call back to
itself go over the same sockets."""

from __future__ import annotations

import http.client
import os
import socket
import stat
import sys

import pytest

import serverless
from serverless._caller import http as _http
from serverless._caller.dispatch import dispatcher
from serverless._pool import pool as _pool
from tests import sample_functions as sf

pytestmark = pytest.mark.timeout(60)


class UnixConnection(http.client.HTTPConnection):
    """http.client over a Unix domain socket: a test's raw requests to a local worker."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def unix_post(path: str, route: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    conn = UnixConnection(path)
    try:
        conn.request("POST", route, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def sockets(pool: _pool.LocalPool) -> list[str]:
    return [a for a in pool._addresses if isinstance(a, str)]


def listening_tcp_ports(pid: int) -> list[int]:
    """The TCP ports process `pid` listens on (Linux's /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_caller_reaches_its_workers_over_unix_sockets_in_a_private_directory() -> None:
    assert sf.square.with_options(workers=4, chunk_size=1)([1, 2, 3, 4]) == [1, 4, 9, 16]
    pool = _pool._pool
    assert pool is not None
    paths = sockets(pool)
    assert len(paths) == pool.processes
    assert all(stat.S_ISSOCK(os.stat(path).st_mode) for path in paths)
    directory = os.path.dirname(paths[0])
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    # one name per slot, in .invalid: nothing resolves it, only this process's client maps it
    assert all(url.startswith("http://pool") and ".invalid/" in url for url in pool.urls)

    async def families() -> list[int]:
        idle = dispatcher()._client()._idle.items()
        hosts = {url.split("/")[2] for url in pool.urls}
        conns = [c for origin, cs in idle if origin.host in hosts for c in cs if not c.closed]
        return [c.transport.get_extra_info("socket").family for c in conns if c.transport]

    seen = dispatcher().run(families())
    assert seen and set(seen) == {socket.AF_UNIX}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_workers_listen_on_no_tcp_port() -> None:
    """Any local user can connect to a loopback port, and bind it once its worker died."""
    sf.square([1])
    pool = _pool._pool
    assert pool is not None
    assert all(listening_tcp_ports(pid) == [] for pid in pool.pids)


def test_a_call_made_in_a_worker_calls_back_to_it_over_its_socket() -> None:
    """The worker's origin is its slot's name, which it maps to its own socket."""
    assert sf.nested_calls.with_options(workers=2, chunk_size=1)([1, 2], 3) == [4, 5]


def test_closing_the_pool_removes_its_directory_and_names() -> None:
    sf.square([1])
    pool = _pool._pool
    assert pool is not None
    directory = os.path.dirname(sockets(pool)[0])
    hosts = [url.split("/")[2] for url in pool.urls]
    serverless.shutdown()
    assert not os.path.exists(directory)
    assert not any(_http.is_private(host) for host in hosts)
