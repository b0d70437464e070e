"""The replay store fails closed (issue 22, point 6).

Before: a state directory that was not the worker's own (created by another user, or left with
a wider mode, or a symbolic link) made the worker fall back, with one log line, to a per-process
cache: a captured request ran once per process (4 runs in 32 replays on two servers of two
processes each), where docs/security.md promised "if the store fails, the worker refuses".
Now `serverless worker` refuses to start, and an app that mounts the route refuses every chunk
with a 503 naming the directory and the fix. Runs are counted on the worker side.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serverless import _wire as p
from serverless._worker.replay import STATE_DIR_ENV
from tests.conftest import TESTS, free_port, test_env
from tests.integration.test_security import KEYRING, ROUTE, SERVERS, SQUARE, _post

pytestmark = pytest.mark.timeout(90)

NOBODY = 65534


def _bad_directory(fault: str, tmp: Path) -> Path:
    """A state directory that is not this user's private one, as `fault` says."""
    if fault == "mode 0755":
        path = tmp / "wide"
        path.mkdir(mode=0o755)
        path.chmod(0o755)
    elif fault == "a symbolic link":
        real = tmp / "real"
        real.mkdir(mode=0o700)
        path = tmp / "link"
        path.symlink_to(real, target_is_directory=True)
    else:  # another user's: only root can make one here
        if os.getuid() != 0:
            pytest.skip("making a directory of another user needs root")
        path = tmp / "theirs"
        path.mkdir(mode=0o700)
        os.chown(path, NOBODY, NOBODY)
    return path


@pytest.mark.parametrize("fault", ["mode 0755", "a symbolic link", "another user's"])
@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_a_state_directory_that_is_not_private_refuses_every_replay(
    kind: str, fault: str, tmp_path: Path
) -> None:
    state = _bad_directory(fault, tmp_path)
    calls = tmp_path / "calls"
    calls.touch()
    rid = p.new_request_id()
    body = p.encode(p.Call(v=p.VERSION, fn=SQUARE, id=rid, index=0, items=[1, 2, 3]), p.MSGPACK)
    headers = p.signed_headers(KEYRING, ROUTE, SQUARE, rid, body, now=time.time())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", *SERVERS[kind](port)],
        env=test_env(**{STATE_DIR_ENV: str(state), "SERVERLESS_TEST_CALLS": str(calls)}),
        cwd=TESTS.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output: list[bytes] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    statuses: list[int] = []
    messages: set[str] = set()
    started = False
    try:
        started = _listens(port, proc)
        if started:
            time.sleep(1.0)  # every process has booted and takes connections
            for _ in range(16):
                status, reply = _post(port, headers, body)
                statuses.append(status)
                if reply is not None and reply.error is not None:
                    messages.add(reply.error.message)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        reader.join(10)
        proc.stdout.close()
    ran = len(calls.read_text().splitlines())
    assert ran == 0, f"the captured request ran {ran} times in {len(statuses)} replays"
    text = b"".join(output).decode(errors="replace")
    if kind.startswith("serverless worker"):
        assert not started and proc.returncode != 0  # refused to start
        assert str(state) in text and STATE_DIR_ENV in text, text[-2000:]
    else:  # an app that mounts the route: every chunk is refused, saying why
        assert statuses == [503] * 16, statuses
        (message,) = messages
        assert str(state) in message and STATE_DIR_ENV in message, message


def _listens(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> bool:
    """True once something listens on `port`; False if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    assert proc.poll() is not None, f"nothing listens on port {port}"
    return False
