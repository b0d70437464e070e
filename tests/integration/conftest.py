"""Fixtures of the integration tests that start a real server of their own."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, serving

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Debian's redis-server on loopback with a random password, nothing saved to disk;
    yields its URL (redis://:password@127.0.0.1:port/0) and the process, killed at the end."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (scripts/system-deps installs it)")
    port = free_port()
    password = secrets.token_hex(16)
    proc = subprocess.Popen(
        [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--requirepass", password,
            "--dir", str(folder),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    with serving(proc, port, grace=0):  # grace 0: SIGTERM, then SIGKILL at once
        yield f"redis://:{password}@127.0.0.1:{port}/0", proc


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A fresh Redis server for the test, behind a password: its URL."""
    with redis_server(tmp_path) as (url, _):
        yield url


# -- an OpenTelemetry collector's front door: OTLP/HTTP traces, decoded ----------------------


class OtlpReceiver:
    """An OTLP/HTTP receiver on loopback: it takes what exporters POST to /v1/traces
    (protobuf `ExportTraceServiceRequest`, gzipped or not), keeps every span, and answers as a
    collector does. Point a process at it with OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url.

    Each span is a dict: trace_id, span_id, parent_span_id ("" for a root) as lower-case hex;
    name; kind ("SERVER", "CLIENT", "INTERNAL", ...); attributes (a dict of plain values);
    events and links (lists of dicts with their attributes); status ("UNSET", "OK",
    "ERROR") and status_message; service (the resource's service.name); start_ns, end_ns."""

    def __init__(self) -> None:
        self._spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.requests = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._take(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _take(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
        from opentelemetry.proto.trace.v1 import trace_pb2

        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    kind = trace_pb2.Span.SpanKind.Name(span.kind)
                    status = trace_pb2.Status.StatusCode.Name(span.status.code)
                    spans.append(
                        {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": kind.removeprefix("SPAN_KIND_"),
                            "attributes": _attributes(span.attributes),
                            "events": [
                                {"name": e.name, "attributes": _attributes(e.attributes)}
                                for e in span.events
                            ],
                            "links": [
                                {
                                    "trace_id": link.trace_id.hex(),
                                    "span_id": link.span_id.hex(),
                                    "attributes": _attributes(link.attributes),
                                }
                                for link in span.links
                            ],
                            "status": status.removeprefix("STATUS_CODE_"),
                            "status_message": span.status.message,
                            "service": resource.get("service.name", ""),
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                        }
                    )
        with self._lock:
            self.requests += 1
            self._spans.extend(spans)

    def spans(self) -> list[dict[str, Any]]:
        """Every span received so far, in the order they came."""
        with self._lock:
            return list(self._spans)

    def wait(
        self, found: Callable[[list[dict[str, Any]]], bool], timeout: float = 15
    ) -> list[dict[str, Any]]:
        """The spans, once `found(spans)` holds (AssertionError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if found(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"not received in {timeout}s; got {spans}")
            time.sleep(0.05)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP trace receiver on loopback for the test (OtlpReceiver: .url, .spans(),
    .wait(found))."""
    receiver = OtlpReceiver()
    try:
        yield receiver
    finally:
        receiver.close()
