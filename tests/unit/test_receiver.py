"""Issue 23, item 4: an instance method's receiver travels as its attributes, under the values
rule, rebuilt on the worker without __init__. `Scaler(10).scale([1, 2, 3])` returned
[2, 4, 6]-like answers from a fresh instance (or a TypeError where __init__ needs an
argument); a receiver that cannot travel is refused before any request, and a signed request
that would set a dunder (or any attribute the class cannot hold) is refused before anything
of the user's runs."""

from __future__ import annotations

import asyncio
import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

import serverless
from serverless import _wire as p
from serverless._caller.inprocess import InProcess
from serverless._worker.endpoint import Endpoint, Job
from tests import contract_functions as cf
from tests import receiver_functions as rf
from tests.conftest import SECRET

ROUTE = "/serverless"
NOW = 1_800_000_000.0
KEYS = p.Keyring(SECRET)


def test_a_receiver_with_a_required_init_argument_keeps_its_state(tmp_path: Path) -> None:
    log = tmp_path / "log"
    scaler = rf.Scaler(10, str(log))
    assert scaler.scale([1, 2, 3]) == [10, 20, 30]
    assert rf.Scaler.scale(rf.Scaler(4), [1, 2]) == [4, 8]  # the explicit receiver too
    assert scaler.signed([1]) == [-10]  # a private (mangled) attribute travels
    assert asyncio.run(scaler.ascale.aio([2])) == [20]
    assert scaler.scale.with_options(chunk_size=1)(list(range(5))) == [0, 10, 20, 30, 40]
    # __init__ ran once, here, never on the worker; the method there, once per chunk
    lines = log.read_text().splitlines()
    assert lines[0] == "init" and lines.count("init") == 1 and lines.count("scale") >= 6


def test_slots_frozen_dataclasses_and_annotated_fields() -> None:
    assert rf.Slotted(2).scale([1, 2]) == [[6, False], [12, False]]  # an unset slot stays unset
    priced = rf.Priced(Decimal("1.10"), datetime.date(2024, 5, 1), frozenset({"a", "b"}))
    assert priced.price([2, 3]) == ["2.20 EUR 2024", "3.30 EUR 2024"]
    assert rf.FrozenSlots(3, "n").scale([1, 2]) == ["n3", "n6"]


def test_getstate_and_setstate_are_honoured() -> None:
    assert rf.Reconnecting("r").greet([1, 2]) == ["r1", "r2"]


def test_a_pipeline_step_carries_its_receiver() -> None:
    fused = serverless.Pipeline(cf.double, rf.Scaler(3).scale, rf.Scaler(-1).scale)
    assert fused.run([1, 2]) == [-6, -12]
    assert serverless.Pipeline(rf.Scaler(5).scale, cf.double, fuse=False).run([1]) == [10]


@pytest.mark.parametrize(
    ("receiver", "method", "says"),
    [
        (lambda log: rf.Holding(log), "run", ["`Holding.conn`", "is a lock", "class attribute"]),
        (lambda log: rf.Typed("x"), "scale", ["`Typed.factor`", "Expected `int`, got `str`"]),
        (lambda log: rf.SubScaler(1), "scale", ["SubScaler", "subclass of Scaler", "staticmethod"]),
    ],
    ids=["unencodable", "annotation mismatch", "subclass"],
)
def test_a_receiver_that_cannot_travel_raises_before_any_request(
    in_process: InProcess[Endpoint], tmp_path: Path, receiver: Any, method: str, says: list[str]
) -> None:
    log = tmp_path / "log"
    step = getattr(receiver(str(log)), method)
    for call in (step, step.stream, step.submit):
        with pytest.raises(serverless.SerializationError) as info:
            call(list(range(10)))
        for part in says:
            assert part in str(info.value), str(info.value)
    assert in_process.requests == 0 and not log.exists()


def test_the_state_is_checked_and_encoded_once_per_call(
    in_process: InProcess[Endpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes = []
    real = p.encode_state

    def counted(receiver: Any, function: str) -> dict[str, msgspec.Raw]:
        encodes.append(function)
        return real(receiver, function)

    monkeypatch.setattr(p, "encode_state", counted)
    step = rf.Scaler(2).scale.with_options(chunk_size=1)
    assert step(list(range(20))) == [2 * n for n in range(20)]
    assert in_process.requests == 20 and len(encodes) == 1


# -- signed requests that would set what no instance may be given ------------------------------


def _answer(fn: str, **fields: Any) -> p.Response:
    call = p.Call(v=p.VERSION, fn=fn, id=p.new_request_id(), index=0, items=[1, 2], **fields)
    body, headers = p.build_request(KEYS, ROUTE, call, NOW)
    endpoint = Endpoint(ROUTE, KEYS, clock=lambda: NOW)
    job = endpoint.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
    return endpoint.run(job) if isinstance(job, Job) else job


SCALE = rf.Scaler.scale.entry.name
HOSTILE: dict[str, tuple[str, dict[str, Any]]] = {
    "__class__": (SCALE, {"bind": "state", "state": {"__class__": "builtins:object"}}),
    "__dict__": (SCALE, {"bind": "state", "state": {"__dict__": {"factor": 2}}}),
    "__init__": (SCALE, {"bind": "state", "state": {"__init__": 1}}),
    "not an identifier": (SCALE, {"bind": "state", "state": {"a b": 1}}),
    "state without its binding": (SCALE, {"bind": "instance", "state": {"factor": 2}}),
    "state on a staticmethod": (cf.Calc.static.entry.name, {"bind": "state", "state": {}}),
    "state on a function": (cf.add.entry.name, {"bind": "state", "state": {}}),
    "no such slot": (rf.Slotted.scale.entry.name, {"bind": "state", "state": {"other": 1}}),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_signed_request_cannot_set_what_no_instance_may_hold(case: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    fn, fields = HOSTILE[case]
    if fields.get("state") and fn == SCALE:  # it would log, had it run
        fields["state"] = {**fields["state"], "factor": 1, "log": str(log)}
    answer = _answer(fn, **fields)
    assert answer.status == 400, (answer.status, answer.body)
    assert b"rejected" in answer.body
    assert not log.exists()


def test_a_state_that_does_not_match_the_annotations_is_an_input_error() -> None:
    state = {"rate": "not a number", "since": "2024-05-01", "tags": ["a"]}
    answer = _answer(rf.Priced.price.entry.name, bind="state", state=state)
    assert answer.status == 422 and b"Priced.rate" in answer.body


def test_a_signed_state_rebuilds_the_instance() -> None:
    state = {"factor": 3, "log": "", "_Scaler__sign": 2}
    answer = _answer(rf.Scaler.signed.entry.name, bind="state", state=state)
    reply = p.decode_reply(answer.body, p.MSGPACK)
    assert answer.status == 200 and reply.results == [6, 12]


def test_a_json_request_carries_a_state_too() -> None:
    priced = {"rate": "1.25", "since": "2024-05-01", "tags": ["a"]}
    call = p.Call(
        v=p.VERSION,
        fn=rf.Priced.price.entry.name,
        id=p.new_request_id(),
        index=0,
        items=[2],
        bind="state",
        state=priced,
    )
    body = p.encode(call, p.JSON)
    headers = p.signed_headers(KEYS, ROUTE, call.fn, call.id, body, p.JSON, now=NOW)
    endpoint = Endpoint(ROUTE, KEYS, clock=lambda: NOW)
    job = endpoint.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
    assert isinstance(job, Job)
    answer = endpoint.run(job)
    assert p.decode_reply(answer.body, p.JSON).results == ["2.50 EUR 2024"]
