"""The caller's Prometheus metrics (issue 25.4): what a scrape with prometheus_client's own
parser reads during and after calls through the in-process transport, with bounded labels;
prometheus_client missing is a ConfigurationError naming the extra."""

from __future__ import annotations

import re
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import serverless
from serverless import WorkerUnavailable, _targets
from serverless._caller import metrics as _metrics
from serverless._caller.http import Body
from serverless._caller.inprocess import InProcess
from serverless._caller.transport import Target
from serverless._wire import Keyring, Response
from serverless._worker.endpoint import Endpoint
from tests.conftest import SECRET
from tests.telemetry_functions import fails_on_three, plus_one
from tests.unit.conftest import ROUTE, URLS

GATE = threading.Event()
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@serverless.parallel(workers=4, chunk_size=2)
def held(numbers: list[int]) -> list[int]:
    """Waits for GATE: a call that stays in flight while the test scrapes."""
    GATE.wait(10)
    return [n + 1 for n in numbers]


HELD, PLUS, FAILS = held.entry.name, plus_one.entry.name, fails_on_three.entry.name
P = _metrics.PREFIX


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> prometheus_client.CollectorRegistry:
    """A registry of the test's own, with the caller's metrics on for this test only."""
    monkeypatch.setattr(_metrics, "_meter", None)
    monkeypatch.setattr(_metrics, "_collector", None)
    monkeypatch.setattr(_metrics, "_registries", weakref.WeakSet())
    registry = prometheus_client.CollectorRegistry()
    serverless.caller_metrics(registry)
    return registry


def scrape(registry: prometheus_client.CollectorRegistry) -> Samples:
    """Every sample, through prometheus_client's exposition and its parser."""
    text = prometheus_client.generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, function: str, outcome: str | None = None) -> float:
    labels = {"function": function}
    if outcome is not None:
        labels["outcome"] = outcome
    return samples.get((P + name, tuple(sorted(labels.items()))), 0.0)


def test_a_scrape_during_a_call_sees_it_running_and_after_it_counted(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    GATE.clear()
    future = held.submit(list(range(8)))  # 4 chunks of 2, all in flight until GATE opens
    try:
        deadline = time.monotonic() + 10
        while (during := scrape(registry)) and value(during, "chunks_in_flight", HELD) < 4:
            assert time.monotonic() < deadline, during
            time.sleep(0.01)
    finally:
        GATE.set()
    assert future.result(timeout=10) == list(range(1, 9))
    assert value(during, "calls_running", HELD) == 1
    assert value(during, "window", HELD) == 4  # workers=4: nothing learned shrank it
    assert value(during, "calls_started_total", HELD) == 1
    assert value(during, "calls_finished_total", HELD, "ok") == 0
    after = scrape(registry)
    assert value(after, "calls_finished_total", HELD, "ok") == 1
    assert value(after, "calls_running", HELD) == 0
    assert value(after, "chunks_in_flight", HELD) == 0
    assert value(after, "chunks_sent_total", HELD) == 4
    assert value(after, "chunks_answered_total", HELD) == 4
    assert value(after, "items_sent_total", HELD) == 8
    assert value(after, "results_total", HELD) == 8
    assert value(after, "requests_total", HELD, "ok") == 4
    assert value(after, "request_seconds_count", HELD) == 4
    assert value(after, "request_seconds_sum", HELD) > 0
    assert value(after, "retries_total", HELD) == 0


class FailsFirst(InProcess[Endpoint]):
    """The first request never reaches the worker: a 502 from the front, as a balancer
    whose upstream died answers."""

    async def post(
        self,
        url: str,
        body: Body,
        headers: Mapping[str, str],
        timeout: float,
        *,
        fresh: bool = False,
    ) -> Response:
        if self.requests == 0:
            self.requests += 1
            raise WorkerUnavailable("bad gateway", url=url, status=502)
        return await super().post(url, body, headers, timeout)


@pytest.fixture
def fails_first() -> Iterator[FailsFirst]:
    keyring = Keyring(SECRET)
    transport = FailsFirst(Endpoint(ROUTE, keyring))
    with _targets.override(Target(URLS, ROUTE, keyring, "in-process", transport=transport)):
        yield transport
    transport.close()


def test_a_retry_counts_as_a_request_retried_not_as_another_chunk(
    registry: prometheus_client.CollectorRegistry, fails_first: FailsFirst
) -> None:
    assert plus_one.with_options(workers=1)(list(range(6))) == list(range(1, 7))
    after = scrape(registry)
    assert value(after, "chunks_sent_total", PLUS) == 3
    assert value(after, "requests_total", PLUS, "retried") == 1
    assert value(after, "retries_total", PLUS) == 1
    assert value(after, "requests_total", PLUS, "ok") == 3
    assert value(after, "items_sent_total", PLUS) == 8  # the retried chunk's 2 sent again
    assert value(after, "results_total", PLUS) == 6


def test_failed_and_closed_calls_are_told_apart(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    with pytest.raises(serverless.RemoteError):
        fails_on_three(list(range(6)))
    stream = plus_one.with_options(chunk_size=1, workers=1).stream(list(range(50)))
    assert next(stream) == 1
    stream.close()  # type: ignore[attr-defined]  # closed early: neither ok nor failed
    returned = fails_on_three.with_options(errors="return")(list(range(6)))
    assert isinstance(returned[3], serverless.RemoteError)
    after = scrape(registry)
    assert value(after, "calls_finished_total", FAILS, "failed") == 1
    assert value(after, "calls_finished_total", FAILS, "ok") == 1  # errors="return"
    assert value(after, "items_failed_total", FAILS) == 1
    assert value(after, "calls_finished_total", PLUS, "closed") == 1
    assert value(after, "calls_started_total", PLUS) == 1


def test_labels_are_bounded_to_the_function_and_a_few_outcomes(
    registry: prometheus_client.CollectorRegistry, fails_first: FailsFirst
) -> None:
    plus_one(list(range(10)))
    with pytest.raises(serverless.RemoteError):
        fails_on_three(list(range(6)))
    outcomes = set(_metrics.CALL_OUTCOMES) | set(_metrics.REQUEST_OUTCOMES)
    samples = scrape(registry)
    assert samples
    for name, labels in samples:
        assert name.startswith(P)
        keys = dict(labels)
        assert set(keys) <= {"function", "outcome"}, name
        assert keys["function"] in {PLUS, FAILS}, keys
        assert keys.get("outcome", "ok") in outcomes, keys
        for label in keys.values():  # never a URL, a port, a request id
            assert "//" not in label and not re.search(r":\d+|[0-9a-f]{16}", label), label


def test_turning_metrics_on_twice_registers_once_and_returns_the_same_collector(
    registry: prometheus_client.CollectorRegistry,
) -> None:
    collector = serverless.caller_metrics(registry)
    assert serverless.caller_metrics(registry) is collector  # no "Duplicated timeseries"
    other = prometheus_client.CollectorRegistry()
    assert serverless.caller_metrics(other) is collector
    plus_one([1, 2])
    assert value(scrape(other), "calls_started_total", PLUS) == 1
    assert value(scrape(registry), "calls_started_total", PLUS) == 1


def test_without_prometheus_client_turning_metrics_on_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_metrics, "_meter", None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(serverless.ConfigurationError, match=r"simple-serverless\[metrics\]"):
        serverless.caller_metrics()
    assert _metrics.meter() is None


def test_a_meter_that_fails_is_dropped_and_the_call_returns_every_result(
    registry: prometheus_client.CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: Any, request: Any, outcome: Any) -> None:
        raise RuntimeError("a broken meter")

    monkeypatch.setattr(_metrics.CallMeter, "ended", broken)
    with caplog.at_level("WARNING", logger="serverless"):
        assert plus_one(list(range(20))) == list(range(1, 21))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "observer" in warnings[0].getMessage()
