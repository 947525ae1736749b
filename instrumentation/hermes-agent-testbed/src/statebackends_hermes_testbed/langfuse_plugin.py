"""Hermes's bundled Langfuse observability plugin, enabled the way Hermes loads it, exporting to 127.0.0.1.

* :class:`~statebackends_hermes_testbed.otlp.OTLPSink` - the loopback OTLP/HTTP receiver; the ``langfuse`` SDK
  posts to ``/api/public/otel/v1/traces`` there.
* :class:`LangfusePlugin` - :class:`~statebackends_hermes_testbed.hermes_plugins.HermesPlugin` for
  ``observability/langfuse``: ``enable()`` sets the plugin's credentials and base URL (the sink), lists
  ``observability/langfuse`` in ``plugins.enabled`` of ``$HERMES_HOME/config.yaml`` and re-runs Hermes's
  plugin discovery (``hermes_cli.plugins.discover_plugins(force=True)``), which imports the plugin and
  calls its ``register(ctx)`` with Hermes's ``PluginContext``; ``disable()`` shuts the SDK client down,
  restores the config, the environment and OpenTelemetry's global tracer provider (the SDK makes its own
  provider the global one when none is set), and re-runs discovery so no hook of it stays registered.
  Unlike the matrix's column it leaves OpenTelemetry's globals as they are while enabled, and the SDK's
  client is made lazily, by the plugin's first hook.

Nothing here reaches beyond 127.0.0.1: the SDK's only destination is the sink.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .hermes_plugins import LANGFUSE_PUBLIC_KEY, LANGFUSE_SECRET_KEY, SPECS, HermesPlugin
from .otlp import ExportedSpan, OTLPSink

PLUGIN_KEY = "observability/langfuse"
PUBLIC_KEY = LANGFUSE_PUBLIC_KEY
SECRET_KEY = LANGFUSE_SECRET_KEY
TRACES_PATH = "/api/public/otel/v1/traces"
ENV_NAMES = ("HERMES_LANGFUSE_PUBLIC_KEY", "HERMES_LANGFUSE_SECRET_KEY", "HERMES_LANGFUSE_BASE_URL")

__all__ = ["ExportedSpan", "LangfusePlugin", "OTLPSink", "PLUGIN_KEY", "PUBLIC_KEY", "SECRET_KEY", "TRACES_PATH"]


class LangfusePlugin(HermesPlugin):
    """Hermes's ``observability/langfuse`` plugin, enabled through Hermes's own plugin discovery."""

    def __init__(self, sink: OTLPSink) -> None:
        # Lazily made client (no set-up call): the tests observe what the plugin's first hook does.
        super().__init__(dataclasses.replace(SPECS[PLUGIN_KEY], setup=None), sink, fresh_globals=False)

    @property
    def client(self) -> Any:
        """The plugin's cached ``Langfuse`` client (None until its first hook ran)."""
        client = getattr(self.module, "_LANGFUSE_CLIENT", None)
        return client if client is not None and client is not getattr(self.module, "_INIT_FAILED", None) else None

    def flush(self) -> None:
        """The SDK client's own flush (it exports what its span processor holds)."""
        if self.client is not None:
            self.client.flush()

    def open_turns(self) -> int:
        """Turns the plugin still keeps state for (its ``_TRACE_STATE``)."""
        return len(self.module._TRACE_STATE)
