"""Values round-trip exactly or raise (issue 13, point 6), end to end on the embedded local
pool; the pure tests are in tests/unit/test_values.py, whose cases these reuse."""

from __future__ import annotations

from typing import Any, cast

import pytest

import serverless
from serverless._function import ParallelFunction
from tests import value_functions as vf
from tests.unit.test_values import KINDS

# -- end to end, on the embedded local pool ----------------------------------------------------


@pytest.mark.parametrize(("kind", "value", "typed"), KINDS[:5], ids=[k[0] for k in KINDS[:5]])
def test_local_pool_untyped_raises_before_sending(
    kind: str, value: Any, typed: ParallelFunction[Any, Any]
) -> None:
    with pytest.raises(serverless.SerializationError, match="Annotate the items precisely"):
        vf.echo([1, value])


def test_local_pool_every_kind_arrives_exactly() -> None:
    for _, value, typed in KINDS:
        [back] = typed([value])
        assert back == value and type(back) is type(value)


def test_local_pool_results_arguments_and_streams() -> None:
    with pytest.raises(serverless.SerializationError, match="result 1 of"):
        vf.returns(["int", "tuple"])
    with pytest.raises(serverless.SerializationError, match="result 0 of"):
        vf.wrong_result([1])
    with pytest.raises(serverless.SerializationError, match="argument `when`"):
        vf.typed_args([1], (1, 2), when=cast(Any, "soon"), tags=frozenset())
    with pytest.raises(serverless.SerializationError, match="item 3 of"):
        list(vf.echo.stream(iter([1, 2, 3, (4,)])))
    assert list(vf.tuples.stream(iter([(1, 2)] * 5))) == [(1, 2)] * 5
    run = serverless.Pipeline(vf.tuples, vf.tuples).execute([(1, 2)])
    assert run.result == [(1, 2)] and type(run.result[0]) is tuple
