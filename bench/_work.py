"""The benchmark's list-in/list-out functions, shared by every tool.

Plain module-level functions (no serverless import), so process pools, Dask and Ray can
import them by name and the peers' subprocesses do not pay for our imports.
"""

from __future__ import annotations

import http.client
import threading
import time
from typing import Any

SPIN_PER_ITEM = 230_000  # ~20 ms of pure-Python CPU per item on the reference machine


def wait(items: list[int], seconds: float) -> list[int]:
    """W1: a blocking wait per item, standing for a network call."""
    for _ in items:
        time.sleep(seconds)
    return list(items)


def square(items: list[int]) -> list[int]:
    """W2, W3, W5 stream: almost no work per item."""
    return [x * x for x in items]


def spin_one(item: int, loops: int) -> int:
    x = item
    for i in range(loops):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x


def spin(items: list[int], loops: int) -> list[int]:
    """W4: pure-Python CPU work, `loops` iterations per item."""
    return [spin_one(x, loops) for x in items]


def payload(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """W5: dicts carrying a 1 KB string each, sent back with one field added."""
    return [{**d, "n": len(d["s"])} for d in items]


def make_payload(count: int) -> list[dict[str, Any]]:
    return [{"id": i, "s": f"{i:08d}" * 128} for i in range(count)]


# -- W6: a downstream with a quota (the demo's geocoder: 429 + Retry-After beyond it) ----------

REFUSED = "429"  # a peer's result for an item the service refused: lost unless retried by hand
_local = threading.local()


def get_zip(code: int, service: str) -> tuple[int, str | None, str]:
    """One lookup: (status, address or None, the Retry-After header or ""), on a keep-alive
    connection per thread (service: host:port)."""
    connections: dict[str, http.client.HTTPConnection] = _local.__dict__.setdefault("c", {})
    for attempt in (1, 2):  # a kept-alive connection the server closed is retried once, fresh
        connection = connections.get(service)
        if connection is None:
            connection = connections[service] = http.client.HTTPConnection(service, timeout=30)
        try:
            connection.request("GET", f"/zip/{code:05d}")
            response = connection.getresponse()
            body = response.read()
            break
        except (ConnectionError, http.client.HTTPException):
            connection.close()
            del connections[service]
            if attempt == 2:
                raise
    if response.status == 200:
        return 200, body.decode(), ""
    return response.status, None, response.getheader("Retry-After") or ""


def lookup(items: list[int], service: str, by_hand: bool = False) -> list[list[Any]]:
    """W6, the peers: [code, address or None] per item, or [code, REFUSED] where the service
    said 429 (an item lost); by_hand: sleep its Retry-After and ask again until served."""
    out: list[list[Any]] = []
    for code in items:
        while True:
            status, address, wait = get_zip(code, service)
            if status != 429:
                out.append([code, address])
                break
            if not by_hand:
                out.append([code, REFUSED])
                break
            time.sleep(float(wait or 1))
    return out


# -- streams of large items (issue 22): bytes whose first 8 say where they are in the input --


def blob(index: int, size: int) -> bytes:
    """Item `index` of a stream of `size`-byte items."""
    return index.to_bytes(8, "big") + b"x" * (size - 8)


def blob_index(item: bytes) -> int:
    return int.from_bytes(item[:8], "big")


def echo(items: list[bytes], stall_at: int = -1, stall: float = 0.0) -> list[bytes]:
    """Each item back as it came; the chunk holding item `stall_at` first waits `stall` s."""
    if any(blob_index(item) == stall_at for item in items):
        time.sleep(stall)
    return list(items)
