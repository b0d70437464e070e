"""Unit tests: no sockets, no processes. Every call goes to a worker Endpoint in this process
through the in-process transport; a test that tries to open a socket or start a process fails
at once, so a test that needs real parts has to live in tests/integration/."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from serverless import _targets
from serverless._caller.dispatch import dispatcher
from serverless._caller.flow import Capacities
from serverless._caller.inprocess import InProcess
from serverless._caller.transport import Target
from serverless._pool import pool as _pool
from serverless._wire import Keyring
from serverless._worker.endpoint import Endpoint
from tests.conftest import SECRET

ROUTE = "/serverless"
URLS = ("inprocess://worker-a/serverless", "inprocess://worker-b/serverless")


def _forbidden(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a unit test tried to {what}: move it to tests/integration/")

    return refuse


@pytest.fixture(autouse=True)
def no_sockets_or_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _forbidden("connect a socket"))
    monkeypatch.setattr(socket.socket, "bind", _forbidden("bind a socket"))
    monkeypatch.setattr(socket, "create_connection", _forbidden("connect a socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _forbidden("start a process"))
    monkeypatch.setattr(_pool, "get_pool", _forbidden("start the local pool"))


@pytest.fixture
def in_process() -> Iterator[InProcess[Endpoint]]:
    """The transport every call of the test goes through (two URLs, one endpoint)."""
    keyring = Keyring(SECRET)
    transport = InProcess(Endpoint(ROUTE, keyring))
    dispatcher().capacities = Capacities()  # nothing learned from another test's endpoint
    target = Target(URLS, ROUTE, keyring, "in-process", transport=transport)
    with _targets.override(target):
        yield transport
    transport.close()


@pytest.fixture(autouse=True)
def _every_call_in_process(in_process: InProcess[Endpoint]) -> None:
    """Unit tests' calls never leave the process."""
