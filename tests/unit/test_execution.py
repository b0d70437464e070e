"""Issue 15: every item runs at most as often as the user allowed, and a worker never starts a
chunk its caller no longer wants. Executions are counted on the worker side, per item."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from serverless import ProtocolError, RemoteError, WorkerTimeout, WorkerUnavailable, _targets
from serverless import _wire as p
from serverless._caller import http as _http
from serverless._caller.inprocess import InProcess
from serverless._caller.transport import Target
from serverless._wire import Response
from serverless._worker.endpoint import Endpoint, Job
from serverless._worker.gate import Gate
from tests import sample_functions as sf
from tests.conftest import SECRET
from tests.unit.conftest import ROUTE, URLS


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "calls"
    path.touch()
    monkeypatch.setenv(sf.CALLS_FILE_ENV, str(path))
    yield path


def runs(calls: Path, name: str) -> dict[int, int]:
    return {int(float(k)): len(v) for k, v in sf.executions(str(calls), name).items()}


# -- errors="return": each item once -----------------------------------------------------------


def test_errors_return_runs_each_item_once(calls: Path) -> None:
    """The issue's case: 40 items in 4 chunks failing on 4, 14, 24, 34 with retries=0 ran 56
    times (the failing chunks' other items were sent again)."""
    bad = [4, 14, 24, 34]
    f = sf.counted_reject.with_options(chunk_size=10, retries=0, errors="return")
    out = f(list(range(40)), bad)
    for n, value in enumerate(out):
        if n in bad:
            assert isinstance(value, RemoteError) and value.index == n
            assert value.type_name == "ValueError" and f"cannot handle {n}" in str(value)
        else:
            assert value == n
    assert runs(calls, "counted_reject") == dict.fromkeys(range(40), 1)


def test_errors_return_runs_each_item_once_when_the_error_names_no_item(calls: Path) -> None:
    """Bisection ran 190 executions for 64 items (one item 7 times)."""
    f = sf.counted_reject.with_options(chunk_size=64, retries=0, errors="return")
    out = f(list(range(64)), [37], False)
    assert [v for n, v in enumerate(out) if n != 37] == [n for n in range(64) if n != 37]
    assert isinstance(out[37], RemoteError) and out[37].index == 37
    assert runs(calls, "counted_reject") == dict.fromkeys(range(64), 1)


def test_errors_return_with_a_filter_function_keeps_each_items_results() -> None:
    """Per item, a function may return 0 or n results: they are concatenated in item order,
    and a failed item contributes exactly one RemoteError."""
    out = sf.odd_only.with_options(chunk_size=5, errors="return")(list(range(10)))
    assert out == [1, 3, 5, 7, 9]
    out = sf.explode_on_nine.with_options(chunk_size=4, errors="return")(list(range(12)))
    assert out[:9] == list(range(9)) and out[10:] == [10, 11]
    assert isinstance(out[9], RemoteError) and out[9].index == 9


def test_an_isolated_reply_is_checked() -> None:
    keyring = p.Keyring(SECRET)
    call = p.Call(v=p.VERSION, fn="m:f", id=p.new_request_id(), index=0, items=[1, 2], isolate=True)
    error = p.ErrorInfo(kind="user", type="ValueError", message="no")
    for bad in (p.ItemError(index=5, at=0, error=error), p.ItemError(index=0, at=9, error=error)):
        reply = p.Reply(v=p.VERSION, results=[1], item_errors=[bad])
        body = p.encode(reply)
        signature = keyring.sign(p.reply_signing_message(200, call.id, body))
        headers = {p.H_REPLY_SIGNATURE: signature}
        with pytest.raises(ProtocolError, match="per-item errors"):
            p.read_reply(200, p.MSGPACK, body, headers, call, 0, URLS[0], keyring)


# -- retries=0: no resend once a request may have reached a worker -------------------------------


class LostAnswers(InProcess[Endpoint]):
    """Runs every request, then loses the answer on a kept-alive connection before its first
    byte, as a worker process killed mid-chunk does: what _http.Client reports as a
    StaleConnection. A fresh connection's answer arrives."""

    async def post(
        self,
        url: str,
        body: _http.Body,
        headers: Mapping[str, str],
        timeout: float,
        *,
        fresh: bool = False,
    ) -> Response:
        response = await super().post(url, body, headers, timeout)
        if not fresh:
            raise _http.StaleConnection("connection reset by peer")
        return response


@pytest.fixture
def lost_answers() -> Iterator[LostAnswers]:
    keyring = p.Keyring(SECRET)
    transport = LostAnswers(Endpoint(ROUTE, keyring))
    target = Target(URLS, ROUTE, keyring, "in-process", transport=transport)
    with _targets.override(target):
        yield transport
    transport.close()


def test_retries_0_never_resends_a_request_that_may_have_run(
    calls: Path, lost_answers: LostAnswers
) -> None:
    """A stale kept-alive connection's request was resent whatever `retries` said: a
    retries=0 chunk ran twice when a worker process was killed mid-chunk."""
    f = sf.counted_reject.with_options(chunk_size=5, retries=0)
    assert f(list(range(20)), []) == list(range(20))
    assert runs(calls, "counted_reject") == dict.fromkeys(range(20), 1)


def test_default_retries_resend_a_stale_connections_request(
    calls: Path, lost_answers: LostAnswers
) -> None:
    f = sf.counted_reject.with_options(chunk_size=5)
    assert f(list(range(20)), []) == list(range(20))
    assert runs(calls, "counted_reject") == dict.fromkeys(range(20), 2)  # at least once


# -- deadlines travel with the chunk -----------------------------------------------------------


def job_for(
    endpoint: Endpoint, deadline: float | None = None, start_by: float | None = None
) -> Job:
    call = p.Call(
        v=p.VERSION,
        fn="tests.sample_functions:square",
        id=p.new_request_id(),
        index=0,
        items=[1, 2],
        deadline=deadline,
        start_by=start_by,
    )
    body, headers = p.build_request(endpoint.keyring, ROUTE, call, time.time())
    job = endpoint.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
    assert isinstance(job, Job)
    return job


def answer(endpoint: Endpoint, job: Job) -> p.Reply:
    response = endpoint.run(job)
    headers = dict(response.headers)
    return p.read_reply(
        response.status,
        headers["content-type"],
        response.body,
        headers,
        job.call,
        0,
        URLS[0],
        endpoint.keyring,
    )


def test_a_worker_never_starts_a_chunk_past_its_deadline(calls: Path) -> None:
    endpoint = Endpoint(ROUTE, p.Keyring(SECRET))
    with pytest.raises(WorkerTimeout, match="expired before a worker started it"):
        answer(endpoint, job_for(endpoint, deadline=time.time() - 0.01))
    assert calls.read_text() == ""  # it did not run
    reply = answer(endpoint, job_for(endpoint, deadline=time.time() + 5, start_by=time.time() + 1))
    assert reply.results == [1, 4]
    assert calls.read_text().startswith("square ")
    # past its start_by, a chunk that finds a thread free still starts: it may have waited in
    # a balancer's queue, and a refusal would only send it to the end of it
    assert answer(endpoint, job_for(endpoint, start_by=time.time() - 5)).results == [1, 4]


def test_a_cancelled_call_starts_no_further_item(tmp_path: Path) -> None:
    """Issue 22.11: the caller gave up (a cancelled submit): no item-by-item chunk (here of
    3 s) starts its next item, and no queued chunk starts, 1 s later (the in-process
    transport: a cancelled request, as a closed connection on a server)."""
    path = tmp_path / "stamps"
    fn = sf.stamped.with_options(workers=2, chunk_size=60, errors="return")
    future = fn.submit(list(range(200)), str(path), 0.05)
    deadline = time.monotonic() + 30
    while not path.exists() or len(path.read_text().splitlines()) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    future.cancel()
    given_up = time.time()
    time.sleep(2)
    starts = [float(line.split()[1]) for line in path.read_text().splitlines()]
    assert [start for start in starts if start > given_up + 1.0] == []
    assert len(starts) < 200


def test_a_chunk_that_waited_past_its_start_by_is_refused_as_busy() -> None:
    endpoint = Endpoint(ROUTE, p.Keyring(SECRET))
    job = job_for(endpoint, start_by=time.time() - 0.01)
    assert endpoint.late(job, waited=False) is None
    response = endpoint.late(job, waited=True)
    assert response is not None
    headers = dict(response.headers)
    with pytest.raises(WorkerUnavailable) as info:  # busy: it may go elsewhere
        p.read_reply(503, p.MSGPACK, response.body, headers, job.call, 0, URLS[0], endpoint.keyring)
    assert info.value.status == 503


def test_refusals_are_signed_and_say_why() -> None:
    endpoint = Endpoint(ROUTE, p.Keyring(SECRET))
    job = job_for(endpoint, start_by=time.time() - 1)
    job.capacity = 4
    response = endpoint.late(job, waited=True)
    assert response is not None
    assert response.status == 503 and response.headers["retry-after"] == "1"
    reply = p.decode_reply(response.body, p.MSGPACK)
    assert reply.error is not None and reply.error.kind == "busy" and reply.capacity == 4
    message = p.reply_signing_message(503, job.call.id, response.body)
    assert endpoint.keyring.verify(message, dict(response.headers)[p.H_REPLY_SIGNATURE])


def test_each_request_carries_its_deadline_and_start_by(
    in_process: InProcess[Endpoint],
) -> None:
    seen: list[p.Call] = []
    run = in_process.endpoint.run

    def spy(job: Job) -> Response:
        seen.append(job.call)
        return run(job)

    in_process.endpoint.run = spy  # type: ignore[method-assign]
    before = time.time()
    sf.square.with_options(timeout=30, deadline=5)([1, 2, 3])
    sf.square.with_options(timeout=30, retries=0)([1])
    first, last = seen[0], seen[-1]
    assert first.deadline is not None and before < first.deadline <= before + 5.1
    assert first.start_by is not None and first.start_by <= before + 1.1
    assert last.deadline is not None and last.deadline > before + 29
    # retries=0 asks for a busy refusal too: one proves nothing ran, so it is resent
    assert last.start_by is not None and last.start_by <= before + 1.1


# -- the CPU gate never holds a chunk while a thread is idle and the CPU is free ------------------


def test_the_gate_lets_a_chunk_in_when_the_cpu_is_free() -> None:
    """A 10 ms chunk waited 14.5 s behind two 15 s chunks, 14 of 16 threads idle."""

    async def main() -> float:
        gate = Gate(16)
        gate.control.observe(cpu_s=1.0, wall_s=1.0, concurrent=1)  # learned: CPU-bound
        assert gate.control.limit == 2
        await gate.acquire()
        await gate.acquire()  # two long chunks, waiting on something now
        started = time.perf_counter()
        await gate.acquire()
        return time.perf_counter() - started

    assert asyncio.run(asyncio.wait_for(main(), 10)) < 0.5


def test_the_gate_still_narrows_a_busy_interpreter_to_one_lane_beyond_its_limit() -> None:
    clock = [0.0]

    async def main() -> list[int]:
        gate = Gate(16, cpu=lambda: clock[0], clock=lambda: clock[0])  # the CPU always busy
        gate.control.limit = 2
        admitted: list[int] = []

        async def chunk(n: int) -> None:
            await gate.acquire()
            admitted.append(n)

        tasks = [asyncio.create_task(chunk(n)) for n in range(5)]
        for _ in range(20):
            await asyncio.sleep(0.06)
            clock[0] += 0.06
        assert admitted == [0, 1, 2]  # the limit, and one lane for a chunk that waited
        for task in tasks:
            task.cancel()
        return admitted

    asyncio.run(asyncio.wait_for(main(), 10))
