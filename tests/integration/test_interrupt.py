"""Ctrl-C stops the work (issue 22, point 11): once a caller gives up on a call (Ctrl-C, a
cancelled `aio` or `submit`, a stream closed early), no chunk starts on a worker, and no
item-by-item chunk starts its next item, more than 1 s later. Counted on the workers: each
item appends its start time to a file (sample_functions.stamped), on the embedded local pool
(uvicorn) driven by tests/scripts/interrupted_main.py in a process group of its own. A
terminal's Ctrl-C reaches the whole group: the pool's workers, which must not die of it (they
finished their chunks, then were replaced)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TESTS, test_env

SCRIPT = TESTS / "scripts" / "interrupted_main.py"
WITHIN = 1.0  # seconds after giving up in which an item may still start (the promise)


def given_up(form: str, kind: str, tmp_path: Path) -> tuple[float, list[float]]:
    """Run the script: when it gave up, and when each item of the call started."""
    path = tmp_path / "stamps"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), form, kind, str(path)],
        cwd=TESTS.parent,
        env=test_env(),
        capture_output=True,
        timeout=120,
        start_new_session=True,  # its Ctrl-C reaches its own group, not pytest
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()[-3000:]
    lines = out.splitlines()
    when = float(next(line for line in lines if line.startswith("stopped")).split()[1])
    assert "after [1, 4, 9]" in lines, out  # the pool still serves...
    pids = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines if " [" in line}
    before, after = (set(json.loads(pids[key])) for key in ("before", "pids"))
    assert after <= before, out + done.stderr.decode()[-3000:]  # ...with the same workers
    starts = sorted(float(line.split()[1]) for line in path.read_text().splitlines())
    return when, starts


@pytest.mark.parametrize("kind", ["return", "rate", "plain"])
def test_ctrl_c_stops_the_work_on_the_workers(kind: str, tmp_path: Path) -> None:
    when, starts = given_up("call", kind, tmp_path)
    late = [round(start - when, 2) for start in starts if start > when + WITHIN]
    assert late == [], f"{len(late)} of {len(starts)} items started after {WITHIN}s: {late[:10]}"
    assert len(starts) < 400


@pytest.mark.parametrize("form", ["aio", "submit", "stream"])
def test_a_cancelled_call_stops_its_item_by_item_chunks(form: str, tmp_path: Path) -> None:
    when, starts = given_up(form, "return", tmp_path)
    late = [round(start - when, 2) for start in starts if start > when + WITHIN]
    assert late == [], f"{len(late)} of {len(starts)} items started after {WITHIN}s: {late[:10]}"
    assert len(starts) < 400
