"""The registry of functions a worker may run: only those the decorators registered.

A worker never looks up an arbitrary module attribute named on the wire: a name resolves only
if importing the function's module ran `@serverless.parallel` on it in this process.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from ._exceptions import ConfigurationError
from ._values import Shape, shape_of

# multiprocessing's spawn start method imports the parent's main script as "__mp_main__".
_MAIN_ALIASES = {"__mp_main__": "__main__"}

# How a worker binds a method before calling it: not at all, to a fresh instance of its
# class (as the seed does), or to its class (a classmethod).
Bind = Literal["", "instance", "class"]
BIND_NONE: Final = ""
BIND_INSTANCE: Final = "instance"
BIND_CLASS: Final = "class"


def as_bind(value: str) -> Bind | None:
    """`value` as a Bind, or None if it names none (from the wire: anything may come)."""
    for bind in (BIND_NONE, BIND_INSTANCE, BIND_CLASS):
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

    @property
    def owner_path(self) -> list[str]:
        """The class path the function was defined in, or [] for a module-level function."""
        return self.qualname.split(".")[:-1]

    def owner(self) -> type:
        """The class the function was defined in, found through its own module."""
        target: Any = module_object(self.module)
        for part in self.owner_path:
            target = getattr(target, part)
        if not isinstance(target, type):
            raise ConfigurationError(f"{self.name} is not defined in a class")
        return target

    def shape(self, bind: Bind) -> Shape:
        """How the function's values travel (from its annotations), called with `bind`."""
        return self._shapes[bind != BIND_NONE]

    @functools.cached_property
    def _shapes(self) -> tuple[Shape, Shape]:
        # computed on first use: annotations may name classes defined after the decorator
        return shape_of(self.func, self.name, False), shape_of(self.func, self.name, True)

    def bound(self, bind: Bind) -> Callable[..., Any]:
        """The callable to run for a chunk: a fresh instance per call, as the seed does."""
        if bind == BIND_NONE:
            return self.func
        owner = self.owner()
        receiver: Any = owner() if bind == BIND_INSTANCE else owner
        method: Callable[..., Any] = self.func.__get__(receiver, owner)
        return method


_lock = threading.Lock()
_entries: dict[str, Entry] = {}


def module_name(module: str) -> str:
    return _MAIN_ALIASES.get(module, module)


_main_module: Any = None  # the caller's script, when a local worker imported it


def set_main_module(module: Any) -> None:
    global _main_module
    _main_module = module


def module_object(module: str) -> Any:
    if module == "__main__":
        return _main_module or sys.modules["__main__"]
    return sys.modules.get(module) or importlib.import_module(module)


def register(func: Callable[..., Any]) -> Entry:
    """Register `func` under its module and qualified name; the worker finds it by that."""
    qualname = getattr(func, "__qualname__", "")
    module = module_name(getattr(func, "__module__", "") or "")
    if not qualname or not module:
        raise ConfigurationError(f"{func!r} has no module or qualified name to register")
    if "<locals>" in qualname:
        raise ConfigurationError(
            f"{module}.{qualname} is defined inside a function: workers cannot import it. "
            "Define it at module level or in a module-level class."
        )
    entry = Entry(
        name=f"{module}:{qualname}",
        module=module,
        qualname=qualname,
        func=func,
        is_async=inspect.iscoroutinefunction(func),
    )
    with _lock:
        _entries[entry.name] = entry
    return entry


def lookup(name: str) -> Entry | None:
    return _entries.get(name)


def modules() -> list[str]:
    """Modules that registered functions (the local pool imports them in its workers)."""
    with _lock:
        return sorted({e.module for e in _entries.values()})
