"""Values round-trip exactly or raise (issue 13, point 6; issue 23, point 1).

The pure tests come first: annotations into Shapes, untyped values as MessagePack extension
types and what cannot travel, and whole calls pushed through build_request, the worker's accept
and run, and read_reply with no socket or process (the in-process transport's path).
"""

from __future__ import annotations

import collections
import collections.abc as abc
import datetime
import decimal
import time
import types
import uuid
import zoneinfo
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
PARIS = zoneinfo.ZoneInfo("Europe/Paris")

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
CLASSES = KINDS[9:]  # instances of classes: exact through annotations only

# Python's built-in value types: exact with no annotation (kind, value)
BUILTINS: list[tuple[str, Any]] = [
    ("tuple", (1, "a", None)),
    ("empty tuple", ()),
    ("nested tuple", (1, (2, (3.5, b"x")), [4, (5,)])),
    ("set", {1, 2, "a"}),
    ("empty set", set()),
    ("frozenset", frozenset({"a", 1})),
    ("frozenset of frozensets", frozenset({frozenset({1, 2}), frozenset()})),
    ("set of tuples", {(1, 2), (3, (4, "x"))}),
    ("naive datetime", NAIVE),
    ("UTC datetime", AWARE),
    ("fixed-offset datetime", AWARE.astimezone(PLUS_TWO)),
    (
        "named fixed offset",
        AWARE.astimezone(datetime.timezone(-datetime.timedelta(hours=5), "EST")),
    ),
    ("zoned datetime", datetime.datetime(2024, 7, 1, 12, 30, tzinfo=PARIS)),
    ("ambiguous zoned datetime", datetime.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS)),
    ("date", datetime.date(2024, 2, 29)),
    ("time", datetime.time(7, 8, 9, 10)),
    ("aware time", datetime.time(7, 8, tzinfo=PLUS_TWO)),
    ("timedelta", datetime.timedelta(days=-3, seconds=5, microseconds=7)),
    ("Decimal", decimal.Decimal("1.10")),
    ("negative zero Decimal", decimal.Decimal("-0.000")),
    ("Decimal NaN", decimal.Decimal("NaN")),
    ("Decimal exponent", decimal.Decimal("1E+30")),
    ("UUID", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("int keys", {1: "a", -2: "b"}),
    ("tuple keys", {(1, "a"): 1, (2, (3, None)): 2}),
    (
        "built-in keys",
        {datetime.date(2024, 1, 1): 1, frozenset({1}): 2, (1, decimal.Decimal(2)): 3},
    ),
    ("scalar keys", {None: 1, True: 2, 1.5: 3, b"k": 4}),
    ("a tuple in a dict in a list", [{"a": (1, 2)}, {"b": [(3, {4})]}]),
    ("everything", {"when": [NAIVE, AWARE], "ids": {uuid.UUID(int=1): (decimal.Decimal("3"),)}}),
]
EXACT: list[Any] = [None, True, 0, -(2**63), 2**64 - 1, 1.5, "", "é", b"\x00", [], {}]
EXACT += [[1, "a", None], {"a": [1, {"b": b"x"}]}, {1: 2, 1.5: None, b"k": True, (1, "a"): 0}]


def same(a: Any, b: Any) -> bool:
    """Equal, of the very same types all the way down (and the same time zones)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        pairs = zip(a.items(), b.items(), strict=True)
        return len(a) == len(b) and all(same(k, j) and same(v, w) for (k, v), (j, w) in pairs)
    if isinstance(a, set | frozenset):  # each element matched by one of the very same types
        rest = list(b)
        for x in a:
            match = next((i for i, y in enumerate(rest) if same(x, y)), None)
            if match is None:
                return False
            del rest[match]
        return not rest
    if isinstance(a, datetime.datetime | datetime.time):
        return a == b and same_zone(a.tzinfo, b.tzinfo) and a.fold == b.fold and str(a) == str(b)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)  # NaN != NaN, and -0 == 0
    if isinstance(a, float) and a != a:
        return bool(b != b)
    return bool(a == b)


def same_zone(a: datetime.tzinfo | None, b: datetime.tzinfo | None) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, zoneinfo.ZoneInfo):
        return a is b  # ZoneInfo(key) is cached: the very same object
    return a is None or (b is not None and a == b and a.tzname(None) == b.tzname(None))


def through_the_wire(value: Any) -> Any:
    """`value` encoded as the library sends an untyped value and decoded as it is received."""
    body = p.encode(p.Call(v=p.VERSION, fn="m:f", id="i", index=0, items=[_values.to_wire(value)]))
    [back] = p.decode_call(body, p.MSGPACK).items
    return back


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


# -- untyped values: built-in types as extension types, classes refused -----------------------


@pytest.mark.parametrize("value", EXACT, ids=repr)
def test_plain_values_travel_as_they_are(value: Any) -> None:
    assert _values.check_items(shape(f_any), [value]) is False  # nothing to convert
    assert _values.to_wire(value) is value
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(value))
    assert same(back, value)


@pytest.mark.parametrize(("kind", "value"), BUILTINS, ids=[k for k, _ in BUILTINS])
def test_builtin_values_travel_exactly_untyped(kind: str, value: Any) -> None:
    _values.check_items(shape(f_any), [value])
    assert same(through_the_wire(value), value)


@pytest.mark.parametrize(("kind", "value", "typed"), CLASSES, ids=[k[0] for k in CLASSES])
def test_classes_raise_naming_value_place_and_fix(
    kind: str, value: Any, typed: ParallelFunction[Any, Any]
) -> None:
    with pytest.raises(serverless.SerializationError) as info:
        _values.check_items(shape(f_any), [1, value], offset=10)
    message = str(info.value)
    assert f"item 11 of m:f's input, {value!r}" in message
    assert "would arrive as" in message and "Annotate the items precisely" in message
    assert f"`items: list[{type(value).__name__}" in message


def test_nested_classes_and_arguments_are_named_too() -> None:
    point = vf.Point(1, 2)
    with pytest.raises(serverless.SerializationError, match=r"holds a Point at \[0\]\[1\]"):
        _values.check_items(shape(f_any), [[[1, (2, point)]]])
    with pytest.raises(
        serverless.SerializationError, match=r"holds a Point at \['a'\] \(in a set\)"
    ):
        _values.check_items(shape(f_any), [{"a": {point}}])
    with pytest.raises(serverless.SerializationError, match=r"holds a Colour at \(a key\)"):
        _values.check_items(shape(f_any), [{vf.Colour.RED: 1}])
    with pytest.raises(serverless.SerializationError, match=r"argument `n` of m:f.*`n: Point"):
        _values.wire_args(shape(f_any), [point], {})
    with pytest.raises(serverless.SerializationError, match=r"`\*\*kw: tuple\[int, Point\]`"):
        _values.wire_args(shape(f_any), [1], {"m": [1], "x": (1, point)})
    # typed parameters are neither checked nor converted: their decoders bring them back
    assert _values.wire_args(shape(f_list), [1, "a"], {"k": {1}}) == ([1, "a"], {"k": {1}})
    assert _values.wire_items(shape(f_list), [(1, 2)]) == [(1, 2)]


def test_builtin_values_no_longer_suggest_annotations() -> None:
    for _, value in BUILTINS:
        _values.check_items(shape(f_any), [value])
        _values.wire_args(shape(f_any), [value], {"kw": value})


PT = collections.namedtuple("PT", "x y")


@pytest.mark.parametrize(
    "value",
    [
        bytearray(b"x"),
        memoryview(b"x"),
        object(),
        1j,
        PT(1, 2),
        collections.OrderedDict(a=1),
        collections.Counter("ab"),
        vf.Level.LOW,
    ],
    ids=repr,
)
def test_other_objects_and_subclasses_of_builtins_raise(value: Any) -> None:
    with pytest.raises(serverless.SerializationError, match="item 0 of m:f's input"):
        _values.check_items(shape(f_any), [value])


def test_a_subclass_of_a_builtin_is_named_as_one() -> None:
    class Name(str):
        pass

    with pytest.raises(
        serverless.SerializationError,
        match=r"is a .*Name: only str itself travels untyped, not a subclass",
    ):
        _values.check_items(shape(f_any), [Name("x")])
    with pytest.raises(serverless.SerializationError, match="only tuple itself travels untyped"):
        _values.check_items(shape(f_any), [PT(1, 2)])


def test_zones_that_cannot_travel_exactly_raise_with_the_fix() -> None:
    class Custom(datetime.tzinfo):
        def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
            return datetime.timedelta(hours=1)

        def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
            return datetime.timedelta(0)

        def tzname(self, dt: datetime.datetime | None) -> str:
            return "custom"

    odd = datetime.datetime(2024, 1, 1, tzinfo=Custom())
    with pytest.raises(serverless.SerializationError, match=r"astimezone\(zoneinfo.ZoneInfo"):
        _values.check_items(shape(f_any), [odd])
    with open(zoneinfo.TZPATH[0] + "/Europe/Paris", "rb") as file:
        keyless = zoneinfo.ZoneInfo.from_file(file)  # no key to send
    with pytest.raises(serverless.SerializationError, match=r"neither a zoneinfo\.ZoneInfo with a"):
        _values.check_items(shape(f_any), [datetime.datetime(2024, 1, 1, tzinfo=keyless)])
    fraction = datetime.timezone(datetime.timedelta(seconds=1, microseconds=5))
    with pytest.raises(serverless.SerializationError, match="not a whole number of seconds"):
        _values.check_items(shape(f_any), [datetime.time(1, tzinfo=fraction)])


def test_values_that_need_no_conversion_are_not_copied() -> None:
    items: list[Any] = [{"id": 1, "s": "x" * 10}, [1, 2, {"k": b""}], {1: {2: [3]}}]
    assert _values.wire_items(shape(f_any), items) is items
    assert _values.check_items(shape(f_any), items) is False
    mixed: list[Any] = [items[0], (1, 2)]
    sent = _values.wire_items(shape(f_any), mixed)
    assert sent is not mixed and sent[0] is items[0] and type(sent[1]) is msgspec.msgpack.Ext
    assert _values.check_items(shape(f_any), mixed) is True


def test_the_check_of_a_list_of_scalars_is_cheap() -> None:
    items = list(range(200_000))
    started = time.perf_counter()
    assert _values.check_items(shape(f_any), items) is False
    assert _values.wire_items(shape(f_any), items) is items
    assert time.perf_counter() - started < 0.2  # ~10 ms here: one pass over the types each


def test_wire_value_names_where_and_the_fix_given() -> None:
    """The public check-and-convert of one value with no annotation to fall back on (an
    instance's attributes use it): its error says where, what, and the caller's fix."""
    sent = p.encode(_values.wire_value((1, {2}), "x", "fix"))
    assert same(msgspec.msgpack.decode(sent, ext_hook=_values.ext_hook), (1, {2}))
    fix = "Make it a value the wire carries."
    with pytest.raises(serverless.SerializationError) as info:
        _values.wire_value({"p": [vf.Point(1, 2)]}, "attribute `p` of the Scaler instance", fix)
    assert str(info.value) == (
        "attribute `p` of the Scaler instance, {'p': [Point(x=1, y=2)]}, holds a Point at "
        "['p'][0], Point(x=1, y=2): it would arrive as a dict, {'x': 1, 'y': 2}. " + fix
    )


def test_extension_types_that_do_not_decode_are_malformed() -> None:
    cases = [
        (msgspec.msgpack.Ext(99, b""), "unknown MessagePack extension type 99"),
        (msgspec.msgpack.Ext(_values.EXT_UUID, b"short"), "a malformed UUID"),
        (msgspec.msgpack.Ext(_values.EXT_DECIMAL, b"one"), "a malformed Decimal"),
        (msgspec.msgpack.Ext(_values.EXT_DATE, msgspec.msgpack.encode([2024, 13, 1])), "date"),
        (
            msgspec.msgpack.Ext(
                _values.EXT_DATETIME, msgspec.msgpack.encode([2024, 1, 1, 0, 0, 0, 0, 0, "No/Such"])
            ),
            "the time zone 'No/Such' is unknown here",
        ),
    ]
    for ext, message in cases:
        body = msgspec.msgpack.encode([ext])
        with pytest.raises(_values.ExtensionError, match=message):
            msgspec.msgpack.decode(body, ext_hook=_values.ext_hook)


# random nests of every built-in type, compared type for type (hypothesis)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.binary(max_size=5)
)
ZONES = st.sampled_from(
    [
        None,
        UTC,
        PLUS_TWO,
        datetime.timezone(datetime.timedelta(hours=-9, minutes=-30), "X"),
        PARIS,
        zoneinfo.ZoneInfo("America/New_York"),
        zoneinfo.ZoneInfo("UTC"),
    ]
)


def builtin_values(nan: bool) -> st.SearchStrategy[Any]:
    return (
        st.datetimes(timezones=ZONES, allow_imaginary=True)
        | st.dates()
        | st.times(timezones=st.sampled_from([None, UTC, PLUS_TWO]))
        | st.timedeltas()
        | st.decimals(allow_nan=nan)  # a signaling NaN cannot be hashed
        | st.uuids()
    )


HASHABLE = st.recursive(
    SCALARS | builtin_values(nan=False),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
NESTS = st.recursive(
    SCALARS | builtin_values(nan=True),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.lists(inner, max_size=3).map(tuple)
        | st.sets(HASHABLE, max_size=3)
        | st.frozensets(HASHABLE, max_size=3)
        | st.dictionaries(st.text(max_size=3) | HASHABLE, inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(NESTS)
def test_random_nests_of_builtin_values_round_trip_exactly(value: Any) -> None:
    assert same(through_the_wire(value), value)


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
    sent_args, sent_kwargs = _values.wire_args(shape, args, kwargs)
    _values.check_items(shape, items)
    call = p.Call(
        v=p.VERSION,
        fn=entry.name,
        id=p.new_request_id(),
        index=0,
        items=_values.wire_items(shape, items),
        args=sent_args,
        kwargs=sent_kwargs,
    )
    body, headers = p.build_request(KEYRING, "/r", call, time.time())
    if fmt == p.JSON:  # a foreign client: no extension types
        plain = msgspec.structs.replace(call, items=items, args=list(args), kwargs=kwargs)
        body = msgspec.json.encode(plain)
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


@pytest.mark.parametrize(("kind", "value"), BUILTINS, ids=[k for k, _ in BUILTINS])
def test_builtin_values_arrive_exactly_as_items_arguments_and_results(
    kind: str, value: Any
) -> None:
    """Through the in-process path (build_request, the worker's accept and run, read_reply):
    an untyped identity function gets and returns them exactly, as items, *args and **kwargs."""
    assert same(roundtrip(vf.echo, [1, value]), [1, value])
    assert same(roundtrip(vf.echo_bare, [value, value]), [value, value])
    assert same(roundtrip(vf.echo_args, [0], value, k=value), [[value], {"k": value}])
    [[type_name, text]] = roundtrip(vf.types_of, [value])
    assert type_name == type(value).__name__
    # a set's repr follows its insertion history (the same elements in another order)
    assert isinstance(value, set | frozenset) or text == repr(value)


def test_untyped_results_of_classes_raise_on_the_worker() -> None:
    assert same(roundtrip(vf.returns, ["int", "tuple", "set"]), [1, (1, 2), {1}])
    assert same(roundtrip(vf.returns, ["decimal"]), [decimal.Decimal("1.5")])
    for name, kind, where in [
        ("point", "Point", "is a Point"),
        ("colour", "Colour", "is a Colour"),
        ("nested point", "Point", "holds a Point at ['a'][0][1]"),
    ]:
        with pytest.raises(serverless.SerializationError) as info:
            roundtrip(vf.returns, ["int", name])
        message = str(info.value)
        assert message.startswith("result 101 of tests.value_functions:returns on worker")
        assert where in message and "Annotate the return precisely" in message
        assert kind in message


def test_untyped_arguments_of_classes_raise_in_the_caller() -> None:
    with pytest.raises(serverless.SerializationError, match=r"`\*args: Point`"):
        roundtrip(vf.echo_args, [1], vf.Point(1, 2))
    assert roundtrip(vf.echo_args, [1], 1, "a", k=[None]) == [[1, "a"], {"k": [None]}]


def test_a_json_request_keeps_the_plain_rule() -> None:
    """JSON has no extension types: what a foreign client sends arrives as JSON decodes it,
    and results that would not decode unaided are refused, as before."""
    assert roundtrip(vf.types_of, [[1, 2]], fmt=p.JSON) == [["list", "[1, 2]"]]
    assert roundtrip(vf.returns, ["int"], fmt=p.JSON) == [1]
    for name in ("tuple", "set", "decimal"):
        with pytest.raises(serverless.SerializationError, match="Annotate the return precisely"):
            roundtrip(vf.returns, ["int", name], fmt=p.JSON)


def test_an_unknown_zone_on_the_worker_is_a_refusal_naming_it() -> None:
    when = msgspec.msgpack.encode([2024, 1, 1, 0, 0, 0, 0, 0, "Nowhere/Atlantis"])
    call = p.Call(
        v=p.VERSION,
        fn=vf.echo.entry.name,
        id=p.new_request_id(),
        index=0,
        items=[msgspec.msgpack.Ext(_values.EXT_DATETIME, when)],
    )
    body, headers = p.build_request(KEYRING, "/r", call, time.time())
    answer = ENDPOINT.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
    assert isinstance(answer, Response) and answer.status == 400
    with pytest.raises(serverless.RequestRejected, match="'Nowhere/Atlantis' is unknown here"):
        p.read_reply(400, p.MSGPACK, answer.body, answer.headers, call, 0, "x", KEYRING)


def test_the_seeds_pipeline_with_tuple_results_runs_unchanged() -> None:
    zipcodes = [10001, 10005, 20002]
    rows = roundtrip(vf.geolocate, zipcodes)
    assert same(rows, [vf.get_address(z) for z in zipcodes])  # type: ignore[no-untyped-call]
    assert all(type(row) is tuple for row in roundtrip(vf.cleanup, rows))


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
