"""Process-wide test set-up: a private HERMES_HOME before Hermes is imported, and a loopback-only network."""

from __future__ import annotations

from typing import Iterator

import pytest

from statebackends_hermes_testbed.driver import HermesBench, ensure_hermes_home
from statebackends_hermes_testbed.hermes_harness import wait_for_delegations
from statebackends_hermes_testbed.netguard import _loopback_only, _network_guard  # noqa: F401 - autouse fixtures

ensure_hermes_home()  # Hermes caches home paths when first imported

BACKEND_VARIABLES = (
    "OTEL_INSTRUMENTATION_HERMES_AGENT_STATE_BACKEND",
    "STATEBACKENDS_BACKEND",
    "OTEL_PYTHON_STATE_BACKEND",  # the deprecated alias of STATEBACKENDS_BACKEND
)


@pytest.fixture(scope="session")
def hermes_bench() -> Iterator[HermesBench]:
    """The fake LLM server, an SDK tracer provider with an in-memory exporter, and the instrumentor."""
    bench = HermesBench()
    try:
        yield bench
    finally:
        bench.close()


@pytest.fixture
def bench(hermes_bench: HermesBench, monkeypatch: pytest.MonkeyPatch) -> Iterator[HermesBench]:
    """``hermes_bench`` uninstrumented, emptied and with no backend variable set; uninstrumented again after the test."""
    for variable in BACKEND_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    hermes_bench.uninstrument()
    hermes_bench.reset()
    yield hermes_bench
    wait_for_delegations(timeout=30)
    hermes_bench.uninstrument()
