"""A quota as the real geocoding APIs enforce one: a token bucket, and the 429's Retry-After.

Google's Geocoding API allows 3,000 queries per minute per project and refuses the rest
(HTTP 429, OVER_QUERY_LIMIT). The demo's geocoder holds `--quota` with this bucket; the
benchmark's W6 service is that geocoder. No I/O: the clock is an argument.
"""

from __future__ import annotations

import math

from .._config import parse_rate
from .._exceptions import ConfigurationError


def parse_quota(value: str | float) -> float:
    """`--quota`: requests per second, as `rate=` reads it ("200/s", "3000/min", 50), but
    always a figure: a service cannot enforce "auto"."""
    quota = parse_rate(value)
    if not isinstance(quota, float):
        raise ConfigurationError(f'a quota needs a figure such as "200/s", not {value!r}')
    return quota


class TokenBucket:
    """`rate` tokens per second, at most one second of them saved up (at least one token):
    a quiet client may burst that much, a busy one gets the rate. Starts full."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._tokens, self._stamp = self.capacity, now

    def take(self, now: float) -> float | None:
        """Spend a token (None), or refuse: the seconds until the next one is due."""
        self._tokens = min(self.capacity, self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / self.rate


def retry_after(wait: float) -> str:
    """The Retry-After header for a refusal: whole seconds (the header has no fractions),
    rounded up, at least 1, as the real APIs send it."""
    return str(max(1, math.ceil(wait)))
