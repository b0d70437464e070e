"""The registry of functions a worker may run: only those the decorators registered.

A worker never looks up an arbitrary module attribute named on the wire: a name resolves only
if importing the function's module ran `@serverless.parallel` on it in this process.

A name therefore identifies one function. Two different functions that would share a name
(two lambdas in one module, two functions bound under other names) are refused when the second
is decorated: the workers would run whichever registered last. A redefinition of the same
function replaces it silently: a module reloaded or re-executed, a notebook cell run again.

A function of `__main__` (a script, a notebook, the REPL) is the exception: no worker imports
it. The local pool's workers get it by value (_pool/byvalue.py) as a detached Entry that names
its class itself (`cls`), found through the call's signed digest, never through this registry.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from ._exceptions import ConfigurationError
from ._wire import receiver as _receiver
from ._wire.values import Shape, shape_of

# multiprocessing's spawn start method imports the parent's main script as "__mp_main__".
_MAIN_ALIASES = {"__mp_main__": "__main__"}

# How a worker binds a method before calling it: not at all, to an instance rebuilt from the
# receiver's state the call carries (_wire/receiver.py), to its class (a classmethod), or to
# a fresh instance `Owner()` (the seed's "instance", which callers no longer send: it drops
# the receiver's state). "state" is a binding of its own, not "instance" plus a field, so a
# worker that predates it refuses it (an unknown binding, 400) rather than silently running
# the method on a fresh instance.
Bind = Literal["", "instance", "class", "state"]
BIND_NONE: Final = ""
BIND_INSTANCE: Final = "instance"
BIND_CLASS: Final = "class"
BIND_STATE: Final = "state"


def as_bind(value: str) -> Bind | None:
    """`value` as a Bind, or None if it names none (from the wire: anything may come)."""
    for bind in (BIND_NONE, BIND_INSTANCE, BIND_CLASS, BIND_STATE):
        if value == bind:
            return bind
    return None


@dataclass(frozen=True)
class Entry:
    name: str  # "module:qualname", the name on the wire
    module: str
    qualname: str
    func: Callable[..., Any]  # the undecorated function
    is_async: bool
    declared: str = "plain"  # "static" or "class": decorated as a staticmethod, a classmethod
    # a function sent by value: the class it was defined in, sent with it (None: a module
    # function, or a method whose class is found through its module)
    cls: type | None = None

    @property
    def owner_path(self) -> list[str]:
        """The class path the function was defined in, or [] for a module-level function."""
        return self.qualname.split(".")[:-1]

    def owner(self) -> type:
        """The class the function was defined in: the one sent with it by value, or the one
        found through its own module."""
        if self.cls is not None:
            return self.cls
        target: Any = module_object(self.module)
        for part in self.owner_path:
            target = getattr(target, part)
        if not isinstance(target, type):
            raise ConfigurationError(f"{self.name} is not defined in a class")
        return target

    def misfit(
        self, bind: Bind, args: int, kwargs: Iterable[str], state: Iterable[str] = ()
    ) -> str | None:
        """Why a chunk called with `bind`, `args` extra positional arguments, these keywords
        and a receiver with these attributes cannot run this function (None if it can), found
        without running anything of the user's: a signed request may still name arguments
        the function does not take, or attributes no instance may be given."""
        if bind not in self._binds:
            return f"{self.name} is not called with the binding {bind!r}"
        state = list(state)
        if state and bind != BIND_STATE:
            return f"a receiver's state comes only with the binding {BIND_STATE!r}"
        if bind == BIND_STATE:
            try:
                owner = self.owner()
            except Exception as exc:  # not found: nothing to rebuild
                return f"cannot find the class of {self.name}: {exc}"
            misfit = _receiver.misfit(owner, state)
            if misfit is not None:
                return f"{misfit} ({self.name})"
        signature = self._signature
        if signature is None:
            return None
        receiver = [None] if bind else []
        try:
            signature.bind(*receiver, None, *[None] * args, **dict.fromkeys(kwargs))
        except TypeError as exc:
            return f"the arguments do not fit {self.name}: {exc}"
        return None

    @functools.cached_property
    def _binds(self) -> frozenset[str]:
        """The bindings a caller's step can send for this function: none for a module's
        function or a staticmethod, the class for a classmethod, the class or an instance
        (rebuilt from its state, or the seed's fresh one) for a method (looked up in its
        class's namespace: no descriptor runs)."""
        if not self.owner_path or self.declared == "static":
            return frozenset({BIND_NONE})
        if self.declared == "class":
            return frozenset({BIND_CLASS})
        try:
            found = vars(self.owner()).get(self.qualname.rpartition(".")[2])
        except Exception:  # the class cannot be found: the call will say so
            found = None
        if isinstance(found, staticmethod):
            return frozenset({BIND_NONE})
        if isinstance(found, classmethod):
            return frozenset({BIND_CLASS})
        if found is None:
            return frozenset({BIND_NONE, BIND_INSTANCE, BIND_STATE, BIND_CLASS})
        return frozenset({BIND_INSTANCE, BIND_STATE, BIND_CLASS})

    @functools.cached_property
    def _signature(self) -> inspect.Signature | None:
        try:
            return inspect.signature(self.func)
        except (TypeError, ValueError):  # no signature to check (a builtin): calls tell
            return None

    def shape(self, bind: Bind) -> Shape:
        """How the function's values travel (from its annotations), called with `bind`."""
        return self._shapes[bind != BIND_NONE]

    @functools.cached_property
    def _shapes(self) -> tuple[Shape, Shape]:
        # computed on first use: annotations may name classes defined after the decorator
        return shape_of(self.func, self.name, False), shape_of(self.func, self.name, True)

    def bound(self, bind: Bind, state: Mapping[str, Any] | None = None) -> Callable[..., Any]:
        """The callable to run for a chunk: bound to its class, or to an instance of it
        rebuilt from the receiver's `state` (each chunk its own copy, as unpickled), or to a
        fresh `Owner()` (the seed's binding "instance")."""
        if bind == BIND_NONE:
            return self.func
        owner = self.owner()
        receiver: Any = owner
        if bind == BIND_STATE:
            receiver = _receiver.rebuild(owner, state or {})
        elif bind == BIND_INSTANCE:
            receiver = owner()
        method: Callable[..., Any] = self.func.__get__(receiver, owner)
        return method


_lock = threading.Lock()
_entries: dict[str, Entry] = {}
_redefined = 0  # replacements by a function with other code (see redefinitions())


def module_name(module: str) -> str:
    return _MAIN_ALIASES.get(module, module)


def module_object(module: str) -> Any:
    return sys.modules.get(module) or importlib.import_module(module)


class CodeShelf(Protocol):
    """Where functions of `__main__` travel by value: the local pool's private directory
    (_pool/byvalue.py). The caller puts a pickle there, a pool worker loads it back by the
    digest its signed request names."""

    def put(self, data: bytes) -> str:
        """Store the pickle; its SHA-256, hex."""
        ...

    def load(self, digest: str) -> Mapping[str, Entry] | str:
        """The functions of the pickle of that digest, by name; or why they cannot be had."""
        ...


def _key(func: Callable[..., Any], name: str | None) -> tuple[str, str, str]:
    """The module, qualified name and registered key of `func`, checked."""
    qualname = getattr(func, "__qualname__", "")
    module = module_name(getattr(func, "__module__", "") or "")
    if not qualname or not module:
        raise ConfigurationError(f"{func!r} has no module or qualified name to register")
    if "<locals>" in qualname:
        raise ConfigurationError(
            f"{module}.{qualname} is defined inside a function: workers cannot import it. "
            "Define it at module level or in a module-level class."
        )
    if name is not None and not (
        isinstance(name, str) and all(part.isidentifier() for part in name.split("."))
    ):
        raise ConfigurationError(f"name must be a Python identifier such as 'add_one': {name!r}")
    return module, qualname, name or qualname


def detached(func: Callable[..., Any], name: str | None, declared: str, cls: type | None) -> Entry:
    """An Entry for a function of `__main__` received by value, registered nowhere: each
    call's pickle brings its own (a notebook cell run again sends its new code)."""
    module, qualname, key = _key(func, name)
    return Entry(
        name=f"{module}:{key}",
        module=module,
        qualname=qualname,
        func=func,
        is_async=inspect.iscoroutinefunction(func),
        declared=declared,
        cls=cls,
    )


def register(func: Callable[..., Any], name: str | None = None, declared: str = "plain") -> Entry:
    """Register `func` under its module and qualified name (or `name`, for a lambda); the
    worker finds it by that."""
    global _redefined
    module, qualname, key = _key(func, name)
    full = f"{module}:{key}"
    with _lock:
        old = _entries.get(full)
        if old is not None and old.func is func:  # the same function decorated again
            return old
        same = old is not None and _same_code(old.func, func)
        if old is not None and not same and not _rebinds(old.func, func, key):
            raise ConfigurationError(_ambiguous(full, old.func, func))
        if old is not None and not same and module != "__main__":  # __main__'s go by value
            _redefined += 1
        entry = Entry(
            name=full,
            module=module,
            qualname=qualname,
            func=func,
            is_async=inspect.iscoroutinefunction(func),
            declared=declared,
        )
        _entries[full] = entry
    return entry


def _same_code(old: Callable[..., Any], new: Callable[..., Any]) -> bool:
    """The same definition compiled again: equal code objects (name, first line, bytecode,
    constants, line table; not the file name, which a notebook changes per cell run) and
    equal defaults (a loop can make lambdas with the same code and different defaults)."""
    code = getattr(old, "__code__", None)
    if code is None or code != getattr(new, "__code__", None):
        return False
    try:
        return bool(
            getattr(old, "__defaults__", None) == getattr(new, "__defaults__", None)
            and getattr(old, "__kwdefaults__", None) == getattr(new, "__kwdefaults__", None)
        )
    except Exception:  # defaults that cannot be compared (arrays): call them different
        return False


def _rebinds(old: Callable[..., Any], new: Callable[..., Any], key: str) -> bool:
    """Whether `new` is a new definition of the name that still holds `old` (or its step) in
    the namespace `new` is defined in: a `def` run again, a module reloaded, a class body
    re-executed (`A.m`: the old class is still bound while the new body runs)."""
    namespace: Any = getattr(new, "__globals__", None)
    if namespace is None:
        namespace = getattr(sys.modules.get(getattr(new, "__module__", "")), "__dict__", {})
    target: Any = namespace
    for part in key.split("."):
        if not isinstance(target, Mapping):
            target = getattr(target, "__dict__", {})  # no descriptor runs
        target = target.get(part)
        if target is None:
            return False
    if isinstance(target, staticmethod | classmethod):
        target = target.__func__
    return target is old or getattr(target, "__wrapped__", None) is old


def _ambiguous(full: str, old: Callable[..., Any], new: Callable[..., Any]) -> str:
    return (
        f"two different functions would both be registered as {full!r}: {_where(old)} and "
        f"{_where(new)}. Workers find a function by this name, so one would silently run in "
        "place of the other. Give each its own name: define it with `def` under a name of "
        'its own, or name it, as in `serverless.parallel(name="add_one")(lambda xs: ...)`.'
    )


def _where(func: Callable[..., Any]) -> str:
    code = getattr(func, "__code__", None)
    name = getattr(func, "__qualname__", repr(func))
    if code is None:
        return name
    return f"{name} at {code.co_filename}:{code.co_firstlineno}"


def lookup(name: str) -> Entry | None:
    return _entries.get(name)


def redefinitions() -> int:
    """How many times a registered function was replaced by one with other code (a module
    reloaded after an edit): worker processes that imported the old code are out of date."""
    return _redefined


def modules() -> list[str]:
    """Modules that registered functions (the local pool imports them in its workers)."""
    with _lock:
        return sorted({e.module for e in _entries.values()})
