"""Arize Phoenix as a real trace backend on loopback: ``phoenix serve`` in a subprocess, read through its REST API.

:class:`Phoenix` starts the ``phoenix`` command of an environment of its own (``pip install arize-phoenix``: about
860 MB, with OpenTelemetry pins of its own, so it is never installed beside ours) on two free ports of 127.0.0.1,
the UI, REST API and OTLP/HTTP (``/v1/traces``) on one, OTLP/gRPC on the other, with a throw-away working folder
and with its telemetry and every external resource switched off, so nothing leaves the machine. Spans sent there
go to the Phoenix project named by the resource attribute ``openinference.project.name`` (else ``default``).

What the tests read (Phoenix's REST API, ``/v1/...``): :meth:`spans` (one dict per span: ``name``,
``context.trace_id``/``span_id``, ``parent_id``, ``span_kind`` as Phoenix maps it: AGENT, LLM, TOOL or
UNKNOWN, ``attributes`` with Phoenix's own ``llm.*``/``session.id`` keys beside ours), :meth:`traces` (token
counts per trace) and :meth:`sessions` (traces grouped by ``session.id``, which Phoenix takes from
``gen_ai.conversation.id``). Phoenix ingests in the background: :meth:`wait_for_spans` polls until what was sent
has arrived.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["Phoenix", "PhoenixError", "free_port"]

START_TIMEOUT = 180.0
"""Seconds ``phoenix serve`` may take to answer ``/healthz`` (it runs its database migrations first)."""


class PhoenixError(RuntimeError):
    """Phoenix could not be started or did not answer as expected."""


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Phoenix:
    """``phoenix serve`` (the executable ``command``) on free loopback ports, its data and log under ``folder``."""

    def __init__(self, command: str | os.PathLike[str], folder: str | os.PathLike[str]) -> None:
        self.command = str(command)
        self.folder = Path(folder)
        self.port = 0
        self.grpc_port = 0
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.log_path = self.folder / "phoenix.log"

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> "Phoenix":
        """Start Phoenix and wait until ``/healthz`` answers; raise :class:`PhoenixError` (with its log) if it does not."""
        if not Path(self.command).is_file():
            raise PhoenixError(
                f"the Phoenix command {self.command!r} does not exist: install Arize Phoenix in an environment of its "
                "own (python3 -m venv .venv-phoenix && .venv-phoenix/bin/pip install -r requirements-phoenix.txt) "
                "or name its `phoenix` executable in STATEBACKENDS_PHOENIX"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port, self.grpc_port = free_port(), free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_"))},
            "PHOENIX_WORKING_DIR": str(self.folder / "data"),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(self.grpc_port),
            "PHOENIX_TELEMETRY_ENABLED": "false",
            "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
            "PHOENIX_LOGGING_LEVEL": "warning",
            "PHOENIX_DB_LOGGING_LEVEL": "warning",
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([self.command, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise PhoenixError(f"phoenix serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        self.stop()
        raise PhoenixError(f"phoenix serve did not answer /healthz within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop Phoenix (SIGTERM to its process group, then SIGKILL); idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(10)

    def __enter__(self) -> "Phoenix":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, size: int = 4000) -> str:
        """The end of Phoenix's own output."""
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    # -- where to send ----------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: the UI, the REST API and, as ``OTEL_EXPORTER_OTLP_ENDPOINT``, OTLP/HTTP."""
        return f"http://127.0.0.1:{self.port}"

    def otlp_environment(self, project: str, service: str) -> dict[str, str]:
        """The standard ``OTEL_*`` variables that send a process's traces here, into ``project``, as ``service``."""
        return {
            "OTEL_SERVICE_NAME": service,
            "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={project}",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.base_url,
        }

    # -- REST -------------------------------------------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        """``GET /v1/<path>`` with ``params`` (None values left out), as JSON."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None}, doseq=True)
        url = f"{self.base_url}/v1/{path.lstrip('/')}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise PhoenixError(f"GET {url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None

    def _all(self, path: str, **params: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.get(path, cursor=cursor, limit=1000, **params)
            out.extend(page.get("data") or [])
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def projects(self) -> list[str]:
        """The names of Phoenix's projects."""
        return [p["name"] for p in self._all("projects")]

    def spans(self, project: str, **filters: Any) -> list[dict[str, Any]]:
        """Every span of ``project`` (``trace_id=...``, ``span_kind=...``, ``name=...`` filter), an empty list if
        the project does not exist yet."""
        if project not in self.projects():
            return []
        return self._all(f"projects/{urllib.parse.quote(project)}/spans", **filters)

    def traces(self, project: str, **filters: Any) -> list[dict[str, Any]]:
        """Every trace of ``project`` (``trace_id``, token counts; ``session_identifier=...`` filters)."""
        return self._all(f"projects/{urllib.parse.quote(project)}/traces", **filters)

    def sessions(self, project: str) -> list[dict[str, Any]]:
        """Every session of ``project``: ``session_id``, its ``traces`` and token counts."""
        return self._all(f"projects/{urllib.parse.quote(project)}/sessions")

    def wait_for_spans(self, project: str, done: Callable[[list[dict[str, Any]]], bool],
                       timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll :meth:`spans` until ``done(spans)`` holds and the count stopped growing; the spans (as they are at the
        timeout, if it passes: the caller's asserts then say what is missing)."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while True:
            spans = self.spans(project)
            if done(spans) and len(spans) == len(last):
                return spans
            if time.monotonic() >= deadline:
                return spans
            last = spans
            time.sleep(0.5)
