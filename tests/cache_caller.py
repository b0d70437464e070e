"""A caller process for the cache tests: `python -m tests.cache_caller SPEC COUNT OUT [opts]`
runs sample_functions.slow_label on range(COUNT) with cache=SPEC on the local pool, writes the
results' MessagePack encoding to OUT and prints the call's figures as JSON.

Options: --chunk-size N, --workers N, --wait SECONDS, --module NAME (a module of the test's
own with a parallel function `label`), --version V, --items json (items from a JSON file).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import msgspec

from tests import sample_functions as sf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("count", type=int)
    parser.add_argument("out")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--wait", type=float, default=0.02)
    parser.add_argument("--module", default=None)
    parser.add_argument("--version", default=None)
    parser.add_argument("--items", default=None)
    args = parser.parse_args()
    items = list(range(args.count))
    if args.items is not None:
        with open(args.items) as f:
            items = json.load(f)
    options = {"cache": args.spec, "workers": args.workers, "chunk_size": args.chunk_size}
    if args.version is not None:
        options["version"] = args.version
    if args.module is not None:
        function = importlib.import_module(args.module).label.with_options(**options)
        results, stats = function.with_stats(items)
    else:
        function = sf.slow_label.with_options(**options)
        results, stats = function.with_stats(items, args.wait)
    with open(args.out, "wb") as f:
        f.write(msgspec.msgpack.encode(results, enc_hook=repr))
    figures = {"hits": stats.cache_hits, "sent": stats.items_sent, "error": stats.cache_error}
    sys.stdout.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
