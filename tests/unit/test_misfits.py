"""Issue 22.12: a signed request whose fields do not fit its function (a binding the
registered function is never called with, arguments that cannot bind to its parameters) is
refused, signed, before anything of the user's runs: the function's own counter stays at 0.
Before, the worker ran the function with what came (a method called unbound with an argument
took the items as `self` and ran), or built the instance and failed inside the call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serverless import _wire as p
from serverless._worker.endpoint import Endpoint, Job
from tests import sample_functions as sf
from tests.conftest import SECRET

ROUTE = "/serverless"
NOW = 1_800_000_000.0
KEYS = p.Keyring(SECRET)

MISFITS: dict[str, tuple[Any, dict[str, Any]]] = {
    # a method called unbound, its argument taken as the items: it ran on old code
    "method unbound": (sf.Counted.scaled, {"args": [5]}),
    "staticmethod bound": (sf.Counted.negated, {"bind": "instance"}),
    "bound, too many arguments": (sf.Counted.scaled, {"bind": "class", "args": [1, 2]}),
    "missing argument": (sf.counted_add, {}),
    "too many arguments": (sf.counted_add, {"args": [1, 2]}),
    "unknown keyword": (sf.counted_add, {"args": [1], "kwargs": {"nope": 1}}),
    "keyword-only as positional": (sf.Counted.negated, {"args": [1]}),
    "argument twice": (sf.counted_add, {"args": [1], "kwargs": {"amount": 2}}),
}


def _answer(fn: str, **fields: Any) -> tuple[p.Call, p.Response]:
    call = p.Call(v=p.VERSION, fn=fn, id=p.new_request_id(), index=0, items=[1, 2], **fields)
    body, headers = p.build_request(KEYS, ROUTE, call, NOW)
    endpoint = Endpoint(ROUTE, KEYS, clock=lambda: NOW)
    job = endpoint.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
    answer = endpoint.run(job) if isinstance(job, Job) else job
    signature = answer.headers[p.H_REPLY_SIGNATURE]
    assert KEYS.verify(p.reply_signing_message(answer.status, call.id, answer.body), signature)
    return call, answer


@pytest.mark.parametrize("case", list(MISFITS))
def test_a_request_that_does_not_fit_is_refused_before_it_runs(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls"
    monkeypatch.setenv(sf.CALLS_FILE_ENV, str(calls))
    f, fields = MISFITS[case]
    _, answer = _answer(f.entry.name, **fields)
    assert answer.status == 400, (answer.status, answer.body)
    assert b"rejected" in answer.body and f.entry.name.encode() in answer.body
    assert not calls.exists()  # nothing ran


@pytest.mark.parametrize(
    ("f", "fields", "results"),
    [
        (sf.Counted.scaled, {"bind": "instance", "args": [3]}, [3, 6]),
        (sf.Counted.negated, {"kwargs": {"sign": 2}}, [2, 4]),
        (sf.counted_add, {"args": [1], "kwargs": {"times": 2}}, [4, 6]),
        (sf.counted_add, {"kwargs": {"amount": 1}}, [2, 3]),
    ],
)
def test_requests_that_fit_run(f: Any, fields: dict[str, Any], results: list[int]) -> None:
    call, answer = _answer(f.entry.name, **fields)
    reply = p.read_reply(answer.status, p.MSGPACK, answer.body, answer.headers, call, 0, "", KEYS)
    assert reply.results == results
