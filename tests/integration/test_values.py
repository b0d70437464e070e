"""Values round-trip exactly or raise (issue 13, point 6; issue 23, point 1), end to end: on the
embedded local pool and on a real `serverless worker`, so that what works locally works when
deployed. The pure tests are in tests/unit/test_values.py, whose cases these reuse."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest

import serverless
from serverless._function import ParallelFunction
from tests import value_functions as vf
from tests.conftest import SECRET, free_port, server
from tests.unit.test_values import BUILTINS, CLASSES, KINDS, same

pytestmark = pytest.mark.timeout(120)

VALUES = [value for _, value in BUILTINS]
WORKER = ["serverless._cli", "worker", "tests.value_functions", "--log-level", "warning"]


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    """`serverless worker` serving tests.value_functions (uvicorn, one process)."""
    port = free_port()
    with server([*WORKER, "--port", str(port)], port):
        yield f"http://127.0.0.1:{port}/serverless"


def on(step: ParallelFunction[Any, Any], url: str | None) -> ParallelFunction[Any, Any]:
    """The step on the local pool (url None) or on the worker at `url`."""
    return step.with_options(url=url) if url is not None else step


def builtin_values_arrive_exactly(url: str | None) -> None:
    """Every built-in value through untyped identity functions: as items, as extra arguments
    (positional and keyword), and back as results."""
    assert same(on(vf.echo, url)(VALUES), VALUES)
    assert same(on(vf.echo_bare, url)(VALUES), VALUES)  # no annotations at all
    [args, kwargs] = on(vf.echo_args, url)([0], *VALUES, **{k: v for k, v in BUILTINS})
    assert same(args, VALUES) and same(kwargs, dict(BUILTINS))
    seen = on(vf.types_of, url)(VALUES)
    assert [name for name, _ in seen] == [type(v).__name__ for v in VALUES]  # what it got
    nested = [{"a": [(1, {2, 3})]}, {(1, 2): frozenset({frozenset({4})})}, {(5, 6)}]
    assert same(on(vf.echo, url)(nested), nested)


def classes_still_raise(url: str | None) -> None:
    for _, value, typed in CLASSES:
        with pytest.raises(serverless.SerializationError, match="Annotate the items precisely"):
            on(vf.echo, url)([1, value])
        [back] = on(typed, url)([value])  # exact through the annotation
        assert back == value and type(back) is type(value)
    with pytest.raises(serverless.SerializationError, match=r"result 1 of .*is a Point"):
        on(vf.returns, url)(["int", "point"])
    with pytest.raises(
        serverless.SerializationError, match=r"argument `args\[0\]`.*`\*args: Point`"
    ):
        on(vf.echo_args, url)([1], vf.Point(1, 2))


def the_seeds_pipeline_runs(url: str | None) -> None:
    zipcodes = [10001, 10005, 20002, 30003]
    run = serverless.Pipeline(on(vf.geolocate, url), on(vf.cleanup, url)).execute(zipcodes)
    expected = [vf.get_address(z) for z in zipcodes]  # type: ignore[no-untyped-call]
    assert same(run.result, [row for row in expected if row[2]])


# -- the embedded local pool -------------------------------------------------------------------


def test_local_pool_builtin_values_arrive_exactly() -> None:
    builtin_values_arrive_exactly(None)


def test_local_pool_classes_raise_before_sending_unless_annotated() -> None:
    classes_still_raise(None)


def test_local_pool_every_kind_arrives_exactly_typed() -> None:
    for _, value, typed in KINDS:
        [back] = typed([value])
        assert back == value and type(back) is type(value)


def test_local_pool_the_seeds_pipeline_with_tuple_results() -> None:
    the_seeds_pipeline_runs(None)


def test_local_pool_results_arguments_and_streams() -> None:
    with pytest.raises(serverless.SerializationError, match="result 0 of"):
        vf.wrong_result([1])
    with pytest.raises(serverless.SerializationError, match="argument `when`"):
        vf.typed_args([1], (1, 2), when=cast(Any, "soon"), tags=frozenset())
    with pytest.raises(serverless.SerializationError, match="item 3 of"):
        list(vf.echo.stream(iter([1, 2, 3, vf.Point(4, 5)])))
    assert same(list(vf.echo.stream(iter([(1, 2)] * 5))), [(1, 2)] * 5)  # a generator's items
    assert list(vf.tuples.stream(iter([(1, 2)] * 5))) == [(1, 2)] * 5
    run = serverless.Pipeline(vf.tuples, vf.tuples).execute([(1, 2)])
    assert run.result == [(1, 2)] and type(run.result[0]) is tuple


# -- a real `serverless worker` ----------------------------------------------------------------


@pytest.fixture
def remote(worker: str, reset_settings: None) -> str:
    serverless.init(secret=SECRET)
    return worker


def test_worker_builtin_values_arrive_exactly(remote: str) -> None:
    builtin_values_arrive_exactly(remote)


def test_worker_classes_raise_unless_annotated(remote: str) -> None:
    classes_still_raise(remote)


def test_worker_the_seeds_pipeline_with_tuple_results(remote: str) -> None:
    the_seeds_pipeline_runs(remote)
