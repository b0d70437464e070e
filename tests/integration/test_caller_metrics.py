"""The caller's Prometheus metrics with real parts (issue 25.4): served over HTTP by
prometheus_client and scraped with its parser during and after a call on the local pool;
off by default: a process that never turned them on imports no prometheus_client, neither
at `import serverless` nor when it calls."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
import weakref
from collections.abc import Iterator

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import serverless
from serverless._caller import metrics as _metrics
from tests import sample_functions as sf
from tests.conftest import TESTS, free_port, test_env

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SLEEPY = sf.sleepy.entry.name


@pytest.fixture
def metrics_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The caller's metrics on for this test, served on loopback as an application would
    (prometheus_client.start_http_server): the URL to scrape."""
    monkeypatch.setattr(_metrics, "_meter", None)
    monkeypatch.setattr(_metrics, "_collector", None)
    monkeypatch.setattr(_metrics, "_registries", weakref.WeakSet())
    registry = prometheus_client.CollectorRegistry()
    serverless.caller_metrics(registry)
    port = free_port()
    httpd, thread = prometheus_client.start_http_server(port, "127.0.0.1", registry)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (_metrics.PREFIX + name, tuple(sorted({"function": SLEEPY, **labels}.items())))
    return samples.get(key, 0.0)


def test_scraped_during_and_after_a_call_on_the_local_pool(metrics_url: str) -> None:
    sleepy = sf.sleepy.with_options(chunk_size=1, workers=4)
    future = sleepy.submit([0.3] * 24)  # 6 rounds of 4 chunks in flight
    deadline = time.monotonic() + 30
    while value(during := scrape(metrics_url), "chunks_in_flight") < 1:
        assert not future.done() and time.monotonic() < deadline, during
        time.sleep(0.02)
    assert future.result(timeout=60) == [0.3] * 24
    assert value(during, "calls_running") == 1
    assert 1 <= value(during, "chunks_in_flight") <= 4
    assert value(during, "window") == 4
    assert value(during, "calls_finished_total", outcome="ok") == 0
    after = scrape(metrics_url)
    assert value(after, "calls_started_total") == 1
    assert value(after, "calls_finished_total", outcome="ok") == 1
    assert value(after, "chunks_sent_total") == 24
    assert value(after, "chunks_answered_total") == 24
    assert value(after, "requests_total", outcome="ok") == 24
    assert value(after, "items_sent_total") == 24 and value(after, "results_total") == 24
    assert value(after, "calls_running") == 0 and value(after, "chunks_in_flight") == 0
    assert value(after, "request_seconds_sum") >= 24 * 0.3
    # bounded labels: a function, an outcome; no URL, socket path, port or request id
    for name, labels in after:
        assert set(dict(labels)) <= {"function", "outcome"}, name
        for label in dict(labels).values():
            assert "/" not in label and not re.search(r":\d+$|[0-9a-f]{16}", label), label


def test_off_by_default_nothing_imports_prometheus_client() -> None:
    script = (
        "import sys\n"
        "import serverless\n"
        "assert 'prometheus_client' not in sys.modules, 'imported by import serverless'\n"
        "from tests import sample_functions as sf\n"
        "assert sf.square(list(range(50))) == [n * n for n in range(50)]\n"
        "assert sf.square.with_options(progress=lambda e: None)([3]) == [9]\n"
        "assert 'prometheus_client' not in sys.modules, 'imported by a call'\n"
        "from serverless._caller import metrics\n"
        "assert metrics.meter() is None\n"
        "serverless.shutdown()\n"
        "print('clean')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=test_env(),
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr
