"""Hermes's REAL OpenAI-compatible API server in process, its agents on the fake LLM, under our instrumentation.

``gateway/platforms/api_server.py`` (hermes-agent 0.19.0), class ``APIServerAdapter``, as read and relied on here:

* ``connect()`` builds the aiohttp app (middlewares from ``_make_profile_prefix_middleware()`` first) and serves it
  with ``web.TCPSite``; it refuses to start without a strong ``key`` (``_api_key_passes_startup_guard``).
* ``_handle_chat_completions`` (wrapped by ``_admit_api_agent_request``: auth, drain check, a pending-work
  reservation) names the session: ``X-Hermes-Session-Id`` when sent (honoured only with an API key; history is then
  loaded from ``state.db``), else ``_derive_chat_session_id(system prompt, first user message)`` (``api-<sha256>``).
  The only admission limit is ``_concurrency_limited_response`` (HTTP 429 past ``max_concurrent_runs``, 10 by
  default, counted over ALL sessions): nothing locks, queues or rejects a second turn on a busy session.
* ``_run_agent`` runs ``_run`` through ``await loop.run_in_executor(None, _run)``: the loop's default
  ``ThreadPoolExecutor``, NO context copy (its comment: "ContextVars do not follow run_in_executor threads").
  ``_run`` builds a NEW agent per request (``_create_agent``: ``AIAgent(model=_resolve_gateway_model(),
  **_resolve_runtime_agent_kwargs(), enabled_toolsets=_get_platform_tools(config, "api_server"), session_id=...)``,
  provider, base URL and key from ``config.yaml``) and calls
  ``agent.run_conversation(user_message, conversation_history, task_id=session_id or uuid4())``: every turn of one
  session carries the session id as its task id.
* A streaming request (``stream: true``) runs the same ``_run_agent`` in ``asyncio.ensure_future`` and relays the
  agent's deltas as SSE (``_write_sse_chat_completion``).

So two overlapping turns of one session are two agents (two owners) sharing one task id, each in its own executor
thread: the ``shared_task_id_two_agents`` row of the matrix, not two turns on one shared agent. The agents stream
from the LLM (Hermes's default), and Hermes's stream reassembly gives each response an id of its own
(``stream-<uuid4>``), which our spans do not record, so the fake LLM's ``chatcmpl-TAG-k`` ids do not reach the chat
spans: a call's own spans are
told by the tool call ids ``call_TAG_i``, the span counts and parents, and the token sums.

The caller span of :mod:`statebackends_hermes_testbed.traces` (``call <tag>``) is a SERVER span opened by a test
middleware in each request's handler task (:class:`statebackends_hermes_testbed.frontend_api.ApiServer`); overlap is
proven by ``sb_meet``, a tool waiting at a barrier that every turn's tool calls must reach before any returns.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import pytest
from opentelemetry import propagate, trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GenAI

from statebackends import Concurrency, available
from statebackends_hermes_testbed.driver import HermesBench, run_threads
from statebackends_hermes_testbed.frontend_api import (
    MEET_TOOL,
    ApiServer,
    Meeting,
    adopt_roots,
    agent_trees,
    api_server_config,
    post_chat,
)
from statebackends_hermes_testbed.scenarios import isolates_of, threading_instrumentation
from statebackends_hermes_testbed.traces import CallTruth, Verdict, judge

BACKENDS = list(available())
MODES = ["plain", "threading"]
"""``threading``: opentelemetry-instrumentation-threading enabled (OpenTelemetry's context rides
``ThreadPoolExecutor.submit``, so it crosses the server's executor hop)."""
POOLED = frozenset({Concurrency.COPIED_CONTEXT})
"""What a turn with 2+ tools requires: Hermes runs them in its tool pool through a context copy
(``propagate_context_to_thread``). Each turn has an agent of its own, so nothing else is shared."""
INLINE: frozenset[Concurrency] = frozenset()
"""What a turn with one tool requires: Hermes runs it inline in the turn's thread."""


@pytest.fixture(scope="module")
def api(hermes_bench: HermesBench) -> Iterator[ApiServer]:
    """The real API server on 127.0.0.1; ``config.yaml`` points its agents at the fake LLM (restored after)."""
    with api_server_config(hermes_bench.server.base_url):
        with ApiServer(hermes_bench.tracer) as server:
            yield server


@pytest.fixture
def server(api: ApiServer, bench: HermesBench) -> Iterator[ApiServer]:
    """``api`` with its request spans forgotten and a fresh default executor (``ApiServer.renew_executor``: no
    worker left from a run with the threading instrumentation on); every turn over and the adapter idle after."""
    api.request_spans.clear()
    api.renew_executor()
    yield api
    assert api.adapter_state() == {"inflight": 0, "pending": 0, "work": 0}


def mode_of(mode: str) -> Any:
    return threading_instrumentation() if mode == "threading" else contextlib.nullcontext()


def expected_broken(backend: str, requires: dict[str, frozenset[Concurrency]]) -> list[str]:
    """The tags whose requirements ``backend`` does not declare it isolates (their trees are expected broken)."""
    declared = isolates_of(backend)
    return sorted(tag for tag, needs in requires.items() if not needs <= declared)


def verdict_of(bench: HermesBench, truths: list[CallTruth]) -> tuple[Verdict, Verdict]:
    """(the judge's verdict on the spans as exported, the verdict with root ``invoke_agent`` trees adopted)."""
    bench.provider.force_flush()
    spans = bench.exporter.get_finished_spans()
    left = bench.store.live() if bench.store is not None else 0
    direct = judge(spans, truths, bench.tracker.open_spans(), state_left=left)
    adopted_spans, notes = adopt_roots(spans)
    adopted = judge(adopted_spans, truths, bench.tracker.open_spans(), state_left=left)
    adopted.notes.extend(notes)
    return direct, adopted


def assert_parentage(bench: HermesBench, server: ApiServer, tags: list[str], mode: str, direct: Verdict) -> None:
    """Each request's ``invoke_agent`` is a ROOT span without the threading instrumentation (the executor hop drops
    the request's context), and the child of that request's own span with it."""
    trees, _ = agent_trees(bench.exporter.get_finished_spans())
    roots = {tag: [t.root for t in trees if tag in {i.split("_")[1] for i in t.tool_call_ids()}] for tag in tags}
    for tag in tags:
        (request,) = server.request_spans[tag]
        (agent,) = roots[tag]
        assert request.attributes["http.response.status_code"] == 200
        if mode == "threading":
            assert agent.parent is not None and agent.parent.span_id == request.context.span_id, tag
            assert agent.context.trace_id == request.context.trace_id
        else:
            assert agent.parent is None, f"{tag}: invoke_agent hangs under {agent.parent}"
            assert agent.context.trace_id != request.context.trace_id
    if mode == "plain":  # every span of ours is in a trace no request span is in
        assert direct.orphans == sum(direct.actual.values()), direct.as_dict()


def assert_outcome(verdict: Verdict, broken: list[str], pooled_tools: dict[str, int]) -> None:
    """``verdict`` is ok when nothing is expected broken; else exactly ``broken`` are, each by its pooled tool spans
    misplaced (and nothing else: counts, tokens, ids, status and the store are right)."""
    assert verdict.expected == verdict.actual, verdict.as_dict()
    assert (verdict.cross_talk, verdict.never_ended, verdict.state_left, verdict.wrong_error) == (0, 0, 0, 0), (
        verdict.as_dict()
    )
    assert verdict.broken == broken, verdict.as_dict()
    assert verdict.orphans == sum(pooled_tools[tag] for tag in broken), verdict.as_dict()
    assert verdict.ok is (not broken), verdict.as_dict()


# -- 1. concurrent requests, distinct sessions -----------------------------------------------------------------------

DISTINCT = {"d0": 1, "d1": 2, "d2": 2}
"""Tag -> tool calls of its turn: one runs inline, two run in Hermes's pool. d2 is requested as SSE."""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_requests_on_distinct_sessions_each_get_their_own_tree(
    bench: HermesBench, server: ApiServer, backend: str, mode: str
) -> None:
    """Three overlapping requests (one streamed as SSE) on three sessions: each answer is the agent's own, and each
    request gets exactly one invoke_agent tree of its own spans, or exactly the breakage the backend declares."""
    store = bench.instrument(backend)
    bench.reset()
    tags, tools = list(DISTINCT), DISTINCT
    with mode_of(mode), Meeting.hold(sum(tools.values())) as meeting:
        replies = run_threads(
            lambda i: post_chat(server, tags[i], f"[conv:{tags[i]}] [tools:{tools[tags[i]]}] [tool:{MEET_TOOL}] hello",
                                stream=tags[i] == "d2"),
            len(tags),
        )
    assert not meeting.broken and len(meeting.met) == sum(tools.values()), "the turns did not overlap"
    # The SSE answer (d2) is the agent's deltas joined: Hermes streams a paragraph break before the text of a
    # round that follows tools, hence the strip for it alone.
    answers = [(r.status, r.content.strip() if t == "d2" else r.content) for t, r in zip(tags, replies)]
    assert answers == [(200, f"done {t}") for t in tags]
    assert replies[2].headers["Content-Type"].startswith("text/event-stream")
    sessions = [r.headers["X-Hermes-Session-Id"] for r in replies]
    assert len(set(sessions)) == 3 and all(s.startswith("api-") for s in sessions)  # _derive_chat_session_id
    assert {t: meeting.task_ids[f"{t}-1"] for t in tags} == dict(zip(tags, sessions))  # task_id = session id

    direct, adopted = verdict_of(bench, [bench.truth(t, tools=tools[t]) for t in tags])
    assert_parentage(bench, server, tags, mode, direct)
    requires = {tag: POOLED if n > 1 else INLINE for tag, n in tools.items()}
    pooled = {tag: n if n > 1 else 0 for tag, n in tools.items()}
    assert_outcome(direct if mode == "threading" else adopted, expected_broken(backend, requires), pooled)
    assert store.live() == 0


# -- 2. overlapping turns on ONE session (one task id) ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_turns_on_one_session_are_admitted_together_and_stay_apart(
    bench: HermesBench, server: ApiServer, backend: str, mode: str
) -> None:
    """Two turns sent at once with one ``X-Hermes-Session-Id`` are both admitted and run at the same time (their
    tools meet), with the session id as the task id of both; each keeps its own tree (or the declared breakage)."""
    store = bench.instrument(backend)
    bench.reset()
    session = f"shared-{backend}-{mode}"
    tags = ["s0", "s1"]
    with mode_of(mode), Meeting.hold(4) as meeting:
        replies = run_threads(
            lambda i: post_chat(server, tags[i], f"[conv:{tags[i]}] [tools:2] [tool:{MEET_TOOL}] hello",
                                session_id=session),
            2,
        )
    assert not meeting.broken and sorted(meeting.met) == ["s0-1", "s0-2", "s1-1", "s1-2"], "not admitted together"
    assert set(meeting.task_ids.values()) == {session}, meeting.task_ids  # one task id for both turns
    assert [(r.status, r.content, r.headers["X-Hermes-Session-Id"]) for r in replies] == [
        (200, f"done {t}", session) for t in tags
    ]
    direct, adopted = verdict_of(bench, [bench.truth(t, tools=2) for t in tags])
    assert_parentage(bench, server, tags, mode, direct)
    trees, _ = agent_trees(bench.exporter.get_finished_spans())
    assert [t.root.attributes[GenAI.GEN_AI_CONVERSATION_ID] for t in trees] == [session, session]
    broken = expected_broken(backend, {t: POOLED for t in tags})
    assert_outcome(direct if mode == "threading" else adopted, broken, {t: 2 for t in tags})
    assert store.live() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_double_submit_shares_the_derived_session_and_each_turn_keeps_its_own_tree(
    bench: HermesBench, server: ApiServer, backend: str
) -> None:
    """The same request sent twice at once (no session header: both get the session ``_derive_chat_session_id``
    makes from the message) runs as two overlapping turns with one task id; each has its own tree of 2 steps,
    2 chats and both tool calls, and their token sums add up to what the fake LLM sent, or the declared breakage."""
    store = bench.instrument(backend)
    bench.reset()
    with Meeting.hold(4) as meeting:
        replies = run_threads(lambda i: post_chat(server, "dup", f"[conv:dup] [tools:2] [tool:{MEET_TOOL}] hello"), 2)
    assert not meeting.broken and len(meeting.met) == 4, "the two submits did not overlap"
    assert [(r.status, r.content) for r in replies] == [(200, "done dup")] * 2
    (session,) = {r.headers["X-Hermes-Session-Id"] for r in replies}
    assert session.startswith("api-") and set(meeting.task_ids.values()) == {session}

    bench.provider.force_flush()
    trees, loose = agent_trees(bench.exporter.get_finished_spans())
    assert loose == [] and len(trees) == 2
    for tree in trees:
        assert (len(tree.of_kind("step")), len(tree.of_kind("chat"))) == (2, 2)
        assert tree.tool_call_ids() == ["call_dup_1", "call_dup_2"]
        assert tree.parent_kinds("chat") == ["step", "step"]
        assert tree.root.parent is None  # the executor hop: a root, as in the tests above
        chat_in = sum(s.attributes[GenAI.GEN_AI_USAGE_INPUT_TOKENS] for s in tree.of_kind("chat"))
        assert tree.root.attributes[GenAI.GEN_AI_USAGE_INPUT_TOKENS] == chat_in
    assert sum(t.root.attributes[GenAI.GEN_AI_USAGE_INPUT_TOKENS] for t in trees) == bench.server.totals("dup")[0]
    assert sum(t.root.attributes[GenAI.GEN_AI_USAGE_OUTPUT_TOKENS] for t in trees) == bench.server.totals("dup")[1]
    tool_parents = sorted(k for t in trees for k in t.parent_kinds("execute_tool"))
    if expected_broken(backend, {"dup": POOLED}):  # the pooled tools lose their step, not their invocation
        assert tool_parents == ["invoke_agent"] * 4
    else:
        assert tool_parents == ["step"] * 4
    assert store.live() == 0


# -- 4. the parent question --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_turn_hangs_under_its_request_span_only_with_threading_instrumentation(
    bench: HermesBench, server: ApiServer, mode: str
) -> None:
    """``_run_agent``'s ``run_in_executor(None, _run)`` copies no context: without the threading instrumentation
    ``invoke_agent`` is a root span in a trace of its own, the request's trace left behind; with it, it hangs under
    the request span. Our own tree is whole either way (``invocation_id``, the default backend)."""
    store = bench.instrument("invocation_id")
    bench.reset()
    with mode_of(mode), Meeting.hold(1):
        reply = post_chat(server, "one", f"[conv:one] [tools:1] [tool:{MEET_TOOL}] hello")
    assert (reply.status, reply.content) == (200, "done one")
    bench.provider.force_flush()
    spans = bench.exporter.get_finished_spans()
    (tree,), loose = agent_trees(spans)
    assert loose == []
    assert (len(tree.of_kind("step")), len(tree.of_kind("chat")), tree.tool_call_ids()) == (2, 2, ["call_one_1"])
    assert {s.context.trace_id for s in tree.spans} == {tree.root.context.trace_id}  # our tree whole either way
    (request,) = server.request_spans["one"]
    if mode == "threading":
        assert tree.root.parent is not None and tree.root.parent.span_id == request.context.span_id
        assert tree.root.context.trace_id == request.context.trace_id
    else:  # KNOWN LIMITATION of the front end, not of the store: a root span, the request's trace left behind
        assert tree.root.parent is None
        assert tree.root.context.trace_id != request.context.trace_id
    direct, adopted = verdict_of(bench, [bench.truth("one", tools=1)])
    assert (direct if mode == "threading" else adopted).ok, (direct.as_dict(), adopted.as_dict())
    assert store.live() == 0


# -- 5. incoming trace context: a request's traceparent, continued by the aiohttp server instrumentation --------------


@pytest.fixture(scope="module")
def traced_api(api: ApiServer, hermes_bench: HermesBench) -> Iterator[ApiServer]:
    """A second API server, built while ``opentelemetry-instrumentation-aiohttp-server`` was on (on the bench's
    provider), as ``opentelemetry-instrument`` builds one: its app carries the instrumentation's middleware, which
    opens a SERVER span continuing each request's W3C ``traceparent``. (``api`` holds the config.yaml it reads.)"""
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    instrumentor = AioHttpServerInstrumentor()
    instrumentor.instrument(tracer_provider=hermes_bench.provider)
    module = sys.modules[AioHttpServerInstrumentor.__module__]
    if getattr(module, "create_instrumented_application", None) is None:
        # Older releases (the compare set's 0.60b1) ignore tracer_provider: their middleware reads a module-level
        # tracer made from the global provider when instrument() runs. Point it at the bench's provider.
        module.tracer = hermes_bench.provider.get_tracer(module.__name__)
    try:
        server = ApiServer().start()
    finally:
        instrumentor.uninstrument()  # the app built keeps its middleware; later apps are left alone
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def httpx_spans(bench: HermesBench) -> Iterator[None]:
    """opentelemetry-instrumentation-httpx (Hermes's LLM client) on the bench's provider for the block."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=bench.provider)
    try:
        yield
    finally:
        instrumentor.uninstrument()


def scope_of(span: Any) -> str:
    return span.instrumentation_scope.name if span.instrumentation_scope else ""


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("mode", MODES)
def test_an_incoming_traceparent_continues_into_invoke_agent_its_chats_and_the_llm_endpoint(
    bench: HermesBench, traced_api: ApiServer, mode: str, stream: bool
) -> None:
    """A request carrying a ``traceparent`` (the client's span) gets the aiohttp server span under it. With the
    threading instrumentation (in bootstrap's default set) the turn's ``invoke_agent`` hangs under that server span,
    and so, through its chats and the LLM's HTTP client spans, does the ``traceparent`` the LLM endpoint receives:
    one trace from the caller to the LLM. Without it, ``run_in_executor(None, ...)`` drops the context: KNOWN,
    ``invoke_agent`` starts a trace of its own (whole, and carried to the LLM endpoint), the caller's trace ends at
    the server span."""
    store = bench.instrument("invocation_id")
    bench.reset()
    traced_api.renew_executor()
    tag = f"tp{mode[0]}{int(stream)}"
    with httpx_spans(bench), mode_of(mode), Meeting.hold(1):
        with bench.tracer.start_as_current_span("client", kind=trace.SpanKind.CLIENT) as client:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            reply = post_chat(traced_api, tag, f"[conv:{tag}] [tools:1] [tool:{MEET_TOOL}] hello", stream=stream,
                              headers=carrier)
    assert (reply.status, (reply.content or "").strip()) == (200, f"done {tag}")
    bench.provider.force_flush()
    spans = bench.exporter.get_finished_spans()
    caller = client.get_span_context()
    (server,) = [s for s in spans if scope_of(s) == "opentelemetry.instrumentation.aiohttp_server"]
    assert server.kind is trace.SpanKind.SERVER and server.parent is not None
    assert (server.context.trace_id, server.parent.span_id) == (caller.trace_id, caller.span_id)
    (tree,), loose = agent_trees(spans)
    assert loose == [] and {s.context.trace_id for s in tree.spans} == {tree.root.context.trace_id}
    assert (len(tree.of_kind("chat")), tree.tool_call_ids()) == (2, [f"call_{tag}_1"])
    if mode == "threading":
        assert tree.root.parent is not None and tree.root.parent.span_id == server.context.span_id
        assert tree.root.context.trace_id == caller.trace_id
    else:  # KNOWN LIMITATION of the API server's executor hop: the caller's trace ends at the server span
        assert tree.root.parent is None and tree.root.context.trace_id != caller.trace_id
    # Each LLM request: its HTTP client span under its own chat, and the traceparent the endpoint got names that span.
    chats = {s.context.span_id for s in tree.of_kind("chat")}
    posts = [s for s in spans if scope_of(s) == "opentelemetry.instrumentation.httpx" and s.name.startswith("POST")]
    assert len(posts) == 2 and all(p.parent is not None and p.parent.span_id in chats for p in posts)
    sent = sorted(tuple(str(header).split("-")[1:3]) for header, _ in bench.server.requests(tag))
    assert sent == sorted((f"{p.context.trace_id:032x}", f"{p.context.span_id:016x}") for p in posts)
    assert store.live() == 0
