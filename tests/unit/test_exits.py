"""Issue 22: every exit of the user's code (sys.exit(), KeyboardInterrupt, a CancelledError or
GeneratorExit of its own, an exception whose str() raises) reaches the caller as a signed
RemoteError naming the remote type, its message and the item, and the worker serves on. They
reached the caller as ProtocolError (an unsigned 500 from the server)."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Generator
from typing import Any

import pytest

from serverless import RemoteError
from serverless._wire import Response
from serverless._worker.execute import drive_async
from tests import sample_functions as sf
from tests.sample_functions import EXITS

HAS_CANCELLING = sys.version_info >= (3, 11)  # 3.10 cannot tell the user's CancelledError


def _function(is_async: bool, how: str) -> Any:
    if is_async and how == "cancel" and not HAS_CANCELLING:
        pytest.skip("Python 3.10 takes a CancelledError from an await as a cancellation")
    return sf.async_exits_on if is_async else sf.exits_on


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("how", list(EXITS))
def test_an_exit_fails_the_chunk_with_a_remote_error(how: str, is_async: bool) -> None:
    f = _function(is_async, how)
    with pytest.raises(RemoteError) as info:
        f.with_options(chunk_size=10, retries=0)(list(range(20)), 13, how)
    type_name, message = EXITS[how]
    error = info.value
    assert (error.type_name, error.message, error.index) == (type_name, message, 13)
    assert "_exit" in error.traceback and type_name in error.traceback  # the user's frames
    assert f(list(range(20)), 99, how) == list(range(20))  # the worker serves on


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("how", list(EXITS))
def test_an_exit_is_returned_in_place_with_errors_return(how: str, is_async: bool) -> None:
    f = _function(is_async, how).with_options(chunk_size=10, retries=0, errors="return")
    out = f(list(range(20)), 13, how)
    error = out[13]
    assert isinstance(error, RemoteError)
    assert (error.type_name, error.message, error.index) == (*EXITS[how], 13)
    assert out[:13] + out[14:] == [n for n in range(20) if n != 13]
    assert f(list(range(20)), 99, how) == list(range(20))


# -- the driver: a real cancellation is never taken for the user's -----------------------------


def _work(awaitable: Any) -> Generator[Any, Any, Response]:
    """A work that awaits once and judges what it is thrown as Runner.work does."""
    from serverless._worker.execute import users_exit  # (here: the old code runs the rest)

    try:
        yield awaitable
    except BaseException as exc:
        if not users_exit(exc):
            raise
        return Response(500, {}, repr(exc).encode())
    return Response(200, {}, b"")


def test_a_cancellation_of_the_driving_task_is_not_swallowed() -> None:
    async def main() -> Generator[Any, Any, Response]:
        work = _work(asyncio.sleep(3600))
        task = asyncio.ensure_future(drive_async(work))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return work

    work = asyncio.run(main())
    assert inspect.getgeneratorstate(work) == inspect.GEN_CLOSED  # closed, not left suspended


@pytest.mark.skipif(not HAS_CANCELLING, reason="3.10 has no Task.cancelling()")
def test_a_cancelled_error_of_the_users_own_is_an_error() -> None:
    async def cancels() -> None:
        raise asyncio.CancelledError("mine")

    response = asyncio.run(drive_async(_work(cancels())))
    assert response.status == 500 and b"CancelledError('mine')" in response.body


def test_closing_the_work_at_a_wait_closes_it() -> None:
    async def never() -> None:  # never awaited: closed below
        pass

    awaitable = never()
    work = _work(awaitable)
    next(work)
    work.close()  # GeneratorExit at the yield is not taken for the user's
    awaitable.close()
    assert inspect.getgeneratorstate(work) == inspect.GEN_CLOSED
