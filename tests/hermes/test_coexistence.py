"""Ours beside loongsuite's Hermes instrumentation, both active in one process, on the REAL agent (fake LLM on 127.0.0.1).

Both instrumentors are instrumented on one SDK TracerProvider (in-memory exporter), in both orders
(ours first: loongsuite's wrappers end up outside ours; loongsuite first: ours outside theirs). It proves:

1. the agent's result (answer, flags, tool results) is the uninstrumented run's;
2. our spans (scope ``statebackends_hermes_agent``) are complete and parented among themselves:
   ``invoke_agent hermes`` > 2 ``react step`` > ``chat``, the tool under the first step, one trace per
   call, the right response and tool call ids, and our store holds nothing after the call;
3. the same for 4 overlapping calls on one shared agent: each trace holds only its own call's spans;
4. uninstrumenting both leaves every method either wraps as the original object and a call makes no
   span, in every order but one (below), where loongsuite's unwrap leaves its own wrappers tracing.

Observed and pinned (asserted, so a change in either shows up here):
- Each uses the ambient context, so the outer one's spans become parents of the inner one's
  (``CROSS_EDGES``): ours first, our ``invoke_agent`` hangs under loongsuite's ``invoke_agent Hermes``
  (below its ``enter_ai_application_system``) and its ``react step`` spans hang under OUR
  ``invoke_agent`` instead of its own; loongsuite first, its ``invoke_agent Hermes`` hangs under ours
  (and it opens no entry span, since a GenAI span is current), its ``react step`` spans under OUR
  ``chat`` (current for the LLM call it wraps inside ours) and its ``execute_tool`` under OUR
  ``execute_tool``. Our step, chat and tool spans never have one of theirs as parent.
- In between (one removed, the other still on): OpenTelemetry's ``unwrap`` peels the OUTERMOST wrapper,
  whoever asks; our ``_uninstrument`` takes out OUR wrapper wherever it sits, never another's, and a
  wrapper of ours it cannot reach only passes calls through. So removing ours always leaves exactly
  loongsuite's tracing, and removing loongsuite's while it is the outer one leaves exactly ours.
  KNOWN-BAD, loongsuite's doing: removing loongsuite's while ours is outside it peels OURS (we say
  instrumented and make no span, it says uninstrumented and still traces), and its wrappers then stay
  on the methods we both wrap, tracing, after both are removed.
"""

from __future__ import annotations

import importlib
from collections import Counter
from typing import Any, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from wrapt import ObjectProxy

import statebackends_hermes_agent
from statebackends_hermes_testbed.driver import HermesBench, run_threads
from statebackends_hermes_testbed.modes import loongsuite_available, loongsuite_skip_reason
from statebackends_hermes_testbed.traces import CALLER_PREFIX

pytestmark = pytest.mark.skipif(not loongsuite_available(), reason=loongsuite_skip_reason())

OURS = statebackends_hermes_agent.__name__  # our tracer's instrumentation scope
THEIRS = "opentelemetry.util.genai.handler"  # loongsuite 0.9.0's spans come from its util-genai handler's tracer
WHO = {OURS: "ours", THEIRS: "theirs"}
ORDERS = ["ours_first", "theirs_first"]
DIRECTIVES = "[tools:1]"
OUR_TREE = {"invoke_agent hermes": 1, "react step": 2, "chat fake-model": 2, "execute_tool sb_echo": 1}
# Edges (child's owner, child, parent's owner, parent) between the two instrumentations, per call, as observed.
CROSS_EDGES = {
    "ours_first": {("ours", "invoke_agent hermes", "theirs", "invoke_agent Hermes"): 1,
                   ("theirs", "react step", "ours", "invoke_agent hermes"): 2},
    "theirs_first": {("theirs", "invoke_agent Hermes", "ours", "invoke_agent hermes"): 1,
                     ("theirs", "react step", "ours", "chat fake-model"): 2,  # our chat is current for the call
                     ("theirs", "execute_tool sb_echo", "ours", "execute_tool sb_echo"): 1},
}
# The span each call's caller span is the parent of: the outermost wrapper's first span.
OUTERMOST = {"ours_first": ("theirs", "enter_ai_application_system"), "theirs_first": ("ours", "invoke_agent hermes")}
# What loongsuite 0.9.0 wraps (its instrumentor.py); ours is the instrumentation's own table.
THEIR_TARGETS = [("run_agent", f"AIAgent.{m}") for m in (
    "run_conversation", "_interruptible_api_call", "_interruptible_streaming_api_call", "_invoke_tool", "_execute_tool_calls",
)] + [("run_agent", "handle_function_call"), ("model_tools", "handle_function_call"), ("tools.memory_tool", "memory_tool"),
      ("tools.todo_tool", "todo_tool"), ("tools.session_search_tool", "session_search"), ("tools.delegate_tool", "delegate_task")]
TARGETS = sorted({(m, n) for m, n, _ in statebackends_hermes_agent._WRAPPED} | set(THEIR_TARGETS))


def _owner(target: tuple[str, str]) -> tuple[Any, str]:
    owner: Any = importlib.import_module(target[0])
    *path, attribute = target[1].split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attribute


def _static(target: tuple[str, str]) -> Any:
    """What the module or class itself holds (no descriptor binding)."""
    owner, attribute = _owner(target)
    return vars(owner)[attribute]


@pytest.fixture(scope="module")
def originals(hermes_bench: HermesBench) -> dict[tuple[str, str], Any]:
    hermes_bench.uninstrument()
    found = {t: _static(t) for t in TARGETS}
    assert not any(isinstance(f, ObjectProxy) for f in found.values()), "captured while something was wrapped"
    return found


class Both:
    """Our instrumentor and loongsuite's on one provider with an in-memory exporter, instrumented in ``order``."""

    def __init__(self, bench: HermesBench, order: str) -> None:
        self.bench, self.order = bench, order
        self.ours, self.theirs = bench.instrumentors.ours, bench.instrumentors.theirs
        self.sequence = (self.ours, self.theirs) if order == "ours_first" else (self.theirs, self.ours)
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def instrument(self) -> None:
        for instrumentor in self.sequence:
            extra = {"state_backend": "invocation_id"} if instrumentor is self.ours else {}
            instrumentor.instrument(tracer_provider=self.provider, **extra)
        assert self.ours.is_instrumented_by_opentelemetry and self.theirs.is_instrumented_by_opentelemetry
        self.store = self.ours.store

    def scopes(self) -> set[str]:
        return {s.instrumentation_scope.name for s in self.exporter.get_finished_spans()}


@pytest.fixture(params=ORDERS)
def both(hermes_bench: HermesBench, originals: dict, request: pytest.FixtureRequest) -> Iterator[Both]:
    hermes_bench.uninstrument()
    hermes_bench.reset()
    yield Both(hermes_bench, request.param)
    hermes_bench.uninstrument()
    hermes_bench.reset()
    for target, original in originals.items():  # never leave a wrapper to the other modules, whatever broke here
        if _static(target) is not original:
            setattr(*_owner(target), original)


@pytest.fixture
def hermes(hermes_bench: HermesBench) -> Any:
    return hermes_bench.agent()  # real, non-streaming (so it may be shared by threads), built once per session


def shape(result: Any) -> dict[str, Any]:
    return {"final_response": result.get("final_response"), "completed": result.get("completed"),
            "failed": result.get("failed"), "error": result.get("error"),
            "tools": [m.get("content") for m in result.get("messages", []) if m.get("role") == "tool"]}


def check_our_trees(both: Both, tags: list[str]) -> None:
    """Per call (its caller span's trace): our spans, complete, parented among themselves, with its own ids only."""
    callers = {s.context.trace_id: s for s in both.bench.exporter.get_finished_spans() if s.name.startswith(CALLER_PREFIX)}
    assert sorted(c.name[len(CALLER_PREFIX):] for c in callers.values()) == sorted(tags)
    ours = [s for s in both.exporter.get_finished_spans() if s.instrumentation_scope.name == OURS]
    assert {s.context.trace_id for s in ours} == set(callers), "our spans are in the calls' traces only"
    parent = {s.context.span_id: (s.parent.span_id if s.parent else None) for s in ours}
    for trace_id, caller in callers.items():
        tag = caller.name[len(CALLER_PREFIX):]
        mine = sorted((s for s in ours if s.context.trace_id == trace_id), key=lambda s: s.start_time)
        assert Counter(s.name for s in mine) == OUR_TREE, (tag, [s.name for s in mine])
        (agent,) = [s for s in mine if s.name.startswith("invoke_agent")]
        steps = [s.context.span_id for s in mine if s.name == "react step"]
        chats = [s for s in mine if s.name.startswith("chat ")]
        (tool,) = [s for s in mine if s.name.startswith("execute_tool")]
        assert all(parent[step] == agent.context.span_id for step in steps), tag
        assert [parent[c.context.span_id] for c in chats] == steps, f"{tag}: one chat under each of our steps"
        assert parent[tool.context.span_id] == steps[0], f"{tag}: the tool under our first step"
        assert [c.attributes.get("gen_ai.response.id") for c in chats] == [f"chatcmpl-{tag}-1", f"chatcmpl-{tag}-2"]
        assert tool.attributes.get("gen_ai.tool.call.id") == f"call_{tag}_1"
        assert agent.attributes.get("gen_ai.response.id") == f"chatcmpl-{tag}-2"
    assert both.store.live() == 0, "no state left in our store"


def cross_edges(both: Both) -> Counter:
    spans = both.exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    edges: Counter = Counter()
    for s in spans:
        p = by_id.get(s.parent.span_id) if s.parent else None
        if p is not None and p.instrumentation_scope.name != s.instrumentation_scope.name:
            edges[(WHO[s.instrumentation_scope.name], s.name, WHO[p.instrumentation_scope.name], p.name)] += 1
    return edges


def outermost(both: Both) -> set[tuple[str, str]]:
    """The spans whose parent is a caller span (of the bench's own provider)."""
    callers = {s.context.span_id for s in both.bench.exporter.get_finished_spans() if s.name.startswith(CALLER_PREFIX)}
    return {(WHO[s.instrumentation_scope.name], s.name) for s in both.exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id in callers}


def test_the_agents_result_is_the_uninstrumented_one(both: Both, hermes: Any) -> None:
    tag = f"co-out-{both.order}"
    reference = shape(both.bench.call(hermes, tag, DIRECTIVES))
    assert reference["tools"] == [f"{tag}-1"] and reference["final_response"] == f"done {tag}", reference
    assert both.exporter.get_finished_spans() == ()
    both.bench.server.reset()
    both.instrument()
    assert shape(both.bench.call(hermes, tag, DIRECTIVES)) == reference
    assert both.scopes() == {OURS, THEIRS}, "both really traced the call"


def test_our_spans_are_complete_and_parented_among_themselves(both: Both, hermes: Any) -> None:
    both.instrument()
    tag = f"co-tree-{both.order}"
    assert both.bench.call(hermes, tag, DIRECTIVES)["final_response"] == f"done {tag}"
    check_our_trees(both, [tag])
    assert both.scopes() == {OURS, THEIRS}
    assert outermost(both) == {OUTERMOST[both.order]}
    assert cross_edges(both) == Counter(CROSS_EDGES[both.order]), "the parent links between the two, as observed"


def test_overlapping_calls_on_one_shared_agent_do_not_cross_talk(both: Both, hermes: Any) -> None:
    both.instrument()
    tags = [f"co-th{i}-{both.order}" for i in range(4)]
    results = run_threads(lambda i: both.bench.call(hermes, tags[i], f"{DIRECTIVES} [delay_ms:20]"), len(tags))
    for tag, result in zip(tags, results):
        assert (result["final_response"], shape(result)["tools"]) == (f"done {tag}", [f"{tag}-1"])
    check_our_trees(both, tags)
    assert cross_edges(both) == Counter({edge: n * len(tags) for edge, n in CROSS_EDGES[both.order].items()})


@pytest.mark.parametrize("release", ["last_instrumented_first", "first_instrumented_first"])
def test_uninstrumenting_both_in_either_order(
    both: Both, hermes: Any, originals: dict, release: str
) -> None:
    both.instrument()
    assert all(isinstance(_static(t), ObjectProxy) for t in TARGETS), "every target wrapped while both are on"
    store, inner = both.store, both.sequence[0]
    first, second = both.sequence[::-1] if release == "last_instrumented_first" else both.sequence
    first.uninstrument()
    assert not first.is_instrumented_by_opentelemetry and second.is_instrumented_by_opentelemetry
    assert both.bench.call(hermes, "co-mid", DIRECTIVES)["final_response"] == "done co-mid"
    # In between: ours removed -> only loongsuite traces (we take out our own wrapper wherever it sits);
    # loongsuite removed while outer -> only ours; loongsuite removed while INNER -> its unwrap peels our
    # outer wrapper: KNOWN-BAD, only loongsuite (the removed one) traces.
    assert both.scopes() == {THEIRS if first is both.ours or inner is both.theirs else OURS}
    assert store.live() == 0
    second.uninstrument()
    assert not both.ours.is_instrumented_by_opentelemetry and not both.theirs.is_instrumented_by_opentelemetry
    left = [t for t in TARGETS if _static(t) is not originals[t]]
    # KNOWN-BAD, loongsuite's doing: removed first while inner, its unwrap took OUR outer wrapper for its own,
    # so its wrappers stay on the methods we both wrap (ours never removes a wrapper that is not its own).
    peeled = first is both.theirs and inner is both.theirs
    shared = sorted({(m, n) for m, n, _ in statebackends_hermes_agent._WRAPPED} & set(THEIR_TARGETS))
    try:
        assert left == (shared if peeled else []), f"still wrapped after uninstrumenting both: {left}"
        both.exporter.clear()
        assert both.bench.call(hermes, "co-after", DIRECTIVES)["final_response"] == "done co-after"
        assert both.scopes() == ({THEIRS} if peeled else set()), "ours traces nothing once uninstrumented"
    finally:
        for target in left:  # put back what the module-scoped fixture captured, for the next tests
            owner, attribute = _owner(target)
            setattr(owner, attribute, originals[target])
