"""The GenAI semantic conventions on the REAL hermes-agent: content capture modes, message shapes, provider, server, metrics.

Every test instruments with its own SDK tracer, meter and logger providers (in-memory exporters, and a
span processor that keeps each span's attributes as they were at start), drives the real agent on the
fake LLM server (127.0.0.1), and checks what the conventions ask. Captured messages are validated
against ``tests/hermes/schemas/gen_ai_messages.json`` (written from semantic conventions 1.37.0).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit

import jsonschema
import pytest
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import StatusCode

from statebackends_hermes_agent import genai
from statebackends_hermes_agent.config import ENV_LEGACY_REACT_ATTRIBUTES
from statebackends_hermes_agent.descriptions import ToolDescriptions
from statebackends_hermes_testbed.driver import HermesBench
from statebackends_hermes_testbed.forking import in_forked_child
from statebackends_hermes_testbed.hermes_harness import BENCH_TOOLSET, hermes_version
from statebackends_hermes_testbed.inmemory import InMemoryProviders

ENV_CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
ENV_BACKENDS = ("OTEL_INSTRUMENTATION_HERMES_AGENT_STATE_BACKEND", "STATEBACKENDS_BACKEND", "OTEL_PYTHON_STATE_BACKEND",
                ENV_LEGACY_REACT_ATTRIBUTES)
INPUT, OUTPUT = "gen_ai.input.messages", "gen_ai.output.messages"
TOOL_ARGS, TOOL_RESULT = "gen_ai.tool.call.arguments", "gen_ai.tool.call.result"
CONTENT_KEYS = (INPUT, OUTPUT, TOOL_ARGS, TOOL_RESULT)
EVENT = "gen_ai.client.inference.operation.details"
DURATION, TOKENS, TTFC = (
    "gen_ai.client.operation.duration",
    "gen_ai.client.token.usage",
    "gen_ai.client.operation.time_to_first_chunk",
)
# The conventions' advisory bucket boundaries, written out here (not read from the code under test).
DURATION_BOUNDS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BOUNDS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
TTFC_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "gen_ai_messages.json").read_text())


def _validator(definition: str) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(SCHEMA)
    cls.check_schema(SCHEMA)
    return cls({**SCHEMA, "$ref": f"#/$defs/{definition}"})


INPUT_SCHEMA = _validator("inputMessages")
OUTPUT_SCHEMA = _validator("outputMessages")


def _plain(value: Any) -> Any:
    """A JSON string parsed, or a structured log attribute (tuples) as plain JSON values."""
    return json.loads(value) if isinstance(value, str) else json.loads(json.dumps(value))


def valid_inputs(value: Any) -> list[dict[str, Any]]:
    messages = _plain(value)
    INPUT_SCHEMA.validate(messages)
    return messages


def valid_outputs(value: Any) -> list[dict[str, Any]]:
    messages = _plain(value)
    OUTPUT_SCHEMA.validate(messages)
    return messages


# -- the telemetry of one test ------------------------------------------------------------------------------


class StartRecorder(SpanProcessor):
    """Keeps each span's attributes as they were when it started."""

    def __init__(self) -> None:
        self.at_start: dict[int, dict[str, Any]] = {}

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        self.at_start[span.context.span_id] = dict(span.attributes or {})


class Telemetry(InMemoryProviders):
    """SDK tracer, meter and logger providers with in-memory exporters, and the instrumentation on them."""

    def __init__(self, bench: HermesBench) -> None:
        self.bench = bench
        self.starts = StartRecorder()
        super().__init__(self.starts)

    def instrument(self) -> None:
        self.bench.instrumentor.instrument(
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            logger_provider=self.logger_provider,
            state_backend="contextvar",
        )

    def run(self, agent: Any, tag: str, directives: str = "[tools:1]") -> Any:
        return agent.run_conversation(f"[conv:{tag}] {directives} hello")

    def of(self, prefix: str) -> list[ReadableSpan]:
        return sorted((s for s in self.spans.get_finished_spans() if s.name.startswith(prefix)), key=lambda s: s.start_time)

    def events(self) -> list[Any]:
        records = [getattr(r, "log_record", r) for r in self.logs.get_finished_logs()]
        return [r for r in records if r.event_name == EVENT]

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found


@pytest.fixture
def tel(hermes_bench: HermesBench, monkeypatch: pytest.MonkeyPatch) -> Iterator[Telemetry]:
    for var in (ENV_CAPTURE, *ENV_BACKENDS):
        monkeypatch.delenv(var, raising=False)
    hermes_bench.uninstrument()
    hermes_bench.reset()
    yield Telemetry(hermes_bench)
    hermes_bench.uninstrument()


def _with_mode(tel: Telemetry, monkeypatch: pytest.MonkeyPatch, value: Optional[str]) -> None:
    if value is not None:
        monkeypatch.setenv(ENV_CAPTURE, value)
    tel.instrument()


def _server(bench: HermesBench) -> tuple[str, int]:
    parts = urlsplit(bench.server.base_url)
    return parts.hostname, parts.port


# -- content capture modes -------------------------------------------------------------------------------------


def test_nothing_is_captured_by_default(tel: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_mode(tel, monkeypatch, None)
    tel.run(tel.bench.agent(), "cv-off")
    spans = tel.spans.get_finished_spans()
    assert len(spans) == 6
    assert not [(s.name, k) for s in spans for k in CONTENT_KEYS if k in s.attributes]
    assert tel.events() == []


def test_capturing_nothing_builds_no_message(tel: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    """With NO_CONTENT no message is converted or serialised (and no event logger exists), streaming or not."""
    calls: list[str] = []
    for name in ("input_messages", "output_messages", "text_message", "to_json", "emit_details"):
        real = getattr(genai, name)
        monkeypatch.setattr(genai, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n), _r(*a, **k))[1])
    _with_mode(tel, monkeypatch, "NO_CONTENT")
    assert tel.bench.instrumentor.telemetry.components.event_logger is None
    tel.run(tel.bench.agent(), "cv-free")
    tel.run(tel.bench.agent(streaming=True), "cv-free-s")
    assert len(tel.spans.get_finished_spans()) == 12
    assert calls == []
    tel.bench.uninstrument()
    _with_mode(tel, monkeypatch, "SPAN_ONLY")  # the control: the same counters see the conversions
    tel.run(tel.bench.agent(), "cv-free-on")
    assert {"input_messages", "output_messages", "to_json"} <= set(calls)


@pytest.mark.parametrize("value", ["SPAN_ONLY", "span_only", "true", "True"])
def test_span_capture_puts_valid_messages_on_every_span(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    _with_mode(tel, monkeypatch, value)
    tag = f"cv-span-{value.lower()}"
    result = tel.run(tel.bench.agent(), tag)
    assert result["final_response"] == f"done {tag}"

    first, second = tel.of("chat ")
    for chat in (first, second):
        assert INPUT in chat.attributes and OUTPUT in chat.attributes, chat.name
    inputs1, outputs1 = valid_inputs(first.attributes[INPUT]), valid_outputs(first.attributes[OUTPUT])
    assert inputs1[-1]["role"] == "user" and f"[conv:{tag}]" in inputs1[-1]["parts"][0]["content"]
    (answer1,) = outputs1
    assert answer1["role"] == "assistant" and answer1["finish_reason"] == "tool_call"
    (call,) = [p for p in answer1["parts"] if p["type"] == "tool_call"]
    assert call == {"type": "tool_call", "id": f"call_{tag}_1", "name": "sb_echo", "arguments": {"text": f"{tag}-1"}}

    inputs2, outputs2 = valid_inputs(second.attributes[INPUT]), valid_outputs(second.attributes[OUTPUT])
    (response,) = [p for m in inputs2 if m["role"] == "tool" for p in m["parts"]]
    assert response["type"] == "tool_call_response" and response["id"] == f"call_{tag}_1"
    assert response["response"] == f"{tag}-1"
    assert outputs2 == [{"role": "assistant", "parts": [{"type": "text", "content": f"done {tag}"}], "finish_reason": "stop"}]

    (agent_span,) = tel.of("invoke_agent")
    (user,) = valid_inputs(agent_span.attributes[INPUT])
    assert user["role"] == "user" and f"[conv:{tag}]" in user["parts"][0]["content"]
    assert valid_outputs(agent_span.attributes[OUTPUT]) == outputs2

    (tool,) = tel.of("execute_tool")
    assert json.loads(tool.attributes[TOOL_ARGS]) == {"text": f"{tag}-1"}
    assert tool.attributes[TOOL_RESULT] == f"{tag}-1"
    assert tel.events() == [], "span capture emits no events"


@pytest.mark.parametrize("value", ["EVENT_ONLY", "SPAN_AND_EVENT", "span_and_event"])
def test_event_capture_emits_one_valid_details_event_per_chat(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    _with_mode(tel, monkeypatch, value)
    tag = f"cv-ev-{value.lower()}"
    tel.run(tel.bench.agent(), tag)
    chats = tel.of("chat ")
    events = tel.events()
    assert len(events) == len(chats) == 2
    host, port = _server(tel.bench)
    by_span = {e.span_id: e for e in events}
    for chat in chats:
        event = by_span[chat.context.span_id]
        assert event.trace_id == chat.context.trace_id
        attrs = event.attributes
        assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "fake-model"
        assert attrs["gen_ai.provider.name"] == "custom"
        assert (attrs["server.address"], attrs["server.port"]) == (host, port)
        assert attrs["gen_ai.response.id"] == chat.attributes["gen_ai.response.id"]
        assert attrs["gen_ai.usage.input_tokens"] == chat.attributes["gen_ai.usage.input_tokens"]
        assert not isinstance(attrs[INPUT], str), "structured on the event, not a JSON string"
        valid_inputs(attrs[INPUT])
        outputs = valid_outputs(attrs[OUTPUT])
        assert outputs[0]["role"] == "assistant"
    reasons = [valid_outputs(by_span[c.context.span_id].attributes[OUTPUT])[0]["finish_reason"] for c in chats]
    assert reasons == ["tool_call", "stop"]

    on_spans = [(s.name, k) for s in tel.spans.get_finished_spans() for k in CONTENT_KEYS if k in s.attributes]
    if value.upper() == "EVENT_ONLY":
        assert on_spans == []
    else:
        assert {k for _, k in on_spans} == set(CONTENT_KEYS)
        for chat in chats:
            assert _plain(by_span[chat.context.span_id].attributes[OUTPUT]) == json.loads(chat.attributes[OUTPUT])


def test_an_invalid_mode_warns_once_and_captures_nothing(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="statebackends_hermes_agent"):
        _with_mode(tel, monkeypatch, "SPANS_PLEASE")
        tel.run(tel.bench.agent(), "cv-bad")
        tel.bench.uninstrument()
        tel.instrument()  # read again: still no second warning
        tel.run(tel.bench.agent(), "cv-bad2")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and ENV_CAPTURE in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "SPANS_PLEASE" in message and "SPAN_AND_EVENT" in message
    assert not [(s.name, k) for s in tel.spans.get_finished_spans() for k in CONTENT_KEYS if k in s.attributes]
    assert tel.events() == []


def test_capture_mode_vocabulary() -> None:
    modes = {v: genai.capture_mode({ENV_CAPTURE: v}) for v in ("", "no_content", "Span_Only", "EVENT_ONLY", "span_and_event", "TRUE")}
    assert modes == {
        "": genai.CaptureMode.NO_CONTENT,
        "no_content": genai.CaptureMode.NO_CONTENT,
        "Span_Only": genai.CaptureMode.SPAN_ONLY,
        "EVENT_ONLY": genai.CaptureMode.EVENT_ONLY,
        "span_and_event": genai.CaptureMode.SPAN_AND_EVENT,
        "TRUE": genai.CaptureMode.SPAN_ONLY,
    }
    assert genai.capture_mode({ENV_CAPTURE: "false"}) is genai.CaptureMode.NO_CONTENT


@pytest.mark.parametrize("value", ["false", "False", "FALSE", " false "])
def test_false_captures_nothing_without_a_warning(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    """openai-v2 documents true/false for this variable: false is NO_CONTENT here too, and is not a bad value."""
    monkeypatch.setattr(genai, "_warned", set())  # a value warned about earlier in the process warns no more
    with caplog.at_level(logging.WARNING, logger="statebackends_hermes_agent"):
        _with_mode(tel, monkeypatch, value)
        tel.run(tel.bench.agent(), "cv-false")
    assert [r.getMessage() for r in caplog.records if ENV_CAPTURE in r.getMessage()] == []
    assert len(tel.spans.get_finished_spans()) == 6
    assert not [(s.name, k) for s in tel.spans.get_finished_spans() for k in CONTENT_KEYS if k in s.attributes]
    assert tel.events() == []


@pytest.mark.parametrize("opt_in", ["", "gen_ai_latest_experimental", "gen_ai", "http,gen_ai_latest_experimental"])
def test_the_capture_modes_do_not_depend_on_the_semconv_stability_opt_in(opt_in: str) -> None:
    """Ours has only ever emitted the conventions the mode names belong to, so it takes them whatever
    OTEL_SEMCONV_STABILITY_OPT_IN says (util-genai before 1.x honoured them only under gen_ai_latest_experimental)."""
    for value, mode in (("span_and_event", genai.CaptureMode.SPAN_AND_EVENT), ("EVENT_ONLY", genai.CaptureMode.EVENT_ONLY),
                        ("", genai.CaptureMode.NO_CONTENT), ("true", genai.CaptureMode.SPAN_ONLY)):
        assert genai.capture_mode({ENV_CAPTURE: value, "OTEL_SEMCONV_STABILITY_OPT_IN": opt_in}) is mode


# -- a failed run ---------------------------------------------------------------------------------------------


def test_a_failed_run_is_never_an_assistant_message(tel: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_mode(tel, monkeypatch, "SPAN_AND_EVENT")
    result = tel.run(tel.bench.agent(), "cv-fail", "[llm_error]")
    assert result.get("failed") is True
    if hermes_version() >= (0, 18):  # before 0.18 Hermes leaves final_response None on a non-retryable error
        assert result.get("final_response"), "Hermes reports the error as final_response"
    (agent_span,) = tel.of("invoke_agent")
    assert agent_span.status.status_code is StatusCode.ERROR
    assert OUTPUT not in agent_span.attributes
    valid_inputs(agent_span.attributes[INPUT])
    (chat,) = tel.of("chat ")
    assert OUTPUT not in chat.attributes and chat.attributes["error.type"] == "BadRequestError"
    valid_inputs(chat.attributes[INPUT])
    (event,) = tel.events()
    assert OUTPUT not in event.attributes and event.attributes["error.type"] == "BadRequestError"
    valid_inputs(event.attributes[INPUT])


# -- the schema can fail ----------------------------------------------------------------------------------------


def test_the_schema_rejects_what_the_conventions_forbid() -> None:
    good = [{"role": "assistant", "parts": [{"type": "text", "content": "hi"}], "finish_reason": "stop"}]
    OUTPUT_SCHEMA.validate(good)
    bad_outputs = {
        "no finish_reason": [{"role": "assistant", "parts": [{"type": "text", "content": "hi"}]}],
        "OpenAI's tool_calls": [{**good[0], "finish_reason": "tool_calls"}],
        "no parts": [{"role": "assistant", "finish_reason": "stop"}],
        "unknown part": [{**good[0], "parts": [{"type": "image", "content": "x"}]}],
        "text without content": [{**good[0], "parts": [{"type": "text"}]}],
        "tool call without name": [{**good[0], "parts": [{"type": "tool_call", "id": "c1"}]}],
        "unknown role": [{**good[0], "role": "robot"}],
    }
    for why, messages in bad_outputs.items():
        with pytest.raises(jsonschema.ValidationError):
            OUTPUT_SCHEMA.validate(messages)
            pytest.fail(f"accepted: {why}")
    with pytest.raises(jsonschema.ValidationError):
        INPUT_SCHEMA.validate([{"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1"}]}])
    assert "1.37.0" in SCHEMA["description"]


# -- server and provider -------------------------------------------------------------------------------------------


def test_chat_spans_carry_the_server_at_start(tel: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_mode(tel, monkeypatch, None)
    tel.run(tel.bench.agent(), "cv-server")
    host, port = _server(tel.bench)
    chats = tel.of("chat ")
    assert len(chats) == 2
    for chat in chats:
        started = tel.starts.at_start[chat.context.span_id]
        assert (started["server.address"], started["server.port"]) == (host, port)
        assert started["gen_ai.provider.name"] == "custom" and started["hermes.provider"] == "custom"
        assert started["gen_ai.operation.name"] == "chat" and started["gen_ai.request.model"] == "fake-model"


@pytest.mark.parametrize("label, expected", [("anthropic", "anthropic"), ("xai", "x_ai"), ("openai-api", "openai"), ("custom", "custom")])
def test_provider_label_mapped_to_the_well_known_name(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, label: str, expected: str
) -> None:
    _with_mode(tel, monkeypatch, None)
    agent = tel.bench.agent(fresh=True)
    agent.provider = label  # the label only: the agent still speaks chat completions to the fake server
    result = tel.run(agent, f"cv-prov-{label}", "[tools:0]")
    assert result["final_response"] == f"done cv-prov-{label}"
    (agent_span,) = tel.of("invoke_agent")
    (chat,) = tel.of("chat ")
    for span in (agent_span, chat):
        assert span.attributes["gen_ai.provider.name"] == expected
        assert span.attributes["hermes.provider"] == label
    (point,) = [p for p in tel.points(DURATION) if p.attributes["gen_ai.operation.name"] == "chat"]
    assert point.attributes["gen_ai.provider.name"] == expected and "hermes.provider" not in point.attributes


# -- the react step ------------------------------------------------------------------------------------------------


STEP = {"gen_ai.operation.name": "hermes.react_step", "openinference.span.kind": "CHAIN"}


def test_the_react_step_has_our_operation_name_phoenixs_kind_and_our_namespace(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No gen_ai.react.* by default: the step's own attributes are hermes.react.*, its operation ours (namespaced),
    and OpenInference's CHAIN kind, which Phoenix keeps (it maps no step-like gen_ai.operation.name)."""
    _with_mode(tel, monkeypatch, None)
    tel.run(tel.bench.agent(), "cv-step")
    assert [dict(s.attributes) for s in tel.of("react step")] == [
        {**STEP, "hermes.react.round": 1, "hermes.react.finish_reason": "tool_calls"},
        {**STEP, "hermes.react.round": 2, "hermes.react.finish_reason": "stop"},
    ]
    starts = [tel.starts.at_start[s.context.span_id] for s in tel.of("react step")]
    assert starts == [{**STEP, "hermes.react.round": 1}, {**STEP, "hermes.react.round": 2}], "set at start (samplers)"


@pytest.mark.parametrize("value", ["true", "TRUE", " 1 ", "yes", "on"])
def test_the_legacy_switch_adds_the_old_step_names(tel: Telemetry, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV_LEGACY_REACT_ATTRIBUTES, value)
    _with_mode(tel, monkeypatch, None)
    tel.run(tel.bench.agent(), "cv-legacy", "[tools:1] [llm_error]")  # the first chat fails: the step ends in error
    tel.run(tel.bench.agent(), "cv-legacy2")
    steps = tel.of("react step")
    assert [(s.attributes["hermes.react.round"], s.attributes["hermes.react.finish_reason"]) for s in steps] == [
        (1, "error"), (1, "tool_calls"), (2, "stop")]
    for step in steps:
        assert step.attributes["gen_ai.react.round"] == step.attributes["hermes.react.round"]
        assert step.attributes["gen_ai.react.finish_reason"] == step.attributes["hermes.react.finish_reason"]
        assert tel.starts.at_start[step.context.span_id]["gen_ai.react.round"] == step.attributes["hermes.react.round"]


@pytest.mark.parametrize("value", ["", "false", "0", "off", "legacy please"])
def test_without_the_switch_no_old_step_name_and_a_bad_value_is_one_error_line(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv(ENV_LEGACY_REACT_ATTRIBUTES, value)
    with caplog.at_level(logging.WARNING, logger="statebackends_hermes_agent"):
        _with_mode(tel, monkeypatch, None)  # instrument() reads it once; never raises for it
    tel.run(tel.bench.agent(), "cv-nolegacy")
    steps = tel.of("react step")
    assert len(steps) == 2 and all(k.startswith(("hermes.", "gen_ai.operation.", "openinference."))
                                   for s in steps for k in s.attributes)
    complaints = [r for r in caplog.records if ENV_LEGACY_REACT_ATTRIBUTES in r.getMessage()]
    if value == "legacy please":
        (record,) = complaints
        assert record.levelno == logging.ERROR and not record.exc_info
        assert "'legacy please'" in record.getMessage() and "true, false" in record.getMessage()
    else:
        assert complaints == []


# -- a chat whose model is unknown -----------------------------------------------------------------------------------


def test_a_chat_with_no_model_is_named_chat_and_records_no_request_model(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conventions: gen_ai.request.model only if known, and the span is then named "chat" (no "unknown")."""
    _with_mode(tel, monkeypatch, "SPAN_AND_EVENT")
    agent = tel.bench.agent(model="", fresh=True)
    assert not agent.model
    tel.run(agent, "cv-nomodel")
    chats = [s for s in tel.spans.get_finished_spans() if s.attributes.get("gen_ai.operation.name") == "chat"]
    assert [c.name for c in chats] == ["chat", "chat"]
    assert [k for c in chats for k in c.attributes if k == "gen_ai.request.model"] == []
    assert [k for c in chats for k in tel.starts.at_start[c.context.span_id] if k == "gen_ai.request.model"] == []
    (agent_span,) = tel.of("invoke_agent")
    assert "gen_ai.request.model" not in agent_span.attributes
    points = tel.points(DURATION) + tel.points(TOKENS)
    assert points and [p.attributes for p in points if "gen_ai.request.model" in p.attributes] == []
    assert [e.attributes for e in tel.events() if "gen_ai.request.model" in e.attributes] == []
    assert "unknown" not in {str(v) for c in chats for v in c.attributes.values()}


# -- tool descriptions ---------------------------------------------------------------------------------------------


def _registry() -> Any:
    from tools.registry import registry

    return registry


def test_a_tool_span_carries_the_description_hermess_registry_holds(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _with_mode(tel, monkeypatch, None)
    readable = tmp_path / "notes.txt"
    readable.write_text("notes\n")
    tel.run(tel.bench.agent(toolsets=(BENCH_TOOLSET, "file"), fresh=True), "cv-desc",
            f"[files:{readable}]")
    tel.run(tel.bench.agent(), "cv-desc2")
    tools = {s.attributes["gen_ai.tool.name"]: s for s in tel.of("execute_tool")}
    assert set(tools) == {"read_file", "sb_echo"}
    assert tools["sb_echo"].attributes["gen_ai.tool.description"] == "Benchmark tool: returns its text argument."
    read_file = _registry().get_entry("read_file").schema["description"]
    assert read_file and tools["read_file"].attributes["gen_ai.tool.description"] == read_file
    assert tel.starts.at_start[tools["read_file"].context.span_id]["gen_ai.tool.description"] == read_file


def test_each_tool_is_looked_up_in_the_registry_once_until_the_registry_changes(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from statebackends_hermes_agent import descriptions

    registry = _registry()
    looked_up: list[str] = []
    real = descriptions._look_up  # Hermes calls registry.get_entry itself: count ours
    monkeypatch.setattr(descriptions, "_look_up", lambda reg, name: (looked_up.append(name), real(reg, name))[1])
    _with_mode(tel, monkeypatch, None)
    for i in range(3):
        tel.run(tel.bench.agent(), f"cv-once{i}", "[tools:2]")
    assert looked_up == ["sb_echo"], "one look-up for six calls"
    monkeypatch.setattr(registry, "_generation", registry._generation + 1)  # what every (de)registration does
    tel.run(tel.bench.agent(), "cv-once-again")
    assert looked_up == ["sb_echo", "sb_echo"]
    described = [s.attributes.get("gen_ai.tool.description") for s in tel.of("execute_tool")]
    assert described == ["Benchmark tool: returns its text argument."] * 7


def test_a_registry_that_raises_leaves_the_tool_span_without_a_description(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(name: str) -> Any:
        raise RuntimeError("registry broken")

    monkeypatch.setattr(_registry(), "get_entry", broken)
    _with_mode(tel, monkeypatch, None)
    result = tel.run(tel.bench.agent(), "cv-nodesc")
    assert result["final_response"] == "done cv-nodesc"
    (tool,) = tel.of("execute_tool")
    assert tool.attributes["gen_ai.tool.name"] == "sb_echo" and "gen_ai.tool.description" not in tool.attributes


class _FakeEntry:
    def __init__(self, schema: Any, description: Any = "") -> None:
        self.schema, self.description = schema, description


class _FakeRegistry:
    def __init__(self, entries: dict[str, _FakeEntry]) -> None:
        self.entries, self._generation, self.calls = entries, 0, 0

    def get_entry(self, name: str) -> Optional[_FakeEntry]:
        self.calls += 1
        return self.entries.get(name)


def test_tool_descriptions_read_the_schema_then_the_entry_and_never_import_hermes(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    monkeypatch.delitem(sys.modules, "tools.registry")
    describe = ToolDescriptions(limit=2)
    assert describe("sb_echo") is None and "tools.registry" not in sys.modules, "never imports Hermes"
    fake = _FakeRegistry({
        "a": _FakeEntry({"description": "from the schema"}, "from the entry"),
        "b": _FakeEntry({"name": "b"}, "from the entry"),
        "c": _FakeEntry(None, ""),
        "d": _FakeEntry({"description": 42}, None),
    })
    monkeypatch.setitem(sys.modules, "tools.registry", types.SimpleNamespace(registry=fake))
    assert [describe(n) for n in ("a", "b", "c", "d", "missing")] == ["from the schema", "from the entry", None, None, None]
    assert fake.calls == 5
    describe("a")
    describe("a")
    assert fake.calls == 6, "answers (None included) are kept: 'a' was forgotten once the cache (limit 2) filled"
    assert describe("missing") is None and fake.calls == 6
    fake.entries["a"] = _FakeEntry({"description": "changed"})
    assert describe("a") == "from the schema", "cached until the registry says it changed"
    fake._generation += 1
    assert describe("a") == "changed"
    fake.get_entry = None  # type: ignore[assignment]
    fake._generation += 1
    assert describe("a") is None, "a registry that raises: no description, no exception"


def test_provider_and_server_helpers() -> None:
    assert genai.provider_name("Anthropic") == "anthropic"
    assert genai.provider_name("openrouter") == "openrouter"
    assert genai.provider_name(None) is None
    assert genai.server_of("https://api.example.com/v1") == ("api.example.com", 443)
    assert genai.server_of("http://127.0.0.1:8080/v1") == ("127.0.0.1", 8080)
    assert genai.server_of("http://[::1]:99999/v1") == (None, None)  # a bad port: nothing, no exception
    assert genai.server_of("") == (None, None)


# -- metrics -----------------------------------------------------------------------------------------------------


def test_histograms_use_the_advisory_buckets_and_the_conventions_attributes(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_mode(tel, monkeypatch, None)
    tel.run(tel.bench.agent(), "cv-metrics")
    host, port = _server(tel.bench)
    durations = tel.points(DURATION)
    chats = [p for p in durations if p.attributes["gen_ai.operation.name"] == "chat"]
    agents = [p for p in durations if p.attributes["gen_ai.operation.name"] == "invoke_agent"]
    assert sum(p.count for p in chats) == 2 and sum(p.count for p in agents) == 1
    for point in durations:
        assert tuple(point.explicit_bounds) == DURATION_BOUNDS
        assert "error.type" not in point.attributes
    (chat,) = chats  # both chats share one attribute set
    assert dict(chat.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "custom",
        "gen_ai.request.model": "fake-model",
        "gen_ai.response.model": "fake-model",
        "server.address": host,
        "server.port": port,
    }
    (agent,) = agents
    assert agent.attributes["gen_ai.response.model"] == "fake-model"
    tokens = tel.points(TOKENS)
    assert {p.attributes["gen_ai.token.type"] for p in tokens} == {"input", "output"}
    for point in tokens:
        assert tuple(point.explicit_bounds) == TOKEN_BOUNDS
        assert point.attributes["server.address"] == host and point.count == 2
    assert sum(p.sum for p in tokens if p.attributes["gen_ai.token.type"] == "input") == tel.bench.server.totals("cv-metrics")[0]
    assert tel.points(TTFC) == [], "no time to first chunk without streaming"


def test_a_failing_chat_and_run_record_their_duration_with_error_type(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_mode(tel, monkeypatch, None)
    tel.run(tel.bench.agent(), "cv-mfail", "[llm_error]")
    durations = tel.points(DURATION)
    (chat,) = [p for p in durations if p.attributes["gen_ai.operation.name"] == "chat"]
    assert chat.count == 1 and chat.attributes["error.type"] == "BadRequestError"
    assert chat.attributes["server.port"] == _server(tel.bench)[1]
    (agent,) = [p for p in durations if p.attributes["gen_ai.operation.name"] == "invoke_agent"]
    assert agent.count == 1 and agent.attributes["error.type"] == "agent_run_failed"
    assert tel.points(TOKENS) == [], "a failed chat has no usage"


def test_streaming_records_the_time_to_first_chunk(tel: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_mode(tel, monkeypatch, None)
    tel.run(tel.bench.agent(streaming=True), "cv-ttfc")
    assert all(e.stream for e in tel.bench.server.log("cv-ttfc"))
    (point,) = tel.points(TTFC)
    assert point.count == 2, "one per streamed chat"
    assert tuple(point.explicit_bounds) == TTFC_BOUNDS
    assert point.attributes["gen_ai.operation.name"] == "chat" and point.attributes["server.address"] == _server(tel.bench)[0]
    chats = tel.of("chat ")
    assert point.sum == pytest.approx(sum(c.attributes["gen_ai.response.time_to_first_chunk"] for c in chats))


def test_streamed_chats_capture_valid_messages(tel: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hermes assembles a streamed response itself: its output messages keep the tool call and the finish reasons."""
    _with_mode(tel, monkeypatch, "SPAN_AND_EVENT")
    tel.run(tel.bench.agent(streaming=True), "cv-sstream")
    first, second = tel.of("chat ")
    (answer1,) = valid_outputs(first.attributes[OUTPUT])
    assert answer1["finish_reason"] == "tool_call"
    assert [p["name"] for p in answer1["parts"] if p["type"] == "tool_call"] == ["sb_echo"]
    assert valid_outputs(second.attributes[OUTPUT])[0]["parts"] == [{"type": "text", "content": "done cv-sstream"}]
    events = tel.events()
    assert len(events) == 2
    for event in events:
        valid_inputs(event.attributes[INPUT])
        valid_outputs(event.attributes[OUTPUT])


def test_an_interrupted_stream_ends_every_span_and_leaves_no_state(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real agent, streaming, interrupted while the fake LLM still holds the first chunk back: Hermes abandons
    the stream's worker thread (still alive when this test ends). The chat fails with ``InterruptedError``,
    everything ends, nothing is left, nothing is recorded late. Hermes 0.19 closes the abandoned stream, so its
    worker never calls ``on_first_delta`` here; a late callback is driven through the lifecycle in the next tests."""
    import threading

    _with_mode(tel, monkeypatch, None)
    agent = tel.bench.agent(streaming=True, fresh=True)

    def interrupt_once_asked() -> None:  # once the request is at the fake LLM, which holds the answer 1.5 s
        deadline = time.monotonic() + 20
        while not tel.bench.server.log("cv-interrupt") and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        agent.interrupt()

    threading.Thread(target=interrupt_once_asked, daemon=True).start()
    with caplog.at_level(logging.WARNING):
        result = tel.run(agent, "cv-interrupt", "[delay_ms:1500]")
        time.sleep(1.2)  # past the moment the fake LLM would have sent its first chunk
    assert result["interrupted"] is True
    assert tel.bench.server.log("cv-interrupt"), "the request reached the fake LLM before the interrupt"
    (turn,) = tel.of("invoke_agent")
    assert turn.attributes["hermes.interrupted"] is True and turn.status.status_code is StatusCode.UNSET
    (chat,) = tel.of("chat ")
    assert chat.status.status_code is StatusCode.ERROR and chat.attributes["error.type"] == "InterruptedError"
    assert "gen_ai.response.time_to_first_chunk" not in chat.attributes
    assert len(tel.of("react step")) == 1 and len(tel.of("invoke_agent")) == 1
    assert tel.bench.instrumentor.store.live() == 0
    assert not [r for r in caplog.records if "ended span" in r.getMessage()]
    assert tel.points(TTFC) == []
    (failed,) = [p for p in tel.points(DURATION) if p.attributes["gen_ai.operation.name"] == "chat"]
    assert failed.attributes["error.type"] == "InterruptedError"


def test_an_interrupted_turn_is_marked_and_its_text_is_not_an_assistant_message(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hermes returns an interrupted turn with ``interrupted: True`` and a text of its own as ``final_response``:
    ``hermes.interrupted`` is set, the status stays unset (a cancel is not an error), and with content on spans the
    text is not recorded as the assistant's output; a completed turn carries neither mark nor absence."""
    _with_mode(tel, monkeypatch, "SPAN_ONLY")
    telemetry = tel.bench.instrumentor.telemetry
    agent = tel.bench.agent()
    telemetry.start_invocation(agent, user_message="hi").stop(
        {"final_response": "Operation interrupted: waiting for model response.", "interrupted": True, "completed": False}
    )
    telemetry.start_invocation(agent, user_message="hi").stop({"final_response": "an answer", "interrupted": False})
    interrupted, completed = tel.of("invoke_agent")
    assert interrupted.attributes["hermes.interrupted"] is True
    assert interrupted.status.status_code is StatusCode.UNSET and "error.type" not in interrupted.attributes
    assert OUTPUT not in interrupted.attributes and INPUT in interrupted.attributes
    assert "hermes.interrupted" not in completed.attributes
    assert valid_outputs(completed.attributes[OUTPUT])[0]["parts"] == [{"type": "text", "content": "an answer"}]
    assert telemetry.store.live() == 0


class _StallingStream:
    """A loopback OpenAI-compatible endpoint whose streamed answer sends one text chunk, then holds the rest until
    released: the reply a user stops halfway (the real Hermes then keeps the text streamed so far)."""

    TEXT = "The answer is forty"

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - Hermes's model probes: none here
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:  # noqa: N802
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = {"id": "chatcmpl-stall", "object": "chat.completion.chunk", "created": 0, "model": request["model"]}

                def send(delta: dict, reason: Optional[str]) -> None:
                    frame = {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
                    self.wfile.write(b"data: " + json.dumps(frame).encode() + b"\n\n")
                    self.wfile.flush()

                try:
                    send({"role": "assistant", "content": owner.TEXT}, None)
                    owner.release.wait(30)
                    send({"content": "-two."}, "stop")
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except OSError:  # Hermes closed the interrupted stream
                    pass
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_reply_cut_short_by_an_interrupt_is_the_turns_assistant_message(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real agent with a stream consumer (as every front end has), stopped while the model's reply is half
    streamed: Hermes returns ``interrupted`` with the text streamed so far as ``final_response`` and keeps it as the
    assistant's message. That text is the model's, not a notice of Hermes's: with content on spans it is the
    turn's output message (finish reason ``error``, as its chat ended with ``InterruptedError``), valid by the
    schema; ``hermes.interrupted`` is set and the status stays unset."""
    import threading

    from statebackends_hermes_testbed.hermes_harness import make_agent

    _with_mode(tel, monkeypatch, "SPAN_ONLY")
    endpoint = _StallingStream()
    try:
        shown: list[str] = []
        agent = make_agent(endpoint.base_url, streaming=True, stream_delta_callback=shown.append)

        def interrupt_once_shown() -> None:  # once the first text is on screen and kept by Hermes
            deadline = time.monotonic() + 30
            while not getattr(agent, "_current_streamed_assistant_text", "") and time.monotonic() < deadline:
                time.sleep(0.01)
            agent.interrupt()

        threading.Thread(target=interrupt_once_shown, daemon=True).start()
        result = agent.run_conversation("what is the answer?")
    finally:
        endpoint.close()
    (turn,) = tel.of("invoke_agent")
    assert turn.attributes["hermes.interrupted"] is True and turn.status.status_code is StatusCode.UNSET
    if hermes_version() < (0, 18):  # Hermes returns its own notice then, which is never an assistant message
        assert result["interrupted"] is True and result["final_response"].startswith("Operation interrupted")
        assert OUTPUT not in turn.attributes
        assert tel.bench.instrumentor.store.live() == 0
        return
    assert result["interrupted"] is True and result["final_response"] == _StallingStream.TEXT, result["final_response"]
    if hermes_version() >= (0, 19):
        assert "".join(shown) == _StallingStream.TEXT
    else:  # 0.18.2 hands the callback the rest of the interrupted stream once the endpoint sends it, after the turn
        assert "".join(shown).startswith(_StallingStream.TEXT)
    assert result["messages"][-1] == {"role": "assistant", "content": _StallingStream.TEXT}, "Hermes keeps the text"
    (answer,) = valid_outputs(turn.attributes[OUTPUT])
    assert answer == {"role": "assistant", "parts": [{"type": "text", "content": _StallingStream.TEXT}], "finish_reason": "error"}
    (chat,) = tel.of("chat ")
    assert chat.attributes["error.type"] == "InterruptedError" and OUTPUT not in chat.attributes
    assert tel.bench.instrumentor.store.live() == 0


def _streamed_chat(tel: Telemetry, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, Any]:
    """Instrumented, an invocation with one streaming chat open through the public lifecycle:
    (invocation, chat, the ``on_first_delta`` callback Hermes's stream reader would call)."""
    _with_mode(tel, monkeypatch, None)
    telemetry = tel.bench.instrumentor.telemetry
    agent = tel.bench.agent(streaming=True)
    invocation = telemetry.start_invocation(agent)
    call = telemetry.start_chat(agent, {"model": "m", "messages": []}, streaming=True)
    return invocation, call, call.wrap_first_delta(None)


def test_a_first_chunk_after_the_chat_ended_is_not_recorded(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The late callback of an abandoned stream, driven through the public lifecycle: no attribute on the ended
    span (the SDK would log a warning), no time-to-first-chunk point."""
    invocation, call, on_first_delta = _streamed_chat(tel, monkeypatch)
    call.fail(InterruptedError("interrupted"))
    with caplog.at_level(logging.WARNING):
        on_first_delta()
    invocation.stop({"final_response": None, "interrupted": True})
    (chat,) = tel.of("chat ")
    assert "gen_ai.response.time_to_first_chunk" not in chat.attributes
    assert not [r for r in caplog.records if "ended span" in r.getMessage()]
    assert tel.points(TTFC) == []


def test_a_first_chunk_racing_the_end_of_its_chat_is_recorded_before_the_end_or_not_at_all(
    tel: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream's reader thread records the first chunk while the caller's thread fails the chat: the failure
    waits for the recording (held here half-way), so no attribute lands on an ended span."""
    import threading

    from statebackends_hermes_agent.lifecycle import ChatCall

    invocation, call, on_first_delta = _streamed_chat(tel, monkeypatch)
    entered, release = threading.Event(), threading.Event()
    record = ChatCall._record_first_chunk

    def held(self: ChatCall, span: Any) -> None:
        entered.set()
        release.wait(10)
        record(self, span)

    monkeypatch.setattr(ChatCall, "_record_first_chunk", held)
    reader = threading.Thread(target=on_first_delta)
    ender = threading.Thread(target=call.fail, args=(InterruptedError("interrupted"),))
    with caplog.at_level(logging.WARNING):
        reader.start()
        assert entered.wait(10)
        ender.start()
        ender.join(0.2)
        assert ender.is_alive(), "the chat ended while its first chunk was being recorded"
        release.set()
        reader.join(10)
        ender.join(10)
    invocation.stop({"final_response": None})
    (chat,) = tel.of("chat ")
    assert chat.status.status_code is StatusCode.ERROR and "gen_ai.response.time_to_first_chunk" in chat.attributes
    assert not [r for r in caplog.records if "ended span" in r.getMessage()]
    (point,) = tel.points(TTFC)
    assert point.count == 1


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX only; CI runs on Linux")
def test_a_child_forked_while_the_warn_once_lock_is_held_still_reads_the_capture_mode() -> None:
    """Issue 17, finding 7 (locks after fork): the lock behind the invalid-mode warning is made anew in a forked child;
    a child forked while another thread held it waited forever on its first invalid value (on 83a5a81)."""
    with genai._warned_lock:  # the thread holding it while the process forks; the child reads an invalid value
        mode = in_forked_child(lambda: genai.capture_mode({ENV_CAPTURE: "forked-child-bogus"}).name, timeout=30)
    assert mode == genai.CaptureMode.NO_CONTENT.name
