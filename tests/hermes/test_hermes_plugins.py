"""The matrix's Hermes-plugin columns (``statebackends-matrix --hermes-plugin NAME``), on the real agent and plugins.

Two plugins a user installs today, enabled the way a user enables them (the key in ``plugins.enabled`` of
config.yaml, their own environment variables pointing them at the testbed's OTLP receiver on 127.0.0.1, Hermes's
own plugin discovery):
- ``otel_tracing``: hermes-plugin-otel-tracing 0.1.1 from PyPI (an entry point of ``hermes_agent.plugins``), which
  sets up its own SDK provider and OTLP/HTTP exporter. It keeps its per-turn state in a module-level dict keyed by
  session id (``_sessions``), its open API-call spans keyed by the call counter and its tool spans by name + time.
- ``observability/langfuse``: the plugin Hermes ships, on the ``langfuse`` SDK. It keys its turns by Hermes's
  ``turn_id``, but Hermes 0.19 hands its tool hooks the turn id stored on the agent (``agent._current_turn_id``),
  which the latest turn to start on a shared agent has overwritten.

The cells asserted here are the ones the dated printout (docs/matrix-hermes-integrations.md) shows, so a change in
a plugin's behaviour, or in our judge, fails here. Counts that come from races are asserted as bounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from opentelemetry import trace

from statebackends_hermes_testbed.driver import HermesBench
from statebackends_hermes_testbed.hermes_plugins import (
    LANGFUSE,
    OTEL_TRACING,
    HermesPlugin,
    PluginError,
    open_plugin,
    plugins_found,
)
from statebackends_hermes_testbed.matrix import plugin_notes, run_cell
from statebackends_hermes_testbed.otlp import OTLPSink
from statebackends_hermes_testbed.scenarios import BY_ID, agents
from statebackends_hermes_testbed.traces import CallTruth, Reading, judge

ROOT = Path(__file__).resolve().parents[2]
OTEL = "otel_tracing"
LANGFUSE_KEY = "observability/langfuse"


def _langfuse_ends_its_root() -> bool:
    """langfuse < 5 still has ``set_trace_io``, which the plugin's ``_finish_trace`` calls before ending the root."""
    from langfuse._client.span import LangfuseObservationWrapper

    return hasattr(LangfuseObservationWrapper, "set_trace_io")


ROOT_ENDED = _langfuse_ends_its_root()


# -- the receiver -----------------------------------------------------------------------------------------------------


def test_receiver_decodes_the_sdk_exporters_protobuf() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode

    sink = OTLPSink().start()
    try:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=sink.base_url + "/v1/traces")))
        tracer = provider.get_tracer("sender")
        with tracer.start_as_current_span("parent") as parent:
            with tracer.start_as_current_span("child", kind=SpanKind.CLIENT, attributes={"n": 3, "xs": ["a", "b"]}) as child:
                child.set_status(Status(StatusCode.ERROR, "boom"))
        provider.shutdown()
        got = {s.name: s for s in sink.readable_spans()}
        assert set(got) == {"parent", "child"}
        assert got["child"].parent.span_id == parent.get_span_context().span_id
        assert got["child"].context.trace_id == child.get_span_context().trace_id
        assert got["parent"].parent is None
        assert dict(got["child"].attributes) == {"n": 3, "xs": ("a", "b")}
        assert got["child"].status.status_code is StatusCode.ERROR and got["child"].status.description == "boom"
        assert got["child"].kind is SpanKind.CLIENT and got["child"].instrumentation_scope.name == "sender"
        assert ("POST", "/v1/traces") in sink.requests
    finally:
        sink.stop()


def test_receiver_decodes_otlp_json_with_hex_ids() -> None:
    body = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "json-sender"}, "spans": [{
        "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
        "parentSpanId": "eee19b7ec3c1b173", "name": "hermes.turn", "kind": 1,
        "attributes": [{"key": "hermes.session.id", "value": {"stringValue": "s1"}}],
        "status": {"code": 2, "message": "bad"},
    }]}]}]}
    sink = OTLPSink().start()
    try:
        request = urllib.request.Request(sink.base_url + "/v1/traces", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()
        (span,) = sink.spans()
        assert (span.trace_id, span.span_id, span.parent_span_id) == (
            0x5B8EFFF798038103D269B633813FC60C, 0xEEE19B7EC3C1B174, 0xEEE19B7EC3C1B173)
        assert (span.name, span.scope, span.attributes, span.status_code) == ("hermes.turn", "json-sender", {"hermes.session.id": "s1"}, 2)
    finally:
        sink.stop()


# -- the judge reading a plugin's spans (synthetic trees) -----------------------------------------------------------


def _plugin_trees(*, detached: bool, tool_of: str = "t1") -> list[Any]:
    """Two calls traced the way a Hermes plugin traces: a turn, its chats and its tool, no step; usage on the chats.
    ``detached``: each turn a root of its own (no caller span above it). ``tool_of``: whose tool call id ``t1``'s
    tool span carries."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("plugin")
    for tag in ("t1", "t2"):
        with tracer.start_as_current_span(f"call {tag}"):
            context = trace.set_span_in_context(trace.INVALID_SPAN) if detached else None
            with tracer.start_as_current_span("turn", context=context):
                for k in (1, 2):
                    with tracer.start_as_current_span("chat m", attributes={
                            "gen_ai.operation.name": "chat", "gen_ai.response.id": f"chatcmpl-{tag}-{k}",
                            "gen_ai.usage.input_tokens": 100 * k + 7, "gen_ai.usage.output_tokens": 10 * k + 3}):
                        pass
                owner = tool_of if tag == "t1" else tag
                with tracer.start_as_current_span("tool x", attributes={"gen_ai.tool.call.id": f"call_{owner}_1"}):
                    pass
    return exporter.get_finished_spans()


PLUGIN_LIKE = Reading(
    name="plugin-like", names=(("turn", "invoke_agent"), ("tool ", "execute_tool")),
    kinds=frozenset({"invoke_agent", "chat", "execute_tool"}), tokens_on="chat",
)
DETACHED = dataclasses.replace(PLUGIN_LIKE, name="detached", under_caller=False)
TRUTH = [CallTruth(tag=t, steps=2, chats=2, tools=1, input_tokens=314, output_tokens=36) for t in ("t1", "t2")]


@pytest.mark.parametrize(("reading", "detached"), [(PLUGIN_LIKE, False), (DETACHED, True)])
def test_judge_reads_a_plugin_without_steps_and_sums_chat_usage(reading: Reading, detached: bool) -> None:
    good = judge(_plugin_trees(detached=detached), TRUTH, reading=reading)
    assert good.ok, good.as_dict()
    assert good.expected == good.actual == {"invoke_agent": 2, "chat": 4, "execute_tool": 2}
    crossed = judge(_plugin_trees(detached=detached, tool_of="t2"), TRUTH, reading=reading)
    assert not crossed.ok and crossed.cross_talk == 1 and crossed.broken == ["t1"], crossed.as_dict()
    # Read as an OpenTelemetry instrumentation, the same spans have no steps and no usage on the turn.
    native = judge(_plugin_trees(detached=detached), TRUTH)
    assert not native.ok and native.actual["step"] == 0


def test_detached_turns_need_their_ids_and_their_own_tokens() -> None:
    wrong_usage = [CallTruth(tag=t, steps=2, chats=2, tools=1, input_tokens=1, output_tokens=36) for t in ("t1", "t2")]
    verdict = judge(_plugin_trees(detached=True), wrong_usage, reading=DETACHED)
    assert verdict.cross_talk == 2 and verdict.broken == ["t1", "t2"]
    # Under the caller reading, a detached tree has no caller above it: every span is an orphan.
    orphaned = judge(_plugin_trees(detached=True), TRUTH, reading=PLUGIN_LIKE)
    assert orphaned.orphans == 8


# -- the plugins' columns on the real agent ---------------------------------------------------------------------------


def _globals() -> tuple[Any, ...]:
    from opentelemetry.metrics import _internal as metrics

    return (trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE._done, metrics._METER_PROVIDER,
            metrics._METER_PROVIDER_SET_ONCE._done, metrics._PROXY_METER_PROVIDER._real_meter_provider)


def _config_text() -> str | None:
    path = Path(os.environ["HERMES_HOME"]) / "config.yaml"
    return path.read_text() if path.exists() else None


def _hooks() -> dict[str, int]:
    from hermes_cli import plugins

    return {hook: len(cbs) for hook, cbs in plugins.get_plugin_manager()._hooks.items() if cbs}


@pytest.fixture(scope="module")
def columns(hermes_bench: HermesBench) -> Iterator[dict[str, HermesPlugin]]:
    """Both plugins as matrix columns of the session's bench (each enabled only while its cell runs)."""
    opened = {key: open_plugin(key) for key in (OTEL, LANGFUSE_KEY)}
    for key, plugin in opened.items():
        hermes_bench.instrumentors.add_plugin(key, plugin)
    try:
        yield opened
    finally:
        hermes_bench.uninstrument()
        for key, plugin in opened.items():
            hermes_bench.instrumentors.plugins.pop(key, None)
            plugin.close()


def cell(bench: HermesBench, columns: dict[str, HermesPlugin], scenario: str, key: str) -> Any:
    """One cell of ``key``'s column, which must have run, and left nothing of the plugin behind."""
    agents(bench)  # built first: building an agent sets Hermes's own HERMES_SESSION_ID
    before = (dict(os.environ), _config_text(), _globals(), _hooks())
    result = run_cell(bench, BY_ID[scenario], key, foreign=True)
    assert result.error is None, result.error
    assert (dict(os.environ), _config_text(), _globals(), _hooks()) == before, "the plugin's settings leaked"
    assert not columns[key].enabled and "hermes_plugin_otel_tracing" not in sys.modules
    bench.reset()
    return result.verdict


def test_plugins_are_found_as_a_user_finds_them() -> None:
    found = plugins_found()
    assert OTEL in found and LANGFUSE_KEY in found
    assert not any(key.startswith("image_gen/") for key in found), "backends Hermes loads itself are not plugins to judge"


def test_sequential_control(bench: HermesBench, columns: dict[str, HermesPlugin]) -> None:
    """One turn at a time: the otel plugin's tree is right. Langfuse's is right where its SDK ends the root (< 5);
    with langfuse 5 the plugin's _finish_trace raises before ending it (no set_trace_io): every turn's root is
    never ended, so never exported, and its three children hang under a span that never arrives."""
    otel = cell(bench, columns, "sequential", OTEL)
    assert otel.ok and otel.summary() == "ok", otel.as_dict()
    assert otel.expected == {"invoke_agent": 3, "chat": 6, "execute_tool": 3}
    lf = cell(bench, columns, "sequential", LANGFUSE_KEY)
    if ROOT_ENDED:
        assert lf.ok, lf.as_dict()
    else:
        assert lf.summary() == "spans invoke_agent 0/3; orphans 9; never ended 3", lf.as_dict()
    assert lf.cross_talk == 0, "each turn's tool call ids and usage are its own"


def test_overlapping_turns_on_one_agent(bench: HermesBench, columns: dict[str, HermesPlugin]) -> None:
    """N threads on one agent (one session id): the otel plugin's one turn slot per session and its API-call spans
    keyed by the call counter lose all but one turn and one chat per round, and never end the rest; Langfuse's
    tool hooks get the turn id of the latest turn to start (agent._current_turn_id), often one already finished:
    their tool spans are not made at all."""
    n = bench.callers
    otel = cell(bench, columns, "threads", OTEL)
    assert otel.actual["invoke_agent"] < n and otel.actual["chat"] < 2 * n, otel.as_dict()
    assert otel.never_ended >= (n - otel.actual["invoke_agent"]) + (2 * n - otel.actual["chat"]), otel.as_dict()
    assert otel.orphans > 0  # tool spans under turns that were never exported
    lf = cell(bench, columns, "threads", LANGFUSE_KEY)
    assert lf.actual["execute_tool"] < n and lf.actual["chat"] == 2 * n, lf.as_dict()
    assert lf.cross_talk == 0  # its generations are keyed by the turn id Hermes passes them: right


def test_overlapping_turns_of_one_session(bench: HermesBench, columns: dict[str, HermesPlugin]) -> None:
    """Turns sharing the session id as task id (Hermes's CLI, ACP adapter, API server): the otel plugin finds
    the session's turn slot for every tool, Langfuse every tool's turn by agent._current_turn_id: both hang other
    turns' tool spans in one turn's tree (cross-talk)."""
    n = bench.callers
    otel = cell(bench, columns, "shared_task_id", OTEL)
    assert otel.actual["invoke_agent"] < n and otel.never_ended > 0, otel.as_dict()
    assert otel.cross_talk > 0, otel.as_dict()
    lf = cell(bench, columns, "shared_task_id", LANGFUSE_KEY)
    assert lf.cross_talk > 0 and lf.actual["chat"] == 2 * n, lf.as_dict()
    assert not lf.ok


def test_tool_pool_alone_is_right(bench: HermesBench, columns: dict[str, HermesPlugin]) -> None:
    """One turn whose three tools run at once in Hermes's pool: no overlap of turns, nothing mixed."""
    otel = cell(bench, columns, "tool_pool", OTEL)
    assert otel.ok, otel.as_dict()
    lf = cell(bench, columns, "tool_pool", LANGFUSE_KEY)
    assert lf.ok or (not ROOT_ENDED and lf.summary() == "spans invoke_agent 0/1; orphans 5; never ended 1"), lf.as_dict()


def test_plugin_footer_says_what_is_not_judged(columns: dict[str, HermesPlugin]) -> None:
    notes = "\n".join(plugin_notes(columns, {"versions": {"hermes-plugin-otel-tracing": "0.1.1"}}, 2))
    for key, reading in ((OTEL, OTEL_TRACING), (LANGFUSE_KEY, LANGFUSE)):
        for aspect, why in reading.not_applicable:
            assert f"not judged for `{key}`: {aspect}, because {why}." in notes
    assert "hermes-plugin-otel-tracing 0.1.1" in notes and "n/a rows" in notes


# -- bad input --------------------------------------------------------------------------------------------------------


BROKEN = {
    "sb_import_fails": "raise RuntimeError('sb_import_fails cannot import')\n",
    "sb_register_fails": "def register(ctx):\n    raise RuntimeError('sb_register_fails cannot register')\n",
    "sb_no_hooks": "def register(ctx):\n    pass\n",
}


def _write_plugins(root: Path) -> None:
    for name, code in BROKEN.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "plugin.yaml").write_text(f"name: {name}\nversion: '0.0.1'\n")
        (folder / "__init__.py").write_text(code)


@pytest.fixture
def broken_plugins() -> Iterator[None]:
    """Three user plugins under $HERMES_HOME/plugins that fail in three ways."""
    import shutil

    root = Path(os.environ["HERMES_HOME"]) / "plugins"
    _write_plugins(root)
    try:
        yield
    finally:
        for name in BROKEN:
            shutil.rmtree(root / name, ignore_errors=True)


@pytest.mark.parametrize(("name", "cause"), [
    ("sb_import_fails", "sb_import_fails cannot import"),
    ("sb_register_fails", "sb_register_fails cannot register"),
    ("sb_no_hooks", "registered no hook"),
    ("no_such_plugin", "no such Hermes plugin"),
])
def test_a_plugin_that_cannot_be_judged_is_one_clear_error(broken_plugins: None, name: str, cause: str) -> None:
    before = (dict(os.environ), _config_text(), _globals(), _hooks())
    with pytest.raises(PluginError) as info:
        open_plugin(name)
    message = str(info.value)
    assert f"--hermes-plugin {name!r}" in message and cause in message, message
    assert "plugins found:" in message and OTEL in message and LANGFUSE_KEY in message, message
    assert (dict(os.environ), _config_text(), _globals(), _hooks()) == before, "a failed enable left settings behind"


def run_matrix(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "statebackends_hermes_testbed.matrix", *args, "--json"],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


def test_cli_bad_plugin_leaves_the_other_columns_as_they_are(tmp_path: Path) -> None:
    """A broken plugin and an unknown name beside a backend and a good plugin (project plugins, in a subprocess):
    one error each naming it and the plugins found, no traceback; the other columns run as without them; exit 2."""
    _write_plugins(tmp_path / ".hermes" / "plugins")
    code, data, err = run_matrix(
        "--hermes-plugin", "sb_register_fails", "--hermes-plugin", "nope", "--hermes-plugin", OTEL,
        "--backend", "contextvar", "--scenario", "sequential",
        cwd=tmp_path, env={"HERMES_ENABLE_PROJECT_PLUGINS": "1",
                           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("statebackends-matrix: error:")]
    assert len(errors) == 2, errors
    assert "'sb_register_fails'" in errors[0] and "cannot register" in errors[0] and "plugins found:" in errors[0]
    assert "'nope'" in errors[1] and OTEL in errors[1] and "sb_register_fails" in errors[1]
    assert data["errors"] == [e.removeprefix("statebackends-matrix: error: ") for e in errors]
    cells = {c["backend"]: c for c in data["cells"]}
    assert set(cells) == {"contextvar", OTEL}
    assert cells["contextvar"]["ok"] and cells["contextvar"]["expected"] is True
    assert cells[OTEL]["ok"] and cells[OTEL]["expected"] is None
    assert set(data["hermes_plugins"]) == {OTEL}
    assert "react step" in data["hermes_plugins"][OTEL]["not_applicable"]


def test_cli_plugin_columns_alone(tmp_path: Path) -> None:
    """``--hermes-plugin`` alone runs only its column (n/a where a row needs our hooks), exit code 0."""
    code, data, err = run_matrix(
        "--hermes-plugin", LANGFUSE_KEY, "--scenario", "tool_pool", "--scenario", "async_tasks",
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    assert code == 0, err[-3000:]
    cells = {c["scenario"]: c for c in data["cells"]}
    assert {c["backend"] for c in cells.values()} == {LANGFUSE_KEY}
    assert cells["async_tasks"]["applicable"] is False
    assert cells["tool_pool"]["verdict"]["actual"] == {"invoke_agent": int(ROOT_ENDED), "chat": 2, "execute_tool": 3}
    assert data["stamp"]["versions"]["langfuse"] and data["errors"] == []
