"""What a function's values look like on the wire: exactly what was sent, or an error.

MessagePack (and JSON) carry None, bools, ints, floats, strings, bytes, arrays and maps; decoded
without a type, a tuple or a set arrives as a list, a Decimal or a naive datetime as a string.
So a value crosses the wire in one of two ways:

- typed: where the function's annotation is precise (no Any, no bare `list`), the receiving side
  decodes into it with msgspec, and a tuple, set, datetime, Decimal, UUID, enum, dataclass or
  Struct arrives as what was sent; a value that does not match the annotation is an error;
- untyped: otherwise the scalars and lists and dicts of them travel as themselves, and Python's
  other built-in value types (tuples, sets, frozensets, datetimes with their zone, dates, times,
  timedeltas, Decimals, UUIDs, and dict keys that MessagePack would not bring back) as
  MessagePack extension types (`to_wire`, decoded by `ext_hook`: docs/protocol.md §5.3).
  Anything else (a class's instance, an enum, a subclass of a built-in) raises a
  SerializationError naming the value, where it is, what it would arrive as, and the
  annotation that would carry it. JSON has no extension types: a JSON request's untyped values
  are what JSON decodes, and its reply may only carry results that decode unaided.

`Shape` is derived once per function from its annotations: the element type of its first
parameter (the items), the types of its other parameters, the element type of its return.
Pure: no I/O.
"""

from __future__ import annotations

import collections.abc as abc
import datetime
import decimal
import functools
import inspect
import itertools
import re
import types
import typing
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from .._exceptions import SerializationError

MSGPACK: Final = "application/msgpack"  # the same strings as envelope.py's (no import cycle)
JSON: Final = "application/json"

# Types that msgspec decodes, with no type given, to the very type that was encoded.
EXACT_SCALARS: Final[frozenset[type]] = frozenset({type(None), bool, int, float, str, bytes})

# The containers an items parameter or a return may be annotated with; the items a function
# receives are always a list, and whatever iterable it returns is collected into one.
_ITEMS_ORIGINS: Final = frozenset(
    {list, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection}
)
_RESULT_ORIGINS: Final = _ITEMS_ORIGINS | {abc.Iterator, abc.Generator}
_BARE: Final = frozenset({list, dict, set, frozenset, tuple, type})
_PATH = re.compile(r" - at `\$\[(\d+)\](.*)`$")
_RESULTS_PATH = re.compile(r" - at `\$\.results\[(\d+)\](.*)`$")


@dataclass(frozen=True)
class Param:
    """A parameter as the wire sees it: its name, and its type where precise (else None)."""

    name: str
    type: Any = None
    declared: str = ""  # how an annotation on it is written, if not `name`: "*args"


@dataclass(frozen=True)
class Mismatch:
    """A value that does not decode into its annotated type: where (an item's index in its
    list, if it is one) and why."""

    index: int | None
    message: str


@dataclass(frozen=True)
class Shape:
    """A function's values on the wire. A None type means untyped (decoded as Any)."""

    function: str
    items_name: str = "items"
    items: Any = None  # the element type of the first parameter
    result: Any = None  # the element type of the return
    positional: tuple[Param, ...] = ()  # the parameters after the items, in order
    var_positional: Param | None = None
    keywords: Mapping[str, Param] = field(default_factory=dict)
    var_keyword: Param | None = None

    def arg(self, position: int) -> Param:
        """The parameter that extra positional argument `position` (0: after the items) fills."""
        if position < len(self.positional):
            return self.positional[position]
        if self.var_positional is not None:
            star = self.var_positional
            index = position - len(self.positional)
            return Param(f"{star.name}[{index}]", star.type, f"*{star.name}")
        return Param(f"argument {position + 2}")

    def kwarg(self, name: str) -> Param:
        found = self.keywords.get(name)
        if found is not None:
            return found
        if self.var_keyword is not None:
            return Param(name, self.var_keyword.type, f"**{self.var_keyword.name}")
        return Param(name)

    @functools.cached_property
    def items_list(self) -> Any:
        return Any if self.items is None else types.GenericAlias(list, (self.items,))


UNTYPED = Shape("")


def shape_of(func: Callable[..., Any], name: str, bound: bool) -> Shape:
    """The Shape of `func` as called with its items first (after its receiver if `bound`).
    Annotations that cannot be evaluated (a forward reference to a name defined nowhere) make
    the function untyped rather than fail its calls."""
    try:
        signature = inspect.signature(func)
        # evaluating annotations runs the user's code (string annotations, __future__): any
        # exception it raises means "no usable annotations", never a failed call
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:
        return Shape(name)
    params = list(signature.parameters.values())[1 if bound else 0 :]
    positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional_kinds:
        return Shape(name)
    first, rest = params[0], params[1:]

    def param(p: inspect.Parameter) -> Param:
        tp = hints.get(p.name)
        return Param(p.name, tp if tp is not None and precise(tp) else None)

    return Shape(
        function=name,
        items_name=first.name,
        items=_precise_element(hints.get(first.name), _ITEMS_ORIGINS),
        result=_precise_element(hints.get("return"), _RESULT_ORIGINS),
        positional=tuple(param(p) for p in rest if p.kind in positional_kinds),
        var_positional=next(
            (param(p) for p in rest if p.kind == inspect.Parameter.VAR_POSITIONAL), None
        ),
        keywords={
            p.name: param(p)
            for p in rest
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        },
        var_keyword=next((param(p) for p in rest if p.kind == inspect.Parameter.VAR_KEYWORD), None),
    )


def precise(tp: Any) -> bool:
    """Whether `tp` says what every value inside it is (no Any, object, type variable or bare
    container anywhere) and msgspec can decode into it."""
    try:
        return _precise(tp) and _decodable(tp)
    except TypeError:  # metadata that cannot be hashed, as in Annotated[int, {"a": 1}]
        return False


def _precise(tp: Any) -> bool:
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return False
    if isinstance(tp, typing.NewType):
        return _precise(tp.__supertype__)
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _precise(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return True
    if origin is not None:
        args = typing.get_args(tp)
        return bool(args) and all(arg is Ellipsis or _precise(arg) for arg in args)
    if isinstance(tp, type):
        return tp not in _BARE and tp.__module__ != "collections.abc"
    return False  # an unresolved string, or a typing construct msgspec has no use for


@functools.lru_cache(maxsize=512)
def _decodable(tp: Any) -> bool:
    try:
        msgspec.msgpack.Decoder(tp)
    except TypeError:
        return False
    return True


def _precise_element(tp: Any, origins: frozenset[Any]) -> Any:
    """X of list[X] (or another of `origins`; tuple[X, ...]) if X is precise, else None."""
    if tp is None:
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _precise_element(typing.get_args(tp)[0], origins)
    args = typing.get_args(tp)
    homogeneous_tuple = origin is tuple and len(args) == 2 and args[1] is Ellipsis
    if not args or (origin not in origins and not homogeneous_tuple):
        return None
    return args[0] if precise(args[0]) else None


# -- typed decoding ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def decoder(tp: Any, fmt: str) -> msgspec.msgpack.Decoder[Any] | msgspec.json.Decoder[Any]:
    """A reusable decoder of `tp` from `fmt` (MessagePack unless JSON)."""
    if fmt == JSON:
        return msgspec.json.Decoder(tp)
    return msgspec.msgpack.Decoder(tp, ext_hook=ext_hook)


def decode_items(shape: Shape, raw: msgspec.Raw, fmt: str) -> list[Any] | Mismatch:
    """A chunk's items, decoded into the first parameter's element type where it is precise.
    Raises msgspec's errors when `raw` is no array at all (a malformed envelope)."""
    try:
        items: list[Any] = decoder(shape.items_list, fmt).decode(raw)
    except msgspec.ValidationError as exc:
        found = _PATH.search(str(exc))
        if shape.items is None or found is None:
            raise
        decoder(Any, fmt).decode(raw)  # malformed bytes (bad UTF-8...) are a 400, not this
        detail = _PATH.sub("", str(exc)) + (f" (at {found[2]} inside it)" if found[2] else "")
        annotation = f"{shape.items_name}: list[{_type_name(shape.items)}]"
        return Mismatch(int(found[1]), f"does not match the annotation `{annotation}`: {detail}")
    if not isinstance(items, list):
        raise msgspec.ValidationError("Expected `array`")
    return items


def decode_args(
    shape: Shape,
    args: Sequence[msgspec.Raw],
    kwargs: Mapping[str, msgspec.Raw],
    fmt: str,
) -> tuple[list[Any], dict[str, Any]] | Mismatch:
    """The extra arguments, each decoded into its parameter's type where it is precise."""
    if not args and not kwargs:
        return [], {}
    params = [shape.arg(i) for i in range(len(args))] + [shape.kwarg(k) for k in kwargs]
    values: list[Any] = []
    for raw, param in zip([*args, *kwargs.values()], params, strict=True):
        try:
            values.append(decoder(Any if param.type is None else param.type, fmt).decode(raw))
        except msgspec.ValidationError as exc:
            if param.type is None:
                raise
            decoder(Any, fmt).decode(raw)  # malformed bytes are the envelope's fault
            annotation = f"{param.declared or param.name}: {_type_name(param.type)}"
            return Mismatch(
                None, f"argument `{param.name}` does not match the annotation `{annotation}`: {exc}"
            )
    return values[: len(args)], dict(zip(kwargs, values[len(args) :], strict=True))


def result_mismatch(
    shape: Shape, exc: msgspec.ValidationError, raw: bytes, fmt: str, offset: int
) -> SerializationError | None:
    """The error to raise when a reply's results did not decode into the return's element
    type (`offset`: the chunk's first item's index), or None if `exc` is about something
    else: the reply's shape, or bytes that do not decode at all."""
    found = _RESULTS_PATH.search(str(exc))
    if shape.result is None or found is None:
        return None
    try:
        decoder(Any, fmt).decode(raw)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    index = offset + int(found[1])
    detail = _RESULTS_PATH.sub("", str(exc))
    return SerializationError(
        f"result {index}{found[2]} of {shape.function} does not match its return annotation "
        f"`list[{_type_name(shape.result)}]`: {detail}",
        index=index,
    )


# -- untyped values: Python's built-in value types as MessagePack extension types -------------

# The extension type codes (docs/protocol.md §5.3). A payload is one MessagePack value, its
# nested values encoded by the same rule, except a Decimal's (its ASCII text) and a UUID's (its
# 16 bytes).
EXT_TUPLE: Final = 1  # array of the elements
EXT_SET: Final = 2  # array of the elements
EXT_FROZENSET: Final = 3  # array of the elements
EXT_DATETIME: Final = 4  # [year, month, day, hour, minute, second, microsecond, fold, zone]
EXT_DATE: Final = 5  # [year, month, day]
EXT_TIME: Final = 6  # [hour, minute, second, microsecond, fold, zone]
EXT_TIMEDELTA: Final = 7  # [days, seconds, microseconds], as Python normalizes them
EXT_DECIMAL: Final = 8  # str(d) in ASCII: "1.10", "-0", "1E+3", "NaN", "-Infinity"
EXT_UUID: Final = 9  # the 16 bytes, big-endian (uuid.bytes)
# A zone: nil (naive), an int (a fixed offset: seconds east of UTC), [int, str] (an offset and
# its name, datetime.timezone(offset, name)), or a str (an IANA key: zoneinfo.ZoneInfo(key)).


class _Refused(Exception):
    """A value that cannot travel untyped: where inside the value being sent (`path`), and why
    when an annotation would not help (`reason`)."""

    def __init__(self, value: Any, path: str = "", reason: str = "") -> None:
        self.value, self.path, self.reason = value, path, reason
        self.index = 0  # in a top-level list (_wire_all(top=True)): the value refused

    def within(self, step: str) -> _Refused:
        self.path = step + self.path
        return self


class _ExtKey:
    """A map key that travels as an extension type: msgspec keys must be hashable, and an Ext
    is not. `enc_hook` hands its Ext to the encoder."""

    __slots__ = ("ext",)

    def __init__(self, ext: msgspec.msgpack.Ext) -> None:
        self.ext = ext


def enc_hook(obj: Any) -> Any:
    """The MessagePack encoder's hook: the Ext of a converted map key (nothing else)."""
    if type(obj) is _ExtKey:
        return obj.ext
    raise TypeError(f"Encoding objects of type {type(obj).__qualname__} is unsupported")


_pack = msgspec.msgpack.Encoder(enc_hook=enc_hook).encode
_Ext = msgspec.msgpack.Ext


def to_wire(value: Any) -> Any:
    """`value` as the wire carries it untyped: itself where it holds only scalars, lists and
    dicts that decode unaided (no copy), else a copy whose other built-in values are
    extension types. SerializationError if something in it cannot travel untyped."""
    try:
        return _wire(value)
    except _Refused as refused:
        raise SerializationError(f"{_describe_refused(refused, value)}.") from None
    except RecursionError:
        raise SerializationError("a value nests too deeply (or contains itself)") from None


def wire_value(value: Any, where: str, fix: str) -> Any:
    """`to_wire` for one value that has no annotation to fall back on: its SerializationError
    reads `<where>, <the value and what in it cannot travel>. <fix>` (e.g. where: "attribute
    `rate` of the Scaler instance", fix: what the user can do)."""
    try:
        return _wire(value)
    except _Refused as refused:
        raise SerializationError(f"{where}, {_describe_refused(refused, value)}. {fix}") from None
    except RecursionError:
        raise SerializationError(f"{where} nests too deeply (or contains itself)") from None


def _wire_all(values: list[Any], top: bool = False) -> list[Any]:
    """`values` converted (the same list where nothing needs it); _Refused(path "[i]..."),
    or for a `top` list (a chunk's items, its results) _Refused.index = i and the path inside
    that value."""
    if EXACT_SCALARS.issuperset(map(type, values)):
        return values
    out: list[Any] | None = None
    for i, item in enumerate(values):
        try:
            sent = item if type(item) in EXACT_SCALARS else _wire(item)
        except _Refused as refused:
            if not top:
                raise refused.within(f"[{i}]") from None
            refused.index = i
            raise
        if out is None:
            if sent is item:
                continue
            out = values[:i]
        out.append(sent)
    return values if out is None else out


def _wire(value: Any) -> Any:
    kind = type(value)
    if kind in EXACT_SCALARS:
        return value
    if kind is list:
        return _wire_all(value)
    if kind is dict:
        return _wire_dict(value)
    convert = _CONVERT.get(kind)
    if convert is None:
        raise _Refused(value)
    return convert(value)


def _wire_dict(value: dict[Any, Any]) -> dict[Any, Any]:
    for key, item in value.items():  # a record of scalars, the common case: one plain loop
        if type(key) not in EXACT_SCALARS or type(item) not in EXACT_SCALARS:
            break
    else:
        return value
    out: dict[Any, Any] | None = None
    for i, (key, item) in enumerate(value.items()):
        sent_key = key if type(key) in EXACT_SCALARS else _wire_key(key)
        try:
            sent = item if type(item) in EXACT_SCALARS else _wire(item)
        except _Refused as refused:
            raise refused.within(f"[{key!r}]") from None
        if out is None:
            if sent is item and sent_key is key:
                continue
            out = dict(itertools.islice(value.items(), i))
        out[sent_key] = sent
    return value if out is None else out


def _wire_key(key: Any) -> Any:
    """A map key: itself where MessagePack brings it back (a scalar, or a tuple of such keys:
    arrays as keys decode as tuples), else its extension type."""
    if type(key) is tuple and all(map(_plain_key, key)):
        return key
    try:
        sent = _wire(key)
    except _Refused as refused:
        raise refused.within(" (a key)") from None
    return _ExtKey(sent)


def _plain_key(key: Any) -> bool:
    kind = type(key)
    return kind in EXACT_SCALARS or (kind is tuple and all(map(_plain_key, key)))


def _elements(code: int, value: abc.Collection[Any], step: str) -> msgspec.msgpack.Ext:
    out = []
    for i, item in enumerate(value):
        try:
            out.append(item if type(item) in EXACT_SCALARS else _wire(item))
        except _Refused as refused:
            raise refused.within(step.format(i)) from None
    return _Ext(code, _pack(out))


def _zone(tz: datetime.tzinfo | None, value: Any) -> Any:
    if tz is None:
        return None
    if type(tz) is datetime.timezone:
        offset = tz.utcoffset(None)
        if offset.microseconds:
            reason = f"its offset, {offset}, is not a whole number of seconds, as the wire's are"
            raise _Refused(value, reason=reason)
        seconds = offset.days * 86400 + offset.seconds
        name = tz.tzname(None)
        return seconds if name == datetime.timezone(offset).tzname(None) else [seconds, name]
    if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
        return tz.key
    raise _Refused(
        value,
        reason=f"its tzinfo, {tz!r}, is neither a zoneinfo.ZoneInfo with a key nor a "
        "datetime.timezone: convert it with .astimezone(zoneinfo.ZoneInfo(name)) before the call",
    )


def _from_datetime(v: datetime.datetime) -> msgspec.msgpack.Ext:
    fields = [v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, v.fold]
    return _Ext(EXT_DATETIME, _pack([*fields, _zone(v.tzinfo, v)]))


def _from_time(v: datetime.time) -> msgspec.msgpack.Ext:
    fields = [v.hour, v.minute, v.second, v.microsecond, v.fold, _zone(v.tzinfo, v)]
    return _Ext(EXT_TIME, _pack(fields))


_CONVERT: Final[dict[type, Callable[[Any], Any]]] = {
    tuple: lambda v: _elements(EXT_TUPLE, v, "[{}]"),
    set: lambda v: _elements(EXT_SET, v, " (in a set)"),
    frozenset: lambda v: _elements(EXT_FROZENSET, v, " (in a frozenset)"),
    datetime.datetime: _from_datetime,
    datetime.date: lambda v: _Ext(EXT_DATE, _pack([v.year, v.month, v.day])),
    datetime.time: _from_time,
    datetime.timedelta: lambda v: _Ext(EXT_TIMEDELTA, _pack([v.days, v.seconds, v.microseconds])),
    decimal.Decimal: lambda v: _Ext(EXT_DECIMAL, str(v).encode("ascii")),
    uuid.UUID: lambda v: _Ext(EXT_UUID, v.bytes),
}
# the built-in types that travel untyped: a subclass of one does not (it would arrive as it)
_CARRIED: Final = (*EXACT_SCALARS, list, dict, *_CONVERT)


class ExtensionError(ValueError):
    """An extension type that does not decode: an unknown code, or a malformed payload."""


def ext_hook(code: int, data: memoryview) -> Any:
    """The MessagePack decoder's hook: an extension type of ours back into its value."""
    decode = _DECODE.get(code)
    if decode is None:
        raise ExtensionError(f"unknown MessagePack extension type {code}")
    try:
        return decode(data)
    except (ExtensionError, RecursionError):
        raise
    except Exception as exc:
        name = _EXT_NAMES[code]
        raise ExtensionError(f"a malformed {name} (extension type {code}): {exc}") from None


_tuple = msgspec.msgpack.Decoder(tuple, ext_hook=ext_hook).decode
_set = msgspec.msgpack.Decoder(set, ext_hook=ext_hook).decode
_frozenset = msgspec.msgpack.Decoder(frozenset, ext_hook=ext_hook).decode
_Zone = int | str | tuple[int, str] | None
_datetime_fields = msgspec.msgpack.Decoder(tuple[int, int, int, int, int, int, int, int, _Zone])
_time_fields = msgspec.msgpack.Decoder(tuple[int, int, int, int, int, _Zone])
_three_ints = msgspec.msgpack.Decoder(tuple[int, int, int])


@functools.lru_cache(maxsize=64)
def _tz(zone: _Zone) -> datetime.tzinfo | None:
    if zone is None:
        return None
    if isinstance(zone, str):
        try:
            return zoneinfo.ZoneInfo(zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ExtensionError(
                f"the time zone {zone!r} is unknown here (install the tzdata package)"
            ) from None
    if isinstance(zone, int):
        return datetime.timezone(datetime.timedelta(seconds=zone))
    seconds, name = zone
    return datetime.timezone(datetime.timedelta(seconds=seconds), name)


def _to_datetime(data: memoryview) -> datetime.datetime:
    year, month, day, hour, minute, second, micro, fold, zone = _datetime_fields.decode(data)
    tz = _tz(zone)
    return datetime.datetime(year, month, day, hour, minute, second, micro, tz, fold=fold)


def _to_time(data: memoryview) -> datetime.time:
    hour, minute, second, micro, fold, zone = _time_fields.decode(data)
    return datetime.time(hour, minute, second, micro, _tz(zone), fold=fold)


def _to_date(data: memoryview) -> datetime.date:
    return datetime.date(*_three_ints.decode(data))


def _to_timedelta(data: memoryview) -> datetime.timedelta:
    days, seconds, micro = _three_ints.decode(data)
    return datetime.timedelta(days, seconds, micro)


def _to_decimal(data: memoryview) -> decimal.Decimal:
    return decimal.Decimal(bytes(data).decode("ascii"))


def _to_uuid(data: memoryview) -> uuid.UUID:
    return uuid.UUID(bytes=bytes(data))


_DECODE: Final[dict[int, Callable[[memoryview], Any]]] = {
    EXT_TUPLE: _tuple,
    EXT_SET: _set,
    EXT_FROZENSET: _frozenset,
    EXT_DATETIME: _to_datetime,
    EXT_DATE: _to_date,
    EXT_TIME: _to_time,
    EXT_TIMEDELTA: _to_timedelta,
    EXT_DECIMAL: _to_decimal,
    EXT_UUID: _to_uuid,
}
_EXT_NAMES: Final = {
    EXT_TUPLE: "tuple",
    EXT_SET: "set",
    EXT_FROZENSET: "frozenset",
    EXT_DATETIME: "datetime",
    EXT_DATE: "date",
    EXT_TIME: "time",
    EXT_TIMEDELTA: "timedelta",
    EXT_DECIMAL: "Decimal",
    EXT_UUID: "UUID",
}


# -- the untyped values of a call: what each side sends, or the error that names the value ----

_ITEMS_FIX = (
    " Annotate the items precisely, e.g. `{}`, so that workers decode them into that type, "
    "or convert them before the call."
)
_ARG_FIX = (
    " Annotate it precisely, e.g. `{}`, so that workers decode it into that type, "
    "or convert it before the call."
)
_RESULT_FIX = (
    " Annotate the return precisely, e.g. `-> list[{}]`, so that the caller decodes results "
    "into that type, or convert them."
)


def check_items(shape: Shape, items: Sequence[Any], offset: int = 0) -> bool:
    """SerializationError if an item cannot travel (its parameter being untyped), naming it
    (its index counted from `offset`); else whether `wire_items` converts any on the way. A
    sequence of scalars costs one pass over their types, and nothing is kept."""
    if shape.items is not None or EXACT_SCALARS.issuperset(map(type, items)):
        return False
    converted = False
    for index, item in enumerate(items):
        try:
            converted |= _wire(item) is not item
        except _Refused as refused:
            raise _items_error(shape, offset + index, item, refused) from None
        except RecursionError:
            raise SerializationError("a value nests too deeply (or contains itself)") from None
    return converted


def wire_items(shape: Shape, items: list[Any], offset: int = 0) -> list[Any]:
    """A chunk's items as the wire carries them: as they are where the items parameter is
    typed (the worker decodes them into its type), else by `to_wire` (the same list where
    nothing needs converting). SerializationError as `check_items`."""
    if shape.items is not None:
        return items
    try:
        return _wire_all(items, top=True)
    except _Refused as refused:
        item = items[refused.index]
        raise _items_error(shape, offset + refused.index, item, refused) from None
    except RecursionError:
        raise SerializationError("a value nests too deeply (or contains itself)") from None


def wire_args(
    shape: Shape, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The extra arguments as the wire carries them: those of typed parameters as they are,
    the others by `to_wire`. SerializationError naming an argument that cannot travel."""
    sent_args, sent_kwargs = list(args), dict(kwargs)
    if not args and not kwargs:
        return sent_args, sent_kwargs
    for i, value in enumerate(args):
        sent_args[i] = _wire_arg(shape, shape.arg(i), value)
    for name, value in kwargs.items():
        sent_kwargs[name] = _wire_arg(shape, shape.kwarg(name), value)
    return sent_args, sent_kwargs


def _wire_arg(shape: Shape, param: Param, value: Any) -> Any:
    if param.type is not None:
        return value
    try:
        return _wire(value)
    except _Refused as refused:
        fix = (
            ""
            if refused.reason
            else _ARG_FIX.format(f"{param.declared or param.name}: {_hint(value)}")
        )
        described = _describe_refused(refused, value)
        raise SerializationError(
            f"argument `{param.name}` of {shape.function}, {described}.{fix}"
        ) from None
    except RecursionError:
        raise SerializationError("a value nests too deeply (or contains itself)") from None


def wire_results(shape: Shape, results: list[Any], fmt: str) -> list[Any] | Mismatch:
    """For a worker, before it encodes a function's results: as they are where its return is
    typed (the caller decodes them into its type), else by `to_wire`; a JSON reply (no
    extension types) only if each would decode unaided. A Mismatch describes, for the caller,
    the first result that cannot travel. SerializationError if they nest too deeply."""
    if shape.result is not None:
        return results
    if fmt == JSON:
        inexact = _inexact_result(results)
        return results if inexact is None else inexact
    try:
        return _wire_all(results, top=True)
    except _Refused as refused:
        result = results[refused.index]
        fix = "" if refused.reason else _RESULT_FIX.format(_hint(result))
        return Mismatch(refused.index, f"{_describe_refused(refused, result)}.{fix}")
    except RecursionError:
        raise SerializationError("a value nests too deeply (or contains itself)") from None


def _items_error(shape: Shape, index: int, item: Any, refused: _Refused) -> SerializationError:
    fix = "" if refused.reason else _ITEMS_FIX.format(f"{shape.items_name}: list[{_hint(item)}]")
    return SerializationError(
        f"item {index} of {shape.function}'s input, {_describe_refused(refused, item)}.{fix}",
        index=index,
    )


def _describe_refused(refused: _Refused, whole: Any) -> str:
    """`<whole>, is a <type>: <why>` (or `holds a <type> at <path>`), no full stop."""
    value, path = refused.value, refused.path.strip()
    why = refused.reason or _arrival(value)
    base = next((b for b in _CARRIED if isinstance(value, b)), None)
    what = _a(value)
    if base is not None and not refused.reason:  # a subclass of a type that travels
        name = base.__qualname__
        why = f"only {name} itself travels untyped, not a subclass (it would arrive as a {name})"
    if path:
        return f"{_short(whole)}, holds {what} at {path}, {_short(value)}: {why}"
    return f"{_short(value)}, is {what}: {why}"


# -- JSON: no extension types, so only what decodes unaided -----------------------------------


def _inexact_result(results: list[Any]) -> Mismatch | None:
    found = _first_inexact_of(results)
    if found is None:
        return None
    index, path, value = found
    message = _describe(path, value, results[index])
    return Mismatch(index, f"{message}{_RESULT_FIX.format(_hint(results[index]))}")


def inexact_value(value: Any) -> str | None:
    """Why `value`, sent untyped, would not arrive as sent ("<repr>, is a set: it would arrive
    as a list, ...."), or None if it would (an instance's attributes: _wire/receiver.py)."""
    found = _first_inexact_of([value])
    return None if found is None else _describe(found[1], found[2], value)


def _first_inexact_of(values: Sequence[Any]) -> tuple[int, str, Any] | None:
    """(index, path inside that value, the inexact value) of the first value that would not
    arrive as sent through JSON, or None. A sequence of scalars costs one pass over their
    types."""
    if EXACT_SCALARS.issuperset(map(type, values)):
        return None
    try:
        for index, value in enumerate(values):
            found = _inexact(value)
            if found is not None:
                return index, found[0], found[1]
    except RecursionError:
        raise SerializationError("a value nests too deeply (or contains itself)") from None
    return None


def _inexact(value: Any) -> tuple[str, Any] | None:
    kind = type(value)
    if kind in EXACT_SCALARS:
        return None
    if kind is list:
        if EXACT_SCALARS.issuperset(map(type, value)):
            return None
        for i, item in enumerate(value):
            found = _inexact(item)
            if found is not None:
                return f"[{i}]{found[0]}", found[1]
        return None
    if kind is dict:
        for key, item in value.items():
            if not _plain_key(key):
                return " (a key)", key
            found = _inexact(item)
            if found is not None:
                return f"[{key!r}]{found[0]}", found[1]
        return None
    if kind is datetime.datetime and value.utcoffset() is not None:
        return None  # an aware datetime arrives as the same instant, in UTC
    return "", value


def _describe(path: str, value: Any, whole: Any) -> str:
    """`<whole>, is a <type>: it would arrive as <what>.` (or `holds a <type> at <path>`)"""
    arrival = _arrival(value)
    if path:
        return f"{_short(whole)}, holds {_a(value)} at {path.strip()}, {_short(value)}: {arrival}."
    return f"{_short(value)}, is {_a(value)}: {arrival}."


def _arrival(value: Any) -> str:
    try:
        arrived = msgspec.msgpack.decode(msgspec.msgpack.encode(value))
    except (TypeError, ValueError, OverflowError) as exc:
        return f"the wire format cannot carry it ({exc})"
    return f"it would arrive as {_a(arrived)}, {_short(arrived)}"


def _a(value: Any) -> str:
    name = type(value).__qualname__
    if isinstance(value, datetime.datetime) and value.tzinfo is None:
        name = "naive datetime"
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__qualname__ if tp is not type(None) else "None"
    return repr(tp).replace("typing.", "").replace("collections.abc.", "")


def _hint(value: Any, depth: int = 0) -> str:
    """An annotation that would carry `value` exactly, for error messages."""
    kind = type(value)
    if value is None:
        return "None"
    if depth > 3:
        return "..."
    if kind is tuple:
        if 0 < len(value) <= 4:
            return f"tuple[{', '.join(_hint(v, depth + 1) for v in value)}]"
        return f"tuple[{_union(value, depth)}, ...]"
    if kind in (list, set, frozenset):
        return f"{kind.__name__}[{_union(value, depth)}]"
    if kind is dict:
        return f"dict[{_union(value.keys(), depth)}, {_union(value.values(), depth)}]"
    return kind.__qualname__


def _union(values: Iterable[Any], depth: int) -> str:
    names = list(dict.fromkeys(_hint(v, depth + 1) for v in itertools.islice(values, 20)))
    return " | ".join(names) if names else "T"
