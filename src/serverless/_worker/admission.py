"""What an unauthenticated request may cost: header shapes, and the bytes it may hold.

Anyone who reaches the route can open requests, so before the signature checks out a request
gets only what its headers justify: a body is read only after every header-only check passed,
and the bytes held by requests still unauthenticated are capped per process. Beyond the cap the
oldest holder that has had its chance (`min_age`) is dropped, else the newcomer gets a fast 503:
legitimate callers upload at full speed and finish, stalled uploads are the old ones.

An unauthenticated body must also keep coming (`body_due`): a body that sends nothing for
BODY_IDLE seconds, falls below BODY_MIN_RATE on average after that grace, or is not complete
BODY_DEADLINE seconds after its headers is dropped with a 408. A trickle of a byte every few
seconds would otherwise hold a connection, a thread (WSGI) and its share of the budget forever.

The servers we run (_worker/uvserver.py for uvicorn, _worker/gthread.py for gunicorn) take
their limits from here too: how long a request's head may take, how many bytes it may have,
and how many connections a process keeps before it sheds the longest idle or incomplete one.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable

from .._exceptions import ConfigurationError

REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # 128 random bits, as the library's caller sends
_SIGNATURE_PART = re.compile(r"([0-9a-f]{12})=([0-9a-f]{64})")
MAX_SIGNATURES = 8  # a key rotation needs two; more only costs HMACs
MAX_FUNCTION = 1024  # characters of Serverless-Function (fused names included)

PREAUTH_BYTES = 48 * 1024 * 1024  # per process, see docs/security.md
MIN_AGE = 1.0  # seconds a holder keeps its bytes before a newcomer may displace it
# seconds a body may go without a byte before the request is dropped
BODY_IDLE = float(os.environ.get("SERVERLESS_BODY_TIMEOUT") or 10.0)
# bytes/s an unauthenticated body must average once BODY_IDLE has passed: a 32 MiB body on a
# 1 MiB/s link passes, a byte every few seconds does not
BODY_MIN_RATE = float(os.environ.get("SERVERLESS_BODY_MIN_RATE") or 64 * 1024)
# seconds after its headers by which an unauthenticated body must be complete, however it comes
BODY_DEADLINE = float(os.environ.get("SERVERLESS_BODY_DEADLINE") or 60.0)


def body_due(start: float, last: float, received: int) -> float:
    """When a body whose headers came at `start`, whose last bytes came at `last` and which
    has sent `received` bytes is dropped unless more arrives (all in monotonic seconds)."""
    paced = start + BODY_IDLE + received / BODY_MIN_RATE
    return min(last + BODY_IDLE, paced, start + BODY_DEADLINE)


def known_signature(header: str, key_ids: list[str]) -> bool | None:
    """None if the header is malformed (too many parts, not `kid=64 hex`), else whether a
    part names a known key id."""
    parts = header.split(",")
    if not header or len(parts) > MAX_SIGNATURES:
        return None
    known = False
    for part in parts:
        match = _SIGNATURE_PART.fullmatch(part.strip())
        if match is None:
            return None
        known = known or match.group(1) in key_ids
    return known


HEADER_TIMEOUT_ENV = "SERVERLESS_HEADER_TIMEOUT"
DEFAULT_HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 64 * 1024  # nginx's large_client_header_buffers is 4 x 8k
RESERVE = 32  # descriptors kept for other files at the least (an eighth of the limit beyond)


def header_timeout() -> float:
    raw = os.environ.get(HEADER_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_HEADER_TIMEOUT
    except ValueError:
        raise ConfigurationError(f"${HEADER_TIMEOUT_ENV} must be seconds, not {raw!r}") from None
    if not value > 0:
        raise ConfigurationError(f"${HEADER_TIMEOUT_ENV} must be positive, not {raw!r}")
    return value


def connection_cap() -> int:
    """How many connections a process keeps open before it sheds: the open-files limit less
    a reserve for its other files (the replay store, logs, its functions' own files and
    calls)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return sys.maxsize
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(1, soft - max(RESERVE, soft // 8))


class Budget:
    """The bytes that not-yet-authenticated requests hold in this process."""

    def __init__(
        self,
        limit: int = PREAUTH_BYTES,
        min_age: float = MIN_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.min_age = min_age
        self.held = 0
        self._clock = clock
        self._holders: dict[int, Hold] = {}  # in admission order
        self._lock = threading.Lock()

    def hold(self, evict: Callable[[], None] | None = None) -> Hold:
        """A new holder; `evict` (if any) drops the request, from the budget's caller."""
        hold = Hold(self, self._clock(), evict)
        with self._lock:
            self._holders[id(hold)] = hold
        return hold

    def _take(self, hold: Hold, size: int) -> bool:
        victims: list[Hold] = []
        with self._lock:
            if self.held + size > self.limit:
                cutoff = self._clock() - self.min_age
                for other in list(self._holders.values()):
                    if self.held + size <= self.limit:
                        break
                    if other is hold or other.evict is None or other.since > cutoff:
                        continue
                    self._drop(other)
                    victims.append(other)
            ok = self.held + size <= self.limit
            if ok:
                self.held += size
                hold.bytes += size
        for victim in victims:
            assert victim.evict is not None
            victim.evict()
        return ok

    def _drop(self, hold: Hold) -> None:
        self.held -= hold.bytes
        hold.bytes = 0
        self._holders.pop(id(hold), None)

    def _release(self, hold: Hold) -> None:
        with self._lock:
            self._drop(hold)


class Hold:
    """One request's share of the budget, released once it is authenticated or refused."""

    def __init__(self, budget: Budget, since: float, evict: Callable[[], None] | None) -> None:
        self.budget = budget
        self.since = since
        self.evict = evict
        self.bytes = 0

    def take(self, size: int) -> bool:
        return self.budget._take(self, size)

    def release(self) -> None:
        self.budget._release(self)


_process_budget = Budget()


def process_budget() -> Budget:
    """The budget shared by every endpoint of this process."""
    return _process_budget
