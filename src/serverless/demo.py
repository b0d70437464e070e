"""The seed's Serverless Pipeline Demo, ported to Python 3.

`geolocate` and `cleanup` run in parallel on workers, `sort` sequentially in the caller, as
in the seed. The geocoder here is simulated: each lookup waits `latency` seconds (standing
for the network call the seed made to a geocoding API) and derives an address from the code.
"""

from __future__ import annotations

import random
import time
from typing import Any

import serverless

STATES = ["AL", "CA", "IL", "KY", "MA", "NY", "OR", "TX", "WA", "WI"]
TOWNS = ["Springfield", "Riverside", "Fairview", "Pleasureville", "Franklin", "Greenville"]


def get_address(zipcode: int, latency: float) -> tuple[int, float, str | None]:
    """(zipcode, seconds the lookup took, address or None if the code is unknown)."""
    start = time.perf_counter()
    time.sleep(latency)
    known = zipcode % 7 != 0  # about one code in seven does not exist
    town = TOWNS[zipcode % len(TOWNS)]
    address = f"{town}, {STATES[zipcode % len(STATES)]} {zipcode:05d}, USA" if known else None
    return zipcode, time.perf_counter() - start, address


@serverless.parallel
def geolocate(zipcodes: list[int], latency: float = 0.1) -> list[Any]:
    # run in parallel on a cluster
    return [get_address(zipcode, latency) for zipcode in zipcodes]


@serverless.parallel
def cleanup(addresses: list[Any]) -> Any:
    # run in parallel on a cluster
    return filter(lambda entry: entry[2], addresses)


@serverless.sequential
def sort(addresses: list[Any]) -> list[Any]:
    # run in one thread in the current process
    return sorted(addresses, key=lambda entry: entry[2])


pipeline = serverless.Pipeline(geolocate, cleanup, sort)


def zipcodes(count: int, seed: int | None = None) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(count)]


def run(count: int, workers: int, latency: float, seed: int | None) -> dict[str, Any]:
    """Run the pipeline once; the figures of the seed's report, measured."""
    codes = zipcodes(count, seed)
    started = time.perf_counter()
    located, geo_stats = geolocate.with_options(workers=workers).with_stats(codes, latency)
    cleaned, clean_stats = cleanup.with_options(workers=workers).with_stats(located)
    ordered, sort_stats = sort.with_stats(cleaned)
    steps = [geo_stats, clean_stats, sort_stats]
    result = serverless.PipelineRun(ordered, steps, time.perf_counter() - started)
    # The serial-equivalent time: every lookup's own measured duration, plus the measured
    # compute time of the other steps.
    regular = sum(duration for _, duration, _ in located) + clean_stats.compute_s
    regular += sort_stats.compute_s
    return {
        "count": count,
        "workers": workers,
        "latency": latency,
        "regular_duration": regular,
        "parallel_duration": result.duration,
        "speedup": regular / result.duration if result.duration else 0.0,
        "steps": [
            {
                "name": s.name,
                "duration": s.duration,
                "workers": s.workers,
                "count": s.count,
                "count_out": s.count_out,
                "compute_s": s.compute_s,
                "retries": s.retries,
                "processes": s.processes,
            }
            for s in steps
        ],
        "addresses": [f"{z:05d} => {a}" for z, _, a in ordered],
    }


def report(figures: dict[str, Any]) -> str:
    lines = [
        "*Serverless Pipeline Demo*",
        f"Number of zipcodes = {figures['count']}",
        f"Regular duration = {figures['regular_duration']:.2f}s",
        f"Parallel duration = {figures['parallel_duration']:.2f}s",
        f"Speedup = {figures['speedup']:.1f}X",
        "Details per pipeline step:",
    ]
    for n, s in enumerate(figures["steps"], 1):
        plural = "s" if s["workers"] != 1 else ""
        lines.append(
            f'  {n} - Step "{s["name"]}" took {s["duration"]:.2f}s for {s["workers"]} '
            f"worker{plural} and {s['count']} elements"
        )
    return "\n".join(lines)
