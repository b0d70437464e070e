"""Wire protocol v2 in both directions: envelopes, encoding, HMAC signatures, and the caller's
half (build a signed request, read a reply into results or an exception). Pure, no I/O: the
clock is an argument.

docs/protocol.md is the normative description; keep the two in step.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import secrets
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .._exceptions import (
    ConfigurationError,
    ProtocolError,
    RemoteError,
    RequestRejected,
    SerializationError,
    WorkerTimeout,
    WorkerUnavailable,
)
from . import values as _values

VERSION = 2  # 2: replies are signed and bound to their request (v1 callers cannot check them)
MSGPACK = "application/msgpack"
JSON = "application/json"
MAX_BODY = 32 * 1024 * 1024  # the App Engine and Cloud Run request limit
MAX_REPLY = 32 * 1024 * 1024  # the caller holds at most this of one answer (Cloud Run's limit)
TOLERANCE = 300.0  # seconds a timestamp may differ from the worker's clock

H_VERSION = "serverless-version"
H_FUNCTION = "serverless-function"
H_TIMESTAMP = "serverless-timestamp"
H_REQUEST_ID = "serverless-request-id"
H_SIGNATURE = "serverless-signature"
H_REPLY_SIGNATURE = "serverless-reply-signature"


@dataclass
class Response:
    """An answer as bytes: what a worker endpoint returns and what a transport hands back to
    the caller. Header names are lower-case; the HTTP client keeps only those the caller
    reads (content-type, Serverless-*, Retry-After)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


STAGE_SEPARATOR = ","  # fused stages: "mod:a,mod:b" (never in a Python qualified name)


class Stage(msgspec.Struct, forbid_unknown_fields=False):
    """A further function a fused call runs on the previous stage's results."""

    fn: str
    bind: str = ""


class StageFigures(msgspec.Struct, forbid_unknown_fields=False):
    """What one stage of a fused call did on the worker: results out, compute time."""

    count: int
    compute_s: float


MAX_PACE = 3600.0  # seconds between item starts a worker accepts (a Call's pace)


class Call(msgspec.Struct, forbid_unknown_fields=False):
    """The request envelope: one chunk of one function call.

    Fused pipeline steps: `fn` (and the signed Serverless-Function header) name every stage
    joined by ",", and `then` lists the stages after the first with their bindings. A worker
    that predates fusion looks the joined name up, finds nothing and answers 404: it never
    silently runs only the first stage.
    """

    v: int
    fn: str
    id: str
    index: int
    items: list[Any]
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    bind: str = ""  # "", "instance" (a fresh instance of the class) or "class"
    then: list[Stage] = []
    # errors="return": run the function item by item, each item's error in the reply (§6.2)
    isolate: bool = False
    # the caller's time.time() after which it no longer wants the chunk: not started after it
    deadline: float | None = None
    # the time by which the chunk must start, else a "busy" refusal instead of queueing
    start_by: float | None = None
    # None: the function gets the whole chunk. A number: it gets one item at a time, the items
    # starting at most one per `pace` seconds (0: back to back), and a Throttled stops the
    # chunk with the results so far (§6.3)
    pace: float | None = None
    # the call the chunk belongs to (the same random id on all its chunks): once one of its
    # items is throttled, the worker stops its other item-by-item chunks at their next item
    group: str = ""


class WireCall(msgspec.Struct, forbid_unknown_fields=False):
    """A Call as a worker first decodes it: the values stay raw until the function is known,
    then each decodes into its annotated type (_values)."""

    v: int
    fn: str
    id: str
    index: int
    items: msgspec.Raw
    args: list[msgspec.Raw] = []
    kwargs: dict[str, msgspec.Raw] = {}
    bind: str = ""
    then: list[Stage] = []
    isolate: bool = False
    deadline: float | None = None
    start_by: float | None = None
    pace: float | None = None
    group: str = ""


class ErrorInfo(msgspec.Struct, forbid_unknown_fields=False):
    """A structured error. kind: rejected | busy | expired | input | user | result | internal."""

    kind: str
    type: str
    message: str
    traceback: str = ""
    index: int | None = None
    item: str | None = None
    retryable: bool = False
    stage: int = 0  # of a fused call: the stage that failed (`index` is into its input)


class ItemError(msgspec.Struct, forbid_unknown_fields=False):
    """One item of an isolated call that raised: `index` is its position in the chunk, `at`
    the number of results the items before it produced (where its error goes among them)."""

    index: int
    at: int
    error: ErrorInfo


class Throttle(msgspec.Struct, forbid_unknown_fields=False):
    """A paced chunk stopped by the function's Throttled: the items from `at` on did not run
    (the one at `at` was refused downstream); `retry_after`: the seconds it asked for."""

    at: int
    retry_after: float | None = None
    message: str = ""
    ran: int = 0  # items that ran before it (a whole-chunk call loses their results: at 0)
    # nothing was refused: another chunk of the same call (`group`) was throttled on this
    # worker meanwhile, and this one stopped before its next item
    stopped: bool = False


class Reply(msgspec.Struct, forbid_unknown_fields=False):
    """The response envelope: results, or an error, plus worker-side timings."""

    v: int
    worker: str = ""
    results: list[Any] | None = None
    error: ErrorInfo | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    stages: list[StageFigures] | None = None  # a fused call: one entry per stage
    # an isolated call (Call.isolate): the items that raised; `results` holds the others'
    item_errors: list[ItemError] | None = None
    capacity: int | None = None  # chunks of a sync function the worker runs at once
    throttled: Throttle | None = None  # the chunk stopped at a throttle: `results` are partial


_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
_call_msgpack = msgspec.msgpack.Decoder(Call)
_call_json = msgspec.json.Decoder(Call)
_reply_msgpack = msgspec.msgpack.Decoder(Reply)
_reply_json = msgspec.json.Decoder(Reply)
_wire_call_msgpack = msgspec.msgpack.Decoder(WireCall)
_wire_call_json = msgspec.json.Decoder(WireCall)


def media_type(content_type: str | None) -> str | None:
    """The wire format named by a Content-Type header, or None if it is not one of ours."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    if base in (MSGPACK, "application/x-msgpack", "application/vnd.msgpack"):
        return MSGPACK
    if base == JSON:
        return JSON
    return None


def encode(obj: Any, fmt: str = MSGPACK) -> bytes:
    """Encode an envelope; SerializationError names what cannot be carried."""
    try:
        if fmt == JSON:
            return _json_encoder.encode(obj)
        return _msgpack_encoder.encode(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot encode for the wire: {exc}") from exc


def decode_call(body: bytes, fmt: str) -> Call:
    return _call_json.decode(body) if fmt == JSON else _call_msgpack.decode(body)


def decode_reply(body: bytes, fmt: str) -> Reply:
    return _reply_json.decode(body) if fmt == JSON else _reply_msgpack.decode(body)


@functools.lru_cache(maxsize=256)
def _reply_decoder(
    result: Any, fmt: str
) -> msgspec.msgpack.Decoder[Reply] | msgspec.json.Decoder[Reply]:
    """Replies whose results decode, in the same pass, into `list[result]` (where `result` is
    None: as plain data)."""
    if result is None:
        return _reply_json if fmt == JSON else _reply_msgpack
    typed = msgspec.defstruct(
        "Reply",
        [("results", types.GenericAlias(list, (result,)) | None, None)],
        bases=(Reply,),
        forbid_unknown_fields=False,
    )
    return msgspec.json.Decoder(typed) if fmt == JSON else msgspec.msgpack.Decoder(typed)


def decode_wire_call(body: bytes, fmt: str) -> WireCall:
    return _wire_call_json.decode(body) if fmt == JSON else _wire_call_msgpack.decode(body)


def typed_call(wire: WireCall, shape: _values.Shape, fmt: str) -> Call | _values.Mismatch:
    """The Call, its values decoded into the types `shape` gives; a Mismatch if one does not
    match its annotation. Raises msgspec's errors on a malformed envelope."""
    items = _values.decode_items(shape, wire.items, fmt)
    if isinstance(items, _values.Mismatch):
        return items
    arguments = _values.decode_args(shape, wire.args, wire.kwargs, fmt)
    if isinstance(arguments, _values.Mismatch):
        return arguments
    args, kwargs = arguments
    return Call(
        v=wire.v,
        fn=wire.fn,
        id=wire.id,
        index=wire.index,
        items=items,
        args=args,
        kwargs=kwargs,
        bind=wire.bind,
        then=wire.then,
        isolate=wire.isolate,
        deadline=wire.deadline,
        start_by=wire.start_by,
        pace=wire.pace,
        group=wire.group,
    )


def new_request_id() -> str:
    return secrets.token_hex(16)


def key_id(secret: str) -> str:
    """A public fingerprint of a secret, so a worker knows which key a signature uses."""
    return hashlib.sha256(b"serverless-key-id:" + secret.encode()).hexdigest()[:12]


def string_to_sign(
    method: str, path: str, function: str, timestamp: str, request_id: str, body: bytes
) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return signing_message(method, path, function, timestamp, request_id, digest)


def signing_message(
    method: str, path: str, function: str, timestamp: str, request_id: str, digest: str
) -> bytes:
    """string_to_sign for a body already hashed (the worker hashes it as it arrives)."""
    fields = (f"v{VERSION}", method.upper(), path, function, timestamp, request_id, digest)
    return "\n".join(fields).encode()


def reply_signing_message(status: int, request_id: str, body: bytes) -> bytes:
    """What a worker signs in its answer: the status, the request it answers, the body. A
    reply cannot be forged, nor moved to another request, nor changed in transit."""
    fields = (f"reply-v{VERSION}", str(status), request_id, hashlib.sha256(body).hexdigest())
    return "\n".join(fields).encode()


def _hmac(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 as lower-case hex. hmac.digest is OpenSSL's one-shot: ~1 us, against ~5 us
    for hmac.new(...).hexdigest(), and a round trip signs and checks four times."""
    return hmac.digest(key, message, "sha256").hex()


class Keyring:
    """Secrets known to this process: the first signs, all verify.

    One signing key at a time, so that once every caller has moved to a new key the old one
    is out of circulation and can be revoked; several verifying keys, so that a rotation is
    rolled out without refusing anything (docs/deploy.md)."""

    def __init__(self, secrets_: str | Sequence[str]) -> None:
        items = [secrets_] if isinstance(secrets_, str) else list(secrets_)
        if not items or any(not isinstance(s, str) or len(s) < 16 for s in items):
            raise ConfigurationError("each secret must be a string of at least 16 characters")
        self._keys = {key_id(s): s.encode() for s in items}

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def sign(self, message: bytes, kid: str | None = None) -> str:
        """A signature header value, `kid=hex`: with the signing key, or with the key `kid`
        (a worker answers with the key that signed the request, which its caller holds)."""
        kid = kid if kid is not None else next(iter(self._keys))
        return f"{kid}={_hmac(self._keys[kid], message)}"

    def verify(self, message: bytes, header: str) -> str | bool | None:
        """The key id of a signature that checks out; False if none does, None if no key id
        is known."""
        known = False
        for part in header.split(","):
            kid, sep, sig = part.strip().partition("=")
            key = self._keys.get(kid)
            if not sep or key is None:
                continue
            known = True
            expected = _hmac(key, message)
            if hmac.compare_digest(expected.encode(), sig.strip().encode("ascii", "replace")):
                return kid
        return False if known else None


def signed_headers(
    keyring: Keyring,
    path: str,
    function: str,
    request_id: str,
    body: bytes,
    fmt: str = MSGPACK,
    *,
    now: float,
) -> dict[str, str]:
    """Headers for one POST of `body`, whose envelope carries `request_id`, signed at the
    time `now` (the caller's clock: this module reads none)."""
    timestamp = f"{now:.3f}"
    message = string_to_sign("POST", path, function, timestamp, request_id, body)
    return {
        "Content-Type": fmt,
        "Accept": fmt,
        "Serverless-Version": str(VERSION),
        "Serverless-Function": function,
        "Serverless-Timestamp": timestamp,
        "Serverless-Request-Id": request_id,
        "Serverless-Signature": keyring.sign(message),
    }


# -- the caller's half ---------------------------------------------------------------------


def build_request(
    keyring: Keyring, route: str, call: Call, now: float, max_body: int = MAX_BODY
) -> tuple[bytes, dict[str, str]]:
    """The encoded envelope of `call` and its signed headers, as of the time `now`."""
    body = encode(call)
    if len(body) > max_body:
        raise ConfigurationError(
            f"chunk {call.index} of {call.fn} encodes to {len(body)} bytes, over the "
            f"{max_body}-byte request limit: use a smaller chunk_size or more workers"
        )
    return body, signed_headers(keyring, route, call.fn, call.id, body, now=now)


def retry_after(value: str | None) -> float | None:
    """Seconds of a Retry-After header (RFC 9110: delay-seconds; an HTTP date, rarely sent
    by a balancer, is not worth a parser here), capped at a minute: None if absent or bad."""
    if value is None or not value.strip().isdigit():
        return None
    return min(60.0, float(value))


def read_reply(
    status: int,
    content_type: str | None,
    raw: bytes,
    headers: Mapping[str, str],
    call: Call,
    offset: int,
    url: str,
    keyring: Keyring,
    shape: _values.Shape = _values.UNTYPED,
) -> Reply:
    """A reply to `call` (whose first item is item `offset` of the whole input): the Reply if
    it carries results, decoded into the element type of `shape`'s return where it has one,
    else the exception that says what went wrong.

    Nothing of the body is decoded before its signature checks out for this very request:
    an unsigned answer may only say "retry later" (a load balancer's 429/502/503/504) or
    "refused" (an anonymous refusal: a wrong secret, clock or route), never carry results."""
    what = f"chunk {call.index} of {call.fn}"
    message = reply_signing_message(status, call.id, raw)
    signed = keyring.verify(message, headers.get(H_REPLY_SIGNATURE, ""))
    if status in (429, 502, 503, 504):  # a platform at capacity, or no healthy instance
        refusal = _signed_refusal(raw, content_type) if signed else None
        kind = refusal.error.kind if refusal is not None and refusal.error is not None else None
        if status == 504 and kind == "expired":
            # the worker did not start it: past its deadline, as a timed-out attempt
            raise WorkerTimeout(f"{what} expired before a worker started it", url=url)
        if status == 503 and kind == "busy" and refusal is not None and refusal.capacity:
            # our own worker, full: it says how many it runs at once, and the caller's window
            # now holds no more than that, so waiting out a Retry-After would only lose time
            raise WorkerUnavailable(
                f"{what}: the worker is busy (it runs {refusal.capacity} at once)",
                url=url,
                status=status,
                capacity=refusal.capacity,
                worker=refusal.worker,
            )
        raise WorkerUnavailable(
            f"{what}: worker unavailable",
            url=url,
            status=status,
            retry_after=retry_after(headers.get("retry-after")),
        )
    if not signed:
        _unsigned(status, content_type, raw, what, url)
    fmt = media_type(content_type) or MSGPACK
    try:
        reply = _reply_decoder(shape.result, fmt).decode(raw)
    except msgspec.ValidationError as exc:
        mismatch = _values.result_mismatch(shape, exc, raw, fmt, offset)
        if status == 200 and mismatch is not None:
            raise mismatch from None
        raise ProtocolError(f"{what}: a signed answer of the wrong shape: {exc}", url=url) from exc
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(
            f"{what}: a signed answer that does not decode: {exc}", url=url
        ) from exc
    if reply.v != VERSION:
        raise ProtocolError(_versions(what, reply.v), url=url, status=status)
    if status == 200 and reply.results is not None:
        if (
            call.then
            and reply.throttled is None
            and (
                reply.stages is None
                or len(reply.stages) != len(call.then) + 1
                or reply.stages[-1].count != len(reply.results)
            )
        ):
            raise ProtocolError(f"{what}: its per-stage figures do not match", url=url)
        if reply.throttled is not None and not 0 <= reply.throttled.at < len(call.items):
            raise ProtocolError(f"{what}: a throttle outside the chunk", url=url)
        if reply.item_errors is not None:
            reply.results = _in_place(reply, call, offset, url)
        return reply
    error, worker = reply.error, reply.worker
    if error is not None and error.kind == "user":
        names = call.fn.split(STAGE_SEPARATOR)  # a fused call names every stage
        stage = error.stage if 0 < error.stage < len(names) else 0
        index = None if error.index is None or stage else offset + error.index
        raise RemoteError(
            names[stage] if stage else call.fn,
            error.type,
            error.message,
            error.traceback,
            index=index,
            item=error.item,
            worker=worker,
        )
    if error is not None and error.kind == "result":
        if error.index is not None:  # a result that would not arrive as returned
            raise SerializationError(
                f"result {offset + error.index} of {shape.function or call.fn} on worker "
                f"{worker}, {error.message}"
            )
        raise SerializationError(
            f"{call.fn} returned a bad result on worker {worker}: {error.type}: {error.message}"
        )
    if error is not None and error.kind == "input":  # a value did not match its annotation
        first = call.fn.split(STAGE_SEPARATOR)[0]
        if error.index is not None:
            raise SerializationError(
                f"item {offset + error.index} of {first}'s input {error.message}"
            )
        raise SerializationError(f"{first}: {error.message}")
    detail = error.message if error is not None else "neither results nor an error"
    if status == 404 and error is not None:
        detail += _unregistered_hint(call.fn, detail)
    if 400 <= status < 500:
        raise RequestRejected(f"{what} was refused: {detail}", url=url, status=status)
    raise ProtocolError(f"{what}: not a protocol answer: {detail!r}", url=url, status=status)


def _signed_refusal(raw: bytes, content_type: str | None) -> Reply | None:
    """A signed 503/504's reply (its kind, the worker's capacity), or None if it has none."""
    try:
        return decode_reply(raw, media_type(content_type) or MSGPACK)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None


def _in_place(reply: Reply, call: Call, offset: int, url: str) -> list[Any]:
    """An isolated call's results with each failed item's RemoteError where it belongs."""
    results, errors = reply.results or [], reply.item_errors or []
    out: list[Any] = []
    taken = 0
    ran = reply.throttled.at if reply.throttled is not None else len(call.items)
    for failed in sorted(errors, key=lambda e: e.index):
        if not taken <= failed.at <= len(results) or not 0 <= failed.index < ran:
            raise ProtocolError(f"chunk {call.index} of {call.fn}: bad per-item errors", url=url)
        out += results[taken : failed.at]
        taken = failed.at
        error = failed.error
        out.append(
            RemoteError(
                call.fn,
                error.type,
                error.message,
                error.traceback,
                index=offset + failed.index,
                item=error.item,
                worker=reply.worker,
            )
        )
    out += results[taken:]
    return out


def _unsigned(status: int, content_type: str | None, raw: bytes, what: str, url: str) -> None:
    """Raise for an answer that no worker holding the secret signed. Its text only helps a
    person diagnose (a wrong secret, an old worker, a proxy's page): nothing in it is used."""
    version: int | None = None
    with contextlib.suppress(Exception):  # best effort, on bytes anyone may have sent
        version = decode_reply(raw, media_type(content_type) or MSGPACK).v
    if version is not None and version != VERSION:
        raise ProtocolError(_versions(what, version), url=url, status=status)
    text = raw[:200].decode("utf-8", "replace")
    excerpt = text if text.isprintable() else f"{len(raw)} bytes"
    if 400 <= status < 500:
        message = f"{what} was refused (an unsigned answer: {excerpt!r})"
        raise RequestRejected(message, url=url, status=status)
    raise ProtocolError(
        f"{what}: the answer is not signed by a worker holding the secret, so it was not "
        f"read (not a worker route, or a forged answer): {excerpt!r}",
        url=url,
        status=status,
    )


def _versions(what: str, theirs: int) -> str:
    return (
        f"{what}: the worker speaks wire protocol v{theirs} and this caller v{VERSION}: "
        "upgrade simple-serverless on callers and workers together (docs/protocol.md)"
    )


def _unregistered_hint(fn: str, detail: str) -> str:
    """How to get a function that a worker does not know registered there (a 404)."""
    names = fn.split(STAGE_SEPARATOR)
    name = next((n for n in names if repr(n) in detail), names[0])
    module = name.partition(":")[0]
    if module == "__main__":
        return (
            ". A function of the script being run (__main__) is registered on a worker only "
            "if the worker runs that same script as its main program; move it into a module "
            "that both the script and the worker app import (with `serverless worker`, name "
            "that module)"
        )
    return (
        f". The worker has not imported {module} or runs other code: import {module} in the "
        "worker app (with `serverless worker`, name it) and deploy the caller's code there"
    )
