"""The contract suite on the in-process transport: every calling form times every binding."""

from __future__ import annotations

import pytest

from tests.contract import BINDINGS, FORMS, check


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("binding", BINDINGS)
def test_every_form_on_every_binding(binding: str, form: str) -> None:
    check(binding, form)
