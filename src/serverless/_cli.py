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
    _add_cache(commands)
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
    worker.add_argument(
        "--metrics",
        default="/metrics",
        metavar="PATH",
        help="path of the Prometheus metrics, where prometheus_client is installed "
        "(unauthenticated, as the health route)",
    )
    worker.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_const",
        const=None,
        help="serve no metrics",
    )
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
            metrics=args.metrics,
        )
    except ConfigurationError as exc:
        print(f"serverless worker: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_cache(commands: Any) -> None:
    cache = commands.add_parser(
        "cache",
        help="inspect or empty a result store (cache=)",
        description="Inspect or empty the result store that a call's cache= names: a SQLite "
        "file (a path or sqlite:///path) or a Redis server (redis://[:password@]host:port/db, "
        "rediss:// for TLS; only the records under our prefix).",
    )
    actions = cache.add_subparsers(dest="action", required=True)
    stats = actions.add_parser("stats", help="records, bytes, ttl, damaged records read")
    clear = actions.add_parser(
        "clear", help="remove every record (a damaged SQLite file: remove it)"
    )
    for action in (stats, clear):
        action.add_argument("store", metavar="FILE_OR_URL", help="the store, as cache= names it")
    stats.set_defaults(handler=_cache_stats)
    clear.set_defaults(handler=_cache_clear)


def _cache_stats(args: argparse.Namespace) -> int:
    from ._caller.store import open_store

    _existing(args.store)
    store = open_store(args.store)
    try:
        stats = store.stats()
    finally:
        store.close()
    print(f"location: {stats.location}")
    print(f"records: {stats.records}")
    print(f"bytes: {stats.nbytes}")
    print(f"ttl: {'none' if stats.ttl is None else f'{stats.ttl:g} s'}")
    print(f"corrupted: {stats.corrupted}")
    return 0


def _cache_clear(args: argparse.Namespace) -> int:
    from ._caller import sqlitestore
    from ._caller.store import open_store

    path = _existing(args.store)
    if path is not None:  # a damaged file is removed, as its error message offers
        removed = sqlitestore.clear_file(path)
        if removed is None:
            print(f"removed the damaged store {path}")
            return 0
        print(f"removed {removed} records from {path}")
        return 0
    store = open_store(args.store)
    try:
        removed = store.clear()
    finally:
        store.close()
    print(f"removed {removed} records from {store.location}")
    return 0


def _existing(spec: str) -> str | None:
    """The file a SQLite spec names, which must exist (inspecting creates no store)."""
    import os

    from ._caller.store import sqlite_path
    from ._exceptions import StoreError

    path = sqlite_path(spec)
    if path is not None and not os.path.lexists(path):
        raise StoreError(f"no result store at {path}", store=path)
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
