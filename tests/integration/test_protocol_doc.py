"""docs/protocol.md is enough to write a client: a standard-library-only client, written from that
page, calls a real worker (uvicorn/ASGI and gunicorn/WSGI), and the page's worked example is
checked value by value.

The client functions below (key_id, string_to_sign, sign, post) use only the standard library on
purpose: do not replace them with serverless._wire.protocol.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, server

DOC = Path(__file__).parents[2] / "docs" / "protocol.md"
ROUTE = "/serverless"
SECRET = "correct-horse-battery-staple"  # the worked example's; the servers here use it too
SQUARE = "tests.sample_functions:square"
FAIL_ON = "tests.sample_functions:fail_on"
TIMEOUT = 10.0
VERSION = 3  # section 2

# The worked example of docs/protocol.md, section 10.
EXAMPLE_TIMESTAMP = "1700000000.000"
EXAMPLE_REQUEST_ID = "6f1c2d3e4a5b60718293a4b5c6d7e8f9"
EXAMPLE_OLD_SECRET = "an-older-secret-being-retired"

SERVERS: dict[str, Callable[[int], list[str]]] = {
    "asgi": lambda port: [
        "uvicorn",
        "tests.protocol_app:app",
        "--host=127.0.0.1",
        f"--port={port}",
        "--no-access-log",
        "--log-level=warning",
    ],
    "wsgi": lambda port: [
        "gunicorn",
        "--workers=1",
        "--worker-class=gthread",
        "--threads=4",
        f"--bind=127.0.0.1:{port}",
        "--graceful-timeout=2",
        "--log-level=warning",
        "tests.protocol_app:wsgi_app",
    ],
}


# -- the client, from docs/protocol.md, standard library only ----------------------------------


def key_id(secret: str) -> str:
    """Section 3."""
    return hashlib.sha256(b"serverless-key-id:" + secret.encode("utf-8")).hexdigest()[:12]


def string_to_sign(
    method: str, route: str, function: str, timestamp: str, request_id: str, body: bytes
) -> bytes:
    """Section 4: seven lines joined by LF, no trailing newline."""
    lines = [f"v{VERSION}", method.upper(), route, function, timestamp, request_id]
    return "\n".join([*lines, hashlib.sha256(body).hexdigest()]).encode("utf-8")


def sign(message: bytes, *secrets_: str) -> str:
    """Section 4: the Serverless-Signature value, one `kid=hex` pair per secret."""
    return ", ".join(
        f"{key_id(s)}={hmac.new(s.encode('utf-8'), message, hashlib.sha256).hexdigest()}"
        for s in secrets_
    )


def reply_is_signed(answer: Answer, request_id: str, secret: str = SECRET) -> bool:
    """Section 6.1: the worker's Serverless-Reply-Signature over status, request id, body."""
    lines = [f"reply-v{VERSION}", str(answer.status), request_id]
    message = "\n".join([*lines, hashlib.sha256(answer.body).hexdigest()]).encode("utf-8")
    return answer.reply_signature == sign(message, secret)


def json_envelope(
    function: str,
    request_id: str,
    items: list[Any],
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> bytes:
    """Section 5, as compact JSON."""
    call = {
        "v": VERSION,
        "fn": function,
        "id": request_id,
        "index": 0,
        "items": items,
        "args": args or [],
        "kwargs": kwargs or {},
        "bind": "",
    }
    return json.dumps(call, separators=(",", ":")).encode("utf-8")


def headers_for(
    function: str,
    request_id: str,
    body: bytes,
    *,
    timestamp: str | None = None,
    content_type: str = "application/json",
    signature: str | None = None,
) -> dict[str, str]:
    """Section 2."""
    timestamp = f"{time.time():.3f}" if timestamp is None else timestamp
    message = string_to_sign("POST", ROUTE, function, timestamp, request_id, body)
    return {
        "Content-Type": content_type,
        "Accept": content_type,
        "Serverless-Version": str(VERSION),
        "Serverless-Function": function,
        "Serverless-Timestamp": timestamp,
        "Serverless-Request-Id": request_id,
        "Serverless-Signature": sign(message, SECRET) if signature is None else signature,
    }


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    reply_signature: str | None

    def json(self) -> Any:
        assert self.content_type == "application/json"
        return json.loads(self.body)


def post(url: str, headers: dict[str, str], body: bytes) -> Answer:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return Answer(
                response.status,
                response.headers["Content-Type"],
                response.read(),
                response.headers["Serverless-Reply-Signature"],
            )
    except urllib.error.HTTPError as error:
        with error:
            return Answer(
                error.code,
                error.headers["Content-Type"],
                error.read(),
                error.headers["Serverless-Reply-Signature"],
            )


# -- servers -----------------------------------------------------------------------------------


@dataclass
class Worker:
    url: str
    calls: Path

    def runs(self) -> list[str]:
        return self.calls.read_text().splitlines()


@pytest.fixture(scope="module", params=sorted(SERVERS))
def worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    calls = tmp_path_factory.mktemp(f"doc-{request.param}") / "calls"
    calls.touch()
    port = free_port()
    env = {"SERVERLESS_SECRET": SECRET, "SERVERLESS_TEST_CALLS": str(calls)}
    with server(SERVERS[request.param](port), port, **env) as proc:
        output = proc.stdout
        assert output is not None
        drain = threading.Thread(target=output.read, daemon=True)  # never let the pipe fill
        drain.start()
        yield Worker(f"http://127.0.0.1:{port}{ROUTE}", calls)
    drain.join(10)
    output.close()


# -- the worked example ------------------------------------------------------------------------


EXAMPLE_REPLY = (
    b'{"v":3,"worker":"host:4242","results":[22,28,38],"error":null,"queue_s":2.6e-06,'
    b'"compute_s":1.9e-05,"stages":null}'
)


def _example() -> dict[str, str]:
    body = json_envelope(SQUARE, EXAMPLE_REQUEST_ID, [1, 2, 3], args=[10], kwargs={"scale": 2})
    message = string_to_sign("POST", ROUTE, SQUARE, EXAMPLE_TIMESTAMP, EXAMPLE_REQUEST_ID, body)
    digest = hashlib.sha256(EXAMPLE_REPLY).hexdigest()
    reply_message = "\n".join([f"reply-v{VERSION}", "200", EXAMPLE_REQUEST_ID, digest]).encode()
    return {
        "key id": key_id(SECRET),
        "old key id": key_id(EXAMPLE_OLD_SECRET),
        "body": body.decode(),
        "body length": f"JSON, {len(body)} bytes",
        "body sha256": hashlib.sha256(body).hexdigest(),
        "string to sign": "```\n" + message.decode() + "\n```",
        "signature": "Serverless-Signature: " + sign(message, SECRET) + "\n",
        "rotation": "Serverless-Signature: " + sign(message, SECRET, EXAMPLE_OLD_SECRET) + "\n",
        "reply's string to sign": "```\n" + reply_message.decode() + "\n```",
        "reply's signature": "Serverless-Reply-Signature: " + sign(reply_message, SECRET) + "\n",
    }


def test_worked_example_in_the_doc_is_right() -> None:
    doc = DOC.read_text()
    for what, value in _example().items():
        assert value in doc, f"docs/protocol.md: the worked example's {what} is not {value!r}"
    assert "`e5fb080acbae`" in doc and key_id(SECRET) == "e5fb080acbae"


def test_the_doc_client_agrees_with_the_library() -> None:
    from serverless import _wire as p

    body = json_envelope(SQUARE, EXAMPLE_REQUEST_ID, [1, 2, 3], args=[10], kwargs={"scale": 2})
    assert key_id(SECRET) == p.key_id(SECRET)
    ours = string_to_sign("POST", ROUTE, SQUARE, EXAMPLE_TIMESTAMP, EXAMPLE_REQUEST_ID, body)
    theirs = p.string_to_sign("POST", ROUTE, SQUARE, EXAMPLE_TIMESTAMP, EXAMPLE_REQUEST_ID, body)
    assert ours == theirs
    ring = p.Keyring([SECRET, EXAMPLE_OLD_SECRET])
    assert sign(ours, SECRET) == ring.sign(theirs)  # the library sends its signing key's only
    assert ring.verify(theirs, sign(ours, SECRET, EXAMPLE_OLD_SECRET)) == key_id(SECRET)
    assert ring.verify(theirs, sign(ours, EXAMPLE_OLD_SECRET)) == key_id(EXAMPLE_OLD_SECRET)
    assert p.decode_call(body, p.JSON) == p.Call(
        v=p.VERSION,
        fn=SQUARE,
        id=EXAMPLE_REQUEST_ID,
        index=0,
        items=[1, 2, 3],
        args=[10],
        kwargs={"scale": 2},
    )


def test_worked_example_msgpack_hex_in_the_doc_is_right() -> None:
    import msgspec

    body = json_envelope(SQUARE, EXAMPLE_REQUEST_ID, [1, 2, 3], args=[10], kwargs={"scale": 2})
    packed = msgspec.msgpack.encode(json.loads(body))  # same keys, same order
    doc = DOC.read_text()
    hex_block = doc.split("(119 bytes, hex)")[1].split("```")[1]
    assert "".join(hex_block.split()) == packed.hex()
    assert len(packed) == 119


def _extension_examples() -> list[tuple[str, str]]:
    """(Python value as written, hex bytes) of each row of section 5.3's example table."""
    table = DOC.read_text().split("Examples (hex), each a whole MessagePack value:")[1]
    rows = [line for line in table.split("\n\n")[1].splitlines()[2:] if line.startswith("|")]
    cells = [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows]
    return [(written, hex_bytes) for written, hex_bytes in cells]


def test_extension_type_examples_in_the_doc_are_what_the_library_sends() -> None:
    """Section 5.3: every example's bytes are what the library's caller sends for that value,
    and they decode back to it, of the very same types and zone."""
    import datetime
    import decimal
    import uuid
    import zoneinfo

    import msgspec

    from serverless._wire import encode
    from serverless._wire.values import ext_hook, to_wire
    from tests.unit.test_values import same

    names = {
        "datetime": datetime.datetime,
        "date": datetime.date,
        "time": datetime.time,
        "timedelta": datetime.timedelta,
        "timezone": datetime.timezone,
        "ZoneInfo": zoneinfo.ZoneInfo,
        "Decimal": decimal.Decimal,
        "UUID": uuid.UUID,
    }
    examples = _extension_examples()
    assert len(examples) == 12
    for written, hex_bytes in examples:
        value = eval(written, names)  # the doc's own Python expression
        sent = encode(to_wire(value))
        assert sent.hex(" ") == hex_bytes, written
        assert same(msgspec.msgpack.decode(sent, ext_hook=ext_hook), value), written


def test_a_datetime_decodes_from_the_doc_alone() -> None:
    """Section 5.3's walk-through of `d8 04 99 ...`, with the standard library only."""
    examples = dict(_extension_examples())
    data = bytes.fromhex(examples["datetime(2024, 5, 6, 7, 8, 9, 123456)"])
    assert data[0] == 0xD8 and data[1] == 4  # fixext 16, code 4: a datetime
    payload = data[2:]
    assert len(payload) == 16 and payload[0] == 0x99  # an array of 9
    year = int.from_bytes(payload[2:4], "big")  # cd: uint 16
    month, day, hour, minute, second = payload[4:9]
    micro = int.from_bytes(payload[10:14], "big")  # ce: uint 32
    fold, zone = payload[14], payload[15]
    assert (year, month, day, hour, minute, second, micro) == (2024, 5, 6, 7, 8, 9, 123456)
    assert (fold, zone) == (0, 0xC0)  # nil: naive


# -- against real servers ----------------------------------------------------------------------


def test_stdlib_client_runs_square_with_items_args_and_kwargs(worker: Worker) -> None:
    before = worker.runs()
    request_id = secrets.token_hex(16)
    body = json_envelope(SQUARE, request_id, [1, 2, 3, 4], args=[10], kwargs={"scale": 2})
    answer = post(worker.url, headers_for(SQUARE, request_id, body), body)
    assert answer.status == 200, answer.body
    assert reply_is_signed(answer, request_id)
    assert not reply_is_signed(answer, secrets.token_hex(16))  # bound to its request
    reply = answer.json()
    assert reply["v"] == VERSION
    assert reply["results"] == [22, 28, 38, 52]
    assert reply["error"] is None
    assert isinstance(reply["worker"], str) and ":" in reply["worker"]
    assert reply["queue_s"] >= 0 and reply["compute_s"] >= 0
    new = worker.runs()[len(before) :]
    assert len(new) == 1 and new[0].startswith("square ")


def test_defaults_of_optional_envelope_fields(worker: Worker) -> None:
    request_id = secrets.token_hex(16)
    call = {"v": VERSION, "fn": SQUARE, "id": request_id, "index": 7, "items": [3], "x": "ignored"}
    body = json.dumps(call).encode()
    answer = post(worker.url, headers_for(SQUARE, request_id, body), body)
    assert (answer.status, answer.json()["results"]) == (200, [9])


def test_rotation_header_with_an_unknown_key_id_first(worker: Worker) -> None:
    request_id = secrets.token_hex(16)
    body = json_envelope(SQUARE, request_id, [2])
    headers = headers_for(SQUARE, request_id, body)
    retired = "an-unknown-secret-0123456789"
    message = string_to_sign(
        "POST", ROUTE, SQUARE, headers["Serverless-Timestamp"], request_id, body
    )
    headers["Serverless-Signature"] = sign(message, retired, SECRET)
    assert post(worker.url, headers, body).status == 200


def test_user_error_is_a_structured_500(worker: Worker) -> None:
    request_id = secrets.token_hex(16)
    body = json_envelope(FAIL_ON, request_id, [5, 6, 7], args=[6])
    answer = post(worker.url, headers_for(FAIL_ON, request_id, body), body)
    assert answer.status == 500 and reply_is_signed(answer, request_id)
    reply = answer.json()
    assert reply["results"] is None
    error = reply["error"]
    assert (error["kind"], error["type"], error["message"]) == (
        "user",
        "ValueError",
        "cannot handle 6",
    )
    assert (error["index"], error["item"], error["retryable"]) == (1, "6", False)
    assert "Traceback" in error["traceback"] and "fail_on" in error["traceback"]


def test_isolate_answers_each_items_result_or_error(worker: Worker) -> None:
    """Section 6.2: item by item, the failed items' errors beside the others' results."""
    before = len(worker.runs())
    request_id = secrets.token_hex(16)
    call = json.loads(json_envelope(FAIL_ON, request_id, [5, 6, 7], args=[6]))
    body = json.dumps({**call, "isolate": True}).encode()
    answer = post(worker.url, headers_for(FAIL_ON, request_id, body), body)
    assert answer.status == 200 and reply_is_signed(answer, request_id)
    reply = answer.json()
    assert reply["results"] == [5, 7] and reply["error"] is None
    (failed,) = reply["item_errors"]
    assert (failed["index"], failed["at"], failed["error"]["kind"]) == (1, 1, "user")
    assert failed["error"]["message"] == "cannot handle 6"
    assert len(worker.runs()) - before == 3  # one run per item


def test_a_chunk_past_its_deadline_is_refused_signed_and_not_run(worker: Worker) -> None:
    """Sections 5 and 7 (check 20): a deadline in the past, so nothing may start; a start_by
    in the past does not stop a chunk that finds a thread free (check 21)."""
    before = len(worker.runs())
    request_id = secrets.token_hex(16)
    call = json.loads(json_envelope(SQUARE, request_id, [1]))
    body = json.dumps({**call, "deadline": 1.0}).encode()
    answer = post(worker.url, headers_for(SQUARE, request_id, body), body)
    assert answer.status == 504 and reply_is_signed(answer, request_id)
    assert answer.json()["error"]["kind"] == "expired"
    assert len(worker.runs()) == before
    request_id = secrets.token_hex(16)
    call = json.loads(json_envelope(SQUARE, request_id, [3]))
    body = json.dumps({**call, "start_by": 1.0, "deadline": time.time() + 60}).encode()
    answer = post(worker.url, headers_for(SQUARE, request_id, body), body)
    assert (answer.status, answer.json()["results"]) == (200, [9])


def test_replay_is_409_and_stale_timestamp_is_401(worker: Worker) -> None:
    request_id = secrets.token_hex(16)
    body = json_envelope(SQUARE, request_id, [1])
    headers = headers_for(SQUARE, request_id, body)
    assert post(worker.url, headers, body).status == 200
    before = worker.runs()
    replay = post(worker.url, headers, body)
    assert replay.status == 409 and reply_is_signed(replay, request_id)
    assert replay.json()["error"]["kind"] == "rejected"
    assert replay.json()["error"]["type"] == "HTTP409"

    request_id = secrets.token_hex(16)
    body = json_envelope(SQUARE, request_id, [1])
    stale = f"{time.time() - 301:.3f}"
    answer = post(worker.url, headers_for(SQUARE, request_id, body, timestamp=stale), body)
    assert answer.status == 401 and answer.json()["error"]["type"] == "HTTP401"
    assert answer.reply_signature is None  # not authenticated: not signed
    assert worker.runs() == before


def test_msgpack_request_and_accept_header(worker: Worker) -> None:
    import msgspec

    request_id = secrets.token_hex(16)
    body = msgspec.msgpack.encode(
        {"v": VERSION, "fn": SQUARE, "id": request_id, "index": 0, "items": [1, 2], "args": [1]}
    )
    headers = headers_for(SQUARE, request_id, body, content_type="application/msgpack")
    answer = post(worker.url, headers, body)
    assert (answer.status, answer.content_type) == (200, "application/msgpack")
    assert msgspec.msgpack.decode(answer.body)["results"] == [2, 5]

    # The reply's format follows Accept, then Content-Type.
    request_id = secrets.token_hex(16)
    body = json_envelope(SQUARE, request_id, [3])
    headers = {**headers_for(SQUARE, request_id, body), "Accept": "application/msgpack"}
    answer = post(worker.url, headers, body)
    assert (answer.status, answer.content_type) == (200, "application/msgpack")
    assert msgspec.msgpack.decode(answer.body)["results"] == [9]


def test_the_minimal_client_of_section_11_runs_and_checks_the_reply(worker: Worker) -> None:
    section = DOC.read_text().split("## 11.")[1]
    code = section.split("```python")[1].split("```")[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    assert namespace["call"](worker.url, ROUTE, SECRET, SQUARE, [1, 2], [1]) == [2, 5]
