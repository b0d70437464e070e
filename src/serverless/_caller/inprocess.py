"""The in-process transport: a worker endpoint in this process answers every URL.

The dispatcher signs and encodes each chunk exactly as for HTTP; this hands the bytes to the
endpoint (`_worker.endpoint.Endpoint.answer`: accept, then run, as a server would), with no
socket: what the unit tests use. The top level or a test hands the endpoint over, so the
caller's side never imports the worker's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

from .._wire import Response
from .http import Body


class Endpoint(Protocol):
    async def answer(
        self, headers: Mapping[str, str], body: bytes, threads: Executor, capacity: int
    ) -> Response:
        """A request whose body is in memory, answered as a server would: a sync chunk runs
        in `threads`, of which there are `capacity`."""


E = TypeVar("E", bound=Endpoint)


class InProcess(Generic[E]):
    """A worker endpoint in this process, for every URL: accept, then run, as a server does
    (sync functions in a thread pool, async ones on the calling loop)."""

    def __init__(self, endpoint: E, threads: int = 16) -> None:
        self.endpoint = endpoint
        self.threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="serverless-inprocess")
        self.requests = 0  # posts received, for tests that count requests

    async def post(
        self,
        url: str,
        body: Body,
        headers: Mapping[str, str],
        timeout: float,
        *,
        fresh: bool = False,  # no connections here
    ) -> Response:
        self.requests += 1
        lowered = {k.lower(): v for k, v in headers.items()}
        answer = self.endpoint.answer(lowered, body.take(), self._executor, self.threads)
        return await asyncio.wait_for(answer, timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
