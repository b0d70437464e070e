"""`serverless demo`, run as a user runs it: the console script in a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import test_env


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serverless._cli", "demo", *args],
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_report_has_the_seeds_format() -> None:
    done = demo("--count", "300", "--workers", "20", "--latency", "0.01", "--seed", "7")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["*Serverless Pipeline Demo*", "Number of zipcodes = 300"]
    assert re.fullmatch(r"Regular duration = \d+\.\d\ds", lines[2])
    assert re.fullmatch(r"Parallel duration = \d+\.\d\ds", lines[3])
    # the headline speedup is against lookups really made one after the other
    assert re.fullmatch(
        r"Speedup = \d+\.\dX \(against \d+ serial lookups measured at \d+\.\d ms each\)",
        lines[4],
    )
    assert lines[5] == "Details per pipeline step:"
    assert re.fullmatch(
        r'  1 - Step "geolocate" took \d+\.\d\ds for 20 workers and 300 elements', lines[6]
    )
    assert re.fullmatch(
        r'  2 - Step "cleanup" took \d+\.\d\ds for 20 workers and 300 elements'
        r" \(in the same requests as step 1\)",
        lines[7],
    )
    assert re.fullmatch(
        r'  3 - Step "sort" took \d+\.\d\ds for 1 worker and \d+ elements', lines[8]
    )


def test_demo_json_is_measured_and_repeatable() -> None:
    first = json.loads(
        demo(
            "--count", "200", "--workers", "10", "--latency", "0.01", "--seed", "3", "--json"
        ).stdout
    )
    second = json.loads(
        demo(
            "--count", "200", "--workers", "10", "--latency", "0.01", "--seed", "3", "--json"
        ).stdout
    )
    assert first["addresses"] == second["addresses"]  # the seed makes the zipcodes repeatable
    assert first["addresses"] == sorted(first["addresses"], key=lambda a: a.split(" => ")[1])
    # every lookup waited 10 ms: the serial-equivalent time is at least 200 x 10 ms
    assert first["regular_duration"] >= 2.0
    geolocate = first["steps"][0]
    assert (geolocate["count"], geolocate["count_out"], geolocate["workers"]) == (200, 200, 10)
    assert geolocate["compute_s"] >= 2.0
    assert first["speedup"] == first["regular_duration"] / first["parallel_duration"]
    # against a serial sample: 200 lookups at its mean (and the other steps' compute)
    serial = first["serial"]
    assert first["speedup_basis"] == "serial" and 3 <= serial["sample"] <= 20
    assert serial["serial_mean_s"] >= 0.01
    rest = first["compute_duration"] - geolocate["compute_s"]
    assert first["regular_duration"] == pytest.approx(200 * serial["serial_mean_s"] + rest)
    assert first["speedup_compute"] == pytest.approx(
        first["compute_duration"] / first["parallel_duration"]
    )


def test_demo_rejects_bad_options() -> None:
    done = demo("--workers", "0")
    assert done.returncode == 2 and "--workers" in done.stderr


def test_library_errors_are_a_message_not_a_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serverless._cli", "demo", "--url", "http://127.0.0.1:9/x"],
        env=test_env(SERVERLESS_SECRET="short"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("serverless demo: each secret must be a string of at least 16")
    assert "Traceback" not in done.stderr
