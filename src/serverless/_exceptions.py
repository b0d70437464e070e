"""The one exception tree of simple-serverless.

    ServerlessError
    ├── ConfigurationError (also ValueError)   bad options, missing secret, bad route
    ├── SerializationError (also TypeError)    a value that the wire format cannot carry
    ├── RemoteError                            the user's function raised on a worker
    ├── DeadlineExceeded (also TimeoutError)   the call's overall deadline passed
    ├── Throttled                              raised BY the function: the downstream said
    │   │                                      "too many"; the caller slows down and resends
    │   └── StillThrottled                     raised by the call: refused for `patience`
    │                                          seconds with no item completing
    ├── TooManyFailures                        more items failed than `max_failures=` allows
    ├── StoreError                             a result store (cache=) cannot be opened or read
    └── WorkerError                            no usable answer from a worker (has .url, .status)
        ├── RequestRejected                    the worker refused the request (4xx): not retried
        ├── WorkerUnavailable                  connection lost, 429/502/503/504: retried
        ├── WorkerTimeout (also TimeoutError)  a chunk took longer than its timeout: retried
        └── ProtocolError                      no signed protocol answer to the request

Misuse of the API (a first argument that is not iterable, a Pipeline step that was not
decorated) raises plain TypeError, as Python itself would.
"""

from __future__ import annotations

import re

__all__ = [
    "ConfigurationError",
    "DeadlineExceeded",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "RequestRejected",
    "SerializationError",
    "ServerlessError",
    "StillThrottled",
    "StoreError",
    "Throttled",
    "TooManyFailures",
    "WorkerError",
    "WorkerTimeout",
    "WorkerUnavailable",
]


class ServerlessError(Exception):
    """Base class of every error raised by simple-serverless."""


class ConfigurationError(ServerlessError, ValueError):
    """The library was configured or called with options that cannot work."""


class SerializationError(ServerlessError, TypeError):
    """A chunk, an argument or a result cannot be encoded in the wire format. `index`: where
    the message names an item of the input (or its result) by its place, that place."""

    def __init__(self, message: str = "", *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

    def renumbered(self, index: int) -> SerializationError:
        """The same error naming its item by `index` instead (a cached call numbers the
        items it sends among its misses: this is their place in the input)."""
        text = str(self)
        if self.index is not None:
            pattern = rf"\b(item|result) {self.index}\b"
            text = re.sub(pattern, rf"\g<1> {index}", text, count=1)
        return SerializationError(text, index=index)


class RemoteTraceback(Exception):
    """Carries the worker's traceback text; hangs off RemoteError as its __cause__."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class RemoteError(ServerlessError):
    """The user's function raised an exception on a worker.

    `type_name`, `message` and `traceback` describe the remote exception; `index` is the
    position in the call's input of the item being processed when it raised (None when the
    function was not iterating its input at that moment), `item` a short repr of that item;
    `status` the HTTP status the exception carried (an HTTP client's error), if any.
    """

    def __init__(
        self,
        function: str,
        type_name: str,
        message: str,
        traceback: str,
        *,
        index: int | None = None,
        item: str | None = None,
        worker: str = "",
        status: int | None = None,
    ) -> None:
        where = f" at item {index} ({item})" if index is not None else ""
        hint = _THROTTLE_HINT if status == 429 else ""
        super().__init__(
            f"{function} raised {type_name}: {message}{where} on worker {worker}{hint}"
        )
        self.function = function
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.index = index
        self.item = item
        self.worker = worker
        self.status = status
        self.__cause__ = RemoteTraceback(traceback)


_THROTTLE_HINT = (
    ". It carries HTTP 429 (Too Many Requests): the service the function calls is "
    "throttling it. Raise serverless.Throttled(retry_after=...) in the function when the "
    "service says so, and the call slows down and resends the refused items instead of "
    'failing; or set rate= (e.g. rate="50/s", or "auto") to stay under its quota '
    '(docs/reliability.md, "Rate limits")'
)


class DeadlineExceeded(ServerlessError, TimeoutError):
    """The call's overall deadline passed; the message names the chunks still running."""


class Throttled(ServerlessError):
    """Raise it from a parallel function when the service it calls says "too many" (an HTTP
    429, OVER_QUERY_LIMIT): the item being processed was refused and did not run.

    The caller then sends that item and the ones after it in the chunk again, after at least
    `retry_after` seconds (pass the service's Retry-After, in seconds, where it gives one),
    and lowers the call's rate (docs/reliability.md, "Rate limits"). It never counts against
    `retries` and never fails a call by itself; a `deadline=` still bounds the call. Items
    already done in that chunk are not run again when the function runs item by item: with
    `rate=` set, with `retries=0`, or once the call has been throttled. A call refused for
    `patience` seconds with no item completing raises StillThrottled.
    """

    def __init__(self, message: str = "", *, retry_after: float | str | None = None) -> None:
        super().__init__(message or "the downstream service is throttling")
        self.retry_after = _seconds(retry_after)


class StillThrottled(Throttled):
    """The call gave up: the downstream refused its items (the function raised Throttled)
    for `patience` seconds in which no item completed. `last` is the last refusal's message,
    `completed` how many of the call's items had completed (their results are lost with the
    call), `throttles` how many refusals the call saw."""

    def __init__(self, message: str, *, last: str, completed: int, throttles: int) -> None:
        super().__init__(message)
        self.last = last
        self.completed = completed
        self.throttles = throttles


class TooManyFailures(ServerlessError):
    """The call stopped: more of its items failed than `max_failures=` allows (errors="return").
    Nothing more was sent and what was in flight was cancelled. `failures` holds every failure
    so far (each a RemoteError with its item's index in the input, the remote type, message
    and traceback), in input order; `succeeded` how many items had succeeded (and, with
    `cache=`, were stored: a new call sends only the rest)."""

    def __init__(self, message: str, *, failures: list[RemoteError], succeeded: int) -> None:
        super().__init__(message)
        self.failures = failures
        self.succeeded = succeeded


class StoreError(ServerlessError):
    """A result store (`cache=`) that cannot be opened, read or written: unreachable, not a
    store of ours, or damaged. `store` names it (a path or a URL, without its password)."""

    def __init__(self, message: str, *, store: str) -> None:
        super().__init__(message)
        self.store = store


def _seconds(value: float | str | None) -> float | None:
    """A Retry-After in seconds (a number, or a header's digits), capped at an hour; None if
    absent or not a number of seconds."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not seconds >= 0:  # also NaN
        return None
    return min(seconds, 3600.0)


class WorkerError(ServerlessError):
    """No usable answer came back for a chunk. `status` is None when no HTTP answer came."""

    retryable = False

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(f"{message} (url={url}, status={status})")
        self.url = url
        self.status = status


class RequestRejected(WorkerError):
    """The worker refused the request (bad signature, unknown function, too large...)."""


class WorkerUnavailable(WorkerError):
    """The connection failed or the worker answered 429/502/503/504: another try may succeed.
    `retry_after`: the seconds a 429/503 asked the caller to wait (its Retry-After), if any;
    `capacity` and `worker`: what a worker's signed "busy" refusal says it can run at once."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int | None = None,
        retry_after: float | None = None,
        capacity: int | None = None,
        worker: str = "",
    ) -> None:
        super().__init__(message, url=url, status=status)
        self.retry_after = retry_after
        self.capacity = capacity
        self.worker = worker


class WorkerTimeout(WorkerError, TimeoutError):
    """A chunk did not complete within its timeout."""

    retryable = True


class ProtocolError(WorkerError):
    """No signed protocol v2 answer to the request (wrong route, not our endpoint, a forgery)."""
