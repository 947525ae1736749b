"""Hermes traces in a real backend, read back through its REST API: Arize Phoenix, offline on loopback.

Three runs export OTLP/HTTP to one Phoenix, each into a project of its own (``openinference.project.name``):

* ``agent``: the zero-code app (:mod:`statebackends_hermes_testbed.stack_app`) under ``opentelemetry-instrument``
  in the recommended set-up (openai-v2 off: ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=openai``), message content on,
  three turns in two sessions;
* ``doubled``: the same app with the stack exactly as bootstrap installs it (openai-v2 on), content off, one turn:
  what a user sees before turning openai-v2 off (asserted as it is);
* ``api``: three processes, one trace. This process is the client: its own SDK provider, a CLIENT span per request
  whose ``traceparent`` it sends to Hermes's real API server, which runs in a second process under
  ``opentelemetry-instrument`` (aiohttp-server, threading, httpx on) and calls the fake LLM in a third, served
  through WSGI behind opentelemetry-instrumentation-wsgi's middleware, also under ``opentelemetry-instrument``.

What Phoenix must show: each turn one trace; in it one AGENT span, its LLM and TOOL spans; the token counts the LLM
served; the messages when capture is on and none when off; turns grouped by session; and for the ``api`` run a
single trace id across the three processes, with the parent links client -> server request -> ``invoke_agent``
-> ``chat`` -> HTTP client -> LLM server span.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import pytest
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from statebackends_hermes_testbed.fakellm import FakeLLMServer
from statebackends_hermes_testbed.frontend_api import post_chat
from statebackends_hermes_testbed.phoenix import Phoenix
from statebackends_hermes_testbed.processes import BIN, INSTRUMENT, Service, clean_environment, last_json, run

CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
OPENAI_OFF = {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "openai"}
CONTENT_KEYS = ("llm.input_messages", "llm.output_messages", "gen_ai.input.messages", "gen_ai.output.messages",
                "gen_ai.system_instructions", "input.value")


@dataclass(frozen=True)
class Turn:
    tag: str
    session: str
    tools: int
    stream: bool = False

    @property
    def message(self) -> str:
        return f"[conv:{self.tag}] [tools:{self.tools}] hello"


@dataclass
class Run:
    """One run's project in Phoenix, its turns, and the tokens the fake LLM served per conversation tag."""

    project: str
    turns: list[Turn]
    served: dict[str, tuple[int, int]]
    spans: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def of_trace(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["context"]["trace_id"] == trace_id]

    def agent_of(self, turn: Turn) -> dict[str, Any]:
        """The AGENT span of ``turn``: the turns ran one after the other, so the AGENT spans in order of start; the
        trace must hold the turn's own tool call ids (``call_<tag>_<i>``) and no other turn's."""
        agents = sorted((s for s in self.spans if s["span_kind"] == "AGENT"), key=lambda s: s["start_time"])
        assert len(agents) == len(self.turns), [s["name"] for s in agents]
        agent = agents[self.turns.index(turn)]
        call_ids = {str(s["attributes"].get("gen_ai.tool.call.id")) for s in self.of_trace(agent["context"]["trace_id"])
                    if s["attributes"].get("gen_ai.tool.call.id")}
        assert call_ids == {f"call_{turn.tag}_{i}" for i in range(1, turn.tools + 1)}, (turn, call_ids)
        return agent


def agent_count(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda spans: sum(s["span_kind"] == "AGENT" for s in spans) >= n


def ancestors(span: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    while span.get("parent_id") and span["parent_id"] in by_id and len(out) < 64:
        span = by_id[span["parent_id"]]
        out.append(span)
    return out


def content_keys(span: dict[str, Any]) -> list[str]:
    return [k for k in span["attributes"] if k.startswith(CONTENT_KEYS)]


# -- the zero-code app -------------------------------------------------------------------------------------------------


def app_run(phoenix: Phoenix, home: Path, project: str, turns: list[Turn], **env: str) -> Run:
    with FakeLLMServer() as llm:
        argv = [str(INSTRUMENT), str(BIN / "python"), "-m", "statebackends_hermes_testbed.stack_app", "turns",
                "--base-url", llm.base_url, "--sessions", ",".join(t.session for t in turns),
                *[f"--turn={t.message}" for t in turns]]
        out = run(argv, clean_environment(home, **phoenix.otlp_environment(project, "hermes-app"), **env), home)
        returned = last_json(out.stdout.splitlines())
        assert [t["final_response"] for t in returned["turns"]] == [f"done {t.tag}" for t in turns]
        served = {t.tag: llm.totals(t.tag) for t in turns}
    result = Run(project, turns, served)
    result.spans = phoenix.wait_for_spans(project, agent_count(len(turns)))
    return result


AGENT_TURNS = [Turn("a1", "sess-a", 1), Turn("a2", "sess-a", 2), Turn("b1", "sess-b", 0)]


@pytest.fixture(scope="module")
def agent_run(phoenix: Phoenix, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return app_run(phoenix, tmp_path_factory.mktemp("agent"), "agent", AGENT_TURNS, **OPENAI_OFF, **{CAPTURE: "SPAN_ONLY"})


def assert_turn_trees(phoenix: Phoenix, result: Run, tokens: str = "once") -> None:
    """Each turn one trace: one AGENT span, its LLM spans (one per LLM call; two with ``tokens="twice"``) and TOOL
    spans under it; the tokens the fake LLM served on the AGENT span, on our LLM spans, and on Phoenix's trace
    (``tokens="twice"``: the trace counts them twice)."""
    agents = [s for s in result.spans if s["span_kind"] == "AGENT"]
    assert len(agents) == len(result.turns) == len({s["context"]["trace_id"] for s in agents}), "one trace per turn"
    factor = 2 if tokens == "twice" else 1
    by_id = {s["context"]["span_id"]: s for s in result.spans}
    totals = {t["trace_id"]: (t["token_count_prompt"], t["token_count_completion"]) for t in phoenix.traces(result.project)}
    for turn in result.turns:
        agent = result.agent_of(turn)
        trace_id = agent["context"]["trace_id"]
        spans = result.of_trace(trace_id)
        kinds = Counter(s["span_kind"] for s in spans)
        assert (kinds["AGENT"], kinds["TOOL"], kinds["LLM"]) == (1, turn.tools, (2 if turn.tools else 1) * factor), turn
        for span in spans:
            if span["span_kind"] in ("LLM", "TOOL"):
                assert agent in ancestors(span, by_id), span["name"]
        served = result.served[turn.tag]
        attributes = agent["attributes"]
        assert (attributes["llm.token_count.prompt"], attributes["llm.token_count.completion"]) == served
        ours = [s for s in spans if s["span_kind"] == "LLM" and s["attributes"].get("gen_ai.provider.name") == "custom"]
        assert sum(s["attributes"]["llm.token_count.prompt"] for s in ours) == served[0]
        assert totals[trace_id] == (factor * served[0], factor * served[1]), turn


def test_each_turn_is_one_trace_with_one_agent_its_llm_and_tool_spans_and_the_tokens(phoenix: Phoenix, agent_run: Run) -> None:
    assert_turn_trees(phoenix, agent_run)


def test_messages_are_there_when_capture_is_on(agent_run: Run) -> None:
    for turn in agent_run.turns:
        attributes = agent_run.agent_of(turn)["attributes"]
        assert attributes["llm.input_messages.0.message.content"] == turn.message
        assert attributes["llm.output_messages.0.message.content"] == f"done {turn.tag}"
    llm = [s for s in agent_run.spans if s["span_kind"] == "LLM"]
    assert llm and all(any(k.startswith("llm.input_messages.") for k in s["attributes"]) for s in llm)


def test_turns_are_grouped_by_session(phoenix: Phoenix, agent_run: Run) -> None:
    sessions = {s["session_id"]: sorted(t["trace_id"] for t in s["traces"]) for s in phoenix.sessions(agent_run.project)}
    want: dict[str, list[str]] = {}
    for turn in agent_run.turns:
        want.setdefault(turn.session, []).append(agent_run.agent_of(turn)["context"]["trace_id"])
    assert sessions == {k: sorted(v) for k, v in want.items()}


def test_every_span_of_ours_has_a_phoenix_kind_the_react_step_chain(agent_run: Run) -> None:
    """Phoenix gives a kind from ``gen_ai.operation.name`` to the conventions' values only; the react step (whose
    operation name is ours) carries OpenInference's CHAIN itself, so no span of ours is UNKNOWN (issue 18)."""
    kinds = Counter((s["name"].split(" ")[0], s["span_kind"]) for s in agent_run.spans
                    if s["name"].split(" ")[0] in ("invoke_agent", "react", "chat", "execute_tool"))
    steps = sum(2 if t.tools else 1 for t in agent_run.turns)
    assert kinds == {("invoke_agent", "AGENT"): len(agent_run.turns), ("react", "CHAIN"): steps, ("chat", "LLM"): steps,
                     ("execute_tool", "TOOL"): sum(t.tools for t in agent_run.turns)}


def test_known_the_stack_as_bootstrap_installs_it_doubles_each_llm_span_and_the_traces_tokens(
    phoenix: Phoenix, tmp_path: Path
) -> None:
    """KNOWN: with openai-v2 on (bootstrap's default), every LLM call is two LLM spans, ours and openai-v2's, and
    Phoenix's token count of the trace is twice what was served (the AGENT span's own count stays right). With
    content capture off (the default), no span carries a message."""
    result = app_run(phoenix, tmp_path, "doubled", [Turn("d1", "sess-d", 1)])
    assert_turn_trees(phoenix, result, tokens="twice")
    llm = [s for s in result.spans if s["span_kind"] == "LLM"]
    assert Counter(s["attributes"].get("gen_ai.provider.name") for s in llm) == {"custom": 2, "openai": 2}
    assert [content_keys(s) for s in result.spans if content_keys(s)] == []


# -- three processes, one trace ------------------------------------------------------------------------------------


API_TURNS = [Turn("c1", "api-s1", 1), Turn("c2", "api-s1", 2, stream=True), Turn("c3", "api-s2", 0)]


@pytest.fixture(scope="module")
def api_run(phoenix: Phoenix, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The fake LLM (WSGI, traced) and Hermes's API server, each under ``opentelemetry-instrument`` in a process of its
    own; this process sends each turn under a CLIENT span of its own SDK provider. All three export to Phoenix."""
    home = tmp_path_factory.mktemp("api")
    project = "api"
    llm = Service([str(INSTRUMENT), str(BIN / "python"), "-m", "statebackends_hermes_testbed.fakellm_wsgi", "--traced"],
                  clean_environment(home / "llm", **phoenix.otlp_environment(project, "fake-llm")), home)
    api: Optional[Service] = None
    provider = TracerProvider(resource=Resource.create({"service.name": "client",
                                                        "openinference.project.name": project}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{phoenix.base_url}/v1/traces")))
    try:
        llm_url = llm.ready_line().split()[-1]
        api = Service([str(INSTRUMENT), str(BIN / "python"), "-m", "statebackends_hermes_testbed.stack_app", "api",
                       "--base-url", llm_url],
                      clean_environment(home / "api", **phoenix.otlp_environment(project, "hermes-api"), **OPENAI_OFF),
                      home)
        server = json.loads(api.ready_line())
        tracer = provider.get_tracer("statebackends.stack.client")
        clients: dict[str, Any] = {}
        for turn in API_TURNS:
            with tracer.start_as_current_span(f"client {turn.tag}", kind=trace.SpanKind.CLIENT) as span:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                reply = post_chat(SimpleNamespace(**server), turn.tag, turn.message, session_id=turn.session,
                                  stream=turn.stream, headers=carrier)
                assert (reply.status, (reply.content or "").strip()) == (200, f"done {turn.tag}"), reply
                clients[turn.tag] = span
        assert api.stop() == 0, api.stderr[-3000:]
        assert llm.stop() == 0, llm.stderr[-3000:]
        records = last_json(llm.stdout)["served"]
        served = {tag: (rec["input_tokens"], rec["output_tokens"]) for tag, rec in records.items()}
    finally:
        for service in (api, llm):
            if service is not None:
                service.stop()
        provider.shutdown()
    result = Run(project, API_TURNS, served, extra={"clients": clients, "api_port": server["port"], "records": records,
                                                     "llm_port": int(llm_url.rsplit(":", 1)[1].split("/")[0])})
    result.spans = phoenix.wait_for_spans(project, agent_count(len(API_TURNS)))
    return result


def test_api_server_turns_are_one_trace_each_with_their_tokens_and_no_content_by_default(
    phoenix: Phoenix, api_run: Run
) -> None:
    assert_turn_trees(phoenix, api_run)
    assert [content_keys(s) for s in api_run.spans if content_keys(s)] == []
    sessions = {s["session_id"]: len(s["traces"]) for s in phoenix.sessions(api_run.project)}
    assert sessions == {"api-s1": 2, "api-s2": 1}


def test_one_trace_across_three_processes_client_server_agent_chat_http_llm(api_run: Run) -> None:
    by_id = {s["context"]["span_id"]: s for s in api_run.spans}
    for turn in api_run.turns:
        client = api_run.extra["clients"][turn.tag]
        trace_id = format(client.get_span_context().trace_id, "032x")
        client_id = format(client.get_span_context().span_id, "016x")
        spans = api_run.of_trace(trace_id)
        agent = api_run.agent_of(turn)
        assert agent["context"]["trace_id"] == trace_id, "the turn continues the client's trace"
        (request,) = [s for s in spans if s["parent_id"] == client_id]
        assert request["attributes"]["net.host.port"] == api_run.extra["api_port"]  # the API server's process
        assert agent["parent_id"] == request["context"]["span_id"]
        chats = [s for s in spans if s["span_kind"] == "LLM"]
        assert chats and all(agent in ancestors(c, by_id) for c in chats)
        for chat in chats:
            (http,) = [s for s in spans if s["parent_id"] == chat["context"]["span_id"]]
            assert http["name"].startswith("POST") and "/chat/completions" in http["attributes"]["http.url"]
            (served,) = [s for s in spans if s["parent_id"] == http["context"]["span_id"]]
            assert served["attributes"]["net.host.port"] == api_run.extra["llm_port"]  # the LLM's process
            assert served["attributes"]["http.url"].endswith("/v1/chat/completions")
        # What the LLM's process itself received: one traceparent per chat, naming that chat's HTTP span.
        received = sorted(tuple(str(h).split("-")[1:3]) for h in api_run.extra["records"][turn.tag]["traceparents"])
        posts = [s for s in spans for c in chats if s["parent_id"] == c["context"]["span_id"]]
        assert received == sorted((trace_id, p["context"]["span_id"]) for p in posts)
