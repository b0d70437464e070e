"""Functions the tests run on workers; servers under test import this module."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from typing import Any

import serverless

CALLS_FILE_ENV = "SERVERLESS_TEST_CALLS"  # if set, every run appends a line to this file


def _record(name: str) -> None:
    path = os.environ.get(CALLS_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {os.getpid()}\n")


@serverless.parallel
def square(numbers: Iterable[int], offset: int = 0, *, scale: int = 1) -> list[int]:
    _record("square")
    return [(n * n + offset) * scale for n in numbers]


@serverless.parallel
def fail_on(numbers: list[int], bad: int) -> list[int]:
    _record("fail_on")
    out = []
    for n in numbers:
        if n == bad:
            raise ValueError(f"cannot handle {n}")
        out.append(n)
    return out


@serverless.parallel
def sleepy(numbers: Iterable[float]) -> list[float]:
    out = []
    for n in numbers:
        time.sleep(n)
        out.append(n)
    return out


@serverless.parallel
def returns_none(numbers: list[int]) -> Any:
    return None


@serverless.parallel
def returns_object(numbers: list[int]) -> list[object]:
    return [object() for _ in numbers]


@serverless.parallel
def pids(numbers: list[int]) -> list[int]:
    return [os.getpid() for _ in numbers]


@serverless.parallel
async def async_double(numbers: list[int]) -> list[int]:
    await asyncio.sleep(0.001)
    return [2 * n for n in numbers]


def plain(numbers: list[int]) -> list[int]:
    """Not decorated: a worker must refuse to run it."""
    _record("plain")
    return numbers


class Geo:
    def __init__(self) -> None:
        self.factor = 10

    @serverless.parallel
    def scaled(self, numbers: list[int]) -> list[int]:
        return [n * self.factor for n in numbers]

    @serverless.parallel
    @staticmethod
    def negated(numbers: list[int]) -> list[int]:
        return [-n for n in numbers]

    @serverless.parallel
    @classmethod
    def named(cls, numbers: list[int]) -> list[str]:
        return [f"{cls.__name__}{n}" for n in numbers]

    @serverless.sequential
    def total(self, numbers: list[int]) -> list[int]:
        return [sum(numbers) * self.factor]


@serverless.parallel
def odd_only(numbers: list[int]) -> list[int]:
    """A filter stage: fewer elements out than in, as the seed's cleanup."""
    return [n for n in numbers if n % 2]


@serverless.parallel
def explode_on_nine(numbers: list[int]) -> list[int]:
    for n in numbers:
        if n == 9:
            raise ValueError("nine")
    return numbers


@serverless.parallel
def straggle(numbers: list[int], marker: str, stall: float = 20.0) -> list[int]:
    """The first run that meets item 0 creates `marker` and stalls; later runs are quick:
    a straggler that a hedged duplicate overtakes."""
    if 0 in numbers:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            time.sleep(stall)
        except FileExistsError:
            pass
    return numbers


@serverless.parallel
def hang_on(numbers: list[int], bad: int, seconds: float = 30.0) -> list[int]:
    for n in numbers:
        if n == bad:
            time.sleep(seconds)
    return numbers


@serverless.parallel
def reject(numbers: list[int], bad: list[int]) -> list[int]:
    """Raises on every item listed in `bad`."""
    out = []
    for n in numbers:
        if n in bad:
            raise ValueError(f"cannot handle {n}")
        out.append(n)
    return out


@serverless.parallel
def nested(numbers: list[int], depth: int = 1000) -> list[Any]:
    """Each result is a list nested `depth` deep: deeper than msgspec will encode."""
    out: list[Any] = []
    for n in numbers:
        value: Any = n
        for _ in range(depth):
            value = [value]
        out.append(value)
    return out


@serverless.parallel
def квадрат(numbers: list[int]) -> list[int]:  # a non-ASCII name (issue 14)
    return [n * n for n in numbers]


@serverless.parallel
def nested_calls(numbers: list[int], width: int = 20) -> list[int]:
    """Each item makes a parallel call of its own, back into the same app (issue 15)."""
    return [n + len(sleepy([0.001] * width)) for n in numbers]
