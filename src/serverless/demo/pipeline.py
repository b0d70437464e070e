"""The seed's Serverless Pipeline Demo, ported to Python 3 and made real.

3,000 random zipcodes go through `geolocate` (parallel: one HTTP call per code to the
geocoding service in serverless.demo.geocoder), `cleanup` (parallel: drops unknown codes) and
`sort` (sequential, in the caller), as in the seed. The workers learn the geocoder's URL as an
argument of the call, so the same code runs on the local pool and on remote workers (--url).

When the geocoder enforces a quota (--quota), `geolocate` raises serverless.Throttled on its
429, and the step runs with `rate=` (the quota, or "auto": found from the throttles).

With a result store (--cache), `geolocate` runs with `cache=`: each lookup is stored as its
chunk's answer arrives, and a rerun sends only the codes not stored yet. A cache key covers
the call's arguments, and the demo's geocoder gets a new port each run: so the workers of the
local pool find it through $SERVERLESS_DEMO_GEOCODER (the argument names that variable), and
the key names the service, not its port.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import serverless

# (zipcode, seconds the lookup took as measured by the worker, address or None if unknown)
Entry = tuple[int, float, "str | None"]

_local = threading.local()

GEOCODER_ENV = "SERVERLESS_DEMO_GEOCODER"  # the geocoder's URL, for "$SERVERLESS_DEMO_GEOCODER"
STORED_SHARE = 10  # with --cache, each worker's share goes in this many requests (see run)


def _connection(netloc: str) -> http.client.HTTPConnection:
    """One keep-alive connection per worker thread and geocoder: no handshake per lookup."""
    connections: dict[str, http.client.HTTPConnection] = _local.__dict__.setdefault("c", {})
    if netloc not in connections:
        connections[netloc] = http.client.HTTPConnection(netloc, timeout=30)
    return connections[netloc]


def close_connections() -> None:
    """Close this thread's connections to geocoders."""
    for connection in _local.__dict__.pop("c", {}).values():
        connection.close()


def get_address(zipcode: int, geocoder: str) -> Entry:
    """Ask the geocoding service at `geocoder` for the code's address.

    geocoder: http://host:port, optionally with a query such as ?latency=0.05; or the name of
    an environment variable that holds it, as "$SERVERLESS_DEMO_GEOCODER".
    """
    if geocoder.startswith("$"):
        geocoder = os.environ[geocoder[1:]]
    parts = urlsplit(geocoder)
    path = f"/zip/{zipcode:05d}" + (f"?{parts.query}" if parts.query else "")
    start = time.perf_counter()
    for attempt in (1, 2):  # a kept-alive connection the server closed is retried once, fresh
        connection = _connection(parts.netloc)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            break
        except (ConnectionError, http.client.HTTPException):
            connection.close()
            if attempt == 2:
                raise
    if response.status == 404:
        return zipcode, time.perf_counter() - start, None
    if response.status == 429:  # over the quota: the caller waits, slows down, sends it again
        wait = response.getheader("Retry-After")
        raise serverless.Throttled(f"geocoder over its quota at {zipcode:05d}", retry_after=wait)
    if response.status != 200:
        raise RuntimeError(f"geocoder answered {response.status} for {zipcode:05d}: {body!r}")
    return zipcode, time.perf_counter() - start, json.loads(body)["address"]


# Lookups are context-free, as the seed's were: running one twice is harmless, so a chunk
# that straggles at the end of the run may be hedged (sent again elsewhere, first answer wins).
@serverless.parallel(idempotent=True)
def geolocate(zipcodes: list[int], geocoder: str) -> list[Entry]:
    # run in parallel on a cluster
    return [get_address(zipcode, geocoder) for zipcode in zipcodes]


@serverless.parallel(idempotent=True)
def cleanup(addresses: list[Entry]) -> Iterable[Entry]:
    # run in parallel on a cluster
    return filter(lambda entry: entry[2], addresses)


@serverless.sequential
def sort(addresses: list[Entry]) -> list[Entry]:
    # run in one thread in the current process
    return sorted(addresses, key=lambda entry: entry[2] or "")


def zipcodes(count: int, seed: int | None = None) -> list[int]:
    """Random 5-digit codes, as the seed drew them; about half are real US zipcodes."""
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(count)]


def warm_up(geocoder: str, workers: int, url: str | None = None) -> float:
    """Start the workers (the local pool, or check remote ones answer); seconds it took."""
    started = time.perf_counter()
    cleanup.with_options(workers=workers, url=url)([(0, 0.0, None)] * workers)
    return time.perf_counter() - started


def run(
    geocoder: str,
    count: int,
    workers: int = 100,
    seed: int | None = None,
    url: str | None = None,
    rate: float | str | None = None,
    quota: float | None = None,
    cache: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline once; the figures of the seed's report, all measured.

    geolocate and cleanup go to the same workers, so the Pipeline fuses them: each chunk is
    geolocated and cleaned in one request, and only the resolved addresses come back.
    rate: geolocate's rate= (items/s, "200/s", "auto"), for a geocoder with a quota (its
    lookups/s, for the report); a paced step runs alone, so then the two are not fused.
    cache: geolocate's cache= (a path, "sqlite:///...", "redis://..."): every lookup is stored
    (not the cleaned ones: the steps run apart), each worker's share is sent in STORED_SHARE
    requests, so that an interrupted run loses at most the lookups in flight, and no chunk is
    hedged (sent twice)."""
    lookup = geolocate.with_options(workers=workers, url=url)
    if rate is not None:  # a paced step's hedge would spend the quota twice on the same lookups
        lookup = lookup.with_options(rate=rate, hedge=False)
    if cache is not None:  # each code looked up once: a rerun, not a hedge, finishes the rest
        share = -(-count // (workers * STORED_SHARE))
        lookup = lookup.with_options(cache=cache, chunk_size=max(1, share), hedge=False)
    pipeline = serverless.Pipeline(
        lookup.partial(geocoder),
        cleanup.with_options(workers=workers, url=url),
        sort,
        fuse=cache is None,
    )
    return figures(pipeline.execute(zipcodes(count, seed)), count, workers, quota, cache)


def figures(
    run: serverless.PipelineRun,
    count: int,
    workers: int,
    quota: float | None = None,
    cache: str | None = None,
) -> dict[str, Any]:
    """The report's figures. The regular (serial-equivalent) duration is the steps' compute
    time as measured around each function call on the workers, every lookup included: what
    one thread making the same calls one after the other would have spent. With a quota
    (lookups/s), the serial lookups could not go faster than it either: they would take
    count x max(the mean lookup, 1 / quota). With a cache, only the lookups sent count."""
    regular = sum(s.compute_s for s in run.steps)
    offset = 0.0
    timeline: list[dict[str, Any]] = []
    steps = []
    for step in run.steps:
        steps.append(_step_figures(step))
        if step.fused_with:  # its chunks are the previous step's: label them with both
            for entry in timeline[-len(step.chunks) :]:
                entry["step"] = f"{entry['step']}+{step.name}"
            offset += step.duration  # the fused steps' durations add up to their group's
            continue
        for c in step.chunks:
            timeline.append(
                {
                    "step": step.name,
                    "index": c.index,
                    "size": c.size,
                    "worker": c.worker,
                    "start": offset + c.start,
                    "end": offset + c.end,
                    "compute_s": c.compute_s,
                    "attempts": c.attempts,
                    "throttles": c.throttles,
                }
            )
        offset += step.duration
    geo = run.steps[0]
    lookups = geo.compute_s
    sent = geo.items_sent if cache is not None else count
    out: dict[str, Any] = {
        "count": count,
        "workers": workers,
        "regular_duration": regular,
        "lookup_mean_s": lookups / sent if sent else 0.0,
        "parallel_duration": run.duration,
        "speedup": regular / run.duration if run.duration else 0.0,
        "steps": steps,
        "timeline": timeline,
        "addresses": [f"{z:05d} => {a}" for z, _, a in run.result],
        "quota": quota,
    }
    if cache is not None:
        # lookups taken from the store and sent to the geocoder (StepStats, measured)
        out["cache"] = {
            "location": cache,
            "hits": geo.cache_hits,
            "sent": geo.items_sent,
            "error": geo.cache_error,
        }
    if quota:
        # a paced lookup's compute time includes its pacing: the geocoder's latency is the
        # mean of what the lookups themselves measured (each entry carries its own time)
        took = [t for _, t, _ in run.result]  # the resolved codes' lookups: a fair sample
        latency = sum(took) / len(took) if took else 0.0
        serial = count * max(latency, 1.0 / quota)
        out |= {
            "rate_achieved": geo.items_per_s,  # lookups per second over the geolocate step
            "rate_settled": geo.rate,  # where the pacing (rate= or AIMD) ended
            "throttled": geo.throttles,  # lookups the geocoder refused with a 429
            "lookup_latency_s": latency,
            "serial_at_quota_s": serial,
            "speedup_at_quota": serial / run.duration if run.duration else 0.0,
        }
    return out


def _step_figures(s: serverless.StepStats) -> dict[str, Any]:
    return {
        "name": s.name,
        "kind": s.kind,
        "duration": s.duration,
        "workers": s.workers,
        "count": s.count,
        "count_out": s.count_out,
        "compute_s": s.compute_s,
        "retries": s.retries,
        "hedges": s.hedges,
        "processes": s.processes,
        "target": s.target,
        "fused_with": s.fused_with,  # the step number whose requests also ran this one
        "throttles": s.throttles,  # lookups the downstream refused (each sent again)
        "rate": s.rate,  # items/s it was paced at when it ended (None: unpaced)
        "items_per_s": s.items_per_s,
    }


def verify_serial(geocoder: str, sample: int, seed: int | None = None) -> dict[str, float]:
    """Really run `sample` lookups one after the other in this thread: the mean per lookup,
    to compare with the per-lookup mean measured during the parallel run."""
    codes = zipcodes(sample, seed)
    started = time.perf_counter()
    for code in codes:
        while True:
            try:
                get_address(code, geocoder)
                break
            except serverless.Throttled as exc:  # one thread over a quota: wait, as told
                time.sleep(exc.retry_after or 1.0)
    elapsed = time.perf_counter() - started
    return {"sample": sample, "serial_s": elapsed, "serial_mean_s": elapsed / sample}


def report(figures: dict[str, Any]) -> str:
    """The seed's report, line for line, and the quota's figures where there was one."""
    lines = [
        "*Serverless Pipeline Demo*",
        f"Number of zipcodes = {figures['count']}",
        f"Regular duration = {figures['regular_duration']:.2f}s",
        f"Parallel duration = {figures['parallel_duration']:.2f}s",
        _speedup_line(figures),
        "Details per pipeline step:",
    ]
    for n, s in enumerate(figures["steps"], 1):
        plural = "s" if s["workers"] != 1 else ""
        fused = f" (in the same requests as step {s['fused_with']})" if s["fused_with"] else ""
        lines.append(
            f'  {n} - Step "{s["name"]}" took {s["duration"]:.2f}s for {s["workers"]} '
            f"worker{plural} and {s['count']} elements{fused}"
        )
    if figures.get("quota"):
        lines.append(quota_line(figures))
    if figures.get("cache"):
        lines.append(cache_line(figures["cache"]))
    return "\n".join(lines)


def _speedup_line(figures: dict[str, Any]) -> str:
    """The seed's line; with --cache, what it measures: the lookups sent (the regular
    duration is the workers' compute, and the store's answers took none)."""
    line = f"Speedup = {figures['speedup']:.1f}X"
    cache = figures.get("cache")
    if not cache or not cache["hits"]:
        return line
    if not cache["sent"]:
        return "Speedup = none measured: every lookup came from the store, none was sent"
    return f"{line} (over the {cache['sent']} lookups sent; {cache['hits']} came from the store)"


def cache_line(cache: dict[str, Any]) -> str:
    line = (
        f"Cache = {cache['location']}: {cache['hits']} lookups from the store, "
        f"{cache['sent']} sent to the geocoder"
    )
    if cache["error"]:
        line += f" (the store failed during the run and was left: {cache['error']})"
    return line


def quota_line(f: dict[str, Any]) -> str:
    settled = f"{f['rate_settled']:.1f}/s" if f["rate_settled"] else "unpaced"
    return (
        f"Quota = {f['quota']:g}/s: geolocate ran at {f['rate_achieved']:.1f} lookups/s "
        f"({f['rate_achieved'] / f['quota']:.0%} of it; pacing ended at {settled}), "
        f"{f['throttled']} lookups throttled (429); {f['count']} serial lookups at that quota "
        f"would take {f['serial_at_quota_s']:.2f}s ({f['lookup_latency_s'] * 1000:.1f} ms or "
        f"1/quota each, the longer): a speedup of {f['speedup_at_quota']:.1f}X"
    )
