"""A downstream with a quota, in this process: a token bucket that counts, per item, the
calls it served and the ones it refused (as a real API's 429 would). The unit tests' worker
runs in this process, so these counters are the worker side's."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Downstream:
    rate: float = 100.0  # tokens per second
    burst: float = 10.0  # bucket size
    served: Counter[int] = field(default_factory=Counter)
    refused: Counter[int] = field(default_factory=Counter)
    times: list[float] = field(default_factory=list)  # when each served call started
    refusals: list[float] = field(default_factory=list)
    latency: float = 0.0  # seconds a served call takes
    closed_until: float = 0.0  # every call before this time is refused, with this Retry-After
    spike: tuple[float, float, float] = (0.0, 0.0, 0.0)  # served in [from, to): this latency
    _tokens: float = 0.0
    _stamp: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, rate: float, burst: float, latency: float = 0.0) -> None:
        with self._lock:
            self.rate, self.burst, self.latency = rate, burst, latency
            self._tokens, self._stamp = burst, time.monotonic()
            self.closed_until = 0.0
            self.spike = (0.0, 0.0, 0.0)
            self.served.clear()
            self.refused.clear()
            self.times.clear()
            self.refusals.clear()

    def call(self, item: int) -> float | None:
        """Serve `item` (None), or refuse it: the seconds until a token is due."""
        wait = self._take(item)
        if wait is None:
            since, until, latency = self.spike
            now = time.monotonic()
            time.sleep(latency if since <= now < until else self.latency)
        return wait

    def refuse(self, item: int) -> None:
        """Count a refusal of `item` without asking the bucket (a spent daily quota)."""
        with self._lock:
            self.refused[item] += 1
            self.refusals.append(time.monotonic())

    def _take(self, item: int) -> float | None:
        with self._lock:
            now = time.monotonic()
            if now < self.closed_until:
                wait = self.closed_until - now
            else:
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    self.served[item] += 1
                    self.times.append(now)
                    return None
                wait = (1 - self._tokens) / self.rate
            self.refused[item] += 1
            self.refusals.append(now)
            return wait


DOWNSTREAM = Downstream()
