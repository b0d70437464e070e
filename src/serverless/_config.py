"""Configuration as small typed objects: per-function options and process-wide settings."""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypedDict, cast

from ._exceptions import ConfigurationError
from ._wire import DEFAULT_ROUTE, MAX_BODY, Keyring

# rate=: items per second, or "auto" (found from the downstream's throttles)
Rate = float | Literal["auto"]

# "raise": the first failure raises; "return": a failed item's RemoteError in its place
ErrorMode = Literal["raise", "return"]

DEFAULT_WORKERS = 100  # as in the seed
# seconds a call may go on being refused (Throttled) with no item completing: a spent daily
# quota or a revoked key ends the call with StillThrottled instead of never
DEFAULT_PATIENCE = 180.0
# bytes of results a stream may hold at once: 1,000,000 results of 4 KiB stream through at
# a peak caller RSS of 211-239 MB (bench/streams.py); unbounded, 300,000 of 1.2 KiB behind one
# 3 s straggler took it to 883 MB (issue 22)
DEFAULT_BUFFER = 64 * 1024 * 1024


@dataclass(frozen=True)
class Options:
    """Options of one @parallel function.

    workers: the most chunks in flight at once; a list is split into at most this many
        chunks, whose sizes differ by at most one, unless chunk_size is given.
    chunk_size: items per request (fixed), instead of splitting by `workers`.
    timeout: seconds one attempt of one chunk may take.
    retries: further attempts for a chunk after a transient failure (connection lost,
        502/503/504, timeout), with exponential backoff and jitter, on another worker URL
        where there are several; a user exception is never retried. 0: each item runs at
        most once (nothing is resent once it may have reached a worker).
    url: send chunks here instead of the process-wide target ("local": the local pool).
    deadline: seconds the whole call may take (None: no limit beyond the chunk timeouts).
    idempotent: the function may safely run twice on the same items (no side effects that
        matter): turns hedging on.
    hedge: send a duplicate of a chunk that runs far past its peers to another
        worker, first answer wins; default: on for idempotent functions, off otherwise.
    errors: "raise" (the first failure raises) or "return" (each item whose processing
        raised gets its RemoteError in place of its result; the other items succeed). The
        worker then calls the function item by item, so no item runs twice for another's error.
    rate: at most this many items per second across all workers of the call: a number, a
        string such as "50/s" or "3000/min", or "auto" (find the downstream's quota from the
        function's `serverless.Throttled`). The worker then calls the function item by item,
        paced. None: unpaced until the function raises Throttled (docs/reliability.md).
    patience: seconds the call may go on being refused by the downstream (the function
        raising Throttled) with no item completing; then it raises StillThrottled, naming the
        last refusal. None: wait for as long as it takes (a `deadline=` still bounds it).
    buffer: the most bytes of results (as encoded on the wire) a stream holds at once: those
        waiting behind a slower chunk to keep the input order, and those expected from the
        chunks in flight. When it is full, no chunk is sent until the consumer takes results.
        Each chunk carries at most 1/32 of it each way. None: no bound.
    cache: a result store: each item's result is stored as its chunk's answer arrives, and
        a call sends only the items whose results are not stored yet (a rerun after a crash
        resumes; a failed item is never stored). A path ("results.db", "sqlite:///path"), a
        Redis URL ("redis://host:6379/0"), with "?ttl=SECONDS" to expire results, or a store
        object (serverless.open_store). docs/reliability.md.
    version: part of every cache key: bump it when what the function computes changes in a
        way its own code does not show (a helper in another module, a model file).
    max_failures: with errors="return", the most items that may fail (a count, or a fraction
        of the input such as 0.05); one more and the call stops sending work, cancels what
        is in flight and raises TooManyFailures with every failure so far.
    progress: True draws a live bar on stderr where it is a terminal (items done and failed,
        retries, throttles, chunks in flight, items/s, ETA); "always" draws it anywhere (a
        log file gets a line at each refresh); a callable receives serverless.Progress
        events instead, on the library's thread (keep it quick). None/False: nothing, at no
        cost.
    """

    workers: int = DEFAULT_WORKERS
    chunk_size: int | None = None
    timeout: float = 300.0
    retries: int = 3
    url: str | None = None
    deadline: float | None = None
    idempotent: bool = False
    hedge: bool | None = None
    errors: ErrorMode = "raise"
    rate: Rate | str | None = None
    patience: float | None = DEFAULT_PATIENCE
    buffer: int | None = DEFAULT_BUFFER
    cache: Any = None  # str | os.PathLike[str] | serverless.ResultStore | None
    version: str | int | None = None
    max_failures: int | float | None = None
    progress: Any = None  # bool | Literal["always"] | Callable[[Progress], None] | None

    def __post_init__(self) -> None:
        # a string such as "3000/min" is kept as items per second
        object.__setattr__(self, "rate", parse_rate(self.rate))
        _positive_int("workers", self.workers)
        if self.chunk_size is not None:
            _positive_int("chunk_size", self.chunk_size)
        if not isinstance(self.timeout, int | float) or not self.timeout > 0:
            raise ConfigurationError(f"timeout must be a positive number, not {self.timeout!r}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ConfigurationError(f"retries must be an int >= 0, not {self.retries!r}")
        if self.deadline is not None and (
            not isinstance(self.deadline, int | float) or not self.deadline > 0
        ):
            raise ConfigurationError(f"deadline must be a positive number, not {self.deadline!r}")
        if self.patience is not None and (
            not isinstance(self.patience, int | float) or not self.patience > 0
        ):
            raise ConfigurationError(
                f"patience must be a positive number of seconds or None, not {self.patience!r}"
            )
        if self.buffer is not None:
            _positive_int("buffer", self.buffer)
        if self.errors not in ("raise", "return"):
            raise ConfigurationError(f'errors must be "raise" or "return", not {self.errors!r}')
        if not _store_like(self.cache):
            raise ConfigurationError(
                f"cache must be a path, a redis:// URL or a result store, not {self.cache!r}"
            )
        if self.version is not None and not isinstance(self.version, str | int):
            raise ConfigurationError(f"version must be a str or an int, not {self.version!r}")
        _check_failures(self.max_failures, self.errors)
        progress = self.progress
        if not (progress is None or isinstance(progress, bool) or progress == "always") and (
            isinstance(progress, str) or not callable(progress)
        ):
            raise ConfigurationError(
                'progress must be True, False, "always" or a callable that takes a '
                f"serverless.Progress, not {self.progress!r}"
            )

    @property
    def items_per_s(self) -> Rate | None:
        """`rate`, parsed (a string such as "3000/min" is kept as items per second)."""
        return parse_rate(self.rate)

    @property
    def hedging(self) -> bool:
        return self.idempotent if self.hedge is None else self.hedge

    def merged(self, **changes: Any) -> Options:
        """These options with the changes that are not None (the decorator's defaults)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return self.changed(cast(OptionChanges, changes))

    def changed(self, changes: OptionChanges) -> Options:
        """These options with `changes`; an unknown name is refused with the valid ones
        listed. None clears an option: one that None sets (no deadline, no bound, no url...)
        is unset, the others (workers, timeout, retries, idempotent, errors) go back to their
        defaults."""
        unknown = sorted(set(changes) - OPTION_NAMES)
        if unknown:
            raise ConfigurationError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: the "
                f"options are {', '.join(sorted(OPTION_NAMES))}"
            )
        values: dict[str, Any] = {
            k: _DEFAULTS[k] if v is None and k in _DEFAULTS else v for k, v in changes.items()
        }
        return replace(self, **values)


class OptionChanges(TypedDict, total=False):
    """`with_options(**changes)`, typed: the fields of Options, each of which None clears."""

    workers: int | None
    chunk_size: int | None
    timeout: float | None
    retries: int | None
    url: str | None
    deadline: float | None
    idempotent: bool | None
    hedge: bool | None
    errors: ErrorMode | None
    rate: float | str | None
    patience: float | None
    buffer: int | None
    cache: Any
    version: str | int | None
    max_failures: int | float | None
    progress: Any


OPTION_NAMES = frozenset(f.name for f in fields(Options))
# the options that None does not set: None puts their default back
_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(Options) if "None" not in str(f.type)
}


def _store_like(value: object) -> bool:
    if value is None or isinstance(value, str | os.PathLike):
        return True
    return all(hasattr(value, name) for name in ("get_many", "put_many", "location"))


def _check_failures(value: object, errors: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"max_failures must be a count or a fraction, not {value!r}")
    if isinstance(value, int) and value < 0:
        raise ConfigurationError(f"max_failures must be a count >= 0, not {value!r}")
    if isinstance(value, float) and not 0 <= value < 1:
        raise ConfigurationError(
            f"max_failures as a fraction must be >= 0 and < 1 (a count is an int): {value!r}"
        )
    if errors != "return":
        raise ConfigurationError(
            'max_failures= counts the failures that errors="return" puts in the results: '
            'with errors="raise" the first failure ends the call. Pass errors="return" too'
        )


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, not {value!r}")


@dataclass
class Settings:
    """Process-wide settings, set by serverless.init() or the environment."""

    route: str = DEFAULT_ROUTE
    keyring: Keyring | None = None
    url: str | None = None
    max_body: int = MAX_BODY
    local_processes: int | None = None
    local_threads: int = 128

    def caller_keyring(self) -> Keyring | None:
        if self.keyring is not None:
            return self.keyring
        secrets = secrets_from_env()
        return Keyring(secrets) if secrets else None

    def target_url(self) -> str | None:
        return self.url or os.environ.get("SERVERLESS_URL") or None


def secrets_from_env() -> list[str]:
    """$SERVERLESS_SECRET: one secret, or several separated by commas during a rotation."""
    raw = os.environ.get("SERVERLESS_SECRET", "")
    return [part.strip() for part in raw.split(",") if part.strip()]


_lock = threading.Lock()
_settings = Settings()


def settings() -> Settings:
    return _settings


def configure(**changes: Any) -> Settings:
    global _settings
    with _lock:
        _settings = replace(_settings, **changes)
        return _settings


_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_UNITS |= {"h": 3600.0, "hour": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([a-z]+?)s?)?\s*$")


def parse_rate(value: object) -> Rate | None:
    """`rate=`: items per second as a number, a string such as "50/s", "3000/min" or
    "10000/h", "auto" (no figure: find the downstream's quota from its throttles), or None."""
    if value is None:
        return None
    if value == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ConfigurationError(f"rate must be items per second or a string, not {value!r}")
    if isinstance(value, int | float):
        figure = float(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value.lower())
        unit = _UNITS.get(match.group(2) or "s") if match else None
        if match is None or unit is None:
            raise ConfigurationError(
                f'rate must be a number of items per second, a string such as "50/s" or '
                f'"3000/min", or "auto", not {value!r}'
            )
        figure = float(match.group(1)) / unit
    else:
        raise ConfigurationError(f"rate must be items per second or a string, not {value!r}")
    if not math.isfinite(figure) or figure <= 0:
        raise ConfigurationError(f"rate must be a positive number of items per second: {value!r}")
    return figure
