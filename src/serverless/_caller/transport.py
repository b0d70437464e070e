"""The transport seam: how the dispatcher posts one signed chunk and gets the raw answer, and
the Target a call's chunks go to (its URLs, route, keys and transport).

One async method, `post(url, body, headers, timeout) -> Response`. The lean HTTP client
(`http.Client`) is the transport of every real call; `inprocess.InProcess` hands the same
signed bytes to a worker endpoint in this process, with no socket, so the fan-out, the
calling forms and the protocol are tested end to end without servers (STYLE.md, pattern A).
A work-sharing call (sharing.py) posts through the HTTP client on the lanes it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .. import _wire as p
from .._registry import CodeShelf
from .._stats import TargetKind
from .._wire import Response
from .http import Body
from .sharing import SharedCall

__all__ = ["Body", "Response", "Target", "Transport"]


class Transport(Protocol):
    """Posts bytes to a worker route. Raises `http.TransportError` (no usable answer: a
    `StaleConnection` when a kept-alive connection failed before any byte came back),
    `http.InvalidURL`, or TimeoutError."""

    async def post(
        self,
        url: str,
        body: Body,
        headers: Mapping[str, str],
        timeout: float,
        *,
        fresh: bool = False,  # on a new connection, never a kept-alive one
    ) -> Response: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Target:
    """Where chunks go: one or more URLs of worker routes that share `route` and keys."""

    urls: tuple[str, ...]
    route: str
    keyring: p.Keyring
    kind: TargetKind
    max_body: int = p.MAX_BODY
    transport: Transport | None = None  # None: the dispatcher's HTTP client
    # a call made while serving: its thread runs chunks too (sharing.py)
    shared: SharedCall | None = None
    # the first hex digits of the request ids sent to each URL: a local pool's worker runs
    # only the ids signed for its slot, so a request cannot be replayed on another worker
    id_prefixes: Mapping[str, str] | None = None
    # a local pool (or one of its workers calling back to itself): where a call's functions
    # of `__main__` go by value; None: no code is ever sent (_pool/byvalue.py)
    shelf: CodeShelf | None = None
