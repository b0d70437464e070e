"""Functions for the worker's telemetry tests: some start OpenTelemetry spans of their own,
which must nest inside the worker's span for their chunk."""

from __future__ import annotations

import asyncio
import threading

from opentelemetry import trace

import serverless

tracer = trace.get_tracer("tests.telemetry_functions")


@serverless.parallel
def traced(numbers: list[int]) -> list[int]:
    with tracer.start_as_current_span("inner sync"):
        return [n + 1 for n in numbers]


@serverless.parallel
async def traced_async(numbers: list[int]) -> list[int]:
    await asyncio.sleep(0)  # the task goes round the loop: its context must come back with it
    with tracer.start_as_current_span("inner async"):
        await asyncio.sleep(0)
        return [n + 1 for n in numbers]


@serverless.parallel
def throttle_at(numbers: list[int], at: int) -> list[int]:
    """The downstream refuses item `at` (and what follows)."""
    out = []
    for n in numbers:
        if n == at:
            raise serverless.Throttled(retry_after=2.0)
        out.append(n)
    return out


released = threading.Event()  # what `held` waits for
holding = threading.Event()  # set while `held` waits


@serverless.parallel
def held(numbers: list[int]) -> list[int]:
    """Holds its thread until the test releases it (10 s at most)."""
    holding.set()
    released.wait(10)
    return numbers


# the caller's spans and metrics, counted per chunk (tests/unit/test_caller_*.py)
@serverless.parallel(workers=4, chunk_size=2)
def plus_one(numbers: list[int]) -> list[int]:
    return [n + 1 for n in numbers]


@serverless.parallel(workers=2, chunk_size=1)
def fails_on_three(numbers: list[int]) -> list[int]:
    if 3 in numbers:
        raise ValueError("three")
    return numbers
