"""A Flask app with the worker route mounted in one line.

    gunicorn -k gthread --threads 16 -w 2 tests.apps.flask_app:app

/square?n=K calls tests.sample_functions.square, whose chunks go back to this very app (the
seed's call-back-to-self); /demo runs the seed's zipcode pipeline the same way.
"""

from __future__ import annotations

import os
import random
import time

from flask import Flask, Response, jsonify, request

import serverless
from tests import sample_functions  # the functions this app's workers run

SECRET = os.environ["SERVERLESS_SECRET"]

app = Flask(__name__)
app.wsgi_app = serverless.init("/serverless", SECRET).wsgi(app.wsgi_app)  # type: ignore[method-assign]


@app.get("/square")
def square() -> Response:
    n = request.args.get("n", default=10, type=int)
    result, stats = sample_functions.square.with_stats(list(range(n)))
    response = jsonify(result)
    response.headers["X-Serverless-Target"] = stats.target
    response.headers["X-Serverless-Processes"] = str(stats.processes)
    return response


@app.get("/nested")
def nested() -> Response | tuple[Response, int]:
    # a parallel call whose chunks make parallel calls: every level calls back into this app
    n = request.args.get("n", default=100, type=int)
    try:
        return jsonify(sample_functions.nested_calls(list(range(n))))
    except serverless.WorkerUnavailable as exc:  # no thread left for it: it says why
        return jsonify({"error": str(exc)}), 503


@app.get("/pid")
def pid() -> Response:
    return jsonify(os.getpid())


# -- the seed's Serverless Pipeline Demo, ported to Python 3 ----------------------------------

LATENCY = 0.01  # seconds per simulated geocoder lookup (the seed called the Maps API)


def get_address(zipcode: int) -> str | None:
    time.sleep(LATENCY)
    if zipcode % 7 == 0:  # about one code in seven does not exist
        return None
    return f"Springfield, {['IL', 'MA', 'OR', 'KY'][zipcode % 4]} {zipcode:05d}, USA"


@serverless.parallel
def geolocate(zipcodes: list[int]) -> list[str | None]:
    # run in parallel on a cluster
    return [get_address(zipcode) for zipcode in zipcodes]


@serverless.parallel
def cleanup(addresses: list[str | None]) -> filter[str]:
    # run in parallel on a cluster
    return filter(None, addresses)


@serverless.sequential
def sort(addresses: list[str]) -> list[str]:
    # run in one thread in the current process
    return sorted(addresses)


pipeline = serverless.Pipeline(geolocate, cleanup, sort)


@app.get("/demo")
def demo() -> Response:
    count = request.args.get("count", default=300, type=int)
    rng = random.Random(request.args.get("seed", default=None, type=int))
    zipcodes = [rng.randint(10000, 99999) for _ in range(count)]
    run = pipeline.execute(zipcodes)
    regular = run.compute_s  # measured: the workers' compute time, as if run serially
    lines = [
        "*Serverless Pipeline Demo*",
        f"Number of zipcodes = {count}",
        f"Regular duration = {regular:.2f}s",
        f"Parallel duration = {run.duration:.2f}s",
        f"Speedup = {regular / run.duration:.1f}X",
        "Details per pipeline step:",
        *(f"  {n} - {step.line()}" for n, step in enumerate(run.steps, 1)),
        "",
        *run.result,
    ]
    response = Response("\n".join(lines) + "\n", mimetype="text/plain")
    response.headers["X-Serverless-Targets"] = ",".join(step.target for step in run.steps)
    return response


@app.get("/sleepy")
def sleepy() -> Response:
    # n items of `seconds` each, sent back to this app; says how its chunks ran
    n = request.args.get("n", default=400, type=int)
    seconds = request.args.get("seconds", default=0.05, type=float)
    result, stats = sample_functions.sleepy.with_stats([seconds] * n)
    response = jsonify(len(result))
    response.headers["X-Serverless-Chunks"] = str(len(stats.chunks))
    response.headers["X-Serverless-Inline"] = str(stats.inline)
    return response
