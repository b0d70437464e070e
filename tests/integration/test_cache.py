"""cache= end to end: callers in processes of their own on the real local pool, SIGKILLed in
the middle of a call and run again, on a real SQLite file and a real redis-server; every
execution counted per item on the worker side (sample_functions._record_item)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import serverless
from serverless._caller.store import open_store
from tests import sample_functions as sf
from tests.conftest import test_env
from tests.integration.conftest import redis_server

COUNT = 600


@pytest.fixture(params=["sqlite", "redis"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store of each kind: a SQLite file, or a fresh redis-server."""
    if request.param == "sqlite":
        yield str(tmp_path / "results.db")
        return
    with redis_server(tmp_path) as (url, _):
        yield url


def caller(
    spec: str, out: Path, calls: Path, *extra: str, count: int = COUNT
) -> tuple[list[str], dict[str, str]]:
    env = test_env(**{sf.CALLS_FILE_ENV: str(calls)})
    return [sys.executable, "-m", "tests.cache_caller", spec, str(count), str(out), *extra], env


def run_caller(
    spec: str, out: Path, calls: Path, *extra: str, count: int = COUNT
) -> dict[str, Any]:
    args, env = caller(spec, out, calls, *extra, count=count)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def executions(calls: Path) -> Counter[int]:
    if not calls.exists():
        return Counter()
    runs = sf.executions(str(calls), "slow_label")
    return Counter({int(item): len(times) for item, times in runs.items()})


def settled(calls: Path, quiet: float = 0.5, within: float = 15.0) -> None:
    """Until the executions file has not grown for `quiet` seconds: a killed caller's pool
    workers finish (or drop) what they held."""
    deadline = time.monotonic() + within
    size = -1
    while time.monotonic() < deadline:
        now = calls.stat().st_size if calls.exists() else 0
        if now == size:
            return
        size = now
        time.sleep(quiet)
    raise AssertionError("the workers kept running after their caller was killed")


def expected(count: int = COUNT) -> bytes:
    return msgspec.msgpack.encode([f"r{n}" for n in range(count)])


def test_a_caller_sigkilled_half_way_resumes_and_reruns_only_what_was_not_stored(
    spec: str, tmp_path: Path
) -> None:
    calls, out = tmp_path / "calls", tmp_path / "out"
    args, env = caller(spec, out, calls, "--chunk-size", "5", "--workers", "4")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = open_store(spec)
    try:
        deadline = time.monotonic() + 60
        while store.stats().records < COUNT // 3:  # about a third stored: kill it
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the caller stored nothing"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        settled(calls)
        stored = store.stats().records
        before = executions(calls)
        assert COUNT // 3 <= stored < COUNT and not out.exists()
        # stored results came from executions; what ran but was not stored was in flight
        in_flight = sum(before.values()) - stored
        assert 0 <= in_flight <= 4 * 5 * 2  # workers x chunk size, a chunk answered at the kill

        figures = run_caller(spec, out, calls, "--chunk-size", "5", "--workers", "4")
        assert out.read_bytes() == expected()  # every result, in order, as uninterrupted
        assert figures == {"hits": stored, "sent": COUNT - stored, "error": None}
        after = executions(calls)
        rerun = after - before
        assert sum(rerun.values()) == COUNT - stored  # exactly the items not stored
        assert set(after) == set(range(COUNT))
        assert sum(after.values()) <= COUNT + in_flight
        assert max(after.values()) <= 2
        # and a third run sends nothing
        assert run_caller(spec, out, calls)["sent"] == 0
        assert executions(calls) == after
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        store.close()


def test_two_callers_at_once_on_one_store_then_a_third_finds_everything(
    spec: str, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    outs = [tmp_path / "out1", tmp_path / "out2"]
    procs = []
    for out in outs:
        args, env = caller(spec, out, calls, "--chunk-size", "10", count=300)
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True))
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    for out in outs:
        assert out.read_bytes() == expected(300)
    assert max(executions(calls).values()) <= 2  # each caller ran an item at most once
    figures = run_caller(spec, tmp_path / "out3", calls, count=300)
    assert figures["sent"] == 0 and figures["hits"] == 300


MODULE = '''
import os
import serverless

@serverless.parallel(workers=2)
def label(numbers: list[int]) -> list[str]:
    """{doc}"""
    with open(os.environ["SERVERLESS_TEST_CALLS"], "a") as f:
        f.write("".join(f"slow_label {{n}} {{os.getpid()}} 0.0\\n" for n in numbers))
    return [f"{prefix}{{n}}" for n in numbers]
'''


def test_a_changed_function_never_gets_an_old_result_and_a_docstring_edit_still_hits(
    tmp_path: Path,
) -> None:
    spec, calls, out = str(tmp_path / "results.db"), tmp_path / "calls", tmp_path / "out"
    module = tmp_path / "mods" / "labels.py"
    module.parent.mkdir()

    def run(doc: str, prefix: str, *extra: str) -> tuple[dict[str, Any], list[str]]:
        module.write_text(MODULE.format(doc=doc, prefix=prefix))
        args, env = caller(spec, out, calls, "--module", "labels", *extra, count=50)
        env["PYTHONPATH"] = f"{module.parent}{os.pathsep}{env['PYTHONPATH']}"
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1]), msgspec.msgpack.decode(out.read_bytes())

    figures, results = run("Label each number.", "a")
    assert figures["sent"] == 50 and results == [f"a{n}" for n in range(50)]
    # a docstring rewritten, lines added above: the same code, every result found
    figures, results = run("Label each number,\n    in a longer docstring.\n\n", "a")
    assert (figures["hits"], figures["sent"]) == (50, 0) and results[0] == "a0"
    # one character of code changed: nothing old is served
    figures, results = run("Label each number.", "b")
    assert (figures["hits"], figures["sent"]) == (0, 50) and results == [f"b{n}" for n in range(50)]
    # what the code cannot show: version= makes new keys too
    figures, results = run("Label each number.", "b", "--version", "2")
    assert (figures["hits"], figures["sent"]) == (0, 50)
    assert sum(executions(calls).values()) == 150


def test_keys_do_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    spec, calls = str(tmp_path / "results.db"), tmp_path / "calls"
    items = tmp_path / "items.json"
    # strings hash differently under each seed: sets and dict orders would move
    items.write_text(json.dumps([f"item-{n}" for n in range(40)]))
    script = (
        "import json, sys, serverless\n"
        "from tests import sample_functions as sf\n"
        "items = [{'name': s, 'tags': {s, s.upper(), 'x'}, 'pair': (s, len(s))}"
        " for s in json.load(open(sys.argv[2]))]\n"
        "f = sf.echo_length.with_options(cache=sys.argv[1])\n"
        "results, stats = f.with_stats(items)\n"
        "print(json.dumps([stats.cache_hits, stats.items_sent, results]))\n"
    )
    seen = []
    for seed in ("1", "2", "3"):
        env = test_env(PYTHONHASHSEED=seed, **{sf.CALLS_FILE_ENV: str(calls)})
        done = subprocess.run(
            [sys.executable, "-c", script, spec, str(items)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        seen.append(json.loads(done.stdout.splitlines()[-1]))
    assert [s[:2] for s in seen] == [[0, 40], [40, 0], [40, 0]]
    assert seen[0][2] == seen[1][2] == seen[2][2]


def test_a_store_killed_during_the_call_costs_work_never_a_result(tmp_path: Path) -> None:
    with redis_server(tmp_path) as (url, server):
        cached = sf.slow_label.with_options(cache=url, chunk_size=5, workers=4)
        cached(list(range(20)), 0.02)  # the first 20 are stored

        def kill_soon() -> None:
            time.sleep(0.5)
            server.kill()

        killer = threading.Thread(target=kill_soon)
        killer.start()
        results, stats = cached.with_stats(list(range(400)), 0.02)
        killer.join()
        assert results == [f"r{n}" for n in range(400)]
        assert stats.cache_hits == 20
        assert stats.cache_error is not None and "StoreError" in stats.cache_error
        # once it is gone for good, a new call says so before it sends anything
        serverless.shutdown()
        with pytest.raises(serverless.StoreError, match=r"127\.0\.0\.1") as caught:
            sf.slow_label.with_options(cache=url)([1, 2])
        password = url.split("@")[0].rsplit(":", 1)[1]
        assert password not in str(caught.value)


def test_a_truncated_sqlite_store_is_a_clear_error_or_a_fall_back_never_a_wrong_result(
    tmp_path: Path,
) -> None:
    path = tmp_path / "results.db"
    cached = sf.slow_label.with_options(cache=str(path), chunk_size=10)
    assert cached(list(range(200)), 0.0) == [f"r{n}" for n in range(200)]
    serverless.shutdown()
    # truncated in the middle of a run: the store either still reads or stops being used
    calls = tmp_path / "calls"
    args, env = caller(str(path), tmp_path / "out", calls, "--chunk-size", "10", count=400)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        assert (tmp_path / "out").read_bytes() == expected(400)
    else:  # a clear error, naming the store and the fix
        assert b"StoreError" in stderr and str(path).encode() in stderr
    # truncated before a call: the call raises before it sends anything
    with open(path, "r+b") as f:
        f.truncate(1000)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    before = executions(calls)
    args, env = caller(str(path), tmp_path / "out2", calls, count=50)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "StoreError" in done.stderr and str(path) in done.stderr
    assert "serverless cache clear" in done.stderr or "delete" in done.stderr
    assert executions(calls) == before
