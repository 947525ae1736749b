"""The correctness matrix in pytest: one test per backend x scenario, expected outcome from the declarations.

A cell must be ok exactly when its backend declares (``isolates``) everything the
scenario requires. A known-bad cell that starts passing FAILS too: the
declaration (or the scenario) is then wrong and must be fixed, not ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from statebackends_hermes_testbed.matrix import run_cell
from statebackends_hermes_testbed.scenarios import (
    BY_ID,
    HTTPX_VARIANTS,
    OTEL_BRIDGED,
    SCENARIOS,
    THREADING_VARIANTS,
    expected_ok,
)
from statebackends import Concurrency, available
from statebackends_hermes_testbed.table import isolation_table

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = list(available())
OVERLAPPING = {Concurrency.THREADS, Concurrency.ASYNC_TASKS}


@pytest.fixture(scope="session")
def matrix_bench(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The session's ``hermes_bench`` (tests/conftest.py) when there is one, else a bench of our own."""
    try:
        bench = request.getfixturevalue("hermes_bench")
    except pytest.FixtureLookupError:
        bench = None
    if bench is not None:
        yield bench
        return
    from statebackends_hermes_testbed.driver import HermesBench

    own = HermesBench()
    try:
        yield own
    finally:
        own.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_cell(matrix_bench: Any, scenario: Any, backend: str) -> None:
    try:
        cell = run_cell(matrix_bench, scenario, backend)
    finally:
        matrix_bench.uninstrument()  # leave the shared bench as the other tests expect it
        matrix_bench.reset()
    assert cell.error is None, f"{scenario.id} x {backend} raised: {cell.error}"
    if scenario in THREADING_VARIANTS or "+threading" in scenario.id:
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor

        assert not ThreadingInstrumentor().is_instrumented_by_opentelemetry, "the threading instrumentation leaked"
    if scenario in HTTPX_VARIANTS:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        assert not HTTPXClientInstrumentor().is_instrumented_by_opentelemetry, "the httpx instrumentation leaked"
        assert not matrix_bench.judge_requests
    verdict = cell.verdict
    requires = ", ".join(sorted(c.value for c in scenario.requires)) or "nothing"
    if cell.expected:
        assert verdict.ok, (
            f"{backend} declares it isolates {requires}, but {scenario.id} broke: {verdict.summary()}; {verdict.notes[:5]}"
        )
    else:
        assert not verdict.ok, (
            f"{backend} does not declare {requires}, yet {scenario.id} passed: "
            "fix the backend's `isolates` declaration or the scenario"
        )
    if backend == "instance" and scenario.requires & OVERLAPPING:
        assert verdict.orphans + verdict.cross_talk > 0, (
            f"the instance backend's corruption under {scenario.id} is not visible: {verdict.as_dict()}"
        )


def test_expectations_come_from_the_declarations() -> None:
    for scenario in SCENARIOS:
        for backend in BACKENDS:
            isolates = available()[backend]
            declared = getattr(isolates, "isolates", None)
            if declared is not None:
                assert expected_ok(scenario, backend) == (scenario.requires <= declared or backend in scenario.also_ok)
        # Expectations beyond the declarations are data of the threading variants only (see OTEL_BRIDGED).
        assert not scenario.also_ok or scenario in THREADING_VARIANTS


def test_new_rows_are_in_the_matrix_with_their_expectations() -> None:
    """The greenlet row and the threading variants, with the cells they are expected to give."""
    expected = {
        "greenlets": {"invocation_id"},
        "raw_thread+threading": {"instance", "invocation_id", "otel_context"},
        "shared_task_id_raw+threading": {"otel_context"},
        "shared_task_id_two_agents_raw+threading": {"instance", "invocation_id", "otel_context"},
        # Issue 17, finding 5: late work of one turn, run on its thread while the next turn is open (LATE_WORK).
        "late_work_next_turn": {"contextvar", "invocation_id", "otel_context"},
    }
    for sid, ok in expected.items():
        assert {b for b in BACKENDS if expected_ok(BY_ID[sid], b)} == ok, sid
    assert Concurrency.GREENLETS in BY_ID["greenlets"].requires and BY_ID["greenlets"].native
    assert OTEL_BRIDGED == {"otel_context"}
    # Without the threading instrumentation the raw-hop row stays a failure for otel_context.
    assert not expected_ok(BY_ID["raw_thread"], "otel_context")


def test_the_httpx_rows_judge_the_llm_requests_with_their_plain_rows_expectations() -> None:
    """Every ``+httpx`` row judges the LLM requests too, and is expected ok exactly where its plain row is: carrying
    the chat's context into Hermes's request thread does not depend on the state backend."""
    plain_of = {
        "threads_tool_pool+httpx": "threads_tool_pool",
        "shared_task_id+httpx": "shared_task_id",
        "delegate_batch+httpx": "delegate_batch",
        "greenlets+httpx": "greenlets",
        "threads_tool_pool+httpx+threading": "threads_tool_pool",
    }
    assert {s.id for s in HTTPX_VARIANTS} == {*plain_of, "streaming+httpx", "streaming+httpx+threading"}
    for sid, plain in plain_of.items():
        assert {b for b in BACKENDS if expected_ok(BY_ID[sid], b)} == {b for b in BACKENDS if expected_ok(BY_ID[plain], b)}
    for sid in ("streaming+httpx", "streaming+httpx+threading"):  # two agents, one turn each, pooled tools
        assert {b for b in BACKENDS if expected_ok(BY_ID[sid], b)} == {"contextvar", "instance", "invocation_id", "otel_context"}
    assert all(s in SCENARIOS for s in HTTPX_VARIANTS)


def _http_trace(*, http_parent: str, traceparent: str = "own", response_id: str = "chatcmpl-t1-1") -> Any:
    """One judged call whose LLM request's HTTP span hangs under ``http_parent`` (chat, step, agent, none); the
    request the fake LLM got carries ``traceparent`` (own: the HTTP span's, other: another trace's, none)."""
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from statebackends_hermes_testbed.traces import CallTruth, LLMRequest, judge

    op = "gen_ai.operation.name"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    http_attrs = {"http.request.method": "POST", "url.full": "http://127.0.0.1:1/v1/chat/completions"}
    with tracer.start_as_current_span("other call") as other:
        pass
    with tracer.start_as_current_span("call t1"):
        with tracer.start_as_current_span("invoke_agent hermes", attributes={op: "invoke_agent"}) as agent_span:
            agent_span.set_attributes({"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 2})
            with tracer.start_as_current_span("react step") as step:
                with tracer.start_as_current_span("chat m", attributes={op: "chat", "gen_ai.response.id": response_id}) as chat:
                    parent = {"chat": chat, "step": step, "agent": agent_span}.get(http_parent)
                    ctx = trace.set_span_in_context(parent) if parent is not None else Context()  # a root
                    http = tracer.start_span("POST", context=ctx, kind=SpanKind.CLIENT, attributes=http_attrs)
                    http.end()
    source = {"own": http, "other": other}.get(traceparent)
    header = None
    if source is not None:
        sc = source.get_span_context()
        header = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-01"
    truth = CallTruth(tag="t1", steps=1, chats=1, tools=0, input_tokens=10, output_tokens=2,
                      requests=[LLMRequest(header, "chatcmpl-t1-1")])
    return judge(exporter.get_finished_spans(), [truth])


@pytest.mark.parametrize(
    ("http_parent", "traceparent", "response_id", "ok"),
    [
        ("chat", "own", "chatcmpl-t1-1", True),
        ("agent", "own", "chatcmpl-t1-1", False),  # the threading instrumentation alone, before the fix
        ("none", "own", "chatcmpl-t1-1", False),  # the httpx instrumentation alone: a trace of its own
        ("chat", "other", "chatcmpl-t1-1", False),
        ("chat", "none", "chatcmpl-t1-1", False),
        ("chat", "own", "chatcmpl-t1-2", False),  # under a chat of the call, but another request's
    ],
)
def test_judge_counts_llm_requests_off_their_chat(http_parent: str, traceparent: str, response_id: str, ok: bool) -> None:
    verdict = _http_trace(http_parent=http_parent, traceparent=traceparent, response_id=response_id)
    assert verdict.ok is ok, verdict.as_dict()
    assert verdict.requests_off_chat == (0 if ok else 1)
    if not ok:
        assert verdict.broken == ["t1"] and "LLM request" in verdict.notes[-1]


def test_fake_llm_records_the_traceparent_of_every_request() -> None:
    import urllib.error
    import urllib.request

    from statebackends_hermes_testbed.fakellm import FakeLLMServer

    header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with FakeLLMServer() as server:
        for user, traceparent in (("[conv:tp] hi", header), ("[conv:tp] [llm_error] hi", None)):
            body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": user}]}).encode()
            request = urllib.request.Request(f"{server.base_url}/chat/completions", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            if traceparent:
                request.add_header("traceparent", traceparent)
            try:
                urllib.request.urlopen(request, timeout=10).read()
            except urllib.error.HTTPError as exc:
                assert exc.code == 400
        assert server.requests("tp") == [(header, "chatcmpl-tp-1"), (None, None)]
        assert [e.traceparent for e in server.log("tp")] == [header]


def run_matrix_cli(*args: str, timeout: float = 300) -> dict[str, Any]:
    """``python -m statebackends_hermes_testbed.matrix ARGS --json`` in a subprocess: its exit code must be 0; its JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "statebackends_hermes_testbed.matrix", *args, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_matrix_cli_prints_valid_json() -> None:
    data = run_matrix_cli("--scenario", "sequential", "--backend", "contextvar")
    assert data["total"] == 1 and data["as_expected"] == 1
    (cell,) = data["cells"]
    assert (cell["backend"], cell["scenario"], cell["expected"], cell["ok"]) == ("contextvar", "sequential", True, True)
    assert cell["verdict"]["summary"] == "ok"
    stamp = data["stamp"]
    assert stamp["python"] and stamp["cpu_count"]
    assert all(stamp["versions"][d] for d in ("hermes-agent", "opentelemetry-sdk", "statebackends"))
    assert data["callers"] == 8


def test_matrix_cli_names_the_valid_choices_for_a_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    from statebackends_hermes_testbed.matrix import main

    assert main(["--backend", "fibers"]) == 2
    err = capsys.readouterr().err
    assert "'fibers'" in err and all(name in err for name in BACKENDS)
    assert main(["--scenario", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and all(s.id in err for s in SCENARIOS)


def test_isolation_table_is_made_from_the_declarations() -> None:
    table = isolation_table()
    for name in ("contextvar", "instance", "invocation_id", "otel_context", "threadlocal"):
        assert f"`{name}`" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert rows["asyncio tasks on one loop"].count("**no**") == 2  # instance, threadlocal


def test_readme_embeds_the_current_isolation_table() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert isolation_table() in readme, "README's backend table drifted: paste isolation_table()"


def _late_trace(parent_kind: str | None) -> Any:
    """One finished call (``late``: one step, one tool) and a late-work span under ``parent_kind`` (None: a root)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from statebackends_hermes_testbed.traces import LATE_TOOL, CallTruth, judge

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    made: dict[str, Any] = {}
    with tracer.start_as_current_span("call late"):
        with tracer.start_as_current_span("invoke_agent hermes") as made["invoke_agent"]:
            with tracer.start_as_current_span("react step") as made["step"]:
                with tracer.start_as_current_span("chat fake-model"):
                    pass
                with tracer.start_as_current_span("execute_tool sb_late") as made["execute_tool"]:
                    pass
    context = trace.set_span_in_context(made[parent_kind]) if parent_kind else None
    tracer.start_span(f"execute_tool {LATE_TOOL}", context=context).end()
    truth = CallTruth(tag="late", steps=1, chats=1, tools=1, late=1)
    return judge(exporter.get_finished_spans(), [truth])


@pytest.mark.parametrize(("parent_kind", "ok"), [(None, True), ("execute_tool", True), ("step", False), ("invoke_agent", False)])
def test_judge_keeps_late_work_out_of_the_ended_call(parent_kind: str | None, ok: bool) -> None:
    """Late work may start a trace of its own or hang under the tool that started it; never in the call's own tree."""
    verdict = _late_trace(parent_kind)
    assert verdict.ok is ok, verdict.as_dict()
    assert verdict.actual["late_work"] == 1
    assert (verdict.broken == ["late"]) is not ok


# -- foreign instrumentors (--instrumentor MODULE:CLASS) -----------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("no_such_module_xyz:Instrumentor", "module 'no_such_module_xyz' not found"),
        ("statebackends:StateStore", "is not a BaseInstrumentor subclass"),
        ("statebackends_hermes_agent:NoSuchClass", "has no attribute 'NoSuchClass'"),
        ("statebackends_hermes_agent", "expected MODULE:CLASS"),
    ],
)
def test_instrumentor_option_names_the_problem(spec: str, problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    from statebackends_hermes_testbed.matrix import main

    assert main(["--instrumentor", spec, "--scenario", "sequential"]) == 2
    err = capsys.readouterr().err
    assert problem in err and repr(spec) in err


def test_instrumentor_option_refuses_backends(capsys: pytest.CaptureFixture[str]) -> None:
    from statebackends_hermes_testbed.matrix import main

    assert main(["--instrumentor", "statebackends_hermes_agent:HermesAgentInstrumentor", "--backend", "contextvar"]) == 2
    assert "--backend does not apply" in capsys.readouterr().err


def test_our_instrumentor_judged_as_foreign_gives_ok_and_na() -> None:
    """Our own class through ``--instrumentor``: a real-agent scenario is ok, a stub scenario is n/a, exit code 0."""
    spec = "statebackends_hermes_agent:HermesAgentInstrumentor"
    data = run_matrix_cli("--instrumentor", spec, "--scenario", "sequential", "--scenario", "async_tasks")
    assert data["instrumentor"] == spec and data["not_applicable"] == 1
    cells = {c["scenario"]: c for c in data["cells"]}
    assert {c["backend"] for c in cells.values()} == {spec}
    seq, stub = cells["sequential"], cells["async_tasks"]
    assert (seq["applicable"], seq["expected"], seq["ok"], seq["verdict"]["summary"]) == (True, None, True, "ok")
    assert seq["verdict"]["state_left"] == 0  # no store is read for a foreign column
    assert (stub["applicable"], stub["ok"], stub["verdict"]) == (False, False, None)


LOONGSUITE_SPEC = "opentelemetry.instrumentation.hermes_agent:HermesAgentInstrumentor"


def _loongsuite_installed() -> bool:
    from statebackends_hermes_testbed.modes import loongsuite_available

    return loongsuite_available()


@pytest.mark.skipif(not _loongsuite_installed(), reason="loongsuite 0.9.0 is in the compare set only (CI runs it there)")
def test_loongsuite_column_as_measured_in_docs() -> None:
    """loongsuite 0.9.0 judged from its spans: right in the control and on overlapping calls (turns of one session
    included), its subagents start traces of their own (docs/matrix-loongsuite.md, matrix-hermes-integrations.md)."""
    data = run_matrix_cli("--instrumentor", LOONGSUITE_SPEC, "--scenario", "sequential", "--scenario", "threads",
                          "--scenario", "shared_task_id", "--scenario", "delegate", timeout=600)
    cells = {c["scenario"]: c for c in data["cells"]}
    for ok in ("sequential", "threads", "shared_task_id"):
        assert cells[ok]["ok"] is True, cells[ok]["verdict"]
    delegate = cells["delegate"]
    assert delegate["ok"] is False and delegate["verdict"]["orphans"] > 0, delegate["verdict"]


def test_foreign_cell_never_counts_as_unexpected() -> None:
    from statebackends_hermes_testbed.matrix import UNEXPECTED, Cell
    from statebackends_hermes_testbed.traces import Verdict

    broken = Verdict(expected={"chat": 2}, actual={"chat": 1})
    foreign = Cell(scenario=BY_ID["threads"], backend="x:Y", expected=None, verdict=broken)
    assert not foreign.ok and foreign.as_expected and UNEXPECTED not in foreign.text()
    declared = Cell(scenario=BY_ID["threads"], backend="contextvar", expected=True, verdict=broken)
    assert not declared.as_expected and UNEXPECTED in declared.text()
    na = Cell(scenario=BY_ID["async_tasks"], backend="x:Y", expected=None, applicable=False)
    assert na.text() == "n/a" and not na.ok and na.as_expected


def _foreign_trace(*, tool_parent: str, entry: bool = True) -> Any:
    """A call traced the way another instrumentation might: its own span names, kinds only in
    ``gen_ai.operation.name``, an entry span between caller and agent; the tool under ``tool_parent``."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from statebackends_hermes_testbed.traces import CallTruth, judge

    op = "gen_ai.operation.name"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("call t1"):
        with contextlib.ExitStack() as stack:
            if entry:
                stack.enter_context(tracer.start_as_current_span("enter_ai_application_system", attributes={op: "enter"}))
            with tracer.start_as_current_span("agent run", attributes={op: "invoke_agent"}) as agent_span:
                with tracer.start_as_current_span("step one", attributes={op: "react"}):
                    with tracer.start_as_current_span("llm", attributes={op: "chat", "gen_ai.response.id": "chatcmpl-t1-1"}):
                        pass
                    if tool_parent == "step":
                        with tracer.start_as_current_span("tool", attributes={op: "execute_tool", "gen_ai.tool.call.id": "call_t1_1"}):
                            pass
                if tool_parent == "agent":
                    with tracer.start_as_current_span("tool", attributes={op: "execute_tool", "gen_ai.tool.call.id": "call_t1_1"}):
                        pass
                agent_span.set_attribute("gen_ai.usage.input_tokens", 10)
                agent_span.set_attribute("gen_ai.usage.output_tokens", 2)
    return judge(exporter.get_finished_spans(), [CallTruth(tag="t1", steps=1, chats=1, tools=1, input_tokens=10, output_tokens=2)])


def test_judge_classifies_by_operation_name_and_looks_through_entry_spans() -> None:
    good = _foreign_trace(tool_parent="step")
    assert good.ok, good.as_dict()
    assert good.actual == {"invoke_agent": 1, "step": 1, "chat": 1, "execute_tool": 1}
    assert _foreign_trace(tool_parent="step", entry=False).ok
    wrong = _foreign_trace(tool_parent="agent")  # a tool hung under the agent, not its step
    assert not wrong.ok and wrong.orphans == 1 and wrong.broken == ["t1"]


@pytest.mark.parametrize(("backend", "ok"), [("invocation_id", True), ("contextvar", False)])
def test_greenlet_stub_fallback_gives_the_declared_outcome(backend: str, ok: bool) -> None:
    """The greenlet stub agent (the fallback of the ``greenlets`` row), in its gevent subprocess."""
    from statebackends_hermes_testbed.greenlets import run_in_subprocess

    data = run_in_subprocess(backend, 4, "stub")
    assert data["monkey_patched"] and data["agent"] == "stub" and data["max_overlap"] >= 2, data
    assert data["ok"] is ok, data
    if not ok:  # the spawned greenlet starts with an empty context: its tool spans lose their parent
        assert data["orphans"] > 0, data
