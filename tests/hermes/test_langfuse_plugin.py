"""Hermes's own Langfuse plugin (``plugins/observability/langfuse``, the real ``langfuse`` SDK) beside our instrumentation.

The plugin is enabled as a user enables it (``plugins.enabled: [observability/langfuse]`` in config.yaml,
keys and ``HERMES_LANGFUSE_BASE_URL`` in the environment) and loaded by Hermes's plugin discovery, which
calls its ``register(ctx)``: its hooks run inside the REAL agent's turn. The SDK exports OTLP/HTTP to a
loopback sink (:class:`OTLPSink`), decoded here. The module enables it once (``plugin`` fixture) and,
at the end, shuts the SDK down, unregisters the hooks and puts back OpenTelemetry's global tracer
provider, which the SDK replaces with its own when none is set (asserted at teardown).

What the plugin does to the OpenTelemetry context (observed, and asserted below):
- ``_start_root_trace`` (first ``pre_api_request`` of a turn) runs ``client.start_as_current_observation(...)
  .__enter__()`` INSIDE ``with propagate_attributes(...)``. That ``__enter__`` attaches two contexts (the
  remote parent of the seeded trace id, then the ``Hermes turn`` span); ``propagate_attributes``'s exit then
  resets the context variable to what it was before it, so the ``Hermes turn`` span is current only inside
  that call, and never while our chat and tool spans start.
- ``_finish_trace`` never calls ``__exit__``; it drops the state, and CPython closes the abandoned generator
  at once, in the agent's thread: its ``finally`` blocks detach their tokens, which REWINDS the context
  variable to the one inside ``propagate_attributes`` at the turn's first request: the caller's context plus
  ``langfuse.propagated.*`` values (session id, trace name ``Hermes turn``, tags). Without our
  instrumentation that context stays current in the calling thread after ``run_conversation`` returns, and
  every span started later on the SDK's (global) provider takes the Hermes session's Langfuse attributes.
  Our ``invoke_agent`` detaches its own token at the end, which puts back the caller's exact context.
- ``propagate_attributes`` also WRITES ``session.id``, ``langfuse.trace.name`` ("Hermes turn") and
  ``langfuse.trace.tags`` onto whatever span is current when it is entered: our ``invoke_agent`` when ours is
  on (on any provider), else the application's own span around ``run_conversation``.
- The SDK makes its own provider the global one when none is set: ours instrumented without a
  ``tracer_provider`` then sends its spans through Langfuse's processor, whose default filter (``gen_ai.*``)
  exports them to Langfuse, in traces of their own (no parent edge either way).
- Plugin-side, pinned: with langfuse 5 (no ``set_trace_io``) ``_finish_trace`` raises before ending the
  ``Hermes turn`` root, so it is never exported (its children are); overlapping turns with one task id share
  one Langfuse trace id (``create_trace_id(seed=session::task_id)``), each under its own root.
"""

from __future__ import annotations

import contextvars
from collections import Counter
from typing import Any, Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider

from statebackends_hermes_testbed.driver import HermesBench, run_threads
from statebackends_hermes_testbed.langfuse_plugin import LangfusePlugin, OTLPSink
from statebackends_hermes_testbed.traces import CALLER_PREFIX

GOOD_BACKENDS = ["invocation_id", "contextvar", "otel_context"]
HOOKS = ["pre_api_request", "post_api_request", "pre_llm_call", "post_llm_call", "pre_tool_call", "post_tool_call"]
OUR_TREE = {"invoke_agent hermes": 1, "react step": 2, "chat fake-model": 2, "execute_tool sb_echo": 1}
THEIR_CHILDREN = {"LLM call 1": 1, "Tool: sb_echo": 1, "LLM call 2": 1}
PROPAGATED = "langfuse.propagated."
LANGFUSE_LABELS = ("session.id", "langfuse.trace.name", "langfuse.trace.tags")


def labels_of(agent: Any) -> dict[str, Any]:
    """What ``propagate_attributes`` (in ``_start_root_trace``) writes onto the span current when it is entered."""
    return {"session.id": agent.session_id, "langfuse.trace.name": "Hermes turn", "langfuse.trace.tags": ("hermes", "langfuse")}


def _root_is_ended() -> bool:
    """langfuse < 5 still has ``set_trace_io``, which ``_finish_trace`` calls before ending the root."""
    from langfuse._client.span import LangfuseObservationWrapper

    return hasattr(LangfuseObservationWrapper, "set_trace_io")


ROOT_ENDED = _root_is_ended()


def shape(result: Any) -> dict[str, Any]:
    return {"final_response": result.get("final_response"), "completed": result.get("completed"),
            "failed": result.get("failed"), "error": result.get("error"),
            "tools": [m.get("content") for m in result.get("messages", []) if m.get("role") == "tool"]}


@pytest.fixture(scope="module")
def plugin(hermes_bench: HermesBench) -> Iterator[LangfusePlugin]:
    """The plugin enabled through Hermes's discovery, for the whole module; everything global put back after."""
    hermes_bench.uninstrument()
    hermes_bench.reset()
    saved_provider = trace._TRACER_PROVIDER
    baseline = shape(hermes_bench.agent().run_conversation("[conv:one] [tools:1] hello"))  # no plugin, no ours
    sink = OTLPSink().start()
    lf = LangfusePlugin(sink)
    try:
        lf.enable()
        lf.baseline = baseline  # type: ignore[attr-defined]
        yield lf
    finally:
        try:
            lf.disable()
        finally:
            sink.stop()
    assert trace._TRACER_PROVIDER is saved_provider, "the SDK's global tracer provider was not taken back"
    assert not any(lf.module.__name__ in owners for owners in lf.hook_owners().values())


@pytest.fixture
def lf(plugin: LangfusePlugin, bench: HermesBench) -> Iterator[LangfusePlugin]:
    plugin.flush()
    plugin.sink.clear()
    yield plugin
    plugin.flush()


def isolated(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in a copy of this thread's context, so what it leaves attached stays there."""
    return contextvars.copy_context().run(fn, *args, **kwargs)


def their_spans(lf: LangfusePlugin) -> list[Any]:
    lf.flush()
    return lf.sink.spans()


def their_turns(spans: list[Any]) -> dict[int, list[Any]]:
    """Langfuse's spans by trace id."""
    out: dict[int, list[Any]] = {}
    for s in spans:
        out.setdefault(s.trace_id, []).append(s)
    return out


def check_their_turn(spans: list[Any]) -> None:
    """One Langfuse turn: the three children under one root; the root exported only where it is ended."""
    names = Counter(s.name for s in spans)
    assert names == {**THEIR_CHILDREN, **({"Hermes turn": 1} if ROOT_ENDED else {})}, names
    children = [s for s in spans if s.name != "Hermes turn"]
    assert len({s.parent_span_id for s in children}) == 1
    if ROOT_ENDED:
        (root,) = [s for s in spans if s.name == "Hermes turn"]
        assert children[0].parent_span_id == root.span_id


def our_spans_by_call(bench: HermesBench) -> dict[str, list[Any]]:
    bench.provider.force_flush()
    spans = bench.exporter.get_finished_spans()
    callers = {s.context.trace_id: s.name[len(CALLER_PREFIX):] for s in spans if s.name.startswith(CALLER_PREFIX)}
    out: dict[str, list[Any]] = {tag: [] for tag in callers.values()}
    for s in spans:
        if not s.name.startswith(CALLER_PREFIX):
            out[callers[s.context.trace_id]].append(s)
    return out


def check_our_calls(bench: HermesBench, tags: list[str]) -> None:
    """Each call: our tree complete and right (the judge), tokens the fake LLM's totals, nothing open, store empty."""
    verdict = bench.verdict([bench.truth(tag, tools=1) for tag in tags])
    assert verdict.ok and not verdict.broken, verdict
    by_call = our_spans_by_call(bench)
    assert sorted(by_call) == sorted(tags)
    for tag in tags:
        mine = by_call[tag]
        assert Counter(s.name for s in mine) == OUR_TREE, (tag, [s.name for s in mine])
        (agent,) = [s for s in mine if s.name == "invoke_agent hermes"]
        ids = {s.context.span_id for s in mine}
        for s in mine:
            if s is not agent:
                assert s.parent.span_id in ids, (tag, s.name)
        assert (agent.attributes["gen_ai.usage.input_tokens"], agent.attributes["gen_ai.usage.output_tokens"]) \
            == bench.server.totals(tag)
    assert bench.tracker.open_spans() == []
    assert verdict.state_left == 0


# -- 1. one turn -------------------------------------------------------------------------------------------------------


def test_plugin_is_loaded_by_hermes_discovery(lf: LangfusePlugin) -> None:
    owners = lf.hook_owners()
    for hook in HOOKS:
        assert lf.module.__name__ in owners.get(hook, []), hook
    assert lf.module.Langfuse is not None, "the plugin found the langfuse SDK"


@pytest.mark.parametrize("backend", GOOD_BACKENDS)
def test_turn_with_plugin_keeps_result_and_our_tree(bench: HermesBench, lf: LangfusePlugin, backend: str) -> None:
    store = bench.instrument(backend)
    result = isolated(bench.call, bench.agent(), "one", "[tools:1]")
    assert shape(result) == lf.baseline == {  # type: ignore[attr-defined]
        "final_response": "done one", "completed": True, "failed": False, "error": None, "tools": ["one-1"]}
    check_our_calls(bench, ["one"])
    assert store is bench.store
    # KNOWN (the SDK's propagate_attributes): the Hermes session is written onto the span current at the turn's
    # first request, which is our invoke_agent; our other spans are left alone.
    spans = our_spans_by_call(bench)["one"]
    (agent_span,) = [s for s in spans if s.name == "invoke_agent hermes"]
    assert {k: agent_span.attributes.get(k) for k in LANGFUSE_LABELS} == labels_of(bench.agent())
    assert not any(k in s.attributes for s in spans if s is not agent_span for k in LANGFUSE_LABELS)
    # The plugin traced the same turn (its side, not ours), and holds no state for it.
    check_their_turn(their_spans(lf))
    assert lf.open_turns() == 0


# -- 2. the application's context after the turn -------------------------------------------------------------------------


def _after_turn(bench: HermesBench, agent: Any) -> dict[str, Any]:
    """A top-level turn, then one under a caller span, then spans started after it, all in one fresh context."""
    app_tracer = trace.get_tracer("app")  # the global provider's: the SDK's own once the plugin has run
    out: dict[str, Any] = {"before": otel_context.get_current()}
    agent.run_conversation("[conv:top] [tools:1] hello")
    out["after_top"] = otel_context.get_current()
    with bench.tracer.start_as_current_span(f"{CALLER_PREFIX}inner") as caller:
        out["caller"], out["inside_before"] = caller, otel_context.get_current()
        agent.run_conversation("[conv:inner] [tools:1] hello")
        out["inside_after"] = otel_context.get_current()
        with bench.tracer.start_as_current_span("user span") as user:
            out["user"] = user
        app = app_tracer.start_span("app span")
        app.end()
        out["app"] = app
    out["after_caller"] = otel_context.get_current()
    return out


@pytest.mark.parametrize("mode", ["none", *GOOD_BACKENDS])
def test_application_context_after_turn(bench: HermesBench, lf: LangfusePlugin, mode: str) -> None:
    if mode != "none":
        bench.instrument(mode)
    agent = bench.agent()
    seen = isolated(_after_turn, bench, agent)
    provider = trace.get_tracer_provider()
    assert isinstance(provider, SDKTracerProvider) and provider is not bench.provider, "the SDK's provider went global"
    leaked = {PROPAGATED + "session_id": agent.session_id, PROPAGATED + "trace_name": "Hermes turn",
              PROPAGATED + "tags": ["hermes", "langfuse"]}
    # Whatever is attached, the current SPAN is the caller's: the Hermes turn span never stays current.
    assert not trace.get_current_span(seen["after_top"]).get_span_context().is_valid
    assert trace.get_current_span(seen["inside_after"]) is seen["caller"]
    assert seen["user"].parent.span_id == seen["caller"].get_span_context().span_id
    app_attributes = dict(seen["app"].attributes)
    if mode == "none":
        # KNOWN-BAD (the plugin's): the turn leaves the context rewound to its propagate_attributes scope.
        assert seen["after_top"] is not seen["before"]
        assert {k: v for k, v in seen["after_top"].items() if k.startswith(PROPAGATED)} == leaked
        assert {k: v for k, v in seen["inside_after"].items() if k.startswith(PROPAGATED)} == leaked
        assert seen["inside_after"] is not seen["inside_before"]
        # ... and the caller's own span, current at the turn's first request, was labelled with the Hermes session.
        assert {k: seen["caller"].attributes.get(k) for k in LANGFUSE_LABELS} == labels_of(agent)
        # ... so a later, unrelated span on the SDK's provider is labelled with the Hermes session.
        assert app_attributes.get("session.id") == agent.session_id
        assert app_attributes.get("langfuse.trace.name") == "Hermes turn"
        # The caller span's own detach puts back what was current before it: still the leaked context.
        assert {k for k in seen["after_caller"] if k.startswith(PROPAGATED)} == set(leaked)
    else:
        # Ours detaches its own token at the end of invoke_agent: the caller's exact context comes back.
        assert seen["after_top"] is seen["before"]
        assert seen["inside_after"] is seen["inside_before"]
        assert not any(k.startswith(PROPAGATED) for k in seen["after_caller"])
        assert "session.id" not in app_attributes and "langfuse.trace.name" not in app_attributes
        # Our invoke_agent is what is current at the turn's first request: it takes the labels, the caller's span none.
        assert not any(k in seen["caller"].attributes for k in LANGFUSE_LABELS)
        assert bench.tracker.open_spans() == []
    turns = their_turns(their_spans(lf))
    assert len(turns) == 2
    for spans in turns.values():
        check_their_turn(spans)
    assert lf.open_turns() == 0


# -- 3. several turns --------------------------------------------------------------------------------------------------


def _call_clean(bench: HermesBench, agent: Any, tag: str, **kwargs: Any) -> bool:
    """One call; True when the thread's context after it is the one before it."""
    before = otel_context.get_current()
    bench.call(agent, tag, "[tools:1]", **kwargs)
    return otel_context.get_current() is before


@pytest.mark.parametrize("backend", GOOD_BACKENDS)
def test_consecutive_turns(bench: HermesBench, lf: LangfusePlugin, backend: str) -> None:
    bench.instrument(backend)
    agent = bench.agent()
    tags = [f"seq{i}" for i in range(3)]
    clean = isolated(lambda: [_call_clean(bench, agent, tag) for tag in tags])
    assert clean == [True] * 3
    check_our_calls(bench, tags)
    turns = their_turns(their_spans(lf))
    assert len(turns) == 3  # one Langfuse trace per turn (each turn has its own task id)
    for spans in turns.values():
        check_their_turn(spans)
    assert lf.open_turns() == 0


@pytest.mark.parametrize("backend", GOOD_BACKENDS)
def test_concurrent_turns_on_one_agent(bench: HermesBench, lf: LangfusePlugin, backend: str) -> None:
    bench.instrument(backend)
    agent = bench.agent()
    tags = [f"par{i}" for i in range(4)]
    clean = run_threads(lambda i: _call_clean(bench, agent, tags[i]), len(tags))
    assert clean == [True] * 4
    check_our_calls(bench, tags)
    # Plugin-side: the LLM hooks carry their turn's id, so each turn's LLM calls are in its own trace. Its tool
    # hooks read the SHARED agent's ``_current_turn_id`` (the latest turn's), so under overlap a tool observation
    # is filed under another turn or dropped (that turn already finished): at most one per turn, placement racy.
    turns = their_turns(their_spans(lf))
    assert len(turns) == 4
    for spans in turns.values():
        assert Counter(s.name for s in spans if s.name.startswith("LLM call")) == {"LLM call 1": 1, "LLM call 2": 1}
    assert sum(s.name == "Tool: sb_echo" for spans in turns.values() for s in spans) <= 4
    assert lf.open_turns() == 0


@pytest.mark.parametrize("backend", GOOD_BACKENDS)
def test_overlapping_turns_with_one_task_id(bench: HermesBench, lf: LangfusePlugin, backend: str) -> None:
    bench.instrument(backend)
    agent = bench.agent()
    tags = ["same0", "same1"]
    # [delay_ms] keeps both turns' requests open at once; Hermes's front ends pass one task id per session.
    run_threads(lambda i: bench.call(agent, tags[i], "[tools:1] [delay_ms:50]", task_id="api-session-1"), 2)
    check_our_calls(bench, tags)
    # The plugin (its keys carry the turn id) keeps the turns apart, but seeds both trace ids with
    # session::task id: ONE Langfuse trace holding both turns, each under its own root.
    spans = their_spans(lf)
    assert len({s.trace_id for s in spans}) == 1
    children = [s for s in spans if s.name != "Hermes turn"]
    assert Counter(s.name for s in children if s.name.startswith("LLM call")) == {"LLM call 1": 2, "LLM call 2": 2}
    assert sum(s.name == "Tool: sb_echo" for s in children) <= 2  # tool hooks: the shared agent's latest turn id
    assert len({s.parent_span_id for s in children}) == 2
    assert Counter(s.name for s in spans)["Hermes turn"] == (2 if ROOT_ENDED else 0)
    assert lf.open_turns() == 0


# -- 4. parentage between their spans and ours ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["plugin_first", "ours_first"])
def test_no_parentage_between_langfuse_and_ours(bench: HermesBench, lf: LangfusePlugin, order: str) -> None:
    from hermes_cli import plugins

    agent = bench.agent()
    if order == "plugin_first":
        lf.reload()  # a fresh plugin module: its client is made by this warm-up turn, before ours exists
        isolated(agent.run_conversation, "[conv:warm] hello")
        assert lf.client is not None
        bench.instrument("invocation_id")
    else:
        bench.instrument("invocation_id")
        lf.reload()  # its client is made inside our invoke_agent, at the measured turn's first request
        assert lf.client is None
    lf.flush()
    lf.sink.clear()
    bench.reset()
    # What is current right after the plugin's hooks return, i.e. when Hermes goes on to the request or tool.
    current_after_hook: list[tuple[str, str]] = []
    manager = plugins.get_plugin_manager()
    probes = {hook: (lambda hook=hook, **_: current_after_hook.append(
        (hook, getattr(trace.get_current_span(), "name", "-")))) for hook in ("pre_api_request", "pre_tool_call")}
    for hook, probe in probes.items():
        manager._hooks.setdefault(hook, []).append(probe)
    try:
        isolated(bench.call, agent, "par", "[tools:1]")
    finally:
        for hook, probe in probes.items():
            manager._hooks[hook].remove(probe)
    # Ours is current at each hook (pre_tool_call fires before our execute_tool starts); theirs never is.
    assert current_after_hook == [("pre_api_request", "invoke_agent hermes"), ("pre_tool_call", "invoke_agent hermes"),
                                  ("pre_api_request", "invoke_agent hermes")]
    check_our_calls(bench, ["par"])
    ours = [s for s in bench.exporter.get_finished_spans()]
    theirs = their_spans(lf)
    check_their_turn(theirs)
    our_ids = {s.context.span_id for s in ours}
    their_ids = {s.span_id for s in theirs}
    assert {s.context.trace_id for s in ours}.isdisjoint({s.trace_id for s in theirs})
    assert not any(s.parent_span_id in our_ids for s in theirs), "a Langfuse span hangs under ours"
    assert not any(s.parent is not None and s.parent.span_id in their_ids for s in ours), "ours hangs under Langfuse's"
    # Their root's parent (exported where the root is) is the remote parent of the seeded trace id, not a span of ours.
    if ROOT_ENDED:
        (root,) = [s for s in theirs if s.name == "Hermes turn"]
        assert root.parent_span_id is not None and root.parent_span_id not in our_ids | their_ids
    assert lf.open_turns() == 0


def test_ours_on_the_global_provider_exports_into_langfuse(bench: HermesBench, lf: LangfusePlugin) -> None:
    """Ours instrumented as most users do (no tracer_provider): the global provider is the SDK's, so our spans
    go through Langfuse's processor and its default filter (``gen_ai.*`` attributes) exports them to Langfuse."""
    isolated(bench.agent().run_conversation, "[conv:warm] hello")  # the plugin's client exists: its provider is global
    lf.flush()
    lf.sink.clear()
    ours = bench.instrumentors.ours
    ours.instrument(state_backend="invocation_id")  # no tracer_provider: the global one
    try:
        result = isolated(bench.agent().run_conversation, "[conv:glob] [tools:1] hello")
    finally:
        ours.uninstrument()
    assert result["final_response"] == "done glob"
    spans = their_spans(lf)
    by_scope = Counter((s.scope, s.name) for s in spans)
    mine = [s for s in spans if s.scope == "statebackends_hermes_agent"]
    assert Counter(s.name for s in mine) == OUR_TREE, by_scope
    assert bench.exporter.get_finished_spans() == ()  # nothing went to the bench's own provider
    our_ids = {s.span_id for s in mine}
    theirs = [s for s in spans if s.scope != "statebackends_hermes_agent"]
    check_their_turn(theirs)
    (agent,) = [s for s in mine if s.name == "invoke_agent hermes"]
    assert agent.parent_span_id is None and len({s.trace_id for s in mine}) == 1
    assert all(s.parent_span_id in our_ids for s in mine if s is not agent)
    assert {s.trace_id for s in mine}.isdisjoint({s.trace_id for s in theirs})
    # Langfuse's processor labels spans from the context they start in: our invoke_agent starts before the
    # plugin's first hook of the turn, so none of ours carries the Hermes session.
    # propagate_attributes writes the Hermes session onto the span current at the turn's first request: our
    # invoke_agent (as on any provider); Langfuse's processor also marks it its app root. The rest carry none.
    assert {k: agent.attributes.get(k) for k in LANGFUSE_LABELS} == labels_of(bench.agent())
    assert agent.attributes.get("langfuse.internal.is_app_root") is True
    assert not any(k in s.attributes for s in mine if s is not agent for k in LANGFUSE_LABELS)
