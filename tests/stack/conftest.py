"""The tests of the stack users run: run in the ``field`` environment (requirements-field.txt), not by the README's test
command (pyproject's ``--ignore=tests/stack``); ``.ci/run`` runs them with ``pytest tests/stack``.

Processes started by these tests are real (:mod:`statebackends_hermes_testbed.processes`): Hermes apps under
``opentelemetry-instrument``, Hermes's API server, the fake LLM behind OpenTelemetry's WSGI middleware, Phoenix. Each
listens on 127.0.0.1 only, gets a throw-away ``HOME`` and ``HERMES_HOME``, and is stopped (SIGTERM, then SIGKILL) in a
``finally``, whatever the test did.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from statebackends_hermes_testbed.driver import ensure_hermes_home
from statebackends_hermes_testbed.netguard import _loopback_only, _network_guard  # noqa: F401 - autouse fixtures
from statebackends_hermes_testbed.phoenix import Phoenix

ensure_hermes_home()  # this process imports Hermes too (the openai-v2 test): never the user's home

REPO = Path(__file__).resolve().parents[2]
PHOENIX_VARIABLE = "STATEBACKENDS_PHOENIX"
"""Names the ``phoenix`` executable; default: ``.venv-phoenix/bin/phoenix`` in the repository."""


@pytest.fixture(scope="session")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    """One Phoenix for the session (each test sends to a project of its own); no Phoenix is a failure, never a skip."""
    command = os.environ.get(PHOENIX_VARIABLE) or str(REPO / ".venv-phoenix" / "bin" / "phoenix")
    server = Phoenix(command, tmp_path_factory.mktemp("phoenix"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
