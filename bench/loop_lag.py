"""Issue 22.12's figure: how long a real `serverless worker` (uvicorn) holds its event loop
while it checks a signed body within the limit that is slow to check (the bodies of
tests/integration/test_loop_lag.py, and one that is only slow to decode). A probe asks the
worker for a page every 10 ms; the longest wait beyond its median is the time the loop was
held.

    python -m bench.loop_lag [--runs 3]
"""

from __future__ import annotations

import argparse

from serverless import _wire as p
from tests.conftest import free_port, server
from tests.integration.test_loop_lag import WORKER, _envelope, held_loop, slow_bodies


def bodies() -> dict[str, tuple[bytes, str, str]]:
    """The test's bodies, and what is left: 32 M one-byte ints, which msgspec decodes (into
    square's list[int], the last one a string: refused, 422) in one call holding the GIL."""
    room = p.MAX_BODY - 1024
    ints, ints_id = _envelope(b"\x01" * (room - 2) + b"\xa1a", room - 1, p.MSGPACK)
    return {**slow_bodies(), "tiny items, decoded": (ints, ints_id, p.MSGPACK)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    port = free_port()
    with server([*WORKER, "--port", str(port)], port):
        for name in bodies():
            lags = []
            for _ in range(runs):
                body, request_id, fmt = bodies()[name]  # a fresh request id each time
                lag, status = held_loop(port, body, request_id, fmt)
                lags.append(lag)
            figures = ", ".join(f"{lag * 1000:.0f}" for lag in lags)
            print(f"{name}: {len(body) / 2**20:.1f} MiB, status {status}, loop held {figures} ms")


if __name__ == "__main__":
    main()
