"""The lean HTTP client (_http.py) against raw asyncio servers that answer in every framing
a proxy in front of workers may use, and that fail in the ways networks fail."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from serverless._caller import http as _http

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


async def _serve(handler: Handler, body: Callable[[_http.Client, str], Awaitable[None]]) -> None:
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[None]] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        await handler(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = _http.Client(1 << 20)
    try:
        await body(client, f"http://127.0.0.1:{port}/route")
    finally:
        client.close()
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the transports finish closing before the loop does


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


def test_keep_alive_content_length_and_the_request_on_the_wire() -> None:
    seen: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while not reader.at_eof():
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/msgpack\r\n"
                b"Content-Length: 5\r\n\r\nhello"
            )
            await writer.drain()
        writer.close()

    async def body(client: _http.Client, url: str) -> None:
        for n in range(3):
            response = await client.post(url, b"x" * n, {"X-A": "b"}, 5)
            assert (response.status, response.content_type, response.body) == (
                200,
                "application/msgpack",
                b"hello",
            )
        large = _http.Body(b"y" * 200_000)  # written apart from the head
        assert (await client.post(url, large, {}, 5)).body == b"hello"
        assert large.take() == b""  # the client let go of the body once it was written

    run(_serve(handler, body))
    assert connections == 1  # the connection was kept alive and reused
    assert seen[2].startswith(b"POST /route HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nX-A: b\r\n" in seen[2] and seen[2].endswith(b"Content-Length: 2\r\n\r\nxx")
    assert seen[3].endswith(b"Content-Length: 200000\r\n\r\n" + b"y" * 200_000)


def test_chunked_and_close_delimited_bodies() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_request(reader)
        if request.endswith(b"chunked"):
            writer.write(
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
        else:
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async def body(client: _http.Client, url: str) -> None:
        response = await client.post(url, b"chunked", {}, 5)
        assert (response.status, response.body) == (201, b"abcde")
        response = await client.post(url, b"eof", {}, 5)
        assert (response.status, response.body) == (200, b"until the end")

    run(_serve(handler, body))


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive announced, then closed: the next send must not fail

    async def body(client: _http.Client, url: str) -> None:
        for _ in range(3):
            assert (await client.post(url, b"x", {}, 5)).body == b"ok"

    run(_serve(handler, body))


def test_failures_are_transport_errors_or_timeouts() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_request(reader)
        if request.endswith(b"garbage"):
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        elif request.endswith(b"cut"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        else:
            await asyncio.sleep(5)
        await writer.drain()
        writer.close()

    async def body(client: _http.Client, url: str) -> None:
        with pytest.raises(_http.TransportError):
            await client.post(url, b"garbage", {}, 5)
        with pytest.raises(_http.TransportError):
            await client.post(url, b"cut", {}, 5)
        with pytest.raises(asyncio.TimeoutError):
            await client.post(url, b"slow", {}, 0.2)
        with pytest.raises(_http.InvalidURL):
            await client.post("ftp://example.org/x", b"", {}, 5)

    run(_serve(handler, body))

    async def refused() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        client = _http.Client(1 << 20)
        with pytest.raises(_http.TransportError):
            await client.post(f"http://127.0.0.1:{port}/", b"", {}, 5)
        client.close()

    run(refused())


def test_idle_connections_keep_no_answer_alive() -> None:
    """Found by tracemalloc on W5: 100 idle connections held 20 MB of old reply bodies."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        await reader.read()  # keep the connection open, idle

    async def body(client: _http.Client, url: str) -> None:
        assert len((await client.post(url, b"x", {}, 5)).body) == 100_000
        idle = [conn for conns in client._idle.values() for conn in conns]
        assert len(idle) == 1 and idle[0]._body == []

    run(_serve(handler, body))


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
def test_an_answer_over_the_reply_limit_is_cut_off_not_buffered(framing: str) -> None:
    # a hostile or broken server streaming an endless answer: the client stops at the limit
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await _read_request(reader)
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n")
        elif framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        block = b"x" * 65536
        try:
            for _ in range(1000):  # up to 64 MiB, far over the 1 MiB limit
                writer.write(b"10000\r\n" + block + b"\r\n" if framing == "chunked" else block)
                await writer.drain()
                sent += len(block)
        except (ConnectionError, OSError):
            pass

    async def body(client: _http.Client, url: str) -> None:
        with pytest.raises(_http.ReplyTooLarge, match="1048576-byte limit"):
            await client.post(url, b"x", {}, 5)

    run(_serve(handler, body))
    assert sent < 16 * 1024 * 1024  # the client closed the connection early
