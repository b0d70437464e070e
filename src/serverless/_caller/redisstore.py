"""The Redis result store: one server that the callers of several machines share.

redis-py is an extra (`pip install 'simple-serverless[redis]'`), imported here only when a
redis:// spec is opened. Every record lives under `prefix + key`, so `clear` and `stats` touch
our records only. The client's timeouts bound every operation: an unreachable or killed
server raises StoreError within seconds, never a hang; no message shows the password.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, cast

from .._exceptions import ConfigurationError, StoreError
from .store import CHECK_BYTES, StoreStats, Unsealer, redact, seal

if TYPE_CHECKING:
    import redis

CONNECT_TIMEOUT = 3.0  # seconds to connect
READ_TIMEOUT = 5.0  # seconds for any one reply to start arriving
BATCH = 1000  # keys per SCAN step, per STRLEN or UNLINK round trip


class RedisStore:
    """A ResultStore on a Redis server. Thread-safe (redis-py's connection pool), and a
    forked child opens its own connections (the pool checks its pid)."""

    def __init__(self, url: str, ttl: float | None = None, prefix: str = "serverless:") -> None:
        self.location = redact(url)
        self.ttl = ttl
        self.prefix = prefix.encode()
        self._secret = _password(url)
        self._unsealer = Unsealer(self.location)
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigurationError(
                f"cache={self.location!r} needs the redis package: "
                "pip install 'simple-serverless[redis]'"
            ) from None
        self._redis = redis
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=READ_TIMEOUT,
                # one quick retry: a pooled connection the server closed while idle
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
            )
        except ValueError as exc:
            raise ConfigurationError(f"cache={self.location!r}: {self._scrub(exc)}") from None
        with self._errors():
            self._client.ping()

    # -- the ResultStore interface --

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors():
            records = self._client.mget([self.prefix + k for k in keys])
        # decode_responses is off: values are bytes
        return self._unsealer.payloads(keys, cast("list[bytes | None]", records))

    def put_many(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        if not records:
            return
        px = None if self.ttl is None else max(1, round(self.ttl * 1000))
        with self._errors():
            pipe = self._client.pipeline(transaction=True)  # MULTI ... EXEC: all or none
            for key, payload in records:
                pipe.set(self.prefix + key, seal(key, payload), px=px)
            pipe.execute()

    def stats(self) -> StoreStats:
        count = size = 0
        with self._errors():
            for batch in self._scan():
                pipe = self._client.pipeline(transaction=False)
                for name in batch:
                    pipe.strlen(name)
                lengths = [int(n) for n in pipe.execute() if n]  # 0: expired meanwhile
                count += len(lengths)
                size += sum(lengths) - CHECK_BYTES * len(lengths)
        return StoreStats(
            location=self.location,
            records=count,
            nbytes=size,
            corrupted=self._unsealer.damaged,
            ttl=self.ttl,
        )

    def clear(self) -> int:
        removed = 0
        with self._errors():
            for batch in self._scan():
                removed += int(self._client.unlink(*batch))
        return removed

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore({self.location!r}, ttl={self.ttl!r}, prefix={self.prefix!r})"

    # -- helpers --

    def _scan(self) -> Iterator[list[bytes]]:
        """Our keys in batches (SCAN, never KEYS: the server keeps serving others)."""
        pattern = _glob_escape(self.prefix) + b"*"
        batch: list[bytes] = []
        for name in self._client.scan_iter(match=pattern, count=BATCH):
            batch.append(name)
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """redis-py's errors as StoreError naming the server, its password hidden."""
        errors = self._redis.exceptions
        try:
            yield
        except errors.RedisError as exc:
            text = str(exc)
            if (
                isinstance(exc, errors.AuthenticationError)
                or "WRONGPASS" in text
                or ("NOAUTH" in text)
            ):
                why = "refused the credentials in the URL"
            elif isinstance(exc, errors.TimeoutError):
                why = f"did not answer within {READ_TIMEOUT:g} s"
            elif isinstance(exc, errors.ConnectionError):
                why = "cannot be reached"
            else:
                why = "failed"
            raise StoreError(
                f"the result store {self.location} {why} "
                f"({type(exc).__name__}: {self._scrub(exc)})",
                store=self.location,
            ) from None  # the chained error could carry connection details

    def _scrub(self, exc: BaseException) -> str:
        text = str(exc)
        return text.replace(self._secret, "***") if self._secret else text


def _password(url: str) -> str:
    from urllib.parse import parse_qsl, unquote, urlsplit

    parts = urlsplit(url)
    if parts.password:
        return unquote(parts.password)
    return dict(parse_qsl(parts.query)).get("password", "")


def _glob_escape(prefix: bytes) -> bytes:
    out = bytearray()
    for byte in prefix:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)
