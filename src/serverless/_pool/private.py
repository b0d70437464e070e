"""The local pool's private directory: its workers' Unix sockets, the module list and the
pickles of functions sent by value; mode 0700, so no other local user reaches, reads or plants
anything there.

A pool removes its directory when it closes, but a caller killed with SIGKILL cannot: each such
caller left a `serverless-pool-*` directory behind, forever (issue 22). So a live pool holds a
lock on its directory (flock on a file inside, taken before the file gets its name, released by
the kernel when the process dies), and every new pool removes this user's directories whose
lock nobody holds.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

logger = logging.getLogger("serverless.pool")

PREFIX = "serverless-pool-"
LOCK = "lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; directories are left behind
    fcntl = None  # type: ignore[assignment]


class PrivateDirectory:
    """A fresh 0700 directory in the temp directory, locked while this process lives."""

    def __init__(self) -> None:
        sweep()
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX))  # mode 0700, a new name
        self._lock_fd: int | None = None
        if fcntl is not None:
            taking = self.path / f"{LOCK}.new"
            # not inherited by the workers (os.open's default): a dead caller's lock must go
            fd = os.open(taking, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(taking, self.path / LOCK)  # visible to a sweeper only once held
            self._lock_fd = fd

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def sweep(directory: str | None = None) -> list[Path]:
    """Remove the private directories of this user's pools whose process is dead; the removed."""
    if fcntl is None or not hasattr(os, "getuid"):
        return []  # pragma: no cover - Windows
    root = Path(directory or tempfile.gettempdir())
    removed = []
    try:
        names = [n for n in os.listdir(root) if n.startswith(PREFIX)]
    except OSError:
        return []
    for name in names:
        path = root / name
        if _dead(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("removed %d directories of local pools whose caller died", len(removed))
    return removed


def _dead(path: Path) -> bool:
    """Whether `path` is a pool directory of this user that no live process holds."""
    assert fcntl is not None
    try:
        info = path.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False  # a symbolic link, a file, another user's: never touched
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # no lock yet (being created), or an older version's: left alone
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its pool is alive
    finally:
        os.close(fd)
    return True
