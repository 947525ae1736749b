"""An OTLP/HTTP trace receiver on 127.0.0.1: what an integration that sets up its own exporter sends, decoded.

:class:`OTLPSink` answers every request with 200 and keeps the bodies POSTed to any path ending in
``/v1/traces`` (the OTLP/HTTP path; Langfuse's SDK posts to ``/api/public/otel/v1/traces``). Bodies are
``ExportTraceServiceRequest`` messages of ``opentelemetry-proto``, binary protobuf or OTLP/JSON (hex ids), gzip
or not. :meth:`OTLPSink.spans` gives them as :class:`ExportedSpan` records; :meth:`OTLPSink.readable_spans` as the
SDK's ``ReadableSpan``, which the trace judge reads like the spans of an in-memory exporter.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

TRACES_SUFFIX = "/v1/traces"


@dataclass(frozen=True)
class ExportedSpan:
    """One span as an exporter sent it (ids as ints, like the SDK's span contexts)."""

    scope: str
    name: str
    trace_id: int
    span_id: int
    parent_span_id: Optional[int]
    attributes: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    status_code: int = 0
    """OTLP's status code: 0 unset, 1 ok, 2 error."""
    status_message: str = ""
    kind: int = 0
    """OTLP's span kind (0 unspecified, 1 internal, 2 server, 3 client, ...)."""
    start_time: int = 0
    end_time: int = 0

    def readable(self) -> Any:
        """This span as an SDK ``ReadableSpan`` (status, kind, ids, attributes, times and scope)."""
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        flags = TraceFlags(TraceFlags.SAMPLED)
        parent = (
            SpanContext(self.trace_id, self.parent_span_id, is_remote=False, trace_flags=flags)
            if self.parent_span_id
            else None
        )
        code = {1: StatusCode.OK, 2: StatusCode.ERROR}.get(self.status_code, StatusCode.UNSET)
        return ReadableSpan(
            name=self.name,
            context=SpanContext(self.trace_id, self.span_id, is_remote=False, trace_flags=flags),
            parent=parent,
            attributes=self.attributes,
            status=Status(code, self.status_message or None) if code is StatusCode.ERROR else Status(code),
            kind=SpanKind(max(0, self.kind - 1)) if self.kind else SpanKind.INTERNAL,
            start_time=self.start_time or None,
            end_time=self.end_time or None,
            instrumentation_scope=InstrumentationScope(self.scope),
        )


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in any_value.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, kind) if kind else None


def _hex_ids_to_base64(data: Any) -> Any:
    """OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping reads bytes as base64."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key in ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id") and isinstance(value, str):
                value = base64.b64encode(bytes.fromhex(value)).decode() if value else ""
            out[key] = _hex_ids_to_base64(value)
        return out
    if isinstance(data, list):
        return [_hex_ids_to_base64(v) for v in data]
    return data


def decode_traces(body: bytes, content_type: str = "application/x-protobuf") -> list[ExportedSpan]:
    """The spans of one OTLP/HTTP trace export body (protobuf, or JSON when ``content_type`` says so)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    if "json" in (content_type or ""):
        from google.protobuf import json_format

        request = json_format.ParseDict(_hex_ids_to_base64(json.loads(body or b"{}")), ExportTraceServiceRequest(),
                                        ignore_unknown_fields=True)
    else:
        request = ExportTraceServiceRequest.FromString(body)
    out: list[ExportedSpan] = []
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(ExportedSpan(
                    scope=scope_spans.scope.name,
                    name=s.name,
                    trace_id=int.from_bytes(s.trace_id, "big"),
                    span_id=int.from_bytes(s.span_id, "big"),
                    parent_span_id=int.from_bytes(s.parent_span_id, "big") if s.parent_span_id else None,
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    status_code=int(s.status.code),
                    status_message=s.status.message,
                    kind=int(s.kind),
                    start_time=int(s.start_time_unix_nano),
                    end_time=int(s.end_time_unix_nano),
                ))
    return out


class OTLPSink:
    """Loopback HTTP sink: 200 to everything, OTLP trace posts kept and decoded: those to ``traces_path``, or, by
    default, to any path ending in ``/v1/traces`` (an OTLP/HTTP exporter's own, Langfuse's SDK's)."""

    def __init__(self, traces_path: Optional[str] = None) -> None:
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._bodies: list[tuple[bytes, str]] = []  # (body, content type) of every trace post
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, body: bytes = b"") -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf" if not body else "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                with sink._lock:
                    sink.requests.append(("POST", self.path))
                    path = self.path.split("?", 1)[0]
                    if path == traces_path if traces_path else path.endswith(TRACES_SUFFIX):
                        sink._bodies.append((raw, self.headers.get("Content-Type") or ""))
                self._reply()

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with sink._lock:
                    sink.requests.append(("GET", self.path))
                self._reply(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: an OTLP/HTTP endpoint (the exporter appends ``/v1/traces``)."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> "OTLPSink":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def clear(self) -> None:
        """Forget every request and span received so far."""
        with self._lock:
            self.requests.clear()
            self._bodies.clear()

    def spans(self) -> list[ExportedSpan]:
        """Every span received so far, decoded."""
        with self._lock:
            bodies = list(self._bodies)
        return [span for body, content_type in bodies for span in decode_traces(body, content_type)]

    def readable_spans(self) -> list[Any]:
        """Every span received so far, as SDK ``ReadableSpan`` objects."""
        return [span.readable() for span in self.spans()]
