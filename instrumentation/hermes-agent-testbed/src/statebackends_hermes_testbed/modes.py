"""What a bench can run the agent under: ``none``, our instrumentation with one backend, or loongsuite's.

Imports nothing of Hermes, OpenTelemetry or the instrumentations until an
:class:`Instrumentors` is built, so the asv suites can import the names.
"""

from __future__ import annotations

import importlib.util
from typing import Any, List, Optional

NONE = "none"
"""Mode: uninstrumented."""
LOONGSUITE = "loongsuite"
"""Mode: loongsuite-instrumentation-hermes-agent (the ``compare`` extra)."""
LOONGSUITE_MODULE = "opentelemetry.instrumentation.hermes_agent"
LOONGSUITE_DIST = "loongsuite-instrumentation-hermes-agent"


def loongsuite_available() -> bool:
    """Whether loongsuite's Hermes instrumentation can be imported here."""
    try:
        return importlib.util.find_spec(LOONGSUITE_MODULE) is not None
    except (ImportError, ValueError):
        return False


def loongsuite_skip_reason() -> str:
    """Why loongsuite's mode is skipped, and how to install it."""
    return (
        f"{LOONGSUITE_DIST} is not installed: install the 'compare' set in a virtualenv of its own "
        "(it pins opentelemetry-api/sdk < 1.40, opentelemetry-instrumentation 0.60b1, wrapt < 2): "
        "python3 -m venv .venv-compare && .venv-compare/bin/pip install -r requirements-compare.txt"
    )


class Instrumentors:
    """Our instrumentor and, when installed, loongsuite's; at most one of them active, for one mode at a time."""

    def __init__(self) -> None:
        from statebackends_hermes_agent import HermesAgentInstrumentor

        self.ours = HermesAgentInstrumentor()
        self.theirs: Any = None
        if loongsuite_available():
            theirs = importlib.import_module(LOONGSUITE_MODULE)
            self.theirs = theirs.HermesAgentInstrumentor()
        self.mode = NONE
        self.release()

    def modes(self, include_loongsuite: bool = True) -> List[str]:
        """``none``, every backend, and ``loongsuite`` when installed."""
        import statebackends

        modes = [NONE] + list(statebackends.available())
        if include_loongsuite and self.theirs is not None:
            modes.append(LOONGSUITE)
        return modes

    def release(self) -> None:
        """Uninstrument whichever instrumentor is active."""
        for instrumentor in (self.ours, self.theirs):
            if instrumentor is not None and instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.uninstrument()
        self.mode = NONE

    def set_mode(self, mode: Any, provider: Any) -> None:
        """Release, then instrument for ``mode`` (``none``, ``loongsuite``, a backend name or a store) on ``provider``."""
        self.release()
        if mode == NONE:
            return
        if mode == LOONGSUITE:
            if self.theirs is None:
                raise RuntimeError(loongsuite_skip_reason())
            self.theirs.instrument(tracer_provider=provider)
        else:
            self.ours.instrument(tracer_provider=provider, state_backend=mode)
        self.mode = mode

    @property
    def store(self) -> Optional[Any]:
        """Our instrumentation's state store while one of our modes is active, else None."""
        return self.ours.store if self.mode not in (NONE, LOONGSUITE) else None
