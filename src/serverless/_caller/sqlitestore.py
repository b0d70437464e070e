"""The SQLite result store: one local file that several threads and processes share.

WAL lets readers run beside the one writer; each put_many is one `BEGIN IMMEDIATE`
transaction, so a process killed at any moment leaves every record whole or absent. The
file is a private cache of the user's results: it is created 0600, and a path that another
local user could have planted (a symlink, not a regular file, not ours) or could swap later
(in a folder of theirs, or one anyone may write without the sticky bit) is refused rather
than followed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Iterator, Sequence

from .._exceptions import StoreError
from .store import CHECK_BYTES, StoreStats, Unsealer, seal

FORMAT = "serverless-results-1"
MAGIC = b"SQLite format 3\x00"
BUSY_MS = 10_000  # several processes write at once; each write holds the lock for ms
# pages cached per connection, in KiB (negative): random keys touch the key index all over
# (2,000,000 puts: 15.5 -> 13.6 us each against SQLite's default 2 MiB)
CACHE_KIB = -65536
_DAMAGED = "is damaged"  # in the messages that `serverless cache clear` resolves
BATCH = 500  # keys per SELECT: under SQLite's variable limit (999 before 3.32)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    # a rowid table: its key index holds the keys only, so lookups do not wade through the
    # payloads (measured, 1,000 keys in 50,000 records of 1 KB: 2.0 ms a miss, 3.5 ms a hit;
    # WITHOUT ROWID, which keeps whole rows in the key's b-tree: 10.9 and 13.0 ms)
    "CREATE TABLE IF NOT EXISTS results (key BLOB PRIMARY KEY, value BLOB NOT NULL, expires REAL)",
    "CREATE INDEX IF NOT EXISTS results_expires ON results (expires) WHERE expires IS NOT NULL",
    f"INSERT OR IGNORE INTO meta VALUES ('format', '{FORMAT}')",
)
# Connections inherited through fork: never used again, never closed either (closing one in
# the child could checkpoint or unlink the parent's WAL); they stay referenced here.
_orphans: list[sqlite3.Connection] = []
_live: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


class SQLiteStore:
    """A ResultStore in a SQLite file. Thread-safe: each operation borrows an idle
    connection (one per concurrent thread at most), so readers never wait for a writer."""

    def __init__(self, path: str | os.PathLike[str], ttl: float | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.location = self.path
        self.ttl = ttl
        self._unsealer = Unsealer(self.path)
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        identity = _check_file(self.path)
        with self._connection() as db:
            _check_same(self.path, identity)
            self._init(db)
        _live.add(self)

    # -- the ResultStore interface --

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        found: dict[bytes, bytes] = {}
        now = time.time()
        with self._connection() as db:
            for start in range(0, len(keys), BATCH):
                batch = list(keys[start : start + BATCH])
                marks = ",".join("?" * len(batch))
                found.update(
                    db.execute(
                        f"SELECT key, value FROM results WHERE key IN ({marks}) "
                        "AND (expires IS NULL OR expires > ?)",
                        [*batch, now],
                    ).fetchall()
                )
        return self._unsealer.payloads(keys, [found.get(key) for key in keys])

    def put_many(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        if not records:
            return
        expires = None if self.ttl is None else time.time() + self.ttl
        rows = [(key, seal(key, payload), expires) for key, payload in records]
        with self._connection() as db, self._transaction(db):
            db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", rows)

    def stats(self) -> StoreStats:
        with self._connection() as db:
            count, size = db.execute(
                "SELECT count(*), coalesce(sum(length(value)), 0) FROM results"
            ).fetchone()
        return StoreStats(
            location=self.location,
            records=int(count),
            nbytes=int(size) - CHECK_BYTES * int(count),
            corrupted=self._unsealer.damaged,
            ttl=self.ttl,
        )

    def clear(self) -> int:
        with self._connection() as db, self._transaction(db):
            removed = db.execute("DELETE FROM results").rowcount
        return int(removed)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, ttl={self.ttl!r})"

    # -- connections --

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """An idle connection of this process (a new one if none), returned when done;
        every sqlite3 error becomes a StoreError that names the file and the fix."""
        with self._lock:
            if self._closed:
                raise StoreError(f"the result store {self.path} is closed", store=self.path)
            db = self._idle.pop() if self._idle else None
        try:
            if db is None:
                db = self._connect()
            yield db
        except sqlite3.Error as exc:
            raise _store_error(self.path, exc) from exc
        finally:
            if db is not None:
                with self._lock:
                    keep = not self._closed and len(self._idle) < 64
                    if keep:
                        self._idle.append(db)
                if not keep:
                    db.close()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), none implicit
        db = sqlite3.connect(
            self.path, timeout=BUSY_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
            db.execute("PRAGMA synchronous = NORMAL")  # in WAL: a killed process loses nothing
            db.execute(f"PRAGMA cache_size = {CACHE_KIB}")
        except BaseException:
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def _transaction(self, db: sqlite3.Connection) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock later
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _init(self, db: sqlite3.Connection) -> None:
        """Check that the file is one of ours (before writing anything to it), create the
        tables in a new one, turn WAL on (it stays on in the file), sweep expired records."""
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        if tables and "meta" not in tables:
            raise _foreign(self.path, "a SQLite database of something else")
        if not {"meta", "results"} <= tables:
            with self._transaction(db):
                for statement in _SCHEMA:
                    db.execute(statement)
        row = db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
        if row is None or row[0] != FORMAT:
            raise _foreign(self.path, f"of format {row[0] if row else None!r}, not {FORMAT!r}")
        if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise StoreError(
                f"the result store {self.path} cannot use SQLite's WAL journal (a network "
                "file system?): put it on a local disk",
                store=self.path,
            )
        with self._transaction(db):  # the index makes this cheap
            db.execute("DELETE FROM results WHERE expires <= ?", (time.time(),))

    def _forked(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork
        _orphans.extend(self._idle)
        self._idle = []


def _after_fork() -> None:
    for store in list(_live):
        store._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def clear_file(path: str | os.PathLike[str]) -> int | None:
    """`serverless cache clear` on a file: how many records it removed; None when the store
    was damaged and its files were removed instead."""
    try:
        store = SQLiteStore(path)
        try:
            return store.clear()
        finally:
            store.close()
    except StoreError as exc:
        if _DAMAGED not in str(exc):
            raise
    reset(path)
    return None


def reset(path: str | os.PathLike[str]) -> None:
    """Remove a damaged store's file and its companions (`serverless cache clear` on a file
    that cannot be opened), after the same checks as opening it: never through a symlink,
    never another user's file, never a file that is not SQLite."""
    path = os.path.abspath(os.fspath(path))
    _check_one(path)
    with open(path, "rb") as file:
        head = file.read(len(MAGIC))
    if head and not (head.startswith(MAGIC) or MAGIC.startswith(head)):
        raise _foreign(path, "not a SQLite file")
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _check_file(path: str) -> tuple[int, int]:
    """Create the file 0600 if missing; refuse one that another local user could have
    planted. Returns its (device, inode) to check that SQLite opened the same file."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    exclusive = os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow
    try:
        _check_folders(path)  # before a folder is made in one of them
        _make_parents(path)
        os.close(os.open(path, exclusive, 0o600))
        new = True
    except FileExistsError:
        new = False
    except OSError as exc:
        raise StoreError(
            f"cannot create the result store {path}: {exc.strerror}", store=path
        ) from exc
    identity = _check_one(path)
    _check_head(path)
    for companion in (path + "-wal", path + "-shm"):
        if new:  # ours, before SQLite creates them: a link planted meanwhile is not followed
            with contextlib.suppress(OSError):
                os.close(os.open(companion, exclusive, 0o600))
        with contextlib.suppress(FileNotFoundError):
            _check_one(companion)
    return identity


def _check_folders(path: str) -> None:
    """Refuse a file in a folder that another local user could swap it in (theirs, or one
    anyone may write without the sticky bit, at any level above it): a connection opened
    after the checks here would open their file (as OpenSSH's StrictModes does)."""
    folder = os.path.dirname(path)
    while folder and not os.path.lexists(folder):  # the folders _make_parents would make
        folder = os.path.dirname(folder)
    folder = os.path.realpath(folder or ".")
    while True:
        info = os.stat(folder)
        why = ""
        if hasattr(os, "geteuid") and info.st_uid not in (0, os.geteuid()):
            why = f"belongs to another user (uid {info.st_uid})"
        elif info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            why = "may be written by anyone (and has no sticky bit)"
        if why:
            raise StoreError(
                f"refusing the result store {path}: the folder {folder} {why}, so another "
                "user could replace the store: choose another path",
                store=path,
            )
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _check_head(path: str) -> None:
    """A file that is not SQLite is someone else's; one cut short inside the header, ours."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as file:
        head = file.read(len(MAGIC))
    if head and not head.startswith(MAGIC):
        if MAGIC.startswith(head):
            raise _damaged(path, "truncated")
        raise _foreign(path, "not a SQLite file")


def _make_parents(path: str) -> None:
    """Create the missing folders above the file, each 0700 (os.makedirs gives the mode to
    the last one only)."""
    missing = []
    parent = os.path.dirname(path)
    while parent and not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)


def _check_one(path: str) -> tuple[int, int]:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(
            f"cannot read the result store {path}: {exc.strerror}", store=path
        ) from exc
    why = ""
    if stat.S_ISLNK(info.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISREG(info.st_mode):
        why = "is not a regular file"
    elif hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        why = f"belongs to another user (uid {info.st_uid})"
    if why:
        raise StoreError(
            f"refusing the result store {path}: it {why}; a store is a private file of its "
            "user: choose another path",
            store=path,
        )
    return info.st_dev, info.st_ino


def _check_same(path: str, identity: tuple[int, int]) -> None:
    """The file SQLite opened is still the one checked (not swapped for a link meanwhile)."""
    try:
        now = _check_one(path)
    except FileNotFoundError:
        now = (-1, -1)
    if now != identity:
        raise StoreError(f"the result store {path} changed while it was opened", store=path)


def _foreign(path: str, what: str) -> StoreError:
    return StoreError(
        f"{path} is not a serverless result store ({what}): choose another path, or delete "
        "the file if it is yours and holds nothing you need",
        store=path,
    )


def _damaged(path: str, what: str) -> StoreError:
    return StoreError(
        f"the result store {path} {_DAMAGED} ({what}): delete it (and its -wal and -shm "
        f"files), or run `serverless cache clear {path}`; its items then run again",
        store=path,
    )


def _store_error(path: str, exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "malformed" in text or "not a database" in text or "disk I/O" in text
    ):
        return _damaged(path, text)
    if "locked" in text or "busy" in text:
        return StoreError(
            f"the result store {path} stayed locked by another process for "
            f"{BUSY_MS / 1000:g} s ({text})",
            store=path,
        )
    return StoreError(f"the result store {path}: {type(exc).__name__}: {text}", store=path)
