"""The `serverless` command. The CLI owns the terminal; the library never prints."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serverless", description=__doc__)
    parser.add_argument("--version", action="version", version=f"simple-serverless {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    from .demo import cli as demo_cli

    demo_cli.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
