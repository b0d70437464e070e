"""The local pool over Unix domain sockets (issue 16, part 4): the caller reaches its workers
through sockets in a private directory; the URLs, the probes and a worker's call back to
itself stay on loopback TCP."""

from __future__ import annotations

import os
import socket
import stat

import pytest

import serverless
from serverless._caller import http as _http
from serverless._caller.dispatch import dispatcher
from serverless._pool import pool as _pool
from tests import sample_functions as sf

pytestmark = pytest.mark.timeout(60)


def _sockets() -> list[str]:
    pool = _pool._pool
    assert pool is not None
    return [path for path in pool._unix if path is not None]


def test_the_caller_reaches_its_workers_over_unix_sockets_in_a_private_directory() -> None:
    assert sf.square.with_options(workers=4, chunk_size=1)([1, 2, 3, 4]) == [1, 4, 9, 16]
    pool = _pool._pool
    assert pool is not None
    paths = _sockets()
    assert len(paths) == pool.processes
    assert all(stat.S_ISSOCK(os.stat(path).st_mode) for path in paths)
    assert stat.S_IMODE(os.stat(os.path.dirname(paths[0])).st_mode) == 0o700
    assert all(url.startswith("http://127.0.0.1:") for url in pool.urls)  # the URLs stay TCP

    ports = {_pool._port(url) for url in pool.urls}

    async def families() -> list[int]:
        idle = dispatcher()._client()._idle.items()
        conns = [c for origin, cs in idle if origin.port in ports for c in cs if not c.closed]
        return [c.transport.get_extra_info("socket").family for c in conns if c.transport]

    seen = dispatcher().run(families())
    assert seen and set(seen) == {socket.AF_UNIX}


def test_a_call_made_in_a_worker_reached_over_its_unix_socket_calls_back_over_tcp() -> None:
    """uvicorn gives a Unix socket's request no server address: the worker names its
    loopback TCP one, so the call back to self has an origin (it would be refused without)."""
    assert sf.nested_calls.with_options(workers=2, chunk_size=1)([1, 2], 3) == [4, 5]


def test_closing_the_pool_removes_its_sockets_and_routes() -> None:
    sf.square([1])
    pool = _pool._pool
    assert pool is not None
    paths = _sockets()
    ports = {_pool._port(url) for url in pool.urls}
    serverless.shutdown()
    assert not any(os.path.exists(path) for path in paths)
    assert not any(("127.0.0.1", port) in _http._unix_sockets for port in ports)
