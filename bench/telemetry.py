"""Issue 25.8's figures: what the caller's telemetry costs W1 and W3, on the local pool.

    python -m bench.telemetry [--parts tracing,off] [--rounds 5] [--quick]
                              [--baseline 4fea892] [--json PATH]

Parts:

    tracing  W1 (3,000 x 100 ms, 100 workers, chunks of 30) and W3 (300 sequential calls of
             one item: the round trip's p50 and p99) with tracing on and off in ONE caller
             process, interleaved: W1 a run of each in turn (which goes first alternates),
             W3 call by call. On: the OpenTelemetry SDK's TracerProvider, every span exported
             as it ends to an InMemorySpanExporter (SimpleSpanProcessor: the export on the
             dispatcher's loop, the dearest way). Off: the API with no SDK behind it, what a
             process has that imported opentelemetry but set no provider. The global provider's
             tracers are a switch: each span is the SDK's or the API's no-op one, as set.
             Targets: W1 within 2%, W3 within 5% (the ratio of the medians, on / off).
    off      everything off (no progress=, the log above DEBUG, OpenTelemetry never imported,
             no caller metrics) on this tree against the tree at each --baseline revision
             (default: before the observers, issue 25's groundwork), a caller process each
             (its own local pool), in turns, W1 and W3 in each: the median of the rounds'
             ratios, no change where their range holds 1.

The workers run untraced in both parts (no OTEL_* in their environment): the figures are the
caller's cost. Prints a markdown table and writes bench/results/telemetry.json. Needs the
OpenTelemetry SDK (`pip install .[test]`) for `tracing`, git for `off`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._run import FULL, QUICK, Sizes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGETS = {"W1": 1.02, "W3 p50": 1.05}  # on / off, at most
BASELINE = "4fea892"  # issue 25's groundwork: the envelope's trace field, no observers yet


# -- the workloads (in the caller's process) ---------------------------------------------------


def w1_run(sizes: Sizes) -> Callable[[], float]:
    """One W1 run, timed (the _run.py workload: chunks of w1_chunk, one worker per chunk)."""
    from . import _ours

    items = list(range(sizes.w1_items))
    step = _ours.wait.with_options(workers=sizes.w1_items // sizes.w1_chunk)
    step = step.with_options(chunk_size=sizes.w1_chunk)

    def run() -> float:
        started = time.perf_counter()
        out = step(items, sizes.w1_wait)
        wall = time.perf_counter() - started
        if out != items:
            raise AssertionError("W1: results lost, duplicated or out of order")
        return wall

    return run


def w3_call() -> Callable[[int], float]:
    """One W3 call (one item, a round trip), timed."""
    from . import _ours

    step = _ours.square.with_options(workers=100, chunk_size=1)

    def call(i: int) -> float:
        started = time.perf_counter()
        out = step([i])
        latency = time.perf_counter() - started
        if out != [i * i]:
            raise AssertionError(f"W3: {out} for {i}")
        return latency

    return call


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# -- tracing on and off in one process -------------------------------------------------------


MODES = ("off", "batch", "simple")  # the span processor in front of the in-memory exporter


class Switch:
    """The global tracer provider's tracers start the API's no-op spans (`off`: what a
    process gets where no SDK was set up), or the SDK's, from a provider whose spans go to
    an InMemorySpanExporter through a BatchSpanProcessor (`batch`: what an application
    configures) or a SimpleSpanProcessor (`simple`: exported as each ends, on the
    dispatcher's loop: the dearest)."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        self.exporters = {"batch": InMemorySpanExporter(), "simple": InMemorySpanExporter()}
        self.providers = {"batch": TracerProvider(), "simple": TracerProvider()}
        self.providers["batch"].add_span_processor(BatchSpanProcessor(self.exporters["batch"]))
        self.providers["simple"].add_span_processor(SimpleSpanProcessor(self.exporters["simple"]))
        self.mode = "off"
        switch, off = self, trace.NoOpTracer()

        class Tracer(trace.Tracer):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.real: dict[str, trace.Tracer] = {
                    mode: provider.get_tracer(*args, **kwargs)
                    for mode, provider in switch.providers.items()
                }
                self.real["off"] = off

            def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
                return self.real[switch.mode].start_span(*args, **kwargs)

            def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
                return self.real[switch.mode].start_as_current_span(*args, **kwargs)

        class Provider(trace.TracerProvider):
            def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
                return Tracer(*args, **kwargs)

        trace.set_tracer_provider(Provider())

    @contextlib.contextmanager
    def tracing(self, mode: str) -> Iterator[None]:
        self.mode = mode
        try:
            yield
        finally:
            self.mode = "off"

    def exported(self) -> dict[str, int]:
        """Spans exported since the last look (and let go of), by mode."""
        self.providers["batch"].force_flush()
        counts = {}
        for mode, exporter in self.exporters.items():
            counts[mode] = len(exporter.get_finished_spans())
            exporter.clear()
        return counts


def orders(n: int) -> Iterator[str]:
    """The modes in every order in turn, so none always follows the same one."""
    permutations = list(itertools.permutations(MODES))
    for i in itertools.count():
        yield from permutations[(i + n) % len(permutations)]


def tracing_part(sizes: Sizes, rounds: int) -> dict[str, Any]:
    switch = Switch()
    w1, w3 = w1_run(sizes), w3_call()
    for mode in MODES:  # the pool starts; every path warm
        with switch.tracing(mode):
            w1()
            for i in range(20):
                w3(i)
    switch.exported()
    walls: dict[str, list[float]] = {mode: [] for mode in MODES}
    latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
    spans = dict.fromkeys(MODES[1:], 0)
    for round_ in range(rounds):
        order = orders(round_)
        for _ in MODES:
            mode = next(order)
            with switch.tracing(mode):
                walls[mode].append(w1())
        calls = orders(round_)
        for i in range(sizes.w3_calls * len(MODES)):  # call by call
            mode = next(calls)
            with switch.tracing(mode):
                latencies[mode].append(w3(i))
        for mode, count in switch.exported().items():
            spans[mode] += count
    if not all(spans.values()):
        raise AssertionError(f"tracing on exported no spans: {spans}")
    return {"walls": walls, "latencies": latencies, "spans": spans}


def tracing_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    walls, latencies = result["walls"], result["latencies"]
    rows = []
    for mode in MODES[1:]:
        for name, figures, unit, scale, middle in (
            ("W1", walls, "s", 1.0, statistics.median),
            ("W3 p50", latencies, "ms", 1e3, statistics.median),
            ("W3 p99", latencies, "ms", 1e3, p99),
        ):
            off, on = middle(figures["off"]), middle(figures[mode])
            target = TARGETS.get(name)
            rows.append(
                {
                    "part": f"tracing ({mode})",
                    "workload": name,
                    "off": f"{off * scale:.3f} {unit}",
                    "on": f"{on * scale:.3f} {unit}",
                    "ratio": on / off,
                    "target": f"<= {target:.2f}" if target else "",
                    "ok": on / off <= target if target else None,
                    "runs": f"{len(figures[mode])} " + ("runs" if name == "W1" else "calls"),
                }
            )
    return rows


# -- everything off: this tree against the baseline ---------------------------------------------


def child(sizes: Sizes) -> dict[str, Any]:
    """One caller, nothing watching: a W1 run and the W3 calls, after a warm-up."""
    w1, w3 = w1_run(sizes), w3_call()
    w1()
    for i in range(20):
        w3(i)
    wall = w1()
    latencies = [w3(i) for i in range(sizes.w3_calls * 3)]
    if "opentelemetry" in sys.modules or "prometheus_client" in sys.modules:
        raise AssertionError("a telemetry package was imported with everything off")
    import serverless

    serverless.shutdown()
    return {"w1": wall, "w3_p50": statistics.median(latencies), "w3_p99": p99(latencies)}


def checkout(revision: str, into: Path) -> Path:
    """The library's source at `revision` (git archive of src/): its src directory."""
    archive = subprocess.run(
        ["git", "archive", revision, "src"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def off_part(sizes: Sizes, rounds: int, quick: bool, baselines: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        trees = {"this tree": ROOT / "src"}
        for revision in baselines:
            (Path(tmp) / revision).mkdir()
            trees[revision] = checkout(revision, Path(tmp) / revision)
        figures: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for round_ in range(rounds):
            names = list(trees)
            shift = round_ % len(names)  # which goes first turns round
            for name in names[shift:] + names[:shift]:
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join([str(trees[name]), str(ROOT)])
                env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
                env.pop("OTEL_TRACES_EXPORTER", None)
                cmd = [sys.executable, "-m", "bench.telemetry", "child"]
                done = subprocess.run(
                    cmd + (["--quick"] if quick else []),
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{name}: {done.stderr[-2000:]}")
                figures[name].append(json.loads(done.stdout.splitlines()[-1]))
    return figures


def off_rows(figures: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """This tree against each baseline, round by round (a pair ran one after the other):
    the median of the rounds' ratios, and no change where their range holds 1."""
    rows = []
    for baseline in [name for name in figures if name != "this tree"]:
        for key, name, unit, scale in (
            ("w1", "W1", "s", 1.0),
            ("w3_p50", "W3 p50", "ms", 1e3),
            ("w3_p99", "W3 p99", "ms", 1e3),
        ):
            before = [f[key] for f in figures[baseline]]
            after = [f[key] for f in figures["this tree"]]
            ratios = [a / b for a, b in zip(after, before, strict=True)]
            rows.append(
                {
                    "part": "all off",
                    "workload": name,
                    "off": f"{statistics.median(before) * scale:.3f} {unit} ({baseline})",
                    "on": f"{statistics.median(after) * scale:.3f} {unit}",
                    "ratio": statistics.median(ratios),
                    "target": f"1 within the rounds' {min(ratios):.3f}-{max(ratios):.3f}",
                    "ok": min(ratios) <= 1 <= max(ratios) if key != "w3_p99" else None,
                    "runs": f"{len(after)} processes each",
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| part | workload | off / baseline | on / this tree | ratio | target | ok | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "**NO**")
        lines.append(
            f"| {r['part']} | {r['workload']} | {r['off']} | {r['on']} | {r['ratio']:.3f} "
            f"| {r['target']} | {ok} | {r['runs']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        json.dump(child(QUICK if "--quick" in argv else FULL), sys.stdout)
        sys.stdout.write("\n")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="tracing,off")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--baseline", default=BASELINE, help="the revisions `off` compares (comma-separated)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "telemetry.json")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for part in args.parts.split(","):
        started = time.perf_counter()
        if part == "tracing":
            raw["tracing"] = tracing_part(sizes, args.rounds)
            rows += tracing_rows(raw["tracing"])
        elif part == "off":
            baselines = args.baseline.split(",")
            raw["off"] = off_part(sizes, args.rounds, args.quick, baselines)
            rows += off_rows(raw["off"])
        else:
            parser.error(f"unknown part {part!r}")
        sys.stderr.write(f"{part}: {time.perf_counter() - started:.0f} s\n")
    print(
        f"the caller's telemetry on the local pool; {platform.machine()}, {os.cpu_count()} "
        f"cores, Python {platform.python_version()}\n"
    )
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "raw": raw}, indent=2))
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
