"""The benchmark functions as @serverless.parallel steps (the local pool imports this module)."""

from __future__ import annotations

import os
import time
from typing import Any

import serverless

from . import _work


@serverless.parallel
def wait(items: list[int], seconds: float) -> list[int]:
    return _work.wait(items, seconds)


@serverless.parallel
def square(items: list[int]) -> list[int]:
    return _work.square(items)


@serverless.parallel
def spin(items: list[int], loops: int) -> list[int]:
    return _work.spin(items, loops)


@serverless.parallel
def payload(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _work.payload(items)


@serverless.parallel
def lookup(items: list[int], service: str) -> list[list[Any]]:
    """W6: the service's 429 becomes serverless.Throttled, with its Retry-After."""
    out: list[list[Any]] = []
    for code in items:
        status, address, wait = _work.get_zip(code, service)
        if status == 429:
            raise serverless.Throttled("429 from the service", retry_after=wait or None)
        out.append([code, address])
    return out


@serverless.parallel
def echo(items: list[bytes], stall_at: int = -1, stall: float = 0.0) -> list[bytes]:
    return _work.echo(items, stall_at, stall)


@serverless.parallel
def counted(items: list[int], seconds: float = 0.0) -> list[list[int]]:
    """bench/cache.py: each item's execution appended to $BENCH_CACHE_LOG (one line, one
    write, as it starts: an item cut short by a kill counts too), then `seconds` of waiting.
    The log is named by the environment, not an argument: it stays out of the cache key."""
    fd = os.open(os.environ["BENCH_CACHE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if not seconds:
            os.write(fd, "".join(f"{item}\n" for item in items).encode())
        for item in items if seconds else ():
            os.write(fd, f"{item}\n".encode())
            time.sleep(seconds)
    finally:
        os.close(fd)
    return [[item, item * item % 1_000_003] for item in items]
