"""Result stores with real parts: several processes on one SQLite file, writers SIGKILLed in
the middle of put_many, a forked child, a real redis-server (password, ttl, killed), and the
`serverless cache` command."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serverless._caller.redisstore import RedisStore
from serverless._caller.sqlitestore import SQLiteStore
from serverless._caller.store import ResultStore, open_store, shared_store
from serverless._exceptions import StoreError
from tests.conftest import TESTS, test_env
from tests.integration.conftest import redis_server
from tests.store_writer import batch_records, record_key


def writer(spec: str, n: int, batches: int, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.store_writer", spec, str(n), str(batches), str(size)],
        env=test_env(),
        cwd=TESTS.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and out.split() == ["ready", "done"], err


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serverless._cli", "cache", *args],
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_whole(store: ResultStore, n: int, batches: int, size: int) -> None:
    for batch in range(batches):
        expected = batch_records(n, batch, size)
        assert store.get_many([k for k, _ in expected]) == [p for _, p in expected]


def test_import_serverless_does_not_import_redis(tmp_path: Path) -> None:
    code = (
        "import sys, serverless\n"
        "from serverless._caller.store import open_store\n"
        f"open_store({str(tmp_path / 'c.db')!r}).put_many([(b'k' * 32, b'v')])\n"
        "assert 'redis' not in sys.modules, sorted(m for m in sys.modules if 'redis' in m)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=test_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_several_processes_write_one_store_at_once(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    spec = str(tmp_path / "c.db") if kind == "sqlite" else request.getfixturevalue("redis_url")
    writers = [writer(spec, n, batches=40, size=25) for n in range(4)]
    for proc in writers:
        finish(proc)
    store = open_store(spec)
    for n in range(4):
        assert_whole(store, n, 40, 25)
    assert store.stats().records == 4 * 40 * 25 and store.stats().corrupted == 0
    store.close()


def test_writers_killed_in_the_middle_leave_every_record_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    size = 200  # records per put_many: about 0.4 MB, so that kills land inside one
    rng = random.Random(24)
    for n in range(6):
        procs = [writer(str(path), n * 2 + i, batches=0, size=size) for i in range(2)]
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.05, 0.5))
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            assert proc.returncode == -signal.SIGKILL
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()
    store = SQLiteStore(path)
    total = 0
    for n in range(12):
        batch = 0
        while True:  # every batch is there whole, up to the first that is not there at all
            expected = batch_records(n, batch, size)
            got = store.get_many([k for k, _ in expected])
            if got == [None] * size:
                break
            assert got == [p for _, p in expected], f"writer {n} batch {batch} is partial"
            batch += 1
        total += batch * size
        later = [record_key(n, b, j) for b in range(batch + 1, batch + 4) for j in range(size)]
        assert store.get_many(later) == [None] * len(later)
    assert total > 0 and store.stats().records == total
    assert store.stats().corrupted == 0
    store.close()


def test_a_forked_child_uses_the_store_on_connections_of_its_own(tmp_path: Path) -> None:
    spec = str(tmp_path / "c.db")
    store = shared_store(spec)
    assert isinstance(store, SQLiteStore)
    store.put_many([(record_key(0, 0, 0), b"parent")])
    pid = os.fork()
    if pid == 0:  # the child: the inherited object and the registry's new one both work
        ok = False
        try:
            mine = shared_store(spec)
            assert mine is not store
            mine.put_many([(record_key(1, 0, 0), b"child")])
            store.put_many([(record_key(2, 0, 0), b"inherited")])
            ok = store.get_many([record_key(0, 0, 0)]) == [b"parent"]
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        assert time.monotonic() < deadline, "the forked child did not exit"
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    keys = [record_key(n, 0, 0) for n in range(3)]
    assert store.get_many(keys) == [b"parent", b"child", b"inherited"]


def test_redis_round_trip_ttl_and_damaged_records(redis_url: str) -> None:
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    records = batch_records(0, 0, 50)
    store.put_many(records)
    assert store.get_many([k for k, _ in records] + [record_key(9, 9, 9)]) == [
        *(p for _, p in records),
        None,
    ]
    assert store.stats().records == 50
    assert store.stats().nbytes == sum(len(p) for _, p in records)
    password = redis_url.split(":")[2].split("@")[0]
    assert password not in store.location and password not in repr(store)

    short = open_store(redis_url + "?ttl=0.3")
    short.put_many([(record_key(1, 0, 0), b"brief")])
    assert short.get_many([record_key(1, 0, 0)]) == [b"brief"]
    deadline = time.monotonic() + 10
    while short.get_many([record_key(1, 0, 0)]) != [None]:
        assert time.monotonic() < deadline, "a record with ttl=0.3 still reads after 10 s"
        time.sleep(0.1)

    import redis  # the raw client: damage one record as a failing disk or a bug would

    raw = redis.Redis.from_url(redis_url)
    name = b"serverless:" + records[3][0]
    value = raw.get(name)
    assert isinstance(value, bytes)
    raw.set(name, value[:-1] + b"?")
    assert store.get_many([records[3][0], records[4][0]]) == [None, records[4][1]]
    assert store.stats().corrupted == 1
    raw.close()
    store.close()
    short.close()


def test_redis_clear_removes_only_our_prefix(redis_url: str) -> None:
    import redis

    raw = redis.Redis.from_url(redis_url)
    raw.set(b"other:1", b"theirs")
    raw.set(b"serverlessX", b"theirs")
    ours = open_store(redis_url)
    ours.put_many(batch_records(0, 0, 2500))  # more than one SCAN step
    mine = RedisStore(redis_url, prefix="app2:")
    mine.put_many(batch_records(1, 0, 3))
    assert ours.clear() == 2500
    assert ours.stats().records == 0 and ours.clear() == 0
    assert raw.get(b"other:1") == b"theirs" and raw.get(b"serverlessX") == b"theirs"
    assert mine.stats().records == 3
    raw.close()
    ours.close()
    mine.close()


def test_redis_wrong_password_is_a_store_error_without_the_password(redis_url: str) -> None:
    wrong = redis_url.replace("redis://:", "redis://:Wr0ngPassw0rd")
    with pytest.raises(StoreError, match="refused the credentials") as error:
        open_store(wrong)
    for text in (str(error.value), error.value.store, repr(error.value)):
        assert "Wr0ngPassw0rd" not in text
    no_password = "redis://" + redis_url.split("@")[1]
    with pytest.raises(StoreError, match="refused the credentials"):
        open_store(no_password)


def test_a_killed_redis_server_is_a_store_error_within_seconds(tmp_path: Path) -> None:
    with redis_server(tmp_path) as (url, proc):
        store = open_store(url)
        store.put_many(batch_records(0, 0, 3))
        proc.kill()
        proc.wait(10)
        for operation in (
            lambda: store.get_many([record_key(0, 0, 0)]),
            lambda: store.put_many(batch_records(0, 1, 3)),
            store.stats,
        ):
            started = time.monotonic()
            with pytest.raises(StoreError, match="cannot be reached") as error:
                operation()
            assert time.monotonic() - started < 5
            assert url.split("@")[0].split(":")[2] not in str(error.value)
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot be reached"):
            open_store(url)
        assert time.monotonic() - started < 5
        store.close()


def test_cli_stats_and_clear_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SQLiteStore(path, ttl=600)
    records = batch_records(0, 0, 7)
    store.put_many(records)
    store.close()
    done = cli("stats", str(path) + "?ttl=600")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"location: {path}",
        "records: 7",
        f"bytes: {sum(len(p) for _, p in records)}",
        "ttl: 600 s",
        "corrupted: 0",
    ]
    done = cli("clear", f"sqlite://{path}")
    assert (done.returncode, done.stdout) == (0, f"removed 7 records from {path}\n")
    assert "records: 0" in cli("stats", str(path)).stdout

    path.write_bytes(path.read_bytes()[:50])  # damaged: its message offers `cache clear`
    done = cli("stats", str(path))
    assert done.returncode == 1 and f"serverless cache clear {path}" in done.stderr
    done = cli("clear", str(path))
    assert (done.returncode, done.stdout) == (0, f"removed the damaged store {path}\n")
    assert not path.exists()

    done = cli("stats", str(tmp_path / "nothing.db"))
    assert done.returncode == 1 and "no result store at" in done.stderr
    assert not (tmp_path / "nothing.db").exists()  # inspecting creates nothing
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    done = cli("clear", str(notes))
    assert done.returncode == 1 and "not a serverless result store" in done.stderr
    assert notes.read_text() == "mine"
    done = cli("stats", "http://example.com/x")
    assert done.returncode == 1 and "unknown scheme" in done.stderr


def test_cli_stats_and_clear_on_redis(redis_url: str) -> None:
    password = redis_url.split("@")[0].split(":")[2]
    store = open_store(redis_url)
    store.put_many(batch_records(0, 0, 5))
    store.close()
    done = cli("stats", redis_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == [
        f"location: {redis_url.replace(password, '***')}",
        "records: 5",
    ]
    assert password not in done.stdout
    done = cli("clear", redis_url)
    assert done.returncode == 0 and done.stdout.startswith("removed 5 records from redis://:***@")
    done = cli("stats", redis_url.replace(password, "nope"))
    assert done.returncode == 1 and "refused the credentials" in done.stderr
    assert "nope" not in done.stderr
