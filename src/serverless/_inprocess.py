"""The in-process transport: a worker `Endpoint` in this process answers every URL.

The dispatcher signs and encodes each chunk exactly as for HTTP; this hands the bytes to the
endpoint's `accept` and `run`, as a server would, with no socket: what the unit tests use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from ._http import Body, Response
from ._worker import Endpoint, Job
from ._worker import Response as Answer


class InProcess:
    """A worker endpoint in this process, for every URL: accept, then run, as a server does
    (sync functions in a thread pool, async ones on the calling loop)."""

    def __init__(self, endpoint: Endpoint, threads: int = 16) -> None:
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
        answer = await asyncio.wait_for(self._answer(lowered, body.take()), timeout)
        headers = {k.lower(): v for k, v in answer.headers}
        return Response(answer.status, headers.get("content-type"), answer.body, headers)

    async def _answer(self, headers: dict[str, str], data: bytes) -> Answer:
        job = self.endpoint.accept("POST", headers, data)
        if not isinstance(job, Job):
            return job
        if job.is_async:
            return await self.endpoint.run_async(job)
        job.capacity = self.threads
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.endpoint.run, job)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
