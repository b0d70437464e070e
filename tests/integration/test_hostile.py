"""Hostile requests against real servers: the worker route under uvicorn (ASGI) and under
gunicorn gthread (WSGI). Every one gets the expected 4xx status, never a 5xx, and runs nothing:
the sample functions append a line to $SERVERLESS_TEST_CALLS on every run, and that file must
not grow (a valid request makes it grow, so the check can fail).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest

from serverless import _wire as p
from serverless._worker.admission import REQUEST_ID
from tests.conftest import SECRET, free_port, server

ROUTE = "/serverless"
MAX_BODY = 1024 * 1024  # as configured in tests/protocol_app.py
SQUARE = "tests.sample_functions:square"
KEYRING = p.Keyring(SECRET)
OTHER_KEYRING = p.Keyring("another-secret-0123456789abcdef")
TIMEOUT = 10.0
SIGNED_HEADERS = (
    "Serverless-Version",
    "Serverless-Function",
    "Serverless-Timestamp",
    "Serverless-Request-Id",
    "Serverless-Signature",
)

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
        "--workers=1",  # the replay cache is per process
        "--worker-class=gthread",
        "--threads=4",
        f"--bind=127.0.0.1:{port}",
        "--graceful-timeout=2",
        "--log-level=warning",
        "tests.protocol_app:wsgi_app",
    ],
}


@dataclass
class Worker:
    kind: str
    port: int
    calls: Path

    def runs(self) -> list[str]:
        """One line per run of a sample function on this server."""
        return self.calls.read_text().splitlines()


@pytest.fixture(scope="module", params=sorted(SERVERS))
def worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    calls = tmp_path_factory.mktemp(f"hostile-{request.param}") / "calls"
    calls.touch()
    port = free_port()
    with server(SERVERS[request.param](port), port, SERVERLESS_TEST_CALLS=str(calls)) as proc:
        output = proc.stdout
        assert output is not None
        # Drain the server's output so that a full pipe never blocks it.
        drain = threading.Thread(target=output.read, daemon=True)
        drain.start()
        yield Worker(request.param, port, calls)
    drain.join(10)
    output.close()


# -- building and sending requests -------------------------------------------------------------


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes | None
    method: str = "POST"
    path: str = ROUTE
    chunked: bool = False

    def without(self, *names: str) -> Request:
        return replace(self, headers={k: v for k, v in self.headers.items() if k not in names})

    def having(self, **headers: str) -> Request:
        """Other header values; underscores in the names stand for dashes."""
        changed = {k.replace("_", "-"): v for k, v in headers.items()}
        return replace(self, headers={**self.headers, **changed})


@dataclass
class Signing:
    """What goes into the string to sign, when it should differ from what is sent."""

    method: str = "POST"
    path: str = ROUTE
    function: str | None = None
    timestamp: str | None = None
    request_id: str | None = None
    body: bytes | None = None
    keyring: p.Keyring = field(default_factory=lambda: KEYRING)


def envelope(fn: str = SQUARE, rid: str = "", **fields: Any) -> dict[str, Any]:
    return {"v": p.VERSION, "fn": fn, "id": rid, "index": 0, "items": [1, 2, 3], **fields}


def signed(
    fn: str = SQUARE,
    *,
    body: bytes | None = None,
    fmt: str = p.JSON,
    rid: str | None = None,
    timestamp: str | None = None,
    call: dict[str, Any] | None = None,
    signing: Signing | None = None,
) -> Request:
    """A correctly signed request (unless `signing` says otherwise) for `fn`.

    `body` replaces the envelope; `call` overrides fields of the envelope.
    """
    rid = secrets.token_hex(16) if rid is None else rid
    timestamp = f"{time.time():.3f}" if timestamp is None else timestamp
    if body is None:
        body = p.encode({**envelope(fn, rid), **(call or {})}, fmt)
    s = signing or Signing()
    message = p.string_to_sign(
        s.method,
        s.path,
        fn if s.function is None else s.function,
        timestamp if s.timestamp is None else s.timestamp,
        rid if s.request_id is None else s.request_id,
        body if s.body is None else s.body,
    )
    headers = {
        "Content-Type": fmt,
        "Serverless-Version": str(p.VERSION),
        "Serverless-Function": fn,
        "Serverless-Timestamp": timestamp,
        "Serverless-Request-Id": rid,
        "Serverless-Signature": s.keyring.sign(message),
    }
    return Request(headers, body)


def send(worker: Worker, request: Request) -> tuple[int, p.Reply | None]:
    """One request on a fresh connection; the status and the decoded protocol reply, if any."""
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=TIMEOUT)
    try:
        body: bytes | Iterable[bytes] | None = request.body
        if request.chunked and request.body is not None:
            data = request.body
            body = (data[i : i + 65536] for i in range(0, len(data), 65536))
        # refused and closed before the body was all sent: read the answer if it came
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(
                request.method,
                request.path,
                body=body,
                headers=request.headers,
                encode_chunked=request.chunked,
            )
        try:
            response = conn.getresponse()
            raw = response.read()
        except (ConnectionResetError, http.client.RemoteDisconnected):
            return CLOSED, None
        fmt = p.media_type(response.getheader("Content-Type"))
    finally:
        conn.close()
    if fmt is None or not raw:
        return response.status, None
    try:
        return response.status, p.decode_reply(raw, fmt)
    except msgspec.DecodeError:
        return response.status, None


def claim_length(worker: Worker, request: Request, length: int) -> tuple[int, p.Reply | None]:
    """Send only the head of a request that announces a `length`-byte body, read the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=TIMEOUT)
    try:
        conn.putrequest(request.method, request.path)
        for name, value in request.headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    fmt = p.media_type(response.getheader("Content-Type"))
    return response.status, None if fmt is None else p.decode_reply(raw, fmt)


CLOSED = -1  # the server closed the connection before the client could read an answer


def assert_refused(worker: Worker, request: Request, status: int) -> None:
    before = worker.runs()
    got, reply = send(worker, request)
    if got == CLOSED and status == 413 and len(request.body or b"") > MAX_BODY:
        # refused on its Content-Length, closed unread: the reset lost the 413 in flight
        assert worker.runs() == before, "a refused request ran a function"
        return
    assert got == status, reply
    assert worker.runs() == before, "a refused request ran a function"
    if request.method != "HEAD":
        assert reply is not None and reply.error is not None, "no protocol v1 error reply"
        assert reply.results is None
        assert (reply.error.kind, reply.error.type) == ("rejected", f"HTTP{status}")
        assert SECRET not in reply.error.message


# -- the positive control: the check can fail --------------------------------------------------


@pytest.mark.parametrize("fmt", [p.JSON, p.MSGPACK])
def test_a_valid_request_runs_once(worker: Worker, fmt: str) -> None:
    before = worker.runs()
    status, reply = send(worker, signed(fmt=fmt))
    assert status == 200 and reply is not None and reply.results == [1, 4, 9]
    new = worker.runs()[len(before) :]
    assert len(new) == 1 and new[0].startswith("square ")


def test_a_body_of_exactly_max_body_bytes_is_accepted(worker: Worker) -> None:
    rid = secrets.token_hex(16)
    body = p.encode(envelope(SQUARE, rid), p.JSON)
    body += b" " * (MAX_BODY - len(body))  # JSON allows trailing whitespace
    before = worker.runs()
    status, reply = send(worker, signed(body=body, rid=rid))
    assert status == 200 and reply is not None and reply.results == [1, 4, 9]
    assert len(worker.runs()) == len(before) + 1


# -- hostile requests, each with its expected status -------------------------------------------


def _now(shift: float = 0.0) -> str:
    return f"{time.time() + shift:.3f}"


def _garbage(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def _truncated_msgpack() -> Request:
    rid = secrets.token_hex(16)
    full = p.encode(envelope(SQUARE, rid, items=list(range(50))), p.MSGPACK)
    return signed(body=full[: len(full) // 2], rid=rid, fmt=p.MSGPACK)


def _raw(body: bytes, fmt: str = p.JSON) -> Callable[[], Request]:
    return lambda: signed(body=body, fmt=fmt)


def _with_envelope(rid: str = "", fmt: str = p.JSON, **fields: Any) -> Callable[[], Request]:
    """A signed request whose envelope (for request id `rid`, or the header's) has `fields`."""

    def build() -> Request:
        request_id = rid or secrets.token_hex(16)
        body = p.encode({**envelope(SQUARE, request_id), **fields}, fmt)
        return signed(body=body, rid=request_id, fmt=fmt)

    return build


CASES: list[tuple[str, int, Callable[[], Request]]] = [
    # method (405): nothing else matters
    ("GET", 405, lambda: Request({}, None, method="GET")),
    ("HEAD", 405, lambda: Request({}, None, method="HEAD")),
    ("OPTIONS", 405, lambda: Request({}, None, method="OPTIONS")),
    (
        "GET signed as GET",
        405,
        lambda: replace(signed(signing=Signing(method="GET")), method="GET"),
    ),
    ("PUT of a valid body", 405, lambda: replace(signed(), method="PUT")),
    ("DELETE of a valid body", 405, lambda: replace(signed(), method="DELETE")),
    # version (400)
    ("no headers at all", 400, lambda: Request({}, b"")),
    ("no version header", 400, lambda: signed().without("Serverless-Version")),
    ("another version", 400, lambda: signed().having(Serverless_Version=str(p.VERSION + 1))),
    ("version 01", 400, lambda: signed().having(Serverless_Version="01")),
    # timestamp (401)
    ("no timestamp", 401, lambda: signed().without("Serverless-Timestamp")),
    ("empty timestamp", 401, lambda: signed(timestamp="")),
    ("word timestamp", 401, lambda: signed(timestamp="yesterday")),
    ("NaN timestamp", 401, lambda: signed(timestamp="nan")),
    ("inf timestamp", 401, lambda: signed(timestamp="inf")),
    ("-inf timestamp", 401, lambda: signed(timestamp="-inf")),
    ("huge timestamp", 401, lambda: signed(timestamp="1e400")),
    ("expired timestamp", 401, lambda: signed(timestamp=_now(-301))),
    ("very old timestamp", 401, lambda: signed(timestamp="0")),
    ("future timestamp", 401, lambda: signed(timestamp=_now(+301))),
    # key id and signature (401)
    ("no signature header", 401, lambda: signed().without("Serverless-Signature")),
    ("empty signature", 401, lambda: signed().having(Serverless_Signature="")),
    ("signed with another secret", 401, lambda: signed(signing=Signing(keyring=OTHER_KEYRING))),
    (
        "unknown key id, right hmac",
        401,
        lambda: (r := signed()).having(
            Serverless_Signature="000000000000=" + r.headers["Serverless-Signature"][13:]
        ),
    ),
    (
        "signature without key id",
        401,
        lambda: (r := signed()).having(Serverless_Signature=r.headers["Serverless-Signature"][13:]),
    ),
    (
        "known key id, garbage hmac",
        401,
        lambda: signed().having(Serverless_Signature=f"{KEYRING.key_ids[0]}={'ab' * 32}"),
    ),
    (
        "known key id, truncated hmac",
        401,
        lambda: (r := signed()).having(Serverless_Signature=r.headers["Serverless-Signature"][:-2]),
    ),
    (
        "upper-case hmac",
        401,
        lambda: (r := signed()).having(
            Serverless_Signature=KEYRING.key_ids[0]
            + "="
            + r.headers["Serverless-Signature"][13:].upper()
        ),
    ),
    ("signature over another body", 401, lambda: signed(signing=Signing(body=b"{}"))),
    ("signature over another route", 401, lambda: signed(signing=Signing(path="/other"))),
    (
        "signature over another function",
        401,
        lambda: signed(signing=Signing(function="tests.sample_functions:fail_on")),
    ),
    ("signature over another timestamp", 401, lambda: signed(signing=Signing(timestamp=_now(-1)))),
    ("signature over another request id", 401, lambda: signed(signing=Signing(request_id="x"))),
    ("signature for GET, sent as POST", 401, lambda: signed(signing=Signing(method="GET"))),
    (
        "body appended after signing",
        401,
        lambda: replace(r := signed(), body=(r.body or b"") + b" "),
    ),
    (
        "function header swapped after signing",
        401,
        lambda: signed().having(Serverless_Function="tests.sample_functions:fail_on"),
    ),
    (
        "random body, no signature",
        401,
        lambda: Request({"Serverless-Version": str(p.VERSION)}, _garbage(99)),
    ),
    # request id shape (400), before the body is read: 32 lower-case hex digits
    ("empty request id", 400, lambda: signed(rid="")),
    ("upper-case request id", 400, lambda: signed(rid=secrets.token_hex(16).upper())),
    ("request id of 8,000 characters", 400, lambda: signed(rid="a" * 8000)),
    ("request id of 31 hex digits", 400, lambda: signed(rid=secrets.token_hex(16)[:31])),
    # signature header shape (401)
    (
        "nine signatures",
        401,
        lambda: (r := signed()).having(
            Serverless_Signature=", ".join([r.headers["Serverless-Signature"]] * 9)
        ),
    ),
    # registry (404): signed correctly, but not a registered function
    ("os:system", 404, lambda: signed("os:system", call={"items": ["true"]})),
    ("builtins:eval", 404, lambda: signed("builtins:eval", call={"items": ["1+1"]})),
    ("undecorated function", 404, lambda: signed("tests.sample_functions:plain")),
    ("private helper", 404, lambda: signed("tests.sample_functions:_record")),
    ("a class", 404, lambda: signed("tests.sample_functions:Geo")),
    ("a sequential step", 404, lambda: signed("tests.sample_functions:Geo.total")),
    ("dunder attribute path", 404, lambda: signed("tests.sample_functions:square.__call__")),
    ("module without qualname", 404, lambda: signed("tests.sample_functions")),
    ("__main__ alias", 404, lambda: signed("__main__:square")),
    ("empty function name", 404, lambda: signed("")),
    # content type (415), after authentication
    ("no content type", 415, lambda: signed().without("Content-Type")),
    ("text/plain", 415, lambda: signed().having(Content_Type="text/plain")),
    ("form", 415, lambda: signed().having(Content_Type="application/x-www-form-urlencoded")),
    ("application/jsonx", 415, lambda: signed().having(Content_Type="application/jsonx")),
    # envelope (400), after authentication
    ("empty body", 400, _raw(b"")),
    ("random bytes as msgpack", 400, _raw(_garbage(256), p.MSGPACK)),
    ("random bytes as json", 400, _raw(_garbage(256))),
    ("truncated msgpack", 400, _truncated_msgpack),
    ("truncated json", 400, lambda: signed(body=b'{"v":1,"fn":"')),
    ("json array", 400, _raw(b"[1, 2, 3]")),
    ("json null", 400, _raw(b"null")),
    ("json object of the wrong shape", 400, _raw(b'{"hello": "world"}')),
    ("json sent as msgpack", 400, lambda: signed().having(Content_Type=p.MSGPACK)),
    ("msgpack sent as json", 400, lambda: signed(fmt=p.MSGPACK).having(Content_Type=p.JSON)),
    (
        "items missing",
        400,
        lambda: signed(body=b'{"v":1,"fn":"%s","id":"","index":0}' % SQUARE.encode()),
    ),
    ("items a string", 400, _with_envelope(items="123")),
    ("items a map", 400, _with_envelope(items={"a": 1})),
    ("args a map", 400, _with_envelope(args={"a": 1})),
    ("kwargs a list", 400, _with_envelope(kwargs=[1])),
    ("msgpack kwargs with int keys", 400, _with_envelope(fmt=p.MSGPACK, kwargs={1: 2})),
    ("index a string", 400, _with_envelope(index="0")),
    ("envelope of another version", 400, _with_envelope(v=p.VERSION + 1)),
    ("envelope version true", 400, _with_envelope(v=True)),
    ("envelope names another function", 400, _with_envelope(fn="tests.sample_functions:fail_on")),
    ("envelope names os:system", 400, _with_envelope(fn="os:system")),
    ("envelope has another request id", 400, _with_envelope(id="0" * 32)),
    ("bind instance on a plain function", 400, _with_envelope(bind="instance")),
    ("bind to something else", 400, _with_envelope(bind="__import__")),
    # size (413)
    ("body over max_body", 413, lambda: signed(body=b" " * (MAX_BODY + 1))),
    ("unsigned body over max_body", 413, lambda: Request({}, b"x" * (MAX_BODY + 1))),
    ("GET with body over max_body", 413, lambda: Request({}, b"x" * (MAX_BODY + 1), "GET")),
    # no Content-Length (411): the size must be known before a byte is read
    ("chunked valid request", 411, lambda: replace(signed(), chunked=True)),
    # other paths (404): only the route is served
    ("trailing slash", 404, lambda: replace(signed(), path=ROUTE + "/")),
    ("other case", 404, lambda: replace(signed(), path=ROUTE.upper())),
    ("sub path", 404, lambda: replace(signed(), path=ROUTE + "/x")),
]


@pytest.mark.parametrize(("build", "status"), [pytest.param(b, s, id=name) for name, s, b in CASES])
def test_hostile_request_is_refused_and_runs_nothing(
    worker: Worker, build: Callable[[], Request], status: int
) -> None:
    assert_refused(worker, build(), status)


@pytest.mark.parametrize(
    ("length", "statuses"),
    [
        (MAX_BODY + 1, {413}),
        (2**31, {413}),
        (10**30, {400, 413}),  # the HTTP server itself may refuse a length this absurd
    ],
)
def test_announced_length_over_max_body_is_refused_before_the_body_is_read(
    worker: Worker, length: int, statuses: set[int]
) -> None:
    before = worker.runs()
    status, reply = claim_length(worker, signed(), length)
    assert status in statuses
    if status == 413:
        assert reply is not None and reply.error is not None and reply.error.kind == "rejected"
    assert worker.runs() == before


def test_replayed_request_is_409(worker: Worker) -> None:
    request = signed()
    before = worker.runs()
    assert send(worker, request)[0] == 200
    assert len(worker.runs()) == len(before) + 1
    after_first = worker.runs()
    assert_refused(worker, request, 409)
    assert_refused(worker, request.having(Accept=p.MSGPACK), 409)  # Accept is not signed
    rid = request.headers["Serverless-Request-Id"]
    assert_refused(worker, signed(rid=rid), 409)  # re-signed, fresh timestamp, same id
    assert worker.runs() == after_first


def test_deeply_nested_envelope_is_a_400(worker: Worker) -> None:
    rid = secrets.token_hex(16)
    head = b'{"v":1,"fn":"%s","id":"%s","index":0,"items":' % (SQUARE.encode(), rid.encode())
    body = head + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_refused(worker, signed(body=body, rid=rid), 400)


def _invalid_utf8(fmt: str, rid: str) -> bytes:
    """An envelope for request id `rid` with an invalid UTF-8 byte in a string item."""
    body = p.encode(envelope(SQUARE, rid, items=["ab"]), fmt)
    if fmt == p.MSGPACK:
        return body.replace(b"\xa2ab", b"\xa2a\xb3")
    return body.replace(b'"ab"', b'"a\xb3"')


@pytest.mark.parametrize("fmt", [p.JSON, p.MSGPACK])
def test_invalid_utf8_in_envelope_is_a_400(worker: Worker, fmt: str) -> None:
    rid = secrets.token_hex(16)
    body = _invalid_utf8(fmt, rid)
    with pytest.raises(UnicodeDecodeError):  # the trigger, checked in process
        p.decode_call(body, fmt)
    assert_refused(worker, signed(body=body, rid=rid, fmt=fmt), 400)


# -- fuzzing -----------------------------------------------------------------------------------

PRINTABLE = string.printable[:95]  # letters, digits, punctuation and space, no control chars


def _fresh(rng: random.Random) -> Request:
    fmt = rng.choice([p.JSON, p.MSGPACK])
    items = [rng.randrange(-1000, 1000) for _ in range(rng.randrange(1, 20))]
    return signed(
        fmt=fmt, call={"items": items, "args": [rng.randrange(9)], "kwargs": {"scale": 2}}
    )


def _substitute(rng: random.Random, value: str) -> str:
    if not value:
        return rng.choice(PRINTABLE)
    i = rng.randrange(len(value))
    return value[:i] + rng.choice(PRINTABLE.replace(value[i], "")) + value[i + 1 :]


def _mutate(rng: random.Random, request: Request) -> tuple[str, Request, set[int]]:
    """One random mutation of a valid request, with the statuses it may get."""
    body = request.body or b""
    fmt = request.headers["Content-Type"]
    kind = rng.choice(
        ["flip", "truncate", "extend", "substitute", "drop", "swap", "content-type", "stale"]
    )
    if kind == "flip":
        i = rng.randrange(len(body))
        flipped = body[:i] + bytes([body[i] ^ (1 << rng.randrange(8))]) + body[i + 1 :]
        return kind, replace(request, body=flipped), {401}
    if kind == "truncate":
        return kind, replace(request, body=body[: rng.randrange(len(body))]), {401}
    if kind == "extend":
        return kind, replace(request, body=body + rng.randbytes(rng.randint(1, 16))), {401}
    if kind == "stale":
        shift = rng.choice([-1, 1]) * rng.uniform(301, 1e9)
        rid = request.headers["Serverless-Request-Id"]
        return kind, signed(body=body, fmt=fmt, rid=rid, timestamp=_now(shift)), {401}
    if kind == "content-type":
        other = p.JSON if fmt == p.MSGPACK else p.MSGPACK
        junk = "".join(rng.choices(PRINTABLE, k=12))
        value = rng.choice(["", "text/plain", "application/jsonp", "text/json", other, junk])
        expected = 415 if p.media_type(value) is None else 400
        if p.media_type(value) == fmt:
            value, expected = "text/plain", 415
        return kind, request.having(Content_Type=value), {expected}
    name = rng.choice(SIGNED_HEADERS)
    if kind == "drop":
        mutated = request.without(name)
    elif kind == "substitute":
        mutated = replace(
            request, headers={**request.headers, name: _substitute(rng, request.headers[name])}
        )
    else:  # swap two signed headers' values
        other = rng.choice([h for h in SIGNED_HEADERS if h != name])
        headers = dict(request.headers)
        headers[name], headers[other] = headers[other], headers[name]
        mutated = replace(request, headers=headers)
    version_ok = mutated.headers.get("Serverless-Version", "").strip() == str(p.VERSION)
    rid_ok = REQUEST_ID.fullmatch(mutated.headers.get("Serverless-Request-Id", "")) is not None
    if not version_ok:
        return f"{kind} {name}", mutated, {400}
    # a malformed id is a 400 unless the timestamp or the signature header fails first
    return f"{kind} {name}", mutated, {401} if rid_ok else {400, 401}


def test_fuzz_mutated_requests_are_refused_and_run_nothing(worker: Worker) -> None:
    fuzz_mutated(worker, 250)


@pytest.mark.slow
def test_fuzz_campaign_of_thousands(worker: Worker) -> None:
    """The long campaign (pytest -m slow): 5,000 mutated and 3,000 mangled requests."""
    fuzz_mutated(worker, 5000, "long")
    fuzz_signed_garbage(worker, 3000, "long")


def fuzz_mutated(worker: Worker, rounds: int, campaign: str = "") -> None:
    rng = random.Random(f"hostile-fuzz-{worker.kind}{campaign}")
    before = worker.runs()
    failures = []
    for n in range(rounds):
        kind, request, expected = _mutate(rng, _fresh(rng))
        status, reply = send(worker, request)
        rejected = reply is not None and reply.error is not None and reply.error.kind == "rejected"
        if status not in expected or not rejected:
            failures.append((n, kind, status, expected, reply))
    assert failures == []
    assert worker.runs() == before, "a mutated request ran a function"
    assert send(worker, signed())[0] == 200  # still serving, and the check can fail
    assert len(worker.runs()) == len(before) + 1


def test_fuzz_signed_garbage_never_crashes_the_worker(worker: Worker) -> None:
    """Authenticated but mangled envelopes: a 400 or 422, or a run (200, or a structured 500
    for the function's own error), never an unstructured 500."""
    fuzz_signed_garbage(worker, 150)


def fuzz_signed_garbage(worker: Worker, rounds: int, campaign: str = "") -> None:
    rng = random.Random(f"signed-fuzz-{worker.kind}{campaign}")
    failures = []
    for n in range(rounds):
        fmt = rng.choice([p.JSON, p.MSGPACK])
        rid = secrets.token_hex(16)
        items = [rng.randrange(-1000, 1000) for _ in range(rng.randrange(1, 10))]
        call = envelope(SQUARE, rid, items=items, args=[1], kwargs={"scale": 2})
        body = bytearray(p.encode(call, fmt))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(body))
            if rng.random() < 0.7:
                body[i] ^= 1 << rng.randrange(8)
            else:
                del body[i:]
                break
        status, reply = send(worker, signed(body=bytes(body), rid=rid, fmt=fmt))
        error = reply.error if reply is not None else None
        ok = (
            (status == 200 and reply is not None and isinstance(reply.results, list))
            or (status == 400 and error is not None and error.kind == "rejected")
            # a flipped bit can make an item no longer match its annotation (int -> float)
            or (status == 422 and error is not None and error.kind == "input")
            or (status == 500 and error is not None and error.kind in ("user", "result"))
        )
        if not ok:
            failures.append((n, bytes(body), status, reply))
    assert failures == []
