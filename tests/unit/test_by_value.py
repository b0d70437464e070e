"""Functions of `__main__` by value, in process: the pickle goes through a shelf in a temporary
directory to an Endpoint that loads it (the local pool's real channel is tested in
tests/integration/test_by_value.py); remote targets refuse them before any request; steps
that a pickled function references travel with it."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import serverless
from serverless import _targets
from serverless._caller.inprocess import InProcess
from serverless._caller.transport import Target
from serverless._pool.byvalue import Shelf
from serverless._wire import Keyring
from serverless._worker.context import Origin, current_origin
from serverless._worker.endpoint import Endpoint
from tests import contract_functions as cf
from tests.conftest import SECRET

ROUTE = "/serverless"


@pytest.fixture
def pool_like(tmp_path: Path) -> Iterator[Shelf]:
    """A target with a shelf, as the local pool's, and an endpoint that loads from it."""
    keyring = Keyring(SECRET)
    shelf = Shelf(tmp_path)
    transport = InProcess(Endpoint(ROUTE, keyring, by_value=Shelf(tmp_path)))
    target = Target(
        ("inprocess://w/serverless",), ROUTE, keyring, "local", transport=transport, shelf=shelf
    )
    with _targets.override(target):
        yield shelf
    transport.close()


def _main(source: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `source` as code of `__main__` (as a notebook cell does) in `namespace`."""
    namespace = namespace if namespace is not None else {"__name__": "__main__"}
    exec(source, namespace)
    return namespace


CELL = """
import serverless
K = {k}

@serverless.parallel
def scaled_{tag}(xs):
    return [x * K + {plus} for x in xs]
"""


def test_a_function_of_main_goes_by_value_and_a_redefined_cell_takes_effect(
    pool_like: Shelf,
) -> None:
    cell = _main(CELL.format(k=2, plus=0, tag="a"))
    assert cell["scaled_a"]([1, 2]) == [2, 4]
    assert len(pool_like._written) == 1  # sent by value: one pickle on the shelf
    cell["K"] = 3  # a changed global: the next call pickles it anew
    assert cell["scaled_a"]([1, 2]) == [3, 6]
    _main(CELL.format(k=3, plus=100, tag="a"), cell)  # the cell run again, changed
    assert cell["scaled_a"]([1, 2]) == [103, 106]
    assert cell["scaled_a"]([1, 2]) == [103, 106]
    assert len(pool_like._written) == 3  # the same code and globals: the same pickle


def test_an_unchanged_function_is_written_once(pool_like: Shelf) -> None:
    cell = _main(CELL.format(k=1, plus=1, tag="b"))
    for _ in range(5):
        assert cell["scaled_b"]([1]) == [2]
    assert len(pool_like._written) == 1


NESTED = """
import serverless

class Tools:
    base = 10

    @serverless.parallel
    @classmethod
    def lift(cls, xs):
        return [x + cls.base for x in xs]

@serverless.parallel
def outer(xs):
    return [Tools.lift([x])[0] * 2 for x in xs]
"""


def test_a_step_a_function_of_main_calls_travels_with_it() -> None:
    """The class, its steps and the function that calls them, in one pickle; a step of
    `__main__` is rebuilt detached (registered nowhere), knowing its class."""
    cell = _main(NESTED)
    sent = cell["outer"]._sent()
    name, func, declared, owner = pickle.loads(cloudpickle.dumps(sent))
    assert (name, declared, owner) == (None, "plain", None)
    tools = func.__globals__["Tools"]  # in this process, cloudpickle gives its class back
    lift = tools.__dict__["lift"]  # rebuilt, set on the class again
    assert lift._owner is tools and lift.entry.cls is tools
    assert lift.entry is not serverless._registry.lookup("__main__:Tools.lift")


def test_a_module_step_travels_by_name_with_its_options_and_binding() -> None:
    narrow = cf.double.with_options(workers=3)
    copy = pickle.loads(cloudpickle.dumps(narrow))
    assert copy.entry is cf.double.entry and copy.options == narrow.options
    bound = pickle.loads(cloudpickle.dumps(cf.Calc(7).method))
    assert bound.entry is cf.Calc.method.entry and bound._receiver.extra == 7
    sequential = pickle.loads(cloudpickle.dumps(cf.identity))
    assert sequential([1, 2]) == [1, 2]


@pytest.fixture
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_targets, "_override", None)
    monkeypatch.setenv("SERVERLESS_SECRET", SECRET)


@pytest.mark.usefixtures("no_override")
def test_a_url_target_refuses_a_function_of_main() -> None:
    with pytest.raises(serverless.ConfigurationError, match="never code sent to it"):
        cf.main_add.with_options(url="http://127.0.0.1:9/serverless")([1])


@pytest.mark.usefixtures("no_override")
def test_an_app_calling_back_to_itself_refuses_a_function_of_main() -> None:
    """Only a local pool's worker (an endpoint with a shelf) takes code by value."""
    for endpoint in (None, Endpoint(ROUTE, Keyring(SECRET))):
        origin = Origin("http://127.0.0.1:9/serverless", ROUTE, Keyring(SECRET), endpoint=endpoint)
        token = current_origin.set(origin)
        try:
            with pytest.raises(serverless.ConfigurationError, match="the app serving this"):
                cf.main_add([1])
            assert cf.add.with_options(url=None) is not None  # module functions still go
        finally:
            current_origin.reset(token)


def test_an_endpoint_without_a_shelf_refuses_a_digest_unread(tmp_path: Path) -> None:
    from serverless import _wire as p

    marker = tmp_path / "loaded"
    data = pickle.dumps(_Marker(str(marker)))
    digest = Shelf(tmp_path).put(data)
    endpoint = Endpoint(ROUTE, Keyring(SECRET))
    fn = cf.add.entry.name
    rid = p.new_request_id()
    body = p.encode(p.Call(v=p.VERSION, fn=fn, id=rid, index=0, items=[1], code=digest))
    headers = p.signed_headers(Keyring(SECRET), ROUTE, fn, rid, body, now=_now())
    answer = endpoint.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
    assert isinstance(answer, p.Response) and answer.status == 400
    assert b"never code sent by value" in answer.body
    assert not marker.exists()


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (self.path, "w"))


def _now() -> float:
    import time

    return time.time()
