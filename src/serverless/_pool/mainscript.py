"""Which functions of the caller's main script the local pool's workers can register.

A local worker registers the functions of the script being run (`__main__`) by importing the
script as `__mp_main__` (child.py). It cannot when there is no script file (`python -c`,
a script read from stdin, a REPL, a notebook); and its import stops at the first step called
from the script's top level outside `if __name__ == "__main__":`, so a function decorated after
that call, or inside the guard, is never registered there. All of this is known in the caller,
so such a call is refused before any request with the cause and the fix, instead of a 404 from
the worker. A remote worker may run the same script, so these checks are for the local pool.
"""

from __future__ import annotations

import ast
import builtins
import functools
import os
import sys
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

from .. import _registry
from .._exceptions import ConfigurationError

_MAIN_GUARD = 'if __name__ == "__main__":'

# where a worker's import of the main script stops: the registration count when the first
# step was called from the script's unguarded top level, and that call's file:line
_stop: int | None = None
_stop_at = ""
_checked: dict[str, _registry.Entry] = {}  # entries found importable (the answer holds)
_top: FrameType | None = None  # the main script's `<module>` frame
_guarded_at: dict[int, bool] = {}  # whether its instruction at an offset is under a guard
_MAIN_THREAD = threading.main_thread().ident


importing_main = False  # True in a local worker while it imports the caller's main script


class StopMainImport(BaseException):
    """Raised by a step called while a local worker imports the caller's main script: the
    functions defined above the call are registered, the script's top-level work is skipped."""


def check_not_importing_main() -> None:
    if importing_main:
        raise StopMainImport


def reference() -> dict[str, str] | None:
    """How a worker can import the caller's main script, if it has one."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        return {"module": spec.name}  # python -m package.module
    path = getattr(main, "__file__", None)
    if path and os.path.exists(path):
        return {"path": os.path.abspath(path)}
    return None  # an interactive session: its functions cannot be imported by workers


def note_call() -> None:
    """Called on every step call: if it comes from the main script's top level outside a main
    guard, remember it as the point where a worker's import of the script stops.

    Only the main thread runs the script's top level, and the script's `<module>` frame is on
    its stack during any call there: it is found once, then each call reads its current line
    (about 0.3 us); once the point is found, nothing more is done."""
    global _top
    if _stop is not None or threading.get_ident() != _MAIN_THREAD:
        return
    main = sys.modules.get("__main__")
    if main is None:
        return
    namespace = vars(main)
    top = _top
    if top is None or top.f_globals is not namespace:
        if not getattr(main, "__file__", None):
            return  # nothing for a worker to import: check() says so
        top = _module_frame(namespace)
        if top is None:
            return
        _top = top
        _guarded_at.clear()
    # f_lineno decodes the line table (about 1 us in a long script); f_lasti is a field
    guarded = _guarded_at.get(top.f_lasti)
    if guarded is None:
        guarded = _guarded_at[top.f_lasti] = _guarded(top.f_code.co_filename, top.f_lineno)
    if not guarded:
        _record_stop(f"{top.f_code.co_filename}:{top.f_lineno}")


def _module_frame(namespace: dict[str, Any]) -> FrameType | None:
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_globals is namespace and frame.f_code.co_name == "<module>":
            return frame
        frame = frame.f_back
    return None


def _record_stop(where: str) -> None:
    global _stop, _stop_at
    if _stop is None:
        _stop, _stop_at = _registry.sequence(), where


def check(entries: Iterable[_registry.Entry]) -> None:
    """Raise ConfigurationError for a function of the main script that the local pool's
    workers cannot register; the cause and the fix in the message."""
    for entry in entries:
        if entry.module != "__main__" or _checked.get(entry.name) is entry:
            continue
        name = entry.qualname
        if reference() is None:
            raise ConfigurationError(
                f"{name} is defined {_interactive_cause()}, which the local pool's worker "
                "processes cannot import: they find a function by importing its module, and "
                "this __main__ has no file. Put the function in a .py file next to your code "
                f"and import it from there (`from mysteps import {name}`), or run your code "
                "as a script file (`python script.py`)."
            )
        guarded = _under_guard(entry)
        if guarded:
            raise ConfigurationError(
                f"{name} is defined inside `{_MAIN_GUARD}` ({guarded}), which the local "
                "pool's workers skip when they import the script to find its functions. "
                "Define it at the top level of the script, above the guard."
            )
        if _stop is not None and entry.seq > _stop:
            raise ConfigurationError(
                f"{name} is defined below the first parallel call ({_stop_at}) in a script "
                "without a main guard: the local pool's workers import the script to find its "
                "functions and stop at that call, so they never see it. Move the definition "
                f"above that call, or put the script's work under `{_MAIN_GUARD}`."
            )
        _checked[entry.name] = entry


def _interactive_cause() -> str:
    if hasattr(builtins, "__IPYTHON__"):
        return "in a notebook or IPython session"
    if hasattr(sys, "ps1"):
        return "in an interactive session"
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 == "-c":
        return "in a `python -c` command"
    if argv0 in ("-", ""):
        return "in a script read from standard input"
    return "in code run without a file (__main__ has no __file__)"


def _under_guard(entry: _registry.Entry) -> str | None:
    """file:line of the function's definition if it lies under the main script's guard."""
    code = getattr(entry.func, "__code__", None)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if code is None or not main_file:
        return None
    if os.path.abspath(code.co_filename) != os.path.abspath(main_file):
        return None  # code the script compiled from elsewhere (exec)
    if not _guarded(code.co_filename, code.co_firstlineno):
        return None
    return f"{code.co_filename}:{code.co_firstlineno}"


def _guarded(filename: str, line: int) -> bool:
    """Whether `line` of the script lies in the body of an `if __name__ == "__main__":`."""
    return line in _guarded_lines(filename)


@functools.cache
def _guarded_lines(filename: str) -> frozenset[int]:
    """The lines of the script under a main guard (parsed once per file)."""
    try:
        with open(filename, "rb") as f:
            tree = ast.parse(f.read(), filename)
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test):
            first, last = node.body[0], node.body[-1]
            start = min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", [])])
            lines.update(range(start, (last.end_lineno or last.lineno) + 1))
    return frozenset(lines)


def _is_main_test(test: ast.expr) -> bool:
    """`__name__ == "__main__"`, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    values = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and values == ["__main__"]
