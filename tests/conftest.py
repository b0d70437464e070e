"""Shared fixtures: real servers on loopback, started and stopped by the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import serverless
from serverless import _config

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

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
def serving(
    proc: subprocess.Popen[bytes], port: int, grace: float = 10
) -> Iterator[subprocess.Popen[bytes]]:
    """Wait until the started `proc` listens on `port`; when the block ends, stop it (SIGTERM,
    SIGKILL after `grace` seconds) and close its pipes."""
    try:
        wait_for_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


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
    with serving(proc, port):
        yield proc


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@contextlib.contextmanager
def haproxy(backends: list[int], port: int, tmp: Path) -> Iterator[str]:
    """Debian's HAProxy in front of workers on loopback ports; yields its base URL.

    Health checks every 200 ms and a redispatch on a refused connection, so a dead backend
    is taken out quickly, as a production configuration would."""
    servers = "\n".join(
        f"  server w{n} 127.0.0.1:{backend} check inter 200 fall 1 rise 1"
        for n, backend in enumerate(backends)
    )
    config = tmp / "haproxy.cfg"
    config.write_text(
        "defaults\n  mode http\n  timeout connect 2s\n  timeout client 300s\n"
        "  timeout server 300s\n  retries 3\n  option redispatch\n"
        f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n"
        f"backend be\n  balance leastconn\n{servers}\n"
    )
    proc = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    with serving(proc, port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def in_process_worker() -> Iterator[None]:
    """Every call goes to a worker Endpoint in this process (the in-process transport), so
    the counters of a downstream in this process are the worker side's."""
    from serverless import _targets
    from serverless._caller.inprocess import InProcess
    from serverless._caller.transport import Target
    from serverless._wire import Keyring
    from serverless._worker.endpoint import Endpoint

    keyring = Keyring(SECRET)
    transport = InProcess(Endpoint("/serverless", keyring))
    target = Target(
        ("inprocess://w/serverless",), "/serverless", keyring, "in-process", transport=transport
    )
    with _targets.override(target):
        yield
    transport.close()


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


@pytest.fixture(scope="session")
def _span_exporter() -> InMemorySpanExporter:
    """The OpenTelemetry SDK as this process's tracer provider (set once: OpenTelemetry
    allows no other), exporting every span to memory as it ends."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(_span_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """The spans this test's process ended (`spans.get_finished_spans()`), none before."""
    _span_exporter.clear()
    yield _span_exporter
    _span_exporter.clear()
