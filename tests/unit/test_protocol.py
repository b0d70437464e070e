"""The wire protocol as a round trip with no I/O: the caller builds and signs a request
(`build_request`), the worker accepts and runs it (`Endpoint.accept`, `run`), the caller reads
the reply (`read_reply`). Every protocol change is tested in both directions here."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import serverless
from serverless import _wire as p
from serverless._worker.endpoint import Endpoint, Job
from tests import sample_functions as sf
from tests.conftest import SECRET

ROUTE = "/serverless"
NOW = 1_800_000_000.0
URL = "inprocess://w/serverless"
KEYS = p.Keyring(SECRET)


def envelope(fn: str, items: list[Any], index: int = 0, **fields: Any) -> p.Call:
    return p.Call(v=p.VERSION, fn=fn, id=p.new_request_id(), index=index, items=items, **fields)


def roundtrip(
    call: p.Call,
    *,
    offset: int = 0,
    sent_at: float = NOW,
    worker_clock: float = NOW,
    caller_secret: str = SECRET,
    tamper: bool = False,
    endpoint: Endpoint | None = None,
) -> p.Reply:
    """Push `call` through build, accept, run and read."""
    body, headers = p.build_request(p.Keyring(caller_secret), ROUTE, call, sent_at)
    if tamper:
        body = body[:-1] + bytes([body[-1] ^ 1])
    endpoint = endpoint or Endpoint(ROUTE, p.Keyring(SECRET), clock=lambda: worker_clock)
    job = endpoint.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
    answer = endpoint.run(job) if isinstance(job, Job) else job
    content_type = dict(answer.headers)["content-type"]
    headers = dict(answer.headers)
    return p.read_reply(answer.status, content_type, answer.body, headers, call, offset, URL, KEYS)


def test_results_come_back_with_worker_timings() -> None:
    reply = roundtrip(envelope(sf.square.entry.name, [1, 2, 3], args=[1], kwargs={"scale": 2}))
    assert reply.results == [4, 10, 20]
    assert reply.worker and reply.compute_s >= 0 and reply.queue_s >= 0


def test_a_user_exception_is_a_remote_error_indexed_into_the_whole_input() -> None:
    call = envelope(sf.fail_on.entry.name, [5, 6, 7], args=[6])
    with pytest.raises(serverless.RemoteError) as info:
        roundtrip(call, offset=40)
    assert info.value.index == 41 and info.value.item == "6"
    assert info.value.type_name == "ValueError" and "cannot handle 6" in info.value.message


def test_a_tampered_body_is_refused() -> None:
    with pytest.raises(serverless.RequestRejected) as info:
        roundtrip(envelope(sf.square.entry.name, [1]), tamper=True)
    assert info.value.status == 401


def test_another_secret_is_refused() -> None:
    with pytest.raises(serverless.RequestRejected) as info:
        roundtrip(envelope(sf.square.entry.name, [1]), caller_secret="another-secret-0123456789")
    assert info.value.status == 401


@pytest.mark.parametrize("skew", [-301.0, 301.0])
def test_a_timestamp_outside_the_window_is_refused(skew: float) -> None:
    with pytest.raises(serverless.RequestRejected) as info:
        roundtrip(envelope(sf.square.entry.name, [1]), worker_clock=NOW + skew)
    assert info.value.status == 401


def test_a_replay_is_refused() -> None:
    endpoint = Endpoint(ROUTE, p.Keyring(SECRET), clock=lambda: NOW)
    call = envelope(sf.square.entry.name, [2])
    assert roundtrip(call, endpoint=endpoint).results == [4]
    with pytest.raises(serverless.RequestRejected) as info:
        roundtrip(call, endpoint=endpoint)
    assert info.value.status == 409


def test_an_unregistered_main_function_says_where_functions_must_live() -> None:
    with pytest.raises(serverless.RequestRejected) as info:
        roundtrip(envelope("__main__:nowhere", [1]))
    assert info.value.status == 404 and "move it into a module" in str(info.value)


def test_fused_stages_report_their_own_figures() -> None:
    names = [sf.square.entry.name, sf.odd_only.entry.name]
    call = envelope(",".join(names), [1, 2, 3], then=[p.Stage(fn=names[1])])
    reply = roundtrip(call)
    assert reply.results == [1, 9]
    assert reply.stages is not None and [s.count for s in reply.stages] == [3, 2]


def test_an_oversized_chunk_is_refused_before_sending() -> None:
    call = envelope(sf.square.entry.name, list(range(1000)))
    with pytest.raises(serverless.ConfigurationError, match="request limit"):
        p.build_request(p.Keyring(SECRET), ROUTE, call, NOW, max_body=100)


@pytest.mark.parametrize(
    ("status", "error"),
    [(503, serverless.WorkerUnavailable), (429, serverless.WorkerUnavailable)],
)
def test_capacity_answers_are_retryable(status: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        p.read_reply(status, "text/plain", b"busy", {}, envelope("m:f", [1]), 0, URL, KEYS)


@pytest.mark.parametrize("body", [b"<html>not ours</html>", b"\xff\xfe", b"\x91" * 5000])
def test_an_answer_that_is_not_the_protocol_is_a_protocol_error(body: bytes) -> None:
    for content_type in (None, p.MSGPACK, p.JSON):
        with pytest.raises(serverless.ProtocolError):
            p.read_reply(200, content_type, body, {}, envelope("m:f", [1]), 0, URL, KEYS)


# -- replies are authenticated and bound to their request (issue 14, finding 3) -------------


def signed_reply(call: p.Call, reply: p.Reply, status: int = 200, key: str = SECRET) -> Any:
    """An answer as a worker holding `key` would sign it for `call`."""
    body = p.encode(reply)
    message = p.reply_signing_message(status, call.id, body)
    return body, {p.H_REPLY_SIGNATURE: p.Keyring(key).sign(message)}


def test_a_forged_unsigned_answer_is_refused_unread() -> None:
    # whoever answers in a worker's place (a redirected callback, a spoofed DNS name, a
    # man in the middle without TLS): 12 forged results for a 4-item chunk
    call = envelope(sf.square.entry.name, [1, 2, 3, 4])
    forged = p.encode(p.Reply(v=p.VERSION, worker="w", results=[-666] * 12))
    with pytest.raises(serverless.ProtocolError, match="not signed"):
        p.read_reply(200, p.MSGPACK, forged, {}, call, 0, URL, KEYS)


def test_a_genuine_answer_to_another_request_is_refused() -> None:
    first, second = envelope(sf.square.entry.name, [1]), envelope(sf.square.entry.name, [2])
    body, headers = signed_reply(first, p.Reply(v=p.VERSION, results=[1]))
    assert p.read_reply(200, p.MSGPACK, body, headers, first, 0, URL, KEYS).results == [1]
    with pytest.raises(serverless.ProtocolError, match="not signed"):
        p.read_reply(200, p.MSGPACK, body, headers, second, 0, URL, KEYS)


def test_a_signed_answer_changed_in_transit_or_signed_with_another_key_is_refused() -> None:
    call = envelope(sf.square.entry.name, [3])
    body, headers = signed_reply(call, p.Reply(v=p.VERSION, results=[9]))
    changed = body.replace(b"\x09", b"\x0a")
    assert changed != body
    for status, raw, sig in [
        (200, changed, headers),
        (500, body, headers),  # the status is signed too
        (200, body, signed_reply(call, p.Reply(v=p.VERSION, results=[9]), key="x" * 20)[1]),
    ]:
        with pytest.raises(serverless.ProtocolError, match="not signed"):
            p.read_reply(status, p.MSGPACK, raw, sig, call, 0, URL, KEYS)


def test_an_unsigned_refusal_is_a_rejection_that_reads_nothing() -> None:
    call = envelope(sf.square.entry.name, [1])
    refusal = p.encode(p.Reply(v=p.VERSION, error=p.ErrorInfo("rejected", "HTTP401", "bad")))
    with pytest.raises(serverless.RequestRejected, match="unverified, says 'bad'") as info:
        p.read_reply(401, p.MSGPACK, refusal, {}, call, 0, URL, KEYS)
    assert info.value.status == 401 and "SERVERLESS_SECRET" in str(info.value)


def test_an_unsigned_answers_claim_is_shown_bounded_and_printable() -> None:
    call = envelope(sf.square.entry.name, [1])
    claim = "timestamp \x1b[31m" + "x" * 5000
    refusal = p.encode(p.Reply(v=p.VERSION, error=p.ErrorInfo("rejected", "HTTP401", claim)))
    with pytest.raises(serverless.RequestRejected) as info:
        p.read_reply(401, p.MSGPACK, refusal, {}, call, 0, URL, KEYS)
    message = str(info.value)
    assert "clock skew" in message and "\x1b" not in message and "x" * 300 not in message
    assert "SERVERLESS_SECRET" in message  # the claim is unverified: the other cause too


def test_an_old_worker_is_named_with_both_versions() -> None:
    call = envelope(sf.square.entry.name, [1])
    old = msgspec.msgpack.encode(
        {"v": 1, "error": {"kind": "rejected", "type": "HTTP400", "message": "unsupported version"}}
    )
    with pytest.raises(serverless.ProtocolError, match="v1 and this caller v2"):
        p.read_reply(400, p.MSGPACK, old, {}, call, 0, URL, KEYS)


def test_a_fused_answer_whose_stage_figures_do_not_match_is_refused() -> None:
    names = [sf.square.entry.name, sf.odd_only.entry.name]
    call = envelope(",".join(names), [1, 2, 3], then=[p.Stage(fn=names[1])])
    stages = [p.StageFigures(3, 0.0), p.StageFigures(2, 0.0)]
    body, headers = signed_reply(call, p.Reply(v=p.VERSION, results=[1, 9, 25], stages=stages))
    with pytest.raises(serverless.ProtocolError, match="per-stage figures"):
        p.read_reply(200, p.MSGPACK, body, headers, call, 0, URL, KEYS)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"\x91" * 5000, b"\xc1", b""])
def test_a_signed_answer_that_does_not_decode_is_a_protocol_error(raw: bytes) -> None:
    call = envelope(sf.square.entry.name, [1])
    sig = {p.H_REPLY_SIGNATURE: KEYS.sign(p.reply_signing_message(200, call.id, raw))}
    with pytest.raises(serverless.ProtocolError, match=r"does not decode|wrong shape"):
        p.read_reply(200, p.MSGPACK, raw, sig, call, 0, URL, KEYS)


def test_every_answer_to_an_authenticated_request_is_signed() -> None:
    endpoint = Endpoint(ROUTE, p.Keyring(SECRET), clock=lambda: NOW)
    for call in [
        envelope(sf.square.entry.name, [1]),  # 200
        envelope(sf.fail_on.entry.name, [1], args=[1]),  # 500 user
        envelope("tests.sample_functions:nowhere", [1]),  # 404 after authentication
    ]:
        body, headers = p.build_request(KEYS, ROUTE, call, NOW)
        job = endpoint.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
        answer = endpoint.run(job) if isinstance(job, Job) else job
        sig = dict(answer.headers)[p.H_REPLY_SIGNATURE]
        assert KEYS.verify(p.reply_signing_message(answer.status, call.id, answer.body), sig)


# -- throttles (§6.3) ---------------------------------------------------------------------


def test_a_paced_call_runs_item_by_item_and_a_throttle_keeps_the_results_before_it() -> None:
    from tests.quota import DOWNSTREAM

    DOWNSTREAM.reset(rate=0.001, burst=3.0)  # three calls served, then refused
    reply = roundtrip(envelope(sf.quota_lookup.entry.name, [10, 11, 12, 13, 14], pace=0.0))
    assert reply.results == [20, 22, 24]
    assert reply.throttled is not None and reply.throttled.at == 3
    assert reply.throttled.ran == 3 and reply.throttled.retry_after is not None


def test_a_whole_chunk_throttle_is_resent_from_its_start() -> None:
    from tests.quota import DOWNSTREAM

    DOWNSTREAM.reset(rate=0.001, burst=2.0)
    reply = roundtrip(envelope(sf.quota_lookup.entry.name, [10, 11, 12, 13]))
    assert reply.results == [] and reply.throttled is not None
    assert reply.throttled.at == 0 and reply.throttled.ran == 2  # two ran; their results lost


@pytest.mark.parametrize("pace", [-1.0, float("nan"), float("inf"), 3601.0])
def test_a_pace_out_of_bounds_is_refused(pace: float) -> None:
    call = envelope(sf.square.entry.name, [1, 2], pace=pace)
    with pytest.raises(serverless.RequestRejected, match="pace must be in"):
        roundtrip(call)


def test_a_fused_call_cannot_be_paced() -> None:
    names = [sf.square.entry.name, sf.odd_only.entry.name]
    call = envelope(",".join(names), [1, 2, 3], then=[p.Stage(fn=names[1])], pace=0.1)
    with pytest.raises(serverless.RequestRejected, match="item by item"):
        roundtrip(call)


@pytest.mark.parametrize("at", [-1, 2, 7])
def test_a_signed_throttle_outside_the_chunk_is_refused(at: int) -> None:
    call = envelope(sf.square.entry.name, [1, 2], pace=0.0)
    reply = p.Reply(v=p.VERSION, results=[], throttled=p.Throttle(at=at))
    body, headers = signed_reply(call, reply)
    with pytest.raises(serverless.ProtocolError, match="throttle outside the chunk"):
        p.read_reply(200, p.MSGPACK, body, headers, call, 0, URL, KEYS)


def test_a_throttle_stops_the_calls_other_chunks_on_that_worker_before_their_next_item() -> None:
    from tests.quota import DOWNSTREAM

    endpoint = Endpoint(ROUTE, p.Keyring(SECRET), clock=lambda: NOW)
    DOWNSTREAM.reset(rate=0.001, burst=1.0)
    first = envelope(sf.quota_lookup.entry.name, [1, 2], pace=0.0, group="call-1")
    reply = roundtrip(first, endpoint=endpoint)
    assert reply.throttled is not None and not reply.throttled.stopped
    import time

    other = envelope(sf.quota_lookup.entry.name, [3, 4], pace=0.0, group="call-1")
    throttles = endpoint.runner.throttles
    stop = throttles.stop(other, time.perf_counter() - 1.0, 1)  # it started before that
    assert stop is not None and stop.stopped and stop.at == 1 and stop.ran == 1
    assert throttles.stop(other, time.perf_counter(), 1) is None  # started after: runs
    stranger = envelope(sf.quota_lookup.entry.name, [3, 4], pace=0.0, group="call-2")
    assert throttles.stop(stranger, time.perf_counter() - 1.0, 1) is None
