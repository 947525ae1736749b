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


def load_instrumentor(spec: str) -> Any:
    """An instance of the ``BaseInstrumentor`` subclass named ``MODULE:CLASS``; ValueError naming what is wrong."""
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"--instrumentor {spec!r}: expected MODULE:CLASS, e.g. opentelemetry.instrumentation.hermes_agent:HermesAgentInstrumentor")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--instrumentor {spec!r}: module {module_name!r} not found or not importable ({exc})") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"--instrumentor {spec!r}: module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, BaseInstrumentor)):
        raise ValueError(
            f"--instrumentor {spec!r}: {module_name}.{class_name} is not a BaseInstrumentor subclass "
            "(opentelemetry.instrumentation.instrumentor.BaseInstrumentor)"
        )
    return cls()


class Instrumentors:
    """Our instrumentor and, when installed, loongsuite's; at most one of them active, for one mode at a time."""

    def __init__(self) -> None:
        from statebackends_hermes_agent import HermesAgentInstrumentor

        self.ours = HermesAgentInstrumentor()
        self.theirs: Any = None
        if loongsuite_available():
            theirs = importlib.import_module(LOONGSUITE_MODULE)
            self.theirs = theirs.HermesAgentInstrumentor()
        self.foreign: dict[str, Any] = {}
        """Foreign instrumentors by column name (:meth:`add_foreign`): instrumented with only a tracer provider."""
        self.plugins: dict[str, Any] = {}
        """Hermes plugins by column name (:meth:`add_plugin`): enabled through Hermes's own plugin discovery."""
        self.mode = NONE
        self.release()

    def add_foreign(self, name: str, instrumentor: Any) -> None:
        """Make ``instrumentor`` (any ``BaseInstrumentor``) a mode named ``name``: judged from its spans only, no store."""
        self.foreign[name] = instrumentor

    def add_plugin(self, name: str, plugin: Any) -> None:
        """Make ``plugin`` (a :class:`~statebackends_hermes_testbed.hermes_plugins.HermesPlugin`) a mode named ``name``:
        enabled for the mode, disabled (its settings put back) on :meth:`release`, judged from what it exports."""
        self.plugins[name] = plugin

    def modes(self, include_loongsuite: bool = True) -> List[str]:
        """``none``, every backend, and ``loongsuite`` when installed."""
        import statebackends

        modes = [NONE] + list(statebackends.available())
        if include_loongsuite and self.theirs is not None:
            modes.append(LOONGSUITE)
        return modes

    def release(self) -> None:
        """Uninstrument whichever instrumentor is active; disable any Hermes plugin enabled."""
        try:
            for instrumentor in (self.ours, self.theirs, *self.foreign.values()):
                if instrumentor is not None and instrumentor.is_instrumented_by_opentelemetry:
                    instrumentor.uninstrument()
        finally:
            for plugin in self.plugins.values():
                plugin.disable()
        self.mode = NONE

    def set_mode(self, mode: Any, provider: Any) -> None:
        """Release, then instrument for ``mode`` (``none``, ``loongsuite``, a backend name or a store) on ``provider``."""
        self.release()
        if mode == NONE:
            return
        if isinstance(mode, str) and mode in self.plugins:
            self.plugins[mode].enable()
        elif isinstance(mode, str) and mode in self.foreign:
            self.foreign[mode].instrument(tracer_provider=provider)
        elif mode == LOONGSUITE:
            if self.theirs is None:
                raise RuntimeError(loongsuite_skip_reason())
            self.theirs.instrument(tracer_provider=provider)
        else:
            self.ours.instrument(tracer_provider=provider, state_backend=mode)
        self.mode = mode

    @property
    def store(self) -> Optional[Any]:
        """Our instrumentation's state store while one of our modes is active, else None."""
        if self.mode in (NONE, LOONGSUITE) or (isinstance(self.mode, str) and (self.mode in self.foreign or self.mode in self.plugins)):
            return None
        return self.ours.store

    @property
    def source(self) -> Optional[Any]:
        """The Hermes plugin whose exported spans are judged while its mode is active (its own exporter, its own
        reading of spans), else None: the spans are on the bench's provider."""
        if isinstance(self.mode, str) and self.mode in self.plugins:
            return self.plugins[self.mode]
        return None
