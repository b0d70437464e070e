"""Scale-out across worker hosts behind a real load balancer (HAProxy).

Each host is a network namespace with its own address on a bridge (veth pairs, 10.x.y.0/24)
when this machine allows it (root, iproute2), else a separate port on 127.0.0.1; each runs
`serverless worker bench.multihost --threads T`. The caller gets only HAProxy's URL. The
benchmark runs an I/O-bound function (each item waits) on 1, 2, 3, 4 hosts: each host runs at
most T chunks at once (HAProxy queues the rest, `maxconn T`), so the hosts are the bottleneck
and the wall time should fall as 1/hosts.

    python -m bench.multihost [--hosts 4] [--threads 8] [--items 1280] [--wait 0.05]

The caller's ceiling (issue 16): one item per request, short waits, and the caller's CPU per
item beside each row; --profile adds py-spy on the caller during each timed run and splits
that CPU by category (HTTP client, signing, encoding, fan-out engine, event loop), in
microseconds per request:

    python -m bench.multihost --chunk-size 1 --wait 0.01 --threads 16 --items 8000 --profile

Prints a markdown table and writes bench/results/multihost.json. tests/integration/test_multihost.py
uses the Cluster below for the kill and key-rotation runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import ctypes
import io
import ipaddress
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serverless
from serverless import StepStats

ROOT = Path(__file__).resolve().parent.parent
ROUTE = "/serverless"
HEALTH = "/healthz"
WORKER_PORT = 8000
START_TIMEOUT = 30.0


@serverless.parallel
def io_bound(items: list[int], seconds: float) -> list[int]:
    """Each item waits `seconds` (a network call), then comes back doubled."""
    for _ in items:
        time.sleep(seconds)
    return [2 * item for item in items]


@serverless.parallel
def hostnames(items: list[int]) -> list[str]:
    """Which host served each item."""
    return [socket.gethostname() + ":" + str(os.getpid()) for _ in items]


# -- the topology -----------------------------------------------------------------------------


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def netns_available() -> bool:
    """True if this process may create network namespaces, veth pairs and bridges."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"sl-probe-{os.getpid()}"
    try:
        _run("ip", "netns", "add", name)
    except (subprocess.SubprocessError, OSError):
        return False
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        _run("ip", "netns", "del", name)
    return True


def _remove_stale_namespaces() -> None:
    """Namespaces and bridges left by a run that was killed before its teardown."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    stale = [("netns", m[0], m[1]) for m in re.findall(r"^(sl(\d+)h\d+)\b", names, re.M)]
    stale += [("link", m[0], m[1]) for m in re.findall(r"^\d+: (slbr(\d+))[:@]", links, re.M)]
    for kind, name, pid in stale:
        if not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _run("ip", kind, "del", name)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no interface here uses (several runs may share the machine)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    seed = os.getpid()
    for attempt in range(200):
        n = (seed + attempt * 7919) % (200 * 250)
        subnet = ipaddress.IPv4Network(f"10.{50 + n // 250}.{n % 250}.0/24")
        if f"10.{50 + n // 250}.{n % 250}." not in used:
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 subnet")


@dataclass
class Host:
    """One worker host: its namespace (or none), address and worker process."""

    name: str
    address: str
    port: int
    netns: str | None
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def base(self) -> str:
        return f"http://{self.address}:{self.port}"


@dataclass
class Cluster:
    """N worker hosts behind HAProxy, started and torn down by the caller (a context manager).

    mode: "netns" (namespaces on a bridge) or "loopback" (ports on 127.0.0.1); "auto" picks
    netns if the machine allows it.
    """

    hosts: int
    threads: int = 8
    secret: str = "multihost-secret-0123456789abcdef"
    mode: str = "auto"
    modules: tuple[str, ...] = ("bench.multihost",)
    tag: str = field(default_factory=lambda: str(os.getpid()))
    members: list[Host] = field(default_factory=list)
    lb_port: int = 0
    _dir: Path | None = None
    _bridge: str | None = None
    _haproxy: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}{ROUTE}"

    # -- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        if self.mode == "auto":
            self.mode = "netns" if netns_available() else "loopback"
        self._dir = Path(tempfile.mkdtemp(prefix="serverless-multihost-"))
        if self.mode == "netns":
            _remove_stale_namespaces()
            self._make_bridge()
        for i in range(self.hosts):
            self.members.append(self._make_host(i))
        for host in self.members:
            self.start_worker(host, self.secret, wait=False)
        for host in self.members:
            self.wait_healthy(host)
        self._start_haproxy()

    def stop(self) -> None:
        if self._haproxy is not None:
            _terminate(self._haproxy)
        for host in self.members:
            if host.proc is not None:
                _terminate(host.proc)
        if self.mode == "netns":
            for host in self.members:
                if host.netns:
                    with contextlib.suppress(subprocess.SubprocessError, OSError):
                        _run("ip", "netns", "del", host.netns)
            if self._bridge:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    _run("ip", "link", "del", self._bridge)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _make_bridge(self) -> None:
        self._subnet = _free_subnet()
        self._bridge = f"slbr{self.tag}"
        gateway = f"{self._subnet[1]}/24"
        _run("ip", "link", "add", self._bridge, "type", "bridge")
        _run("ip", "addr", "add", gateway, "dev", self._bridge)
        _run("ip", "link", "set", self._bridge, "up")

    def _make_host(self, i: int) -> Host:
        if self.mode != "netns":
            return Host(f"h{i}", "127.0.0.1", _free_port(), None)
        assert self._bridge is not None
        netns, outer = f"sl{self.tag}h{i}", f"sl{self.tag}v{i}"
        address = str(self._subnet[10 + i])
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", outer, "master", self._bridge)
        _run("ip", "link", "set", outer, "up")
        _run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        return Host(f"h{i}", address, WORKER_PORT, netns)

    # -- workers ---------------------------------------------------------------------------

    def start_worker(self, host: Host, secret: str, *, wait: bool = True) -> None:
        """Start (or restart) `serverless worker` on a host, with this secret (or "new,old")."""
        assert self._dir is not None
        cmd = [
            sys.executable, "-m", "serverless._cli", "worker", *self.modules,
            "--host", host.address, "--port", str(host.port), "--threads", str(self.threads),
            "--graceful-timeout", "30", "--log-level", "warning",
        ]  # fmt: skip
        if host.netns:
            cmd = ["ip", "netns", "exec", host.netns, *cmd]  # ip execs the command: same pid
        env = dict(os.environ)
        path = [str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
        env["SERVERLESS_SECRET"] = secret
        env.pop("SERVERLESS_URL", None)
        # Each stands for a machine: its own replay store (one per host, docs/security.md).
        state = self._dir / f"{host.name}-state"
        state.mkdir(mode=0o700, exist_ok=True)
        env["SERVERLESS_STATE_DIR"] = str(state)
        host.log = self._dir / f"{host.name}.log"
        with open(host.log, "ab") as log:
            host.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        if wait:
            self.wait_healthy(host)

    def wait_healthy(self, host: Host) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if host.proc is not None and host.proc.poll() is not None:
                log = host.log.read_text() if host.log else ""
                raise RuntimeError(f"worker {host.name} exited ({host.proc.returncode}):\n{log}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(host.base + HEALTH, timeout=1) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"worker {host.name} did not become healthy")

    def kill(self, host: Host) -> None:
        """SIGKILL the host's worker: no drain, connections reset mid-chunk."""
        assert host.proc is not None
        host.proc.kill()
        host.proc.wait(10)

    def restart(self, host: Host, secret: str) -> None:
        """A graceful restart: SIGTERM (in-flight chunks finish), then start with `secret`,
        and wait until HAProxy's health checks put the host back in rotation."""
        assert host.proc is not None
        host.proc.terminate()
        host.proc.wait(35)
        self.wait_lb_status(host, "DOWN")
        self.start_worker(host, secret)
        self.wait_lb_status(host, "UP")

    # -- the load balancer -----------------------------------------------------------------

    def _start_haproxy(self) -> None:
        assert self._dir is not None
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.lb_port = _free_port()
        servers = [(h.name, h.address, h.port) for h in self.members]
        config = self._dir / "haproxy.cfg"
        config.write_text(
            haproxy_config(servers, self.lb_port, self.threads, str(self._dir / "haproxy.sock"))
        )
        with open(self._dir / "haproxy.log", "wb") as log:
            self._haproxy = subprocess.Popen(
                [haproxy, "-db", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        for host in self.members:
            self.wait_lb_status(host, "UP")

    def _lb_command(self, command: str) -> str:
        """One command on HAProxy's runtime API (its stats socket)."""
        assert self._dir is not None
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self._dir / "haproxy.sock"))
            s.sendall(command.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    def set_lb_state(self, host: Host, state: str) -> None:
        """Take a host out of rotation ("maint") or put it back ("ready")."""
        self._lb_command(f"set server workers/{host.name} state {state}")
        self.wait_lb_status(host, "MAINT" if state == "maint" else "UP")

    def lb_status(self) -> dict[str, str]:
        """Each server's status as HAProxy sees it (UP, DOWN, MAINT...), from its stats socket."""
        rows = csv.DictReader(io.StringIO(self._lb_command("show stat").lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row.get("pxname") == "workers" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_lb_status(self, host: Host, status: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            assert self._haproxy is not None
            if self._haproxy.poll() is not None:
                raise RuntimeError("haproxy exited")
            with contextlib.suppress(OSError):
                seen = self.lb_status().get(host.name, "")
                if seen == status:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"HAProxy sees {host.name} as {seen!r}, not {status}")


def haproxy_config(
    servers: list[tuple[str, str, int]], port: int, threads: int, stats_socket: str | None
) -> str:
    """HAProxy in front of the workers. Per server `maxconn` = its threads, so a host gets no
    more chunks than it runs at once and HAProxy queues the rest for the first free one;
    a dead host is out after its first refused or reset connection (or two failed health
    checks), and a request that found it dead is retried on another host."""
    lines = [
        "global",
        "    maxconn 4096",
        *([f"    stats socket {stats_socket} mode 600 level admin"] if stats_socket else []),
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 330s",
        "    timeout server 330s   # > the callers' chunk timeout (300 s by default)",
        "    timeout queue 300s",
        "    timeout http-keep-alive 60s",
        "    timeout http-request 10s   # the whole request head: slowloris (docs/security.md)",
        "    option http-buffer-request   # the body arrives whole before a worker sees it",
        "    retries 3",
        "    option redispatch 1   # each retry goes to another server",
        "    # Resend only a request that never reached a server (its connection failed): one",
        "    # that did may have run, and retries=0 promises at most once (docs/reliability.md).",
        "    # The caller retries the rest itself when its retries allow.",
        "    retry-on conn-failure",
        "",
        "frontend workers_in",
        f"    bind 127.0.0.1:{port}",
        "    default_backend workers",
        "",
        "backend workers",
        "    balance leastconn",
        "    option httpchk GET /healthz",
        "    http-check expect status 200",
        "    # Health checks every 200 ms; besides, the first connection refused or reset by a",
        "    # server in live traffic marks it down at once (layer 4 only: a 500 is a user error),",
        "    # else leastconn would send everything to the dead host, which has no connections.",
        f"    default-server check inter 200ms fastinter 100ms downinter 500ms fall 2 rise 2 "
        f"maxconn {threads} observe layer4 error-limit 1 on-error mark-down",
    ]
    lines += [f"    server {name} {address}:{p}" for name, address, p in servers]
    return "\n".join(lines) + "\n"


def _die_with_parent() -> None:
    """In the child before exec: if the benchmark or test dies, so do its hosts (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def caller(cluster: Cluster) -> Iterator[None]:
    """Configure this process to send chunks to the cluster's load balancer."""
    serverless.init(ROUTE, cluster.secret, url=cluster.url)
    yield


# -- the benchmark ----------------------------------------------------------------------------


# What the caller's CPU goes to, for --profile: first match from the leaf up wins. uvloop is
# compiled, so its work shows as the Python frame that called into it: a leaf in
# _Connection.send is the socket write (the send syscall); a leaf at the loop thread's run is
# uvloop itself (epoll, reads, callbacks). py-spy counts a thread preempted inside a syscall
# as busy, which on an oversubscribed machine inflates the write several times over (45% of
# the samples here against 20-27% kernel time by getrusage and perf): so the kernel's time
# comes from getrusage, and py-spy splits only the user time, write samples left out.
SYSCALL = "socket write (send syscall, from _Connection.send)"
KERNEL = "kernel (getrusage: send, recv, epoll, wake-ups)"
LEAF_CATEGORIES = [
    (SYSCALL, "_Connection.send "),
    ("uvloop internals (epoll, socket reads, callbacks)", "Thread.run "),
]
CALLER_CATEGORIES = [
    ("signing (HMAC, SHA-256)", ("Keyring.", "string_to_sign", "signed_headers", "hmac")),
    ("encoding and decoding", ("serverless/_wire/", "msgspec")),
    ("HTTP client (_caller/http.py, httptools)", ("serverless/_caller/http.py", "httptools")),
    ("fan-out engine (fanout, flow)", ("_caller/fanout.py", "_caller/flow.py")),
    ("dispatcher (dispatch, plan, _function, chunking, _stats)", ("serverless/",)),
    ("asyncio (tasks, futures)", ("asyncio/",)),
]


def _categorise(frames: list[str]) -> str:
    for name, leaf in LEAF_CATEGORIES:
        if frames[-1].startswith(leaf):
            return name
    for frame in reversed(frames):
        for name, keys in CALLER_CATEGORIES:
            if any(key in frame for key in keys):
                return name
    return "other (interpreter, threading)"


def _spy(seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on this process for `seconds` (only busy samples: py-spy skips idle threads)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    cmd = [spy, "record", "-p", str(os.getpid()), "-d", str(max(1, int(seconds))), "-r", "500"]
    cmd += ["-f", "raw", "-o", str(out), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _split(path: Path) -> dict[str, float]:
    """Share of the profile's (busy) samples per category, the socket write's left out."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[_categorise(stack.split(";"))] += int(n)
    counts.pop(SYSCALL, None)
    total = sum(counts.values()) or 1
    return {name: n / total for name, n in counts.most_common()}


def measure(
    hosts: int,
    threads: int,
    items: int,
    wait: float,
    chunk_size: int,
    mode: str,
    *,
    per_slot: float = 2.0,
    profile: bool = False,
) -> dict[str, Any]:
    """One timed run on `hosts` hosts; the caller's `workers` = hosts x threads x per_slot."""
    workers = max(1, round(hosts * threads * per_slot))
    with Cluster(hosts, threads=threads, mode=mode) as cluster, caller(cluster):
        fn = io_bound.with_options(workers=workers, chunk_size=chunk_size)
        fn(list(range(hosts * threads * chunk_size)), wait)  # warm every connection
        data = list(range(items))
        spy = None
        out = ROOT / "bench" / "results" / f"multihost-caller-{hosts}.txt"
        if profile:  # sample the middle of the run: no ramp-up, no tail
            out.parent.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            expected = items * wait / (hosts * threads)
            spy = _spy(expected * 0.6, out)
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        result, stats = fn.with_stats(data, wait)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
        cpu = user + system
        assert result == [2 * x for x in data], "results lost or out of order"
        ideal = items * wait / (hosts * threads)
        row: dict[str, Any] = {
            "hosts": hosts,
            "workers": workers,
            "mode": cluster.mode,
            "wall_s": wall,
            "ideal_s": ideal,
            "items_per_s": items / wall,
            "caller_cpu_us_per_item": cpu / items * 1e6,
            "caller_sys_us_per_item": system / items * 1e6,  # the kernel's share: sockets
            "caller_cpu_share": cpu / wall,
            "retries": stats.retries,
        }
        if spy is not None:
            spy.wait(60)
            if out.exists():
                us = chunk_size / items * 1e6  # per request
                split = {name: share * user * us for name, share in _split(out).items()}
                row["profile_us_per_request"] = {KERNEL: system * us, **split}
        return row


def measure_kill(
    hosts: int, threads: int, items: int, wait: float, chunk_size: int, mode: str
) -> dict[str, float | int | str]:
    """The same run on `hosts` hosts, one SIGKILLed a quarter of the way through."""
    with Cluster(hosts, threads=threads, mode=mode) as cluster, caller(cluster):
        fn = io_bound.with_options(workers=hosts * threads * 2, chunk_size=chunk_size)
        fn(list(range(hosts * threads * chunk_size)), wait)
        data = list(range(items))
        full = items * wait / (hosts * threads)
        outcome: dict[str, tuple[list[int], StepStats]] = {}
        started = time.perf_counter()
        runner = threading.Thread(target=lambda: outcome.update(run=fn.with_stats(data, wait)))
        runner.start()
        time.sleep(full / 4)
        cluster.kill(cluster.members[-1])
        runner.join()
        wall = time.perf_counter() - started
        result, stats = outcome["run"]
        assert result == [2 * x for x in data], "results lost or out of order"
        # a quarter of the work at full strength, the rest with one host fewer
        ideal = full / 4 + full * 3 / 4 * hosts / (hosts - 1)
        return {"hosts": hosts, "wall_s": wall, "ideal_s": ideal, "retries": stats.retries}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=4, help="largest number of hosts")
    parser.add_argument("--threads", type=int, default=8, help="threads (concurrency) per host")
    parser.add_argument("--items", type=int, default=1280, help="items per run")
    parser.add_argument("--wait", type=float, default=0.05, help="seconds each item waits")
    parser.add_argument("--chunk-size", type=int, default=4, help="items per chunk")
    parser.add_argument("--mode", choices=["auto", "netns", "loopback"], default="auto")
    parser.add_argument("--min-hosts", type=int, default=1, help="smallest number of hosts")
    parser.add_argument(
        "--per-slot", type=float, default=2.0, help="caller's workers per host thread"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy on the caller per row")
    parser.add_argument("--no-kill", action="store_true", help="skip the SIGKILL run")
    args = parser.parse_args()
    rows = [
        measure(
            n,
            args.threads,
            args.items,
            args.wait,
            args.chunk_size,
            args.mode,
            per_slot=args.per_slot,
            profile=args.profile,
        )
        for n in range(args.min_hosts, args.hosts + 1)
    ]
    base = float(rows[0]["wall_s"])
    print(
        f"{args.items} items x {args.wait * 1000:.0f} ms, {args.chunk_size} per chunk, "
        f"{args.threads} threads per host, HAProxy leastconn, hosts: {rows[0]['mode']}\n"
    )
    print(
        "| hosts | caller workers | wall (s) | ideal (s) | items/s | speedup | "
        "linear efficiency | caller CPU per item (of it kernel) | caller CPU / wall | retries |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    first = int(rows[0]["hosts"])
    for row in rows:
        speedup = base / float(row["wall_s"]) * first
        row["speedup"] = speedup
        row["efficiency"] = speedup / int(row["hosts"])
        print(
            f"| {row['hosts']} | {row['workers']} | {float(row['wall_s']):.3f} | "
            f"{float(row['ideal_s']):.3f} | {float(row['items_per_s']):.0f} | {speedup:.2f}x | "
            f"{float(row['efficiency']):.0%} | {row['caller_cpu_us_per_item']:.0f} us "
            f"({row['caller_sys_us_per_item']:.0f} us) | "
            f"{row['caller_cpu_share']:.0%} | {row['retries']} |"
        )
    profiled = [row for row in rows if "profile_us_per_request" in row]
    if profiled:
        names = list(profiled[-1]["profile_us_per_request"])
        names += sorted({n for r in profiled for n in r["profile_us_per_request"]} - set(names))
        print("\nThe caller's CPU per request by category (py-spy, busy samples), in us:\n")
        print("| category | " + " | ".join(f"{r['hosts']} hosts" for r in profiled) + " |")
        print("|---|" + "---|" * len(profiled))
        for name in names:
            cells = [f"{r['profile_us_per_request'].get(name, 0.0):.1f}" for r in profiled]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        f"\n({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}.)"
    )
    killed: dict[str, float | int | str] = {}
    if args.hosts >= 2 and not args.no_kill:
        killed = measure_kill(
            args.hosts, args.threads, args.items, args.wait, args.chunk_size, args.mode
        )
        print(
            f"\n{args.hosts} hosts, one SIGKILLed a quarter of the way through: every result "
            f"back in order in {float(killed['wall_s']):.3f} s (ideal with the loss "
            f"{float(killed['ideal_s']):.3f} s), {killed['retries']} chunk retries by the caller."
        )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "multihost.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "killed": killed}, indent=2)
    )
    return 0


if __name__ == "__main__":
    # Run as bench.multihost, the name under which the worker hosts register io_bound.
    from bench import multihost

    sys.exit(multihost.main())
