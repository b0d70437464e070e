"""The items passed by keyword (issue 23, item 5): `f(items=[...])` or by the function's own
first parameter's name, in every calling form, for parallel and sequential steps, methods
included; a wrong keyword is a TypeError that says how to pass them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import serverless
from tests import sample_functions as sf

SQUARES = [1, 4, 9]
# items= is the same for every step, whatever its parameter's name; type checkers know only
# the parameter's own name (`numbers=` here), so these tests pass items= through a dict
ITEMS: dict[str, Any] = {"items": [1, 2, 3]}


async def _async_forms() -> list[list[int]]:
    return [
        await sf.square.aio(**ITEMS),
        await sf.square.aio(numbers=[1, 2, 3]),
        [r async for r in sf.square.astream(**ITEMS)],
        [r async for r in sf.square.astream(numbers=[1, 2, 3])],
    ]


def test_every_calling_form_takes_the_items_by_keyword() -> None:
    for key in ("items", "numbers"):
        kw: dict[str, Any] = {key: [1, 2, 3]}
        assert sf.square(**kw) == SQUARES
        assert sf.square.with_stats(**kw)[0] == SQUARES
        assert sf.square.submit(**kw).result(timeout=30) == SQUARES
        assert list(sf.square.stream(**kw)) == SQUARES
        assert sf.square.with_options(workers=2)(**kw) == SQUARES
        assert sf.square.partial(1)(**kw) == [2, 5, 10]
        assert sf.square(**kw, offset=1, scale=2) == [4, 10, 20]  # other keywords still reach it
    assert asyncio.run(_async_forms()) == [SQUARES] * 4


def test_methods_and_sequential_steps_take_the_items_by_keyword() -> None:
    geo = sf.Geo()
    assert geo.scaled(numbers=[1, 2, 3]) == geo.scaled(**ITEMS) == geo.scaled([1, 2, 3])
    assert sf.Geo.negated(**ITEMS) == sf.Geo.negated(numbers=[1, 2, 3]) == [-1, -2, -3]
    assert sf.Geo.named(**ITEMS) == sf.Geo().named([1, 2, 3])
    assert geo.total(**ITEMS) == geo.total(numbers=[1, 2, 3]) == geo.total([1, 2, 3])
    assert serverless.Pipeline(sf.square, sf.odd_only).run(data=[1, 2, 3]) == [1, 9]


# untyped: these calls are the mistakes a type checker would flag
SQUARE: Any = sf.square
TOTAL: Any = sf.Geo().total


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda: SQUARE(nums=[1]), "as items= or as numbers=; got only nums="),
        (lambda: SQUARE(), "as first argument, as items= or as numbers="),
        (lambda: SQUARE([1], items=[2]), "got its items twice, as first argument and as items="),
        (lambda: SQUARE(items=[1], numbers=[2]), "twice, as numbers= and items="),
        (lambda: TOTAL(nums=[1]), "got only nums="),
    ],
)
def test_a_wrong_keyword_is_a_clear_type_error(call: Any, says: str) -> None:
    with pytest.raises(TypeError, match=says.replace("(", r"\(")):
        call()
