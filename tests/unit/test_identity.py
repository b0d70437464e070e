"""In process: a registered name identifies one function, and a function the workers cannot
register is refused in the caller, before any request, with the cause and the fix."""

from __future__ import annotations

import textwrap
import time
from typing import Any

import pytest

import serverless
from serverless import _registry
from serverless import _wire as p
from serverless._wire import Response
from serverless._worker.endpoint import Endpoint
from tests.conftest import SECRET

# -- the registry's rules, in process ------------------------------------------------------


def _run(source: str, filename: str, namespace: dict[str, Any] | str) -> dict[str, Any]:
    """Execute `source` compiled from `filename` in `namespace` (or a fresh module of that
    name): a module run again, a notebook cell, a reload when it is the module's own dict."""
    if isinstance(namespace, str):
        namespace = {"__name__": namespace}
    exec(compile(textwrap.dedent(source), filename, "exec"), namespace)
    return namespace


def test_two_lambdas_in_one_module_are_refused_naming_both_and_the_way_out() -> None:
    source = """
        import serverless
        a = serverless.parallel(lambda xs: [x + 1 for x in xs])
        b = serverless.parallel(lambda xs: [x + 2 for x in xs])
    """
    with pytest.raises(serverless.ConfigurationError) as info:
        _run(source, "/app/lambdas.py", "identity_lambdas")
    message = str(info.value)
    assert "'identity_lambdas:<lambda>'" in message
    assert "/app/lambdas.py:3" in message and "/app/lambdas.py:4" in message
    assert 'serverless.parallel(name="' in message


def test_two_functions_that_share_a_name_are_refused() -> None:
    source = """
        import serverless

        def inc(xs):
            return [x + 1 for x in xs]

        add_one = serverless.parallel(inc)

        def inc(xs):
            return [x + 2 for x in xs]

        add_two = serverless.parallel(inc)
    """
    with pytest.raises(serverless.ConfigurationError, match="identity_shared:inc"):
        _run(source, "/app/shared.py", "identity_shared")


def test_lambdas_made_in_a_loop_differ_by_their_defaults() -> None:
    source = """
        import serverless
        steps = [serverless.parallel(lambda xs, k=k: [x + k for x in xs]) for k in (1, 2)]
    """
    with pytest.raises(serverless.ConfigurationError, match="two different functions"):
        _run(source, "/app/loop.py", "identity_loop")


REDEFINED = """
    import serverless

    @serverless.parallel
    def inc(xs):
        return [x + {n} for x in xs]

    class Steps:
        @serverless.parallel
        def scale(self, xs):
            return [x * {n} for x in xs]

    named = serverless.parallel(name="named")(lambda xs: [x - {n} for x in xs])
"""


def _current(namespace: dict[str, Any]) -> list[Any]:
    """The functions of `namespace`'s steps, as the registry holds them."""
    steps = [namespace["inc"], vars(namespace["Steps"])["scale"], namespace["named"]]
    entries = [_registry.lookup(step.entry.name) for step in steps]
    return [entry.func if entry is not None else None for entry in entries]


def _defined(namespace: dict[str, Any]) -> list[Any]:
    steps = [namespace["inc"], vars(namespace["Steps"])["scale"], namespace["named"]]
    return [step.__wrapped__ for step in steps]


def test_a_module_run_again_or_reloaded_replaces_its_functions() -> None:
    module = "identity_redefined"
    _run(REDEFINED.format(n=1), "/app/cell.py", module)
    # the same code run again in a new namespace: runpy, a module re-executed, a notebook
    # cell run again (which IPython may compile under a new file name)
    again = _run(REDEFINED.format(n=1), "<ipython-input-7>", module)
    assert _current(again) == _defined(again)
    # edited, then run in the same namespace: importlib.reload, a `def` cell run again; each
    # name (the class's method too) still holds the old step while the new one is decorated
    edited = _run(REDEFINED.format(n=5), "<ipython-input-8>", again)
    assert _current(edited) == _defined(edited)
    inc, scale, named = _current(edited)
    assert (inc([1]), scale(None, [1]), named([1])) == ([6], [5], [-4])


def test_the_same_function_decorated_twice_is_one_registration() -> None:
    def double(xs: list[int]) -> list[int]:
        return [x * 2 for x in xs]

    double.__qualname__ = "double"  # as if defined at module level
    first = serverless.parallel(double)
    second = serverless.parallel(workers=3)(double)
    assert first.entry is second.entry


def test_a_name_is_a_python_identifier() -> None:
    with pytest.raises(serverless.ConfigurationError, match="identifier"):
        serverless.parallel(name="a:b")(lambda xs: xs)


def test_a_404_for_an_unregistered_function_says_how_to_register_it() -> None:
    """For a URL target a missing function cannot be known in advance: the worker's 404
    reply must name the fix (old code: no hint for a module, a vaguer one for __main__)."""
    endpoint = Endpoint("/r", p.Keyring(SECRET))
    for name, fix in [
        ("__main__:inc", "runs only on the local pool"),
        ("pkg.geo:geolocate", "import pkg.geo in the worker app"),
    ]:
        rid = p.new_request_id()
        call = p.Call(v=p.VERSION, fn=name, id=rid, index=0, items=[1])
        body = p.encode(call)
        headers = p.signed_headers(p.Keyring(SECRET), "/r", name, rid, body, now=time.time())
        response = endpoint.accept("POST", {k.lower(): v for k, v in headers.items()}, body)
        assert isinstance(response, Response) and response.status == 404
        content_type = dict(response.headers).get("content-type")
        with pytest.raises(serverless.RequestRejected) as info:
            headers = dict(response.headers)
            keys = p.Keyring(SECRET)
            p.read_reply(404, content_type, response.body, headers, call, 0, "http://w/r", keys)
        assert f"function {name!r} is not registered" in str(info.value)
        assert fix in str(info.value)
