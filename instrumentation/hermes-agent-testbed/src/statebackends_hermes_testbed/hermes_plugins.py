"""Hermes plugins that trace, enabled as a user enables them, exporting to a receiver on 127.0.0.1.

A Hermes plugin is a ``hermes_agent.plugins`` entry point (a package from PyPI) or a plugin directory Hermes
ships (``plugins/observability/langfuse``), with a ``register(ctx)`` that registers hook callbacks. A user
enables one by listing its key in ``plugins.enabled`` of ``$HERMES_HOME/config.yaml`` (what ``hermes plugins
enable KEY`` writes) and configures it through its own environment variables. :class:`HermesPlugin` does exactly
that for one matrix cell: it writes the key into config.yaml, sets the plugin's documented variables so that it
exports to an :class:`~statebackends_hermes_testbed.otlp.OTLPSink`, re-runs Hermes's own plugin discovery
(``hermes_cli.plugins.discover_plugins(force=True)``, which imports the plugin and calls ``register``), and, in
:meth:`HermesPlugin.disable`, shuts the plugin's SDK down and puts the config, the environment, Hermes's hooks and
OpenTelemetry's global providers back as they were.

What the testbed knows about each plugin is data, written once, in :data:`SPECS`: the variables that point it at
the receiver, and the :class:`~statebackends_hermes_testbed.traces.Reading` the judge reads its spans with (which
span is which kind, where the ids the fake LLM minted and the token usage are, what it cannot express). A plugin
found but not in :data:`SPECS` is read as an OpenTelemetry instrumentation (:data:`~.traces.NATIVE`), pointed at the
receiver through the standard ``OTEL_EXPORTER_OTLP_*`` variables.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from .hermes_harness import hermes_config
from .otlp import OTLPSink
from .traces import ENTRY, NATIVE, OpenSpanTracker, Reading, _gen_ai_usage, _tag_in


class PluginError(ValueError):
    """A ``--hermes-plugin`` that cannot be judged: unknown, or failing to load or to register its hooks."""


# -- reading a plugin's spans: the ids the fake LLM minted ------------------------------------------------------

_CONV = re.compile(r"\[conv:([^\]\s]+)\]")
_ARG_TAG = re.compile(r"(.+?)-\d+\b")
"""The fake LLM's tool arguments are ``{"text": "TAG-i"}`` (sb_late's job adds ``-job``)."""


def _json(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _conv_tag(text: Any) -> Optional[str]:
    """The tag of the first ``[conv:TAG]`` directive in a user message."""
    match = _CONV.search(text) if isinstance(text, str) else None
    return match.group(1) if match else None


def _args_tags(value: Any) -> list[Optional[str]]:
    """The tags in a tool call's arguments (a dict or its JSON): ``text`` ``TAG-i``, and ``[conv:TAG]`` goals."""
    args = _json(value)
    tags: list[Optional[str]] = []
    if isinstance(args, dict) and isinstance(args.get("text"), str):
        match = _ARG_TAG.match(args["text"])
        tags.append(match.group(1) if match else None)
    if isinstance(args, (dict, list)):
        tags += _CONV.findall(json.dumps(args))
    return tags


def _first_user_tag(messages: Any) -> Optional[str]:
    """The ``[conv:TAG]`` of the first user message of a request's messages (the fake LLM reads the same one)."""
    messages = _json(messages)
    if not isinstance(messages, list):
        return None
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
            return _conv_tag(content)
    return None


# -- hermes-plugin-otel-tracing 0.1.1 ---------------------------------------------------------------------------


def _otel_tracing_tags(attrs: Mapping[str, Any]) -> Iterable[Optional[str]]:
    yield from _args_tags(attrs.get("hermes.tool.args"))
    yield _conv_tag(attrs.get("hermes.turn.user_message"))


OTEL_TRACING = Reading(
    name="hermes-plugin-otel-tracing",
    # Its documented tree (module docstring, README "Span 层级结构"): hermes.session -> hermes.turn -> chat {model}
    # (gen_ai.operation.name "chat") / hermes.tool.{name}. The session span exists only on a session's first turn
    # (on_session_start), so it is looked through; the turn is one run_conversation.
    names=(("hermes.session", ENTRY), ("hermes.turn", "invoke_agent"), ("hermes.tool.", "execute_tool"),
           ("chat ", "chat")),
    kinds=frozenset({"invoke_agent", "chat", "execute_tool"}),
    tags=_otel_tracing_tags,
    tokens=_gen_ai_usage,
    tokens_on="chat",
    under_caller=True,
    not_applicable=(
        ("react step", "it has no span per ReAct round: its turn span (hermes.turn) parents the chat and tool spans"),
        ("response and tool call ids", "it records neither gen_ai.response.id nor a tool call id; cross-talk is read "
         "from the tool arguments (hermes.tool.args) and the user message (hermes.turn.user_message) it captures "
         "(HERMES_OTEL_CAPTURE_CONTENT=true, its code's default); chat spans carry no id"),
        ("tokens on the turn", "its turn span carries no usage: each call's chat spans' gen_ai.usage.* are summed"),
    ),
)


# -- Hermes's bundled observability/langfuse --------------------------------------------------------------------


def _langfuse_tags(attrs: Mapping[str, Any]) -> Iterable[Optional[str]]:
    kind = attrs.get("langfuse.observation.type")
    if kind == "generation":
        yield _first_user_tag(attrs.get("langfuse.observation.input"))
        output = _json(attrs.get("langfuse.observation.output"))
        for call in (output.get("tool_calls") or []) if isinstance(output, dict) else []:
            if isinstance(call, dict):
                yield _tag_in(call.get("id"), "call_", "_")
    elif kind == "tool":
        yield _tag_in(_json(attrs.get("langfuse.observation.metadata.tool_call_id")), "call_", "_")
        yield from _args_tags(attrs.get("langfuse.observation.input"))


def _langfuse_usage(attrs: Mapping[str, Any]) -> tuple[Any, Any]:
    usage = _json(attrs.get("langfuse.observation.usage_details"))
    if not isinstance(usage, dict):
        return None, None
    return usage.get("input"), usage.get("output")


LANGFUSE = Reading(
    name="observability/langfuse",
    # The names its hooks give (plugins/observability/langfuse/__init__.py): _start_root_trace's "Hermes turn"
    # (a chain), on_pre_llm_request's "LLM call {n}" (a generation), on_pre_tool_call's "Tool: {name}".
    names=(("Hermes turn", "invoke_agent"), ("LLM call ", "chat"), ("Tool: ", "execute_tool")),
    kinds=frozenset({"invoke_agent", "chat", "execute_tool"}),
    tags=_langfuse_tags,
    tokens=_langfuse_usage,
    tokens_on="chat",
    under_caller=False,
    not_applicable=(
        ("react step", "it has no span per ReAct round: the turn (Hermes turn) parents its LLM calls and tools"),
        ("parentage under the caller's span", "each turn is a trace of its own whose id is seeded from "
         "session::task id (_start_root_trace), never under the application's span; a turn belongs to the call "
         "its ids name (the most common tag in it)"),
        ("response ids", "it records no response id; cross-talk is read from the tool call ids (tool metadata, "
         "the generation's tool calls), the tool arguments and the request's first user message"),
        ("tokens on the turn", "usage is on each generation (langfuse.observation.usage_details), summed per turn"),
    ),
)


# -- the specs ----------------------------------------------------------------------------------------------------

LANGFUSE_PUBLIC_KEY = "pk-lf-statebackends-test"
LANGFUSE_SECRET_KEY = "sk-lf-statebackends-test"


def _standard_env(endpoint: str) -> dict[str, Optional[str]]:
    """OpenTelemetry's standard exporter variables, pointed at ``endpoint`` (None: unset while enabled)."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": None,
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": None,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": None,
        "OTEL_TRACES_EXPORTER": "otlp",
    }


def _otel_tracing_teardown(module: Any) -> None:
    """Its module registers atexit flushes of the providers it made; those providers are shut down."""
    for name in ("_force_flush", "_force_flush_metrics"):
        hook = getattr(module, name, None)
        if hook is not None:
            atexit.unregister(hook)


def _langfuse_teardown(module: Any) -> None:
    """Shut the plugin's cached ``Langfuse`` client down and forget it (the SDK keeps one per public key)."""
    client = getattr(module, "_LANGFUSE_CLIENT", None)
    if client is not None and client is not getattr(module, "_INIT_FAILED", None):
        try:
            client.shutdown()
        finally:
            module._LANGFUSE_CLIENT = None
    try:
        from langfuse._client.resource_manager import LangfuseResourceManager

        LangfuseResourceManager._instances.pop(LANGFUSE_PUBLIC_KEY, None)
    except Exception:  # noqa: BLE001 - an SDK without that registry has nothing to forget
        pass


@dataclass(frozen=True)
class PluginSpec:
    """What the testbed knows about one Hermes plugin: written once, as data."""

    key: str
    """Its key in ``plugins.enabled`` (an entry point's name, or a bundled plugin's path such as ``observability/langfuse``)."""
    reading: Reading = NATIVE
    env: Callable[[str], Mapping[str, Optional[str]]] = _standard_env
    """Its own documented settings, pointing it at the receiver's base URL (None: unset while enabled)."""
    distribution: Optional[str] = None
    """The distribution whose version the matrix's stamp records."""
    setup: Optional[str] = None
    """A function of the plugin's module that makes its SDK client (which its first hook would otherwise make lazily):
    called once enabled, so that the provider it sets up exists before the scenario starts."""
    teardown: Callable[[Any], None] = lambda module: None
    """Plugin-specific clean-up of its module, before the providers it set up are shut down."""


SPECS: dict[str, PluginSpec] = {
    "otel_tracing": PluginSpec(
        key="otel_tracing",
        reading=OTEL_TRACING,
        distribution="hermes-plugin-otel-tracing",
        env=lambda endpoint: {
            **_standard_env(endpoint),
            "HERMES_OTEL_ENABLED": "true",
            "HERMES_OTEL_EXPORTER": "otlp",  # OTLP/HTTP protobuf to OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces
            "HERMES_OTEL_CAPTURE_CONTENT": "true",  # its code's default (its docstring says false)
            "HERMES_OTEL_LOG_FILE": "",  # empty: no log file of its own (default under the system temp folder)
        },
        teardown=_otel_tracing_teardown,
    ),
    "observability/langfuse": PluginSpec(
        key="observability/langfuse",
        reading=LANGFUSE,
        distribution="langfuse",
        env=lambda endpoint: {
            "HERMES_LANGFUSE_PUBLIC_KEY": LANGFUSE_PUBLIC_KEY,
            "HERMES_LANGFUSE_SECRET_KEY": LANGFUSE_SECRET_KEY,
            "HERMES_LANGFUSE_BASE_URL": endpoint,  # the SDK posts OTLP/HTTP to BASE_URL/api/public/otel/v1/traces
        },
        setup="_get_langfuse",
        teardown=_langfuse_teardown,
    ),
}


def spec_for(key: str) -> PluginSpec:
    """The spec of ``key``; a plugin the testbed has no data for is read as an OpenTelemetry instrumentation."""
    return SPECS.get(key) or PluginSpec(key=key)


# -- Hermes's plugin registry -------------------------------------------------------------------------------------


def _manager() -> Any:
    from hermes_cli import plugins

    return plugins.get_plugin_manager()


def plugins_found() -> list[str]:
    """The keys of the plugins Hermes finds here that a user enables through ``plugins.enabled``: entry points,
    user and project plugins, and the bundled standalone ones (not the backends and platforms Hermes loads itself)."""
    from hermes_cli import plugins

    plugins.discover_plugins(force=True)
    found = []
    for info in _manager().list_plugins():
        if info["source"] in ("entrypoint", "user", "project") or (
            info["source"] == "bundled" and info["kind"] == "standalone"
        ):
            found.append(info["key"])
    return sorted(found)


def _providers() -> tuple[Any, ...]:
    """OpenTelemetry's global tracer and meter providers, whether each was set, and what the proxy meter provider
    (handed out before any was set) forwards to."""
    from opentelemetry import trace
    from opentelemetry.metrics import _internal as metrics

    return (trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE._done,
            metrics._METER_PROVIDER, metrics._METER_PROVIDER_SET_ONCE._done,
            getattr(metrics._PROXY_METER_PROVIDER, "_real_meter_provider", None))


def _set_providers(saved: tuple[Any, ...]) -> None:
    from opentelemetry import trace
    from opentelemetry.metrics import _internal as metrics

    trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE._done = saved[0], bool(saved[1])
    metrics._METER_PROVIDER, metrics._METER_PROVIDER_SET_ONCE._done = saved[2], bool(saved[3])
    if hasattr(metrics._PROXY_METER_PROVIDER, "_real_meter_provider"):
        # A meter provider set globally becomes the proxy's for good: a meter asked for later would come from the
        # plugin's provider, shut down by then.
        metrics._PROXY_METER_PROVIDER._real_meter_provider = saved[4]


class HermesPlugin:
    """One Hermes plugin, enabled per matrix cell as a user enables it, exporting to ``sink``.

    ``fresh_globals`` (the matrix's columns): OpenTelemetry's global tracer and meter providers are unset while it is
    enabled, as in a process where the plugin is what sets OpenTelemetry up (a plugin that makes its own SDK provider
    makes it the global one), and the ones it made are shut down on :meth:`disable`. Then a span processor added to
    its provider tracks the spans it starts and never ends. Without it, the globals are only saved and put back.
    """

    def __init__(self, spec: PluginSpec | str, sink: Optional[OTLPSink] = None, *, fresh_globals: bool = True) -> None:
        self.spec = spec_for(spec) if isinstance(spec, str) else spec
        self.key = self.spec.key
        self.sink = sink if sink is not None else OTLPSink().start()
        self._own_sink = sink is None
        self.fresh_globals = fresh_globals
        self.module: Any = None
        self.enabled = False
        self.tracker = OpenSpanTracker()
        self._provider: Any = None
        self._saved_env: dict[str, Optional[str]] = {}
        self._saved_providers: Optional[tuple[Any, ...]] = None
        self._config = contextlib.ExitStack()

    @property
    def reading(self) -> Reading:
        """How the judge reads this plugin's spans."""
        return self.spec.reading

    # -- on and off ----------------------------------------------------------------------------------------

    def enable(self) -> "HermesPlugin":
        """Settings and config as a user writes them, then Hermes's discovery; :class:`PluginError` if Hermes did not
        load it or it registered no hook (everything is put back first)."""
        if self.enabled:
            return self
        self.sink.clear()
        self.tracker.clear()
        self._saved_providers = _providers()
        if self.fresh_globals:
            _set_providers((None, False, None, False, None))
        settings = dict(self.spec.env(self.sink.base_url))
        self._saved_env = {name: os.environ.get(name) for name in settings}
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        # What `hermes plugins enable KEY` writes: the key in plugins.enabled.
        self._config.enter_context(hermes_config(lambda old: (old or "") + f"plugins:\n  enabled:\n  - {self.key}\n"))
        self.enabled = True
        try:
            self.reload()
            if self.spec.setup:
                getattr(self.module, self.spec.setup)()
            if self.fresh_globals:
                self._watch_provider()
        except BaseException:
            self.disable()
            raise
        return self

    def reload(self) -> Any:
        """Re-run Hermes's plugin discovery (which imports the plugin and calls its ``register``); the module."""
        from hermes_cli import plugins

        plugins.discover_plugins(force=True)
        loaded = _manager()._plugins.get(self.key)
        if loaded is None:
            raise PluginError(f"--hermes-plugin {self.key!r}: Hermes found no such plugin; plugins found: "
                              f"{', '.join(plugins_found()) or 'none'}")
        if loaded.error or not loaded.enabled:
            raise PluginError(f"--hermes-plugin {self.key!r}: Hermes could not load it ({loaded.error or 'not enabled'})")
        if not loaded.hooks_registered:
            raise PluginError(f"--hermes-plugin {self.key!r}: it registered no hook, so it traces nothing "
                              "(its register() returned without calling ctx.register_hook)")
        self.module = loaded.module
        return self.module

    def _watch_provider(self) -> None:
        """Track open spans on the SDK tracer provider the plugin made the global one (if it did)."""
        from opentelemetry import trace

        provider = trace._TRACER_PROVIDER
        if provider is not None and hasattr(provider, "add_span_processor"):
            provider.add_span_processor(self.tracker)
            self._provider = provider

    def disable(self) -> None:
        """Shut the plugin's SDK down, then put back config.yaml, the environment, Hermes's hooks and the globals."""
        if not self.enabled:
            return
        self.enabled = False
        try:
            if self.module is not None:
                self.spec.teardown(self.module)
            if self.fresh_globals and self._saved_providers is not None:
                self._shutdown_providers()
        finally:
            self._config.close()
            for name, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self._saved_env = {}
            from hermes_cli import plugins

            plugins.discover_plugins(force=True)
            self._forget_module()
            if self._saved_providers is not None:
                _set_providers(self._saved_providers)
            self._provider = None

    def _shutdown_providers(self) -> None:
        """Shut down the tracer and meter providers the plugin set (flushing its spans to the sink)."""
        now = _providers()
        for made, saved in ((now[0], self._saved_providers[0]), (now[2], self._saved_providers[2])):
            if made is not None and made is not saved and hasattr(made, "shutdown"):
                try:
                    made.shutdown()
                except Exception:  # noqa: BLE001 - a provider that fails to shut down must not keep the rest in place
                    pass

    def _forget_module(self) -> None:
        """An entry-point plugin's module stays in ``sys.modules``: drop it, so the next enable imports it afresh
        (as a new process would; Hermes re-executes a directory plugin's module on every discovery itself)."""
        module, self.module = self.module, None
        name = getattr(module, "__name__", None)
        if not name or name.startswith("hermes_plugins."):
            return
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            sys.modules.pop(loaded, None)

    def close(self) -> None:
        """Disable, and stop the sink if this plugin made it."""
        self.disable()
        if self._own_sink:
            self.sink.stop()

    # -- what it exported ----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Export what the plugin's provider still buffers."""
        if self._provider is not None:
            self._provider.force_flush()

    def finished_spans(self) -> list[Any]:
        """Every span the plugin exported to the sink since it was enabled, flushed first."""
        self.flush()
        return self.sink.readable_spans()

    def open_spans(self) -> list[Any]:
        """The spans started on the plugin's provider and not ended, now."""
        return self.tracker.open_spans()

    def hook_owners(self) -> dict[str, list[str]]:
        """Hermes's registered hooks: hook name -> modules of the callbacks."""
        return {hook: [getattr(cb, "__module__", "?") for cb in cbs] for hook, cbs in _manager()._hooks.items()}


def open_plugin(key: str, sink: Optional[OTLPSink] = None) -> HermesPlugin:
    """A :class:`HermesPlugin` for ``key`` after a trial enable and disable: :class:`PluginError` naming the key and
    the plugins found if it is unknown, fails to load or registers no hook."""
    found = plugins_found()
    if key not in found:
        raise PluginError(f"--hermes-plugin {key!r}: no such Hermes plugin here; plugins found: {', '.join(found) or 'none'}")
    plugin = HermesPlugin(key, sink)
    try:
        plugin.enable()
    except PluginError as exc:
        plugin.close()
        raise PluginError(f"{exc}; plugins found: {', '.join(found)}") from None
    except Exception as exc:  # noqa: BLE001 - a plugin's own set-up that raises: one clear error, no traceback
        plugin.close()
        raise PluginError(f"--hermes-plugin {key!r}: its set-up raised {type(exc).__name__}: {exc}; "
                          f"plugins found: {', '.join(found)}") from None
    plugin.disable()
    return plugin


def distributions() -> list[str]:
    """The distributions of the plugins in :data:`SPECS` (for the version stamp)."""
    return [spec.distribution for spec in SPECS.values() if spec.distribution]


