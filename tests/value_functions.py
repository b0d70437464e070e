"""Identity functions for tests/*/test_values.py: untyped ones (Python's built-in value types
travel exactly with no annotation), ones annotated precisely for every kind of value that
MessagePack alone does not bring back as it was, and the seed's pipeline, untyped."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from typing import Any

import msgspec

import serverless


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(str, enum.Enum):
    FAST = "fast"


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Pair(msgspec.Struct, frozen=True):
    left: str
    right: tuple[int, int]


@serverless.parallel
def echo(items: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
    """Untyped: built-in values pass, instances of classes raise."""
    return list(items)


@serverless.parallel
def echo_bare(items, *args, **kwargs):  # type: ignore[no-untyped-def]
    """With no annotations at all, as a new user writes it."""
    return items


@serverless.parallel
def types_of(items: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
    """What arrived: each item's, argument's and keyword argument's type name and repr."""
    seen = [*items, *args, *kwargs.values()]
    return [[type(v).__name__, repr(v)] for v in seen]


@serverless.parallel
def echo_args(items: list[int], *args: Any, **kwargs: Any) -> list[Any]:
    """Its arguments, untyped, back as its results."""
    return [list(args), kwargs]


@serverless.parallel
def returns(items: list[str]) -> list[Any]:
    """An untyped return: results that would change type must raise."""
    samples = {
        "tuple": (1, 2),
        "set": {1},
        "decimal": decimal.Decimal("1.5"),
        "int": 1,
        "point": Point(1, 2),
        "colour": Colour.RED,
        "nested point": {"a": [(1, Point(3, 4))]},
    }
    return [samples[name] for name in items]


@serverless.parallel
def wrong_result(items: list[int]) -> list[int]:
    """Returns strings where its annotation promises ints."""
    wrong: list[Any] = [str(n) for n in items]
    return wrong


@serverless.parallel
def tuples(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return list(items)


@serverless.parallel
def sets(items: list[set[int]]) -> list[set[int]]:
    return list(items)


@serverless.parallel
def frozensets(items: list[frozenset[str]]) -> list[frozenset[str]]:
    return list(items)


@serverless.parallel
def datetimes(items: list[datetime.datetime]) -> list[datetime.datetime]:
    return list(items)


@serverless.parallel
def dates(items: list[datetime.date]) -> list[datetime.date]:
    return list(items)


@serverless.parallel
def times(items: list[datetime.time]) -> list[datetime.time]:
    return list(items)


@serverless.parallel
def timedeltas(items: list[datetime.timedelta]) -> list[datetime.timedelta]:
    return list(items)


@serverless.parallel
def decimals(items: list[decimal.Decimal]) -> list[decimal.Decimal]:
    return list(items)


@serverless.parallel
def uuids(items: list[uuid.UUID]) -> list[uuid.UUID]:
    return list(items)


@serverless.parallel
def blobs(items: list[bytes]) -> list[bytes]:
    return list(items)


@serverless.parallel
def colours(items: list[Colour]) -> list[Colour]:
    return list(items)


@serverless.parallel
def levels(items: list[Level | Mode]) -> list[Level | Mode]:
    return list(items)


@serverless.parallel
def points(items: list[Point]) -> list[Point]:
    return list(items)


@serverless.parallel
def pairs(items: list[Pair]) -> list[Pair]:
    return list(items)


@serverless.parallel
def nested(items: list[dict[str, set[int]]]) -> list[dict[str, set[int]]]:
    return list(items)


@serverless.parallel
def lists_of_tuples(items: list[list[tuple[int, str]]]) -> list[list[tuple[int, str]]]:
    return list(items)


@serverless.parallel
def typed_args(
    items: list[int], span: tuple[int, int], *, when: datetime.date, tags: frozenset[str]
) -> list[Any]:
    """Typed arguments; its results (untyped) say what arrived, as plain values."""
    return [[type(span).__name__, type(when).__name__, type(tags).__name__] for _ in items]


# -- the seed's pipeline, as its users wrote it: no annotations, tuple results -----------------


def get_address(zipcode):  # type: ignore[no-untyped-def]
    latency = zipcode % 7 / 1000
    address = None if zipcode % 5 == 0 else f"{zipcode} Main Street"
    return zipcode, latency, address


@serverless.parallel
def geolocate(zipcodes):  # type: ignore[no-untyped-def]
    return [get_address(zipcode) for zipcode in zipcodes]  # type: ignore[no-untyped-call]


@serverless.parallel
def cleanup(addresses):  # type: ignore[no-untyped-def]
    return filter(lambda entry: entry[2], addresses)
