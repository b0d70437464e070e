"""A Flask app that traces itself with the OpenTelemetry SDK and calls back into itself.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://... gunicorn -k gthread --threads 16 -w 2 \
        tests.apps.traced_app:app

The app sets up its SDK as an application does (a TracerProvider exporting over OTLP/HTTP,
every setting from the OTEL_* environment); the library finds it there. /traced?n=K opens a
span of the view's own, then calls tests.telemetry_functions.traced, whose chunks come back
to this app's worker route: the view, the call, its requests, their server spans and the
function's own spans all land in one trace. It answers the view span's ids.
"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify, request
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import serverless
from tests import telemetry_functions  # the functions this app's workers run

provider = TracerProvider(resource=Resource.create({"service.name": "traced-app"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tests.apps.traced_app")

app = Flask(__name__)
app.wsgi_app = serverless.init("/serverless", os.environ["SERVERLESS_SECRET"]).wsgi(  # type: ignore[method-assign]
    app.wsgi_app
)


@app.get("/traced")
def traced() -> Response:
    n = request.args.get("n", default=20, type=int)
    with tracer.start_as_current_span("view") as span:
        results = telemetry_functions.traced.with_options(chunk_size=5)(list(range(n)))
    context = span.get_span_context()
    return jsonify(
        {
            "results": results,
            "trace_id": f"{context.trace_id:032x}",
            "span_id": f"{context.span_id:016x}",
        }
    )


@app.get("/pid")
def pid() -> Response:
    return jsonify(os.getpid())
