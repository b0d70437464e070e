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
import secrets
import threading
from collections.abc import Callable, Iterable
from pathlib import Path


class Announcer:
    """The parent's side: a 0600 file holding one module name per line, in the pool's private
    (0700) directory, each version written to a fresh file of a random name (O_EXCL|O_NOFOLLOW)
    and renamed over the last. Before, the list went through a predictable `.tmp` path in the
    shared temp directory, and a symbolic link planted there made the caller overwrite and
    chmod a file of its own (issue 22)."""

    def __init__(self, modules: Iterable[str], directory: Path) -> None:
        self.path = directory / "modules.txt"
        self._known: set[str] | None = None
        self._lock = threading.Lock()
        self.announce(modules)

    def announce(self, modules: Iterable[str]) -> None:
        with self._lock:
            known = self._known if self._known is not None else set()
            wanted = known | {m for m in modules if m and m != "__main__"}
            if wanted == self._known:
                return
            partial = self.path.with_name(f"{self.path.name}.{secrets.token_hex(8)}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(partial, flags, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(f"{m}\n" for m in sorted(wanted)))
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
