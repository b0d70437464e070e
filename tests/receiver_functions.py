"""Methods whose receivers carry state (issue 23, item 4): the workers rebuild each receiver
from its attributes without calling __init__. A module the workers import."""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import serverless


def _log(path: str, line: str) -> None:
    with Path(path).open("a") as f:
        f.write(line + "\n")


class Scaler:
    """An __init__ with a required argument, which logs its runs: the workers never call it."""

    def __init__(self, factor: int, log: str = "") -> None:
        self.factor = factor
        self.log = log
        self.__sign = -1  # private: stored as _Scaler__sign, and it travels too
        if log:
            _log(log, "init")

    @serverless.parallel
    def scale(self, numbers: list[int]) -> list[int]:
        if self.log:
            _log(self.log, "scale")
        return [n * self.factor for n in numbers]

    @serverless.parallel
    def signed(self, numbers: list[int]) -> list[int]:
        return [n * self.factor * self.__sign for n in numbers]

    @serverless.parallel
    async def ascale(self, numbers: list[int]) -> list[int]:
        return [n * self.factor for n in numbers]


class SubScaler(Scaler):
    """A subclass: a worker would rebuild a Scaler, so the call refuses it."""

    def __init__(self, factor: int) -> None:
        super().__init__(factor + 1)


class Slotted:
    __slots__ = ("__hidden", "factor", "unset")

    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.__hidden = 3  # a mangled slot: _Slotted__hidden

    @serverless.parallel
    def scale(self, numbers: list[int]) -> list[Any]:
        return [[n * self.factor * self.__hidden, hasattr(self, "unset")] for n in numbers]


@dataclass(frozen=True)
class Priced:
    """A frozen dataclass whose fields are annotated: they arrive as those types."""

    rate: Decimal
    since: datetime.date
    tags: frozenset[str]
    currency: ClassVar[str] = "EUR"

    @serverless.parallel
    def price(self, amounts: list[int]) -> list[str]:
        assert isinstance(self.rate, Decimal) and isinstance(self.since, datetime.date)
        assert isinstance(self.tags, frozenset)
        return [f"{self.rate * amount} {self.currency} {self.since.year}" for amount in amounts]


@dataclass(frozen=True, slots=True)
class FrozenSlots:
    factor: int
    label: str = "x"

    @serverless.parallel
    def scale(self, numbers: list[int]) -> list[str]:
        return [f"{self.label}{n * self.factor}" for n in numbers]


class Holding:
    """An attribute that cannot travel: the call refuses it before any request."""

    def __init__(self, log: str) -> None:
        self.log = log
        self.conn = threading.Lock()

    @serverless.parallel
    def run(self, numbers: list[int]) -> list[int]:
        _log(self.log, "run")
        return numbers


class Reconnecting:
    """What cannot travel left out by __getstate__ and made again by __setstate__, as pickle
    does."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self.conn = threading.Lock()

    @serverless.parallel
    def greet(self, numbers: list[int]) -> list[str]:
        with self.conn:
            return [f"{self.name}{n}" for n in numbers]


class Typed:
    """An annotated attribute whose value does not match its annotation."""

    factor: int

    def __init__(self, factor: Any) -> None:
        self.factor = factor

    @serverless.parallel
    def scale(self, numbers: list[int]) -> list[int]:
        return [n * self.factor for n in numbers]
