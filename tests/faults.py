"""Fault injection with real sockets: a TCP proxy that resets connections mid-response, and
an attacker's server that records what a forged Host header makes an app send it."""

from __future__ import annotations

import asyncio
import http.server
import random
import socket
import struct
import threading
from typing import Any


class ResetProxy:
    """Forwards 127.0.0.1:port to an upstream port; with probability `rate`, each piece of
    a response instead aborts both connections with a TCP RST (the client sees a reset)."""

    def __init__(self, upstream: int, rate: float, seed: int = 0) -> None:
        self.upstream, self.rate = upstream, rate
        self.rng = random.Random(seed)
        self.resets = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ResetProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        def reset() -> None:
            self.resets += 1
            for w in (writer, up_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:  # linger 0: close() sends RST, not FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, faulty: bool) -> None:
            try:
                while data := await src.read(65536):
                    if faulty and self.rng.random() < self.rate:
                        reset()
                        return
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))


class Attacker:
    """An HTTP server on loopback that records every request it gets and answers a forged
    result list: what a forged Host header must never make an app call."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.requests.append((self.path, dict(self.headers)))
                body = b'{"v":1,"worker":"attacker","results":[-666,-666,-666]}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Attacker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
