"""`serverless demo`: the seed's pipeline in the terminal, or on a web page with --web."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the seed's zipcode pipeline demo",
        description="Resolve random zipcodes through geolocate (parallel) -> cleanup "
        "(parallel) -> sort (sequential), calling a real geocoding service over HTTP.",
    )
    demo.add_argument("--count", type=int, default=3000, help="zipcodes to resolve (3000)")
    demo.add_argument("--workers", type=int, default=100, help="chunks in flight (100)")
    demo.add_argument(
        "--latency", type=float, default=0.1, help="seconds the geocoder adds per lookup (0.1)"
    )
    demo.add_argument(
        "--quota",
        default=None,
        help='the geocoder allows this many lookups per second ("200/s", "3000/min") and '
        "answers 429 beyond it; geolocate then runs with --rate, or finds the quota itself",
    )
    demo.add_argument(
        "--rate",
        default=None,
        help='geolocate\'s rate= ("200/s", "3000/min", "auto"); default: "auto" with '
        "--quota, unpaced without",
    )
    demo.add_argument("--seed", type=int, default=None, help="random seed for the zipcodes")
    demo.add_argument(
        "--cache",
        default=None,
        metavar="FILE",
        help="store every lookup in FILE (a SQLite path; sqlite:///... or redis://... work "
        "too): a rerun with the same --seed sends only the codes not stored yet, and an "
        "interrupted run (Ctrl-C, kill -9) run again finishes the rest",
    )
    demo.add_argument(
        "--geocoder",
        default=None,
        metavar="URL",
        help="use the geocoder at URL (python -m serverless.demo.geocoder) instead of starting "
        "one; --latency, --quota and --geocoder-host then are its own",
    )
    demo.add_argument(
        "--url", default=None, help="send chunks to workers at this URL instead of the local pool"
    )
    demo.add_argument(
        "--geocoder-host",
        default="127.0.0.1",
        help="address the geocoder listens on (workers elsewhere must reach it)",
    )
    demo.add_argument(
        "--serial",
        "--verify-serial",
        type=int,
        default=None,
        metavar="N",
        help="make N lookups one after the other before the run: the regular duration, and "
        "so the speedup, is against their time (default: up to 20, half a second of them; "
        "none with --cache, whose rerun asks the geocoder for nothing stored; 0: none, the "
        "speedup is then against the workers' compute time)",
    )
    demo.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="write the run's timeline to FILE as Chrome trace JSON (one track per worker "
        "process, one slice per request of a chunk): open it in https://ui.perfetto.dev or "
        "chrome://tracing",
    )
    demo.add_argument("--json", action="store_true", help="print the figures as JSON")
    demo.add_argument("--web", action="store_true", help="serve the demo as a web page")
    demo.add_argument("--host", default="127.0.0.1", help="--web: address to listen on")
    demo.add_argument("--port", type=int, default=8000, help="--web: port to listen on")
    demo.add_argument("--processes", type=int, default=2, help="--web: server processes (2)")
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.count < 0 or args.workers < 1 or args.latency < 0 or (args.serial or 0) < 0:
        print(
            "serverless demo: needs --count >= 0, --workers >= 1, --latency >= 0, --serial >= 0",
            file=sys.stderr,
        )
        return 2
    from .._config import parse_rate
    from .._exceptions import ConfigurationError
    from .quota import parse_quota

    try:
        from . import geocoder  # aiohttp: the demo extra
    except ImportError as exc:
        print(f"serverless demo: {exc}", file=sys.stderr)
        return 2
    try:
        args.quota = None if args.quota is None else parse_quota(args.quota)
        args.rate = parse_rate(args.rate) or ("auto" if args.quota else None)
    except ConfigurationError as exc:
        print(f"serverless demo: {exc}", file=sys.stderr)
        return 2
    for option in ("cache", "trace"):
        if args.web and getattr(args, option) is not None:
            print(
                f"serverless demo: --{option} runs in the terminal, not with --web", file=sys.stderr
            )
            return 2
    if args.geocoder:
        return _serve(args, args.geocoder.rstrip("/"))
    service = geocoder.Geocoder(args.latency, host=args.geocoder_host, quota=args.quota)
    with service as geocoder_url:
        return _serve(args, geocoder_url)


def _serve(args: argparse.Namespace, geocoder_url: str) -> int:
    if args.web:
        from . import web

        print(f"Serverless Pipeline Demo on http://{args.host}:{args.port}/ (Ctrl-C stops)")
        sys.stdout.flush()
        return web.serve(args, geocoder_url)
    return _terminal(args, geocoder_url)


def _terminal(args: argparse.Namespace, geocoder_url: str) -> int:
    from .geocoder import service_stats
    from .pipeline import GEOCODER_ENV, measure_serial, notes, report, run, warm_up

    lookup_url = geocoder_url
    if args.cache is not None and args.url is None:
        # a cache key covers the call's arguments, and the geocoder's port changes each run:
        # the local pool's workers (started below, with this environment) read it from here
        os.environ[GEOCODER_ENV] = geocoder_url
        lookup_url = f"${GEOCODER_ENV}"
    ready = warm_up(geocoder_url, args.workers, args.url)
    sample = 0 if args.cache is not None and args.serial is None else args.serial
    serial = None if sample == 0 or not args.count else measure_serial(geocoder_url, sample)
    # the library's own bar (progress=True: a line per step, only on a terminal)
    progress = None if os.environ.get("NO_PROGRESS") else True
    before = service_stats(geocoder_url)
    try:
        result = run(
            lookup_url,
            args.count,
            args.workers,
            args.seed,
            args.url,
            args.rate,
            args.quota,
            args.cache,
            serial,
            progress=progress,
            trace=args.trace,
        )
    except KeyboardInterrupt:
        if args.cache is None:
            raise
        print(
            f"\nserverless demo: interrupted; the lookups answered so far are stored in "
            f"{args.cache}: run the same command again to finish the rest",
            file=sys.stderr,
        )
        return 130
    after = service_stats(geocoder_url)
    result["workers_ready_s"] = ready
    # what the geocoder itself counted during the run: lookups answered, and refused (429)
    result["service"] = {k: after[k] - before[k] for k in after}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(report(result))
    print("\n".join(notes(result)))
    if args.trace is not None:
        print(
            f"(the run's timeline: {args.trace}, for https://ui.perfetto.dev or chrome://tracing)"
        )
    return 0
