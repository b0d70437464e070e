"""Issue 22, point 7, at the issue's scale: legitimate calls during an anonymous attack.

Each server runs with a 1,024-descriptor limit; 1,100 sockets attack it (idle, or bodies that
trickle a byte every 8 s) while a caller calls every 0.5 s for 20 s. Prints the calls that
succeeded and, for the trickling bodies, how many are still open 30 s after they opened.

    python -m bench.lockout [--limit 1024] [--sockets 1100] [--server NAME] [--attack idle|trickle]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from tests.integration import test_lockout as t


def attack(kind: str, what: str, sockets: int) -> str:
    with tempfile.TemporaryDirectory() as tmp, t.running(kind, tmp) as port:
        feed = None if what == "idle" else t._byte
        with t.Attack(port, feed, 8.0) as socks:
            start = time.monotonic()
            socks.open(sockets, b"" if what == "idle" else t.head(1 << 20))
            ok, calls = t.calls_during(port, 20)
            line = f"{kind}, {len(socks.socks)} {what}: {ok} of {calls} calls succeeded"
            if what == "trickle":
                time.sleep(max(0.0, start + 30 - time.monotonic()))
                line += f"; {socks.still_open()} still open after 30 s"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=1024)
    parser.add_argument("--sockets", type=int, default=1100)
    parser.add_argument("--server", choices=sorted(t.SERVERS), action="append")
    parser.add_argument("--attack", choices=["idle", "trickle"], action="append")
    args = parser.parse_args()
    t.FD_LIMIT = args.limit
    for kind in args.server or t.AT_THE_LIMIT:
        for what in args.attack or ["idle", "trickle"]:
            print(attack(kind, what, args.sockets), flush=True)


if __name__ == "__main__":
    main()
