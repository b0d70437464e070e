"""progress=True on a real terminal (a pseudo-terminal the test reads), and nothing where
stderr is a file (issue 25): a 3,000-item call on the local pool, as a user runs it."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from tests.conftest import test_env

SCRIPT = """
import time
import serverless

@serverless.parallel(workers=20, chunk_size=30)
def wait(items):
    time.sleep(0.2)
    return [i + 1 for i in items]

if __name__ == "__main__":
    assert wait.with_options(progress=True)(list(range(3000))) == list(range(1, 3001))
    print("done")
"""


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "progress_script.py"
    path.write_text(SCRIPT)
    return path


def test_a_bar_is_drawn_on_a_terminal(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, str(_script(tmp_path))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
        env=test_env(),
        cwd=tmp_path,
    )
    os.close(follower)
    drawn = b""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                piece = os.read(leader, 65536)
            except OSError:  # the child closed its end
                break
            if not piece:
                break
            drawn += piece
        elif proc.poll() is not None:
            break
    os.close(leader)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == b"done"
    text = drawn.decode(errors="replace")
    assert "wait:" in text and "3000/3000" in text and "100%" in text
    assert "item/s" in text and "retries 0" in text and "throttles 0" in text
    assert text.count("\r") >= 2, "redrawn in place as it runs"
    assert "in flight" in text, "chunks in flight against the window while it runs"


def test_nothing_is_drawn_where_stderr_is_a_file(tmp_path: Path) -> None:
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        proc = subprocess.run(
            [sys.executable, str(_script(tmp_path))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=test_env(),
            cwd=tmp_path,
            timeout=90,
        )
    assert proc.returncode == 0 and proc.stdout.strip() == b"done"
    assert log.read_text() == ""
