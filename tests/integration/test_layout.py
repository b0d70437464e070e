"""The layout's contracts bite: import-linter (pyproject.toml) passes on the package as it is,
and fails, naming the import, when a wrong-way import is added to a copy of it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(
    tmp_path: Path, module: str | None = None, line: str = ""
) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    package = tmp_path / "src" / "serverless"
    if not package.exists():
        shutil.copytree(ROOT / "src" / "serverless", package)
    if module is not None:
        path = package / module
        path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    return subprocess.run(
        [str(LINT), "--no-cache"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_contracts(tmp_path: Path) -> None:
    result = _lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the worker reaching into the caller's side
        (
            "_worker/gate.py",
            "from .._caller import http",
            "serverless._worker.gate -> serverless._caller.http",
        ),
        # the caller reaching into the worker's side
        (
            "_caller/fanout.py",
            "from .._worker import endpoint",
            "serverless._caller.fanout -> serverless._worker.endpoint",
        ),
        # shared code importing a side (the wrong way up the layers)
        (
            "_config.py",
            "from ._caller import rate",
            "serverless._config -> serverless._caller.rate",
        ),
        # the wire reading the clock
        ("_wire/bounds.py", "import time", "serverless._wire.bounds -> time"),
    ],
)
def test_a_wrong_way_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    result = _lint(tmp_path, module, line)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and broken in result.stdout, result.stdout
