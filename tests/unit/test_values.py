"""Values round-trip exactly or raise (issue 13, point 6).

The pure tests come first: annotations into Shapes, the exactness check, and whole calls pushed
through build_request, the worker's accept and run, and read_reply with no socket or process.
A few end-to-end tests at the bottom run on the embedded local pool.
"""

from __future__ import annotations

import collections.abc as abc
import datetime
import decimal
import time
import types
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any

import msgspec
import pytest

import serverless
from serverless import _wire as p
from serverless._function import ParallelFunction
from serverless._wire import Response
from serverless._wire import values as _values
from serverless._worker.endpoint import Endpoint
from tests import value_functions as vf
from tests.conftest import SECRET

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


# -- annotations into shapes -------------------------------------------------------------------


def f_list(
    items: list[tuple[int, int]], n: int, *rest: str, k: set[int], **kw: uuid.UUID
) -> list[int]:
    return []


def f_abstract(items: abc.Iterable[datetime.date]) -> Iterator[decimal.Decimal]:
    yield decimal.Decimal(0)


def f_any(items: list[Any], n: Any, m: list[int] | None = None, **kw: Any) -> list[dict[str, Any]]:
    return []


def f_none(items: Any, n: Any) -> Any:
    return items


f_none.__annotations__ = {}  # as if written with no annotations


def f_forward(items: Any) -> Any:
    return items


f_forward.__annotations__ = {"items": "list[Undefined]", "return": "list[int]"}


class Owner:
    def method(self, items: Sequence[frozenset[int]]) -> tuple[str, ...]:
        return ()


def test_shape_reads_items_arguments_and_results() -> None:
    s = shape(f_list)
    assert (s.items_name, s.items, s.result) == ("items", tuple[int, int], int)
    assert s.arg(0) == _values.Param("n", int)
    assert s.arg(2) == _values.Param("rest[1]", str, "*rest")
    assert s.kwarg("k") == _values.Param("k", set[int])
    assert s.kwarg("other") == _values.Param("other", uuid.UUID, "**kw")
    assert s.kwarg("n") == _values.Param("n", int)
    abstract = shape(f_abstract)
    assert (abstract.items, abstract.result) == (datetime.date, decimal.Decimal)
    method = shape(Owner.method, bound=True)
    assert (method.items, method.result) == (frozenset[int], str)


def test_imprecise_or_missing_annotations_leave_values_untyped() -> None:
    s = shape(f_any)
    assert (s.items, s.result, s.arg(0).type, s.arg(1).type) == (None, None, None, list[int] | None)
    assert shape(f_none) == _values.Shape(
        "m:f",
        items_name="items",
        positional=(_values.Param("n"),),
        keywords={"n": _values.Param("n")},
    )
    assert shape(f_forward) == _values.Shape("m:f")  # annotations that cannot be evaluated

    def bare(items: Any) -> Any:
        return items

    bare.__annotations__ = {"items": list, "return": abc.Sequence}
    assert (shape(bare).items, shape(bare).result) == (None, None)


@pytest.mark.parametrize(
    ("tp", "precise"),
    [
        (int, True),
        (tuple[int, ...], True),
        (dict[str, set[int]] | None, True),
        (Annotated[int, msgspec.Meta(ge=0)], True),
        (vf.Point, True),
        (list, False),
        (dict[str, Any], False),
        (list[object], False),
        (types.GenericAlias(tuple, (int, list)), False),
        (abc.Iterable[int], True),
        (Callable[[int], int], False),  # msgspec cannot decode it
    ],
)
def test_precise(tp: Any, precise: bool) -> None:
    assert _values.precise(tp) is precise


# -- the exactness check of untyped values -----------------------------------------------------


@pytest.mark.parametrize("value", EXACT, ids=repr)
def test_exact_values_pass_and_do_round_trip(value: Any) -> None:
    _values.check_items(shape(f_any), [value])
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(value))
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize(("kind", "value", "typed"), KINDS, ids=[k[0] for k in KINDS])
def test_every_other_kind_raises_naming_value_place_and_fix(
    kind: str, value: Any, typed: ParallelFunction[Any, Any]
) -> None:
    with pytest.raises(serverless.SerializationError) as info:
        _values.check_items(shape(f_any), [1, value], offset=10)
    message = str(info.value)
    assert f"item 11 of m:f's input, {value!r}" in message
    assert "would arrive as" in message and "Annotate the items precisely" in message
    assert f"`items: list[{type(value).__name__}" in message


def test_nested_values_and_arguments_are_checked_too() -> None:
    with pytest.raises(serverless.SerializationError, match=r"holds a tuple at \[0\]\[1\]"):
        _values.check_items(shape(f_any), [[[1, (2, 3)]]])
    with pytest.raises(serverless.SerializationError, match=r"holds a set at \['a'\]"):
        _values.check_items(shape(f_any), [{"a": {1}}])
    with pytest.raises(serverless.SerializationError, match="holds a naive datetime"):
        _values.check_items(shape(f_any), [{"when": NAIVE}])
    with pytest.raises(serverless.SerializationError, match=r"argument `n` of m:f.*`n: tuple"):
        _values.check_args(shape(f_any), [(1, 2)], {})
    with pytest.raises(serverless.SerializationError, match=r"`\*\*kw: Decimal`"):
        _values.check_args(shape(f_any), [1], {"m": [1], "x": decimal.Decimal(1)})
    _values.check_args(shape(f_list), [1, "a"], {"k": {1}})  # typed parameters: not checked
    _values.check_items(shape(f_list), [(1, 2)])


@pytest.mark.parametrize("value", [bytearray(b"x"), memoryview(b"x"), object()])
def test_other_objects_raise(value: Any) -> None:
    with pytest.raises(serverless.SerializationError):
        _values.check_items(shape(f_any), [value])


def test_str_subclasses_and_aware_offsets() -> None:
    class Name(str):
        pass

    with pytest.raises(serverless.SerializationError, match=r"is a .*Name"):
        _values.check_items(shape(f_any), [Name("x")])
    _values.check_items(shape(f_any), [AWARE.astimezone(PLUS_TWO)])  # the same instant


def test_exactness_check_of_a_list_of_scalars_is_cheap() -> None:
    items = list(range(200_000))
    started = time.perf_counter()
    _values.check_items(shape(f_any), items)
    assert time.perf_counter() - started < 0.2  # ~10 ms here: one pass over the types


# -- whole calls, sans I/O: build_request, accept, run, read_reply ----------------------------

KEYRING = p.Keyring(SECRET)
ENDPOINT = Endpoint("/r", KEYRING)


def roundtrip(
    step: ParallelFunction[Any, Any],
    items: list[Any],
    *args: Any,
    fmt: str = p.MSGPACK,
    **kwargs: Any,
) -> list[Any]:
    """One chunk of `step`, as the library sends it, through a worker Endpoint, read back."""
    entry = step.entry
    shape = entry.shape("")
    _values.check_args(shape, args, kwargs)
    _values.check_items(shape, items)
    call = p.Call(
        v=p.VERSION,
        fn=entry.name,
        id=p.new_request_id(),
        index=0,
        items=items,
        args=list(args),
        kwargs=kwargs,
    )
    body, headers = p.build_request(KEYRING, "/r", call, time.time())
    if fmt == p.JSON:
        body = msgspec.json.encode(call)
        headers = p.signed_headers(KEYRING, "/r", call.fn, call.id, body, p.JSON, now=time.time())
    job = ENDPOINT.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
    answer = job if isinstance(job, Response) else ENDPOINT.run(job)
    content_type = dict(answer.headers)["content-type"]
    headers = dict(answer.headers)
    keys = p.Keyring(SECRET)
    reply = p.read_reply(
        answer.status, content_type, answer.body, headers, call, 100, "in-process", keys, shape
    )
    assert reply.results is not None
    return reply.results


@pytest.mark.parametrize(("kind", "value", "typed"), KINDS, ids=[k[0] for k in KINDS])
@pytest.mark.parametrize("fmt", [p.MSGPACK, p.JSON])
def test_typed_items_and_results_arrive_exactly(
    kind: str, value: Any, typed: ParallelFunction[Any, Any], fmt: str
) -> None:
    [back] = roundtrip(typed, [value], fmt=fmt)
    assert back == value and type(back) is type(value)


def test_aware_datetimes_and_bytes_round_trip_untyped() -> None:
    back = roundtrip(vf.echo, [AWARE.astimezone(PLUS_TWO), b"\x00\xff"])
    assert back == [AWARE, b"\x00\xff"] and back[0].tzinfo is not None


def test_nested_typed_values_arrive_exactly() -> None:
    assert roundtrip(vf.nested, [{"a": {1, 2}}]) == [{"a": {1, 2}}]
    [[pair]] = roundtrip(vf.lists_of_tuples, [[(1, "x")]])
    assert pair == (1, "x") and type(pair) is tuple


def test_typed_arguments_arrive_exactly_and_mismatches_raise() -> None:
    when, tags = datetime.date(2024, 1, 2), frozenset({"a"})
    assert roundtrip(vf.typed_args, [1], (1, 2), when=when, tags=tags) == [
        ["tuple", "date", "frozenset"]
    ]
    with pytest.raises(serverless.SerializationError, match=r"argument `when`.*`when: date`"):
        roundtrip(vf.typed_args, [1], (1, 2), when="soon", tags=tags)


def test_an_item_that_does_not_match_its_annotation_raises() -> None:
    with pytest.raises(serverless.SerializationError) as info:
        roundtrip(vf.tuples, [(1, 2), (3, "x")])
    assert "item 101 of tests.value_functions:tuples's input" in str(info.value)
    assert "`items: list[tuple[int, int]]`" in str(info.value)


def test_a_result_of_the_wrong_type_for_the_annotation_raises() -> None:
    with pytest.raises(serverless.SerializationError, match=r"result 100 of .*wrong_result"):
        roundtrip(vf.wrong_result, [1, 2])


def test_untyped_results_that_would_change_raise_on_the_worker() -> None:
    assert roundtrip(vf.returns, ["int"]) == [1]
    for name, kind in [("tuple", "tuple"), ("set", "set"), ("decimal", "Decimal")]:
        with pytest.raises(serverless.SerializationError) as info:
            roundtrip(vf.returns, ["int", name])
        message = str(info.value)
        assert message.startswith("result 101 of tests.value_functions:returns on worker")
        assert f"is a {kind}" in message and "Annotate the return precisely" in message


def test_untyped_arguments_that_would_change_raise_in_the_caller() -> None:
    with pytest.raises(serverless.SerializationError, match=r"`\*args: tuple\[int, int\]`"):
        roundtrip(vf.echo_args, [1], (1, 2))
    assert roundtrip(vf.echo_args, [1], 1, "a", k=[None]) == [[1, "a"], {"k": [None]}]


def test_a_foreign_client_gets_a_422_naming_the_item() -> None:
    call = p.Call(
        v=p.VERSION,
        fn=vf.tuples.entry.name,
        id=p.new_request_id(),
        index=0,
        items=[[1, 2], [1, "x"]],
    )
    body = msgspec.json.encode(call)
    headers = p.signed_headers(KEYRING, "/r", call.fn, call.id, body, p.JSON, now=time.time())
    answer = ENDPOINT.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
    assert isinstance(answer, Response) and answer.status == 422
    reply = p.decode_reply(answer.body, p.JSON)
    assert reply.error is not None and (reply.error.kind, reply.error.index) == ("input", 1)
