"""A FastAPI app with the worker route mounted in one line, as ASGI middleware.

uvicorn tests.apps.fastapi_app:app
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Response

import serverless
from tests import sample_functions  # the functions this app's workers run

SECRET = os.environ["SERVERLESS_SECRET"]

app = FastAPI()
app.add_middleware(serverless.init("/serverless", SECRET).asgi)


@app.get("/square")
def square(n: int, response: Response) -> list[int]:
    # A sync view: FastAPI runs it in its thread pool, so blocking on the chunks does not
    # block the event loop that serves them.
    result, stats = sample_functions.square.with_stats(list(range(n)))
    response.headers["X-Serverless-Target"] = stats.target
    response.headers["X-Serverless-Processes"] = str(stats.processes)
    return result


@app.get("/nested")
def nested(n: int = 100) -> list[int]:
    # a parallel call whose chunks make parallel calls: every level calls back into this app
    return sample_functions.nested_calls(list(range(n)))


@app.get("/pid")
def pid() -> int:
    return os.getpid()


@app.get("/aio")
async def aio(n: int = 400, seconds: float = 0.01, burn: bool = False) -> int:
    # an async view: the call is awaited on the app's own loop, its chunks sent back to it
    # (burn: each item burns the CPU that long, else it sleeps)
    items = [seconds if burn else -seconds] * n
    results = await sample_functions.burn_or_sleep.aio(items)
    return len(results)
