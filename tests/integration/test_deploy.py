"""The deploy/ recipes: their YAML parses, their numbers agree with each other, each recipe's
own server command, extracted from the file, serves a signed call here, and each recipe's
install step installs the library the way a user's app would, in a fresh virtual environment.

Docker is not available here: the Cloud Run image (also Kubernetes' and Knative's) is built by
running its Dockerfile's steps, parsed from the file (ENV, WORKDIR, COPY, RUN), in a fresh
virtual environment standing for the image's Python; its CMD then runs from that environment."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from gunicorn.workers.gthread import ThreadWorker

import serverless
from tests import sample_functions as sf
from tests.conftest import SECRET, free_port, serving, test_env

DEPLOY = Path(__file__).parents[2] / "deploy"
DEFAULT_ROUTE, DEFAULT_HEALTH = "/serverless", "/healthz"


def load(path: str) -> list[dict[str, Any]]:
    with open(DEPLOY / path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def flag(argv: list[str], *names: str, default: str | None = None) -> str:
    for i, arg in enumerate(argv):
        if arg in names:
            return argv[i + 1]
    assert default is not None, f"{names} missing from {argv}"
    return default


def capacity(argv: list[str]) -> int:
    """Chunks one instance runs at once, from its server command: processes x threads."""
    if argv[0] == "gunicorn":
        return int(flag(argv, "-w", "--workers")) * int(flag(argv, "--threads"))
    return int(flag(argv, "--processes", default="1")) * int(flag(argv, "--threads", default="64"))


def appengine_command() -> list[str]:
    return shlex.split(load("appengine/app.yaml")[0]["entrypoint"])


def dockerfile_command() -> list[str]:
    text = (DEPLOY / "cloudrun/Dockerfile").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    return list(json.loads(cmd))


def kubernetes_command() -> list[str]:
    pod = by_kind(load("kubernetes/worker.yaml"))["Deployment"]["spec"]["template"]["spec"]
    return list(pod["containers"][0]["command"])


def knative_command() -> list[str]:
    (service,) = load("kubernetes/knative-service.yaml")
    return list(service["spec"]["template"]["spec"]["containers"][0]["command"])


# -- the files and their invariants ------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) == 4
    for path in files:
        assert load(str(path.relative_to(DEPLOY)))


def test_appengine() -> None:
    app = load("appengine/app.yaml")[0]
    argv = appengine_command()
    # gthread, reading requests before a thread runs them (docs/deploy.md)
    assert argv[:1] == ["gunicorn"] and flag(argv, "-k") == "serverless._worker.gthread.Worker"
    module, _, name = flag(argv, "-k").rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), name), ThreadWorker)
    scaling = app["automatic_scaling"]
    assert scaling["max_concurrent_requests"] == capacity(argv) == 16
    assert scaling["target_concurrent_requests"] <= scaling["max_concurrent_requests"]
    assert "warmup" in app["inbound_services"]
    env = app["env_variables"]
    assert "SERVERLESS_SECRET" not in env  # from Secret Manager, never in the file
    assert env["SERVERLESS_SECRET_RESOURCE"].startswith("projects/")
    assert env["SERVERLESS_URL"].startswith("https://") and env["SERVERLESS_URL"].endswith(
        DEFAULT_ROUTE
    )


def test_cloudrun() -> None:
    service = load("cloudrun/service.yaml")[0]
    argv = dockerfile_command()
    template = service["spec"]["template"]
    spec, annotations = template["spec"], template["metadata"]["annotations"]
    assert spec["containerConcurrency"] == capacity(argv) == 32
    assert 0 < spec["timeoutSeconds"] <= 3600
    assert int(annotations["autoscaling.knative.dev/maxScale"]) >= 1
    assert annotations["run.googleapis.com/startup-cpu-boost"] == "true"
    container = spec["containers"][0]
    assert container["ports"][0]["containerPort"] == int(flag(argv, "--port"))
    health = flag(argv, "--health", default=DEFAULT_HEALTH)
    assert container["startupProbe"]["httpGet"]["path"] == health
    secret = next(e for e in container["env"] if e["name"] == "SERVERLESS_SECRET")
    assert "secretKeyRef" in secret["valueFrom"]
    assert int(flag(argv, "--graceful-timeout")) < 10  # Cloud Run kills 10 s after SIGTERM


def test_kubernetes() -> None:
    kinds = by_kind(load("kubernetes/worker.yaml"))
    assert set(kinds) == {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler"}
    deployment = kinds["Deployment"]
    chunk_timeout = int(deployment["metadata"]["annotations"]["serverless/chunk-timeout"])
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    argv = container["command"]
    health = flag(argv, "--health", default=DEFAULT_HEALTH)
    assert container["readinessProbe"]["httpGet"]["path"] == health
    assert container["livenessProbe"]["httpGet"]["path"] == health
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) > chunk_timeout
    graceful = int(flag(argv, "--graceful-timeout"))
    assert graceful >= chunk_timeout
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + graceful
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["ports"][0]["containerPort"] == int(flag(argv, "--port"))
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert kinds["Service"]["spec"]["selector"] == selector
    ingress = kinds["Ingress"]
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    assert path["path"] == flag(argv, "--route", default=DEFAULT_ROUTE)
    assert path["backend"]["service"]["name"] == kinds["Service"]["metadata"]["name"]
    nginx = "nginx.ingress.kubernetes.io/"
    assert int(ingress["metadata"]["annotations"][nginx + "proxy-read-timeout"]) > chunk_timeout
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_knative() -> None:
    (service,) = load("kubernetes/knative-service.yaml")
    spec = service["spec"]["template"]["spec"]
    argv = knative_command()
    assert spec["containerConcurrency"] == capacity(argv) == 32
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    target = int(annotations["autoscaling.knative.dev/target"])
    assert target <= spec["containerConcurrency"]
    probe = spec["containers"][0]["readinessProbe"]["httpGet"]["path"]
    assert probe == flag(argv, "--health", default=DEFAULT_HEALTH)


# -- each recipe's own server command, run here ------------------------------------------------


@contextlib.contextmanager
def running(
    argv: list[str], cwd: Path, venv: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run a recipe's server command on a free port of 127.0.0.1; yields the base URL. With
    `venv`, its programs run from that environment, which alone provides the library."""
    port = free_port()
    argv = [a.replace("$PORT", str(port)) for a in argv]
    if argv[0] == "gunicorn":
        argv[argv.index("-b")] = "--bind"
        argv[argv.index("--bind") + 1] = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "gunicorn", *argv[1:]]
    else:
        assert argv[:2] == ["serverless", "worker"]
        argv[argv.index("--port") + 1] = str(port)
        argv[argv.index("--host") + 1] = "127.0.0.1"
        cmd = [sys.executable, "-m", "serverless._cli", *argv[1:]]
    if venv is None:
        env = test_env(SERVERLESS_MODULES="tests.sample_functions")
        env["PYTHONPATH"] = f"{cwd}:{env['PYTHONPATH']}"
        log: int | IO[bytes] = subprocess.PIPE
    else:
        cmd = [str(venv / "bin" / argv[0]), *argv[1:]]
        log = (cwd / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        with serving(proc, port, grace=20):
            yield f"http://127.0.0.1:{port}"
    finally:
        if not isinstance(log, int):
            log.close()


@pytest.mark.parametrize(
    ("command", "cwd"),
    [
        (appengine_command, "appengine"),
        (dockerfile_command, "cloudrun"),
        (kubernetes_command, "kubernetes"),
        (knative_command, "kubernetes"),
    ],
    ids=["appengine", "cloudrun", "kubernetes", "knative"],
)
def test_recipe_command_serves_a_signed_call(reset_settings: None, command: Any, cwd: str) -> None:
    argv = command()
    serverless.init(DEFAULT_ROUTE, SECRET)
    with running(argv, DEPLOY / cwd) as base:
        square = sf.square.with_options(url=base + DEFAULT_ROUTE, workers=8)
        assert square(list(range(50)), 2) == [n * n + 2 for n in range(50)]
        with urllib.request.urlopen(base + DEFAULT_HEALTH, timeout=10) as response:
            assert response.read() == b"ok"


# -- each recipe's install step, in a fresh virtual environment -------------------------------

ROOT = DEPLOY.parent
DEMO_MODULE = "serverless.demo.pipeline"  # stands for the recipes' `geolocate`: in the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The library's wheel, built once as the recipes say (`pip wheel --no-deps -w DIR .`),
    from a copy of the checkout's sources, since a build writes into the tree it builds."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "simple-serverless"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist")]
    subprocess.run([*pip, "."], cwd=source, check=True, timeout=120)
    (built,) = (tmp / "dist").glob("*.whl")
    return built


def fresh_venv(path: Path) -> dict[str, str]:
    """A virtual environment with nothing but pip (no system site-packages, no PYTHONPATH:
    the checkout is out of reach); returns the environment its commands run with."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(path)
    return env


def stage(recipe: str, wheel: Path, into: Path) -> Path:
    """The recipe's directory as a user's app directory: its files, and the library's wheel
    where its requirements.txt names it (built from this checkout, as the file says)."""
    app = into / recipe
    shutil.copytree(DEPLOY / recipe, app, ignore=shutil.ignore_patterns("wheels", "__pycache__"))
    lines = (app / "requirements.txt").read_text().splitlines()
    wheels = [line for line in lines if line.startswith("./") and line.endswith(".whl")]
    assert len(wheels) == 1, f"{recipe}/requirements.txt names no wheel of the library"
    named = wheels[0]
    assert Path(named).name == wheel.name, (
        f"{recipe}/requirements.txt names {named}: the checkout builds {wheel.name} "
        "(update the file with the version)"
    )
    (app / named).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, app / named)
    return app


def assert_installed(venv: Path, env: dict[str, str], cwd: Path) -> None:
    """`import serverless` in the environment finds the installed library, not the checkout."""
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import serverless; print(serverless.__file__)"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where


def assert_serves(base: str, log: Path) -> None:
    """The recipe's server, run from the fresh environment, answers its health route and a
    signed call to a function of the module it imported."""
    from serverless.demo.pipeline import cleanup

    with urllib.request.urlopen(base + DEFAULT_HEALTH, timeout=10) as response:
        assert response.read() == b"ok", log.read_text()
    entries = [(1, 0.1, "a"), (2, 0.2, None), (3, 0.3, "c")]
    result = cleanup.with_options(url=base + DEFAULT_ROUTE, workers=2)(entries)
    assert [tuple(e) for e in result] == [(1, 0.1, "a"), (3, 0.3, "c")]


def test_appengine_installs_the_library_from_its_requirements(
    reset_settings: None, wheel: Path, tmp_path: Path
) -> None:
    """App Engine's build runs `pip install -r requirements.txt` in the app's directory; then
    app.yaml's entrypoint serves main:app."""
    app = stage("appengine", wheel, tmp_path)
    venv = tmp_path / "venv"
    env = fresh_venv(venv)
    subprocess.run(
        ["pip", "install", "-q", "-r", "requirements.txt"],
        cwd=app,
        env=env,
        check=True,
        timeout=300,
    )
    assert_installed(venv, env, app)
    serverless.init(DEFAULT_ROUTE, SECRET)
    env.update(SERVERLESS_SECRET=SECRET, SERVERLESS_MODULES=DEMO_MODULE)
    with running(appengine_command(), app, venv, env) as base:
        assert_serves(base, app / "server.log")


def dockerfile_steps() -> list[tuple[str, str]]:
    """The Dockerfile's instructions and their arguments, continued lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "cloudrun/Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0], line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def build_like_docker(context: Path, root: Path, env: dict[str, str]) -> Path:
    """Run the Dockerfile's steps against `context` as `docker build` would, with `root`
    standing for the image's file system and `env` for its Python (the fresh environment's
    python and pip on the PATH); the ENV lines join `env`. Returns the final WORKDIR."""
    workdir = root
    for instruction, args in dockerfile_steps():
        if instruction == "FROM":
            assert args.startswith("python:3"), args  # the image's python: the venv's
        elif instruction == "ENV":
            env.update(item.partition("=")[::2] for item in shlex.split(args))
        elif instruction == "WORKDIR":
            workdir = root / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = shlex.split(args)
            for source in sources:
                target = workdir / dest
                if (context / source).is_dir():
                    shutil.copytree(context / source, target, dirs_exist_ok=True)
                else:
                    if dest.endswith(("/", ".")):
                        target = target / Path(source).name
                    shutil.copy2(context / source, target)
        elif instruction == "RUN":
            subprocess.run(["sh", "-c", args], cwd=workdir, env=env, check=True, timeout=300)
        else:
            assert instruction in ("USER", "CMD", "EXPOSE"), f"{instruction}: not emulated here"
    return workdir


def test_cloudrun_image_installs_the_library_from_its_requirements(
    reset_settings: None, wheel: Path, tmp_path: Path
) -> None:
    """The Dockerfile's RUN steps install the library from the app's requirements; its CMD
    (also the Kubernetes and Knative recipes' command, on the same image) then serves."""
    context = stage("cloudrun", wheel, tmp_path)
    venv = tmp_path / "venv"
    env = fresh_venv(venv)
    workdir = build_like_docker(context, tmp_path / "image", env)
    assert_installed(venv, env, workdir)
    serverless.init(DEFAULT_ROUTE, SECRET)
    env.update(SERVERLESS_SECRET=SECRET, SERVERLESS_MODULES=DEMO_MODULE)
    with running(dockerfile_command(), workdir, venv, env) as base:
        assert_serves(base, workdir / "server.log")


def test_the_readmes_git_url_installs_the_library(tmp_path: Path) -> None:
    """The README's first way to add the library to an app, a tag of the repository by VCS
    URL, with this checkout's history cloned and tagged standing for GitHub's."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs git and a git checkout")
    (line,) = re.findall(r"pip install '(simple-serverless\S* @ git\+https://\S+)'", README())
    url = re.search(r"git\+(https://\S+?)@([\w.]+)$", line)
    assert url is not None, line
    repo = tmp_path / "simple-serverless"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True, timeout=120)
    subprocess.run(["git", "-C", str(repo), "tag", url.group(2)], check=True, timeout=60)
    venv = tmp_path / "venv"
    env = fresh_venv(venv)
    # a PEP 508 URL needs a host: file://localhost/...
    requirement = line.replace(url.group(1), f"file://localhost{repo}")
    subprocess.run(
        ["pip", "install", "-q", requirement], cwd=tmp_path, env=env, check=True, timeout=300
    )
    assert_installed(venv, env, tmp_path)


def README() -> str:
    return (ROOT / "README.md").read_text()


def test_kubernetes_and_knative_run_the_cloudrun_image() -> None:
    """They have no install step of their own: they run the image the Dockerfile builds."""
    image = load("cloudrun/service.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    pod = by_kind(load("kubernetes/worker.yaml"))["Deployment"]["spec"]["template"]["spec"]
    (knative,) = load("kubernetes/knative-service.yaml")
    assert pod["containers"][0]["image"] == image["image"]
    assert knative["spec"]["template"]["spec"]["containers"][0]["image"] == image["image"]
    for recipe in ("kubernetes/worker.yaml", "kubernetes/knative-service.yaml"):
        assert "deploy/cloudrun/Dockerfile" in (DEPLOY / recipe).read_text()


# -- the local load balancer recipes of docs/deploy.md ----------------------------------------


def test_local_haproxy_config_is_the_one_the_multihost_tests_use() -> None:
    from bench.multihost import haproxy_config

    text = (DEPLOY / "local/haproxy.cfg").read_text()
    body = "".join(line for line in text.splitlines(True) if not line.startswith("#"))
    servers = [(f"h{i}", "127.0.0.1", 8001 + i) for i in range(3)]
    expected = haproxy_config(servers, 8080, 32, None)
    assert body == "".join(line for line in expected.splitlines(True) if not line.startswith("#"))


@contextlib.contextmanager
def process(cmd: list[str], port: int, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        cmd, env=test_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    with serving(proc, port, grace=15):
        yield proc


@contextlib.contextmanager
def recipe(
    balancer: str, tmp_path: Path, **env: str
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """The local balancer recipe in front of three `serverless worker` processes, each
    standing for a host; yields the worker route's URL through the balancer, and the workers."""
    program = shutil.which(balancer) or f"/usr/sbin/{balancer}"
    if not os.path.exists(program):
        pytest.skip(f"{balancer} is not installed (scripts/system-deps installs it)")
    ports = [free_port() for _ in range(3)]
    lb_port = free_port()
    name = "haproxy.cfg" if balancer == "haproxy" else "nginx.conf"
    text = (DEPLOY / "local" / name).read_text()
    for documented, port in zip([8001, 8002, 8003, 8080], [*ports, lb_port], strict=True):
        text = text.replace(f"127.0.0.1:{documented}", f"127.0.0.1:{port}")
    text = text.replace("/tmp/serverless-nginx.pid", str(tmp_path / "nginx.pid"))
    config = tmp_path / name
    config.write_text(text)
    if balancer == "haproxy":
        command = [program, "-db", "-f", str(config)]
    else:
        command = [program, "-e", "stderr", "-c", str(config)]
    worker = [sys.executable, "-m", "serverless._cli", "worker", "tests.sample_functions"]
    with contextlib.ExitStack() as stack:
        states = [tmp_path / f"host{n}" for n in range(3)]  # each stands for a host
        workers = [
            stack.enter_context(
                process(
                    [*worker, "--port", str(p), "--threads", "32"],
                    p,
                    SERVERLESS_STATE_DIR=str(s),
                    **env,
                )
            )
            for p, s in zip(ports, states, strict=True)
        ]
        stack.enter_context(process(command, lb_port))
        serverless.init(DEFAULT_ROUTE, SECRET)
        yield f"http://127.0.0.1:{lb_port}{DEFAULT_ROUTE}", workers


@pytest.mark.parametrize("balancer", ["haproxy", "nginx"])
def test_local_load_balancer_recipe_survives_a_killed_worker(
    reset_settings: None, tmp_path: Path, balancer: str
) -> None:
    with recipe(balancer, tmp_path) as (url, workers):
        square = sf.square.with_options(url=url)
        data = list(range(300))
        assert square(data) == [n * n for n in data]
        workers[1].kill()  # SIGKILL, as in the walkthrough
        workers[1].wait(10)
        for _ in range(5):
            result, stats = square.with_stats(data)
            assert result == [n * n for n in data]
        # a list is cut into as many chunks as the workers can run at once, as they declared
        # (3 x 32 threads), never more than workers=100
        assert stats.workers == 96


@pytest.mark.parametrize("balancer", ["haproxy", "nginx"])
def test_local_load_balancer_recipe_never_resends_a_chunk_that_reached_a_worker(
    reset_settings: None, tmp_path: Path, balancer: str
) -> None:
    """A retries=0 chunk ran twice through the HAProxy recipe (`retry-on empty-response`)
    when its worker process died mid-chunk; nginx's `non_idempotent` did the same."""
    calls = tmp_path / "calls"
    calls.touch()
    with recipe(balancer, tmp_path, SERVERLESS_TEST_CALLS=str(calls)) as (url, _):
        f = sf.die_once.with_options(url=url, retries=0)
        with pytest.raises(serverless.WorkerUnavailable):
            f([7], str(tmp_path / "marker"))
    assert {k: len(v) for k, v in sf.executions(str(calls), "die_once").items()} == {"7": 1}
