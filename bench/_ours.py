"""The benchmark functions as @serverless.parallel steps (the local pool imports this module)."""

from __future__ import annotations

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
