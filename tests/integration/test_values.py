"""Values round-trip exactly or raise (issue 13, point 6).

The pure tests come first: annotations into Shapes, the exactness check, and whole calls pushed
through build_request, the worker's accept and run, and read_reply with no socket or process.
A few end-to-end tests at the bottom run on the embedded local pool.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest

import serverless
from serverless import _values
from serverless._function import ParallelFunction
from tests import value_functions as vf

UTC = datetime.timezone.utc
AWARE = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
NAIVE = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)
PLUS_TWO = datetime.timezone(datetime.timedelta(hours=2))

# (kind, a value, a function annotated for it)
KINDS: list[tuple[str, Any, ParallelFunction[Any, Any]]] = [
    ("tuple", (1, 2), vf.tuples),
    ("set", {1, 2}, vf.sets),
    ("frozenset", frozenset({"a"}), vf.frozensets),
    ("naive datetime", NAIVE, vf.datetimes),
    ("date", datetime.date(2024, 5, 6), vf.dates),
    ("time", datetime.time(7, 8, 9), vf.times),
    ("timedelta", datetime.timedelta(seconds=5), vf.timedeltas),
    ("Decimal", decimal.Decimal("1.10"), vf.decimals),
    ("UUID", uuid.UUID(int=42), vf.uuids),
    ("Colour", vf.Colour.RED, vf.colours),
    ("Level", vf.Level.HIGH, vf.levels),
    ("Mode", vf.Mode.FAST, vf.levels),
    ("Point", vf.Point(1, 2), vf.points),
    ("Pair", vf.Pair("a", (1, 2)), vf.pairs),
]
EXACT: list[Any] = [None, True, 0, -(2**63), 2**64 - 1, 1.5, "", "é", b"\x00", [], {}, AWARE]
EXACT += [[1, "a", None], {"a": [1, {"b": b"x"}]}, {1: 2, 1.5: None, b"k": True, (1, "a"): 0}]


def shape(func: Callable[..., Any], bound: bool = False) -> _values.Shape:
    return _values.shape_of(func, "m:f", bound)


# -- end to end, on the embedded local pool ----------------------------------------------------


@pytest.mark.parametrize(("kind", "value", "typed"), KINDS[:5], ids=[k[0] for k in KINDS[:5]])
def test_local_pool_untyped_raises_before_sending(
    kind: str, value: Any, typed: ParallelFunction[Any, Any]
) -> None:
    with pytest.raises(serverless.SerializationError, match="Annotate the items precisely"):
        vf.echo([1, value])


def test_local_pool_every_kind_arrives_exactly() -> None:
    for _, value, typed in KINDS:
        [back] = typed([value])
        assert back == value and type(back) is type(value)


def test_local_pool_results_arguments_and_streams() -> None:
    with pytest.raises(serverless.SerializationError, match="result 1 of"):
        vf.returns(["int", "tuple"])
    with pytest.raises(serverless.SerializationError, match="result 0 of"):
        vf.wrong_result([1])
    with pytest.raises(serverless.SerializationError, match="argument `when`"):
        vf.typed_args([1], (1, 2), when=cast(Any, "soon"), tags=frozenset())
    with pytest.raises(serverless.SerializationError, match="item 3 of"):
        list(vf.echo.stream(iter([1, 2, 3, (4,)])))
    assert list(vf.tuples.stream(iter([(1, 2)] * 5))) == [(1, 2)] * 5
    run = serverless.Pipeline(vf.tuples, vf.tuples).execute([(1, 2)])
    assert run.result == [(1, 2)] and type(run.result[0]) is tuple
