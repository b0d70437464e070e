"""The contract suite: every calling form times every binding, with one expected answer.

Run by tests/unit/test_contract.py on the in-process transport and by
tests/integration/test_contract_pool.py on the embedded local pool (and, for functions in
`__main__`, by a script the integration test runs as a user would: tests/scripts/contract_main.py).
The functions live in tests/contract_functions.py, a module the workers import.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import serverless
from tests import contract_functions as cf

ITEMS = list(range(23))


@dataclass(frozen=True)
class Binding:
    """A step as some binding yields it, the receiver to pass explicitly (if any), and what
    it computes from an item and the extra argument n."""

    step: Callable[[], Any]
    receiver: Any
    expected: Callable[[int, int], int]
    in_pipelines: bool = True  # an explicit receiver has no place in a Pipeline


BINDINGS: dict[str, Binding] = {
    "module function": Binding(lambda: cf.add, None, lambda x, n: x + n),
    "function in __main__": Binding(lambda: cf.main_add, None, lambda x, n: x + n),
    "staticmethod": Binding(lambda: cf.Calc.static, None, lambda x, n: x + n),
    "classmethod": Binding(lambda: cf.Calc.klass, None, lambda x, n: x + n + cf.Calc.offset),
    "instance method": Binding(lambda: cf.Calc().method, None, lambda x, n: x + n + cf.Calc.offset),
    "explicit receiver": Binding(
        lambda: cf.Calc.method, cf.Calc(), lambda x, n: x + n + cf.Calc.offset, False
    ),
    # the instance's state travels: a worker that built a fresh Calc() would add 0, not 7
    "instance with state": Binding(
        lambda: cf.Calc(7).method, None, lambda x, n: x + n + cf.Calc.offset + 7
    ),
    "explicit receiver with state": Binding(
        lambda: cf.Calc.method, cf.Calc(7), lambda x, n: x + n + cf.Calc.offset + 7, False
    ),
}


def _args(binding: Binding, *args: Any) -> tuple[Any, ...]:
    return args if binding.receiver is None else (binding.receiver, *args)


def _run(coro: Coroutine[Any, Any, list[Any]]) -> list[Any]:
    """asyncio.run, in a thread of its own where this thread runs a loop (a Jupyter kernel)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coro).result()


async def _astream(step: Any, *args: Any) -> list[Any]:
    return [result async for result in step.astream(*args)]


Form = Callable[[Binding], list[Any]]

# Each form returns the results of calling the step on ITEMS with n = 5 (the default is 1)
FORMS: dict[str, tuple[Form, Callable[[int, Callable[[int, int], int]], int]]] = {
    "f(items)": (lambda b: b.step()(*_args(b, ITEMS, 5)), lambda x, e: e(x, 5)),
    "f(items) default": (lambda b: b.step()(*_args(b, ITEMS)), lambda x, e: e(x, 1)),
    "with_stats": (lambda b: b.step().with_stats(*_args(b, ITEMS, 5))[0], lambda x, e: e(x, 5)),
    "submit": (lambda b: b.step().submit(*_args(b, ITEMS, 5)).result(30), lambda x, e: e(x, 5)),
    "aio": (lambda b: _run(b.step().aio(*_args(b, ITEMS, 5))), lambda x, e: e(x, 5)),
    "stream": (lambda b: list(b.step().stream(*_args(b, ITEMS, 5))), lambda x, e: e(x, 5)),
    "stream of a generator": (
        lambda b: list(b.step().stream(*_args(b, iter(ITEMS), 5))),
        lambda x, e: e(x, 5),
    ),
    "astream": (
        lambda b: _run(_astream(b.step(), *_args(b, ITEMS, 5))),
        lambda x, e: e(x, 5),
    ),
    "with_options": (
        lambda b: b.step().with_options(workers=3, chunk_size=4)(*_args(b, ITEMS, 5)),
        lambda x, e: e(x, 5),
    ),
    "with_options().stream": (
        lambda b: list(b.step().with_options(workers=2).stream(*_args(b, ITEMS, 5))),
        lambda x, e: e(x, 5),
    ),
    "partial": (lambda b: b.step().partial(7)(*_args(b, ITEMS)), lambda x, e: e(x, 7)),
    "partial().submit": (
        lambda b: b.step().partial(n=7).submit(*_args(b, ITEMS)).result(30),
        lambda x, e: e(x, 7),
    ),
    "pipeline step": (
        lambda b: serverless.Pipeline(b.step(), cf.double, fuse=False).run(ITEMS),
        lambda x, e: 2 * e(x, 1),
    ),
    "pipeline fused first": (
        lambda b: serverless.Pipeline(b.step(), cf.double).run(ITEMS),
        lambda x, e: 2 * e(x, 1),
    ),
    "pipeline fused later": (
        lambda b: serverless.Pipeline(cf.double, b.step()).run(ITEMS),
        lambda x, e: e(2 * x, 1),
    ),
    "pipeline after sequential": (
        lambda b: serverless.Pipeline(cf.identity, b.step()).run(ITEMS),
        lambda x, e: e(x, 1),
    ),
}


def check(binding_name: str, form_name: str) -> None:
    """One cell of the matrix: the form on the binding gives the expected results, in order."""
    binding = BINDINGS[binding_name]
    form, expected = FORMS[form_name]
    if form_name.startswith("pipeline") and not binding.in_pipelines:
        return
    results = form(binding)
    assert results == [expected(x, binding.expected) for x in ITEMS], (binding_name, form_name)
