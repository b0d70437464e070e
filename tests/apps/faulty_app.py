"""A real worker app (run it under uvicorn) that answers a share of its POSTs 503 (or
FAULT_STATUS, e.g. 429), as an overloaded instance or a platform at its instance limit does.
FAULT_503_RATE sets the share."""

from __future__ import annotations

import os
import random
from typing import Any

import serverless
from tests import sample_functions  # noqa: F401  (registers the functions it serves)

RATE = float(os.environ.get("FAULT_503_RATE", "0.2"))
STATUS = int(os.environ.get("FAULT_STATUS", "503"))
_worker = serverless.init("/serverless").asgi()
_rng = random.Random(os.getpid())


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["method"] == "POST" and _rng.random() < RATE:
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": STATUS, "headers": headers})
        await send({"type": "http.response.body", "body": b"overloaded, try again"})
        return
    await _worker(scope, receive, send)
