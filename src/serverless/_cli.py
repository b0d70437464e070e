"""The `serverless` command. The CLI owns the terminal; the library never prints."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from . import __version__
from ._exceptions import ServerlessError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serverless", description=__doc__)
    parser.add_argument("--version", action="version", version=f"simple-serverless {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    from .demo import cli as demo_cli

    demo_cli.add_parser(commands)
    _add_worker(commands)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ServerlessError as exc:  # a clear message, not a traceback
        print(f"serverless {args.command}: {exc}", file=sys.stderr)
        return 1


def _add_worker(commands: Any) -> None:
    worker = commands.add_parser(
        "worker",
        help="serve the worker route for the functions of some modules",
        description="Serve the worker route for the @serverless.parallel functions that the "
        "named modules register, under uvicorn. The secret comes from $SERVERLESS_SECRET "
        "(several, comma-separated, during a key rotation). SIGTERM stops accepting "
        "connections and finishes the chunks in flight.",
    )
    worker.add_argument(
        "modules", nargs="*", metavar="MODULE", help="module to import ($SERVERLESS_MODULES)"
    )
    worker.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all)")
    worker.add_argument("--port", type=int, default=8000, help="port to bind")
    worker.add_argument("--route", default="/serverless", help="path of the worker route")
    worker.add_argument("--health", default="/healthz", help="path of the health route")
    worker.add_argument("--processes", type=int, default=1, help="server processes")
    worker.add_argument(
        "--threads", type=int, default=64, help="threads per process for sync functions"
    )
    worker.add_argument(
        "--graceful-timeout",
        type=int,
        default=300,
        help="seconds to finish in-flight chunks after SIGTERM (default: the chunk timeout)",
    )
    worker.add_argument(
        "--keep-alive",
        type=int,
        default=75,
        help="idle keep-alive seconds; above the load balancer's own idle timeout",
    )
    worker.add_argument("--log-level", default="info", help="uvicorn's log level")
    worker.set_defaults(handler=_worker)


def _worker(args: argparse.Namespace) -> int:
    from ._exceptions import ConfigurationError
    from ._worker.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        serve(
            args.modules,
            host=args.host,
            port=args.port,
            route=args.route,
            health=args.health,
            processes=args.processes,
            threads=args.threads,
            graceful_timeout=args.graceful_timeout,
            keep_alive=args.keep_alive,
            log_level=args.log_level,
        )
    except ConfigurationError as exc:
        print(f"serverless worker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
