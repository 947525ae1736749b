"""The scripted fake LLM as a WSGI application, served by the stdlib's ``wsgiref`` on 127.0.0.1: a traced LLM endpoint.

    opentelemetry-instrument python -m statebackends_hermes_testbed.fakellm_wsgi --traced

The testbed's :class:`~statebackends_hermes_testbed.fakellm.FakeLLMServer` is a ``http.server`` handler, for
which OpenTelemetry has no instrumentation. WSGI is the stdlib's other server interface, and
``opentelemetry-instrumentation-wsgi`` (in ``opentelemetry-bootstrap``'s default set) is the contrib server
instrumentation that fits it: its ``OpenTelemetryMiddleware`` wraps any WSGI app, reads the request's W3C
``traceparent`` and opens a SERVER span for it, as a traced LLM gateway (LiteLLM, vLLM) does. ``--traced``
wraps the app in it, on the global tracer provider (the one ``opentelemetry-instrument`` sets up).

The application answers as the HTTP server does, from a :class:`~statebackends_hermes_testbed.fakellm.Script` (the
command uses :class:`~statebackends_hermes_testbed.frontend_acp.TurnScript`, which plans from the latest user
message: Hermes's API server re-sends a session's history with every turn):
``GET /v1/models``, ``GET /v1/models/<name>``, ``POST /v1/chat/completions`` (JSON, or server-sent events).
It prints one line, ``fake LLM (wsgi) serving on http://127.0.0.1:PORT/v1``, and serves until SIGTERM or Ctrl-C;
then it prints one JSON line of what it served (:func:`records`).
"""

from __future__ import annotations

import argparse
import http
import json
import signal
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable, Optional, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .fakellm import CONTEXT_LENGTH, DEFAULT_MODELS, Script, iter_sse

__all__ = ["FakeLLMApp", "main", "records", "serve", "traced"]

_JSON = [("Content-Type", "application/json")]


class FakeLLMApp:
    """A WSGI application answering OpenAI chat completions from a :class:`Script` (``script.plan`` decides each)."""

    def __init__(self, script: Optional[Script] = None, models: Sequence[str] = DEFAULT_MODELS) -> None:
        self.script = script or Script()
        self.models = tuple(models)

    @staticmethod
    def _model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "fakellm",
                "context_length": CONTEXT_LENGTH, "max_model_len": CONTEXT_LENGTH}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), (environ.get("PATH_INFO") or "/").rstrip("/")

        def answer(status: str, body: Any) -> list[bytes]:
            start_response(status, _JSON)
            return [json.dumps(body).encode()]

        if method == "GET" and path == "/v1/models":
            return answer("200 OK", {"object": "list", "data": [self._model(m) for m in self.models]})
        if method == "GET" and path.startswith("/v1/models/"):
            return answer("200 OK", self._model(path[len("/v1/models/"):]))
        if method != "POST" or path not in ("/v1/chat/completions", "/chat/completions"):
            return answer("404 Not Found", {"error": {"message": f"not found: {path}", "type": "not_found"}})
        try:
            size = int(environ.get("CONTENT_LENGTH") or 0)
            request = json.loads(environ["wsgi.input"].read(size) or b"{}")
        except ValueError:
            return answer("400 Bad Request", {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
        reply = self.script.plan(request, environ.get("HTTP_TRACEPARENT"))
        if reply.delay_ms:
            time.sleep(reply.delay_ms / 1000.0)
        if reply.error is not None:
            return answer(f"{reply.status} {http.HTTPStatus(reply.status).phrase}", reply.error_body())
        if not reply.stream:
            return answer("200 OK", reply.completion())
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        return iter_sse(reply)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # Hermes probes the endpoint with several requests at once when it builds an agent


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return


def traced(app: Callable[..., Any]) -> Callable[..., Any]:
    """``app`` wrapped in opentelemetry-instrumentation-wsgi's ``OpenTelemetryMiddleware`` (the global provider)."""
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app)


def serve(app: Callable[..., Any], port: int = 0) -> WSGIServer:
    """A threading ``wsgiref`` server for ``app`` bound to ``127.0.0.1:port`` (not yet serving)."""
    return make_server("127.0.0.1", port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until SIGTERM or Ctrl-C; 0 when stopped that way."""
    parser = argparse.ArgumentParser(prog="python -m statebackends_hermes_testbed.fakellm_wsgi",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default 0: a free one)")
    parser.add_argument("--traced", action="store_true",
                        help="wrap the app in opentelemetry-instrumentation-wsgi's OpenTelemetryMiddleware")
    args = parser.parse_args(argv)
    from .frontend_acp import TurnScript

    fake = FakeLLMApp(TurnScript())  # each turn of a session re-sends its history: plan from the latest user message
    app: Callable[..., Any] = traced(fake) if args.traced else fake
    server = serve(app, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    worker.start()
    print(f"fake LLM (wsgi) serving on http://127.0.0.1:{server.server_port}/v1", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    print(json.dumps(records(fake.script)), flush=True)
    return 0  # the interpreter's exit then flushes the tracer provider opentelemetry-instrument set up


def records(script: Script) -> dict[str, Any]:
    """What ``script`` served, per conversation tag: response ids, token sums and the ``traceparent`` of each chat
    request (the truth a test judges by)."""
    return {"served": {tag: {"response_ids": [e.response_id for e in script.log(tag)],
                             "input_tokens": script.totals(tag)[0], "output_tokens": script.totals(tag)[1],
                             "traceparents": [header for header, _ in script.requests(tag)]}
                       for tag in script.tags()}}


if __name__ == "__main__":
    raise SystemExit(main())
