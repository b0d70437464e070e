"""A real geocoding service to call: US zipcode -> "Town, ST 40057, USA", over HTTP.

The seed called a public geocoding API; this one answers from the offline dataset of the
`zipcodes` package (42,789 US codes) and waits `latency` seconds per lookup, standing for the
network distance (~10 ms in the same region, ~75 ms across the US, +100 ms across the
Atlantic). It is asynchronous, so a hundred concurrent lookups cost no threads.

    python -m serverless.demo.geocoder --port 8089 --latency 0.1
    GET /zip/40057 -> 200 {"zipcode": "40057", "address": "Pleasureville, KY 40057, USA"}
    GET /zip/00000 -> 404 {"zipcode": "00000", "error": "unknown zipcode"}
    GET /zip/40057?latency=0.02 -> the same, with this latency (seconds, at most 10)
    GET /stats     -> 200 {"lookups": 1234, "throttled": 0}   (answered so far, refused)
    GET /codes     -> 200 {"40057": 2, ...}   (lookups answered so far, per code asked)

With --quota 200/s (or 3000/min, as Google's Geocoding API allows by default) it enforces a
quota as the real APIs do: a token bucket (quota.py), and beyond it 429 with a Retry-After in
whole seconds. A refused lookup still takes the latency: the refusal crosses the same network.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import select
import subprocess
import sys
import time
from types import TracebackType

from .._exceptions import ConfigurationError

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the demo's geocoder needs aiohttp: pip install 'simple-serverless[demo]'", name="aiohttp"
    ) from exc
from .quota import TokenBucket, parse_quota, retry_after

START_TIMEOUT = 30.0
MAX_LATENCY = 10.0


def load_addresses() -> dict[str, str]:
    """Every known zipcode's address, in the format the seed's geocoder returned."""
    try:
        import zipcodes
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigurationError(
            "the demo needs the `zipcodes` package: pip install 'simple-serverless[demo]'"
        ) from exc
    return {
        z["zip_code"]: f"{z['city']}, {z['state']} {z['zip_code']}, USA"
        for z in zipcodes.list_all()
    }


def make_app(
    addresses: dict[str, str], latency: float, quota: float | None = None
) -> web.Application:
    served = throttled = 0
    per_code: collections.Counter[str] = collections.Counter()
    bucket = TokenBucket(quota, time.monotonic()) if quota else None

    async def lookup(request: web.Request) -> web.Response:
        nonlocal served, throttled
        code = request.match_info["code"]
        try:
            wait = float(request.query.get("latency", latency))
        except ValueError:
            return web.json_response({"error": "latency must be a number"}, status=400)
        if not 0 <= wait <= MAX_LATENCY:
            return web.json_response(
                {"error": f"latency must be in [0, {MAX_LATENCY}]"}, status=400
            )
        refused = bucket.take(time.monotonic()) if bucket is not None else None
        if refused is not None:
            throttled += 1  # counted on arrival, as the bucket decides then
        if wait > 0:
            await asyncio.sleep(wait)
        if refused is not None:
            return web.json_response(
                {"zipcode": code, "error": "over the query limit"},
                status=429,
                headers={"Retry-After": retry_after(refused)},
            )
        served += 1
        per_code[code] += 1
        address = addresses.get(code)
        if address is None:
            return web.json_response({"zipcode": code, "error": "unknown zipcode"}, status=404)
        return web.json_response({"zipcode": code, "address": address})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"lookups": served, "throttled": throttled})

    async def codes(request: web.Request) -> web.Response:
        return web.json_response(per_code)

    app = web.Application()
    app.router.add_get("/zip/{code}", lookup)
    app.router.add_get("/stats", stats)
    app.router.add_get("/codes", codes)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serverless.demo.geocoder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds added per lookup")
    parser.add_argument(
        "--quota",
        type=_quota,
        default=None,
        help='lookups allowed per second ("200/s", "3000/min"); 429 beyond it',
    )
    parser.add_argument("--parent", type=int, default=0, help="exit when this process dies")
    args = parser.parse_args(argv)
    if args.parent:
        from .._pool.child import _die_with_parent

        _die_with_parent(args.parent)
    app = make_app(load_addresses(), args.latency, args.quota)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=1024)
        await site.start()
        port = runner.addresses[0][1]
        # The one line the parent waits for (the CLI owns this process's terminal).
        sys.stdout.write(f"geocoder listening on http://{args.host}:{port}\n")
        sys.stdout.flush()
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def _quota(value: str) -> float:
    try:
        return parse_quota(value)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Geocoder:
    """The service as a child process: `with Geocoder(latency=0.1) as url: ...`.

    It dies with this process (PR_SET_PDEATHSIG), so an interrupted demo leaves no orphan.
    quota: lookups per second it allows (a number, "200/s", "3000/min"); None: no limit.
    """

    def __init__(
        self,
        latency: float = 0.1,
        host: str = "127.0.0.1",
        port: int = 0,
        quota: str | float | None = None,
    ) -> None:
        self.latency, self.host, self.port = latency, host, port
        self.quota = None if quota is None else parse_quota(quota)  # fails here, not in the child
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        command = [sys.executable, "-m", "serverless.demo.geocoder", "--host", self.host]
        command += ["--port", str(self.port), "--latency", str(self.latency)]
        command += ["--parent", str(os.getpid())]
        if self.quota is not None:
            command += ["--quota", repr(self.quota)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.05)
            if ready:
                line = self.proc.stdout.readline().decode().strip()
                if line.startswith("geocoder listening on "):
                    self.url = line.rsplit(" ", 1)[1]
                    return self.url
        self.stop()
        raise ConfigurationError("the demo's geocoder service failed to start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def service_stats(url: str, timeout: float = 1.0) -> dict[str, int]:
    """The service's counters: {"lookups": answered, "throttled": refused with a 429}."""
    from urllib.request import urlopen

    with urlopen(f"{url}/stats", timeout=timeout) as response:
        return {k: int(v) for k, v in json.load(response).items()}


def lookups_per_code(url: str, timeout: float = 5.0) -> dict[str, int]:
    """How many lookups the service has answered for each code asked so far."""
    from urllib.request import urlopen

    with urlopen(f"{url}/codes", timeout=timeout) as response:
        return {k: int(v) for k, v in json.load(response).items()}


def lookups_served(url: str, timeout: float = 1.0) -> int:
    """How many lookups the service has answered (for a progress bar)."""
    return service_stats(url, timeout)["lookups"]


if __name__ == "__main__":
    main()
