"""Content capture off (the default) means no content anywhere: not in attributes, events, status descriptions,
exception messages or our logs; captured content is bounded (issue 17, finding 4 and the bound of finding 7).

Every test drives the REAL agent on the fake LLM (127.0.0.1). A tool whose error text carries its argument (a file
path) and a provider error that quotes the conversation (the fake LLM's ``[llm_error]`` message names the
conversation tag, which is in the user's message) are the content that must not leak; the same runs with content
capture on, or with the error-text opt-in, show that the text is really there to leak.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from statebackends_hermes_testbed.driver import HermesBench
from statebackends_hermes_testbed.hermes_harness import BENCH_TOOLSET, register_tool
from statebackends_hermes_testbed.traces import kind_of

PRIVACY_TOOLSET = "sb_privacy"
SECRET_FILE = "payroll-2026.xlsx"
HUGE = 10 * 1024 * 1024
"""Characters of the tool result of ``sb_huge``: 10 MB."""
DEEP = 20_000
"""Nesting depth of the JSON ``sb_deep`` returns: past ``json``'s recursion limit."""
MARK = "…[+"
"""How a cut text continues (``genai.bounded``)."""


def _sb_leak(args: dict[str, Any], **_: Any) -> str:
    """A tool failing as a file tool does: its error text carries its argument (the path it was given)."""
    raise FileNotFoundError(f"no such file: /home/ada/{args.get('text')}/{SECRET_FILE}")


def _sb_leak_returned(args: dict[str, Any], **_: Any) -> str:
    """A tool failing as Hermes's file tools do, without raising: an ``{"error": ...}`` result naming the path."""
    return json.dumps({"error": f"File not found: /home/ada/{args.get('text')}/{SECRET_FILE}"})


def _sb_deep(args: dict[str, Any], **_: Any) -> str:
    """A tool returning JSON that names an error and nests deeper than Python's ``json`` can parse."""
    return '{"error": ' + "[" * DEEP + "]" * DEEP + "}"


def _sb_huge(args: dict[str, Any], **_: Any) -> str:
    """A tool returning 10 MB of text."""
    return str(args.get("text", "")) + "x" * HUGE


@pytest.fixture(scope="module")
def agent(hermes_bench: HermesBench) -> Any:
    register_tool("sb_leak", PRIVACY_TOOLSET, _sb_leak, "Privacy test tool: fails with its argument in the text.")
    register_tool("sb_leak_returned", PRIVACY_TOOLSET, _sb_leak_returned,
                  "Privacy test tool: returns an error result with its argument in the text.")
    register_tool("sb_huge", PRIVACY_TOOLSET, _sb_huge, "Privacy test tool: returns 10 MB.")
    register_tool("sb_deep", PRIVACY_TOOLSET, _sb_deep, "Privacy test tool: returns JSON too deep to parse.")
    return hermes_bench.agent(toolsets=(BENCH_TOOLSET, PRIVACY_TOOLSET), fresh=True)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="statebackends_hermes_agent"):
        yield caplog


def _configure(bench: HermesBench, monkeypatch: pytest.MonkeyPatch, capture: str | None = None,
               error_text: str | None = None, max_length: str | None = None) -> None:
    for name, value in (("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", capture),
                        ("OTEL_INSTRUMENTATION_HERMES_AGENT_CAPTURE_ERROR_TEXT", error_text),
                        ("OTEL_INSTRUMENTATION_HERMES_AGENT_CONTENT_MAX_LENGTH", max_length)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    bench.instrument("invocation_id")


def _ours(bench: HermesBench) -> list[ReadableSpan]:
    return [s for s in bench.exporter.get_finished_spans() if kind_of(s) is not None]


def _texts(span: ReadableSpan) -> Iterator[str]:
    """Every text a backend receives with ``span``: attribute values, its status description, its events'."""
    yield span.status.description or ""
    for value in (span.attributes or {}).values():
        yield str(value)
    for event in span.events:
        yield event.name
        for value in (event.attributes or {}).values():
            yield str(value)


def _leaks(bench: HermesBench, text: str, logs: pytest.LogCaptureFixture) -> list[str]:
    found = [f"{s.name}: {t[:120]!r}" for s in _ours(bench) for t in _texts(s) if text in t]
    found += [f"log: {r.getMessage()[:120]!r}" for r in logs.records if r.name.startswith("statebackends")
              and (text in r.getMessage() or text in (r.exc_text or ""))]
    return found


def _spans(bench: HermesBench, kind: str) -> list[ReadableSpan]:
    return [s for s in _ours(bench) if kind_of(s) == kind]


@pytest.mark.parametrize("how", ["raised", "returned"])
def test_a_failing_tools_error_text_stays_out_of_its_span_with_content_capture_off(
    bench: HermesBench, agent: Any, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, how: str
) -> None:
    """Finding 4 (failed on dff20c4 and 83ee177: the tool span's status description carried the path): only the
    error's class, whether the tool raised (Hermes turns that into an ``{"error": ...}`` result) or returned an
    ``{"error": ...}`` result itself, as Hermes's file tools do for a missing file."""
    _configure(bench, monkeypatch)
    tool_name = {"raised": "sb_leak", "returned": "sb_leak_returned"}[how]
    result = bench.call(agent, f"pv-tool-{how}", f"[tool:{tool_name}] [tools:1]")
    assert result["final_response"] == f"done pv-tool-{how}"
    assert SECRET_FILE in str(result["messages"]), "the tool's error text is really there (Hermes keeps it)"
    assert _leaks(bench, SECRET_FILE, logs) == []
    (tool,) = _spans(bench, "execute_tool")
    assert tool.status.status_code is StatusCode.ERROR
    error_type = {"raised": "FileNotFoundError", "returned": "tool_error"}[how]
    assert tool.status.description == tool.attributes["error.type"] == error_type


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_a_provider_error_quoting_the_prompt_stays_out_of_every_span_with_content_capture_off(
    bench: HermesBench, agent: Any, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, streaming: bool
) -> None:
    """Finding 4 (failed on dff20c4 and 83ee177: the chat's status and exception event, invoke_agent's and the step's
    status quoted it): the error's class and its content-free facts (HTTP status, the provider's error code and type),
    on the plain and the streaming chat path."""
    _configure(bench, monkeypatch)
    tag = f"pv-quoted-prompt-7f3a-{'s' if streaming else 'p'}"
    result = bench.call(bench.agent(streaming=True) if streaming else agent, tag, "[llm_error]")
    assert result.get("failed") and tag in str(result.get("error")), "the provider's text quotes the prompt"
    assert _leaks(bench, tag, logs) == []
    (chat,) = _spans(bench, "chat")
    assert chat.status.description == "BadRequestError (HTTP 400, code fake_llm_error, type invalid_request_error)"
    (event,) = [e for e in chat.events if e.name == "exception"]
    assert dict(event.attributes or {}) == {"exception.type": "BadRequestError"}, "no message, no stack trace"
    (turn,) = _spans(bench, "invoke_agent")
    (step,) = _spans(bench, "step")
    for span in (turn, step):
        assert span.status.status_code is StatusCode.ERROR and span.status.description == "agent run failed"
        assert span.attributes["error.type"] == "agent_run_failed"


@pytest.mark.parametrize("how", ["content_capture", "error_text_opt_in"])
def test_error_text_is_recorded_with_content_capture_on_or_the_opt_in(
    bench: HermesBench, agent: Any, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The same two failures with content capture on (SPAN_ONLY) or ``..._CAPTURE_ERROR_TEXT=true`` (content capture
    off): the text is recorded as before (status descriptions and the SDK's exception event with its message)."""
    if how == "content_capture":
        _configure(bench, monkeypatch, capture="SPAN_ONLY")
    else:
        _configure(bench, monkeypatch, error_text="true")
    tag = "pv-shown-4c1d"
    bench.call(agent, tag, "[llm_error]")
    bench.call(agent, "pv-tool-shown", "[tool:sb_leak] [tools:1]")
    (chat,) = [s for s in _spans(bench, "chat") if s.status.status_code is StatusCode.ERROR]
    assert tag in (chat.status.description or "")
    (event,) = [e for e in chat.events if e.name == "exception"]
    assert tag in str(event.attributes["exception.message"]) and "exception.stacktrace" in event.attributes
    turns = [s for s in _spans(bench, "invoke_agent") if s.status.status_code is StatusCode.ERROR]
    assert len(turns) == 1 and tag in (turns[0].status.description or "")
    (tool,) = _spans(bench, "execute_tool")
    assert SECRET_FILE in (tool.status.description or "")
    content = any("gen_ai.input.messages" in s.attributes for s in _ours(bench))
    assert content is (how == "content_capture"), "the opt-in records error text, never messages"


def test_a_huge_tool_result_neither_breaks_the_call_nor_exports_unbounded(
    bench: HermesBench, agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 7 (failed on dff20c4: a 10 MB tool result became a 10 MB attribute, twice): with content on spans,
    each captured text is cut at the bound (16384 characters by default) and marked; the call is unchanged."""
    bench.uninstrument()
    reference = bench.call(agent, "pv-huge", "[tool:sb_huge] [tools:1]")
    bench.reset()
    _configure(bench, monkeypatch, capture="SPAN_ONLY")
    result = bench.call(agent, "pv-huge", "[tool:sb_huge] [tools:1]")
    assert result["final_response"] == reference["final_response"] == "done pv-huge"
    assert [m["content"] for m in result["messages"] if m["role"] == "tool"] == [
        m["content"] for m in reference["messages"] if m["role"] == "tool"]
    (tool,) = _spans(bench, "execute_tool")
    captured = tool.attributes["gen_ai.tool.call.result"]
    cut = HUGE + len("pv-huge-1") - 16384
    assert captured == "pv-huge-1" + "x" * (16384 - len("pv-huge-1")) + f"{MARK}{cut} chars]", "the 10 MB, cut"
    longest = max(len(str(v)) for s in _ours(bench) for v in (s.attributes or {}).values())
    assert longest < 4 * 16384, "every attribute is bounded, the chats' input messages included"


def test_a_tool_result_too_deep_to_parse_is_recorded_as_text(
    bench: HermesBench, agent: Any, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    """A tool result that looks like Hermes's ``{"error": ...}`` but nests past ``json``'s recursion limit: not an
    error result Hermes made, its (bounded) text recorded, nothing logged as failed; json.loads's RecursionError
    lost the result and logged the span as not completed."""
    _configure(bench, monkeypatch, capture="SPAN_ONLY")
    bench.call(agent, "pv-deep", "[tool:sb_deep] [tools:1]")
    (tool,) = _spans(bench, "execute_tool")
    assert tool.attributes["gen_ai.tool.call.result"].startswith('{"error": [[[')
    assert tool.status.status_code is StatusCode.UNSET
    assert [r.getMessage() for r in logs.records if r.name.startswith("statebackends") and r.levelno >= logging.WARNING
            ] == []


def test_the_bound_is_configurable_and_a_bad_value_keeps_the_default(
    bench: HermesBench, agent: Any, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    _configure(bench, monkeypatch, capture="SPAN_ONLY", max_length="100")
    bench.call(agent, "pv-short", "[tool:sb_huge] [tools:1]")
    (tool,) = _spans(bench, "execute_tool")
    assert tool.attributes["gen_ai.tool.call.result"] == "pv-short-1" + "x" * 90 + f"{MARK}{HUGE + 10 - 100} chars]"
    bench.reset()
    _configure(bench, monkeypatch, capture="SPAN_ONLY", max_length="lots")
    bench.call(agent, "pv-default", "[tool:sb_huge] [tools:1]")
    (tool,) = _spans(bench, "execute_tool")
    assert len(tool.attributes["gen_ai.tool.call.result"]) == 16384 + len(f"{MARK}{HUGE + 12 - 16384} chars]")
    (record,) = [r for r in logs.records if "CONTENT_MAX_LENGTH" in r.getMessage()]
    assert "'lots'" in record.getMessage() and "integer >= 0" in record.getMessage() and record.levelno == logging.ERROR



def test_a_huge_user_message_is_bounded_on_spans_and_in_content_events(
    bench: HermesBench, agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 7, the bound where content is the user's own: a 200,000-character message (a pasted document; Hermes
    cuts a huge tool result itself before the next chat, not the user's message) with content on spans and in events
    (SPAN_AND_EVENT): invoke_agent's and each chat's input messages, on the span and in the chat's
    ``gen_ai.client.inference.operation.details`` event, carry it cut at the bound and marked; the call is unchanged
    (failed on 83ee177: the 200,000 characters went out whole, on each chat span and each event)."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor

    pasted = "y" * 200_000
    bench.uninstrument()
    reference = bench.call(agent, "pv-paste", f"[tools:1] {pasted}")
    bench.reset()
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_AND_EVENT")
    logs = InMemoryLogExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    bench.instrumentor.instrument(tracer_provider=bench.provider, logger_provider=logger_provider,
                                  state_backend="invocation_id")
    result = bench.call(agent, "pv-paste", f"[tools:1] {pasted}")
    assert result["final_response"] == reference["final_response"] == "done pv-paste"
    events = [r.log_record for r in logs.get_finished_logs()]
    assert len(events) == 2, "one details event per chat"
    on_spans = [str(v) for s in _ours(bench) for v in (s.attributes or {}).values()]
    in_events = [str(v) for e in events for v in (e.attributes or {}).values()] + [str(e.body) for e in events]
    for where, texts in (("spans", on_spans), ("events", in_events)):
        carrying = [t for t in texts if "yyyy" in t]
        assert carrying, f"the message is captured on {where}"
        assert max(len(t) for t in texts) < 4 * 16384, f"every text on {where} is bounded"
        assert all(MARK in t for t in carrying), f"cut and marked on {where}"
