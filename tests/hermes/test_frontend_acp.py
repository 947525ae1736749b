"""Hermes's REAL ACP adapter (hermes-agent 0.19.0, ``acp_adapter/server.py``) driven in process under our instrumentation.

How the adapter runs a prompt (read in ``acp_adapter/server.py`` and ``acp_adapter/session.py``):

* ``HermesACPAgent.new_session`` -> ``SessionManager.create_session`` -> ``SessionManager._make_agent``
  builds ONE ``AIAgent`` per session from ``hermes_cli.config.load_config()`` and
  ``hermes_cli.runtime_provider.resolve_runtime_provider`` (``platform="acp"``, toolset ``hermes-acp``,
  ``session_id`` = the ACP session id). The tests point ``config.yaml`` at the fake LLM
  (``statebackends_hermes_testbed.frontend_acp.acp_runtime``) and put the bench tools in ``hermes-acp``.
* ``HermesACPAgent.prompt`` refuses an unknown session, then, under ``state.runtime_lock``: if the session's
  turn is still running (``state.is_running``) it QUEUES the text (``state.queued_prompts``), tells the client
  ``"Queued for the next turn. (n queued)"`` and returns ``stop_reason="end_turn"`` at once; otherwise it marks
  the session running, and runs ``_run_agent`` -> ``agent.run_conversation(user_message=...,
  conversation_history=state.history, task_id=session_id, ...)`` through
  ``ctx = contextvars.copy_context(); await loop.run_in_executor(_executor, ctx.run, _run_agent)`` (a
  4-thread ``ThreadPoolExecutor``): every turn of a session carries the same task id. When the turn is over
  it clears ``is_running`` and runs each queued text with a recursive ``await self.prompt(...)``, inside the
  FIRST prompt's request (and so under its context), echoing it first as a ``user_message_chunk``.
* ``HermesACPAgent.cancel`` sets the session's ``cancel_event`` and calls ``agent.interrupt()``; the running
  ``prompt`` then answers ``stop_reason="cancelled"``. Interrupted inside a tool, ``run_conversation`` returns
  ``final_response=None`` and 0.19.0's ``prompt`` raises ``AttributeError`` on
  ``final_response.startswith(...)`` before it clears ``is_running``: the session stays "running" and every
  later prompt on it is only queued. That is Hermes's bug, asserted here as what happens, instrumented or not.
* The client callbacks (``acp_adapter.events.make_message_cb`` etc.) stream ``session/update`` notifications
  back through ``asyncio.run_coroutine_threadsafe``; ACP agents stream from the LLM, and Hermes rebuilds a
  streamed response with an id of its own (``stream-<uuid>``, ``agent.chat_completion_helpers``), which our
  spans do not record as ``gen_ai.response.id`` (it is not the provider's); non-streaming sessions
  (``agent._disable_streaming``, the switch Hermes flips itself for a provider that cannot stream) keep the
  fake LLM's ``chatcmpl-TAG-k`` ids, which the trace judge then checks too.

Backends: a cell is expected right exactly when the backend DECLARES (``isolates``) what the scenario needs,
as in ``test_matrix.py``; a known-bad cell is asserted bad (and its damage described), never skipped.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Iterator, Optional

import pytest

from statebackends import Concurrency, available
from statebackends_hermes_testbed.driver import truth_of
from statebackends_hermes_testbed.fakellm import FakeLLMServer
from statebackends_hermes_testbed.frontend_acp import (
    ACP_GATE,
    ACP_TOOL,
    GATE,
    AcpFrontend,
    Invocation,
    TurnScript,
    acp_runtime,
    invocations,
    strays,
    wait_until,
)
from statebackends_hermes_testbed.scenarios import isolates_of
from statebackends_hermes_testbed.traces import kind_of

BACKENDS = list(available())
N_SESSIONS = 4
"""Concurrent prompts on distinct sessions: the adapter's executor has 4 workers, so all of them run at once."""
QUEUED_TEXT = "Queued for the next turn. (1 queued)"


def expected_ok(requires: set[Concurrency], backend: str) -> bool:
    """A cell is expected right exactly when ``backend`` declares all that the scenario requires."""
    return frozenset(requires) <= isolates_of(backend)


class AcpRig:
    """A fake LLM (planning each turn from its latest user message), Hermes's config pointed at it, one real
    ACP adapter with its recording client, an event loop to drive it, and sessions built once for the module."""

    def __init__(self, tracer: Any, cwd: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = FakeLLMServer(script=TurnScript()).start()
        self._runtime = acp_runtime(self.server.base_url)
        self._runtime.__enter__()
        self.front = AcpFrontend(tracer)
        self.cwd = cwd
        self._pools: dict[bool, list[str]] = {True: [], False: []}
        self._ids = itertools.count(1)
        self.run(self.front.initialize())

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def tag(self, prefix: str) -> str:
        """A conversation tag never used before in this module (tool call ids must not repeat in a history)."""
        return f"{prefix}{next(self._ids)}"

    def new_session(self, *, streaming: bool = True) -> str:
        sid = self.run(self.front.new_session(self.cwd))
        if not streaming:
            self.front.state(sid).agent._disable_streaming = True
        return sid

    def sessions(self, n: int, *, streaming: bool = True) -> list[str]:
        """``n`` idle sessions of the kind asked, built once and reused by the tests."""
        pool = self._pools[streaming]
        while len(pool) < n:
            pool.append(self.new_session(streaming=streaming))
        return pool[:n]

    def close(self) -> None:
        try:
            self.front.close()
            self.loop.run_until_complete(asyncio.sleep(0.05))  # let scheduled notifications finish
            self.loop.close()
        finally:
            self._runtime.__exit__(None, None, None)
            self.server.stop()


@pytest.fixture(scope="module")
def rig(hermes_bench: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcpRig]:
    rig = AcpRig(hermes_bench.tracer, str(tmp_path_factory.mktemp("acp-cwd")))
    try:
        yield rig
    finally:
        rig.close()


def prompt_text(tag: str, *, tools: int = 0, tool: str = ACP_TOOL, extra: str = "") -> str:
    parts = [f"[conv:{tag}]"]
    if tools:
        parts += [f"[tools:{tools}]", f"[tool:{tool}]"]
    if extra:
        parts.append(extra)
    return " ".join(parts + ["hello"])


def finished(bench: Any) -> list[Any]:
    bench.provider.force_flush()
    return list(bench.exporter.get_finished_spans())


def open_instrumentation_spans(bench: Any) -> list[str]:
    return [s.name for s in bench.tracker.open_spans() if kind_of(s) is not None]


def assert_own_tree(inv: Invocation, rig: AcpRig, tag: str, *, tools: int, streaming: bool, session_id: str) -> None:
    """``inv`` is exactly the turn of ``tag``: its steps, chats, tools, ids, rounds and tokens, nothing else."""
    chats = len(rig.server.log(tag))
    assert (len(inv.steps), len(inv.chats), len(inv.tools)) == (chats, chats, tools), (tag, inv.rounds)
    assert inv.rounds == list(range(1, chats + 1)), f"{tag}: react rounds {inv.rounds} do not restart at 1"
    assert sorted(inv.tool_call_ids) == [f"call_{tag}_{i}" for i in range(1, tools + 1)]
    assert inv.tokens == rig.server.totals(tag), f"{tag}: invoke_agent tokens {inv.tokens} != {rig.server.totals(tag)}"
    assert inv.conversation_id == session_id
    if streaming:  # Hermes replaces a streamed response's id with one it makes (stream-<uuid>): none recorded
        assert inv.response_ids == [] and inv.span.attributes.get("gen_ai.response.id") is None
    else:
        assert inv.response_ids == [e.response_id for e in rig.server.log(tag)]
    assert inv.span.status.status_code.name == "UNSET"


def assert_client_saw_the_turn(rig: AcpRig, sid: str, tag: str, *, tools: int, since: int) -> None:
    """The client got the agent's answer and tool results unchanged: ``done TAG``, one start and one completion per tool."""
    client = rig.front.client
    assert client.agent_text(sid, since=since).strip() == f"done {tag}"
    starts = client.of(sid, "tool_call", since=since)
    assert sorted(u.raw_input["text"] for u in starts) == [f"{tag}-{i}" for i in range(1, tools + 1)]
    ends = client.of(sid, "tool_call_update", since=since)
    assert [u.status for u in ends] == ["completed"] * tools
    assert sorted(u.raw_output for u in ends) == [f"{tag}-{i}" for i in range(1, tools + 1)]


def assert_tools_under_invocation(rig: AcpRig, invs: list[Invocation], tags: list[str], tools: int) -> None:
    """Each turn's tool spans are its own tools, parented straight to its invoke_agent span (skipping the step),
    and its tokens are its own."""
    assert sorted(i.caller for i in invs) == sorted(tags)
    for inv in invs:
        assert sorted(inv.tool_call_ids) == [f"call_{inv.caller}_{i}" for i in range(1, tools + 1)]
        assert all(t.parent.span_id == inv.span.context.span_id for t in inv.tools)
        assert inv.tokens == rig.server.totals(inv.caller)


# -- 1. concurrent prompts on distinct sessions ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "non_streaming"])
@pytest.mark.parametrize("tools", [1, 2], ids=["one_tool", "tool_pool"])
def test_concurrent_prompts_on_distinct_sessions(bench: Any, rig: AcpRig, backend: str, streaming: bool, tools: int) -> None:
    """Four prompts on four sessions, provably inside a tool at the same moment, give four invoke_agent trees that
    are each their own turn's (ids, tokens, rounds), the client sees each agent's answer unchanged and no state
    is left, for every backend that declares what the run needs (with 2 tools Hermes's context-copying tool pool);
    a backend that does not declare it is asserted broken."""
    sids = rig.sessions(N_SESSIONS, streaming=streaming)
    store = bench.instrument(backend)
    tags = [rig.tag("D") for _ in sids]
    GATE.expect(tags)
    since = rig.front.client.mark()

    async def all_prompts() -> list[Any]:
        return await asyncio.gather(*(
            rig.front.prompt(sid, prompt_text(tag, tools=tools, tool=ACP_GATE), caller=tag) for sid, tag in zip(sids, tags)
        ))

    responses = rig.run(all_prompts())
    assert GATE.met, "the four turns were not all inside a tool at one moment"
    assert GATE.task_ids == {tag: {sid} for tag, sid in zip(tags, sids)}, "each turn runs with its session id as task id"
    for sid, tag, response in zip(sids, tags, responses):
        assert response.stop_reason == "end_turn"
        assert_client_saw_the_turn(rig, sid, tag, tools=tools, since=since)

    spans = finished(bench)
    verdict = bench.recorder.verdict([truth_of(rig.server, tag, tools=tools) for tag in tags], store=store)
    requires = {Concurrency.COPIED_CONTEXT} if tools > 1 else set()
    assert not open_instrumentation_spans(bench), "every span is ended, whatever the backend"
    assert store.live() == 0, f"{backend} left {store.live()} invocation state(s) in the store"
    if expected_ok(requires, backend):
        assert verdict.ok, f"{backend}: {verdict.summary()}; {verdict.notes[:5]}"
        invs = invocations(spans)
        assert sorted(i.caller for i in invs) == sorted(tags), "exactly one invoke_agent per prompt, under its caller"
        for inv in invs:
            sid = sids[tags.index(inv.caller)]
            assert_own_tree(inv, rig, inv.caller, tools=tools, streaming=streaming, session_id=sid)
    else:
        # threadlocal with Hermes's tool pool: the pool worker does not see the turn's thread-local state, so each
        # pooled tool span falls back to the current OpenTelemetry span (copied into the worker), the invoke_agent
        # span of its own turn, instead of its react step: misparented, but never in another turn.
        assert not verdict.ok, f"{backend} does not declare {requires}, yet the run was right: fix the declaration"
        assert (verdict.orphans, verdict.cross_talk, verdict.state_left) == (N_SESSIONS * tools, 0, 0), verdict.summary()
        assert_tools_under_invocation(rig, invocations(spans), tags, tools)


# -- 2. consecutive turns of one session -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "non_streaming"])
def test_consecutive_turns_of_one_session(bench: Any, rig: AcpRig, backend: str, streaming: bool) -> None:
    """Three turns of one session, all with the session id as task id, give three invoke_agent trees, each only its
    own turn's (tokens, ids, react rounds restarting at 1), with an empty store after every turn, for every backend."""
    (sid,) = rig.sessions(1, streaming=streaming)
    store = bench.instrument(backend)
    plan = [1, 0, 2]  # tools per turn; the third runs in Hermes's tool pool
    tags = [rig.tag("T") for _ in plan]
    GATE.expect([])
    for tag, tools in zip(tags, plan):
        since = rig.front.client.mark()
        response = rig.run(rig.front.prompt(sid, prompt_text(tag, tools=tools, tool=ACP_GATE), caller=tag))
        assert response.stop_reason == "end_turn"
        assert_client_saw_the_turn(rig, sid, tag, tools=tools, since=since)
        assert store.live() == 0, f"{backend}: state left after turn {tag}"
    assert GATE.task_ids == {tags[0]: {sid}, tags[2]: {sid}}, "every turn of the session carries the session id"

    requires = {Concurrency.COPIED_CONTEXT}  # the pooled tools of the third turn
    verdict = bench.recorder.verdict([truth_of(rig.server, t, tools=n) for t, n in zip(tags, plan)], store=store)
    assert not open_instrumentation_spans(bench)
    invs = invocations(finished(bench))
    assert [i.caller for i in invs] == tags, "one invoke_agent per turn, in order, each under its own prompt"
    if expected_ok(requires, backend):
        assert verdict.ok, f"{backend}: {verdict.summary()}; {verdict.notes[:5]}"
        for inv, tag, tools in zip(invs, tags, plan):
            assert_own_tree(inv, rig, tag, tools=tools, streaming=streaming, session_id=sid)
    else:
        assert not verdict.ok, f"{backend} does not declare {requires}, yet the run was right: fix the declaration"
        # Only the pooled tools of the third turn are misparented (under its invoke_agent, not its step).
        assert verdict.broken == [tags[2]], (verdict.summary(), verdict.notes, verdict.broken)
        assert (verdict.orphans, verdict.cross_talk, verdict.state_left) == (2, 0, 0), verdict.summary()
        for inv, tag, tools in zip(invs[:2], tags[:2], plan[:2]):
            assert_own_tree(inv, rig, tag, tools=tools, streaming=streaming, session_id=sid)
        assert_tools_under_invocation(rig, invs[2:], tags[2:], 2)


# -- 3. overlap on one session, as the adapter allows it ---------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_prompt_while_a_turn_runs_is_queued(bench: Any, rig: AcpRig, backend: str) -> None:
    """A prompt sent while the session's turn runs is queued by the adapter (answered ``end_turn`` at once) and run
    after it inside the first request: two invoke_agent trees, both under the first prompt's span, each only its own
    turn's, nothing left open or in the store, for every backend."""
    (sid,) = rig.sessions(1)
    store = bench.instrument(backend)
    first, second = rig.tag("Q"), rig.tag("Q")
    since = rig.front.client.mark()

    async def overlap() -> tuple[Any, Any, list[str]]:
        running = asyncio.ensure_future(
            rig.front.prompt(sid, prompt_text(first, tools=1, extra="[delay_ms:200] [tool_ms:200]"), caller=first)
        )
        await wait_until(lambda: len(rig.server.log(first)) >= 1)  # the first turn's LLM request is in flight
        assert rig.front.state(sid).is_running and not running.done()
        queued = await rig.front.prompt(sid, prompt_text(second, tools=1), caller=second)
        assert not running.done(), "the queued prompt was answered while the first turn still ran"
        return await running, queued, rig.front.client.agent_text(sid, since=since)

    first_response, queued_response, _ = rig.run(overlap())
    assert queued_response.stop_reason == "end_turn" and queued_response.usage is None
    assert first_response.stop_reason == "end_turn"
    client = rig.front.client
    assert client.agent_text(sid, since=since).split("\n\n") == [QUEUED_TEXT, f"done {first}", f"done {second}"]
    assert client.user_text(sid, since=since) == prompt_text(second, tools=1), "the adapter replays the queued text"
    assert not rig.front.state(sid).is_running and not rig.front.state(sid).queued_prompts

    assert not open_instrumentation_spans(bench)
    assert store.live() == 0
    invs = invocations(finished(bench))
    assert [i.caller for i in invs] == [first, first], "the queued turn runs inside the first prompt's request"
    assert invs[0].span.end_time <= invs[1].span.start_time, "the adapter ran the two turns one after the other"
    assert_own_tree(invs[0], rig, first, tools=1, streaming=True, session_id=sid)
    assert_own_tree(invs[1], rig, second, tools=1, streaming=True, session_id=sid)
    assert not strays(finished(bench))


def turn_window(server: FakeLLMServer, before: dict[str, int]) -> list[Any]:
    """The fake LLM's responses logged since ``before`` (``{tag: count}``), whatever their tags."""
    return [e for tag in server.tags() for e in server.log(tag)[before.get(tag, 0):]]


def log_counts(server: FakeLLMServer) -> dict[str, int]:
    return {tag: len(server.log(tag)) for tag in server.tags()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_during_the_llm_call(bench: Any, rig: AcpRig, backend: str) -> None:
    """``session/cancel`` while the turn waits for the LLM answers ``cancelled``; our spans all end (the chat span
    with ERROR ``InterruptedError``, invoke_agent unset, no tokens), the store is empty, and the session's next turn
    gets a tree of its own with only its own tokens and rounds from 1, for every backend."""
    (sid,) = rig.sessions(1, streaming=True)  # a cancelled turn leaves the session usable
    store = bench.instrument(backend)
    tag, after = rig.tag("C"), rig.tag("F")

    async def cancel_mid_call() -> Any:
        running = asyncio.ensure_future(rig.front.prompt(sid, prompt_text(tag, extra="[delay_ms:3000]"), caller=tag))
        await wait_until(lambda: len(rig.server.log(tag)) >= 1)  # the request is in flight, answered in 3 s
        assert not running.done()
        await rig.front.cancel(sid)
        return await running

    response = rig.run(cancel_mid_call())
    assert response.stop_reason == "cancelled"
    assert not open_instrumentation_spans(bench)
    assert store.live() == 0
    (inv,) = invocations(finished(bench))
    assert inv.caller == tag
    assert (len(inv.steps), len(inv.chats), len(inv.tools)) == (1, 1, 0)
    (chat,) = inv.chats
    assert chat.status.status_code.name == "ERROR" and chat.attributes["error.type"] == "InterruptedError"
    assert inv.span.status.status_code.name == "UNSET", "Hermes returns an interrupted turn; it does not fail it"
    assert inv.span.attributes.get("hermes.interrupted") is True, "the cancelled turn is not marked interrupted"
    assert inv.tokens == (0, 0), "the cancelled call's answer never reached Hermes"

    bench.recorder.clear()
    before = log_counts(rig.server)
    since = rig.front.client.mark()
    response = rig.run(rig.front.prompt(sid, prompt_text(after, tools=1), caller=after))
    assert response.stop_reason == "end_turn"
    assert_client_saw_the_turn(rig, sid, after, tools=1, since=since)
    assert [e.response_id for e in turn_window(rig.server, before)] == [e.response_id for e in rig.server.log(after)]
    (nxt,) = invocations(finished(bench))
    assert nxt.caller == after
    assert_own_tree(nxt, rig, after, tools=1, streaming=True, session_id=sid)
    assert not open_instrumentation_spans(bench) and store.live() == 0


@pytest.mark.parametrize("backend", ["none", *BACKENDS])
def test_cancel_during_a_tool(bench: Any, rig: AcpRig, backend: str) -> None:
    """``session/cancel`` while a tool runs makes hermes-agent 0.19.0's ``prompt`` raise ``AttributeError`` and leave
    the session marked running, with or without our instrumentation (``none``); under every backend our spans all
    end (invoke_agent, its step, chat and tool, none ERROR), the turn's tokens are its own and the store is empty."""
    sid = rig.new_session()
    store = bench.instrument(backend) if backend != "none" else None
    tag = rig.tag("K")
    since = rig.front.client.mark()

    async def cancel_mid_tool() -> Optional[BaseException]:
        running = asyncio.ensure_future(
            rig.front.prompt(sid, prompt_text(tag, tools=1, extra="[tool_ms:600]"), caller=tag)
        )
        await wait_until(lambda: bool(rig.front.client.of(sid, "tool_call", since=since)))  # the tool has started
        assert not running.done()
        await rig.front.cancel(sid)
        try:
            await running
        except Exception as exc:  # noqa: BLE001 - the adapter's error is the observation
            return exc
        return None

    error = rig.run(cancel_mid_tool())
    assert isinstance(error, AttributeError) and "startswith" in str(error), f"the adapter's behaviour changed: {error!r}"
    assert rig.front.state(sid).is_running, "0.19.0 leaves the session marked running"
    if store is None:
        assert not [s for s in finished(bench) if kind_of(s) is not None], "uninstrumented: no spans of ours"
        return
    assert not open_instrumentation_spans(bench)
    assert store.live() == 0
    (inv,) = invocations(finished(bench))
    assert inv.caller == tag
    assert (len(inv.steps), len(inv.chats), len(inv.tools)) == (1, 1, 1)
    assert inv.tool_call_ids == [f"call_{tag}_1"]
    assert inv.tokens == rig.server.totals(tag) == (107, 13)
    assert [s.status.status_code.name for s in (inv.span, *inv.steps, *inv.chats, *inv.tools)] == ["UNSET"] * 4
    assert inv.span.attributes.get("hermes.interrupted") is True, "the turn cancelled mid-tool is not marked interrupted"
