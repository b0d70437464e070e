"""Shared fixtures: real servers on loopback, started and stopped by the tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import serverless
from serverless import _config

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
SECRET = "test-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def test_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(SRC), env.get("PYTHONPATH", "")])
    env["SERVERLESS_SECRET"] = SECRET
    env.update(extra)
    return env


test_env.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@contextlib.contextmanager
def server(args: list[str], port: int, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m <args>` (uvicorn, gunicorn...) until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        env=test_env(**env),
        cwd=TESTS.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def reset_settings() -> Iterator[None]:
    """Leave process-wide settings as they were."""
    saved = _config.settings()
    yield
    _config.configure(**vars(saved))


@pytest.fixture(scope="session", autouse=True)
def _stop_local_pool() -> Iterator[None]:
    yield
    serverless.shutdown()
