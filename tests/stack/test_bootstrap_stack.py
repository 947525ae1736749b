"""Our instrumentation inside the stack ``opentelemetry-bootstrap`` installs for a Hermes app, with zero code.

The environment (requirements-field.txt) holds what ``opentelemetry-bootstrap -a requirements`` lists for the
testbed, opentelemetry-distro and the OTLP/HTTP exporter. A small Hermes app with no tracing code
(:mod:`statebackends_hermes_testbed.stack_app`) runs under ``opentelemetry-instrument``, exporting OTLP/HTTP to a
loopback receiver, and once plainly; the fake LLM runs in this process. What is asserted:

* the environment is what bootstrap lists, and pip finds no conflict;
* the app returns the same with and without the stack;
* each turn is one trace: our ``invoke_agent`` at its root, its react steps, chats and tools, and under each chat
  the LLM request's HTTP client span (via openai-v2's chat span, which the stack adds);
* every other span is accounted for, by instrumentation scope and name (:data:`FOREIGN`), and where it hangs.

The openai-v2 policy (its LLM span doubles ours) is tested in process, with the SDK's in-memory readers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from statebackends_hermes_testbed.fakellm import FakeLLMServer
from statebackends_hermes_testbed.otlp import ExportedSpan, OTLPSink

from statebackends_hermes_testbed.processes import BIN, INSTRUMENT, clean_environment, last_json, run

OURS = "statebackends_hermes_agent"
HTTPX = "opentelemetry.instrumentation.httpx"
AIOHTTP_SERVER = "opentelemetry.instrumentation.aiohttp_server"
SQLITE = "opentelemetry.instrumentation.sqlite3"
OPENAI_V2 = "opentelemetry.util.genai.handler"
"""The scope of opentelemetry-instrumentation-openai-v2 2.4b0's spans and metrics (it records through util-genai's
``TelemetryHandler``; 2.3b0 and older used ``opentelemetry.instrumentation.openai_v2``)."""
FOREIGN: dict[str, tuple[re.Pattern[str], str]] = {
    HTTPX: (re.compile(r"(POST|GET)( .*)?"), "the LLM request (POST, under its chat) and Hermes's endpoint probes (GET)"),
    OPENAI_V2: (re.compile(r"chat .+"), "openai-v2's own span of the same LLM call, under ours"),
    "opentelemetry.instrumentation.requests": (re.compile(r"GET( .*)?"), "an endpoint probe Hermes makes with requests"),
    "opentelemetry.instrumentation.urllib3": (re.compile(r"GET( .*)?"), "the same probe, one layer down"),
    "opentelemetry.instrumentation.urllib": (re.compile(r"GET( .*)?"), "an endpoint probe made with urllib"),
    SQLITE: (re.compile(r"[A-Z]+"), "Hermes's session database (state.db), one span per statement"),
}
"""Every instrumentation scope, other than ours, that may send spans from a Hermes app in this stack: the span
names it may use and what they are. Anything else fails the test: a new source of spans must be looked at."""
TURNS = {"turn1": 1, "turn2": 2}
"""Conversation tag -> tool calls of its turn (one inline, two in Hermes's pool); both turns on one session."""
SESSION = "stack-session"


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
def sink() -> Iterator[OTLPSink]:
    receiver = OTLPSink().start()
    try:
        yield receiver
    finally:
        receiver.stop()


def app_argv(base_url: str, *extra: str) -> list[str]:
    turns = [f"--turn=[conv:{tag}] [tools:{n}] hello" for tag, n in TURNS.items()]
    return [str(BIN / "python"), "-m", "statebackends_hermes_testbed.stack_app", "turns", "--base-url", base_url,
            "--sessions", SESSION, *turns, *extra]


# -- the environment -----------------------------------------------------------------------------------------------


def test_the_environment_holds_what_bootstrap_lists_and_pip_finds_no_conflict() -> None:
    listed = subprocess.run([str(BIN / "opentelemetry-bootstrap"), "-a", "requirements"], capture_output=True,
                            text=True, timeout=120, check=True).stdout.split()
    assert "opentelemetry-instrumentation-httpx==0.66b1" in listed and "opentelemetry-instrumentation-openai-v2" in listed
    missing = []
    for line in listed:
        name, _, wanted = line.partition("==")
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        if have is None or (wanted and have != wanted):
            missing.append(f"{line} (installed: {have})")
    assert missing == [], f"bootstrap lists what requirements-field.txt does not install: {missing}"
    assert version("opentelemetry-distro") == version("opentelemetry-instrumentation")
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


# -- a zero-code app ---------------------------------------------------------------------------------------------------


def trees(spans: list[ExportedSpan]) -> dict[int, list[ExportedSpan]]:
    by_trace: dict[int, list[ExportedSpan]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    return dict(by_trace)


def is_ours(span: ExportedSpan, operation: str) -> bool:
    return span.scope == OURS and span.attributes.get("gen_ai.operation.name") == operation


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_a_zero_code_app_returns_the_same_and_each_turn_is_one_trace(
    llm: FakeLLMServer, sink: OTLPSink, tmp_path: Path, stream: bool
) -> None:
    extra = () if stream else ("--no-stream",)
    llm.reset()
    plain = run(app_argv(llm.base_url, *extra), clean_environment(tmp_path / "plain"), tmp_path)
    llm.reset()
    env = clean_environment(tmp_path / "instrumented", OTEL_SERVICE_NAME="stack-app",
                            OTEL_EXPORTER_OTLP_ENDPOINT=sink.base_url, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    traced = run([str(INSTRUMENT), *app_argv(llm.base_url, *extra)], env, tmp_path)
    returned = last_json(traced.stdout.splitlines())
    assert returned == last_json(plain.stdout.splitlines())
    assert [t["final_response"] for t in returned["turns"]] == [f"done {t}" for t in TURNS]

    spans = sink.spans()
    by_id = {s.span_id: s for s in spans}
    turn_traces = {tid: ss for tid, ss in trees(spans).items() if any(is_ours(s, "invoke_agent") for s in ss)}
    assert len(turn_traces) == len(TURNS), "one trace per turn"
    for tag, tools in TURNS.items():
        (tid,) = [tid for tid, ss in turn_traces.items()
                  if any(s.attributes.get("gen_ai.tool.call.id") == f"call_{tag}_1" for s in ss)]
        trace = turn_traces[tid]
        (agent,) = [s for s in trace if is_ours(s, "invoke_agent")]
        assert agent.parent_span_id is None and agent.attributes["gen_ai.conversation.id"] == SESSION
        chats = [s for s in trace if is_ours(s, "chat")]
        assert len(chats) == 2 and len([s for s in trace if is_ours(s, "execute_tool")]) == tools
        assert agent.attributes["gen_ai.usage.input_tokens"] == llm.totals(tag)[0]
        assert agent.attributes["gen_ai.usage.output_tokens"] == llm.totals(tag)[1]
        # Under each of our chats: openai-v2's span of the same call, and under it the HTTP request itself.
        posts = [s for s in trace if s.scope == HTTPX and s.name.startswith("POST")]
        theirs = [s for s in trace if s.scope == OPENAI_V2]
        assert len(posts) == len(theirs) == len(chats)
        assert sorted(by_id[s.parent_span_id].span_id for s in theirs) == sorted(c.span_id for c in chats)
        assert sorted(by_id[p.parent_span_id].span_id for p in posts) == sorted(s.span_id for s in theirs)

    # Every other span: a known scope and name, and outside the turns only Hermes's endpoint probes, each a trace of one.
    unknown = sorted({(s.scope, s.name) for s in spans
                      if s.scope != OURS and not (s.scope in FOREIGN and FOREIGN[s.scope][0].fullmatch(s.name))})
    assert unknown == [], f"spans from a source nobody has looked at: {unknown}"
    for tid, trace in trees(spans).items():
        if tid not in turn_traces:
            assert [(s.scope in FOREIGN, s.name.split()[0], s.parent_span_id) for s in trace] == [(True, "GET", None)], trace


# -- Hermes's API server in the stack ----------------------------------------------------------------------------------


QUIET = {
    "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "openai,sqlite3",
    "OTEL_PYTHON_EXCLUDED_URLS": "/api/tags,/props,/version,/v1/models",
}
"""The recommended set-up, as documented: openai-v2 off (it doubles our LLM spans and token counts), sqlite3 off (a
span per statement of Hermes's session database), and Hermes's endpoint probes (the GETs it sends when it builds an
agent: /api/v1/models, /api/tags, /v1/props, /props, /version, /v1/models) left out of every HTTP instrumentation."""


@pytest.mark.parametrize("setup", ["as-installed", "quiet"])
def test_the_api_server_in_the_stack_continues_the_callers_trace_and_every_span_is_accounted_for(
    llm: FakeLLMServer, sink: OTLPSink, tmp_path: Path, setup: str
) -> None:
    """Hermes's real API server under ``opentelemetry-instrument`` (aiohttp-server, threading, httpx, sqlite3... as
    bootstrap installs them): a request carrying a ``traceparent`` is one trace, the caller's, holding the server
    span, our ``invoke_agent`` tree under it, and the spans of everything else the request made: Hermes's session
    database (sqlite3), the endpoint probes of the agent it builds per request, the LLM requests (under openai-v2's
    span of each call). In the ``quiet`` set-up (:data:`QUIET`) only the server span, our tree and one HTTP span per
    LLM call (under its chat) are left."""
    from opentelemetry import propagate, trace
    from opentelemetry.sdk.trace import TracerProvider

    from statebackends_hermes_testbed.frontend_api import post_chat
    from statebackends_hermes_testbed.processes import Service

    env = clean_environment(tmp_path, OTEL_SERVICE_NAME="hermes-api", OTEL_EXPORTER_OTLP_ENDPOINT=sink.base_url,
                            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", **(QUIET if setup == "quiet" else {}))
    argv = [str(INSTRUMENT), str(BIN / "python"), "-m", "statebackends_hermes_testbed.stack_app", "api",
            "--base-url", llm.base_url]
    tracer = TracerProvider().get_tracer("client")  # only for its ids: this process exports nothing
    with Service(argv, env, tmp_path) as api:
        server = json.loads(api.ready_line())
        with tracer.start_as_current_span("client", kind=trace.SpanKind.CLIENT) as client:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            reply = post_chat(SimpleNamespace(**server), "api1", "[conv:api1] [tools:2] hello", headers=carrier)
        assert (reply.status, reply.content) == (200, "done api1")
        assert api.stop() == 0, api.stderr[-3000:]
    caller = client.get_span_context()
    spans = sink.spans()
    by_id = {s.span_id: s for s in spans}
    by_trace = trees(spans)
    request = by_trace.pop(caller.trace_id)
    (server_span,) = [s for s in request if s.parent_span_id == caller.span_id]
    assert server_span.scope == AIOHTTP_SERVER and server_span.name == "POST /v1/chat/completions"
    (agent,) = [s for s in request if is_ours(s, "invoke_agent")]
    assert agent.parent_span_id == server_span.span_id
    assert [s for s in spans if s.scope == OURS and s.trace_id != caller.trace_id] == []
    chats = {s.span_id for s in request if is_ours(s, "chat")}
    posts = [s for s in request if s.scope == HTTPX and s.name == "POST"]
    assert len(chats) == len(posts) == 2
    if setup == "quiet":
        assert {s.scope for s in spans} == {AIOHTTP_SERVER, OURS, HTTPX} and by_trace == {}
        assert sorted(by_id[p.parent_span_id].span_id for p in posts) == sorted(chats)
        assert [s.name for s in request if s.scope == HTTPX] == ["POST", "POST"]
        return
    theirs = [s for s in request if s.scope == OPENAI_V2]
    assert sorted(by_id[s.parent_span_id].span_id for s in theirs) == sorted(chats)
    assert sorted(by_id[p.parent_span_id].span_id for p in posts) == sorted(s.span_id for s in theirs)
    sqlite = [s for s in request if s.scope == SQLITE]
    assert sqlite and all(s.parent_span_id == server_span.span_id for s in sqlite)  # the session database, per request
    unknown = sorted({(s.scope, s.name) for s in spans if s.scope not in (OURS, AIOHTTP_SERVER)
                      and not (s.scope in FOREIGN and FOREIGN[s.scope][0].fullmatch(s.name))})
    assert unknown == [], f"spans from a source nobody has looked at: {unknown}"
    # Nothing else ran but endpoint probes: every other trace is one GET.
    for trace_spans in by_trace.values():
        assert [(s.name.split()[0], s.parent_span_id) for s in trace_spans] == [("GET", None)], trace_spans
