"""Fixtures of the integration tests that start a real server of their own."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, serving

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Debian's redis-server on loopback with a random password, nothing saved to disk;
    yields its URL (redis://:password@127.0.0.1:port/0) and the process, killed at the end."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (scripts/system-deps installs it)")
    port = free_port()
    password = secrets.token_hex(16)
    proc = subprocess.Popen(
        [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--requirepass", password,
            "--dir", str(folder),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    with serving(proc, port, grace=0):  # grace 0: SIGTERM, then SIGKILL at once
        yield f"redis://:{password}@127.0.0.1:{port}/0", proc


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A fresh Redis server for the test, behind a password: its URL."""
    with redis_server(tmp_path) as (url, _):
        yield url
