"""Hermes's bundled Langfuse observability plugin, enabled the way Hermes loads it, exporting to 127.0.0.1.

* :class:`OTLPSink` - a loopback HTTP server that answers every request with 200 and decodes the
  OTLP/HTTP protobuf trace posts the ``langfuse`` SDK sends (``/api/public/otel/v1/traces``) into
  :class:`ExportedSpan` records.
* :class:`LangfusePlugin` - ``enable()`` sets the plugin's credentials and base URL (the sink), lists
  ``observability/langfuse`` in ``plugins.enabled`` of ``$HERMES_HOME/config.yaml`` and re-runs Hermes's
  plugin discovery (``hermes_cli.plugins.discover_plugins(force=True)``), which imports the plugin and
  calls its ``register(ctx)`` with Hermes's ``PluginContext``; ``disable()`` shuts the SDK client down,
  restores the config, the environment and OpenTelemetry's global tracer provider (the SDK makes its own
  provider the global one when none is set), and re-runs discovery so no hook of it stays registered.

Nothing here reaches beyond 127.0.0.1: the SDK's only destination is the sink.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

from .hermes_harness import hermes_config

PLUGIN_KEY = "observability/langfuse"
PUBLIC_KEY = "pk-lf-statebackends-test"
SECRET_KEY = "sk-lf-statebackends-test"
TRACES_PATH = "/api/public/otel/v1/traces"
ENV_NAMES = ("HERMES_LANGFUSE_PUBLIC_KEY", "HERMES_LANGFUSE_SECRET_KEY", "HERMES_LANGFUSE_BASE_URL")


@dataclass(frozen=True)
class ExportedSpan:
    """One span as the Langfuse SDK exported it (ids as ints, like the SDK's span contexts)."""

    scope: str
    name: str
    trace_id: int
    span_id: int
    parent_span_id: Optional[int]
    attributes: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in any_value.array_value.values)
    return getattr(any_value, kind) if kind else None


class OTLPSink:
    """Loopback HTTP sink: 200 to everything, OTLP trace posts to ``traces_path`` kept and decoded.

    ``traces_path`` is the Langfuse SDK's by default; an OTLP/HTTP exporter's own is ``/v1/traces``.
    """

    def __init__(self, traces_path: str = TRACES_PATH) -> None:
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._bodies: list[bytes] = []
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
                    if self.path == traces_path:
                        sink._bodies.append(raw)
                self._reply()

            def do_GET(self) -> None:  # noqa: N802
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
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> "OTLPSink":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._bodies.clear()

    def _received(self) -> Iterator[tuple[Any, Any]]:
        """``(scope_spans, span)`` protobuf messages of every span received so far."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        with self._lock:
            bodies = list(self._bodies)
        for body in bodies:
            for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        yield scope_spans, s

    def readable_spans(self) -> list[Any]:
        """Every span received so far as an SDK ``ReadableSpan`` (what :func:`traces.judge` reads)."""
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

        def context(trace_id: bytes, span_id: bytes) -> SpanContext:
            return SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"), is_remote=False)

        return [
            ReadableSpan(
                name=s.name,
                context=context(s.trace_id, s.span_id),
                parent=context(s.trace_id, s.parent_span_id) if s.parent_span_id else None,
                attributes={a.key: _value(a.value) for a in s.attributes},
                kind=SpanKind(max(s.kind - 1, 0)),  # OTLP counts from UNSPECIFIED = 0, the API from INTERNAL = 0
                status=Status(StatusCode(s.status.code), s.status.message or None),
                start_time=s.start_time_unix_nano,
                end_time=s.end_time_unix_nano,
            )
            for _, s in self._received()
        ]

    def spans(self) -> list[ExportedSpan]:
        """Every span received so far, decoded."""
        return [
            ExportedSpan(
                scope=scope_spans.scope.name,
                name=s.name,
                trace_id=int.from_bytes(s.trace_id, "big"),
                span_id=int.from_bytes(s.span_id, "big"),
                parent_span_id=int.from_bytes(s.parent_span_id, "big") if s.parent_span_id else None,
                attributes={a.key: _value(a.value) for a in s.attributes},
            )
            for scope_spans, s in self._received()
        ]


class LangfusePlugin:
    """Hermes's ``observability/langfuse`` plugin, enabled through Hermes's own plugin discovery."""

    def __init__(self, sink: OTLPSink) -> None:
        self.sink = sink
        self.module: Any = None
        self._saved_env: dict[str, Optional[str]] = {}
        self._config = contextlib.ExitStack()  # holds hermes_config() open while enabled
        self._saved_provider: Any = None
        self._saved_provider_done: Optional[bool] = None

    def enable(self) -> "LangfusePlugin":
        from opentelemetry import trace

        # OpenTelemetry's global tracer provider, to put back (the SDK sets its own when none is set).
        self._saved_provider = trace._TRACER_PROVIDER
        self._saved_provider_done = trace._TRACER_PROVIDER_SET_ONCE._done
        self._saved_env = {name: os.environ.get(name) for name in ENV_NAMES}
        os.environ.update(HERMES_LANGFUSE_PUBLIC_KEY=PUBLIC_KEY, HERMES_LANGFUSE_SECRET_KEY=SECRET_KEY,
                          HERMES_LANGFUSE_BASE_URL=self.sink.base_url)
        # What `hermes plugins enable observability/langfuse` writes: the key in plugins.enabled.
        self._config.enter_context(hermes_config(lambda old: (old or "") + f"plugins:\n  enabled:\n  - {PLUGIN_KEY}\n"))
        self.reload()
        return self

    def reload(self) -> Any:
        """Re-run Hermes's plugin discovery (a fresh import of the plugin, whose client is then made anew)."""
        from hermes_cli import plugins

        plugins.discover_plugins(force=True)
        loaded = plugins.get_plugin_manager()._plugins.get(PLUGIN_KEY)
        if loaded is None or not loaded.enabled or loaded.error:
            raise RuntimeError(f"Hermes did not load {PLUGIN_KEY}: {loaded and loaded.error}")
        self.module = next(m for name, m in sys.modules.items()
                           if name.endswith("observability__langfuse") and hasattr(m, "on_pre_llm_request"))
        return self.module

    def hook_owners(self) -> dict[str, list[str]]:
        """Hermes's registered hooks: hook name -> modules of the callbacks."""
        from hermes_cli import plugins

        return {hook: [getattr(cb, "__module__", "?") for cb in cbs]
                for hook, cbs in plugins.get_plugin_manager()._hooks.items()}

    @property
    def client(self) -> Any:
        """The plugin's cached ``Langfuse`` client (None until its first hook ran)."""
        client = getattr(self.module, "_LANGFUSE_CLIENT", None)
        return client if client is not None and client is not getattr(self.module, "_INIT_FAILED", None) else None

    def flush(self) -> None:
        if self.client is not None:
            self.client.flush()

    def open_turns(self) -> int:
        """Turns the plugin still keeps state for (its ``_TRACE_STATE``)."""
        return len(self.module._TRACE_STATE)

    def disable(self) -> None:
        from opentelemetry import trace
        from hermes_cli import plugins

        if self.client is not None:
            try:
                self.client.shutdown()
            finally:
                self.module._LANGFUSE_CLIENT = None
        try:
            from langfuse._client.resource_manager import LangfuseResourceManager

            LangfuseResourceManager._instances.pop(PUBLIC_KEY, None)
        except Exception:  # noqa: BLE001 - an SDK without that registry has nothing to forget
            pass
        self._config.close()  # the config.yaml of before
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        plugins.discover_plugins(force=True)
        trace._TRACER_PROVIDER = self._saved_provider
        trace._TRACER_PROVIDER_SET_ONCE._done = bool(self._saved_provider_done)
