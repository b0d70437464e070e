"""The demo page live (issue 25.6): `serverless demo --web` streams a run's progress on the
request that runs it (its uvicorn processes share one port, so a second request could reach
another process), and the page, in a real headless Chromium at 1280 and 390 px, shows it
growing during the run, then the figures, with nothing wider than the viewport."""

from __future__ import annotations

import itertools
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, server

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="needs Debian's chromium at /usr/bin/chromium (scripts/system-deps installs it)",
)
# 300 lookups at 50 ms, 10 chunks in flight: the page sends each worker's share in 5 chunks
# (serverless.demo.web.LIVE_SHARE), 50 chunks of 6 answered in waves over about 1.5 s
RUN = {"count": "300", "workers": "10", "latency": "0.05", "seed": "4"}
SPEEDUP = re.compile(
    r"Speedup = (\d+\.\d)X \(against \d+ serial lookups measured at \d+\.\d ms each\)"
)


@pytest.fixture(scope="module")
def web_demo() -> Iterator[str]:
    port = free_port()
    args = ["serverless._cli", "demo", "--web", "--port", str(port), "--processes", "2"]
    with server(args, port):
        yield f"http://127.0.0.1:{port}"


def stream(url: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(url, method="POST", headers={"Accept": "application/x-ndjson"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response]


def test_the_run_streams_its_progress_then_its_figures(web_demo: str) -> None:
    """One message per line: the serial sample, progress events whose new chunks are each
    chunk of the run once (as the figures' timeline has them), then the figures."""
    messages = stream(f"{web_demo}/api/run?{'&'.join(f'{k}={v}' for k, v in RUN.items())}")
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "serial" and kinds[-1] == "result"
    assert set(kinds[1:-1]) == {"progress"}
    events = messages[1:-1]
    figures = messages[-1]["figures"]
    lookups = [e for e in events if e["step_number"] == 1]
    assert {e["step"] for e in lookups} == {"geolocate+cleanup"}  # fused: one step's events
    counts = [e["chunks_done"] for e in lookups]
    assert counts == sorted(counts) and counts[-1] == 50 and lookups[-1]["finished"]
    assert len(set(counts)) >= 3  # answered along the run, not all at its end
    streamed = [c for e in lookups for c in e["chunks"]]
    assert sorted(c["index"] for c in streamed) == list(range(50))  # each chunk once
    assert len(figures["timeline"]) == 50 and figures["speedup_basis"] == "serial"
    assert {c["worker"] for c in streamed} == {c["worker"] for c in figures["timeline"]}
    assert len({c["worker"] for c in streamed}) == 2  # called back into both processes
    # the live bars sit where the figures put them (the run's clock, not the step's)
    final = {c["index"]: c for c in figures["timeline"]}
    assert all(abs(c["start"] - final[c["index"]]["start"]) < 0.05 for c in streamed)
    assert SPEEDUP.fullmatch(figures["report"].splitlines()[4])
    sort = [e for e in events if e["step_number"] == 3]
    assert sort[-1]["finished"] and sort[-1]["done"] == len(figures["addresses"])


def test_scripts_get_the_figures_alone(web_demo: str) -> None:
    """Without Accept: application/x-ndjson, the answer is the figures, as before."""
    request = urllib.request.Request(
        f"{web_demo}/api/run?count=20&workers=4&latency=0", method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "application/json"
        figures = json.load(response)
    assert figures["count"] == 20 and len(figures["steps"]) == 3


# Records, at each change of the page, the first step's chunks-done figure, the timeline's
# bars and whether the report is out yet.
WATCH = """() => {
  window.seen = [];
  const record = () => {
    const chunks = document.querySelector('#live .step[data-number="1"] .chunks');
    window.seen.push({
      chunks: chunks ? Number(chunks.textContent) : null,
      bars: document.querySelectorAll("#timeline rect.chunk").length,
      done: !document.getElementById("report").classList.contains("empty"),
    });
  };
  new MutationObserver(record).observe(document.body,
    { subtree: true, childList: true, characterData: true, attributes: true });
}"""

DONE = "!document.getElementById('report').classList.contains('empty')"

# Every visible element whose box reaches past the viewport's sides.
OVERFLOW = """() => [...document.querySelectorAll("body *")].filter((e) => {
  const r = e.getBoundingClientRect(), style = getComputedStyle(e);
  return r.width > 0 && r.height > 0 && style.visibility !== "hidden" &&
    (r.right > window.innerWidth + 0.5 || r.left < -0.5);
}).map((e) => `${e.tagName}#${e.id}.${e.getAttribute("class")}`)"""

BOXES = """() => Object.fromEntries(["form", "report", "timeline", "addresses"].map(
  (id) => { const r = document.getElementById(id).closest("section").getBoundingClientRect();
            return [id, [r.left, r.top, r.right, r.bottom]]; }))"""


@needs_chromium
@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)])
def test_the_page_shows_the_run_growing_then_its_figures(
    web_demo: str, tmp_path: Path, width: int, height: int
) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(web_demo + "/")
            for name, value in RUN.items():
                page.fill(f"input[name={name}]", value)
            page.evaluate(WATCH)
            page.click("#run")
            page.wait_for_selector("#timeline rect.chunk", timeout=30_000)
            page.screenshot(path=str(tmp_path / f"during-{width}.png"), full_page=True)
            during = {
                "overflow": page.evaluate(OVERFLOW),
                "scroll": page.evaluate("document.documentElement.scrollWidth"),
                "done": page.evaluate(
                    "!document.getElementById('report').classList.contains('empty')"
                ),
            }
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('Done')",
                timeout=60_000,
            )
            page.screenshot(path=str(tmp_path / f"after-{width}.png"), full_page=True)
            seen: list[dict[str, Any]] = page.evaluate("window.seen")
            overflow = page.evaluate(OVERFLOW)
            scroll = page.evaluate("document.documentElement.scrollWidth")
            boxes = page.evaluate(BOXES)
            svg = page.evaluate(
                "[document.querySelector('#timeline svg').getBoundingClientRect().width,"
                " document.getElementById('timeline').clientWidth]"
            )
            report = page.inner_text("#report")
            big = page.inner_text("#speedup")
            bars = page.locator("#timeline rect.chunk").count()
            resolved = page.locator("#addresses div").count()
        finally:
            browser.close()
    assert not errors
    assert all(url.startswith(web_demo) for url in requests)  # nothing from the internet

    # during the run: the chunks-done figure rose through several values and bars appeared
    # before the figures came
    live = [s for s in seen if not s["done"]]
    counts = [s["chunks"] for s in live if s["chunks"]]
    assert len(set(counts)) >= 2 and counts == sorted(counts), counts
    assert len({s["bars"] for s in live if s["bars"]}) >= 2 and not during["done"]
    # after it: the figures, the headline against serial lookups, every chunk's bar
    lines = report.splitlines()
    assert lines[:2] == ["*Serverless Pipeline Demo*", "Number of zipcodes = 300"]
    match = SPEEDUP.fullmatch(lines[4])
    assert match and big == f"{match[1]}X faster", (lines[4], big)
    assert "the workers (self, 2 processes)" in report  # the app called back into itself
    assert bars == 50 and 0 < resolved < 300

    # nothing wider than the viewport, during the run and after it
    assert during["overflow"] == [] and overflow == [], (during["overflow"], overflow)
    assert during["scroll"] <= width and scroll <= width
    assert svg[0] == pytest.approx(svg[1], abs=1)  # the timeline drawn at its box's width
    report_box, timeline_box = boxes["report"], boxes["timeline"]
    if width >= 1000:  # side by side: the timeline twice as wide as the report
        assert report_box[1] == timeline_box[1] and report_box[2] <= timeline_box[0]
        ratio = (timeline_box[2] - timeline_box[0]) / (report_box[2] - report_box[0])
        assert ratio == pytest.approx(2, rel=0.1)
    else:  # one column, each card the width of the page less its margins
        order = [boxes[k] for k in ("form", "report", "timeline", "addresses")]
        assert all(a[3] <= b[1] for a, b in itertools.pairwise(order))
        assert all(b[0] >= 0 and b[2] <= width and b[2] - b[0] >= width - 40 for b in order)
    for name in ("during", "after"):
        assert (tmp_path / f"{name}-{width}.png").stat().st_size > 0
