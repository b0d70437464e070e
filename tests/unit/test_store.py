"""The SQLite result store on real files, and how a cache= spec opens a store. Redis and
several processes: tests/integration/test_store.py."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from serverless._caller.sqlitestore import FORMAT, SQLiteStore, clear_file
from serverless._caller.store import (
    KEY_BYTES,
    ResultStore,
    StoreStats,
    open_store,
    redact,
    shared_store,
    sqlite_path,
)
from serverless._exceptions import ConfigurationError, StoreError


def key(n: int | str) -> bytes:
    return hashlib.sha256(str(n).encode()).digest()


def records(n: int, size: int = 100, tag: str = "") -> list[tuple[bytes, bytes]]:
    return [(key(f"{tag}{i}"), f"{tag}{i}:".encode() + b"x" * size) for i in range(n)]


def test_round_trip_misses_and_stats(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    assert isinstance(store, ResultStore) and len(key(0)) == KEY_BYTES
    stored = [*records(1200, tag="a"), (key("empty"), b"")]
    store.put_many(stored)
    asked = [k for k, _ in stored] + [key("absent"), stored[5][0]]  # a miss and a repeat
    got = store.get_many(asked)  # more keys than one SELECT takes
    assert got == [p for _, p in stored] + [None, stored[5][1]]
    assert store.get_many([]) == []
    store.put_many([(stored[0][0], b"new")])  # a later result replaces the earlier one
    assert store.get_many([stored[0][0]]) == [b"new"]
    assert store.stats() == StoreStats(
        location=str(tmp_path / "c.db"),
        records=1201,
        nbytes=sum(len(p) for _, p in stored[1:]) + 3,
        corrupted=0,
        ttl=None,
    )
    assert store.clear() == 1201
    assert store.get_many([stored[1][0]]) == [None] and store.stats().records == 0
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get_many([key(1)])
    reopened = SQLiteStore(tmp_path / "c.db")
    assert reopened.stats().records == 0
    reopened.close()


def test_records_outlive_the_store_object(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "c.db")
    first.put_many(records(10))
    first.close()
    second = SQLiteStore(tmp_path / "c.db")
    assert second.get_many([k for k, _ in records(10)]) == [p for _, p in records(10)]
    second.close()


def test_expired_records_read_as_misses_and_are_swept(tmp_path: Path) -> None:
    short = SQLiteStore(tmp_path / "c.db", ttl=0.3)
    short.put_many(records(3))
    lasting = SQLiteStore(tmp_path / "c.db")
    lasting.put_many([(key("forever"), b"kept")])
    assert short.get_many([key(0), key("forever")]) == [records(3)[0][1], b"kept"]
    deadline = time.monotonic() + 10
    while short.get_many([key(0)]) != [None]:
        assert time.monotonic() < deadline, "a record with ttl=0.3 still reads after 10 s"
        time.sleep(0.1)
    assert lasting.get_many([key(1), key(2), key("forever")]) == [None, None, b"kept"]
    assert short.stats().records == 4  # expired, not yet swept
    short.close()
    lasting.close()
    reopened = SQLiteStore(tmp_path / "c.db")  # opening sweeps
    assert reopened.stats().records == 1
    reopened.close()


def test_a_damaged_record_is_a_miss_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    store.put_many(records(4))
    db = sqlite3.connect(tmp_path / "c.db")
    with db:  # flip a byte of two payloads, and move a record under another key
        for n in (1, 2):
            (value,) = db.execute("SELECT value FROM results WHERE key = ?", (key(n),)).fetchone()
            db.execute(
                "UPDATE results SET value = ? WHERE key = ?",
                (value[:-1] + bytes([value[-1] ^ 1]), key(n)),
            )
        db.execute("UPDATE results SET key = ? WHERE key = ?", (key("moved"), key(3)))
    db.close()
    keys = [key(0), key(1), key(2), key("moved")]
    with caplog.at_level(logging.WARNING, logger="serverless.cache"):
        assert store.get_many(keys) == [records(4)[0][1], None, None, None]
        assert store.get_many(keys)[1:] == [None, None, None]
    assert store.stats().corrupted == 6
    warnings = [r for r in caplog.records if r.name == "serverless.cache"]
    assert len(warnings) == 1 and str(tmp_path / "c.db") in warnings[0].getMessage()
    store.put_many([(key(1), b"again")])  # the item's new result replaces it
    assert store.get_many([key(1)]) == [b"again"]
    store.close()


def _damaged_message(error: pytest.ExceptionInfo[StoreError], path: Path) -> None:
    assert error.value.store == str(path)
    assert str(path) in str(error.value) and "serverless cache clear" in str(error.value)


def test_a_truncated_store_raises_store_error_naming_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SQLiteStore(path)
    store.put_many(records(2000, size=200))
    store.close()  # the last connection checkpoints the WAL into the file
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(StoreError) as error:
        store = SQLiteStore(path)
        store.get_many([k for k, _ in records(2000)])
    _damaged_message(error, path)
    path.write_bytes(b"SQLite for")  # cut inside the header
    with pytest.raises(StoreError) as error:
        SQLiteStore(path)
    _damaged_message(error, path)
    assert clear_file(path) is None and not path.exists()  # what `cache clear` does


def test_a_file_that_is_not_a_store_is_refused_and_left_alone(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"my notes, not a cache\n" * 10)
    with pytest.raises(StoreError, match="not a serverless result store") as error:
        SQLiteStore(text)
    assert error.value.store == str(text)
    with pytest.raises(StoreError, match="not a serverless result store"):
        clear_file(text)  # `cache clear` does not delete it either
    assert text.read_bytes() == b"my notes, not a cache\n" * 10
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # no -wal, -shm beside it

    other = tmp_path / "app.db"  # another application's SQLite database
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="something else"):
        SQLiteStore(other)
    db = sqlite3.connect(other)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not switched to WAL
    db.close()

    store = SQLiteStore(tmp_path / "old.db")
    store.close()
    db = sqlite3.connect(tmp_path / "old.db")
    with db:
        db.execute("UPDATE meta SET value = 'serverless-results-0' WHERE name = 'format'")
    db.close()
    with pytest.raises(StoreError, match=f"not {FORMAT!r}"):
        SQLiteStore(tmp_path / "old.db")


def test_a_new_store_is_private(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        store = SQLiteStore(tmp_path / "deep" / "er" / "c.db")
        store.put_many(records(3))
    finally:
        os.umask(old)
    for name in ("c.db", "c.db-wal", "c.db-shm"):
        assert stat.S_IMODE((tmp_path / "deep" / "er" / name).stat().st_mode) == 0o600, name
    for folder in (tmp_path / "deep", tmp_path / "deep" / "er"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    store.close()


def test_a_symlink_planted_at_the_path_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    planted = tmp_path / "c.db"
    planted.symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link") as error:
        SQLiteStore(planted)
    assert error.value.store == str(planted)
    assert victim.read_bytes() == b"precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["c.db", "victim"]
    dangling = tmp_path / "d.db"  # a link to a file that does not exist yet: not created
    dangling.symlink_to(tmp_path / "made")
    with pytest.raises(StoreError, match="symbolic link"):
        SQLiteStore(dangling)
    assert not (tmp_path / "made").exists()


@pytest.mark.parametrize("companion", ["-wal", "-shm"])
def test_a_symlink_planted_at_a_companion_is_refused(tmp_path: Path, companion: str) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    store.put_many(records(3))
    store.close()  # the last close removes the -wal and -shm
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    Path(f"{tmp_path / 'c.db'}{companion}").symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        SQLiteStore(tmp_path / "c.db")
    assert victim.read_bytes() == b"precious"


def test_what_is_not_a_regular_file_of_ours_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError, match="not a regular file"):
        SQLiteStore(tmp_path / "dir.db")
    os.mkfifo(tmp_path / "fifo.db")  # opening it would block: it is refused before that
    with pytest.raises(StoreError, match="not a regular file"):
        SQLiteStore(tmp_path / "fifo.db")
    if os.geteuid() != 0:
        return  # only root can give a file to another user
    store = SQLiteStore(tmp_path / "theirs.db")
    store.close()
    os.chown(tmp_path / "theirs.db", 4321, 4321)
    with pytest.raises(StoreError, match="another user"):
        SQLiteStore(tmp_path / "theirs.db")


def test_many_threads_at_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            start.wait(10)
            for batch in range(30):
                mine = records(20, size=50, tag=f"{n}.{batch}.")
                store.put_many(mine)
                assert store.get_many([k for k, _ in mine]) == [p for _, p in mine]
                theirs = store.get_many([k for k, _ in records(20, tag=f"{(n + 1) % 8}.0.")])
                assert all(p is None or p.startswith(f"{(n + 1) % 8}.0.".encode()) for p in theirs)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert store.stats().records == 8 * 30 * 20
    store.close()


def test_open_store_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    opened = []
    for spec, path, ttl in [
        (str(tmp_path / "a.db"), tmp_path / "a.db", None),
        (f"{tmp_path / 'b.db'}?ttl=60", tmp_path / "b.db", 60.0),
        (f"sqlite://{tmp_path / 'c.db'}", tmp_path / "c.db", None),  # sqlite:///abs
        ("sqlite://rel/d.db?ttl=0.5", tmp_path / "rel" / "d.db", 0.5),
        ("e.db", tmp_path / "e.db", None),
    ]:
        store = open_store(spec)
        assert isinstance(store, SQLiteStore), spec
        assert (store.location, store.ttl) == (str(path), ttl), spec
        assert path.is_file(), spec
        opened.append(store)
    assert open_store("f.db", ttl=5).stats().ttl == 5
    assert open_store("g.db?ttl=5", ttl=5).stats().ttl == 5  # the same ttl twice: fine
    assert open_store(opened[0]) is opened[0]  # a ResultStore is used as it is
    assert sqlite_path("redis://h/0") is None and sqlite_path("sqlite:///x?ttl=1") == "/x"
    for store in opened:
        store.close()


@pytest.mark.parametrize(
    ("spec", "ttl", "message"),
    [
        ("", None, "names no file"),
        ("sqlite://", None, "names no file"),
        ("?ttl=5", None, "names no file"),
        ("http://host/x", None, "unknown scheme 'http'"),
        ("memcached://:hunter2@host/", None, "unknown scheme"),
        ("c.db?ttl=soon", None, "not a number of seconds"),
        ("c.db?ttl=-1", None, "positive"),
        ("c.db?ttl=nan", None, "positive"),
        ("c.db", 0, "positive"),
        ("c.db?ttl=5", 6, "ttl=5 but ttl=6"),
        ("c.db?mode=ro", None, "only query option is ?ttl="),
        ("c.db?ttl=5&prefix=x", None, "only query option"),
    ],
)
def test_bad_specs_are_configuration_errors_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, ttl: float | None, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=message.replace("?", r"\?")) as error:
        open_store(spec, ttl=ttl)
    assert "hunter2" not in str(error.value)
    assert not (tmp_path / "c.db").exists()


def test_a_spec_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="ResultStore"):
        open_store(42)  # type: ignore[arg-type]


def test_redact_hides_passwords_only() -> None:
    assert redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("rediss://user:s3cret@host/1?ttl=5") == "rediss://user:***@host/1?ttl=5"
    assert redact("redis://host/0?password=s3cret") == "redis://host/0?password=***"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
    assert redact("/path/c.db") == "/path/c.db"


def test_without_the_redis_package_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'simple-serverless\[redis\]'") as e:
        open_store("redis://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in str(e.value) and "redis://:***@127.0.0.1:6379/0" in str(e.value)


def test_shared_store_opens_each_spec_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = str(tmp_path / "c.db")
    first = shared_store(spec)
    results: list[ResultStore] = []
    threads = [
        threading.Thread(target=lambda: results.append(shared_store(spec))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8 and all(s is first for s in results)
    assert shared_store(spec + "?ttl=9") is not first
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as in a forked child
    child = shared_store(spec)
    assert child is not first and shared_store(spec) is child
