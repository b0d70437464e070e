"""A FastAPI app whose async view makes a blocking parallel call on its own event loop.

uvicorn tests.apps.errors_app:app
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

import serverless
from tests import sample_functions

app = FastAPI()
app.add_middleware(serverless.init("/serverless", os.environ["SERVERLESS_SECRET"]).asgi)


@app.get("/blocking")
async def blocking(n: int = 10) -> PlainTextResponse:
    # wrong: f(items) blocks the loop that would serve the chunks; `await f.aio(items)` is right
    try:
        return PlainTextResponse(str(sample_functions.square(list(range(n)))))
    except serverless.ConfigurationError as exc:
        return PlainTextResponse(str(exc), status_code=500)


@app.get("/pid")
def pid() -> int:
    return os.getpid()
