"""Issue 17, the demo's quota: the geocoder's token bucket and Retry-After, on a fake clock;
and aiohttp, the geocoder's server, stays out of the library (it is in the `demo` extra)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import serverless
from serverless import ConfigurationError
from serverless.demo.quota import TokenBucket, parse_quota, retry_after


def test_the_bucket_allows_a_second_of_the_quota_then_the_quota() -> None:
    bucket = TokenBucket(200.0, now=0.0)
    assert bucket.capacity == 200.0
    assert [bucket.take(0.0) for _ in range(200)] == [None] * 200  # a quiet client's burst
    assert bucket.take(0.0) == pytest.approx(1 / 200)  # refused: a token is due in 5 ms
    served = sum(bucket.take(n / 1000) is None for n in range(1, 10_001))  # 1,000/s for 10 s
    assert served == pytest.approx(2000, abs=1)  # 200/s, not more
    later = TokenBucket(200.0, now=0.0)
    for _ in range(200):
        later.take(0.0)
    assert later.take(60.0) is None  # refilled, but never beyond its capacity:
    assert sum(later.take(60.0) is None for _ in range(300)) == 199


def test_a_slow_quota_still_holds_one_token() -> None:
    bucket = TokenBucket(0.5, now=0.0)  # 30/min
    assert bucket.capacity == 1.0
    assert bucket.take(0.0) is None
    assert bucket.take(0.0) == pytest.approx(2.0)
    assert bucket.take(1.0) == pytest.approx(1.0)
    assert bucket.take(2.0) is None


@pytest.mark.parametrize(("wait", "header"), [(0.005, "1"), (1.0, "1"), (1.01, "2"), (2.0, "2")])
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(wait: float, header: str) -> None:
    assert retry_after(wait) == header
    assert serverless.Throttled(retry_after=header).retry_after == float(header)


def test_a_quota_is_a_figure() -> None:
    assert parse_quota("200/s") == 200.0
    assert parse_quota("3000/min") == 50.0
    assert parse_quota(20) == 20.0
    for bad in ("auto", "0/s", "fast"):
        with pytest.raises(ConfigurationError):
            parse_quota(bad)


def test_only_the_demos_geocoder_imports_aiohttp() -> None:
    src = Path(serverless.__file__).parent
    importers = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name.split(".")[0] == "aiohttp" for name in names):
                importers.add(path.relative_to(src).as_posix())
    assert importers == {"demo/geocoder.py"}
