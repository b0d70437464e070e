"""Real scripts: a registered name identifies one function, and a function the workers cannot
register is refused in the caller, before any request, with the cause and the fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import test_env

# -- scripts, run as a user would ----------------------------------------------------------

TIMEOUT = 90


def python(
    tmp_path: Path, args: list[str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        env=test_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def script(tmp_path: Path, source: str, name: str = "script.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_a_script_with_two_lambdas_fails_at_decoration(tmp_path: Path) -> None:
    path = script(
        tmp_path,
        """
        import serverless
        a = serverless.parallel(lambda xs: [x + 1 for x in xs])
        b = serverless.parallel(lambda xs: [x + 2 for x in xs])
        print(a([0, 0, 0]))
        """,
    )
    done = python(tmp_path, [path])
    assert done.returncode != 0 and done.stdout == ""
    assert "ConfigurationError: two different functions" in done.stderr
    assert f"{path}:3" in done.stderr and f"{path}:4" in done.stderr


def test_named_lambdas_run_apart_on_the_workers(tmp_path: Path) -> None:
    path = script(
        tmp_path,
        """
        import serverless
        serverless.init(local_processes=1)
        a = serverless.parallel(name="add_one")(lambda xs: [x + 1 for x in xs])
        b = serverless.parallel(name="add_two")(lambda xs: [x + 2 for x in xs])
        print(a([0, 0, 0]), b([0, 0, 0]), a.stats.name)
        """,
    )
    done = python(tmp_path, [path])
    assert done.stdout.split("\n")[0] == "[1, 1, 1] [2, 2, 2] add_one", done.stderr


# Prints what a call of a __main__ function returned or raised, and whether a pool started.
INTERACTIVE = """import serverless
from serverless._pool import pool as _pool

@serverless.parallel
def inc(xs):
    return [x + 1 for x in xs]

try:
    print("RESULT", inc([1, 2]))
except serverless.ConfigurationError as exc:
    print("REFUSED", exc)

print("POOL", _pool._pool)

"""
NO_CLOUDPICKLE = "import sys; sys.modules['cloudpickle'] = None  # as if not installed\n"


def _interactive(tmp_path: Path, mode: str, source: str) -> subprocess.CompletedProcess[str]:
    if mode == "-c":
        return python(tmp_path, ["-c", source])
    if mode == "stdin":
        return python(tmp_path, ["-"], stdin=source)
    if mode == "repl":  # python -i reads its commands from the pipe as it would from a tty
        return python(tmp_path, ["-i"], stdin=source)
    runner = script(  # IPython's user namespace is a __main__ without __file__
        tmp_path,
        f"""
        import builtins, sys, types
        builtins.__IPYTHON__ = True
        sys.modules["__main__"] = main = types.ModuleType("__main__")
        exec(compile({source!r}, "/tmp/ipykernel_1/2.py", "exec"), vars(main))
        """,
        "notebook.py",
    )
    return python(tmp_path, [runner])


MODES = [
    ("-c", "in a `python -c` command"),
    ("stdin", "in a script read from standard input"),
    ("repl", "in an interactive session"),
    ("notebook", "in a notebook or IPython session"),
]


@pytest.mark.parametrize(("mode", "cause"), MODES)
def test_an_interactive_main_runs_on_the_local_pool_by_value(
    tmp_path: Path, mode: str, cause: str
) -> None:
    """Before, each was refused: the workers found a function by importing its module."""
    done = _interactive(tmp_path, mode, INTERACTIVE)
    assert "RESULT [2, 3]" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize(("mode", "cause"), MODES)
def test_without_cloudpickle_a_main_function_is_refused_before_a_pool_starts(
    tmp_path: Path, mode: str, cause: str
) -> None:
    done = _interactive(tmp_path, mode, NO_CLOUDPICKLE + INTERACTIVE)
    out = done.stdout
    assert f"REFUSED inc is defined {cause}" in out, out + done.stderr
    assert "pip install 'simple-serverless[local]'" in out
    assert "put the function in a module" in out
    assert "POOL None" in out  # no worker started, so no request sent


def test_functions_below_the_first_call_and_under_the_main_guard_run(tmp_path: Path) -> None:
    """Before, the workers imported the script and stopped at its first call: a function
    defined below it, or under the main guard, was refused."""
    path = script(
        tmp_path,
        """
        import serverless
        serverless.init(local_processes=1)

        @serverless.parallel
        def above(xs):
            return [x + 1 for x in xs]

        print(above([1, 2]))

        @serverless.parallel
        def below(xs):
            return [x * 2 for x in xs]

        print(below([1, 2]))

        if __name__ == "__main__":
            @serverless.parallel
            def inside(xs):
                return [above([x])[0] * 10 for x in xs]

            print(inside([1]))
        """,
    )
    done = python(tmp_path, [path])
    assert done.stdout.splitlines() == ["[2, 3]", "[2, 4]", "[20]"], done.stderr


STEPS = """
import serverless

@serverless.parallel
def inc(xs):
    return [x + {n} for x in xs]

class Steps:
    @serverless.parallel
    def scale(self, xs):
        return [x * {n} for x in xs]
"""


def test_a_reloaded_module_keeps_working_with_its_new_code(tmp_path: Path) -> None:
    (tmp_path / "steps.py").write_text(STEPS.format(n=1))
    path = script(
        tmp_path,
        f"""
        import importlib, pathlib, runpy
        import serverless
        import steps
        serverless.init(local_processes=1)

        print(steps.inc([1]), steps.Steps().scale([3]))
        importlib.reload(steps)
        print(steps.inc([1]), steps.Steps().scale([3]))
        pathlib.Path(steps.__file__).write_text({STEPS.format(n=2)!r})
        importlib.reload(steps)  # the workers imported the old code: they are replaced
        print(steps.inc([1]), steps.Steps().scale([3]))
        runpy.run_path(steps.__file__, run_name="steps")  # a module executed again
        print(steps.inc([1]))
        """,
    )
    done = python(tmp_path, [path])
    assert done.stdout.splitlines() == [
        "[2] [3]",
        "[2] [3]",
        "[3] [6]",
        "[3]",
    ], done.stderr
