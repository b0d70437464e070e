"""The key a result is stored under (`cache=`): the same inputs always give the same key.

key = SHA-256(prefix, canonical(item)), and prefix = SHA-256 of, for each stage of the call:
its registered name, a digest of its code and its `version=`; then the call's extra
arguments and receivers. The code digest covers the code object's bytecode, constants and
names, nested code included, and the function's defaults, but not its docstrings, line
numbers or file name: a docstring edit still hits, a changed line of code never does. It
follows what the code reads from its own module and its closure: the functions of that
module it names (their code, the same way) and the constants (numbers, strings, bytes, None,
tuples and frozensets of them) by value. It cannot see a helper in another module, a
mutable global (a dict, a list) or a file the function reads: that is what `version=` is
for. The Python version is part of it (bytecode differs between versions).

`canonical` encodes a value so that equal values give equal bytes in any process: dict keys
and set elements sorted (by their own canonical bytes), and each built-in type tagged (a
tuple is not a list, 1.0 is not 1, True is not 1), whatever PYTHONHASHSEED is.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import hashlib
import inspect
import sys
import types
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec

from .. import _wire as p
from .._exceptions import SerializationError
from .._wire.values import decoder

FORMAT: Final = b"serverless-cache-1"
_PYTHON: Final = f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}"
_COMPREHENSIONS: Final = frozenset({"<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>"})
_CO_HAS_DOCSTRING: Final = 0x4000000  # Python 3.14's flag; before it, a function's first const

# type tags of the canonical encoding (MessagePack extension codes, ours alone)
_TUPLE, _SET, _FROZENSET, _MAP, _DATETIME, _DATE, _TIME, _DELTA, _DECIMAL, _UUID = range(1, 11)
_OBJECT, _ENUM, _CODE, _OTHER, _RAW = 20, 21, 22, 23, 24
_SCALARS: Final = frozenset({int, float, str, bytes, bool, type(None)})

_Ext = msgspec.msgpack.Ext


def _hook(value: Any) -> Any:
    """What the encoder does not know natively, tagged (msgspec calls it for those only)."""
    return _tagged(value)


_pack: Final = msgspec.msgpack.Encoder(enc_hook=_hook).encode


def canonical(value: Any) -> bytes:
    """`value` as bytes that equal values (of the same types) share in every process."""
    try:
        if type(value) in _SCALARS:  # the common item: no walk
            return _pack(value)
        return _pack(_canon(value))
    except OverflowError:  # an int beyond 64 bits, somewhere in it: tagged by its digits
        return _pack(_canon(_big_ints(value)))
    except RecursionError:
        raise SerializationError("a value nests too deeply (or contains itself)") from None


def _big_ints(value: Any) -> Any:
    kind = type(value)
    if kind is int and not -(2**63) <= value < 2**64:
        return _Ext(_OTHER, str(value).encode())
    if kind is list:
        return [_big_ints(v) for v in value]
    if kind is tuple:
        return tuple(_big_ints(v) for v in value)
    if kind is dict:
        return {k: _big_ints(v) for k, v in value.items()}
    return value


def _canon(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is list:
        if _SCALARS.issuperset(map(type, value)):
            return value
        return [_canon(v) for v in value]
    if kind is dict:
        if all(type(k) is str for k in value):
            return _Ext(_MAP, _pack(sorted((k, _canon(v)) for k, v in value.items())))
        pairs = sorted((canonical(k), canonical(v)) for k, v in value.items())
        return _Ext(_MAP, _pack(pairs))
    return _tagged(value)


def _tagged(value: Any) -> Any:
    kind = type(value)
    if kind is _Ext:  # a big int, tagged already (_big_ints)
        return value
    if kind is tuple:
        return _Ext(_TUPLE, _pack([_canon(v) for v in value]))
    if kind is set or kind is frozenset:
        code = _SET if kind is set else _FROZENSET
        return _Ext(code, _pack(sorted(canonical(v) for v in value)))
    if kind is datetime.datetime:
        return _Ext(_DATETIME, _pack([value.isoformat(), value.fold, _zone(value.tzinfo)]))
    if kind is datetime.date:
        return _Ext(_DATE, value.isoformat().encode())
    if kind is datetime.time:
        return _Ext(_TIME, _pack([value.isoformat(), value.fold, _zone(value.tzinfo)]))
    if kind is datetime.timedelta:
        return _Ext(_DELTA, _pack([value.days, value.seconds, value.microseconds]))
    if kind is decimal.Decimal:
        return _Ext(_DECIMAL, str(value).encode())
    if kind is uuid.UUID:
        return _Ext(_UUID, value.bytes)
    if kind is msgspec.Raw:  # a bound receiver's attribute, as the envelope carries it
        return _Ext(_RAW, canonical(_raw_value(value)))
    if isinstance(value, enum.Enum):
        return _Ext(_ENUM, canonical([_type_name(kind), value.value]))
    if isinstance(value, msgspec.Struct):
        names: Iterable[str] = value.__struct_fields__
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
    elif isinstance(value, tuple | list | dict):  # a namedtuple, an OrderedDict...
        plain = dict(value) if isinstance(value, dict) else list(value)
        return _Ext(_OBJECT, canonical([_type_name(kind), plain]))
    else:
        names = ()
    if names:
        fields = {name: getattr(value, name) for name in names}
        return _Ext(_OBJECT, canonical([_type_name(kind), fields]))
    raise SerializationError(
        f"a {_type_name(kind)} has no stable key for cache=: use built-in values, "
        "dataclasses, msgspec Structs or enums as items and arguments of a cached function"
    )


def _raw_value(raw: msgspec.Raw) -> Any:
    """What an encoded value holds, decoded as the workers would without annotations (so a
    set's order, which encoding keeps, does not change the key); its bytes if that fails."""
    try:
        return decoder(Any, p.MSGPACK).decode(raw)
    except (msgspec.DecodeError, ValueError):
        return bytes(raw)


def _zone(tz: datetime.tzinfo | None) -> Any:
    if tz is None:
        return None
    key = getattr(tz, "key", None)  # a zoneinfo.ZoneInfo: its name, not only its offset
    return key if isinstance(key, str) else str(tz)


def _type_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def code_digest(func: Callable[..., Any]) -> bytes:
    """A digest of what `func` runs: its code (nested code included) without docstrings or
    line numbers, and its default arguments; the constants and the functions of its own
    module that it names, and its closure's (see the module's docstring); for a callable
    with no code of its own (a builtin, a C extension's function), its qualified name only."""
    digest = hashlib.sha256(_PYTHON.encode())
    _feed_function(digest, func, set())
    return digest.digest()


def _feed_function(digest: Any, func: Any, seen: set[int]) -> None:
    seen.add(id(func))
    code = getattr(func, "__code__", None)
    if isinstance(code, types.CodeType):
        _feed_code(digest, code)
        _feed_context(digest, func, code, seen)
    else:
        digest.update(_type_name(type(func)).encode() + getattr(func, "__qualname__", "").encode())
    for defaults in (getattr(func, "__defaults__", None), getattr(func, "__kwdefaults__", None)):
        digest.update(_default(defaults))


def _feed_context(digest: Any, func: Any, code: types.CodeType, seen: set[int]) -> None:
    """What the code reads besides its arguments: the module's globals it names and its
    closure's cells, where they are constants or functions of the same module (a changed
    helper or constant in the function's own file changes the key, as its own code does)."""
    module = getattr(func, "__module__", None)
    names: set[str] = set()
    _names_of(code, names)
    found = getattr(func, "__globals__", {})
    context = [(name, found[name]) for name in sorted(names) if name in found]
    for name, cell in zip(code.co_freevars, getattr(func, "__closure__", None) or (), strict=False):
        try:
            context.append((name, cell.cell_contents))
        except ValueError:  # a cell not filled yet
            continue
    for name, value in context:
        if isinstance(value, types.FunctionType):
            if value.__module__ == module and id(value) not in seen:
                digest.update(_pack(["function", name]))
                _feed_function(digest, value, seen)
        elif _constant(value):
            digest.update(_pack(["constant", name]))
            digest.update(canonical(value))


def _names_of(code: types.CodeType, names: set[str]) -> None:
    names.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _names_of(const, names)


def _constant(value: Any) -> bool:
    kind = type(value)
    if kind in _SCALARS:
        return True
    return (kind is tuple or kind is frozenset) and all(_constant(v) for v in value)


def _default(value: Any) -> bytes:
    try:
        return canonical(value)
    except SerializationError:  # a sentinel such as object(): known by its type only
        return _pack(_type_name(type(value)))


def _feed_code(digest: Any, code: types.CodeType) -> None:
    consts: Sequence[Any] = code.co_consts
    if _has_docstring(code):
        consts = consts[1:]
    head = (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)
    digest.update(_pack([code.co_name, *head, code.co_names, code.co_varnames]))
    digest.update(_pack([code.co_freevars, code.co_cellvars]))
    digest.update(code.co_code)
    for const in consts:
        if isinstance(const, types.CodeType):
            digest.update(b"\x00code")
            _feed_code(digest, const)
        else:
            digest.update(_default(const))


def _has_docstring(code: types.CodeType) -> bool:
    """Whether the code's first constant is its docstring's slot (the docstring, or None)."""
    if sys.version_info >= (3, 14):  # pragma: no cover - a flag says so from 3.14 on
        return bool(code.co_flags & _CO_HAS_DOCSTRING)
    # up to 3.13 a function's first constant is its docstring, or None where it has none
    function = code.co_flags & inspect.CO_NEWLOCALS and code.co_name not in _COMPREHENSIONS
    return bool(function and code.co_consts and type(code.co_consts[0]) in (str, type(None)))


def call_prefix(stages: Iterable[tuple[str, bytes, str]], args: Any, kwargs: Any) -> bytes:
    """The part of every key of one call that its items do not change: per stage (registered
    name, code digest, version), then its extra arguments and receivers, canonical."""
    digest = hashlib.sha256(FORMAT)
    for name, code, version in stages:
        digest.update(_pack([name, code, version]))
    digest.update(canonical([args, kwargs]))
    return digest.digest()


def item_keys(prefix: bytes, items: Iterable[Any]) -> list[bytes]:
    """The key of each item of a call whose prefix is `prefix`."""
    sha = hashlib.sha256
    return [sha(prefix + canonical(item)).digest() for item in items]
