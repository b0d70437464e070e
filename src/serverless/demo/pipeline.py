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

The report's regular duration is what the same lookups would take one after the other, from
a few of them really made that way before the run (`measure_serial`); the workers' own
compute time, which runs a little longer inside a busy parallel run, is shown beside it.
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

# The serial sample (measure_serial): lookups one after the other vary little (measured on
# the demo's geocoder, 2 cores: 101.44 ms with a standard deviation of 0.13 ms at 0.1 s of
# latency; 11.01 ms, 0.14 ms at 0.01 s; eight disjoint means of five within 0.2%), so a few
# give the per-lookup time: up to SERIAL_MOST, stopping once SERIAL_LEAST took SERIAL_BUDGET_S
# (five at the default 0.1 s: half a second added to the demo).
SERIAL_MOST = 20
SERIAL_LEAST = 3
SERIAL_BUDGET_S = 0.5


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
    serial: dict[str, float] | None = None,
    share: int = 1,
    progress: Any = None,
    trace: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline once; the figures of the seed's report, all measured.

    geolocate and cleanup go to the same workers, so the Pipeline fuses them: each chunk is
    geolocated and cleaned in one request, and only the resolved addresses come back.
    rate: geolocate's rate= (items/s, "200/s", "auto"), for a geocoder with a quota (its
    lookups/s, for the report); a paced step runs alone, so then the two are not fused.
    cache: geolocate's cache= (a path, "sqlite:///...", "redis://..."): every lookup is stored
    (not the cleaned ones: the steps run apart), each worker's share is sent in STORED_SHARE
    requests, so that an interrupted run loses at most the lookups in flight, and no chunk is
    hedged (sent twice).
    serial: measure_serial's figures, the regular duration's basis (None: the workers' compute).
    share: each worker's share of the codes goes in this many requests (chunks), so that
    chunks are answered all along the run, not all at its end (the web page's live timeline).
    progress: Pipeline.execute's progress= (a callable that receives serverless.Progress).
    trace: a path to write the run's timeline to, as Chrome trace JSON."""
    lookup = geolocate.with_options(workers=workers, url=url)
    if cache is not None:
        share = max(share, STORED_SHARE)
    if share > 1:  # the first step's chunks are its fused group's
        lookup = lookup.with_options(chunk_size=max(1, -(-count // (workers * share))))
    if rate is not None:  # a paced step's hedge would spend the quota twice on the same lookups
        lookup = lookup.with_options(rate=rate, hedge=False)
    if cache is not None:  # each code looked up once: a rerun, not a hedge, finishes the rest
        lookup = lookup.with_options(cache=cache, hedge=False)
    pipeline = serverless.Pipeline(
        lookup.partial(geocoder),
        cleanup.with_options(workers=workers, url=url),
        sort,
        fuse=cache is None,
    )
    done = pipeline.execute(zipcodes(count, seed), progress=progress)
    if trace is not None:
        done.save_trace(trace)
    return figures(done, count, workers, quota, cache, serial)


def figures(
    run: serverless.PipelineRun,
    count: int,
    workers: int,
    quota: float | None = None,
    cache: str | None = None,
    serial: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The report's figures. The regular (serial) duration is what one thread making the
    same lookups one after the other would spend: the lookups at the mean of the `serial`
    sample (measure_serial), and the other steps' compute as measured on the workers. With a
    quota (lookups/s), serial lookups could not go faster than it either: each then takes
    max(the serial mean, 1 / quota). With a cache, only the lookups sent count.
    Without a sample, the regular duration is the steps' compute time as measured around each
    function call on the workers, every lookup included ("speedup_basis": "compute"): a
    lookup runs a little longer inside a busy parallel run than alone, so this figure is
    higher; it is kept as "speedup_compute" either way."""
    compute = sum(s.compute_s for s in run.steps)
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
    sent = geo.items_sent if cache is not None else count
    regular, per_lookup = compute, None
    if serial:  # a lookup made alone, paced at the quota where there is one
        per_lookup = max(serial["serial_mean_s"], 1.0 / quota if quota else 0.0)
        regular = sent * per_lookup + compute - geo.compute_s
    out: dict[str, Any] = {
        "count": count,
        "workers": workers,
        "regular_duration": regular,
        "lookup_mean_s": geo.compute_s / sent if sent else 0.0,  # as the workers measured
        "parallel_duration": run.duration,
        "speedup": regular / run.duration if run.duration else 0.0,
        "speedup_basis": "serial" if serial else "compute",
        "serial": serial,  # measure_serial's sample, or None
        "serial_lookup_s": per_lookup,  # the regular duration's time per lookup, or None
        "compute_duration": compute,
        "speedup_compute": compute / run.duration if run.duration else 0.0,
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
        # serial sample's mean, or what the run's lookups measured (each entry its own time)
        took = [t for _, t, _ in run.result]  # the resolved codes' lookups: a fair sample
        latency = sum(took) / len(took) if took else 0.0
        if serial:
            latency = serial["serial_mean_s"]
        at_quota = count * max(latency, 1.0 / quota)
        out |= {
            "rate_achieved": geo.items_per_s,  # lookups per second over the geolocate step
            "rate_settled": geo.rate,  # where the pacing (rate= or AIMD) ended
            "throttled": geo.throttles,  # lookups the geocoder refused with a 429
            "lookup_latency_s": latency,
            "serial_at_quota_s": at_quota,
            "speedup_at_quota": at_quota / run.duration if run.duration else 0.0,
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


def measure_serial(
    geocoder: str, sample: int | None = None, seed: int | None = None
) -> dict[str, float]:
    """Really make lookups one after the other in this thread: the regular duration's basis.

    sample: how many; None: up to SERIAL_MOST, stopping once SERIAL_LEAST took
    SERIAL_BUDGET_S. One lookup before them is not timed: it opens the keep-alive connection,
    as the workers' are open during the run. A lookup the geocoder refuses (429) is waited
    out and made again, and only the answered lookups' own time counts (figures() applies a
    quota's pace)."""
    most = SERIAL_MOST if sample is None else sample
    codes = zipcodes(most + 1, seed)
    took: list[float] = []
    for n, code in enumerate(codes):
        while True:
            try:
                _, seconds, _ = get_address(code, geocoder)
                break
            except serverless.Throttled as exc:  # one thread over a quota: wait, as told
                time.sleep(exc.retry_after or 1.0)
        if n:
            took.append(seconds)
        if sample is None and len(took) >= SERIAL_LEAST and sum(took) >= SERIAL_BUDGET_S:
            break
    close_connections()
    elapsed = sum(took)
    return {"sample": len(took), "serial_s": elapsed, "serial_mean_s": elapsed / len(took)}


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
    """The seed's line, and what the speedup is against: serial lookups as measured, or (with
    no sample) the workers' compute time; with --cache, over the lookups sent (the store's
    answers took none)."""
    cache = figures.get("cache")
    if cache and cache["hits"] and not cache["sent"]:
        return "Speedup = none measured: every lookup came from the store, none was sent"
    serial = figures.get("serial")
    if serial:
        basis = (
            f"against {serial['sample']} serial lookups measured at "
            f"{serial['serial_mean_s'] * 1000:.1f} ms each"
        )
        quota = figures.get("quota")
        if quota and 1.0 / quota > serial["serial_mean_s"]:
            basis += f", paced at the quota's {quota:g}/s"
    else:
        basis = "against the workers' compute time: no serial lookups measured"
    if cache and cache["hits"]:
        basis += f"; over the {cache['sent']} lookups sent, {cache['hits']} came from the store"
    return f"Speedup = {figures['speedup']:.1f}X ({basis})"


def notes(figures: dict[str, Any]) -> list[str]:
    """The lines under the report: how the regular duration was found and where the chunks
    ran, and what the geocoder itself counted (where the figures have it)."""
    sent = figures["cache"]["sent"] if figures.get("cache") else figures["count"]
    step = figures["steps"][0]
    workers = (
        f"{step['target']}, {step['processes']} process{'es' if step['processes'] != 1 else ''}"
    )
    if "workers_ready_s" in figures:
        workers += f", ready in {figures['workers_ready_s']:.2f}s"
    measured = f"{figures['lookup_mean_s'] * 1000:.1f} ms"
    serial = figures.get("serial")
    if serial:
        mean = f"{serial['serial_mean_s'] * 1000:.1f} ms"
        per = f"{figures['serial_lookup_s'] * 1000:.1f} ms"
        basis = f"as {serial['sample']} made one after the other before the run took"
        if per != mean:  # paced at the quota
            basis = f"the quota's pace ({serial['sample']} one after the other took {mean} each)"
        lines = [
            f"(regular duration = {sent} lookups at {per} each, {basis}, and the rest; the "
            f"workers ({workers}) measured {measured} per lookup during the run: "
            f"{figures['speedup_compute']:.1f}X by their compute time)"
        ]
    else:
        lines = [
            f"(regular duration = the steps' compute time measured on the workers ({workers}): "
            f"{sent} lookups at {measured} each, and the rest)"
        ]
    service = figures.get("service")
    if service is not None and figures.get("quota"):
        lines.append(
            f"(the geocoder counted {service['lookups']} lookups answered and "
            f"{service['throttled']} refused with a 429 during the run)"
        )
    elif service is not None and figures.get("cache"):
        lines.append(f"(the geocoder counted {service['lookups']} lookups during the run)")
    return lines


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
