"""Functions of `__main__` run on the local pool by value (issue 23, items 2, 3 and 8).

The contract suite (every calling form times every binding) runs for functions defined in a
real Jupyter kernel (a notebook executed by nbclient), in `python -c`, in a script read from
stdin, and in an unguarded script whose top level counts its own runs: it runs once, in the
caller, even when a worker is killed and replaced (before, every worker imported the script,
and its top-level work ran again in each). A remote worker is never sent code: the call fails
before any request. And the attacks on the channel: a pickle file replaced under a signed
digest, a Call naming a digest sent to a remote worker, links planted where the pickle goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import secrets
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import serverless
from serverless import _wire as p
from serverless._pool import byvalue
from serverless._pool import pool as _pool
from tests import contract_functions as cf
from tests.conftest import SECRET, TESTS, free_port, server, test_env
from tests.contract import FORMS
from tests.integration.test_pool_unix import sockets, unix_post

if TYPE_CHECKING:
    from jupyter_client.manager import KernelManager

pytestmark = pytest.mark.timeout(180)

CONTRACT_MAIN = TESTS / "scripts" / "contract_main.py"
CELLS = 6 * len(FORMS)  # the six __main__ bindings of contract_main.py times every form
TIMEOUT = 150


def _outcome(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert done.returncode == 0, done.stderr[-3000:]
    outcome: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return outcome


def _python(
    args: list[str], stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        cwd=TESTS.parent,
        env=test_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


# -- the contract suite, wherever __main__ comes from -----------------------------------------


@pytest.mark.parametrize("mode", ["-c", "stdin"])
def test_the_contract_suite_runs_for_functions_of_an_interactive_main(mode: str) -> None:
    """Before, every call was refused: a worker found a function by importing its module."""
    source = CONTRACT_MAIN.read_text()
    done = _python(["-c", source]) if mode == "-c" else _python(["-"], stdin=source)
    outcome = _outcome(done)
    assert outcome["failures"] == [] and outcome["cells"] == CELLS


UNGUARDED = """
with open(os.environ["RUNS_FILE"], "a") as runs:  # the script's own top-level work
    runs.write(f"{os.getpid()}\\n")
serverless.init(local_processes=2)
main()  # the contract suite, unguarded, at the top level

from serverless._pool import pool as _pool

before = list(_pool._pool.pids)
os.kill(before[0], signal.SIGKILL)
deadline = time.monotonic() + 60
while before[0] in _pool._pool.pids and time.monotonic() < deadline:
    time.sleep(0.05)  # the pool's thread replaces it
again = add.with_options(workers=2)(list(range(10)), 5)
after = _pool._pool.pids
print(json.dumps({"pid": os.getpid(), "before": before, "after": after, "again": again}))
"""


def test_an_unguarded_script_runs_its_top_level_once_even_when_a_worker_is_replaced(
    tmp_path: Path,
) -> None:
    """Before, each worker (and each replacement) imported the script, running its top level
    up to the first parallel call: this count was 3 and more, now it is 1."""
    source = CONTRACT_MAIN.read_text().replace(
        'if __name__ == "__main__":\n    main()\n', textwrap.dedent(UNGUARDED)
    )
    source = source.replace(
        "import json\n", "import json\nimport os\nimport signal\nimport time\n", 1
    )
    assert "RUNS_FILE" in source
    script = tmp_path / "unguarded.py"
    script.write_text(source)
    runs = tmp_path / "runs"
    done = _python([str(script)], RUNS_FILE=str(runs))
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stderr[-3000:]
    contract = json.loads(lines[-2])
    assert contract["failures"] == [] and contract["cells"] == CELLS
    last = json.loads(lines[-1])
    assert last["again"] == [x + 5 for x in range(10)]
    assert last["before"][0] not in last["after"] and len(last["after"]) == 2  # replaced
    assert runs.read_text().splitlines() == [str(last["pid"])]  # once, in the caller


# -- a real Jupyter kernel ---------------------------------------------------------------------

NOTEBOOK_CELLS = [
    # the contract suite's functions and its matrix, as contract_main.py defines them
    CONTRACT_MAIN.read_text(),
    """
    import json
    OFFSET = 1000

    def shift(x):
        return x + OFFSET

    @serverless.parallel
    def shifted(xs):  # a helper and a global of the notebook, by value
        return [shift(x) for x in xs]

    first = shifted([1, 2])
    OFFSET = 2000  # a changed global: the next call sees it
    second = shifted([1, 2])
    from serverless._pool import pool as _pool
    workers = _pool._pool.pids
    """,
    # a cell defining add and Calc, run again changed: the next call runs the new code
    """
    @serverless.parallel
    def add(numbers, n=1):
        return [x * 100 + n for x in numbers]

    class Calc:
        offset = 7

        @serverless.parallel
        def method(self, numbers, n=1):
            return [x + n + self.offset for x in numbers]

        @serverless.parallel
        @classmethod
        def klass(cls, numbers, n=1):
            return [-(x + n + cls.offset) for x in numbers]

    print(json.dumps({
        "first": first,
        "second": second,
        "add": add([1, 2]),
        "method": Calc().method([1, 2]),
        "klass": Calc.klass([1]),
        "lambda": serverless.parallel(name="times")(lambda xs: [x * OFFSET for x in xs])([1]),
        "await": await Calc().method.aio([0]),  # top-level await, on the kernel's loop
        "same workers": _pool._pool.pids == workers,  # a redefined cell restarts nothing
    }))
    """,
]


@contextlib.contextmanager
def _kernel(tmp_path: Path) -> Iterator[KernelManager]:
    """A kernel manager for this venv's python (a kernelspec of our own: whatever jupyter
    kernels are installed, this one runs sys.executable with the tests' environment)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "serverless-tests"
    spec.mkdir(parents=True)
    env = {k: v for k, v in test_env().items() if k in ("PYTHONPATH", "SERVERLESS_SECRET")}
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "serverless tests",
                "language": "python",
                "env": env,
            }
        )
    )
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    yield KernelManager(kernel_name="serverless-tests", kernel_spec_manager=specs)


def test_the_contract_suite_runs_in_a_jupyter_kernel_and_a_changed_cell_takes_effect(
    tmp_path: Path,
) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(cell)) for cell in NOTEBOOK_CELLS]
    with _kernel(tmp_path) as km:
        client = NotebookClient(nb, km=km, timeout=TIMEOUT, cwd=str(TESTS.parent))
        try:
            client.execute()
        finally:  # a client given its kernel manager leaves it running, its sockets open
            if client.kc is not None:
                client.kc.stop_channels()
            km.shutdown_kernel(now=True)
    outputs = ["".join(o.get("text", "") for o in cell.outputs) for cell in nb.cells]
    contract = json.loads(outputs[0].strip().splitlines()[-1])
    assert contract["failures"] == [] and contract["cells"] == CELLS, outputs[0][-3000:]
    after = json.loads(outputs[2].strip().splitlines()[-1])
    assert after == {
        "first": [1001, 1002],
        "second": [2001, 2002],
        "add": [101, 201],  # the redefined add, not contract_main's x + 1
        "method": [9, 10],  # the redefined Calc: offset 7, not 100
        "klass": [-9],
        "lambda": [2000],
        "await": [8],
        "same workers": True,
    }


# -- remote targets are never sent code --------------------------------------------------------


class CountingProxy:
    """A TCP forwarder in front of a real worker: counts the connections that reach it."""

    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.backend), 5)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def remote_worker() -> Iterator[int]:
    port = free_port()
    args = ["serverless._cli", "worker", "tests.sample_functions", "--port", str(port)]
    with server([*args, "--log-level", "warning"], port) as proc:
        output = proc.stdout
        assert output is not None
        threading.Thread(target=output.read, daemon=True).start()  # never a full pipe
        yield port


REMOTE = """
import serverless
from tests import sample_functions as sf

@serverless.parallel
def inc(xs):
    return [x + 1 for x in xs]

url = "http://127.0.0.1:{port}/serverless"
print("MODULE", sf.square.with_options(url=url)([3]))
for name, call in [
    ("url=", lambda: inc.with_options(url=url)([1])),
    ("init(url=)", lambda: (serverless.init(url=url), inc([1]))),
]:
    try:
        call()
    except serverless.ConfigurationError as exc:
        print("REFUSED", name, exc)
"""


@pytest.mark.parametrize("mode", ["-c", "script"])
def test_a_main_function_with_a_remote_target_fails_before_any_request(
    remote_worker: int, tmp_path: Path, mode: str
) -> None:
    proxy = CountingProxy(remote_worker)
    try:
        source = REMOTE.format(port=proxy.port)
        if mode == "-c":
            done = _python(["-c", source])
        else:
            (tmp_path / "script.py").write_text(source)
            done = _python([str(tmp_path / "script.py")])
        lines = done.stdout.splitlines()
        assert lines[0] == "MODULE [9]", done.stderr  # the proxy counts what reaches it
        reached = proxy.connections
        assert reached >= 1
        refused = [line for line in lines if line.startswith("REFUSED")]
        assert len(refused) == 2, done.stdout + done.stderr
        for line in refused:
            assert "inc is defined in" in line and "cannot run it" in line
            assert "Put it in a module that both this code and the workers import" in line
        assert proxy.connections == reached  # nothing more reached the worker
    finally:
        proxy.close()


def _marker_pickle(marker: Path) -> bytes:
    """A pickle that creates `marker` when it is loaded: proof of an unpickling."""

    class Planted:
        def __reduce__(self) -> tuple[object, ...]:
            return (open, (str(marker), "w"))

    return pickle.dumps(Planted())


def test_a_remote_worker_refuses_a_call_that_names_a_digest(
    remote_worker: int, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    data = _marker_pickle(marker)
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / f"{digest}.pickle").write_bytes(data)
    url = f"http://127.0.0.1:{remote_worker}/serverless"
    keys = p.Keyring(SECRET)
    for fn, status, says in [
        ("tests.sample_functions:square", 400, "never code sent by value"),
        ("__main__:inc", 404, "is not registered"),
    ]:
        rid = p.new_request_id()
        call = p.Call(v=p.VERSION, fn=fn, id=rid, index=0, items=[3], code=digest)
        body = p.encode(call)
        headers = p.signed_headers(keys, "/serverless", fn, rid, body, now=time.time())
        request = urllib.request.Request(url, body, headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == status
        assert says in info.value.read().decode(errors="replace")
    assert not marker.exists()


# -- the local pool's channel ------------------------------------------------------------------


@contextlib.contextmanager
def fresh_pool() -> Iterator[_pool.LocalPool]:
    pool = _pool.LocalPool(1, 4, ["tests.sample_functions"])
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


def _post_by_value(pool: _pool.LocalPool, digest: str) -> tuple[int, bytes]:
    fn = "__main__:planted"
    rid = p.new_request_id(pool.id_prefixes[pool.urls[0]])
    body = p.encode(p.Call(v=p.VERSION, fn=fn, id=rid, index=0, items=[1], code=digest))
    headers = p.signed_headers(pool.keyring, pool.route, fn, rid, body, now=time.time())
    return unix_post(sockets(pool)[0], pool.route, headers, body)


def test_a_pool_worker_refuses_a_pickle_that_does_not_match_its_signed_digest(
    tmp_path: Path,
) -> None:
    """The file under a signed digest replaced by another pickle (by anything that could
    write there): refused unread. A design that trusted the file would create the marker."""
    marker = tmp_path / "unpickled"
    planted = _marker_pickle(marker)
    with fresh_pool() as pool:
        signed = hashlib.sha256(b"the pickle the caller sent").hexdigest()
        pool.shelf.path(signed).write_bytes(planted)  # replaced after the caller wrote it
        status, answer = _post_by_value(pool, signed)
        assert status == 400 and b"does not match its signed digest" in answer
        assert not marker.exists()
        # the same file under its own digest is unpickled: the marker does prove a load
        real = pool.shelf.put(planted)
        status, answer = _post_by_value(pool, real)
        assert marker.exists()
        assert status != 200  # not a function list: refused after loading


def test_the_pickle_is_private_and_a_planted_link_is_never_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cf.main_add([1, 2]) == [2, 3]  # registered as __main__'s: sent by value
    pool = _pool._pool
    assert pool is not None
    directory = pool.shelf.directory
    pickles = list(directory.glob("*.pickle"))
    assert pickles
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in pickles:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    # a link planted where the next pickle goes is replaced, never written through
    shelf = byvalue.Shelf(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    data = b"some pickle"
    digest = hashlib.sha256(data).hexdigest()
    shelf.path(digest).symlink_to(victim)
    assert shelf.put(data) == digest
    assert victim.read_text() == "untouched"
    assert not shelf.path(digest).is_symlink() and shelf.path(digest).read_bytes() == data
    # the temporary file is created with O_EXCL|O_NOFOLLOW: a link there stops the write
    monkeypatch.setattr(secrets, "token_hex", lambda n: "0" * (2 * n))
    other = b"another pickle"
    other_digest = hashlib.sha256(other).hexdigest()
    (tmp_path / f".{other_digest[:16]}.{'0' * 16}").symlink_to(victim)
    with pytest.raises(FileExistsError):
        shelf.put(other)
    assert victim.read_text() == "untouched"
    # a worker never follows a link to a pickle, even one whose content matches
    reader = byvalue.Shelf(tmp_path)
    good = tmp_path / "elsewhere"
    good.write_bytes(pickle.dumps([]))
    good_digest = hashlib.sha256(good.read_bytes()).hexdigest()
    reader.path(good_digest).symlink_to(good)
    loaded = reader.load(good_digest)
    assert isinstance(loaded, str) and "cannot be opened" in loaded


def test_import_serverless_does_not_import_cloudpickle() -> None:
    done = _python(["-c", "import sys, serverless; print('cloudpickle' in sys.modules)"])
    assert done.stdout.strip() == "False", done.stderr


def test_a_large_function_warns_and_a_huge_one_is_refused_with_its_size() -> None:
    big = _holder(bytes(11 * 2**20))
    with pytest.warns(UserWarning, match=r"holder pickles to 11\.0 MiB"):
        byvalue.dumps([("__main__:holder", (None, big, "plain", None))])
    huge = _holder(bytes(101 * 2**20))
    with pytest.raises(serverless.ConfigurationError, match=r"101\.0 MiB .* over the 100 MiB"):
        byvalue.dumps([("__main__:holder", (None, huge, "plain", None))])


def _holder(blob: bytes) -> Callable[..., Any]:
    """A function of __main__ that references `blob` (so cloudpickle sends it by value)."""
    namespace: dict[str, Any] = {"__name__": "__main__", "BLOB": blob}
    exec("def holder(xs):\n    return [len(BLOB) for x in xs]\n", namespace)
    holder: Callable[..., Any] = namespace["holder"]
    return holder
