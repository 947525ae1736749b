"""Conventions of opentelemetry-python-contrib instrumentations, on the real agent (fake LLM on 127.0.0.1).

- ``opentelemetry.instrumentation.utils.suppress_instrumentation()`` is honoured: no span, no metric, no event, in
  the calling thread and in the threads Hermes starts for the call (its LLM requests, its subagents); the agent runs
  as it runs uninstrumented.
- The tracer, the meter and the logger carry the instrumentation's version and the schema URL of the
  semantic-conventions release it follows (1.37.0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.semconv.schemas import Schemas

from statebackends_hermes_agent import genai
from statebackends_hermes_agent.version import __version__
from statebackends_hermes_testbed.driver import HermesBench
from statebackends_hermes_testbed.hermes_harness import wait_for_delegations
from statebackends_hermes_testbed.scenarios import httpx_instrumentation

try:  # the SDK's in-memory log exporter moved in 1.39 (the compare set) -> 1.4x
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter as _LogExporter
except ImportError:  # pragma: no cover - older SDKs
    from opentelemetry.sdk._logs.export import InMemoryLogExporter as _LogExporter  # type: ignore[no-redef]
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

SCHEMAS = Path(__file__).parent / "schemas"


class Sinks:
    """A meter provider with an in-memory reader and a logger provider with an in-memory exporter."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.logs = _LogExporter()
        self.logger_provider = LoggerProvider()
        self.logger_provider.add_log_record_processor(SimpleLogRecordProcessor(self.logs))

    def points(self) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [
            (scope.scope, metric.name, point)
            for resource in (data.resource_metrics if data else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
            for point in metric.data.data_points
        ]

    def records(self) -> list[Any]:
        return list(self.logs.get_finished_logs())


@pytest.fixture
def sinks(bench: HermesBench, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sinks]:
    """Our instrumentation on the bench's tracer provider, a meter and a logger provider, content on spans and events."""
    monkeypatch.setenv(genai.ENV_CAPTURE_CONTENT, "SPAN_AND_EVENT")
    out = Sinks()
    bench.instrumentor.instrument(
        tracer_provider=bench.provider,
        meter_provider=out.meter_provider,
        logger_provider=out.logger_provider,
        state_backend="invocation_id",
    )
    bench.instrumentors.mode = "invocation_id"  # so bench.store and the fixture's uninstrument see it
    yield out


def _ours(bench: HermesBench) -> list[Any]:
    """Every exported span but the test's caller spans."""
    bench.provider.force_flush()
    return [s for s in bench.exporter.get_finished_spans() if not s.name.startswith("call ")]


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_suppressed_turns_make_no_span_metric_or_event_and_run_unchanged(
    bench: HermesBench, sinks: Sinks, streaming: bool
) -> None:
    """Under suppress_instrumentation(): a turn with a tool and one with a delegate_task subagent (run later in
    Hermes's worker, which copies no context) export nothing of ours, and no HTTP span either (the suppression
    reaches Hermes's request threads); their results are the uninstrumented ones. Outside the block, traced again."""
    agent = bench.agent(streaming=streaming)
    delegating = bench.agent(delegation=True)
    with httpx_instrumentation(bench):
        with suppress_instrumentation():
            tool_turn = bench.call(agent, "sup", "[tools:2]")
            delegated = bench.call(delegating, "supd", "[delegate:supkid]")
            wait_for_delegations(timeout=60)
        assert bench.server.log("supkid"), "the subagent ran"
        assert tool_turn["final_response"] == "done sup" and delegated["final_response"] == "done supd"
        assert _ours(bench) == [], [s.name for s in _ours(bench)]
        assert sinks.points() == [] and sinks.records() == []
        assert bench.store.live() == 0
        bench.call(agent, "after", "[tools:1]")  # outside the block: traced as usual
    names = sorted(s.name for s in _ours(bench))
    assert names.count("invoke_agent hermes") == 1 and names.count("chat fake-model") == 2
    assert sum(1 for s in _ours(bench) if s.name == "POST") == 2
    assert sinks.points() and len(sinks.records()) == 2


def _semconv_version(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def test_tracer_meter_and_logger_carry_our_version_and_the_conventions_schema(bench: HermesBench, sinks: Sinks) -> None:
    bench.call(bench.agent(), "scope", "[tools:1]")
    expected = Schemas.V1_37_0.value
    spans = _ours(bench)
    assert spans and {(s.instrumentation_scope.name, s.instrumentation_scope.version, s.instrumentation_scope.schema_url)
                      for s in spans} == {("statebackends_hermes_agent", __version__, expected)}
    scopes = {(scope.name, scope.version, scope.schema_url) for scope, _, _ in sinks.points()}
    assert scopes == {("statebackends_hermes_agent", __version__, expected)}
    records = sinks.records()
    assert records
    for record in records:
        scope = getattr(record, "instrumentation_scope", None) or record.log_record.instrumentation_scope  # SDK moved it
        assert (scope.version, scope.schema_url) == (__version__, expected)


def test_the_schema_is_that_of_the_conventions_our_attributes_and_messages_follow() -> None:
    """One release throughout: the schema URL, the version the instrumentation declares, and the conventions the
    message JSON schema (which every captured message is validated against) was written from; every gen_ai attribute
    and metric name we emit is defined by the conventions package."""
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes
    from opentelemetry.semconv._incubating.metrics import gen_ai_metrics

    assert genai.SCHEMA_URL == Schemas.V1_37_0.value
    assert _semconv_version(genai.SCHEMA_URL) == genai.SEMCONV_VERSION == "1.37.0"
    description = json.loads((SCHEMAS / "gen_ai_messages.json").read_text())["description"]
    assert f"version {genai.SEMCONV_VERSION}" in description
    defined = {v for k, v in vars(gen_ai_attributes).items() if k.startswith("GEN_AI_") and isinstance(v, str)}
    emitted = {"gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
               "gen_ai.response.id", "gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
               "gen_ai.usage.output_tokens", "gen_ai.agent.name", "gen_ai.conversation.id", "gen_ai.tool.name",
               "gen_ai.tool.type", "gen_ai.tool.call.id", "gen_ai.input.messages", "gen_ai.output.messages",
               "gen_ai.tool.call.arguments", "gen_ai.tool.call.result", "gen_ai.token.type"}
    assert emitted <= defined, sorted(emitted - defined)
    metrics = {v for k, v in vars(gen_ai_metrics).items() if k.startswith("GEN_AI_") and isinstance(v, str)}
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= metrics
