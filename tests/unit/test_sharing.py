"""A threaded WSGI app keeps one thread for its own requests (issue 15.4): no chunk is sent to
self that would take it, and a call from a request handler that would leave every thread
waiting on a fan-out fails at once, naming the cause and the fix."""

from __future__ import annotations

import pytest

from serverless import WorkerUnavailable
from serverless._worker.threads import RequestThreads


def test_the_last_thread_is_kept_for_the_apps_own_requests() -> None:
    capacity = RequestThreads(threads=4, reserve=True)
    capacity.enter()  # the request handler making the call
    assert capacity.try_send() and capacity.try_send()
    assert not capacity.try_send()  # 1 busy + 2 sent: the fourth thread stays free
    capacity.sent_done()
    assert capacity.try_send()


def test_a_parent_that_would_take_the_last_thread_fails_at_once() -> None:
    capacity = RequestThreads(threads=4, reserve=True)
    for _ in range(3):
        capacity.enter_parent("http://app/serverless")
    with pytest.raises(WorkerUnavailable, match="3 of this app process's 4 request threads"):
        capacity.enter_parent("http://app/serverless")
    capacity.enter_parent("http://app/serverless", check=False)  # a stream's later batch
    capacity.leave_parent()
    capacity.leave_parent()
    capacity.enter_parent("http://app/serverless")  # a thread came back


@pytest.mark.parametrize(("threads", "reserve"), [(2, True), (1, True), (4, False)])
def test_no_thread_is_kept_where_there_are_too_few_or_the_server_is_asgi(
    threads: int, reserve: bool
) -> None:
    capacity = RequestThreads(threads=threads, reserve=reserve)
    for _ in range(threads):
        capacity.enter_parent("http://app/serverless")
    assert capacity.parents == threads


def test_a_freed_lane_goes_to_the_waiting_calls_in_turn() -> None:
    """Issue 22.10: each call used to wake only its own waiting chunks, so the first call held
    every lane to the app and the later ones ran theirs serially on their own threads."""
    import asyncio

    from serverless._caller.sharing import SharedCall

    async def main() -> list[str]:
        threads = RequestThreads(threads=2)
        first, second = (SharedCall(object(), threads, True, url=u) for u in "ab")  # type: ignore[arg-type]
        order: list[str] = []

        async def chunk(call: SharedCall, hold: float) -> None:
            async with call.lane(call.url) as lane:
                order.append(lane)
                await asyncio.sleep(hold)

        tasks = [asyncio.create_task(chunk(first, 0.05)) for _ in range(6)]
        await asyncio.sleep(0.01)  # the first call holds both lanes, four of its chunks wait
        tasks += [asyncio.create_task(chunk(second, 0.05)) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    order = asyncio.run(main())
    assert order[:2] == ["a", "a"]
    assert order[2:6].count("b") == 2, order  # the next lanes alternate between the calls
