"""The README's sample outputs are what the code prints today.

A fenced block whose info string is `output` shows the output of the fenced block just before
it: a `python` block runs as a script, a `sh` block's commands run from the checkout's root
with this environment's programs standing for `.venv/bin/`. The text must match exactly. Each
number may differ from the README's within a factor of 10 (or by 0.1), since timings and
random counts vary from run to run; a stale figure (a step shown taking 3.15s that now takes
0.00s) does not pass.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import test_env

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def examples() -> list[tuple[str, str, str]]:
    """(language, code, expected output) of each block that an `output` block follows."""
    text = README.read_text()
    blocks = list(FENCE.finditer(text))
    found = []
    for before, block in itertools.pairwise(blocks):
        if block.group(1) == "output":
            assert not text[before.end() : block.start()].strip(), "output follows no block"
            found.append((before.group(1), before.group(2), block.group(2)))
    return found


def close(shown: float, got: float) -> bool:
    if abs(shown - got) <= 0.1:
        return True
    return min(shown, got) > 0 and max(shown, got) / min(shown, got) <= 10


def assert_matches(shown: str, got: str) -> None:
    assert NUMBER.sub("#", got) == NUMBER.sub("#", shown), (
        f"README shows:\n{shown}\nprinted:\n{got}"
    )
    for a, b in zip(NUMBER.findall(shown), NUMBER.findall(got), strict=True):
        assert close(float(a), float(b)), f"README shows {a}, the code printed {b}:\n{got}"


def run(language: str, code: str, tmp_path: Path) -> str:
    if language == "python":
        script = tmp_path / "example.py"
        script.write_text(code)
        argv, cwd = [sys.executable, str(script)], tmp_path
    else:
        assert language == "sh", language
        bindir = f"{Path(sys.executable).parent}/"
        argv, cwd = ["bash", "-ec", code.replace(".venv/bin/", bindir)], ROOT
    done = subprocess.run(
        argv, cwd=cwd, env=test_env(), capture_output=True, text=True, timeout=110
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


EXAMPLES = examples()


def test_the_readme_has_examples_with_output() -> None:
    assert {language for language, _, _ in EXAMPLES} == {"python", "sh"}


@pytest.mark.parametrize(
    ("language", "code", "shown"),
    EXAMPLES,
    ids=[code.strip().splitlines()[-1][:40] for _, code, _ in EXAMPLES],
)
def test_readme_example_prints_what_the_readme_shows(
    language: str, code: str, shown: str, tmp_path: Path
) -> None:
    assert_matches(shown, run(language, code, tmp_path))


def test_the_comparison_catches_a_stale_figure() -> None:
    line = 'Step "cleanup" took {}s for 100 workers'
    assert_matches(line.format("3.15"), line.format("3.31"))
    assert not close(3.15, 0.0)
    with pytest.raises(AssertionError):
        assert_matches(line.format("3.15"), line.format("0.00"))
    assert math.isclose(float(NUMBER.findall("took 0.30s")[0]), 0.3)


def test_the_readme_is_short_and_its_test_command_is_ci() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 200
    first = FENCE.search(README.read_text())
    assert first is not None and first.group(1) == "sh"
    commands = [line.split("#")[0].strip() for line in first.group(2).splitlines()]
    assert commands[0].endswith(".venv/bin/serverless demo") and "'.[demo]'" in commands[0]
    assert commands[1] == "bash scripts/test"
    assert "bash scripts/test" in (ROOT / ".ci/run").read_text()
