"""What a function's values look like on the wire: exactly what was sent, or an error.

MessagePack (and JSON) carry None, bools, ints, floats, strings, bytes, arrays and maps; decoded
without a type, a tuple or a set arrives as a list, a Decimal or a naive datetime as a string.
So a value crosses the wire in one of two ways:

- typed: where the function's annotation is precise (no Any, no bare `list`), the receiving side
  decodes into it with msgspec, and a tuple, set, datetime, Decimal, UUID, enum, dataclass or
  Struct arrives as what was sent; a value that does not match the annotation is an error;
- untyped: otherwise only values that decode to the same type unaided may be sent (`EXACT`
  below); anything else raises a SerializationError naming the value, where it is, what it
  would arrive as, and the annotation that would carry it.

`Shape` is derived once per function from its annotations: the element type of its first
parameter (the items), the types of its other parameters, the element type of its return.
Pure: no I/O.
"""

from __future__ import annotations

import collections.abc as abc
import datetime
import functools
import inspect
import itertools
import re
import types
import typing
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
    return msgspec.msgpack.Decoder(tp)


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
    where = f"result {offset + int(found[1])}{found[2]}"
    detail = _RESULTS_PATH.sub("", str(exc))
    return SerializationError(
        f"{where} of {shape.function} does not match its return annotation "
        f"`list[{_type_name(shape.result)}]`: {detail}"
    )


# -- the exactness check of untyped values -----------------------------------------------------


def check_items(shape: Shape, items: Sequence[Any], offset: int = 0) -> None:
    """SerializationError if an item would not arrive as sent (its parameter being untyped)."""
    if shape.items is not None:
        return
    found = _first_inexact_of(items)
    if found is not None:
        index, path, value = found
        hint = f"{shape.items_name}: list[{_hint(items[index])}]"
        raise SerializationError(
            f"item {offset + index} of {shape.function}'s input, "
            + _describe(path, value, items[index])
            + f" Annotate the items precisely, e.g. `{hint}`, so that workers decode them "
            "into that type, or convert them before the call."
        )


def check_args(shape: Shape, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """SerializationError if an argument of an untyped parameter would not arrive as sent."""
    if not args and not kwargs:
        return
    named = [(shape.arg(i), v) for i, v in enumerate(args)]
    named += [(shape.kwarg(k), v) for k, v in kwargs.items()]
    for param, value in named:
        if param.type is not None:
            continue
        found = _first_inexact_of([value])
        if found is not None:
            _, path, inner = found
            raise SerializationError(
                f"argument `{param.name}` of {shape.function}, "
                + _describe(path, inner, value)
                + f" Annotate it precisely, e.g. `{param.declared or param.name}: {_hint(value)}`, "
                "so that "
                "workers decode it into that type, or convert it before the call."
            )


def inexact_result(shape: Shape, results: list[Any]) -> Mismatch | None:
    """For a worker, before it encodes the results of a function whose return is untyped: the
    first result that would not arrive as returned, described for the caller."""
    if shape.result is not None:
        return None
    found = _first_inexact_of(results)
    if found is None:
        return None
    index, path, value = found
    message = _describe(path, value, results[index])
    return Mismatch(
        index,
        f"{message} Annotate the return precisely, e.g. `-> list[{_hint(results[index])}]`, "
        "so that the caller decodes results into that type, or convert them.",
    )


def inexact_value(value: Any) -> str | None:
    """Why `value`, sent untyped, would not arrive as sent ("<repr>, is a set: it would arrive
    as a list, ...."), or None if it would (an instance's attributes: _wire/receiver.py)."""
    found = _first_inexact_of([value])
    return None if found is None else _describe(found[1], found[2], value)


def _first_inexact_of(values: Sequence[Any]) -> tuple[int, str, Any] | None:
    """(index, path inside that value, the inexact value) of the first value that would not
    arrive as sent, or None. A sequence of scalars costs one pass over their types."""
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
            if not _exact_key(key):
                return " (a key)", key
            found = _inexact(item)
            if found is not None:
                return f"[{key!r}]{found[0]}", found[1]
        return None
    if kind is datetime.datetime and value.utcoffset() is not None:
        return None  # an aware datetime arrives as the same instant, in UTC
    return "", value


def _exact_key(key: Any) -> bool:
    # MessagePack map keys decode as the scalars they were, and arrays as tuples
    kind = type(key)
    return kind in EXACT_SCALARS or (kind is tuple and all(map(_exact_key, key)))


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
