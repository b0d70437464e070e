"""`serverless worker` that declares its capacity (its thread count) on every signed reply:
the worker half of issue 15.3, which lands on another branch; the caller's tests and
bench/flow.py use this until then. Serve with
`uvicorn --factory tests.apps.capacity_app:app` and SERVERLESS_THREADS, SERVERLESS_MODULES."""

from __future__ import annotations

import os
from typing import Any

from serverless import _wire as p
from serverless._worker import endpoint as _worker
from serverless._worker import serve as _serve

THREADS = int(os.environ.get("SERVERLESS_THREADS", "64"))
_plain = _worker.Endpoint._reply


def _declaring(
    self: _worker.Endpoint,
    status: int,
    reply: p.Reply,
    fmt: str,
    signer: tuple[str, str] | None = None,
) -> p.Response:
    if reply.worker:
        reply.capacity = THREADS
    return _plain(self, status, reply, fmt, signer)


setattr(_worker.Endpoint, "_reply", _declaring)  # noqa: B010 - patching the class


def app() -> Any:
    return _serve.worker_asgi()
