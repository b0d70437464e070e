"""Replies are as authenticated as requests (issue 14, finding 3), over real sockets: a server
that answers in a worker's place, without the secret, gets none of its answers used."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator

import msgspec
import pytest

import serverless
from serverless import _wire as p
from tests import sample_functions as sf
from tests.conftest import SECRET

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture
def impostor(reset_settings: None) -> Iterator[Callable[[Handler], str]]:
    """Start an HTTP server answering with `handler`; its URL is the caller's target."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(handler: Handler) -> str:
        class Answer(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                handler(self)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/serverless"
        serverless.init("/serverless", SECRET, url=url)
        return url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _answer(status: int, body: bytes, **headers: str) -> Handler:
    def handler(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        request.send_header("Content-Type", p.MSGPACK)
        request.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            request.send_header(name.replace("_", "-"), value)
        request.end_headers()
        request.wfile.write(body)

    return handler


def test_forged_results_from_an_impostor_are_refused(impostor: Callable[[Handler], str]) -> None:
    # the attack of finding 3: twelve forged results for a four-item chunk, a fake signature
    forged = msgspec.msgpack.encode({"v": p.VERSION, "worker": "w", "results": [-666] * 12})
    impostor(_answer(200, forged, Serverless_Reply_Signature="e5fb080acbae=" + "0" * 64))
    with pytest.raises(serverless.ProtocolError, match="not signed") as info:
        sf.square.with_options(workers=1, retries=0)([1, 2, 3, 4])
    assert info.value.status == 200 and "bytes" in str(info.value)  # its length, unread


def test_an_endless_answer_is_cut_off(impostor: Callable[[Handler], str]) -> None:
    def endless(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", p.MSGPACK)
        request.send_header("Connection", "close")
        request.end_headers()
        block = b"\x00" * (1 << 20)
        try:
            for _ in range(2048):  # 2 GiB, if nobody stopped reading
                request.wfile.write(block)
        except OSError:
            pass

    impostor(endless)
    with pytest.raises(serverless.ProtocolError, match="limit"):
        sf.square.with_options(workers=1, retries=0)([1])


@pytest.mark.parametrize(
    "body", [b"\xff\xfe\xfd", b"\x91" * 100_000, b"<html>502 Bad Gateway</html>"]
)
def test_a_malformed_answer_is_a_protocol_error_not_a_raw_exception(
    impostor: Callable[[Handler], str], body: bytes
) -> None:
    impostor(_answer(200, body))
    with pytest.raises(serverless.ProtocolError):
        sf.square.with_options(workers=1, retries=0)([1])
