"""The transport seam: how the dispatcher posts one signed chunk and gets the raw answer.

One async method, `post(url, body, headers, timeout) -> Response`. The lean HTTP client
(`http.Client`) is the transport of every real call; `inprocess.InProcess` hands the same
signed bytes to a worker endpoint in this process, with no socket, so the fan-out, the
calling forms and the protocol are tested end to end without servers (STYLE.md, pattern A).
A work-sharing call (sharing.py) posts through the HTTP client on the lanes it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from .._wire import Response
from .http import Body

__all__ = ["Body", "Response", "Transport"]


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
