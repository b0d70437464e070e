"""`serverless demo --cache FILE`: every lookup stored in a real SQLite file; a rerun asks the
geocoder (counted by the geocoder itself, per code) for no code already resolved, and a run
killed mid-way (SIGKILL, or Ctrl-C) then run again resolves the rest."""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zipcodes

from serverless.demo import pipeline
from serverless.demo.geocoder import Geocoder, lookups_per_code, lookups_served
from tests.conftest import test_env

DEMO = [sys.executable, "-m", "serverless._cli", "demo"]
CACHE_LINE = re.compile(r"Cache = (.+): (\d+) lookups from the store, (\d+) sent to the geocoder")


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*DEMO, *args], env=test_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def expected_addresses(count: int, seed: int) -> list[str]:
    """The demo's final output, from the dataset itself: the known codes, sorted by address."""
    entries = []
    for code in pipeline.zipcodes(count, seed):
        [record] = zipcodes.matching(f"{code:05d}") or [None]
        if record is not None:
            address = f"{record['city']}, {record['state']} {code:05d}, USA"
            entries.append((address, f"{code:05d} => {address}"))
    return [line for _, line in sorted(entries, key=lambda entry: entry[0])]


def test_a_rerun_asks_the_geocoder_for_no_code_already_resolved(tmp_path: Path) -> None:
    """Run 1 resolves 300 codes; run 2, the same command (its own geocoder, on a new port),
    makes no lookup at all and prints the same addresses; run 3, 400 codes of the same seed
    (the first 300 are run 1's), asks a geocoder that counts per code only for the new ones."""
    store = str(tmp_path / "lookups.db")
    common = ["--workers", "10", "--latency", "0.01", "--seed", "9", "--cache", store]
    first = json.loads(demo("--count", "300", *common, "--json").stdout)
    assert first["cache"] == {"location": store, "hits": 0, "sent": 300, "error": None}
    assert first["service"]["lookups"] == 300
    assert first["addresses"] == expected_addresses(300, 9)

    second = demo("--count", "300", *common).stdout
    match = CACHE_LINE.search(second)
    assert match and match.groups() == (store, "300", "0"), second
    assert "(the geocoder counted 0 lookups during the run)" in second
    # no speedup made up from nothing sent (it printed "Speedup = 0.0X")
    assert "Speedup = none measured: every lookup came from the store" in second

    codes = pipeline.zipcodes(400, 9)
    old = set(codes[:300])
    with Geocoder(latency=0.01) as url:
        third = json.loads(demo("--count", "400", *common, "--geocoder", url, "--json").stdout)
        asked = lookups_per_code(url)
    new = [code for code in codes[300:] if code not in old]
    assert not old & {int(code) for code in asked}  # no request for a code already resolved
    assert asked == dict(collections.Counter(f"{code:05d}" for code in new))
    assert third["cache"]["hits"] == 400 - len(new) and third["cache"]["sent"] == len(new)
    assert third["service"]["lookups"] == len(new)
    assert third["addresses"] == expected_addresses(400, 9)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
def test_a_run_stopped_mid_way_then_run_again_resolves_each_code_once(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """600 codes, 4 workers, chunks of 15 lookups of 20 ms. The demo is stopped (kill -9, or
    Ctrl-C) once the geocoder has answered half of them; run again, it sends only what was
    not stored: over both runs each code is looked up once, but for those in flight at the
    stop (at most 4 chunks of 15) and an answer not yet stored, and the output is whole."""
    count, workers, chunk = 600, 4, 15  # chunk: pipeline.run's size for 600 codes, 4 workers
    store = str(tmp_path / "lookups.db")
    with Geocoder(latency=0.02) as url:
        args = [*DEMO, "--count", str(count), "--workers", str(workers), "--seed", "5"]
        args += ["--geocoder", url, "--cache", store, "--json"]
        run = subprocess.Popen(
            args, env=test_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 60
            while lookups_served(url) < count // 2 and run.poll() is None:
                assert time.monotonic() < deadline, "the demo made no progress"
                time.sleep(0.01)
            run.send_signal(stop)
            _, stderr = run.communicate(timeout=30)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(10)
        if stop == signal.SIGKILL:
            assert run.returncode == -signal.SIGKILL
        else:
            assert run.returncode == 130, stderr
            assert "run the same command again to finish the rest" in stderr
        time.sleep(0.5)  # the workers die with the demo: nothing more arrives
        killed = lookups_served(url)
        assert count // 2 <= killed < count  # stopped mid-way
        rerun: dict[str, Any] = json.loads(demo(*args[len(DEMO) :]).stdout)
        asked = lookups_per_code(url)
    cache = rerun["cache"]
    assert cache["hits"] + cache["sent"] == count and cache["error"] is None
    assert cache["hits"] >= count // 2 - 2 * workers * chunk  # the first run's answers, kept
    assert rerun["service"]["lookups"] == cache["sent"]
    wanted = collections.Counter(f"{code:05d}" for code in pipeline.zipcodes(count, 5))
    assert set(asked) == set(wanted)  # every code resolved
    # once per code, but for those lost in flight at the stop (a code drawn twice may be
    # looked up twice in one run, or once: its second draw found in the store)
    assert len(wanted) <= sum(asked.values()) <= count + workers * chunk + chunk
    assert rerun["addresses"] == expected_addresses(count, 5)  # whole, and in order
