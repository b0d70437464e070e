"""The contract suite on the embedded local pool: every calling form times every binding,
through real worker processes; functions in `__main__` (which go by value) through a script
run as a user would, and in test_by_value.py through `python -c`, stdin and a notebook."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import TESTS, test_env
from tests.contract import BINDINGS, FORMS, check


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("binding", BINDINGS)
def test_every_form_on_every_binding(binding: str, form: str) -> None:
    check(binding, form)


def test_every_form_on_functions_defined_in_the_main_script() -> None:
    script = TESTS / "scripts" / "contract_main.py"
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=TESTS.parent,
        env=test_env(),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    outcome = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert outcome["failures"] == [] and outcome["cells"] == 6 * len(FORMS)
