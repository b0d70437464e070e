"""Which modules the local pool's workers may import: those the parent announced.

A worker imports the modules it was started with; a function registered in the parent later
(its module imported after the pool started) lives in a module the worker lacks. The parent
writes the names of the modules holding registered functions to a private file before it
sends a chunk; a worker imports a module it lacks only if the file names it, never because a
request names it (docs/protocol.md section 5: a worker never imports code named on the wire).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path


class Announcer:
    """The parent's side: a 0600 file holding one module name per line."""

    def __init__(self, modules: Iterable[str]) -> None:
        fd, name = tempfile.mkstemp(prefix="serverless-modules-", suffix=".txt")
        os.close(fd)  # mkstemp creates it 0600
        self.path = Path(name)
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self.announce(modules)

    def announce(self, modules: Iterable[str]) -> None:
        with self._lock:
            wanted = self._known | {m for m in modules if m and m != "__main__"}
            if wanted == self._known:
                return
            partial = self.path.with_suffix(".tmp")
            partial.write_text("".join(f"{m}\n" for m in sorted(wanted)))
            os.chmod(partial, 0o600)
            os.replace(partial, self.path)  # a reader sees the old list or the new one
            self._known = wanted

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def announced(path: str) -> Callable[[str], bool]:
    """The worker's side: whether the parent announced `module` (the file is read again
    when it changed, so a module announced just before a chunk is found)."""
    state: dict[str, object] = {"stamp": None, "names": frozenset()}

    def importable(module: str) -> bool:
        try:
            info = os.stat(path)
        except OSError:
            return False
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp != state["stamp"]:
            with open(path, encoding="utf-8") as f:
                state["names"] = frozenset(line.strip() for line in f if line.strip())
            state["stamp"] = stamp
        names = state["names"]
        assert isinstance(names, frozenset)
        return module in names

    return importable
