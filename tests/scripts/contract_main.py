"""The contract suite's functions defined in the script being run (`__main__`), run on the
local pool as a user's script would (by value): every form times every binding. Prints one
JSON line: {"cells": N, "failures": [...]}. Run by tests/integration/test_contract_pool.py,
and as `python -c`, from stdin, unguarded and in a Jupyter kernel by test_by_value.py."""

from __future__ import annotations

import json
import traceback

import serverless
from tests import contract


@serverless.parallel
def add(numbers: list[int], n: int = 1) -> list[int]:
    return [x + n for x in numbers]


class Calc:
    offset = 100

    def __init__(self, extra: int = 0) -> None:
        self.extra = extra  # an instance's state: it travels with the receiver

    @serverless.parallel
    def method(self, numbers: list[int], n: int = 1) -> list[int]:
        return [x + n + self.offset + self.extra for x in numbers]

    @serverless.parallel
    @staticmethod
    def static(numbers: list[int], n: int = 1) -> list[int]:
        return [x + n for x in numbers]

    @serverless.parallel
    @classmethod
    def klass(cls, numbers: list[int], n: int = 1) -> list[int]:
        return [x + n + cls.offset for x in numbers]


def main() -> None:
    plus = contract.Binding
    contract.BINDINGS.clear()
    contract.BINDINGS.update(
        {
            "__main__ function": plus(lambda: add, None, lambda x, n: x + n),
            "__main__ staticmethod": plus(lambda: Calc.static, None, lambda x, n: x + n),
            "__main__ classmethod": plus(lambda: Calc.klass, None, lambda x, n: x + n + 100),
            "__main__ instance method": plus(lambda: Calc().method, None, lambda x, n: x + n + 100),
            "__main__ explicit receiver": plus(
                lambda: Calc.method, Calc(), lambda x, n: x + n + 100, False
            ),
            "__main__ instance with state": plus(
                lambda: Calc(7).method, None, lambda x, n: x + n + 107
            ),
        }
    )
    failures, cells = [], 0
    for binding in contract.BINDINGS:
        for form in contract.FORMS:
            cells += 1
            try:
                contract.check(binding, form)
            except Exception as exc:
                failures.append(f"{binding} x {form}: {type(exc).__name__}: {exc}"[:300])
                traceback.print_exc()
    print(json.dumps({"cells": cells, "failures": failures}))


if __name__ == "__main__":
    main()
