"""When an admitted chunk starts on an async server: the ASGI adapter hands each job here
with one await, and only moves bytes itself.

Async functions run on the event loop at once. Sync ones run in a thread pool of `threads`,
each function behind its own CPU gate (_worker/gate.py: CPU-bound Python gains nothing from
more threads than the interpreter can keep busy). A chunk that finds its gate full waits for
a slot, but only until its start_by and while its caller is still connected; a chunk that
would wait behind a whole round of waiters is refused at once. Every refusal here is signed
and says nothing ran, with the thread count (the Reply's `capacity`), so the caller can send
the chunk elsewhere and shrink its window.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from .._wire import Response
from .endpoint import Endpoint, Job
from .gate import Gate


class Scheduler:
    """Starts the jobs of one endpoint: sync ones in `threads` threads, gated per function."""

    def __init__(
        self, endpoint: Endpoint, threads: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.endpoint = endpoint
        self.threads = threads
        self._clock = clock  # the wall clock, as start_by is
        self._executor: ThreadPoolExecutor | None = None
        self._gates: dict[str, Gate] = {}  # per sync function: chunks at once

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:  # threads start lazily, so an idle endpoint costs nothing
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="serverless")
        return self._executor

    async def run(self, job: Job, gone: Callable[[], Awaitable[None]]) -> Response:
        """The job's answer, or a signed refusal where it did not start; `gone` returns once
        the caller has disconnected. An item-by-item chunk is watched while it runs: once its
        caller is gone (Ctrl-C, a cancelled call, a closed stream), it starts no other item.
        A whole chunk is not: it runs to its end anyway, and the watch would cost every
        request a task."""
        watch = asyncio.ensure_future(gone()) if job.itemwise else None
        if watch is not None:
            job.gone = functools.partial(_happened, watch)
        try:
            return await self._run(job, gone, watch)
        finally:
            if watch is not None:
                watch.cancel()

    async def _run(
        self,
        job: Job,
        gone: Callable[[], Awaitable[None]],
        watch: asyncio.Future[None] | None,
    ) -> Response:
        endpoint = self.endpoint
        if job.is_async:
            return await endpoint.run_async(job)
        job.capacity = self.threads
        refused = endpoint.late(job, waited=False)
        if refused is not None:
            return refused
        context = contextvars.copy_context()  # carries the origin into the worker thread
        loop = asyncio.get_running_loop()
        gate = self._gates.get(job.entry.name)
        if gate is None:
            gate = self._gates[job.entry.name] = Gate(self.threads)
        if not gate.try_acquire():
            if job.call.start_by is not None and gate.waiting >= self.threads:
                # a whole round of chunks waits already: this one would not start in its
                # budget either; saying so now (with the capacity) lets the caller shrink its
                # window at once instead of after the budget (a first call, workers=100 on
                # 4 threads: +20% over workers=4 when the surplus waited a second)
                return endpoint.refusal(job, 503, "busy", "every thread is busy, and as many wait")
            left = watch or asyncio.ensure_future(gone())
            try:
                refused = await self._wait(gate, job, left)
            finally:
                if left is not watch:
                    left.cancel()
            if refused is not None:
                return refused
        try:
            area = gate.area()
            response, cpu_s, wall_s = await loop.run_in_executor(
                self.executor, context.run, _timed_run, endpoint, job
            )
            concurrent = (gate.area() - area) / wall_s if wall_s > 0 else 1.0
        finally:
            gate.release()
        gate.control.observe(cpu_s, wall_s, concurrent)
        return response

    async def _wait(self, gate: Gate, job: Job, left: asyncio.Future[None]) -> Response | None:
        """Wait for a slot of the gate, at most until the chunk's start_by, and only while
        its caller is still connected (`left` is done once it is gone): a refusal (nothing
        ran) otherwise; None with a slot."""
        acquired = asyncio.ensure_future(gate.acquire())
        start_by = job.call.start_by
        timeout = None if start_by is None else max(0.0, start_by - self._clock())
        try:
            await asyncio.wait({acquired, left}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            if not acquired.done():
                acquired.cancel()
            await asyncio.gather(acquired, return_exceptions=True)
        if not acquired.cancelled() and acquired.exception() is None:
            return None
        if _happened(left):
            return self.endpoint.refusal(job, 504, "expired", "the caller went away")
        return self.endpoint.late(job, waited=True) or self.endpoint.refusal(
            job, 503, "busy", "no thread could start the chunk in time"
        )


def _happened(watch: asyncio.Future[None]) -> bool:
    """Whether the caller went away (a future's state: read from any thread)."""
    return watch.done() and not watch.cancelled() and watch.exception() is None


def _timed_run(endpoint: Endpoint, job: Job) -> tuple[Response, float, float]:
    """Run a chunk in this thread: its response, thread CPU seconds and wall seconds."""
    wall, cpu = time.perf_counter(), time.thread_time()
    response = endpoint.run(job)
    return response, time.thread_time() - cpu, time.perf_counter() - wall
