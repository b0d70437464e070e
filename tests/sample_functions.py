"""Functions the tests run on workers; servers under test import this module."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any

import serverless

CALLS_FILE_ENV = "SERVERLESS_TEST_CALLS"  # if set, every run appends a line to this file


def _record(name: str) -> None:
    path = os.environ.get(CALLS_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {os.getpid()}\n")


def _record_item(name: str, item: object) -> None:
    """One line per item run: `name item pid time`, to count executions per item."""
    path = os.environ.get(CALLS_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {item} {os.getpid()} {time.time():.3f}\n")


def executions(path: str, name: str) -> dict[str, list[float]]:
    """Per item of `name`, the times at which a worker started it (see _record_item)."""
    runs: dict[str, list[float]] = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) == 4 and fields[0] == name:
                runs.setdefault(fields[1], []).append(float(fields[3]))
    return runs


@serverless.parallel
def counted_reject(numbers: list[int], bad: list[int], named: bool = True) -> list[int]:
    """Raises on every item listed in `bad`; counts each item it starts. named=False: the
    error names no item (it is raised before the items are iterated)."""
    if not named and any(n in bad for n in list.__iter__(numbers)):
        for n in list.__iter__(numbers):
            _record_item("counted_reject", n)
        raise ValueError("a bad item somewhere")
    out = []
    for n in numbers:
        _record_item("counted_reject", n)
        if n in bad:
            raise ValueError(f"cannot handle {n}")
        out.append(n)
    return out


@serverless.parallel
def counted_sleep(seconds: list[float]) -> list[float]:
    """Sleeps each item's seconds; counts each item it starts."""
    for n in seconds:
        _record_item("counted_sleep", n)
        time.sleep(n)
    return seconds


@serverless.parallel
def die_once(numbers: list[int], marker: str) -> list[int]:
    """Counts its items; the first run anywhere (`marker` not yet created) SIGKILLs its own
    process mid-chunk, as a crash or an OOM kill would."""
    for n in numbers:
        _record_item("die_once", n)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return numbers
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


@serverless.parallel
def burn_or_sleep(seconds: list[float]) -> list[float]:
    """A positive item burns the CPU that long, a negative one sleeps: a function that is
    CPU-bound on some inputs and waits on others."""
    for n in seconds:
        _record_item("burn_or_sleep", n)
        if n >= 0:
            end = time.thread_time() + n
            while time.thread_time() < end:
                pass
        else:
            time.sleep(-n)
    return seconds


@serverless.parallel
def square(numbers: Iterable[int], offset: int = 0, *, scale: int = 1) -> list[int]:
    _record("square")
    return [(n * n + offset) * scale for n in numbers]


@serverless.parallel
def fail_on(numbers: list[int], bad: int) -> list[int]:
    _record("fail_on")
    out = []
    for n in numbers:
        if n == bad:
            raise ValueError(f"cannot handle {n}")
        out.append(n)
    return out


@serverless.parallel
def sleepy(numbers: Iterable[float]) -> list[float]:
    out = []
    for n in numbers:
        time.sleep(n)
        out.append(n)
    return out


@serverless.parallel
def returns_none(numbers: list[int]) -> Any:
    return None


@serverless.parallel
def returns_object(numbers: list[int]) -> list[object]:
    return [object() for _ in numbers]


@serverless.parallel
def pids(numbers: list[int]) -> list[int]:
    return [os.getpid() for _ in numbers]


@serverless.parallel
async def burn_on_the_loop(seconds: list[float]) -> list[int]:
    """Keeps the worker's event loop busy (no probe answered) while the process burns CPU."""
    for s in seconds:
        end = time.monotonic() + s
        while time.monotonic() < end:
            pass
    return [os.getpid() for _ in seconds]


@serverless.parallel
async def async_double(numbers: list[int]) -> list[int]:
    await asyncio.sleep(0.001)
    return [2 * n for n in numbers]


def plain(numbers: list[int]) -> list[int]:
    """Not decorated: a worker must refuse to run it."""
    _record("plain")
    return numbers


class Geo:
    def __init__(self) -> None:
        self.factor = 10

    @serverless.parallel
    def scaled(self, numbers: list[int]) -> list[int]:
        return [n * self.factor for n in numbers]

    @serverless.parallel
    @staticmethod
    def negated(numbers: list[int]) -> list[int]:
        return [-n for n in numbers]

    @serverless.parallel
    @classmethod
    def named(cls, numbers: list[int]) -> list[str]:
        return [f"{cls.__name__}{n}" for n in numbers]

    @serverless.sequential
    def total(self, numbers: list[int]) -> list[int]:
        return [sum(numbers) * self.factor]


@serverless.parallel
def odd_only(numbers: list[int]) -> list[int]:
    """A filter stage: fewer elements out than in, as the seed's cleanup."""
    return [n for n in numbers if n % 2]


@serverless.parallel
def explode_on_nine(numbers: list[int]) -> list[int]:
    for n in numbers:
        if n == 9:
            raise ValueError("nine")
    return numbers


@serverless.parallel
def straggle(numbers: list[int], marker: str, stall: float = 20.0) -> list[int]:
    """The first run that meets item 0 creates `marker` and stalls; later runs are quick:
    a straggler that a hedged duplicate overtakes."""
    if 0 in numbers:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            time.sleep(stall)
        except FileExistsError:
            pass
    return numbers


@serverless.parallel
def hang_on(numbers: list[int], bad: int, seconds: float = 30.0) -> list[int]:
    for n in numbers:
        if n == bad:
            time.sleep(seconds)
    return numbers


@serverless.parallel
def reject(numbers: list[int], bad: list[int]) -> list[int]:
    """Raises on every item listed in `bad`."""
    out = []
    for n in numbers:
        if n in bad:
            raise ValueError(f"cannot handle {n}")
        out.append(n)
    return out


@serverless.parallel
def nested(numbers: list[int], depth: int = 1000) -> list[Any]:
    """Each result is a list nested `depth` deep: deeper than msgspec will encode."""
    out: list[Any] = []
    for n in numbers:
        value: Any = n
        for _ in range(depth):
            value = [value]
        out.append(value)
    return out


@serverless.parallel
def квадрат(numbers: list[int]) -> list[int]:  # a non-ASCII name (issue 14)
    return [n * n for n in numbers]


@serverless.parallel
def nested_calls(numbers: list[int], width: int = 20) -> list[int]:
    """Each item makes a parallel call of its own, back into the same app (issue 15)."""
    return [n + len(sleepy([0.001] * width)) for n in numbers]


@serverless.parallel
def quota_lookup(numbers: list[int], always: bool = False) -> list[int]:
    """Calls tests.quota.DOWNSTREAM once per item and raises Throttled when it refuses
    (always: every call is refused), with its Retry-After."""
    from tests.quota import DOWNSTREAM

    out = []
    for n in numbers:
        wait = DOWNSTREAM.call(n) if not always else 0.2
        if wait is not None:
            raise serverless.Throttled("429 from the downstream", retry_after=wait)
        out.append(2 * n)
    return out


@serverless.parallel
def spent_quota(numbers: list[int]) -> list[int]:
    """A downstream whose daily quota is spent: every item refused, with no Retry-After (the
    README's example passes the header's None), each refusal counted in tests.quota."""
    from tests.quota import DOWNSTREAM

    for n in numbers:
        DOWNSTREAM.refuse(n)
        raise serverless.Throttled("429: daily quota exceeded", retry_after=None)
    return []


@serverless.parallel
def stamped(numbers: list[int], path: str, seconds: float = 0.0) -> list[int]:
    """A downstream the test reads back: each item appends "item wall-time" to `path` as it
    starts (one short O_APPEND write: lines from several processes never mix), then takes
    `seconds`."""
    out = []
    for n in numbers:
        with open(path, "a") as log:
            log.write(f"{n} {time.time()}\n")
        time.sleep(seconds)
        out.append(n)
    return out


@serverless.parallel(patience=None)
def waits_forever(numbers: list[int]) -> list[int]:
    """A decorator's patience=None: a refusing downstream is waited out for as long as it
    takes."""
    return numbers


@serverless.parallel
def counted_or_throttled(numbers: list[int]) -> list[int]:
    """quota_lookup's downstream, and a ValueError on every item n with n % 7 == 3 (after
    the downstream served it)."""
    from tests.quota import DOWNSTREAM

    out = []
    for n in numbers:
        wait = DOWNSTREAM.call(n)
        if wait is not None:
            raise serverless.Throttled(retry_after=wait)
        if n % 7 == 3:
            raise ValueError(f"cannot handle {n}")
        out.append(n)
    return out


class Unprintable(Exception):
    """An exception whose str() raises."""

    def __str__(self) -> str:
        raise ValueError("no text for this one")


# how -> (the remote type, its message on item 13)
EXITS = {
    "exit": ("SystemExit", "3"),
    "interrupt": ("KeyboardInterrupt", "interrupted at 13"),
    "cancel": ("CancelledError", "cancelled at 13"),
    "generator": ("GeneratorExit", "closed at 13"),
    "unprintable": ("Unprintable", "<str() raised ValueError>"),
}


def _exit(how: str, n: int) -> None:
    """Leave the user's code on item `n` by one of the exits that are not an Exception (or
    by an exception that cannot be printed)."""
    if how == "exit":
        sys.exit(3)
    if how == "interrupt":
        raise KeyboardInterrupt(f"interrupted at {n}")
    if how == "cancel":
        raise asyncio.CancelledError(f"cancelled at {n}")
    if how == "generator":
        raise GeneratorExit(f"closed at {n}")
    if how == "unprintable":
        raise Unprintable()
    raise AssertionError(how)


@serverless.parallel
def exits_on(numbers: list[int], bad: int, how: str) -> list[int]:
    """Leaves by `how` (see _exit) on item `bad`."""
    out = []
    for n in numbers:
        if n == bad:
            _exit(how, n)
        out.append(n)
    return out


@serverless.parallel
async def async_exits_on(numbers: list[int], bad: int, how: str) -> list[int]:
    """exits_on on the worker's event loop, after an await."""
    await asyncio.sleep(0)
    out = []
    for n in numbers:
        if n == bad:
            _exit(how, n)
        out.append(n)
    return out


class Counted:
    """Methods that count their runs (the worker-side counter of issue 22.12's refusals)."""

    @serverless.parallel
    def scaled(self, numbers: list[int], factor: int = 1) -> list[int]:
        _record("Counted.scaled")
        return [n * factor for n in numbers]

    @serverless.parallel
    @staticmethod
    def negated(numbers: list[int], *, sign: int = -1) -> list[int]:
        _record("Counted.negated")
        return [sign * n for n in numbers]


@serverless.parallel
def counted_add(numbers: list[int], amount: int, *, times: int = 1) -> list[int]:
    _record("counted_add")
    return [(n + amount) * times for n in numbers]


def blob(index: int, size: int) -> bytes:
    """Item `index` of a stream of `size`-byte items: its first 8 bytes say which."""
    return index.to_bytes(8, "big") + b"x" * (size - 8)


@serverless.parallel
def echo_blobs(blobs: Iterable[bytes], stall_at: int = -1, stall: float = 0.0) -> list[bytes]:
    """Each item back as it came; the chunk holding item `stall_at` first waits `stall` s."""
    items = list(blobs)
    if any(int.from_bytes(b[:8], "big") == stall_at for b in items):
        time.sleep(stall)
    return items


@serverless.parallel(workers=4)
def slow_label(numbers: list[int], wait: float = 0.02) -> list[str]:
    """Waits `wait` seconds per item and labels it; counts each item it starts."""
    out = []
    for n in numbers:
        _record_item("slow_label", n)
        time.sleep(wait)
        out.append(f"r{n}")
    return out


@serverless.parallel(workers=2)
def echo_length(items):  # type: ignore[no-untyped-def]  # untyped: sets and tuples as Exts
    """Each record's name, sorted tags and pair's number; counts each item it starts."""
    for item in items:
        _record_item("echo_length", item["name"])
    return [(item["name"], sorted(item["tags"]), item["pair"][1]) for item in items]
