"""Drive the REAL hermes-agent under the instrumentation, judge its spans or time it: the one bench.

:class:`HermesBench` is shared by the tests, the matrix and the benchmarks; :class:`Recorder`,
:func:`truth_of` and :func:`run_threads` are its parts that other drivers reuse.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, cast

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from statebackends import StateStore

from .fakellm import FakeLLMServer, ScriptRecords
from .hermes_harness import BENCH_TOOLSET, InProcessLLM, clear_tool_log, hermes_home, make_agent, wait_for_delegations
from .modes import LOONGSUITE, NONE, Instrumentors
from .traces import (
    CALLER_PREFIX,
    CallTruth,
    LLMRequest,
    OpenSpanTracker,
    SpanProcessorBase,
    Verdict,
    judge,
    state_left,
)

SERVER = "server"
"""``llm=``: the fake LLM over HTTP on 127.0.0.1 (:class:`~.fakellm.FakeLLMServer`)."""
IN_PROCESS = "in_process"
"""``llm=``: the fake LLM answering in process (:class:`~.hermes_harness.InProcessLLM`): what the benchmarks time."""
LLMS = (SERVER, IN_PROCESS)
RECORD = "record"
"""``spans=``: every span kept in memory and judged (:class:`Recorder`)."""
COUNT = "count"
"""``spans=``: ended spans only counted (:class:`CountingSpanProcessor`): what the benchmarks time."""
SPANS = (RECORD, COUNT)

TOOL_DIRECTIVES = "[tools:1]"
"""Every timed call: one LLM call asking for one tool, the tool, a final LLM call."""
MAX_ITERATIONS = 100_000
"""The in-process agents' iteration budget (see :meth:`HermesBench.agent`)."""
N_CALLERS = 8
"""Concurrent callers in the overlapping scenarios (threads, tasks) by default; the matrix allows 2..16."""

_home_lock = threading.Lock()
_home_stack: Optional[ExitStack] = None


def ensure_hermes_home() -> str:
    """Give this process a private, throw-away ``HOME``/``HERMES_HOME`` before Hermes is first imported."""
    global _home_stack
    with _home_lock:
        if _home_stack is None:
            _home_stack = ExitStack()
            folder = tempfile.mkdtemp(prefix="statebackends-hermes-")
            _home_stack.enter_context(hermes_home(folder))
            atexit.register(_home_stack.close)
        return os.environ["HERMES_HOME"]


class Recorder:
    """An SDK tracer provider that keeps every ended span in memory and tracks the open ones, and judges them."""

    def __init__(self, tracer_name: str = "statebackends.driver") -> None:
        self.exporter = InMemorySpanExporter()
        self.tracker = OpenSpanTracker()
        self.provider = TracerProvider()
        self.provider.add_span_processor(self.tracker)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer(tracer_name)

    def clear(self) -> None:
        """Forget every span recorded so far."""
        self.exporter.clear()
        self.tracker.clear()

    def verdict(
        self,
        calls: Sequence[CallTruth],
        *,
        store: Optional[StateStore[Any]] = None,
        owners: Iterable[Any] = (),
        live_before: int = 0,
        source: Optional[Any] = None,
    ) -> Verdict:
        """:func:`traces.judge` of the spans recorded so far against ``calls``, with the state ``store`` left for ``owners``.

        ``source`` (a :class:`~statebackends_hermes_testbed.hermes_plugins.HermesPlugin`): its exported and open spans
        are judged too, beside the callers' spans recorded here, and read as its ``reading`` says.
        """
        self.provider.force_flush()
        left = state_left(store, owners, live_before)
        spans, open_spans = list(self.exporter.get_finished_spans()), list(self.tracker.open_spans())
        if source is None:
            return judge(spans, calls, open_spans, state_left=left)
        return judge(spans + source.finished_spans(), calls, open_spans + source.open_spans(), state_left=left,
                     reading=source.reading)


def truth_of(
    records: ScriptRecords,
    tag: str,
    *,
    tools: int = 0,
    rounds: Optional[int] = None,
    children: Sequence[CallTruth] = (),
    error: bool = False,
    tokens: bool = True,
    late: int = 0,
    requests: bool = False,
) -> CallTruth:
    """The truth of one call from what a fake LLM (the server or the in-process one) actually sent for ``tag``.

    ``requests``: also the chat requests it received (``traceparent`` and response id), for the judge to check
    that each one's HTTP span hangs under its own chat in the call's trace.
    """
    chats = len(records.log(tag)) + records.errors(tag)
    input_tokens, output_tokens = records.totals(tag)
    return CallTruth(
        tag=tag,
        steps=rounds if rounds is not None else chats,
        chats=chats,
        tools=tools,
        input_tokens=input_tokens if tokens else None,
        output_tokens=output_tokens if tokens else None,
        children=children,
        error=error,
        late=late,
        requests=[LLMRequest(*r) for r in records.requests(tag)] if requests else None,
    )


class CountingSpanProcessor(SpanProcessorBase):
    """Counts ended spans and keeps nothing: memory stays flat whatever the number of calls."""

    def __init__(self) -> None:
        self.ended = 0
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.ended += 1


def timed_block(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of ``calls`` sequential calls of ``fn``."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def closed_loopback_url() -> str:
    """A loopback URL nothing listens on: Hermes's construction probes are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@dataclass
class _SpanNode:
    name: str
    kind: Any
    attributes: Dict[str, Any]
    children: List["_SpanNode"] = field(default_factory=list)


class HermesBench:
    """The real Hermes ``AIAgent`` on a fake LLM, every mode one :meth:`set_mode` away, judged or timed.

    Two choices make the bench: ``llm`` is :data:`SERVER` (the fake LLM over HTTP on 127.0.0.1:
    the client, its transport and ``delegate_task``'s children are real) or :data:`IN_PROCESS`
    (the same script answering in process, no socket: what the benchmarks time); ``spans`` is
    :data:`RECORD` (a :class:`Recorder`: every span kept and judged) or :data:`COUNT` (a
    :class:`CountingSpanProcessor` alone: memory flat whatever the number of calls).
    :meth:`timing` makes the benchmarks' bench (in process, counting, warmed up).

    A *mode* is ``"none"`` (uninstrumented), a ``statebackends`` backend name or a store (our
    instrumentation with it), ``"loongsuite"``, or a foreign instrumentor or Hermes plugin
    added to :attr:`instrumentors` (see :mod:`.modes`).
    """

    def __init__(
        self,
        *,
        llm: str = SERVER,
        spans: str = RECORD,
        callers: int = N_CALLERS,
        directives: str = TOOL_DIRECTIVES,
        warm: bool | Sequence[str] = False,
    ) -> None:
        if llm not in LLMS:
            raise ValueError(f"llm={llm!r}: expected one of {', '.join(map(repr, LLMS))}")
        if spans not in SPANS:
            raise ValueError(f"spans={spans!r}: expected one of {', '.join(map(repr, SPANS))}")
        ensure_hermes_home()
        self.callers = callers
        self.directives = directives
        """What every :meth:`run` asks the fake LLM for (default: one tool, then the answer)."""
        self.server: Optional[FakeLLMServer] = FakeLLMServer().start() if llm == SERVER else None
        self.llm: ScriptRecords = self.server if self.server is not None else InProcessLLM()
        """The fake LLM (the server or the in-process one): its script, and what it sent for each tag."""
        self.recorder: Optional[Recorder] = None
        self.exporter: Optional[InMemorySpanExporter] = None
        self.tracker: Optional[OpenSpanTracker] = None
        self.counter: Optional[CountingSpanProcessor] = None
        if spans == RECORD:
            self.recorder = Recorder()
            self.exporter, self.tracker = self.recorder.exporter, self.recorder.tracker
            self.provider, self.tracer = self.recorder.provider, self.recorder.tracer
        else:
            self.counter = CountingSpanProcessor()
            self.provider = TracerProvider()
            self.provider.add_span_processor(self.counter)
            self.tracer = self.provider.get_tracer("statebackends.driver")
        self._agents: dict[tuple, Any] = {}
        self.instrumentors = Instrumentors()
        self.instrumentor = self.ours = self.instrumentors.ours
        self.theirs = self.instrumentors.theirs
        self.judge_requests = False
        """Whether :meth:`truth` lists the LLM requests received, for the judge to check their HTTP spans."""
        self.fixtures: dict[Any, Any] = {}
        """What code driving this bench builds once and keeps with it, by a key of its own (the scenarios' agents)."""
        self.timed_agent: Any = self.agent()
        """The agent :meth:`run` calls: :meth:`agent`'s default kind (built once, shared with the callers of :meth:`agent`)."""
        self._frozen = False
        self._plan: Optional[List[_SpanNode]] = None
        self._plan_spans = 0
        self._floor_replay: Optional[tuple] = None  # (provider, replay) made by floor_call
        if warm:
            self.warm_up(None if warm is True else list(warm))

    @classmethod
    def timing(cls, directives: str = TOOL_DIRECTIVES, *, warm: bool | Sequence[str] = True) -> "HermesBench":
        """The benchmarks' bench: the LLM in process, spans only counted, warmed up in every mode of ``warm``.

        Building costs about 1.5 s and the first conversation about 1 s (lazy imports); this does
        both, plus two warm-up calls in every mode of ``warm`` (all modes when True).
        """
        return cls(llm=IN_PROCESS, spans=COUNT, directives=directives, warm=warm)

    # -- set-up --------------------------------------------------------------------------

    def agent(
        self,
        *,
        streaming: bool = False,
        delegation: bool = False,
        toolsets: Sequence[str] = (BENCH_TOOLSET,),
        fresh: bool = False,
        **kwargs: Any,
    ) -> Any:
        """A real AIAgent on the bench's fake LLM (:func:`~.hermes_harness.make_agent`), built once per kind.

        Building costs about a second: the agent is kept by its arguments (``kwargs`` go to ``AIAgent``
        and must then be hashable) unless ``fresh``, which builds a new one and keeps nothing. With the
        in-process LLM the agent is built on a closed loopback port (its construction probes refused at
        once) and its LLM client shadowed; ``delegate_task``'s children are not covered (they get a
        fresh client factory): use the server for delegation.
        """
        key = None if fresh else (streaming, delegation, tuple(toolsets), tuple(sorted(kwargs.items())))
        if key is not None and key in self._agents:
            return self._agents[key]
        if self.server is not None:
            agent = make_agent(self.server.base_url, streaming=streaming, delegation=delegation, toolsets=toolsets,
                               **kwargs)
        else:
            # Hermes keeps ONE iteration budget per instance (replaced at every turn's start and
            # consumed by every overlapping turn): 64 overlapping calls of 2 LLM rounds exhaust the
            # default 90 and take another code path. A large cap keeps every call on the same path.
            kwargs.setdefault("max_iterations", MAX_ITERATIONS)
            agent = cast(InProcessLLM, self.llm).install(make_agent(
                closed_loopback_url(), streaming=streaming, delegation=delegation, toolsets=toolsets, **kwargs))
        if key is not None:
            self._agents[key] = agent
        return agent

    def modes(self, include_loongsuite: bool = True) -> List[str]:
        """``none``, every backend, and ``loongsuite`` when installed."""
        return self.instrumentors.modes(include_loongsuite)

    @property
    def mode(self) -> Any:
        """The mode the agent runs under now."""
        return self.instrumentors.mode

    def set_mode(self, mode: Any, provider: Any = None) -> None:
        """Uninstrument everything, then instrument for ``mode`` with ``provider`` (default: the bench's)."""
        self.instrumentors.set_mode(mode, provider if provider is not None else self.provider)

    def instrument(self, backend: str | StateStore[Any]) -> StateStore[Any]:
        """Instrument with ``backend`` (a name or a store) on the bench's provider; return the store in use."""
        self.set_mode(backend)
        return self.instrumentors.store

    def uninstrument(self) -> None:
        """Remove whichever instrumentation is active."""
        self.instrumentors.release()

    @property
    def store(self) -> StateStore[Any]:
        """Our instrumentation's store (None when uninstrumented or a foreign instrumentor is active)."""
        return self.instrumentors.store

    def reset(self) -> None:
        """Forget the spans recorded, what the fake LLM sent and the bench tool ran (they grow with every call)."""
        if self.recorder is not None:
            self.recorder.clear()
        self.llm.reset()
        clear_tool_log()

    def close(self) -> None:
        """Uninstrument, stop the fake server, and undo the warm-up's ``gc.freeze``."""
        try:
            self.uninstrument()
        finally:
            if self.server is not None:
                self.server.stop()
            if self._frozen:
                gc.unfreeze()
                self._frozen = False

    def spans_ended(self) -> int:
        """Spans ended on the bench's provider so far."""
        if self.counter is not None:
            return self.counter.ended
        assert self.exporter is not None
        return len(self.exporter.get_finished_spans())

    # -- driving ----------------------------------------------------------------------------

    def call(
        self,
        agent: Any,
        tag: str,
        directives: str = "",
        *,
        method: str = "run_conversation",
        task_id: Optional[str] = None,
    ) -> Any:
        """One call under its own ``call <tag>`` span, made in the calling thread (``task_id`` as Hermes's front ends pass it)."""
        with self.tracer.start_as_current_span(f"{CALLER_PREFIX}{tag}"):
            message = f"[conv:{tag}] {directives} hello".strip()
            if method == "chat":
                return agent.chat(message)
            if task_id is not None:
                return agent.run_conversation(message, task_id=task_id)
            return agent.run_conversation(message)

    def truth(self, tag: str, **kwargs: Any) -> CallTruth:
        """:func:`truth_of` the fake LLM's records for ``tag`` (with its requests when :attr:`judge_requests`)."""
        kwargs.setdefault("requests", self.judge_requests)
        return truth_of(self.llm, tag, **kwargs)

    def verdict(self, calls: Sequence[CallTruth], *, owners: Iterable[Any] = (), live_before: int = 0) -> Verdict:
        """Judge the spans recorded so far against ``calls``, once Hermes's background delegations are done."""
        if self.recorder is None:
            raise RuntimeError("verdict() needs a bench that records its spans (spans=RECORD); this one counts them")
        wait_for_delegations(timeout=30)
        return self.recorder.verdict(calls, store=self.store, owners=owners, live_before=live_before,
                                     source=self.instrumentors.source)

    # -- timing: the timed call ------------------------------------------------------------

    def message(self, tag: str) -> str:
        """The user message of :meth:`run` ``tag``."""
        return f"[conv:{tag}] {self.directives} hello"

    def run(self, tag: str = "b") -> Dict[str, Any]:
        """One ``run_conversation`` of :attr:`directives` on :attr:`timed_agent`, no caller span: the timed call."""
        return self.timed_agent.run_conversation(self.message(tag))

    @staticmethod
    def completed(result: Any, tag: str = "b") -> bool:
        """Whether ``result`` is the final answer of :meth:`run` ``tag``."""
        return isinstance(result, dict) and result.get("final_response") == f"done {tag}"

    def warm_up(self, modes: Optional[Sequence[str]] = None) -> None:
        """The first conversation is slow (lazy imports); two calls in every mode (default: all) warm the wrappers too."""
        for mode in (modes if modes is not None else self.modes()):
            self.set_mode(mode)
            for _ in range(2):
                result = self.run("warm")
                if not self.completed(result, "warm"):
                    raise RuntimeError(f"warm-up call in mode {mode!r} did not complete: {result!r}")
        self.set_mode(NONE)
        self.reset()
        # Hermes's heap is ~110k objects: a full collection costs 50-70 ms and would land in a
        # random mode's timed block. Freezing what exists after warm-up keeps later full
        # collections proportional to what the calls themselves allocate (the same in every mode).
        gc.collect()
        gc.freeze()
        self._frozen = True

    def block(self, calls: int, fn: Optional[Callable[[], Any]] = None) -> float:
        """Seconds per call over ``calls`` sequential calls (of ``fn``, default :meth:`run`) in the current mode."""
        elapsed = timed_block(fn or self.run, calls)
        self.reset()
        return elapsed

    def threads(self, n: int, total: int) -> float:
        """Seconds per call when ``n`` threads share the agent, ``total // n`` calls each, all released at once."""
        per = max(1, total // n)
        gate = threading.Barrier(n + 1)
        errors: List[BaseException] = []
        call = self.run

        def body() -> None:
            try:
                gate.wait(60)
                for _ in range(per):
                    call()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=body, name=f"bench-{i}") for i in range(n)]
        for t in threads:
            t.start()
        gate.wait(60)
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        self.reset()
        if errors:
            raise errors[0]
        return elapsed / (per * n)

    def asyncio_tasks(self, n: int, total: int) -> float:
        """Seconds per call when ``n`` asyncio tasks on one loop each await ``asyncio.to_thread(run)`` ``total // n`` times.

        The loop's default executor gets ``n`` workers (started before the clock) so the ``n`` calls truly overlap.
        """
        per = max(1, total // n)
        call = self.run

        async def main() -> float:
            loop = asyncio.get_running_loop()
            executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix="bench-async")
            loop.set_default_executor(executor)
            started = threading.Barrier(n)
            await asyncio.gather(*(asyncio.to_thread(started.wait, 60) for _ in range(n)))

            async def task() -> None:
                for _ in range(per):
                    await asyncio.to_thread(call)

            t0 = time.perf_counter()
            await asyncio.gather(*(task() for _ in range(n)))
            return time.perf_counter() - t0

        elapsed = asyncio.run(main())
        self.reset()
        return elapsed / (per * n)

    def correctness(self, mode: str, n: int = 16) -> Dict[str, Any]:
        """``n`` overlapping :meth:`run` calls (threads) on the timed agent in ``mode``, judged by :func:`.traces.judge`.

        The spans go to a :class:`Recorder` of their own, whatever the bench's ``spans``. Returns
        ``correct`` (calls that completed and whose own tree is right), the aggregate ``orphans``,
        ``cross_talk``, ``never_ended`` and ``state_left``, ``ok`` and ``summary``.
        """
        recorder = Recorder("statebackends.agentbench.caller")
        self.set_mode(mode, recorder.provider)
        try:
            store = self.store
            live_before = (store.live() or 0) if store is not None else 0
            self.reset()
            tags = [f"k{i}" for i in range(n)]

            def one(i: int) -> Any:
                with recorder.tracer.start_as_current_span(CALLER_PREFIX + tags[i]):
                    return self.run(tags[i])

            results = run_threads(one, n)
            truths = [truth_of(self.llm, tag, tools=1) for tag in tags]
            verdict = recorder.verdict(truths, store=store, owners=[self.timed_agent], live_before=live_before)
            correct = sum(
                1 for tag, result in zip(tags, results) if self.completed(result, tag) and tag not in verdict.broken
            )
        finally:
            self.set_mode(NONE)
            self.reset()
        return {
            "calls": n,
            "correct": correct,
            "orphans": verdict.orphans,
            "cross_talk": verdict.cross_talk,
            "never_ended": verdict.never_ended,
            "state_left": verdict.state_left,
            "ok": verdict.ok,
            "summary": verdict.summary(),
        }

    # -- the floor: bare SDK spans with the same names, kinds and attributes ------------------------------

    def record_plan(self, mode: Optional[str] = None) -> int:
        """Record the span tree of one :meth:`run` in ``mode`` (default: the first backend) to replay as the floor."""
        mode = mode or self.modes(include_loongsuite=False)[1]
        recorder = Recorder("statebackends.agentbench.plan")
        previous = self.mode
        self.set_mode(mode, recorder.provider)
        try:
            self.run("plan")
        finally:
            self.set_mode(previous)
            self.reset()
        spans = sorted(recorder.exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
        nodes = {s.context.span_id: _SpanNode(s.name, s.kind, dict(s.attributes or {})) for s in spans}
        roots: List[_SpanNode] = []
        for s in spans:
            parent = s.parent.span_id if s.parent is not None else None
            (nodes[parent].children if parent in nodes else roots).append(nodes[s.context.span_id])
        self._plan, self._plan_spans = roots, len(spans)
        self._floor_replay = None
        return len(spans)

    @property
    def plan_spans(self) -> int:
        """Spans in the recorded plan (0 before :meth:`record_plan`)."""
        return self._plan_spans

    def floor_call(self) -> None:
        """Start and end, with the bench's provider, the same span tree one instrumented call makes.

        Only the spans are in it: the tracer and the replay function are made once per provider
        (getting a tracer costs about as much as one span, and no instrumentation gets one per call).
        """
        replay = self._floor_replay
        if replay is None or replay[0] is not self.provider:
            replay = self._floor_replay = (self.provider, self._make_floor_replay())
        replay[1]()

    def _make_floor_replay(self) -> Callable[[], None]:
        from opentelemetry import trace

        if self._plan is None:
            self.record_plan()
        tracer = self.provider.get_tracer("statebackends.agentbench.floor")
        start_span = tracer.start_span
        set_in = trace.set_span_in_context
        roots = list(self._plan or ())

        def replay(node: _SpanNode, ctx: Any) -> None:
            span = start_span(node.name, context=ctx, kind=node.kind, attributes=node.attributes)
            if node.children:
                inner = set_in(span, ctx)
                for child in node.children:
                    replay(child, inner)
            span.end()

        def call() -> None:
            for root in roots:
                replay(root, None)

        return call

    def floor_block(self, calls: int) -> float:
        """Seconds per replayed call."""
        return timed_block(self.floor_call, calls)


def run_threads(target: Callable[[int], Any], n: int, *, barrier: bool = True) -> list[Any]:
    """Run ``target(i)`` in ``n`` threads at once (released together by a barrier), re-raising the first error."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    gate = threading.Barrier(n) if barrier and n > 1 else None

    def body(i: int) -> None:
        try:
            if gate is not None:
                gate.wait(30)
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), name=f"caller-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


__all__ = [
    "COUNT",
    "IN_PROCESS",
    "LOONGSUITE",
    "N_CALLERS",
    "NONE",
    "RECORD",
    "SERVER",
    "TOOL_DIRECTIVES",
    "CountingSpanProcessor",
    "HermesBench",
    "Recorder",
    "closed_loopback_url",
    "ensure_hermes_home",
    "run_threads",
    "timed_block",
    "truth_of",
]
