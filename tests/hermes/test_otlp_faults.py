"""An OTLP endpoint that is down, stalls or refuses never changes what the agent returns.

The real exporter (``opentelemetry-exporter-otlp-proto-http``'s ``OTLPSpanExporter``) behind the SDK's
``BatchSpanProcessor``, as ``opentelemetry-instrument`` sets them up, points at a loopback endpoint that fails:

* ``down``: a closed port (connection refused);
* ``stalled``: a server that accepts the connection and never answers (each attempt ends on the exporter's timeout);
* ``refusing``: HTTP 503 to every export (retryable: the exporter retries with backoff until its timeout);
* ``rejecting``: HTTP 400 to every export (not retryable: the batch is dropped).

The exporter's timeout is kept short with its own setting (``timeout``, as ``OTEL_EXPORTER_OTLP_TRACES_TIMEOUT``
would set it). Each case runs real turns (streaming with pooled tools, non-streaming, and one the LLM fails) and
compares what each returned with an uninstrumented run's; the exporter is shown to have failed, and the provider's
shutdown returns. No timing is asserted.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Sequence

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

from statebackends_hermes_testbed.driver import HermesBench
from statebackends_hermes_testbed.frontend_api import free_port
from statebackends_hermes_testbed.stack_app import outcome

EXPORT_TIMEOUT = 0.5
"""Seconds the exporter gives one export (its retries included)."""
TURNS = (
    (True, "[tools:2] [tool_ms:20]"),  # Hermes's default, streaming; two tools in its pool
    (False, "[tools:1]"),
    (False, "[llm_error]"),  # the LLM answers HTTP 400: Hermes returns a failed result
)


class CountingExporter(OTLPSpanExporter):
    """The real OTLP/HTTP exporter, keeping what each export returned, or the type of what it raised: 1.39 raises
    ``requests``' ``ConnectionError`` from ``export`` for an endpoint it cannot reach (the batch processor's worker
    catches it), 1.45 returns ``FAILURE``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.results: list[Any] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = super().export(spans)
        except Exception as exc:
            self.results.append(type(exc).__name__)
            raise
        self.results.append(result)
        return result


class StalledEndpoint:
    """Accepts every connection on 127.0.0.1 and never reads or answers; all closed by :meth:`stop`."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="stalled-otlp", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:  # the timeout, or the listener closed
                continue
            self.connections.append(connection)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for connection in self.connections:
            connection.close()


class AnsweringEndpoint:
    """Answers every request with ``status`` (an OTLP/HTTP export refused or rejected), counting the requests."""

    def __init__(self, status: int) -> None:
        self.requests = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                endpoint.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def endpoint(fault: str) -> Iterator[Any]:
    """A failing OTLP/HTTP endpoint on 127.0.0.1 (its ``url``), stopped after the block."""
    if fault == "down":
        class Closed:
            url = f"http://127.0.0.1:{free_port()}"

        yield Closed()
        return
    server: Any = StalledEndpoint() if fault == "stalled" else AnsweringEndpoint(503 if fault == "refusing" else 400)
    try:
        yield server
    finally:
        server.stop()


def turns(bench: HermesBench, tag: str) -> list[Any]:
    """What each turn of :data:`TURNS` returned (as :func:`stack_app.outcome` reduces it), or what it raised."""
    got: list[Any] = []
    for n, (streaming, directives) in enumerate(TURNS):
        agent = bench.agent(streaming=streaming)
        try:
            got.append(outcome(bench.call(agent, f"{tag}{n}", directives)))
        except Exception as exc:  # noqa: BLE001 - compared with the uninstrumented run's
            got.append(("raised", type(exc).__name__, str(exc)))
    return got


@pytest.mark.parametrize("fault", ["down", "stalled", "refusing", "rejecting"])
def test_a_failing_otlp_endpoint_changes_nothing_the_agent_returns(bench: HermesBench, fault: str) -> None:
    reference = turns(bench, fault)
    bench.reset()
    with endpoint(fault) as server:
        exporter = CountingExporter(endpoint=f"{server.url}/v1/traces", timeout=EXPORT_TIMEOUT)
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50, max_export_batch_size=8))
        bench.instrumentor.instrument(tracer_provider=provider, state_backend="invocation_id")
        store = bench.instrumentor.store
        try:
            got = turns(bench, fault)
            assert store.live() == 0
        finally:
            bench.uninstrument()
            provider.shutdown()  # returns: each export it waits for ends on the exporter's own timeout
    assert got == reference
    assert [t["final_response"] for t in got[:2]] == [f"done {fault}0", f"done {fault}1"]
    assert got[2]["failed"] is True
    assert exporter.results and SpanExportResult.SUCCESS not in exporter.results, "the endpoint really failed"
    if fault == "stalled":
        assert server.connections, "the exporter connected and waited"
    elif fault != "down":
        assert server.requests > 0
