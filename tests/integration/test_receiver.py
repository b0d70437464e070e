"""Issue 23, item 4, on real worker processes: an instance method's receiver keeps its state
(an __init__ with a required argument, which never runs on a worker) on the embedded local
pool and on `serverless worker`; a receiver that cannot travel is refused before any request
(the worker runs nothing)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

import serverless
from tests import receiver_functions as rf
from tests.conftest import SECRET, free_port, server

pytestmark = pytest.mark.timeout(120)

WORKER = ["serverless._cli", "worker", "tests.receiver_functions", "--log-level", "warning"]


def _stateful(log: Path) -> None:
    scaler = rf.Scaler(10, str(log))
    assert scaler.scale([1, 2, 3]) == [10, 20, 30]
    assert rf.Scaler.scale(scaler, [4]) == [40]
    assert scaler.signed([5]) == [-50]
    assert rf.Slotted(2).scale([1]) == [[6, False]]
    priced = rf.Priced(Decimal("0.5"), datetime.date(2020, 1, 2), frozenset({"x"}))
    assert priced.price([3]) == ["1.5 EUR 2020"]
    assert rf.FrozenSlots(4).scale([1]) == ["x4"]
    assert rf.Reconnecting("r").greet([1]) == ["r1"]
    lines = log.read_text().splitlines()
    assert lines.count("init") == 1 and lines.count("scale") >= 2  # __init__: here only
    with pytest.raises(serverless.SerializationError, match=r"`Holding\.conn`"):
        rf.Holding(str(log)).run([1, 2])
    assert "run" not in log.read_text().splitlines()


def test_on_the_local_pool(tmp_path: Path) -> None:
    _stateful(tmp_path / "log")


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    port = free_port()
    with server([*WORKER, "--port", str(port)], port):
        yield f"http://127.0.0.1:{port}/serverless"


@pytest.mark.usefixtures("reset_settings")
def test_on_serverless_worker(worker: str, tmp_path: Path) -> None:
    serverless.init(secret=SECRET, url=worker)
    _stateful(tmp_path / "log")
    assert rf.Scaler.scale.stats is not None and rf.Scaler.scale.stats.target == "url"
