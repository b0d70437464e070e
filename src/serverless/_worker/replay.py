"""Replay protection: a request id runs at most once per host within the tolerance window.

Each process keeps the ids it has seen (the fast path, no I/O); a small SQLite file per host
and user, shared by every process of a multi-process server (uvicorn --workers, gunicorn -w)
and kept across a restart, makes the first claim of an id the only one. An id is remembered
for twice the tolerance: longer than its timestamp stays acceptable.

The store fails closed: a state directory that is not this user's own, not 0700 or not
writable, or a store that fails, refuses every chunk (503, naming the directory and the fix);
never a quiet fall back to per-process protection, under which a captured request ran once per
process (issue 22: 4 runs in 32 replays). `serverless worker` refuses to start instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from .._exceptions import ConfigurationError

if TYPE_CHECKING:  # imported where used: a caller that serves no route never loads it
    import sqlite3

logger = logging.getLogger("serverless.worker")

STATE_DIR_ENV = "SERVERLESS_STATE_DIR"
PURGE_EVERY = 1000  # claims between deletions of expired ids


class SeenIds:
    """Request ids seen by this process within the window (bounded, oldest dropped first)."""

    def __init__(self, window: float, limit: int = 1_000_000) -> None:
        self._window = window
        self._limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, request_id: str, now: float) -> bool:
        """False if `request_id` was seen recently."""
        with self._lock:
            while self._seen:
                oldest, expiry = next(iter(self._seen.items()))
                if expiry > now and len(self._seen) < self._limit:
                    break
                del self._seen[oldest]
            if request_id in self._seen:
                return False
            self._seen[request_id] = now + 2 * self._window
            return True


def default_directory() -> Path:
    """$SERVERLESS_STATE_DIR, else a private directory of this user in the temp directory."""
    configured = os.environ.get(STATE_DIR_ENV, "").strip()
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"serverless-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _private_directory(path: Path) -> Path:
    """Create `path` (mode 0700) or check that it is ours: another local user must not be
    able to plant or read the file that decides which requests run."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = path.lstat()
    problem = ""
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif hasattr(os, "getuid") and info.st_uid != os.getuid():
        problem = f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    elif hasattr(os, "getuid") and info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}, not 0700"
    elif not os.access(path, os.W_OK | os.X_OK):
        problem = "is not writable by this user"
    if problem:
        raise ConfigurationError(
            f"the replay store's directory {path} {problem}: remove it (it is created again, "
            f"mode 0700), or `chmod 700` a directory of your own, or set ${STATE_DIR_ENV} to "
            "a private directory of this user"
        )
    return path


class HostReplayStore:
    """Claims request ids in a SQLite file shared by the processes of this host.

    One connection per process (reopened after a fork), serialised by a lock; WAL and
    synchronous=OFF: an id must survive a process restart, not a power cut, and a claim
    then costs tens of microseconds.
    """

    def __init__(self, window: float, directory: Path | None = None) -> None:
        self._window = window
        self._path = _private_directory(directory or default_directory()) / "replay.sqlite3"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._claims = 0

    @property
    def path(self) -> Path:
        return self._path

    def check(self) -> None:
        """Create the store's file and table now, so a store that cannot be written is known
        at start; the connection is closed (a server may fork after this)."""
        import sqlite3

        conn = sqlite3.connect(self._path, timeout=5.0, isolation_level=None)
        try:
            self._prepare(conn)
        finally:
            conn.close()

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, expires REAL NOT NULL)"
            " WITHOUT ROWID"
        )
        os.chmod(self._path, 0o600)

    def _connection(self) -> sqlite3.Connection:
        import sqlite3

        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(
                self._path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            self._prepare(conn)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def claim(self, request_id: str, now: float) -> bool:
        """True if no process of this host has claimed `request_id` within the window."""
        import sqlite3

        with self._lock:
            conn = self._connection()
            self._claims += 1
            if self._claims % PURGE_EVERY == 1:
                conn.execute("DELETE FROM seen WHERE expires < ?", (now,))
            try:
                conn.execute(
                    "INSERT INTO seen (id, expires) VALUES (?, ?)",
                    (request_id, now + 2 * self._window),
                )
            except sqlite3.IntegrityError:
                # Seen before; but an expired row (not yet purged) is not a replay.
                updated = conn.execute(
                    "UPDATE seen SET expires = ? WHERE id = ? AND expires < ?",
                    (now + 2 * self._window, request_id, now),
                )
                return updated.rowcount == 1
            return True


class ReplayGuard:
    """The per-process cache in front of the shared store.

    shared: True, the host's store ($SERVERLESS_STATE_DIR); False, this process's cache only
    (a worker that is the only process to run the request ids signed for it: a local pool's
    worker runs only those of its slot)."""

    def __init__(self, window: float, shared: bool = True) -> None:
        import sqlite3

        self._local = SeenIds(window)
        self._store: HostReplayStore | None = None
        # why every request is refused, when the store cannot be used: fail closed
        self.refusal = ""
        if shared is False:
            return
        directory = default_directory()
        try:
            self._store = HostReplayStore(window, directory)
            self._store.check()
        except ConfigurationError as exc:
            self.refusal = str(exc)
        except (OSError, sqlite3.Error) as exc:
            self.refusal = (
                f"the replay store in {directory} cannot be written ({exc}): set "
                f"${STATE_DIR_ENV} to a private, writable directory of this user"
            )
        if self.refusal:
            logger.error("every chunk will be refused (503): %s", self.refusal)

    def add(self, request_id: str, now: float) -> bool | None:
        """True: first use; False: a replay; None: the shared store failed (fail closed)."""
        if self.refusal:
            return None
        if not self._local.add(request_id, now):
            return False
        if self._store is None:
            return True
        import sqlite3

        try:
            return self._store.claim(request_id, now)
        except sqlite3.Error:
            logger.exception("the shared replay store failed; refusing the request")
            return None
