"""Pipeline step fusion: consecutive @parallel steps run in one request per chunk, on the real
local pool; the worker's per-stage figures keep the statistics per step."""

from __future__ import annotations

import time

import pytest

import serverless
from serverless import _registry
from serverless import _wire as p
from serverless._caller import fanout as _fanout
from serverless._wire import Response
from serverless._worker.endpoint import Endpoint
from tests import sample_functions as sf
from tests.conftest import SECRET


@serverless.sequential
def descending(numbers: list[int]) -> list[int]:
    return sorted(numbers, reverse=True)


def test_fused_steps_share_one_request_per_chunk_and_keep_per_step_stats() -> None:
    items = list(range(1000))
    run = serverless.Pipeline(sf.square, sf.odd_only, descending).execute(items)
    assert run.result == sorted((n * n for n in items if n % 2), reverse=True)
    square, odd, desc = run.steps
    assert square.chunks is odd.chunks  # the same requests carried both steps
    assert len(square.chunks) == 100 and all(len(c.stages) == 2 for c in square.chunks)
    assert (square.count, square.count_out) == (1000, 1000)
    assert (odd.count, odd.count_out) == (1000, 500)
    assert (desc.count, desc.count_out) == (500, 500)
    # each step its own share of the group's wall time, in proportion to its measured compute
    assert square.duration != odd.duration
    assert square.duration / odd.duration == pytest.approx(square.compute_s / odd.compute_s)
    assert (square.fused_with, odd.fused_with, desc.fused_with) == (None, 1, None)
    assert 0 < square.compute_s < square.chunks[0].compute_s * 100 + 1
    assert odd.compute_s > 0 and square.compute_s + odd.compute_s <= sum(
        c.compute_s for c in square.chunks
    )
    assert sf.odd_only.count == 1000 and sf.square.count == 1000  # the seed's step attributes
    assert 'Step "odd_only" took' in run.report()
    assert "(in the same requests as step 1)" in run.report().splitlines()[3]
    assert "same requests" not in run.report().splitlines()[2]


def test_fused_step_figures_stay_exact_beyond_the_kept_chunk_stats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # per-chunk statistics are kept up to a bound (10,000 chunks); the per-step figures must
    # come from the exact counters, not from the chunks kept
    monkeypatch.setattr(_fanout, "MAX_KEPT_STATS", 5)
    run = serverless.Pipeline(sf.square, sf.odd_only).execute(list(range(1000)))
    square, odd = run.steps
    assert len(square.chunks) == 5  # 100 chunks ran, 5 kept
    assert (square.count, square.count_out) == (1000, 1000)
    assert (odd.count, odd.count_out) == (1000, 500)
    assert square.compute_s > sum(c.stages[0].compute_s for c in square.chunks)


def test_fuse_false_and_sequential_barriers_send_separate_requests() -> None:
    items = list(range(100))
    unfused = serverless.Pipeline(sf.square, sf.odd_only, fuse=False).execute(items)
    assert unfused.steps[0].chunks is not unfused.steps[1].chunks
    assert all(c.stages == [] for c in unfused.steps[1].chunks)
    barrier = serverless.Pipeline(sf.square, descending, sf.odd_only).execute(items)
    assert barrier.steps[0].chunks is not barrier.steps[2].chunks
    assert barrier.result == [n * n for n in reversed(items) if n % 2]
    assert unfused.result == [n * n for n in items if n % 2]


def test_different_targets_are_not_fused() -> None:
    elsewhere = sf.odd_only.with_options(url="http://127.0.0.1:9/serverless")
    groups = serverless._pipeline._fusion_groups([sf.square, elsewhere, sf.odd_only])
    assert [len(g) for g in groups] == [1, 1, 1]
    groups = serverless._pipeline._fusion_groups([sf.square, sf.odd_only, descending, sf.square])
    assert [len(g) for g in groups] == [2, 1, 1]


def test_partial_binds_arguments_and_may_open_a_fused_group() -> None:
    assert sf.square.partial(10, scale=2)([1, 2]) == [22, 28]
    assert sf.square.partial(10).partial(scale=3)([1]) == [33]
    assert sf.square.partial(10)([1], scale=2) == [22]  # call-time keywords still apply
    run = serverless.Pipeline(sf.square.partial(1), sf.odd_only).execute(list(range(10)))
    assert run.steps[0].chunks is run.steps[1].chunks  # fused: the first stage carries args
    assert run.result == [n * n + 1 for n in range(10) if (n * n + 1) % 2]
    groups = serverless._pipeline._fusion_groups([sf.square, sf.odd_only.partial(1)])
    assert [len(g) for g in groups] == [1, 1]  # a later stage carries no arguments


def test_async_and_sync_stages_fuse_and_a_generator_input_streams() -> None:
    run = serverless.Pipeline(sf.async_double, sf.square).execute(n for n in range(100))
    assert run.result == [(2 * n) ** 2 for n in range(100)]
    assert run.steps[0].chunks is run.steps[1].chunks
    assert (run.steps[0].count, run.steps[1].count_out) == (100, 100)


def test_a_failing_later_stage_names_itself() -> None:
    with pytest.raises(serverless.RemoteError) as info:
        serverless.Pipeline(sf.odd_only, sf.explode_on_nine).run(list(range(20)))
    assert info.value.function == sf.explode_on_nine.entry.name
    assert info.value.type_name == "ValueError"
    assert info.value.index is None  # an index into the intermediate list would mislead


def test_empty_input_fused() -> None:
    run = serverless.Pipeline(sf.square, sf.odd_only).execute([])
    assert run.result == [] and [s.count for s in run.steps] == [0, 0]


# -- the worker side, sans I/O -------------------------------------------------------------


def _fused_request(names: list[str], then: list[p.Stage]) -> tuple[dict[str, str], bytes]:
    function = p.STAGE_SEPARATOR.join(names)
    rid = p.new_request_id()
    call = p.Call(v=p.VERSION, fn=function, id=rid, index=0, items=[1, 2, 3], then=then)
    body = p.encode(call)
    headers = p.signed_headers(p.Keyring(SECRET), "/r", function, rid, body, now=time.time())
    return {k.lower(): v for k, v in headers.items()}, body


def test_worker_runs_every_stage_and_reports_each() -> None:
    endpoint = Endpoint("/r", p.Keyring(SECRET))
    names = [sf.square.entry.name, sf.odd_only.entry.name]
    headers, body = _fused_request(names, [p.Stage(fn=names[1])])
    job = endpoint.accept("POST", headers, body)
    assert not isinstance(job, Response)
    reply = p.decode_reply(endpoint.run(job).body, p.MSGPACK)
    assert reply.results == [1, 9]
    assert reply.stages is not None and [s.count for s in reply.stages] == [3, 2]


@pytest.mark.parametrize(
    ("names", "then", "status"),
    [
        (["tests.sample_functions:square", "tests.sample_functions:nope"], ["nope"], 404),
        (["tests.sample_functions:square", "tests.sample_functions:odd_only"], [], 400),
        (
            ["tests.sample_functions:square", "tests.sample_functions:odd_only"],
            ["tests.sample_functions:square"],
            400,
        ),
    ],
)
def test_worker_refuses_unknown_or_unsigned_stages(
    names: list[str], then: list[str], status: int
) -> None:
    endpoint = Endpoint("/r", p.Keyring(SECRET))
    headers, body = _fused_request(names, [p.Stage(fn=n) for n in then])
    response = endpoint.accept("POST", headers, body)
    assert isinstance(response, Response) and response.status == status


def test_a_worker_without_fusion_cannot_run_only_the_first_stage() -> None:
    """An older worker looks the signed, joined name up as one function: it is never there."""
    joined = p.STAGE_SEPARATOR.join([sf.square.entry.name, sf.odd_only.entry.name])
    assert _registry.lookup(sf.square.entry.name) is not None
    assert _registry.lookup(joined) is None
