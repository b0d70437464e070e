"""The functions of the contract suite (tests/contract.py), one per binding."""

from __future__ import annotations

import serverless


@serverless.parallel
def add(numbers: list[int], n: int = 1) -> list[int]:
    return [x + n for x in numbers]


@serverless.parallel
def double(numbers: list[int]) -> list[int]:
    return [2 * x for x in numbers]


@serverless.sequential
def identity(numbers: list[int]) -> list[int]:
    return list(numbers)


class Calc:
    offset = 100  # a class attribute: the workers have it from the class

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


def _main_add(numbers: list[int], n: int = 1) -> list[int]:
    return [x + n for x in numbers]


# A function registered under __main__, as one defined in the script being run would be.
# In process, the registry finds it by that name; on the local pool it goes by value, as
# tests/scripts/contract_main.py's functions do for real.
_main_add.__module__ = "__main__"
main_add = serverless.parallel(_main_add)
