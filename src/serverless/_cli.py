"""The `serverless` command. The CLI owns the terminal; the library never prints."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serverless", description=__doc__)
    parser.add_argument("--version", action="version", version=f"simple-serverless {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the seed's zipcode pipeline demo")
    demo.add_argument("--count", type=int, default=3000, help="zipcodes to resolve")
    demo.add_argument("--workers", type=int, default=100, help="chunks in flight")
    demo.add_argument("--latency", type=float, default=0.1, help="seconds per lookup")
    demo.add_argument("--seed", type=int, default=None, help="random seed for the zipcodes")
    demo.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2  # pragma: no cover - argparse enforces a command


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.count < 0 or args.workers < 1 or args.latency < 0:
        print("serverless demo: --count >= 0, --workers >= 1, --latency >= 0", file=sys.stderr)
        return 2
    figures = demo.run(args.count, args.workers, args.latency, args.seed)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(demo.report(figures))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
