"""A local pool's worker process: it imports the caller's modules, then serves the worker
route under uvicorn on the Unix domain socket the pool names, in its private directory (or,
where there is none, on a loopback port); see pool.py for the caller's side.

It never imports the caller's main script, so a script's top-level work never runs here: the
functions of `__main__` come by value, checked before unpickling (byvalue.py). A worker dies
with its parent (PR_SET_PDEATHSIG plus a watchdog). Its chunks' spans go where the
environment's OTEL_* settings say (_worker/telemetry.py); it serves no metrics: nothing but
its caller can reach its socket, and the caller's own figures cover its calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._caller import http as _http
from .._wire import Keyring
from .byvalue import Shelf

logger = logging.getLogger("serverless.pool")


def child() -> None:
    """Entry point of a local worker process: its configuration arrives on stdin."""
    config: dict[str, Any] = json.loads(sys.stdin.buffer.read())
    sys.path[:] = config["sys_path"]
    _die_with_parent(config["parent"])
    from .._worker.telemetry import configure_sdk

    configure_sdk()  # spans over OTLP where the environment asks (flushed as it stops)
    for name in config["modules"]:
        if name != "__main__":
            try:
                importlib.import_module(name)
            except Exception:
                logger.exception("local worker cannot import %s", name)
    import uvicorn

    from .._worker.asgi import ASGIEndpoint
    from .._worker.endpoint import Endpoint
    from .._worker.origin import OriginPolicy
    from .._worker.uvserver import raise_open_files_limit, uvicorn_settings
    from .modules import announced

    importable = announced(config["modules_file"])
    # A request runs on at most one of the pool's workers: each runs only the request ids
    # signed for its slot (a request captured to one worker ran again on another, before),
    # remembered per process, and a replacement none signed before it started (its cache
    # died with the one it replaced). A host-wide SQLite store did the same for 0.08 ms a
    # call (W3 0.50 -> 0.58 ms). A call made while serving a chunk calls back to this worker,
    # under its slot's name, over its socket: never an origin from the caller's environment
    # or from a request.
    started = time.time()
    url = config["url"]
    endpoint = Endpoint(
        config["route"],
        Keyring(config["secret"]),
        importable=importable,
        origins=OriginPolicy(self_url=url),
        shared_replay=False,
        id_prefix=config["id_prefix"],
        not_before=started,
        by_value=Shelf(Path(config["code_dir"])),
    )
    app = ASGIEndpoint(endpoint, threads=config["threads"])
    raise_open_files_limit()  # a call 10,000 wide holds 10,000 connections to the pool
    if config.get("unix"):
        sockets = [unix_listening_socket(config["unix"])]
        port = 0
        _http.reach_privately(urlsplit(url).hostname or "", config["unix"])
    else:
        sockets = [listening_socket()]
        port = int(sockets[0].getsockname()[1])
        _http.reach_privately(urlsplit(url).hostname or "", port)
    uvicorn_config = uvicorn.Config(
        app,
        lifespan="on",  # its shutdown flushes the last spans
        access_log=False,
        log_level="warning",
        loop="asyncio",
        backlog=4096,
        **uvicorn_settings(),
    )
    server = uvicorn.Server(uvicorn_config)
    os.write(config["port_fd"], f"{port}\n".encode())
    os.close(config["port_fd"])
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(server.serve(sockets=sockets))


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed. Its thread hop (run_in_executor, which every chunk of a sync
    function takes) measured ~140 us against asyncio's ~195 us here. uvicorn.Config(loop=)
    alone does not choose it: that applies to uvicorn.run, not to serve() on our sockets."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows, or a trimmed install
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket for uvicorn.

    proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the
    listening socket names TCP explicitly; without it every response whose headers and body
    go out in two writes waits ~40 ms for the client's delayed ACK (Nagle).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


def unix_listening_socket(path: str) -> socket.socket:
    """A listening Unix domain socket at `path`, in the pool's private (0700) directory: only
    this user reaches it, where any local user reaches a loopback port."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a worker this one replaces
    sock.bind(path)
    sock.listen(4096)
    return sock


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="serverless-parent-watch", daemon=True).start()
