"""Wire protocol v3, the caller's half: build a signed request for a Call, and read a worker's
answer into results or the exception it stands for, trusting nothing unsigned. Pure: the
clock is an argument. (The worker's half, the checks in protocol order, is _worker/endpoint.py.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

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
from .envelope import (
    H_REPLY_SIGNATURE,
    MAX_BODY,
    MSGPACK,
    STAGE_SEPARATOR,
    TOLERANCE,
    VERSION,
    Call,
    Reply,
    decode_reply,
    encode,
    media_type,
    reply_decoder,
)
from .signing import Keyring, reply_signing_message, signed_headers

DEFAULT_ROUTE = "/serverless"  # the worker route's path unless init(route=) / --route say
MAX_CLAIM = 200  # characters of an unsigned answer's text shown in an error
MAX_CLAIM_BODY = 4096  # bytes of an unsigned answer decoded for its text, at most


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
        reply = reply_decoder(shape.result, fmt).decode(raw)
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
            status=error.status,
        )
    if error is not None and error.kind == "result":
        if error.index is not None:  # a result that would not arrive as returned
            raise SerializationError(
                f"result {offset + error.index} of {shape.function or call.fn} on worker "
                f"{worker}, {error.message}",
                index=offset + error.index,
            )
        raise SerializationError(
            f"{call.fn} returned a bad result on worker {worker}: {error.type}: {error.message}"
        )
    if error is not None and error.kind == "input":  # a value did not match its annotation
        first = call.fn.split(STAGE_SEPARATOR)[0]
        if error.index is not None:
            raise SerializationError(
                f"item {offset + error.index} of {first}'s input {error.message}",
                index=offset + error.index,
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
                status=error.status,
            )
        )
    out += results[taken:]
    return out


def _unsigned(status: int, content_type: str | None, raw: bytes, what: str, url: str) -> None:
    """Raise for an answer that no worker holding the secret signed, saying what most likely
    went wrong and how to fix it. Nothing in it is trusted: its text (a worker's refusal, a
    proxy's page) is shown, bounded, as the answer's claim, and only picks the likelier hint."""
    version: int | None = None
    claim = ""
    if len(raw) <= MAX_CLAIM_BODY:  # a refusal is small: a large body is not read at all
        with contextlib.suppress(Exception):  # best effort, on bytes anyone may have sent
            reply = decode_reply(raw, media_type(content_type) or MSGPACK)
            version = reply.v
            claim = reply.error.message if reply.error is not None else ""
    if version is not None and version != VERSION:
        raise ProtocolError(_versions(what, version), url=url, status=status)
    worded = bool(claim)  # a worker's refusal, as far as its unsigned bytes tell
    if not claim:
        text = raw[: 4 * MAX_CLAIM].decode("utf-8", "replace")
        claim = "" if "\ufffd" in text else text
    says = ""
    if claim:
        says = f"; the answer, unsigned and so unverified, says {_bounded(claim)!r}"
    elif raw:
        says = f"; the answer is {len(raw)} unsigned bytes that are not text"
    if status == 401:
        if not worded and raw:
            says += (
                ": if that is not a worker's refusal, something in front of the worker (a "
                "proxy, the platform) asks for credentials of its own"
            )
        raise RequestRejected(
            f"{what} was refused: {_unauthenticated(claim)}{says}", url=url, status=status
        )
    if status in (404, 405):
        raise RequestRejected(
            f"{what} was refused: {_no_route(url, status)}{says}", url=url, status=status
        )
    if 400 <= status < 500:
        message = (
            f"{what} was refused with an unsigned {status}: not an answer from a worker route "
            f"holding this caller's secret{says}"
        )
        raise RequestRejected(message, url=url, status=status)
    raise ProtocolError(
        f"{what}: the answer is not signed by a worker holding the secret, so it was not "
        f"read (not a worker route, or a forged answer){says}",
        url=url,
        status=status,
    )


def _bounded(text: str) -> str:
    """An untrusted text as one line of at most MAX_CLAIM printable characters."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= MAX_CLAIM else text[: MAX_CLAIM - 3] + "..."


_SET_SECRET = (
    "set the same secret on both sides: serverless.init(secret=...) or $SERVERLESS_SECRET "
    "in the caller, and in the worker ($SERVERLESS_SECRET for `serverless worker`; several, "
    "comma-separated, during a rotation)"
)


def _unauthenticated(claim: str) -> str:
    """A 401's likely cause and fix. The worker's (unverified) words pick the likelier cause;
    either way, both are named."""
    if "timestamp" in claim:
        return (
            "its timestamp is outside the worker's tolerance window (the worker says so): the "
            f"clocks of this machine and the worker differ by more than {TOLERANCE:g}s (clock "
            "skew): synchronise them (NTP). Otherwise the worker does not hold this caller's "
            f"secret: {_SET_SECRET}"
        )
    if "bad signature" in claim:
        return (
            "the worker holds a key with this caller's key id but the signature does not check "
            "out: the path the worker sees differs from the URL's (a proxy rewriting it), or "
            f"the request was changed in transit; otherwise a wrong secret: {_SET_SECRET}"
        )
    return (
        "not authenticated (401): a wrong or missing secret, the worker holding none of the "
        f"caller's keys: {_SET_SECRET}. Or clock skew: the clocks of this machine and the "
        f"worker differ by more than its tolerance ({TOLERANCE:g}s)"
    )


def _no_route(url: str, status: int) -> str:
    """An unsigned 404/405: nothing serves the worker route at the URL's path."""
    parts = urlsplit(url)
    path = parts.path or "/"
    base = f"{parts.scheme}://{parts.netloc}"
    if path == "/":
        return (
            f"the URL {url} has no route (its path is {path!r}): the worker route is mounted "
            f"at a path, {DEFAULT_ROUTE} unless serverless.init(route=...) or `serverless "
            f"worker --route` says otherwise: use {base}{DEFAULT_ROUTE}"
        )
    return (
        f"nothing serves the worker route at {path!r} on {base} ({status}, unsigned: not a "
        "worker route): the URL's path must be the worker's route, as given to "
        f"serverless.init(route=...) or `serverless worker --route` (default {DEFAULT_ROUTE})"
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
            ". A function of __main__ (the script being run, a notebook, the REPL) runs only "
            "on the local pool, which gets it by value; move it into a module that both the "
            "caller and the worker app import (with `serverless worker`, name that module)"
        )
    return (
        f". The worker has not imported {module} or runs other code: import {module} in the "
        "worker app (with `serverless worker`, name it) and deploy the caller's code there"
    )
