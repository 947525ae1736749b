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
from statebackends_hermes_testbed.hermes_harness import BENCH_TOOLSET, make_agent, register_bench_tools, wait_for_delegations

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


def _register_tools() -> None:
    from tools.registry import registry

    register_bench_tools()
    for name, handler in (("sb_interrupt", _sb_interrupt), ("sb_gate", _gate)):
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
    return make_agent(hermes_bench.server.base_url, toolsets=(BENCH_TOOLSET, RELIABILITY_TOOLSET), delegation=True)


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
    # on_start: the agent span, the step before each chat (its failure skips that chat span), each tool; on_end: all 7
    assert processor.raised == (5 if where == "on_start" else 7)
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
    """The step span starts but its context cannot be made: that step span is ended at once, the state names no
    step (so the next chat opens one, round 1, and hangs under it, not under invoke_agent), an Exception costs only
    that chat's span and a KeyboardInterrupt passes; nothing is left open and the store is empty."""
    from types import SimpleNamespace

    from statebackends_hermes_agent import lifecycle
    from statebackends_hermes_agent.lifecycle import HermesTelemetry

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = ContextVarStore(InvocationState)
    telemetry = HermesTelemetry(provider.get_tracer("test"), store)
    owner = _Owner()
    final = SimpleNamespace(
        id="chatcmpl-2", model="fake-model", usage=SimpleNamespace(prompt_tokens=7, completion_tokens=3),
        choices=[SimpleNamespace(finish_reason="stop", message=SimpleNamespace(content="hi", tool_calls=None))],
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
        assert telemetry.start_chat(owner, {"model": "fake-model"}).span is None
    else:
        with pytest.raises(KeyboardInterrupt):
            telemetry.start_chat(owner, {"model": "fake-model"})
    telemetry.start_chat(owner, {"model": "fake-model"}).stop(final)
    invocation.stop({"final_response": "hi"})
    assert store.live() == 0
    spans = exporter.get_finished_spans()
    steps = [s for s in spans if s.name == "react step"]
    (chat,) = [s for s in spans if s.name.startswith("chat ")]
    assert len(steps) == 2, "the step whose context failed is ended too"
    (opened,) = [s for s in steps if s.context.span_id == chat.parent.span_id]
    assert opened.attributes["gen_ai.react.round"] == 1, "the failed step counted no round"
    assert sorted(s.attributes["gen_ai.react.round"] for s in steps) == [1, 1]


def test_async_stub_agent_goes_through_the_public_lifecycle(bench: HermesBench) -> None:
    """The async stub agent drives ``instrumentor.telemetry`` only; a raising processor changes none of its results."""
    import asyncio

    from statebackends_hermes_testbed.stub_agent import AsyncStubAgent

    telemetry = instrumented(bench, RaisingProcessor("on_end", "execute_tool"), backend="contextvar")
    assert bench.instrumentor.telemetry is bench.instrumentor._wrappers, "one lifecycle, the one the wrappers use"
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
    from statebackends_hermes_agent.wrappers import HermesWrappers

    class Child:
        model, provider, session_id = "m", "custom", None

    def run_conversation(user_message: str, system_message: Any = None, conversation_history: Any = None,
                         task_id: Any = None) -> dict:
        return {"final_response": _WORKER_VALUE.get()}

    wrappers = HermesWrappers(TracerProvider().get_tracer("t"), get_store(backend, InvocationState))
    child = Child()
    token = _WORKER_VALUE.set("parent-tool-thread")
    try:
        wrappers.prepare_subagent(child)  # what the build_child_agent wrapper does in the parent's tool thread
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
    assert wrappers.store.live() == 0
