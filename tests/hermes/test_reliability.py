"""The instrumentation never changes what the REAL Hermes agent returns or raises, whatever breaks inside the telemetry.

Every test runs the agent on the fake LLM (127.0.0.1) once uninstrumented, for the reference
outcome, and once instrumented with something broken: a span processor raising in ``on_start``
or ``on_end`` for one span kind, an exporter raising or blocking, a store raising in one of its
methods. The outcome (final response, tool results in the messages, or the very exception
raised) must be the same, and no state may be left in the store.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
from typing import Any, Callable, Optional, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from statebackends import StateStore
from statebackends.contextvar import ContextVarStore
from statebackends.invocation_id import InvocationIdStore
EVICTED_ATTRIBUTE = "statebackends.state.evicted"  # the public names, pinned here
EVICTED_EVENT = "statebackends.state.evicted"
from statebackends_hermes_agent.state import InvocationState
from statebackends_hermes_testbed.driver import HermesBench, run_threads
from statebackends_hermes_testbed.forking import in_forked_child
from statebackends_hermes_testbed.hermes_harness import BENCH_TOOLSET, register_bench_tools, wait_for_delegations

RELIABILITY_TOOLSET = "sb_reliability"


# -- tools of these tests -----------------------------------------------------------------------------------


class UserInterrupt(BaseException):
    """A KeyboardInterrupt-like exception raised by a tool: Hermes lets it through, so must we."""


_raised: list[BaseException] = []


def _sb_interrupt(args: dict[str, Any], **_: Any) -> str:
    exc = UserInterrupt(f"from the tool {args.get('text')}")
    _raised.append(exc)
    raise exc


class _Gate:
    """``sb_gate``: every call waits until ``parties`` calls are inside it at once (all their invocations open)."""

    def __init__(self) -> None:
        self.barrier: Optional[threading.Barrier] = None
        self.passed = 0
        self.lock = threading.Lock()

    def arm(self, parties: int) -> None:
        self.barrier, self.passed = threading.Barrier(parties), 0

    def __call__(self, args: dict[str, Any], **_: Any) -> str:
        assert self.barrier is not None
        self.barrier.wait(60)
        with self.lock:
            self.passed += 1
        return str(args.get("text", ""))


_gate = _Gate()
_task_ids_seen: list[Any] = []


def _sb_task_id(args: dict[str, Any], **kwargs: Any) -> str:
    """Records the task id Hermes's tool dispatch hands the tool."""
    _task_ids_seen.append(kwargs.get("task_id"))
    return str(args.get("text", ""))


def _register_tools() -> None:
    from tools.registry import registry

    register_bench_tools()
    for name, handler in (("sb_interrupt", _sb_interrupt), ("sb_gate", _gate), ("sb_task_id", _sb_task_id)):
        entry = registry.get_entry(name)
        if entry is None or entry.handler is not handler:
            registry.register(
                name=name,
                toolset=RELIABILITY_TOOLSET,
                schema={
                    "name": name,
                    "description": f"Reliability test tool {name}.",
                    "parameters": {
                        "type": "object",
                        "properties": {"text": {"type": "string", "description": "Text."}},
                        "required": ["text"],
                    },
                },
                handler=handler,
                description=f"Reliability test tool {name}.",
                emoji="*",
            )


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hermes(hermes_bench: HermesBench) -> Any:
    """A real agent with the bench tools, the tools above and ``delegate_task`` (built once: about a second)."""
    _register_tools()
    return hermes_bench.agent(toolsets=(BENCH_TOOLSET, RELIABILITY_TOOLSET), delegation=True, fresh=True)


class Telemetry:
    """A private tracer provider (processors given first, then an in-memory exporter) and the store in use."""

    def __init__(self, bench: HermesBench, processors: Sequence[SpanProcessor], backend: Any) -> None:
        self.provider = TracerProvider()
        for processor in processors:
            self.provider.add_span_processor(processor)
        self.exporter = InMemorySpanExporter()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        bench.uninstrument()
        bench.instrumentor.instrument(tracer_provider=self.provider, state_backend=backend)
        self.store: StateStore[Any] = bench.instrumentor.store

    def spans(self, prefix: str = "") -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith(prefix)]


def instrumented(bench: HermesBench, *processors: SpanProcessor, backend: Any = "invocation_id") -> Telemetry:
    return Telemetry(bench, processors, backend)


# -- outcomes ---------------------------------------------------------------------------------------------------


def _tool_content(content: Any) -> Any:
    """A tool message's content, without what differs run to run (a delegation's id and transcript paths)."""
    if isinstance(content, str) and content.startswith("{"):
        try:
            payload = json.loads(content)
        except ValueError:
            return content
        if isinstance(payload, dict):
            for key in ("delegation_id", "live_transcripts"):
                payload.pop(key, None)
            return payload
    return content


def shape(result: Any) -> dict[str, Any]:
    """What the caller sees of a Hermes result: the answer, the flags, and every tool result in the messages."""
    assert isinstance(result, dict), result
    return {
        "final_response": result.get("final_response"),
        "completed": result.get("completed"),
        "failed": result.get("failed"),
        "error": result.get("error"),
        "tools": [_tool_content(m.get("content")) for m in result.get("messages", []) if m.get("role") == "tool"],
    }


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """``("returned", shape)`` or ``("raised", the exception object)``."""
    try:
        result = call()
    except BaseException as exc:  # noqa: BLE001 - the outcome under test
        return "raised", exc
    return "returned", shape(result)


def same_outcome(reference: tuple[str, Any], got: tuple[str, Any], raised_here: Optional[BaseException] = None) -> None:
    assert got[0] == reference[0], (reference, got)
    if got[0] == "returned":
        assert got[1] == reference[1]
    else:
        assert type(got[1]) is type(reference[1]) and str(got[1]) == str(reference[1]), (reference, got)
        if raised_here is not None:
            assert got[1] is raised_here, "the very exception the agent raised, not a copy or a replacement"


# -- broken span processors ---------------------------------------------------------------------------------------


class ProcessorBoom(RuntimeError):
    pass


class RaisingProcessor(SpanProcessor):
    """Raises in ``on_start`` or ``on_end`` for the spans whose name starts with ``prefix``; counts the raises."""

    def __init__(self, where: str, prefix: str) -> None:
        self.where, self.prefix, self.raised = where, prefix, 0

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        if self.where == "on_start" and span.name.startswith(self.prefix):
            self.raised += 1
            raise ProcessorBoom(f"on_start of {span.name}")

    def on_end(self, span: ReadableSpan) -> None:
        if self.where == "on_end" and span.name.startswith(self.prefix):
            self.raised += 1
            raise ProcessorBoom(f"on_end of {span.name}")


class Recorder(SpanProcessor):
    """Keeps every span started."""

    def __init__(self) -> None:
        self.started: list[Span] = []

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        self.started.append(span)


KINDS = {"invoke_agent": "invoke_agent", "react_step": "react step", "chat": "chat ", "execute_tool": "execute_tool"}

CASES = {
    "tool_result": "[tools:1]",
    "tool_error": "[tool:sb_fail] [tools:1]",
    "llm_error": "[llm_error]",
    "tool_raises_base_exception": "[tool:sb_interrupt] [tools:1]",
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("where", ["on_start", "on_end"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_raising_span_processor_changes_no_outcome(bench: HermesBench, hermes: Any, kind: str, where: str, case: str) -> None:
    tag = f"sp-{kind}-{where}-{case}"
    directives = CASES[case]
    reference = outcome(lambda: bench.call(hermes, tag, directives))
    bench.server.reset()
    _raised.clear()
    processor = RaisingProcessor(where, KINDS[kind])
    telemetry = instrumented(bench, processor)
    got = outcome(lambda: bench.call(hermes, tag, directives))
    same_outcome(reference, got, _raised[-1] if _raised else None)
    assert processor.raised > 0 or (kind == "execute_tool" and case == "llm_error"), "the processor really raised"
    if case == "tool_result":
        assert got[1]["tools"] == [f"{tag}-1"] and got[1]["final_response"] == f"done {tag}"
    assert telemetry.store.live() == 0


@pytest.mark.parametrize("where", ["on_start", "on_end"])
def test_raising_processor_on_every_span_kind_at_once(bench: HermesBench, hermes: Any, where: str) -> None:
    reference = outcome(lambda: bench.call(hermes, f"all-{where}", "[tools:2] [tool_ms:5]"))
    bench.server.reset()
    processor = RaisingProcessor(where, "")
    telemetry = instrumented(bench, processor)
    got = outcome(lambda: bench.call(hermes, f"all-{where}", "[tools:2] [tool_ms:5]"))
    same_outcome(reference, got)
    # Every one of the 7 spans raises once: a failed on_start (the span is lost to us) does not stop the spans under
    # it from being started (each chat under invoke_agent when its step failed, each tool likewise).
    assert processor.raised == 7
    assert telemetry.store.live() == 0


@pytest.mark.parametrize("where", ["on_start", "on_end"])
def test_raising_processor_on_a_streaming_call_changes_no_outcome(bench: HermesBench, where: str) -> None:
    """The streaming path (``on_first_delta`` wrapped for the time to first chunk) under a processor raising everywhere."""
    streaming = bench.agent(streaming=True)
    reference = outcome(lambda: bench.call(streaming, f"stream-{where}", "[tools:1]"))
    bench.server.reset()
    processor = RaisingProcessor(where, "")
    telemetry = instrumented(bench, processor)
    got = outcome(lambda: bench.call(streaming, f"stream-{where}", "[tools:1]"))
    same_outcome(reference, got)
    assert got[1]["final_response"] == f"done stream-{where}"
    assert all(entry.stream for entry in bench.server.log(f"stream-{where}"))
    assert processor.raised > 0 and telemetry.store.live() == 0


class AgentError(Exception):
    pass


@pytest.mark.parametrize("where", ["on_start", "on_end"])
def test_the_agents_own_exception_passes_unchanged_past_a_raising_processor(
    bench: HermesBench, hermes: Any, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    import agent.conversation_loop as loop

    boom = AgentError("from the agent")

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise boom

    monkeypatch.setattr(loop, "run_conversation", explode)
    telemetry = instrumented(bench, RaisingProcessor(where, "invoke_agent"))
    with pytest.raises(AgentError) as info:
        bench.call(hermes, f"raise-{where}")
    assert info.value is boom
    assert info.value.__context__ is None, "no exception of the telemetry chained onto the agent's"
    assert telemetry.store.live() == 0


def test_spans_are_ended_and_state_released_when_on_end_raises(bench: HermesBench, hermes: Any) -> None:
    """``on_end`` raising for the agent span: the span is still ended (exported by the processor after) and the store
    still ends the invocation's scope."""
    recorder = Recorder()
    telemetry = instrumented(bench, recorder, RaisingProcessor("on_end", ""))
    result = bench.call(hermes, "ended", "[tools:1]")
    assert result["final_response"] == "done ended"
    assert telemetry.store.live() == 0
    assert sorted(s.name.split(" ")[0] for s in recorder.started) == sorted(
        ["invoke_agent", "react", "react", "chat", "chat", "execute_tool"]
    )
    assert all(s.end_time is not None for s in recorder.started), "every span was ended"
    assert telemetry.spans() == [], "the raising processor came first: nothing reached the exporter"


# -- broken content events and metrics --------------------------------------------------------------------------------


class RaisingLogProcessor:
    """A log record processor raising in ``on_emit``: every content event fails."""

    def __init__(self) -> None:
        self.raised = 0

    def on_emit(self, *args: Any, **kwargs: Any) -> None:
        self.raised += 1
        raise ProcessorBoom("on_emit")

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class RaisingHistogram:
    """A histogram whose ``record`` raises (not a no-op: the instrumentation must record into it)."""

    def __init__(self) -> None:
        self.raised = 0

    def record(self, *args: Any, **kwargs: Any) -> None:
        self.raised += 1
        raise ProcessorBoom("record")


class RaisingMeterProvider:
    """A meter provider whose histograms all raise in ``record``."""

    def __init__(self) -> None:
        self.histograms: list[RaisingHistogram] = []

    def get_meter(self, *args: Any, **kwargs: Any) -> "RaisingMeterProvider":
        return self

    def create_histogram(self, *args: Any, **kwargs: Any) -> RaisingHistogram:
        self.histograms.append(RaisingHistogram())
        return self.histograms[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_raising_events_and_metrics_change_no_outcome(
    bench: HermesBench, hermes: Any, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Content on spans and in events, a log processor raising for every event and histograms raising on every
    record: the agent's outcome is the uninstrumented one, every span still ends and no state is left."""
    from opentelemetry.sdk._logs import LoggerProvider

    tag = f"ev-{case}"
    directives = CASES[case]
    reference = outcome(lambda: bench.call(hermes, tag, directives))
    bench.server.reset()
    _raised.clear()
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_AND_EVENT")
    logs = RaisingLogProcessor()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(logs)  # type: ignore[arg-type]
    meters = RaisingMeterProvider()
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bench.uninstrument()
    bench.instrumentor.instrument(
        tracer_provider=provider, meter_provider=meters, logger_provider=logger_provider, state_backend="invocation_id"
    )
    got = outcome(lambda: bench.call(hermes, tag, directives))
    same_outcome(reference, got, _raised[-1] if _raised else None)
    assert logs.raised > 0, "the events were emitted (and failed)"
    assert sum(h.raised for h in meters.histograms) > 0, "the metrics were recorded (and failed)"
    assert bench.instrumentor.store.live() == 0
    chats = [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]
    assert chats and all("gen_ai.input.messages" in c.attributes for c in chats), "span content still captured"


# -- broken exporters ------------------------------------------------------------------------------------------------


class RaisingExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        raise ProcessorBoom("export failed")

    def shutdown(self) -> None:
        pass


class BlockingExporter(SpanExporter):
    """Blocks every export until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(120)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


@pytest.mark.parametrize("case", ["tool_result", "tool_error", "tool_raises_base_exception"])
def test_raising_exporter_changes_no_outcome(bench: HermesBench, hermes: Any, case: str) -> None:
    tag = f"rx-{case}"
    reference = outcome(lambda: bench.call(hermes, tag, CASES[case]))
    bench.server.reset()
    _raised.clear()
    exporter = RaisingExporter()
    telemetry = instrumented(bench, SimpleSpanProcessor(exporter))
    got = outcome(lambda: bench.call(hermes, tag, CASES[case]))
    same_outcome(reference, got, _raised[-1] if _raised else None)
    assert exporter.calls > 0
    assert telemetry.store.live() == 0


def test_blocking_exporter_changes_no_outcome(bench: HermesBench, hermes: Any) -> None:
    reference = [outcome(lambda i=i: bench.call(hermes, f"bx{i}", "[tools:1]")) for i in range(3)]
    bench.server.reset()
    exporter = BlockingExporter()
    processor = BatchSpanProcessor(exporter, max_export_batch_size=1, schedule_delay_millis=1)
    telemetry = instrumented(bench, processor)
    try:
        got = [outcome(lambda i=i: bench.call(hermes, f"bx{i}", "[tools:1]")) for i in range(3)]
        assert exporter.entered.wait(60), "the exporter was really blocked during the calls"
        assert got == reference
        assert telemetry.store.live() == 0
    finally:
        exporter.release.set()
        telemetry.provider.shutdown()


# -- broken stores ------------------------------------------------------------------------------------------------------


class StoreBoom(RuntimeError):
    pass


class FaultyStore(ContextVarStore):
    """A ``contextvar`` store whose ``method`` raises (``end`` raises after releasing, so ``live`` stays meaningful)."""

    name = "faulty"

    def __init__(self, method: str) -> None:
        super().__init__(InvocationState)
        self.method = method
        self.raised = 0

    def _boom(self) -> None:
        self.raised += 1
        raise StoreBoom(f"{self.method} is broken")

    def begin(self, owner: Any, invocation_id: Any = None) -> Any:
        if self.method == "begin":
            self._boom()
        return super().begin(owner, invocation_id)

    def current(self, owner: Any = None, invocation_id: Any = None) -> Any:
        if self.method == "current":
            self._boom()
        return super().current(owner, invocation_id)

    def end(self, scope: Any) -> None:
        super().end(scope)
        if self.method == "end":
            self._boom()

    def propagate(self, fn: Any) -> Any:
        if self.method == "propagate":
            self._boom()
        return super().propagate(fn)


@pytest.mark.parametrize("case", ["tool_result", "tool_error", "llm_error", "tool_raises_base_exception", "delegate"])
@pytest.mark.parametrize("method", ["begin", "current", "end"])
def test_raising_store_changes_no_outcome(bench: HermesBench, hermes: Any, method: str, case: str) -> None:
    tag = f"st-{method}-{case}"
    directives = f"[delegate:{tag}-kid]" if case == "delegate" else CASES[case]
    reference = outcome(lambda: bench.call(hermes, tag, directives))
    assert wait_for_delegations(timeout=60)
    bench.server.reset()
    _raised.clear()
    store = FaultyStore(method)
    instrumented(bench, backend=store)
    got = outcome(lambda: bench.call(hermes, tag, directives))
    assert wait_for_delegations(timeout=60)
    same_outcome(reference, got, _raised[-1] if _raised else None)
    assert store.raised > 0, "the store really raised"
    if case == "delegate":
        assert bench.server.log(f"{tag}-kid"), "the subagent still ran"
    assert store.live() == 0


# -- eviction ----------------------------------------------------------------------------------------------------------------


def test_evicted_invocations_still_return_and_their_agent_spans_are_marked(bench: HermesBench, hermes: Any) -> None:
    """More overlapping calls than the ``invocation_id`` store's bound: every call is right, the evicted ones are marked."""
    calls, bound = 5, 2
    store = InvocationIdStore(InvocationState, max_entries=bound)
    telemetry = instrumented(bench, backend=store)
    _gate.arm(calls)  # every call waits inside its tool until all are: all invocations are open at once
    results = run_threads(lambda i: bench.call(hermes, f"ev{i}", "[tool:sb_gate] [tools:1]"), calls)
    assert _gate.passed == calls
    for i, result in enumerate(results):
        assert shape(result) == {
            "final_response": f"done ev{i}", "completed": True, "failed": False, "error": None, "tools": [f"ev{i}-1"],
        }
    agents = telemetry.spans("invoke_agent")
    assert len(agents) == calls
    marked = [s for s in agents if s.attributes.get(EVICTED_ATTRIBUTE) is True]
    assert len(marked) == calls - bound == store.evicted
    for span in marked:
        (event,) = [e for e in span.events if e.name == EVICTED_EVENT]
        assert event.attributes["statebackends.state.backend"] == "invocation_id"
        assert span.status.is_unset, "the call itself succeeded: no ERROR status"
        assert "error.type" not in span.attributes
    for span in agents:
        if span not in marked:
            assert EVICTED_ATTRIBUTE not in span.attributes and not span.events
    assert store.live() == 0


# -- a subagent that starts after its parent ended ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize("backend", ["contextvar", "invocation_id", "otel_context", "threadlocal"])
def test_subagent_started_after_the_parent_ended_hangs_under_delegate_task(
    bench: HermesBench, hermes: Any, monkeypatch: pytest.MonkeyPatch, backend: str, batch: bool
) -> None:
    """Hermes runs delegations in the background: a child may start only once its parent's turn returned (its state
    ended). The child still hangs under the parent's ``delegate_task`` span, in the single path (a context copy) and
    the batch path (a pool that copies nothing)."""
    import tools.delegate_tool as delegate_tool

    parent_returned = threading.Event()
    original = delegate_tool._run_single_child

    def run_after_parent(*args: Any, **kwargs: Any) -> Any:
        assert parent_returned.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(delegate_tool, "_run_single_child", run_after_parent)
    telemetry = instrumented(bench, backend=backend)
    tag = f"late-{backend}-{int(batch)}"
    kids = [f"{tag}-a", f"{tag}-b"] if batch else [f"{tag}-kid"]
    directives = f"[delegate_batch:{','.join(kids)}]" if batch else f"[delegate:{kids[0]}]"
    result = bench.call(hermes, tag, directives)
    assert telemetry.store.live() == 0, "the parent's state is ended before the children run"
    parent_returned.set()
    assert wait_for_delegations(timeout=60)
    assert result["final_response"] == f"done {tag}"
    assert all(bench.server.log(kid) for kid in kids), "the children really ran"
    agents = telemetry.spans("invoke_agent")
    assert len(agents) == 1 + len(kids)
    (tool,) = telemetry.spans("execute_tool delegate_task")
    (parent,) = [a for a in agents if a.parent is None or a.parent.span_id != tool.context.span_id]
    children = [a for a in agents if a is not parent]
    for child in children:
        assert child.parent is not None and child.parent.span_id == tool.context.span_id
        assert child.context.trace_id == tool.context.trace_id == parent.context.trace_id
        assert child.start_time > parent.end_time, "the child really started after its parent ended"
    assert telemetry.store.live() == 0


# -- the public lifecycle itself -------------------------------------------------------------------------------------------------------


class _Owner:
    model = "fake-model"
    provider = "custom"
    session_id = "owner-session"


class _BrokenTracer:
    """A tracer whose every span start raises."""

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        raise ProcessorBoom("start_span is broken")


@pytest.mark.parametrize("broken", ["on_start", "on_end", "tracer", "nothing"])
def test_lifecycle_never_raises_and_stop_or_fail_twice_is_harmless(broken: str) -> None:
    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    provider = TracerProvider()
    if broken in ("on_start", "on_end"):
        provider.add_span_processor(RaisingProcessor(broken, ""))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer: Any = _BrokenTracer() if broken == "tracer" else provider.get_tracer("test")
    store = ContextVarStore(InvocationState)
    telemetry = HermesTelemetry(tracer, store, capture_content=True)
    owner = _Owner()

    invocation = telemetry.start_invocation(owner, None, user_message="hello")
    assert invocation.task_id, "an id is made when none is given"
    chat = telemetry.start_chat(owner, {"model": "fake-model"})
    chat.stop(object())  # not a ChatCompletion: read as zero tokens, never an error
    chat.stop(object())
    chat.fail(RuntimeError("after stop: ignored"))
    tool = telemetry.start_tool(owner, "sb_echo", {"text": object()}, task_id=invocation.task_id, tool_call_id="c1")
    tool.stop({"not": "a string"})
    tool.fail(RuntimeError("after stop: ignored"))
    telemetry.end_tool_round(owner, invocation.task_id, None)
    telemetry.end_tool_round(owner, invocation.task_id, None)
    failing = telemetry.start_chat(owner, None)
    failing.fail(RuntimeError("llm down"))
    failing.stop(None)
    invocation.stop({"final_response": "done", "failed": False})
    invocation.fail(RuntimeError("after stop: ignored"))
    invocation.stop(None)
    assert store.live() == 0 and store.current(owner) is None
    names = sorted(s.name for s in exporter.get_finished_spans())
    if broken == "nothing":
        assert names == sorted(["invoke_agent hermes", "react step", "react step", "chat fake-model",
                                "chat fake-model", "execute_tool sb_echo"])
        (agent_span,) = [s for s in exporter.get_finished_spans() if s.name == "invoke_agent hermes"]
        assert agent_span.status.is_unset, "the first outcome (stop) wins"
    elif broken in ("tracer", "on_start"):
        assert names == []


@pytest.mark.parametrize("broken", ["nothing", "on_end"])
def test_the_invocations_with_form_ends_them_by_the_blocks_outcome_and_never_replaces_its_exception(
    broken: str,
) -> None:
    """Issue 17, deliverable 1: agent, chat and tool invocations are context managers, as util-genai's are. A block
    that raises ends each with ``fail`` (``error.type`` the exception's class, ERROR status) and the very exception
    leaves the ``with`` unchanged, with nothing of the telemetry chained onto it, even when a span processor raises
    in ``on_end``; a block that returns ends each with ``stop(invocation.result)``. No state is left either way.
    (On 83ee177 the invocations had no ``__enter__``/``__exit__``: the API was absent.)"""
    from types import SimpleNamespace

    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    raising = RaisingProcessor("on_end" if broken == "on_end" else "nowhere", "")  # after the exporter's
    provider.add_span_processor(raising)
    store = ContextVarStore(InvocationState)
    telemetry = HermesTelemetry(provider.get_tracer("test"), store)
    owner = _Owner()
    boom = AgentError("from the agent")
    with pytest.raises(AgentError) as info:
        with telemetry.start_invocation(owner):
            with telemetry.start_tool(owner, "sb_echo", {"text": "x"}, tool_call_id="c1"):
                raise boom
    assert info.value is boom and info.value.__context__ is None, "the block's own exception, nothing chained"
    failed = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("invoke_agent hermes", "execute_tool sb_echo"):
        assert failed[name].status.status_code.name == "ERROR" and failed[name].attributes["error.type"] == "AgentError"
    assert store.live() == 0 and store.current(owner) is None
    exporter.clear()
    final = SimpleNamespace(id="chatcmpl-7", model="m", usage=SimpleNamespace(prompt_tokens=3, completion_tokens=1),
                            choices=[SimpleNamespace(finish_reason="stop", message=SimpleNamespace(tool_calls=None))])
    with telemetry.start_invocation(owner) as invocation:
        with telemetry.start_chat(owner, {"model": "m"}) as chat:
            chat.result = final
        invocation.result = {"final_response": "x"}
    done = {s.name: s for s in exporter.get_finished_spans()}
    assert done["chat m"].attributes["gen_ai.response.id"] == "chatcmpl-7", "stop(result) read the block's result"
    assert done["invoke_agent hermes"].attributes["gen_ai.usage.input_tokens"] == 3
    assert all(s.status.status_code.name != "ERROR" for s in done.values())
    assert store.live() == 0 and store.current(owner) is None
    assert raising.raised == (len(failed) + len(done) if broken == "on_end" else 0), "every span's on_end raised"


class _UnreadableResult(dict):
    """A result dict whose ``get`` raises."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise ProcessorBoom("get is broken")


class _NoTruth:
    def __bool__(self) -> bool:
        raise ProcessorBoom("__bool__ is broken")


@pytest.mark.parametrize(
    "result",
    [
        _UnreadableResult(final_response="done"),
        {"failed": _NoTruth()},
        {"interrupted": _NoTruth(), "final_response": "done"},
        {"final_response": _NoTruth()},
    ],
    ids=["get raises", "failed unreadable", "interrupted unreadable", "final_response unreadable"],
)
def test_an_unreadable_result_still_ends_the_open_step_and_completes_the_turn(result: Any) -> None:
    """A result that cannot be read (a ``get`` or a flag's ``__bool__`` that raises), with a react step still open
    (the last chat asked for tools): nothing raises, the step is ended, and ``invoke_agent`` keeps its tokens and
    response attributes; it counts as a plain result with no answer."""
    from types import SimpleNamespace

    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = ContextVarStore(InvocationState)
    telemetry = HermesTelemetry(provider.get_tracer("test"), store, capture_content=True)
    owner = _Owner()
    wants_tools = SimpleNamespace(
        id="chatcmpl-1", model="fake-model", usage=SimpleNamespace(prompt_tokens=7, completion_tokens=3),
        choices=[SimpleNamespace(finish_reason="tool_calls", message=SimpleNamespace(content=None, tool_calls=[object()]))],
    )
    invocation = telemetry.start_invocation(owner, None, user_message="hello")
    telemetry.start_chat(owner, {"model": "fake-model"}).stop(wants_tools)
    invocation.stop(result)
    assert store.live() == 0
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["chat fake-model", "invoke_agent hermes", "react step"], "every span is ended"
    turn = spans["invoke_agent hermes"]
    assert turn.attributes["gen_ai.usage.input_tokens"] == 7 and turn.attributes["gen_ai.response.id"] == "chatcmpl-1"
    assert "gen_ai.output.messages" not in turn.attributes and turn.status.is_unset


@pytest.mark.parametrize("raised", [ProcessorBoom("set_span_in_context is broken"), KeyboardInterrupt()],
                         ids=["Exception", "KeyboardInterrupt"])
def test_a_react_step_whose_context_cannot_be_made_is_not_left_half_open(
    monkeypatch: pytest.MonkeyPatch, raised: BaseException
) -> None:
    """The step span starts but its context cannot be made: that step span is ended at once and the state names no
    step. An Exception costs only the step: its chat hangs under invoke_agent, and the next chat opens a step (round
    1, the failed one counted no round). A KeyboardInterrupt passes and the chat is not started. Nothing is left open
    and the store is empty."""
    from types import SimpleNamespace

    from statebackends_hermes_agent import lifecycle
    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = ContextVarStore(InvocationState)
    telemetry = HermesTelemetry(provider.get_tracer("test"), store)
    owner = _Owner()

    def answer(reason: str) -> SimpleNamespace:
        return SimpleNamespace(
            id="chatcmpl-2", model="fake-model", usage=SimpleNamespace(prompt_tokens=7, completion_tokens=3),
            choices=[SimpleNamespace(finish_reason=reason, message=SimpleNamespace(
                content="hi", tool_calls=[object()] if reason == "tool_calls" else None))],
        )

    real = lifecycle._set_span_in_context
    broken = {"once": True}

    def set_span_in_context(span: Any, context: Any = None) -> Any:
        if broken["once"] and getattr(span, "name", "") == "react step":
            broken["once"] = False
            raise raised
        return real(span, context)

    monkeypatch.setattr(lifecycle, "_set_span_in_context", set_span_in_context)
    invocation = telemetry.start_invocation(owner)
    if isinstance(raised, Exception):
        first = telemetry.start_chat(owner, {"model": "fake-model"})
        assert first.span is not None, "the chat is started all the same"
        first.stop(answer("tool_calls"))
    else:
        with pytest.raises(KeyboardInterrupt):
            telemetry.start_chat(owner, {"model": "fake-model"})
    telemetry.start_chat(owner, {"model": "fake-model"}).stop(answer("stop"))
    invocation.stop({"final_response": "hi"})
    assert store.live() == 0
    spans = exporter.get_finished_spans()
    (agent,) = [s for s in spans if s.name.startswith("invoke_agent")]
    steps = [s for s in spans if s.name == "react step"]
    chats = [s for s in spans if s.name.startswith("chat ")]
    assert len(steps) == 2, "the step whose context failed is ended too"
    assert sorted(s.attributes["hermes.react.round"] for s in steps) == [1, 1], "the failed step counted no round"
    assert len(chats) == (2 if isinstance(raised, Exception) else 1)
    opened = [s for s in steps if any(c.parent.span_id == s.context.span_id for c in chats)]
    assert len(opened) == 1 and opened[0].attributes["hermes.react.round"] == 1
    if isinstance(raised, Exception):
        assert chats[0].parent.span_id == agent.context.span_id, "the first chat hangs under invoke_agent"
        assert agent.attributes["gen_ai.usage.input_tokens"] == 14, "both chats' tokens count"


def test_async_stub_agent_goes_through_the_public_lifecycle(bench: HermesBench) -> None:
    """The async stub agent drives ``instrumentor.telemetry`` only; a raising processor changes none of its results."""
    import asyncio

    from statebackends_hermes_testbed.stub_agent import AsyncStubAgent

    telemetry = instrumented(bench, RaisingProcessor("on_end", "execute_tool"), backend="contextvar")
    assert bench.instrumentor.telemetry is bench.instrumentor._wrappers.telemetry, "one lifecycle, the wrappers' own"
    stub = AsyncStubAgent(lambda: bench.instrumentor.telemetry, bench.server.script)

    async def main() -> list[Any]:
        return await asyncio.gather(*(stub.run_conversation(f"[conv:as{i}] [tools:2] hello") for i in range(4)))

    results = asyncio.run(main())
    for i, result in enumerate(results):
        assert result["final_response"] == f"done as{i}"
        assert [m["content"] for m in result["messages"] if m["role"] == "tool"] == [f"as{i}-1", f"as{i}-2"]
    agents = telemetry.spans("invoke_agent")
    assert len(agents) == 4 and len({s.context.trace_id for s in agents}) == 4
    assert telemetry.store.live() == 0


# -- a subagent runs in the context Hermes gives it ----------------------------------------------------------------------------

_WORKER_VALUE: contextvars.ContextVar[str] = contextvars.ContextVar("sb_test_worker_value", default="unset")


@pytest.mark.parametrize("backend", ["invocation_id", "contextvar", "threadlocal", "otel_context"])
def test_subagent_sees_the_context_variables_its_worker_set(backend: str) -> None:
    """Hermes keeps settings in context variables (the session's working directory, approvals): a child run must see its worker's."""
    from opentelemetry.sdk.trace import TracerProvider

    from statebackends import get_store
    from statebackends_hermes_agent.state import InvocationState
    from statebackends_hermes_agent.lifecycle import HermesTelemetry
    from statebackends_hermes_agent.wrappers import HermesWrappers

    class Child:
        model, provider, session_id = "m", "custom", None

    def run_conversation(user_message: str, system_message: Any = None, conversation_history: Any = None,
                         task_id: Any = None) -> dict:
        return {"final_response": _WORKER_VALUE.get()}

    wrappers = HermesWrappers(HermesTelemetry(TracerProvider().get_tracer("t"), get_store(backend, InvocationState)))
    child = Child()
    token = _WORKER_VALUE.set("parent-tool-thread")
    try:
        wrappers.telemetry.prepare_subagent(child)  # what the build_child_agent wrapper does in the parent's tool thread
    finally:
        _WORKER_VALUE.reset(token)
    seen: dict[str, Any] = {}

    def worker() -> None:  # Hermes's delegation worker sets its own values, then runs the child
        _WORKER_VALUE.set("child-worker")
        seen["result"] = wrappers.run_conversation(run_conversation, child, ("hi",), {})

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert seen["result"] == {"final_response": "child-worker"}
    assert wrappers.telemetry.store.live() == 0


# -- issue 17: never break the agent, by construction ----------------------------------------------------------------


class RaisingHandler(logging.Handler):
    """A log handler whose ``emit`` raises (as a broken log shipper does): the logging call itself raises."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.raised = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.raised += 1
        raise ProcessorBoom(f"log handler broken ({record.name})")


def _otel_log_bridge() -> tuple[logging.Handler, RaisingLogProcessor]:
    """OpenTelemetry's log bridge (``LoggingHandler``) whose log record processor raises on every record."""
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler

    processor = RaisingLogProcessor()
    provider = LoggerProvider()
    provider.add_log_record_processor(processor)  # type: ignore[arg-type]  # a duck-typed processor
    return LoggingHandler(level=logging.WARNING, logger_provider=provider), processor


@pytest.mark.parametrize("handler", ["root_handler", "otel_log_bridge"])
@pytest.mark.parametrize("kind", ["invoke_agent", "chat", "execute_tool"])
def test_a_raising_log_handler_never_turns_a_contained_telemetry_error_into_the_agents(
    bench: HermesBench, hermes: Any, kind: str, handler: str
) -> None:
    """Issue 17, finding 1 (failed on dff20c4): a span processor raising in ``on_end`` is contained and logged; a log
    handler that raises (a raising root handler at WARNING, OpenTelemetry's ``LoggingHandler`` whose processor raises)
    must not turn that log record into the agent's exception. The same handler alone, uninstrumented, leaves Hermes
    unaffected (the reference outcome is taken with it installed)."""
    if handler == "root_handler":
        installed: logging.Handler = RaisingHandler()
        raised = lambda: installed.raised  # noqa: E731
    else:
        installed, log_processor = _otel_log_bridge()
        raised = lambda: log_processor.raised  # noqa: E731
    root = logging.getLogger()
    tag = f"lh-{handler}-{kind}"
    root.addHandler(installed)  # around the calls only (an SDK may log at set-up too: not the agent's call path)
    try:
        reference = outcome(lambda: bench.call(hermes, tag, "[tools:1]"))
    finally:
        root.removeHandler(installed)
    assert reference[0] == "returned", reference
    bench.server.reset()
    processor = RaisingProcessor("on_end", KINDS[kind])
    telemetry = instrumented(bench, processor)
    root.addHandler(installed)
    try:
        got = outcome(lambda: bench.call(hermes, tag, "[tools:1]"))
    finally:
        root.removeHandler(installed)
    same_outcome(reference, got)
    assert processor.raised > 0 and raised() > 0, "the processor raised and the handler raised on its log record"
    assert telemetry.store.live() == 0


class TelemetryExit(BaseException):
    """A ``BaseException`` that is not an ``Exception`` (nor a ``KeyboardInterrupt``), raised by the telemetry."""


class BaseRaisingProcessor(SpanProcessor):
    """Raises ``exc_type`` in ``on_start`` or ``on_end`` for the spans whose name starts with ``prefix``."""

    def __init__(self, where: str, prefix: str, exc_type: type[BaseException]) -> None:
        self.where, self.prefix, self.exc_type, self.raised = where, prefix, exc_type, 0

    def _maybe(self, where: str, span: Any) -> None:
        if self.where == where and span.name.startswith(self.prefix):
            self.raised += 1
            raise self.exc_type(f"{where} of {span.name}")

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        self._maybe("on_start", span)

    def on_end(self, span: ReadableSpan) -> None:
        self._maybe("on_end", span)


@pytest.mark.parametrize("exc_type", [GeneratorExit, TelemetryExit], ids=["GeneratorExit", "custom_BaseException"])
@pytest.mark.parametrize("where", ["on_start", "on_end"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_base_exception_from_a_span_processor_is_never_the_agents(
    bench: HermesBench, hermes: Any, kind: str, where: str, exc_type: type[BaseException]
) -> None:
    """Issue 17, finding 2 (failed on dff20c4): ``GeneratorExit`` or a custom ``BaseException`` raised by a span
    processor, for any span kind, changes nothing the agent returns, not even its tool results ("thread did not
    return a result"): only ``KeyboardInterrupt`` is let through."""
    tag = f"be-{kind}-{where}-{exc_type.__name__}"
    reference = outcome(lambda: bench.call(hermes, tag, "[tools:2] [tool_ms:5]"))
    bench.server.reset()
    processor = BaseRaisingProcessor(where, KINDS[kind], exc_type)
    telemetry = instrumented(bench, processor)
    got = outcome(lambda: bench.call(hermes, tag, "[tools:2] [tool_ms:5]"))
    same_outcome(reference, got)
    assert got[1]["tools"] == [f"{tag}-1", f"{tag}-2"] and processor.raised > 0
    assert telemetry.store.live() == 0


class BaseRaisingStore(ContextVarStore):
    """A ``contextvar`` store whose ``method`` raises a ``BaseException`` that is not an ``Exception``."""

    name = "base-raising"

    def __init__(self, method: str) -> None:
        super().__init__(InvocationState)
        self.method, self.raised = method, 0

    def _boom(self, method: str) -> None:
        if method == self.method:
            self.raised += 1
            raise TelemetryExit(f"{method} is broken")

    def begin(self, owner: Any, invocation_id: Any = None) -> Any:
        self._boom("begin")
        return super().begin(owner, invocation_id)

    def current(self, owner: Any = None, invocation_id: Any = None) -> Any:
        self._boom("current")
        return super().current(owner, invocation_id)

    def end(self, scope: Any) -> None:
        super().end(scope)
        self._boom("end")


@pytest.mark.parametrize("method", ["begin", "current", "end"])
def test_a_base_exception_from_the_store_is_never_the_agents(bench: HermesBench, hermes: Any, method: str) -> None:
    """Issue 17, finding 2 (failed on dff20c4): a store raising a ``BaseException`` that is not an ``Exception``."""
    tag = f"bs-{method}"
    reference = outcome(lambda: bench.call(hermes, tag, "[tools:2] [tool_ms:5]"))
    bench.server.reset()
    store = BaseRaisingStore(method)
    instrumented(bench, backend=store)
    got = outcome(lambda: bench.call(hermes, tag, "[tools:2] [tool_ms:5]"))
    same_outcome(reference, got)
    assert store.raised > 0 and store.live() == 0


class BaseRaisingHistogram:
    """A histogram whose ``record`` raises ``exc_type`` (a ``BaseException`` that is not an ``Exception``)."""

    def __init__(self, exc_type: type[BaseException]) -> None:
        self.exc_type, self.raised = exc_type, 0

    def record(self, *args: Any, **kwargs: Any) -> None:
        self.raised += 1
        raise self.exc_type("record")


class BaseRaisingMeterProvider:
    """A meter provider whose histograms all raise ``exc_type`` in ``record``."""

    def __init__(self, exc_type: type[BaseException]) -> None:
        self.exc_type, self.histograms = exc_type, list[BaseRaisingHistogram]()

    def get_meter(self, *args: Any, **kwargs: Any) -> BaseRaisingMeterProvider:
        return self

    def create_histogram(self, *args: Any, **kwargs: Any) -> BaseRaisingHistogram:
        self.histograms.append(BaseRaisingHistogram(self.exc_type))
        return self.histograms[-1]

    def raised(self) -> int:
        return sum(h.raised for h in self.histograms)


class BaseRaisingLogProcessor(RaisingLogProcessor):
    """A log record processor raising ``exc_type`` in ``on_emit``: every content event fails."""

    def __init__(self, exc_type: type[BaseException]) -> None:
        super().__init__()
        self.exc_type = exc_type

    def on_emit(self, *args: Any, **kwargs: Any) -> None:
        self.raised += 1
        raise self.exc_type("on_emit")


class BaseRaisingExporter(RaisingExporter):
    """An exporter raising ``exc_type`` from ``export`` (``SimpleSpanProcessor`` catches ``Exception`` only)."""

    def __init__(self, exc_type: type[BaseException]) -> None:
        super().__init__()
        self.exc_type = exc_type

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        raise self.exc_type("export")


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
@pytest.mark.parametrize("exc_type", [GeneratorExit, TelemetryExit], ids=["GeneratorExit", "custom_BaseException"])
@pytest.mark.parametrize("source", ["meter", "event_log_processor", "exporter"])
def test_a_base_exception_from_a_meter_an_event_or_an_exporter_is_never_the_agents(
    bench: HermesBench, hermes: Any, monkeypatch: pytest.MonkeyPatch, source: str, exc_type: type[BaseException],
    streaming: bool,
) -> None:
    """Issue 17, finding 2, beyond span processors and stores: the telemetry's other parts (histograms, including the
    time to first chunk recorded in Hermes's stream reader thread; the log record processor behind the content events;
    an exporter behind ``SimpleSpanProcessor``) raising a ``BaseException`` that is not an ``Exception`` change
    nothing the agent returns, tool results included, and leave no state."""
    from opentelemetry.sdk._logs import LoggerProvider

    agent = bench.agent(streaming=True) if streaming else hermes
    tag = f"bx-{source}-{exc_type.__name__}-{'s' if streaming else 'p'}"
    reference = outcome(lambda: bench.call(agent, tag, "[tools:2] [tool_ms:5]"))
    assert reference[0] == "returned", reference
    bench.server.reset()
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_AND_EVENT")
    provider = TracerProvider()
    meters, logs, exporter = BaseRaisingMeterProvider(exc_type), BaseRaisingLogProcessor(exc_type), None
    logger_provider = LoggerProvider()
    extra: dict[str, Any] = {}
    if source == "meter":
        extra["meter_provider"] = meters
    elif source == "event_log_processor":
        logger_provider.add_log_record_processor(logs)  # type: ignore[arg-type]  # a duck-typed processor
        extra["logger_provider"] = logger_provider
    else:
        exporter = BaseRaisingExporter(exc_type)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    bench.uninstrument()
    bench.instrumentor.instrument(tracer_provider=provider, state_backend="invocation_id", **extra)
    got = outcome(lambda: bench.call(agent, tag, "[tools:2] [tool_ms:5]"))
    same_outcome(reference, got)
    assert got[1]["tools"] == [f"{tag}-1", f"{tag}-2"]
    raised = {"meter": meters.raised(), "event_log_processor": logs.raised,
              "exporter": exporter.calls if exporter is not None else 0}[source]
    assert raised > 0, f"the {source} really raised"
    assert bench.instrumentor.store.live() == 0


@pytest.mark.parametrize("where", ["on_start", "on_end"])
def test_a_keyboard_interrupt_from_the_telemetry_is_let_through_after_cleaning_up(where: str) -> None:
    """The one exception the boundary lets through: a ``KeyboardInterrupt`` raised by a span processor leaves the
    lifecycle, after every span that reached us is ended and the state is released."""
    from types import SimpleNamespace

    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    provider = TracerProvider()
    recorder = Recorder()
    provider.add_span_processor(recorder)
    provider.add_span_processor(BaseRaisingProcessor(where, "chat ", KeyboardInterrupt))
    store = ContextVarStore(InvocationState)
    telemetry = HermesTelemetry(provider.get_tracer("test"), store)
    owner = _Owner()
    final = SimpleNamespace(id="chatcmpl-1", model="m", usage=SimpleNamespace(prompt_tokens=1, completion_tokens=1),
                            choices=[SimpleNamespace(finish_reason="stop", message=SimpleNamespace(tool_calls=None))])
    invocation = telemetry.start_invocation(owner)
    with pytest.raises(KeyboardInterrupt):
        telemetry.start_chat(owner, {"model": "m"}).stop(final)
    invocation.stop({"final_response": "x"})
    assert store.live() == 0 and store.current(owner) is None
    chats = [s for s in recorder.started if s.name.startswith("chat ")]
    assert len(chats) == 1
    assert (chats[0].end_time is not None) == (where == "on_end"), "ended, unless its start never reached us"
    assert all(s.end_time is not None for s in recorder.started if not s.name.startswith("chat ")), "the rest ended"


def test_a_span_whose_on_start_raised_costs_only_that_span(bench: HermesBench, hermes: Any) -> None:
    """Issue 17, finding 3 (failed on dff20c4): a processor raising in ``on_start`` of the agent span and of the chat
    spans. The SDK raises before it hands the span back, so those spans never reach us and can never be ended: a
    processor registered before the raising one (an open-span tracker) keeps them open forever, the ones after it
    and every exporter never see them (asserted as the known-bad part). What can be done is done: the call keeps its
    state, and its steps and tools are exported, hanging under the caller's span."""
    from statebackends_hermes_testbed.traces import OpenSpanTracker

    tracker = OpenSpanTracker()
    raising = RaisingProcessor("on_start", "")
    raising.prefix = ("invoke_agent", "chat ")  # type: ignore[assignment]  # str.startswith takes a tuple
    telemetry = instrumented(bench, tracker, raising)
    result = bench.call(hermes, "os", "[tools:1]")
    assert result["final_response"] == "done os"
    assert raising.raised == 3, "the agent span and both chat spans"
    never_ended = sorted(s.name for s in tracker.open_spans())
    assert never_ended == ["chat fake-model", "chat fake-model", "invoke_agent hermes"], "lost to us: never ended"
    assert sorted(s.name for s in telemetry.spans()) == ["execute_tool sb_echo", "react step", "react step"]
    (caller,) = [s for s in bench.exporter.get_finished_spans() if s.name == "call os"]
    steps = telemetry.spans("react step")
    assert all(s.parent is not None and s.parent.span_id == caller.context.span_id for s in steps), "under the caller"
    (tool,) = telemetry.spans("execute_tool")
    assert tool.parent is not None and tool.parent.span_id in {s.context.span_id for s in steps}
    assert telemetry.store.live() == 0


def test_a_chats_tokens_still_count_when_its_span_could_not_start() -> None:
    """Issue 17, finding 3 (failed on dff20c4): the chat spans' ``on_start`` raises; ``invoke_agent`` still carries the
    turn's tokens and response id, and the round's step still ends on the final answer."""
    from types import SimpleNamespace

    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    provider = TracerProvider()
    provider.add_span_processor(RaisingProcessor("on_start", "chat "))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = ContextVarStore(InvocationState)
    telemetry = HermesTelemetry(provider.get_tracer("test"), store)
    owner = _Owner()
    final = SimpleNamespace(id="chatcmpl-9", model="m", usage=SimpleNamespace(prompt_tokens=5, completion_tokens=2),
                            choices=[SimpleNamespace(finish_reason="stop", message=SimpleNamespace(tool_calls=None))])
    invocation = telemetry.start_invocation(owner)
    chat = telemetry.start_chat(owner, {"model": "m"})
    assert chat.span is None
    chat.stop(final)
    invocation.stop({"final_response": "x"})
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["invoke_agent hermes", "react step"]
    turn = spans["invoke_agent hermes"]
    assert turn.attributes["gen_ai.usage.input_tokens"] == 5 and turn.attributes["gen_ai.usage.output_tokens"] == 2
    assert turn.attributes["gen_ai.response.id"] == "chatcmpl-9"
    assert spans["react step"].attributes["hermes.react.finish_reason"] == "stop"
    assert store.live() == 0


# -- forks --------------------------------------------------------------------------------------------------------------


def test_task_ids_we_make_never_repeat_across_a_fork() -> None:
    """Issue 17, finding 6 (failed on dff20c4): a parent and its forked child both make task ids for turns the caller
    gave none; before, both went on from the same prefix and counter (the same ids, so the same Docker sandbox
    ``.../docker/<task_id>``)."""
    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    telemetry = HermesTelemetry(TracerProvider().get_tracer("test"), ContextVarStore(InvocationState))
    owner = _Owner()

    def ids() -> list[str]:
        out = []
        for _ in range(3):
            invocation = telemetry.start_invocation(owner)
            invocation.stop(None)
            out.append(invocation.task_id)
        return out

    child = in_forked_child(ids)
    parent = ids()
    assert not set(child) & set(parent), (child, parent)
    assert all(len(i) == 36 and i[14] == "4" for i in child + parent), "shaped as Hermes's own uuid4 strings"


def test_the_caller_s_task_id_reaches_hermes_and_its_tools_unchanged(bench: HermesBench, hermes: Any) -> None:
    """Issue 17, finding 6: with a task id the caller passes, the tool sees exactly that id; without one, it sees the
    one the invocation made (a fresh one per turn, shaped as Hermes's own), as it would see Hermes's uuid4."""
    _task_ids_seen.clear()
    bench.call(hermes, "tid0", "[tool:sb_task_id] [tools:1]")
    uninstrumented = _task_ids_seen.pop()
    instrumented(bench)
    for tag, task_id in (("tid1", "the-callers-id-42"), ("tid2", None), ("tid3", None)):
        bench.call(hermes, tag, "[tool:sb_task_id] [tools:1]", task_id=task_id)
    assert _task_ids_seen[0] == "the-callers-id-42"
    made = _task_ids_seen[1:]
    assert len(set(made)) == 2 and "the-callers-id-42" not in made
    assert all(len(i) == len(uninstrumented) == 36 and i[14] == uninstrumented[14] == "4" for i in made)


class _BlockingHash:
    """An agent whose ``__hash__`` blocks until released: a thread registering it holds the pending-subagent lock."""

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        self.entered, self.release = entered, release

    def __hash__(self) -> int:
        self.entered.set()
        self.release.wait(30)
        return 1


def test_a_fork_while_another_thread_holds_the_subagent_lock_cannot_hang_the_child() -> None:
    """Issue 17, finding 7 (failed on dff20c4): the instrumentation's own locks are made anew in a forked child."""
    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    telemetry = HermesTelemetry(TracerProvider().get_tracer("test"), ContextVarStore(InvocationState))
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=telemetry.prepare_subagent, args=(_BlockingHash(entered, release),))
    holder.start()
    try:
        assert entered.wait(10), "the other thread holds the lock"

        def in_child() -> bool:
            child = _Owner()
            telemetry.prepare_subagent(child)
            return telemetry.take_subagent(child) is not None

        assert in_forked_child(in_child) is True
    finally:
        release.set()
        holder.join(10)


class _BlockingHistograms:
    """A meter whose time-to-first-chunk histogram blocks in ``record`` until released (the others record nothing)."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def create_histogram(self, name: str, **kwargs: Any) -> Any:
        blocking = "first_chunk" in name
        owner = self

        class Histogram:
            def record(self, *args: Any, **kwargs: Any) -> None:
                if blocking:
                    owner.entered.set()
                    owner.release.wait(30)

        return Histogram()


def test_a_fork_while_a_stream_reader_records_its_first_chunk_cannot_hang_the_child() -> None:
    """Issue 17, finding 7 (failed on dff20c4): Hermes's stream reader thread is recording a chat's first chunk (under
    the lock that orders it against the chat's end) when the caller's thread forks; the child ends that chat."""
    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    meter = _BlockingHistograms()
    store = ContextVarStore(InvocationState)
    telemetry = HermesTelemetry(TracerProvider().get_tracer("test"), store, meter=meter)  # type: ignore[arg-type]
    owner = _Owner()
    invocation = telemetry.start_invocation(owner)
    chat = telemetry.start_chat(owner, {"model": "m"}, streaming=True)
    on_first_delta = chat.wrap_first_delta(None)
    reader = threading.Thread(target=on_first_delta)
    reader.start()
    try:
        assert meter.entered.wait(10), "the reader holds the lock"

        def in_child() -> int:
            chat.fail(InterruptedError("the child gives up on the stream"))
            invocation.stop(None)
            return store.live() or 0

        assert in_forked_child(in_child) == 0
    finally:
        meter.release.set()
        reader.join(10)
    chat.fail(InterruptedError("done"))
    invocation.stop(None)


def test_a_second_instrument_call_checks_its_state_backend(bench: HermesBench, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 17, finding 7 (failed on dff20c4): ``instrument(state_backend="no-such")`` while instrumented raised
    nothing and was ignored; it raises as the first call does, and another valid backend is reported as ignored."""
    bench.instrumentor.instrument(tracer_provider=bench.provider, state_backend="contextvar")
    with pytest.raises(ValueError, match="no-such"):
        bench.instrumentor.instrument(state_backend="no-such")
    with caplog.at_level(logging.WARNING, logger="statebackends_hermes_agent"):
        bench.instrumentor.instrument(state_backend="threadlocal")
    assert bench.instrumentor.state_backend == "contextvar"
    assert any("threadlocal" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    bench.instrumentor.instrument(state_backend="contextvar")  # the one in use: nothing to report
    assert bench.instrumentor.state_backend == "contextvar"


def test_a_second_instrument_call_reports_a_store_object_other_than_the_one_in_use(
    bench: HermesBench, caplog: pytest.LogCaptureFixture
) -> None:
    """A store object passed while instrumented is ignored like a name is, so it is reported even when its name is the
    one in use (the caller's own ContextVarStore was silently dropped); the store in use passed again is not."""
    bench.instrumentor.instrument(tracer_provider=bench.provider, state_backend="contextvar")
    in_use = bench.instrumentor.store
    mine = ContextVarStore(InvocationState)
    with caplog.at_level(logging.WARNING, logger="statebackends_hermes_agent"):
        bench.instrumentor.instrument(state_backend=mine)
        bench.instrumentor.instrument(state_backend=in_use)
    assert bench.instrumentor.store is in_use
    reports = [r.getMessage() for r in caplog.records if r.name.startswith("statebackends") and "ignored" in r.getMessage()]
    assert len(reports) == 1 and "contextvar" in reports[0], reports


def test_to_json_keeps_its_promise_on_an_object_whose_str_raises() -> None:
    """Issue 17, finding 7 (failed on dff20c4): ``genai.to_json`` is documented as never raising."""
    from statebackends_hermes_agent import genai

    class Unprintable:
        def __str__(self) -> str:
            raise ProcessorBoom("__str__ is broken")

        __repr__ = __str__

    assert genai.to_json({"a": Unprintable()}) == '{"a":"<Unprintable>"}'
    cycle: list[Any] = []
    cycle.append(cycle)
    assert json.loads(genai.to_json(cycle)) == "[[...]]"
    loop: dict[str, Any] = {"u": Unprintable()}
    loop["self"] = loop
    assert json.loads(genai.to_json(loop)) == "<dict>"


_FORK_DURING_DEFERRED_WRAP = '''
import json, logging, os, signal, sys, threading, time, types

from opentelemetry.sdk.trace import TracerProvider
from statebackends_hermes_agent import HermesAgentInstrumentor

parent = os.getpid()
entered, release = threading.Event(), threading.Event()


class SlowHandler(logging.Handler):
    """A log handler that blocks (a log shipper waiting on its network), in the parent only."""

    def emit(self, record):
        if os.getpid() == parent:
            entered.set()
            release.wait(30)


logging.getLogger("statebackends_hermes_agent").addHandler(SlowHandler(logging.WARNING))
module = types.ModuleType("run_agent")  # Hermes importing run_agent: AIAgent not defined yet
sys.modules["run_agent"] = module
HermesAgentInstrumentor().instrument(tracer_provider=TracerProvider())
deferred = type(module) is not types.ModuleType
module.__dict__["AIAgent"] = type("AIAgent", (), {})  # defined now, without the methods: one WARNING each
module.__dict__["handle_function_call"] = lambda *args, **kwargs: None
reader = threading.Thread(target=lambda: module.AIAgent)  # finishes the wrapping, logging under the hook's lock
reader.start()
assert entered.wait(10), "the reader holds the hook's lock"
pid = os.fork()
if pid == 0:
    module.AIAgent  # the child's first read of the module finishes the wrapping there
    os._exit(0 if type(module) is types.ModuleType else 3)
deadline, status = time.monotonic() + 10, None
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.02)
else:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    status = "hung"
release.set()
reader.join(10)
print("RESULT " + json.dumps({"deferred": deferred, "child": status}))
'''


def test_a_fork_while_another_thread_finishes_a_deferred_wrapping_cannot_hang_the_child(tmp_path: Any) -> None:
    """Issue 17, finding 7: the post-import hook's lock is made anew in a forked child too. ``instrument()`` ran while
    Hermes was importing ``run_agent`` (as a Hermes plugin's ``register()`` does), so the wrapping waits for the first
    read of the module; a thread finishing it holds the hook's lock while a slow log handler writes its WARNING, and
    the caller's thread forks. The child's first read of ``run_agent`` must not wait forever for that lock (it did on
    b313985; a fresh interpreter: run_agent here is a stand-in)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FORK_DURING_DEFERRED_WRAP], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**__import__("os").environ, "HOME": str(tmp_path)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["deferred"] is True, "instrument() found run_agent still importing and deferred the wrapping"
    assert result["child"] == 0, f"the forked child hung or failed: {result['child']}"


_PROVIDER_ENV_CHILD = r'''
import json, logging, os, sys
from statebackends_hermes_testbed.hermes_harness import loopback_only
from statebackends_hermes_testbed.traces import kind_of
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.getLogger("statebackends_hermes_agent").addHandler(Keep())
out = {}
with loopback_only():
    from statebackends_hermes_testbed.driver import HermesBench
    bench = HermesBench()
    os.environ.update(json.loads(sys.argv[2]))  # after the bench: the SDK's span processors load the meter provider
    try:
        given = {"tracer_provider": bench.provider} if sys.argv[1] == "given" else {}
        try:
            bench.instrumentor.instrument(state_backend="invocation_id", **given)
            out["instrument"] = "returned"
        except BaseException as exc:
            out["instrument"] = repr(exc)
        out["answer"] = bench.call(bench.agent(), "envp", "[tools:1]")["final_response"]
        bench.provider.force_flush()
        out["kinds"] = sorted({kind_of(s) for s in bench.exporter.get_finished_spans()} - {None})
        out["errors"] = [message for level, message in records if level == "ERROR"]
    finally:
        bench.close()
print("RESULT " + json.dumps(out))
'''


@pytest.mark.parametrize("variable", ["OTEL_PYTHON_LOGGER_PROVIDER", "OTEL_PYTHON_TRACER_PROVIDER"])
def test_an_unloadable_global_provider_named_by_the_environment_never_fails_instrument(variable: str) -> None:
    """``OTEL_PYTHON_LOGGER_PROVIDER`` (content events on) or ``OTEL_PYTHON_TRACER_PROVIDER`` (no tracer provider given)
    naming no installed provider (a typo): OpenTelemetry re-raises (a ``StopIteration``) when it loads the global one,
    and ``instrument()`` raised it. Now one ERROR line naming the variable, its value and the valid names; the rest
    still traces (with the logger's typo) or nothing does (the tracer's); the real agent's answer is unchanged. A fresh
    interpreter: the global providers are loaded once per process. (A bad ``OTEL_PYTHON_METER_PROVIDER`` fails the
    SDK's own span processors and tracers first.)"""
    import os
    import subprocess
    import sys

    logger = variable == "OTEL_PYTHON_LOGGER_PROVIDER"
    bad = {variable: "sdk_providr", "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "SPAN_AND_EVENT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STATEBACKENDS_"))}
    done = subprocess.run([sys.executable, "-c", _PROVIDER_ENV_CHILD, "given" if logger else "global", json.dumps(bad)],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])
    assert out["instrument"] == "returned"
    assert out["answer"] == "done envp"
    assert out["kinds"] == (["chat", "execute_tool", "invoke_agent", "step"] if logger else [])
    (line,) = out["errors"]
    assert f"{variable}='sdk_providr'" in line
    assert ("sdk_logger_provider" if logger else "sdk_tracer_provider") in line


class FrameLocals(logging.Handler):
    """Records what a handler that reports each traceback frame's local variables (as Sentry's logging integration
    does by default) would be handed: every record's message and the repr of every frame's locals."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        self.texts.append(record.getMessage())
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            self.texts.append(repr(tb.tb_frame.f_locals))
            tb = tb.tb_next


@pytest.mark.parametrize("where", ["on_end", "on_start"])
def test_a_contained_telemetry_error_hands_log_handlers_no_content_in_its_frames(
    bench: HermesBench, hermes: Any, where: str
) -> None:
    """Content capture off means no content in our logs, also for a handler that records the local variables of a
    logged traceback's frames: when a span processor raises on a chat span, what we log of it (the boundary's ERROR)
    carries the traceback as text, not its frames, whose locals hold the call's messages and the LLM's response (on
    8bd1c68 the user's message reached the handler through them)."""
    raising = RaisingProcessor(where, "chat")
    instrumented(bench, raising)
    handler = FrameLocals()
    logger = logging.getLogger("statebackends_hermes_agent")
    logger.addHandler(handler)
    try:
        result = bench.call(hermes, "framesecret", "[tools:1]")
    finally:
        logger.removeHandler(handler)
    assert result["final_response"] == "done framesecret"
    assert raising.raised > 0 and handler.records > 0, "the processor raised and the boundary logged it"
    assert any("ProcessorBoom" in text for text in handler.texts), "the log keeps what failed, as text"
    assert [text[:200] for text in handler.texts if "framesecret" in text] == []


def test_a_telemetry_error_raised_while_recording_the_llms_error_logs_none_of_that_errors_text(
    bench: HermesBench, hermes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Content capture off: a span processor that raises while the chat records the provider's error (which quotes
    the conversation) is logged with its own traceback only, not the chained error it was raised in (on 5ca0bdc the
    log's text went on with 'During handling of the above exception' and the provider's message)."""
    raising = RaisingProcessor("on_end", "chat")
    instrumented(bench, raising)
    with caplog.at_level(logging.DEBUG, logger="statebackends_hermes_agent"):
        result = bench.call(hermes, "chainsecret", "[llm_error]")
    assert result.get("failed") or not result.get("completed"), result
    logged = [r.getMessage() + (r.exc_text or "") for r in caplog.records if r.name.startswith("statebackends")]
    assert raising.raised > 0 and any("ProcessorBoom" in text for text in logged), logged
    assert [text[-300:] for text in logged if "chainsecret" in text] == []
