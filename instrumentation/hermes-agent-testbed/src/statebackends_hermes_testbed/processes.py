"""Real processes for the stack tests: commands run to their end, and services that print a ready line.

Every process gets an environment cleaned of ``OTEL_*``, ``STATEBACKENDS_*`` and ``PHOENIX_*`` variables, with a
throw-away ``HOME``/``HERMES_HOME`` (:func:`clean_environment`), so nothing of the caller's set-up leaks in. A
:class:`Service` runs in a process group of its own and is stopped with SIGTERM (then SIGKILL) by :meth:`Service.stop`,
which a caller puts in a ``finally``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["BIN", "INSTRUMENT", "Service", "clean_environment", "last_json", "run"]

BIN = Path(sys.executable).parent
"""The environment's scripts: ``python``, ``opentelemetry-instrument``, ``opentelemetry-bootstrap``."""
INSTRUMENT = BIN / "opentelemetry-instrument"


def clean_environment(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any ``OTEL_``/``STATEBACKENDS_``/``PHOENIX_`` variable or ``PYTHONPATH``,
    with a throw-away ``HOME``/``HERMES_HOME`` under ``home``, spans exported in batches every 200 ms, no metrics or
    logs exported (``OTEL_METRICS_EXPORTER``/``OTEL_LOGS_EXPORTER=none``), plus ``extra``."""
    (home / ".hermes").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "STATEBACKENDS_", "PHOENIX_")) and k != "PYTHONPATH"}
    env.update(HOME=str(home), HERMES_HOME=str(home / ".hermes"), OTEL_BSP_SCHEDULE_DELAY="200",
               OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(argv: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; raise ``AssertionError`` with its output if it exits non-zero."""
    out = subprocess.run(list(argv), env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{argv} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def last_json(lines: Sequence[str]) -> Any:
    """The last line of ``lines`` that is a JSON object, parsed."""
    for line in reversed(lines):
        if line.lstrip().startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in {list(lines)[-5:]}")


class Service:
    """A long-running command whose first stdout line says it is ready; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        self.argv = list(argv)
        self.stdout: list[str] = []
        self.stderr = ""
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.process = subprocess.Popen(self.argv, env=dict(env), cwd=cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                        start_new_session=True)
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()

    def ready_line(self, timeout: float = 120) -> str:
        """The first line it printed; if it exits or stays silent, it is stopped and ``AssertionError`` says why."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        if line is None:
            self.stop()
            raise AssertionError(f"{self.argv} printed no ready line:\n{self.stderr[-5000:]}")
        return line.strip()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM its process group, wait up to ``timeout`` s, then SIGKILL; its exit code. Idempotent."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(10)
        for reader in self._readers:
            reader.join(10)
        return int(self.process.returncode)

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
