"""Wire protocol v3, its messages: the envelope a caller sends (Call), the reply a worker
answers (Reply), their parts, and their encoding (MessagePack or JSON). Pure, no I/O.

docs/protocol.md is the normative description; keep the two in step.
"""

from __future__ import annotations

import functools
import secrets
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .._exceptions import (
    SerializationError,
)
from . import receiver as _receiver
from . import values as _values

# 2: replies are signed and bound to their request (v1 callers cannot check them). 3: untyped
# values carry Python's built-in types as MessagePack extension types, which a v2 worker would
# hand to the function as msgspec.msgpack.Ext objects: it refuses a v3 request instead.
VERSION = 3
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
    state: dict[str, Any] = {}  # as Call.state


class WireStage(msgspec.Struct, forbid_unknown_fields=False):
    """A Stage as a worker first decodes it (its receiver's state raw, as WireCall's)."""

    fn: str
    bind: str = ""
    state: dict[str, msgspec.Raw] = {}


class StageFigures(msgspec.Struct, forbid_unknown_fields=False):
    """What one stage of a fused call did on the worker: results out, compute time."""

    count: int
    compute_s: float


MAX_PACE = 3600.0  # seconds between item starts a worker accepts (a Call's pace)
LATE_START = 0.04  # seconds after its turn a paced item may still start (§6.3)


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
    # "", "state" (an instance rebuilt from `state`, without __init__), "class", or the
    # seed's "instance" (a fresh instance Owner(), which no caller sends any more)
    bind: str = ""
    # bind "state": the receiver's attributes by name (the caller puts them here encoded
    # once per call, as msgspec.Raw MessagePack, reused by every chunk). A worker that
    # predates it refuses the binding "state" (400): it never runs on a fresh instance.
    state: dict[str, Any] = {}
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
    # a paced chunk: the caller's time.time() when its rate let item 0 start (item i's turn:
    # slot + i * pace). A worker that gets it late (in transit, queued, stopped) moves its
    # items to the turns still ahead and returns the rest unstarted (§6.3), never a burst
    slot: float | None = None
    # the local pool only: the SHA-256 (hex) of the pickle of the call's functions of
    # `__main__`, in the pool's private directory (§5.3); any other worker refuses it
    code: str = ""
    # the W3C traceparent of the caller's span for this request ("": none): signed with the
    # body, so a worker continues only a trace its caller started (§5.5)
    trace: str = ""


class WireCall(msgspec.Struct, forbid_unknown_fields=False):
    """A Call as a worker first decodes it: the values stay raw until the function is known,
    then each decodes into its annotated type (values.py)."""

    v: int
    fn: str
    id: str
    index: int
    items: msgspec.Raw
    args: list[msgspec.Raw] = []
    kwargs: dict[str, msgspec.Raw] = {}
    bind: str = ""
    state: dict[str, msgspec.Raw] = {}
    then: list[WireStage] = []
    isolate: bool = False
    deadline: float | None = None
    start_by: float | None = None
    pace: float | None = None
    group: str = ""
    slot: float | None = None
    code: str = ""
    trace: str = ""


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
    status: int | None = None  # a user's exception's HTTP status (a client's 429), if any


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


# values.py's hooks: untyped values' built-in types as MessagePack extension types, both ways
_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_values.enc_hook)
_json_encoder = msgspec.json.Encoder()
_call_msgpack = msgspec.msgpack.Decoder(Call, ext_hook=_values.ext_hook)
_call_json = msgspec.json.Decoder(Call)
_reply_msgpack = msgspec.msgpack.Decoder(Reply, ext_hook=_values.ext_hook)
_reply_json = msgspec.json.Decoder(Reply)
_wire_call_msgpack = msgspec.msgpack.Decoder(WireCall, ext_hook=_values.ext_hook)
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


def encode_state(receiver: Any, function: str) -> dict[str, msgspec.Raw]:
    """An instance method's receiver as Call.state carries it (receiver.py), encoded once
    per call with the envelope's encoder; SerializationError names what cannot travel."""
    return _receiver.encode_state(receiver, function, encode)


def decode_call(body: bytes, fmt: str) -> Call:
    return _call_json.decode(body) if fmt == JSON else _call_msgpack.decode(body)


def decode_reply(body: bytes, fmt: str) -> Reply:
    return _reply_json.decode(body) if fmt == JSON else _reply_msgpack.decode(body)


@functools.lru_cache(maxsize=256)
def reply_decoder(
    result: Any, fmt: str
) -> msgspec.msgpack.Decoder[Reply] | msgspec.json.Decoder[Reply]:
    """Replies whose results decode, in the same pass, into `list[result]` (where `result` is
    None: as untyped values, their extension types included)."""
    if result is None:
        return _reply_json if fmt == JSON else _reply_msgpack
    typed = msgspec.defstruct(
        "Reply",
        [("results", types.GenericAlias(list, (result,)) | None, None)],
        bases=(Reply,),
        forbid_unknown_fields=False,
    )
    if fmt == JSON:
        return msgspec.json.Decoder(typed)
    return msgspec.msgpack.Decoder(typed, ext_hook=_values.ext_hook)


def decode_wire_call(body: bytes, fmt: str) -> WireCall:
    return _wire_call_json.decode(body) if fmt == JSON else _wire_call_msgpack.decode(body)


def typed_call(
    wire: WireCall,
    shape: _values.Shape,
    fmt: str,
    receivers: Sequence[type | None] = (),
) -> Call | _values.Mismatch:
    """The Call, its values decoded into the types `shape` gives, and each stage's receiver
    state into its class's (`receivers`, by stage: None where the stage has no state); a
    Mismatch if one does not match its annotation. Raises msgspec's errors on a malformed
    envelope."""
    items = _values.decode_items(shape, wire.items, fmt)
    if isinstance(items, _values.Mismatch):
        return items
    arguments = _values.decode_args(shape, wire.args, wire.kwargs, fmt)
    if isinstance(arguments, _values.Mismatch):
        return arguments
    args, kwargs = arguments
    raws = [wire.state, *(stage.state for stage in wire.then)]
    states: list[dict[str, Any]] = []
    for raw, cls in zip(raws, [*receivers, *[None] * len(raws)], strict=False):
        state = _receiver.decode_state(cls, raw, fmt) if cls is not None and raw else {}
        if isinstance(state, _values.Mismatch):
            return state
        states.append(state)
    return Call(
        v=wire.v,
        fn=wire.fn,
        id=wire.id,
        index=wire.index,
        items=items,
        args=args,
        kwargs=kwargs,
        bind=wire.bind,
        state=states[0],
        then=[
            Stage(fn=stage.fn, bind=stage.bind, state=state)
            for stage, state in zip(wire.then, states[1:], strict=True)
        ],
        isolate=wire.isolate,
        deadline=wire.deadline,
        start_by=wire.start_by,
        pace=wire.pace,
        group=wire.group,
        slot=wire.slot,
        code=wire.code,
        trace=wire.trace,
    )


def new_request_id(prefix: str = "") -> str:
    """128 bits as 32 hex digits; `prefix` (hex) takes the place of the first ones (the local
    pool's workers each accept only the ids that name their slot: docs/security.md)."""
    return prefix + secrets.token_hex(16)[len(prefix) :]
