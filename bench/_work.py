"""The benchmark's list-in/list-out functions, shared by every tool.

Plain module-level functions (no serverless import), so process pools, Dask and Ray can
import them by name and the peers' subprocesses do not pay for our imports.
"""

from __future__ import annotations

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
