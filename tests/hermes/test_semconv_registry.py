"""Everything the instrumentation emits, checked against the installed ``opentelemetry-semantic-conventions`` registry.

Real turns of the REAL hermes-agent on the fake LLM (127.0.0.1) run once for the module, with content capture
off and on (spans and events), streaming off and on, a tool, a tool that fails, an LLM request that fails, Hermes's
own ``read_file`` tool and a ``delegate_task`` subagent. What was actually emitted is collected from the SDK's
in-memory span exporter, metric reader and log exporter, and every name in it is checked:

- span attributes, span event attributes, log record (event) attributes and metric point attributes: each name is
  in the registry (``opentelemetry.semconv.attributes`` and ``opentelemetry.semconv._incubating.attributes``) and
  not one the registry says is replaced by another, or is one of ours, excepted by name in :data:`OURS`;
- metrics: the name is in the registry (``opentelemetry.semconv[._incubating].metrics``) and the unit and the
  instrument kind are the ones its ``create_*`` function gives;
- ``gen_ai.operation.name`` and ``gen_ai.token.type`` values are the registry's well-known values, or ours by name.

So an attribute added anywhere, on any span, event or metric, is checked without this file naming it. Names the
instrumentation still emits against the registry are listed in :data:`KNOWN_BAD` and asserted as emitted: the list
shrinks as they are fixed (a fixed one left in the list fails too).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GenAI

from statebackends_hermes_testbed.driver import HermesBench
from statebackends_hermes_testbed.hermes_harness import BENCH_TOOLSET, wait_for_delegations
from statebackends_hermes_testbed.inmemory import InMemoryProviders

ENV_CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
ENV_VARIABLES = (
    ENV_CAPTURE,
    "OTEL_SEMCONV_STABILITY_OPT_IN",
    "OTEL_INSTRUMENTATION_HERMES_AGENT_STATE_BACKEND",
    "STATEBACKENDS_BACKEND",
    "OTEL_PYTHON_STATE_BACKEND",
)

OURS = frozenset({
    "hermes.provider",  # Hermes's own provider label, beside gen_ai.provider.name
    "hermes.interrupted",  # a turn Hermes reports as interrupted
    "hermes.react.round",  # the react step's round number
    "hermes.react.finish_reason",  # how the react step ended
    "openinference.span.kind",  # OpenInference's (not ours): CHAIN on the react step, which Phoenix would call UNKNOWN
    "statebackends.state.evicted",  # the store evicted the invocation's state while it was open
    "statebackends.state.backend",  # on the eviction event: the store's name
})
"""Attribute names of our own namespaces (``hermes.*``, ``statebackends.*``), and OpenInference's span kind, excepted
by name."""

OUR_OPERATIONS = frozenset({"hermes.react_step"})
"""``gen_ai.operation.name`` values of ours: the react step (the conventions have none for it)."""

OUR_EVENTS = frozenset({"statebackends.state.evicted"})
"""Span event names of ours; ``exception`` (``Span.record_exception``) is OpenTelemetry's."""

KNOWN_BAD: dict[str, str] = {}
"""Names still emitted against the registry (name: why), each asserted as emitted until it is fixed. Empty since the
step's ``gen_ai.react.round`` / ``gen_ai.react.finish_reason`` became ``hermes.react.*`` (the old names are emitted
only behind the deprecated switch; ``test_conventions.py`` checks them there)."""

NEWER_THAN_INSTALLED = {
    "gen_ai.response.time_to_first_chunk": ((0, 63), None),
    "gen_ai.client.operation.time_to_first_chunk": ((0, 63), ("histogram", "s")),
}
"""Names of a registry newer than the oldest ``opentelemetry-semantic-conventions`` we admit (the compare set has
0.60b1): the release that added them (0.63b0, semantic conventions 1.41.1) and, for a metric, its kind and unit
there. On an older release each must be missing from the installed registry (it is then checked against this)."""

INFERENCE_EVENT = "gen_ai.client.inference.operation.details"
"""The only event name we emit: the conventions' inference event (the Python registry lists no event names)."""


def _semconv_version() -> tuple[int, ...]:
    return tuple(int(p) for p in version("opentelemetry-semantic-conventions").split("b")[0].split(".")[:2])


# -- the installed registry ---------------------------------------------------------------------------------------


@dataclass
class Registry:
    """Attribute names, replaced (deprecated) attribute names, enum values and metrics of the installed registry."""

    attributes: set[str] = field(default_factory=set)
    replaced: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, tuple[str, str]] = field(default_factory=dict)


def _modules(package: str) -> Iterator[Any]:
    root = importlib.import_module(package)
    for info in pkgutil.iter_modules(root.__path__):
        yield importlib.import_module(f"{package}.{info.name}")


def _docstrings(module: Any) -> dict[str, str]:
    """The string literal that follows each module-level constant (how the registry documents it)."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    body = tree.body
    for node, after in zip(body, body[1:]):
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if (
            len(targets) == 1 and isinstance(targets[0], ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
        ):
            out[targets[0].id] = after.value.value
    return out


class _RecordingMeter:
    """Stands in for a Meter: records which instrument a registry ``create_*`` function asks for, and its unit."""

    def __init__(self) -> None:
        self.made: Optional[tuple[str, str, str]] = None

    def __getattr__(self, method: str) -> Any:
        kind = {
            "create_histogram": "histogram",
            "create_counter": "counter",
            "create_observable_counter": "counter",
            "create_up_down_counter": "updowncounter",
            "create_observable_up_down_counter": "updowncounter",
            "create_gauge": "gauge",
            "create_observable_gauge": "gauge",
        }[method]

        def make(name: str, *args: Any, unit: str = "", **kwargs: Any) -> None:
            self.made = (name, kind, unit)

        return make


def load_registry() -> Registry:
    registry = Registry()
    for package in ("opentelemetry.semconv.attributes", "opentelemetry.semconv._incubating.attributes"):
        for module in _modules(package):
            docs = _docstrings(module)
            for const, value in vars(module).items():
                if const.isupper() and isinstance(value, str):
                    registry.attributes.add(value)
                    doc = docs.get(const, "")
                    if "Replaced by" in doc:
                        registry.replaced[value] = " ".join(doc.split())
    for package in ("opentelemetry.semconv.metrics", "opentelemetry.semconv._incubating.metrics"):
        for module in _modules(package):
            for fname, function in vars(module).items():
                if not (fname.startswith("create_") and callable(function)):
                    continue
                meter = _RecordingMeter()
                parameters = inspect.signature(function).parameters
                function(meter, *([[]] * (len(parameters) - 1)))  # observable instruments take callbacks
                assert meter.made is not None, f"{module.__name__}.{fname} made no instrument"
                name, kind, unit = meter.made
                registry.metrics[name] = (kind, unit)
    return registry


# -- what was emitted ----------------------------------------------------------------------------------------------


@dataclass
class Emitted:
    """Every name emitted, with where it was seen (for the failure messages)."""

    attributes: dict[str, set[str]] = field(default_factory=dict)
    values: dict[str, set[Any]] = field(default_factory=dict)
    span_events: set[str] = field(default_factory=set)
    log_events: set[Any] = field(default_factory=set)
    metrics: dict[str, tuple[str, str]] = field(default_factory=dict)
    span_names: set[str] = field(default_factory=set)

    def add(self, where: str, attributes: Any) -> None:
        for key, value in dict(attributes or {}).items():
            self.attributes.setdefault(key, set()).add(where)
            if key in (GenAI.GEN_AI_OPERATION_NAME, GenAI.GEN_AI_TOKEN_TYPE):
                self.values.setdefault(key, set()).add(value)


def _kind(data: Any) -> str:
    if isinstance(data, Histogram):
        return "histogram"
    if isinstance(data, Sum):
        return "counter" if data.is_monotonic else "updowncounter"
    if isinstance(data, Gauge):
        return "gauge"
    return type(data).__name__


class Collector(InMemoryProviders):
    """SDK providers with in-memory exporters; :meth:`collect` reads everything they got into :class:`Emitted`."""

    def instrument(self, bench: HermesBench) -> None:
        bench.instrumentor.instrument(
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            logger_provider=self.logger_provider,
            state_backend="invocation_id",
        )

    def collect(self, emitted: Emitted) -> None:
        self.tracer_provider.force_flush()
        for span in self.spans.get_finished_spans():
            where = f"span {span.name!r}"
            emitted.span_names.add(span.name)
            emitted.add(where, span.attributes)
            for event in span.events:
                emitted.span_events.add(event.name)
                emitted.add(f"event {event.name!r} of {where}", event.attributes)
        for data in self.logs.get_finished_logs():
            record = getattr(data, "log_record", data)
            emitted.log_events.add(record.event_name)
            emitted.add(f"log record {record.event_name!r}", record.attributes)
        metrics = self.reader.get_metrics_data()
        for rm in metrics.resource_metrics if metrics else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    emitted.metrics[metric.name] = (_kind(metric.data), metric.unit)
                    for point in metric.data.data_points:
                        emitted.add(f"metric {metric.name!r}", point.attributes)


TURNS = (
    ("rg-tool", "[tools:1]"),  # a tool round, then the answer
    ("rg-toolfail", "[tool:sb_fail] [tools:1]"),  # a tool that raises (Hermes returns its error as the result)
    ("rg-llmfail", "[llm_error]"),  # the LLM answers 400: the chat fails, Hermes reports a failed run
)


def _emit_everything(bench: HermesBench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Emitted:
    emitted = Emitted()
    for var in ENV_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    readable = tmp_path / "readable.txt"
    readable.write_text("registry check\n")
    files_agent = bench.agent(toolsets=(BENCH_TOOLSET, "file"), fresh=True)  # Hermes's own read_file
    for capture in ("NO_CONTENT", "SPAN_AND_EVENT"):
        monkeypatch.setenv(ENV_CAPTURE, capture)
        bench.uninstrument()
        bench.reset()
        collector = Collector()
        collector.instrument(bench)
        for streaming in (False, True):
            agent = bench.agent(streaming=streaming)
            for tag, directives in TURNS:
                agent.run_conversation(f"[conv:{tag}-{capture}-{int(streaming)}] {directives} hello")
        files_agent.run_conversation(f"[conv:rg-files-{capture}] [files:{readable}] read it")
        bench.agent(delegation=True).run_conversation(f"[conv:rg-parent-{capture}] [delegate:rg-kid-{capture}] go")
        assert wait_for_delegations(timeout=60)
        bench.uninstrument()
        collector.collect(emitted)
    return emitted


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture(scope="module")
def emitted(hermes_bench: HermesBench, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emitted]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _emit_everything(hermes_bench, monkeypatch, tmp_path_factory.mktemp("registry"))
    hermes_bench.uninstrument()


# -- the checks ---------------------------------------------------------------------------------------------------


def test_the_turns_emitted_every_kind_of_span_event_and_metric(emitted: Emitted) -> None:
    """The control: the turns reached what the checks below are about (else they would pass on nothing)."""
    prefixes = {name.split(" ")[0] for name in emitted.span_names}
    assert {"invoke_agent", "react", "chat", "execute_tool"} <= prefixes, emitted.span_names
    assert {"execute_tool sb_echo", "execute_tool sb_fail", "execute_tool read_file", "execute_tool delegate_task"} <= emitted.span_names
    assert "exception" in emitted.span_events
    assert emitted.log_events == {INFERENCE_EVENT}
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage", "gen_ai.client.operation.time_to_first_chunk"} <= set(emitted.metrics)
    for name in ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.tool.call.arguments", "error.type",
                 "gen_ai.response.time_to_first_chunk", "gen_ai.token.type", "gen_ai.tool.description"):
        assert name in emitted.attributes, name


def _newer(name: str) -> bool:
    """Whether ``name`` belongs to a registry newer than the installed one (see :data:`NEWER_THAN_INSTALLED`)."""
    return name in NEWER_THAN_INSTALLED and _semconv_version() < NEWER_THAN_INSTALLED[name][0]


def test_every_attribute_is_in_the_registry_or_ours(emitted: Emitted, registry: Registry) -> None:
    outside = {
        name: sorted(where)[:3]
        for name, where in emitted.attributes.items()
        if name not in registry.attributes and name not in OURS and name not in KNOWN_BAD and not _newer(name)
    }
    assert outside == {}, f"attributes neither in opentelemetry-semantic-conventions {version('opentelemetry-semantic-conventions')} nor ours"
    replaced = {name: registry.replaced[name] for name in emitted.attributes if name in registry.replaced}
    assert replaced == {}, "attributes the registry says are replaced by another"
    ours_inside = sorted(name for name in OURS if name.startswith("gen_ai."))
    assert ours_inside == [], "our names never in the gen_ai namespace"


def test_known_bad_names_are_still_emitted_and_still_not_in_the_registry(emitted: Emitted, registry: Registry) -> None:
    """A name fixed (no longer emitted) or adopted by the registry must leave :data:`KNOWN_BAD`; the step's old
    ``gen_ai.react.*`` names, the last ones fixed, stay out of what is emitted by default (they come only behind the
    deprecated switch) and are still not the registry's (else the switch would be no deprecation)."""
    from statebackends_hermes_agent.lifecycle import LEGACY_REACT_FINISH_REASON, LEGACY_REACT_ROUND

    assert {name: name in emitted.attributes for name in KNOWN_BAD} == {name: True for name in KNOWN_BAD}
    assert [name for name in KNOWN_BAD if name in registry.attributes] == []
    legacy = (LEGACY_REACT_ROUND, LEGACY_REACT_FINISH_REASON)
    assert [name for name in legacy if name in emitted.attributes] == []
    assert [name for name in legacy if name in registry.attributes] == []


def test_names_newer_than_the_installed_registry_are_missing_from_it_only_there(
    emitted: Emitted, registry: Registry
) -> None:
    for name, (added, _metric) in NEWER_THAN_INSTALLED.items():
        present = name in registry.attributes or name in registry.metrics
        assert present is (_semconv_version() >= added), (name, version("opentelemetry-semantic-conventions"))
        assert name in emitted.attributes or name in emitted.metrics, f"{name} no longer emitted: drop it here"


def test_every_metric_has_the_registrys_name_unit_and_instrument_kind(emitted: Emitted, registry: Registry) -> None:
    expected = dict(registry.metrics)
    for name, (added, metric) in NEWER_THAN_INSTALLED.items():
        if metric is not None and _semconv_version() < added:
            expected[name] = metric
    wrong = {name: (got, expected.get(name)) for name, got in emitted.metrics.items() if expected.get(name) != got}
    assert wrong == {}, "metric (kind, unit) emitted vs the registry's (None: not in the registry)"


def test_operation_names_and_token_types_are_the_registrys_values(emitted: Emitted) -> None:
    operations = {v.value for v in GenAI.GenAiOperationNameValues}
    token_types = {v.value for v in GenAI.GenAiTokenTypeValues}
    assert emitted.values[GenAI.GEN_AI_OPERATION_NAME] - operations == OUR_OPERATIONS
    assert emitted.values[GenAI.GEN_AI_TOKEN_TYPE] - token_types == set()
    assert emitted.values[GenAI.GEN_AI_TOKEN_TYPE] == {"input", "output"}


def test_span_events_are_opentelemetrys_or_ours(emitted: Emitted) -> None:
    assert emitted.span_events - OUR_EVENTS - {"exception"} == set()
