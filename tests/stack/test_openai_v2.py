"""openai-v2 beside ours: the LLM span is doubled, and so is ``gen_ai.client.token.usage``, unless one is turned off.

opentelemetry-bootstrap installs opentelemetry-instrumentation-openai-v2 in every Hermes environment (Hermes
depends on openai). It wraps ``openai``'s ``Completions.create``, which Hermes calls inside our ``chat``: so every
LLM call gets two LLM spans, ours (Hermes's view: its provider, conversation, react step) and theirs (the
OpenAI client's view), and two ``gen_ai.client.token.usage`` records of the same tokens under two instrumentation
scopes. A backend that sums the metric by name counts every token twice.

The policy asserted here: theirs is left on and nested under ours (we do not suppress it: it has no switch to
honour, and suppressing instrumentation through the context would also silence the httpx span that carries the
``traceparent`` to the LLM endpoint); the double count is real, and a user avoids it by turning one off:
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=openai`` (the entry point's name), or, to keep openai-v2's spans, an SDK
``View`` that drops its token metric. Each is proven with the SDK's ``InMemoryMetricReader`` on the real agent.
"""

from __future__ import annotations

from collections import Counter
from importlib.metadata import entry_points
from typing import Any, Iterator, Optional

import pytest
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.instrumentation.threading import ThreadingInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import DropAggregation, View
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from statebackends_hermes_agent import HermesAgentInstrumentor
from statebackends_hermes_testbed.fakellm import FakeLLMServer
from statebackends_hermes_testbed.hermes_harness import make_agent

OURS = "statebackends_hermes_agent"
THEIRS = "opentelemetry.util.genai.handler"
"""The scope of openai-v2 2.4b0's spans and metrics (its ``TelemetryHandler``, from opentelemetry-util-genai)."""
TOKEN_USAGE = "gen_ai.client.token.usage"
DROP_THEIR_TOKENS = View(instrument_name=TOKEN_USAGE, meter_name=THEIRS, aggregation=DropAggregation())
"""The SDK view that keeps openai-v2's spans but drops its copy of the token metric."""


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


class Stack:
    """Ours, openai-v2 (unless ``openai=False``), httpx and threading on in-memory SDK providers (``views``)."""

    def __init__(self, *, openai: bool = True, views: tuple[View, ...] = ()) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metrics], views=list(views))
        providers = {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}
        self.instrumentors: list[Any] = [HermesAgentInstrumentor(), HTTPXClientInstrumentor(), ThreadingInstrumentor()]
        if openai:
            self.instrumentors.append(OpenAIInstrumentor())
        for instrumentor in self.instrumentors:
            instrumentor.instrument(**providers)

    def close(self) -> None:
        for instrumentor in reversed(self.instrumentors):
            instrumentor.uninstrument()
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()

    def token_sums(self) -> Counter[tuple[str, str]]:
        """``(scope, token type) -> summed tokens`` of every ``gen_ai.client.token.usage`` point."""
        sums: Counter[tuple[str, str]] = Counter()
        data = self.metrics.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == TOKEN_USAGE:
                        for point in metric.data.data_points:
                            sums[(scope.scope.name, str(point.attributes.get("gen_ai.token.type")))] += int(point.sum)
        return sums


def run_turns(llm: FakeLLMServer, stack: Stack, tag: str) -> tuple[int, int]:
    """A streaming and a non-streaming turn (one tool each) of tag ``tag``; the tokens the fake LLM served for it."""
    for streaming in (True, False):
        agent = make_agent(llm.base_url, streaming=streaming)
        result = agent.run_conversation(f"[conv:{tag}] [tools:1] hello")
        assert result["final_response"] == f"done {tag}"
    return llm.totals(tag)


def test_the_entry_point_a_user_disables_is_named_openai() -> None:
    (ep,) = [ep for ep in entry_points(group="opentelemetry_instrumentor") if ep.value.startswith("opentelemetry.instrumentation.openai_v2")]
    assert ep.name == "openai"


def test_their_llm_span_nests_under_our_chat_and_the_http_span_under_theirs(llm: FakeLLMServer) -> None:
    stack = Stack()
    try:
        run_turns(llm, stack, "nest")
    finally:
        stack.close()
    spans = stack.spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}

    def parent(span: Any) -> Optional[Any]:
        return by_id.get(span.parent.span_id) if span.parent is not None else None

    ours = [s for s in spans if s.instrumentation_scope.name == OURS and s.name.startswith("chat ")]
    theirs = [s for s in spans if s.instrumentation_scope.name == THEIRS]
    posts = [s for s in spans if s.instrumentation_scope.name == "opentelemetry.instrumentation.httpx" and s.name.startswith("POST")]
    assert len(ours) == len(theirs) == len(posts) == 4  # two turns, two LLM calls each
    assert sorted(parent(s).context.span_id for s in theirs) == sorted(s.context.span_id for s in ours)
    assert sorted(parent(s).context.span_id for s in posts) == sorted(s.context.span_id for s in theirs)
    # Both say the same about the call: the same tokens, from the same response.
    for span in theirs:
        mine = parent(span)
        for key in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"):
            assert span.attributes[key] == mine.attributes[key]


def test_both_on_count_every_token_twice(llm: FakeLLMServer) -> None:
    """KNOWN: with both on, ``gen_ai.client.token.usage`` holds every token once per scope, so twice in all."""
    stack = Stack()
    try:
        served_in, served_out = run_turns(llm, stack, "twice")
        sums = stack.token_sums()
    finally:
        stack.close()
    assert sums[(OURS, "input")] == sums[(THEIRS, "input")] == served_in
    assert sums[(OURS, "output")] == sums[(THEIRS, "output")] == served_out
    assert sum(v for (_, kind), v in sums.items() if kind == "input") == 2 * served_in


@pytest.mark.parametrize("avoid", ["openai-v2 disabled", "view drops theirs"])
def test_turning_one_off_counts_every_token_once(llm: FakeLLMServer, avoid: str) -> None:
    stack = Stack(openai=False) if avoid == "openai-v2 disabled" else Stack(views=(DROP_THEIR_TOKENS,))
    tag = avoid.split()[0].replace("-", "")
    try:
        served_in, served_out = run_turns(llm, stack, tag)
        sums = stack.token_sums()
    finally:
        stack.close()
    assert dict(sums) == {(OURS, "input"): served_in, (OURS, "output"): served_out}
    if avoid == "view drops theirs":  # their spans are still there, nested under ours
        assert [s.instrumentation_scope.name for s in stack.spans.get_finished_spans()].count(THEIRS) == 4
