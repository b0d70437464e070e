"""The API end to end on the embedded local pool: real worker processes under uvicorn."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, cast

import pytest

import serverless
from serverless import _config
from tests import sample_functions as sf
from tests.conftest import free_port, test_env


def test_results_complete_and_in_order_with_args_and_kwargs() -> None:
    items = list(range(1000))
    assert sf.square(items, 3, scale=2) == [(n * n + 3) * 2 for n in items]
    stats = sf.square.stats
    assert stats is not None
    assert (stats.workers, stats.count, stats.count_out, stats.target) == (100, 1000, 1000, "local")
    sizes = [c.size for c in stats.chunks]
    assert len(sizes) == 100 and max(sizes) - min(sizes) <= 1


def test_chunk_size_and_workers_options() -> None:
    fn = serverless.parallel(chunk_size=7, workers=3)(sf.square.__wrapped__)  # type: ignore[attr-defined]
    assert fn(list(range(50))) == [n * n for n in range(50)]
    assert fn.stats is not None and [c.size for c in fn.stats.chunks] == [7] * 7 + [1]


def test_empty_input_returns_empty_list() -> None:
    assert sf.square([]) == []
    assert sf.square.stats is not None and sf.square.stats.chunks == []


def test_generator_input_streams() -> None:
    assert sf.square(n for n in range(100)) == [n * n for n in range(100)]
    assert sf.square.stats is not None and sf.square.stats.count == 100


def test_both_pool_processes_serve() -> None:
    pids = set(sf.pids(list(range(200))))
    assert os.getpid() not in pids
    assert len(pids) == (os.cpu_count() or 1)


def test_methods_static_and_class() -> None:
    geo = sf.Geo()
    geo.factor = 99  # the instance's state travels with it (issue 23): the seed used 10
    assert geo.scaled([1, 2, 3]) == [99, 198, 297]
    assert sf.Geo.scaled(geo, [4]) == [396]
    assert sf.Geo.negated([1, 2]) == [-1, -2]
    # typed as methods: a staticmethod on an instance, a classmethod on the class (_function)
    assert cast(Any, geo).negated([3]) == [-3]
    assert cast(Any, sf.Geo).named([1, 2]) == ["Geo1", "Geo2"]
    assert geo.total([1, 2, 3]) == [6 * 99]  # sequential runs here, on this instance


def test_async_function() -> None:
    assert sf.async_double(list(range(10))) == [2 * n for n in range(10)]


def test_submit_and_aio() -> None:
    future = sf.square.submit(list(range(10)))
    assert future.result(30) == [n * n for n in range(10)]
    assert asyncio.run(sf.square.aio(list(range(5)), 1)) == [n * n + 1 for n in range(5)]


def test_remote_exception_carries_type_message_traceback_and_index() -> None:
    with pytest.raises(serverless.RemoteError) as info:
        sf.fail_on(list(range(300)), 123)
    exc = info.value
    assert (exc.type_name, exc.index, exc.item) == ("ValueError", 123, "123")
    assert "cannot handle 123" in exc.message and "cannot handle 123" in str(exc)
    assert "Traceback" in exc.traceback and "fail_on" in exc.traceback
    assert isinstance(exc.__cause__, serverless.RemoteTraceback)


def test_misuse_gives_clear_type_errors() -> None:
    with pytest.raises(TypeError, match="list or iterable"):
        sf.square(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list or iterable"):
        sf.square("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="first argument"):
        sf.square()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="decorated"):
        serverless.Pipeline(sf.square, cast(Any, sf.plain))
    with pytest.raises(serverless.SerializationError):
        sf.square([1], object())  # type: ignore[arg-type]
    with pytest.raises(serverless.SerializationError, match="must return a list"):
        sf.returns_none([1])
    with pytest.raises(serverless.SerializationError):
        sf.returns_object([1])


def test_pipeline_statistics_and_report() -> None:
    pipeline = serverless.Pipeline(sf.square, sf.Geo().total)
    run = pipeline.execute(list(range(10)))
    assert run.result == [sum(n * n for n in range(10)) * 10]
    assert [s.name for s in run.steps] == ["square", "total"]
    lines = run.report().splitlines()
    assert lines[2].startswith('  1 - Step "square" took ') and lines[2].endswith(
        "s for 10 workers and 10 elements"
    )
    assert lines[3].endswith("s for 1 worker and 10 elements")
    assert (
        run.steps[0].compute_s > 0 and run.steps[0].duration >= run.steps[0].chunks[-1].end * 0.99
    )
    assert pipeline.run(list(range(3))) == [50]
    assert sf.square.count == 3 and sf.square.workers == 3


def test_url_without_secret_is_a_configuration_error(
    reset_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SERVERLESS_SECRET", raising=False)
    # no secret from an earlier test's init() in this process either (test_security.py's)
    _config.configure(keyring=None)
    fn = serverless.parallel(url="http://127.0.0.1:9/serverless")(sf.square.__wrapped__)  # type: ignore[attr-defined]
    with pytest.raises(serverless.ConfigurationError, match="secret"):
        fn([1])


def test_unreachable_worker_names_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVERLESS_SECRET", "x" * 32)
    url = f"http://127.0.0.1:{free_port()}/serverless"
    fn = serverless.parallel(url=url, retries=1)(sf.square.__wrapped__)  # type: ignore[attr-defined]
    with pytest.raises(serverless.WorkerUnavailable) as info:
        fn([1, 2])
    assert info.value.url == url and url in str(info.value)


MAIN_SCRIPT = """
import os, sys, time
import serverless

@serverless.parallel
def shout(words, suffix):
    return [w.upper() + suffix for w in words]

class Counter:
    @serverless.parallel(workers=4)
    def lengths(self, words):
        return [len(w) for w in words]

if __name__ == "__main__":
    print(shout(["a", "bc"], "!"))
    print(Counter().lengths(["x", "yy", "zzz"]))
    if len(sys.argv) > 1:  # report the workers' pids, then wait to be killed
        from serverless._pool import pool as _pool
        print("PIDS", " ".join(str(pid) for pid in _pool._pool.pids), flush=True)
        time.sleep(60)
"""


def run_script(tmp_path: Path, source: str, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=test_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_functions_in_main_script_and_its_classes(tmp_path: Path) -> None:
    out, err = run_script(tmp_path, MAIN_SCRIPT).communicate(timeout=60)
    assert out.splitlines() == ["['A!', 'BC!']", "[1, 2, 3]"], err


def test_no_orphans_when_the_caller_is_killed(tmp_path: Path) -> None:
    proc = run_script(tmp_path, MAIN_SCRIPT, "wait")
    assert proc.stdout is not None
    line = ""
    while not line.startswith("PIDS"):
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
    pids = [int(p) for p in line.split()[1:]]
    assert pids
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_script_without_main_guard_works_and_its_top_level_runs_once(tmp_path: Path) -> None:
    # Workers never import the script (its functions reach them by value), so its own work
    # (the print, the call) never runs in a worker. tests/integration/test_by_value.py counts.
    source = """
        import serverless
        print("top level")

        @serverless.parallel
        def f(xs):
            return [x + 1 for x in xs]

        print(f([1, 2]))
        print(f([3]))
    """
    proc = run_script(tmp_path, source)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["top level", "[2, 3]", "[4]"]


def test_a_script_that_fails_at_import_still_gets_its_functions(tmp_path: Path) -> None:
    source = """
        import sys
        import serverless

        @serverless.parallel
        def f(xs):
            return [x * 3 for x in xs]

        if sys.argv[1:] != ["go"]:
            raise SystemExit("usage: script.py go")  # never runs in a worker
        print(f([1, 2]))
    """
    out, err = run_script(tmp_path, source, "go").communicate(timeout=90)
    assert out.splitlines() == ["[3, 6]"], err


def test_a_function_with_a_non_ascii_name_runs_on_the_pool() -> None:
    # the caller sends the name's UTF-8 bytes in the signed Serverless-Function header (it
    # raised UnicodeEncodeError building the request head before)
    assert sf.квадрат([2, 3]) == [4, 9]


def test_a_call_wider_than_select_can_watch_keeps_the_pool_alive() -> None:
    """Issue 22: with more than 1,024 descriptors open in the caller (a wide call holds one
    connection per chunk in flight), the pool's probe used select(), which raises on any
    descriptor above 1,023: the pool's thread died and every worker with it. 1,100 files are
    held open so the probe's sockets are numbered above it, then a call 2,000 wide runs, and
    the pool still serves after several probe rounds."""
    held = [open(os.devnull, "rb") for _ in range(1100)]  # noqa: SIM115
    try:
        wide = sf.sleepy.with_options(workers=2000, chunk_size=1)
        assert wide([0.01] * 2000) == [0.01] * 2000
        time.sleep(1.5)  # three rounds of the pool's thread, each probing every worker
        assert sf.square(list(range(10))) == [n * n for n in range(10)]
    finally:
        for handle in held:
            handle.close()


WIDE_SCRIPT = """
import sys
from tests import sample_functions as sf

if __name__ == "__main__":
    width = int(sys.argv[1])
    assert sf.square([2]) == [4]  # a pool that served before: its workers' capacity is known
    wide = sf.sleepy.with_options(workers=width, chunk_size=1)
    assert wide([0.01] * width) == [0.01] * width
    print("OK", wide.stats.workers if wide.stats else 0, flush=True)
"""


def _file_limits(soft: int, hard: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("width", [2000, 10000])
def test_a_call_as_wide_as_its_items_completes_at_the_usual_open_files_limits(
    tmp_path: Path, width: int
) -> None:
    """Issue 22: one-item chunks all in flight at once, in a caller whose soft limit is the
    usual 1,024 open files and whose hard limit (4,096) is below the call's width. Before,
    the call failed with "Too many open files" (10,000: always; the pool's probe too). The
    pool lifts the soft limit in the caller and its workers, and at the hard limit a
    connection waits for one to end instead of failing."""
    script = tmp_path / "wide.py"
    script.write_text(WIDE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(width)],
        env=test_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        preexec_fn=lambda: _file_limits(1024, 4096),  # only a setrlimit after fork
    )
    assert proc.returncode == 0 and f"OK {width}" in proc.stdout, proc.stderr[-3000:]


def test_a_round_of_the_pools_thread_that_raises_anything_leaves_the_workers_alive() -> None:
    """The pool's thread is the workers' parent for PR_SET_PDEATHSIG: its death killed every
    worker. A round that raises even SystemExit is logged and tried again."""
    from serverless import _targets
    from serverless._pool import pool as _pool

    pool = _pool.LocalPool(2, 4, ["tests.sample_functions"])
    pool.start()
    try:
        pids = pool.pids
        failures = [SystemExit(3), RuntimeError("a bug"), KeyboardInterrupt()]
        original = pool._probe

        def failing_probe() -> None:
            if failures:
                raise failures.pop(0)
            original()

        pool._probe = failing_probe  # type: ignore[method-assign]
        deadline = time.monotonic() + 20
        while failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not failures
        time.sleep(2 * _pool.WATCH_INTERVAL)  # a round after the last failure has run
        assert pool.pids == pids and all(_alive(pid) for pid in pids)
        target = pool.target()
        with _targets.override(target):
            assert set(sf.pids.with_options(workers=4)(list(range(8)))) <= set(pids)
    finally:
        pool.close()


def test_fifty_threads_each_with_the_default_width_all_complete() -> None:
    """Issue 22.10: 50 threads, each calling with the default workers=100 at once, on the
    embedded pool. Before the pool used selectors and Unix sockets, 12 such threads killed
    the pool's thread (select() and descriptors over 1,024) and every later call hung."""
    import threading

    assert sf.square([1]) == [1]  # the pool is up
    results: dict[int, object] = {}
    lock = threading.Lock()

    def caller(k: int) -> None:
        items = list(range(k, k + 400))
        try:
            out: object = sf.square(items)
            out = out == [n * n for n in items]
        except BaseException as exc:  # reported below
            out = exc
        with lock:
            results[k] = out

    started = time.monotonic()
    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, 120 - (time.monotonic() - started)))
    assert len(results) == 50, f"{50 - len(results)} calls still running after 120 s"
    assert all(out is True for out in results.values()), results
    assert sf.square([3]) == [9]  # the pool survived
