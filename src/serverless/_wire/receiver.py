"""An instance method's receiver on the wire: its attributes, as values, rebuilt on the worker
without calling `__init__`, as pickle does.

The caller sends the receiver's state once per call: its instance dict and the values of its
slots, or the dict its class's own `__getstate__` returns. Each attribute travels under the
values rule (values.py): exactly as sent where it is untyped, or decoded into the class's own
annotation of that attribute where that is precise (a dataclass field `factor: Decimal`).
Whatever cannot travel is a SerializationError before any request, naming the attribute.

The worker builds the instance with `cls.__new__(cls)` and sets each attribute straight into
its instance dict or its declared slot (a frozen dataclass too: no `__setattr__` or property
of the user's runs), or hands the dict to the class's own `__setstate__`. `__init__` never runs
there: its arguments are not known, and it may open what must not be opened twice.

A signed request is still a trust boundary: an attribute name must be an identifier that does
not start with "__", so no request sets `__class__`, `__dict__` or another dunder. Name
mangling never makes such a name (`self.__x` in class `C` is stored as `_C__x`, and so is a
slot `__x`), so only a dunder slot or an odd dict key is refused, on both sides.
"""

from __future__ import annotations

import contextlib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

import msgspec

from .._exceptions import SerializationError
from .values import MSGPACK, Mismatch, decoder, inexact_value, precise

_NOT_SLOTS = frozenset({"__dict__", "__weakref__"})


def name_refusal(name: object) -> str | None:
    """Why `name` may not be set on a rebuilt receiver (None: it may)."""
    if not isinstance(name, str) or not name.isidentifier():
        return f"{name!r} is not an identifier"
    if name.startswith("__"):
        return f"{name!r} starts with '__' (no dunder attribute travels)"
    return None


def _own(cls: type, method: str) -> Any:
    """The class's own `method` (`__getstate__`, `__setstate__`), or None where it is object's
    or one that dataclasses generates (a frozen dataclass with slots: it restores the same
    fields this module does)."""
    for klass in cls.__mro__:
        found = vars(klass).get(method)
        if found is not None:
            if klass is object or getattr(found, "__module__", None) == "dataclasses":
                return None
            return found
    return None


@functools.lru_cache(maxsize=256)
def _slots(cls: type) -> Mapping[str, Any]:
    """The instance's slots by their stored (mangled) names: their member descriptors."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        declared = vars(klass).get("__slots__", ())
        for name in (declared,) if isinstance(declared, str) else declared:
            if name in _NOT_SLOTS:
                continue
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{name}"
            member = vars(klass).get(name)
            if isinstance(member, types.MemberDescriptorType):
                found.setdefault(name, member)
    return found


@functools.lru_cache(maxsize=256)
def attribute_types(cls: type) -> Mapping[str, Any]:
    """The class's precise annotations of its attributes (ClassVars left out): those
    attributes decode into their type, the others travel untyped."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # annotations that cannot be evaluated: every attribute is untyped
        return {}
    classvar = typing.ClassVar
    return {
        name: tp
        for name, tp in hints.items()
        if tp is not classvar and typing.get_origin(tp) is not classvar and precise(tp)
    }


def state_of(receiver: Any, function: str) -> dict[str, Any]:
    """The receiver's attributes as they travel, each checked under the values rule, or a
    SerializationError naming the one that cannot travel and the fix (the caller's side)."""
    cls: type = type(receiver)
    where = cls.__qualname__
    for base in cls.__mro__[1:]:
        if base is not object and base.__module__ == "builtins":
            raise SerializationError(
                f"the receiver of {function} is a {where}, which derives from "
                f"{base.__qualname__}: its contents are not attributes and would not reach the "
                "workers. Make the method a staticmethod or a module function that takes "
                "them as an argument."
            )
    if _own(cls, "__getstate__") is not None:
        state: dict[str, Any] = receiver.__getstate__()
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise SerializationError(
                f"{where}.__getstate__ returns {type(state).__qualname__}: the receiver of "
                f"{function} travels as a dict of its attributes' names and values. Return "
                "one, or make the method a staticmethod that takes what it needs as arguments."
            )
    else:
        state = _attributes(receiver)
    typed = attribute_types(cls)
    for name, value in state.items():
        refusal = name_refusal(name)
        why = None if refusal is not None or name in typed else inexact_value(value)
        if refusal is not None or why is not None:
            raise SerializationError(_cannot_travel(where, name, function, refusal or why))
    return state


def _attributes(receiver: Any) -> dict[str, Any]:
    try:
        state = dict(object.__getattribute__(receiver, "__dict__"))
    except AttributeError:  # slots only
        state = {}
    cls: type = type(receiver)
    for name, member in _slots(cls).items():
        with contextlib.suppress(AttributeError):  # a slot never set stays unset
            state[name] = member.__get__(receiver, cls)
    return state


def encode_state(
    receiver: Any, function: str, encode: typing.Callable[[Any], bytes]
) -> dict[str, msgspec.Raw]:
    """The receiver's state as the envelope carries it: each attribute encoded once per call
    (with `encode`, the envelope's encoder), the same bytes in every chunk's request. An
    annotated attribute is decoded back into its type here, so that one whose value does not
    match fails before any request."""
    cls: type = type(receiver)
    typed = attribute_types(cls)
    encoded: dict[str, msgspec.Raw] = {}
    for name, value in state_of(receiver, function).items():
        try:
            raw = encode(value)
            if name in typed:
                decoder(typed[name], MSGPACK).decode(raw)
        except (SerializationError, msgspec.ValidationError) as exc:
            raise SerializationError(
                _cannot_travel(cls.__qualname__, name, function, f"{exc}.")
            ) from exc
        encoded[name] = msgspec.Raw(raw)
    return encoded


def _cannot_travel(where: str, name: str, function: str, why: str | None) -> str:
    return (
        f"`{where}.{name}` cannot travel to the workers with the receiver of {function}: "
        f"{why} The workers rebuild the receiver from its attributes, without calling "
        "__init__. Make it a class attribute, pass it to the method as an argument, "
        f"annotate it in the class where a precise type carries it (`{name}: Decimal` "
        "carries a Decimal), leave it out with __getstate__/__setstate__, or make the "
        "method a staticmethod."
    )


# -- the worker's side -------------------------------------------------------------------------


def misfit(cls: type, names: typing.Iterable[str]) -> str | None:
    """Why a state with these attribute names cannot rebuild an instance of `cls` (None: it
    can), found before anything of the user's runs."""
    has_dict = bool(cls.__dictoffset__) or _own(cls, "__setstate__") is not None
    slots = _slots(cls)
    for name in names:
        refusal = name_refusal(name)
        if refusal is not None:
            return f"receiver attribute {refusal}"
        if not has_dict and name not in slots:
            return f"a {cls.__qualname__} has no slot {name!r} and no instance dict"
    return None


def decode_state(cls: type, raw: Mapping[str, msgspec.Raw], fmt: str) -> dict[str, Any] | Mismatch:
    """The state's attributes, each decoded into the class's annotation of it where precise.
    Raises msgspec's errors on malformed bytes."""
    typed = attribute_types(cls)
    state: dict[str, Any] = {}
    for name, value in raw.items():
        tp = typed.get(name)
        try:
            state[name] = decoder(Any if tp is None else tp, fmt).decode(value)
        except msgspec.ValidationError as exc:
            if tp is None:
                raise
            decoder(Any, fmt).decode(value)  # malformed bytes are the envelope's fault
            return Mismatch(
                None,
                f"attribute `{cls.__qualname__}.{name}` of the receiver does not match its "
                f"annotation: {exc}",
            )
    return state


def rebuild(cls: type, state: Mapping[str, Any]) -> Any:
    """An instance of `cls` holding `state`, made as pickle makes one: `cls.__new__(cls)`,
    then its own `__setstate__` (given a non-empty state, as pickle does) or each attribute set
    into its slot or instance dict. Names were checked (`misfit`)."""
    owner: Any = cls  # its own __new__, which mypy would take for type.__new__
    receiver = owner.__new__(owner)
    if _own(cls, "__setstate__") is not None:
        if state:
            receiver.__setstate__(dict(state))
        return receiver
    slots = _slots(cls)
    attributes: dict[str, Any] | None = None
    for name, value in state.items():
        member = slots.get(name)
        if member is not None:
            member.__set__(receiver, value)
            continue
        if attributes is None:
            attributes = object.__getattribute__(receiver, "__dict__")
        attributes[name] = value
    return receiver
