"""ONE real hermes-agent ``AIAgent``, its LLM faked in process, driven in any mode: the harness the benchmarks time.

A *mode* is ``"none"`` (uninstrumented), a ``statebackends`` backend name (our
instrumentation with that backend) or ``"loongsuite"`` (see :mod:`.modes`).
Spans go to an SDK ``TracerProvider`` whose only processor counts them, so
memory stays flat whatever the number of calls. Besides plain and overlapping
calls, the bench replays the span tree of one instrumented call with the bare
SDK (the *floor*) and judges overlapping calls with :func:`.traces.judge`.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

from .driver import Recorder, ensure_hermes_home, run_threads, truth_of
from .hermes_harness import InProcessLLM, clear_tool_log, make_agent
from .modes import LOONGSUITE, NONE, Instrumentors
from .traces import CALLER_PREFIX, SpanProcessorBase

TOOL_DIRECTIVES = "[tools:1]"
"""Every timed call: one LLM call asking for one tool, the tool, a final LLM call."""
MAX_ITERATIONS = 100_000


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


class CountingSpanProcessor(SpanProcessorBase):
    """Counts ended spans and keeps nothing: memory stays flat whatever the number of calls."""

    def __init__(self) -> None:
        self.ended = 0
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.ended += 1


@dataclass
class _SpanNode:
    name: str
    kind: Any
    attributes: Dict[str, Any]
    children: List["_SpanNode"] = field(default_factory=list)


class AgentBench:
    """A real ``AIAgent`` built once, its LLM faked in process, and every mode one ``set_mode`` away.

    Building costs about 1.5 s and the first conversation about 1 s (lazy imports);
    the constructor does both, plus one warm-up call in every mode of ``warm``.
    """

    def __init__(self, directives: str = TOOL_DIRECTIVES, *, warm: bool | Sequence[str] = True) -> None:
        ensure_hermes_home()
        self.directives = directives
        self.llm = InProcessLLM()
        # Hermes keeps ONE iteration budget per instance (replaced at every turn's start and
        # consumed by every overlapping turn): 64 overlapping calls of 2 LLM rounds exhaust the
        # default 90 and take another code path. A large cap keeps every call on the same path.
        self.agent = self.llm.install(make_agent(closed_loopback_url(), max_iterations=MAX_ITERATIONS))
        self.counter = CountingSpanProcessor()
        self.provider = TracerProvider()
        self.provider.add_span_processor(self.counter)
        self.instrumentors = Instrumentors()
        self.ours, self.theirs = self.instrumentors.ours, self.instrumentors.theirs
        self._frozen = False
        self._plan: Optional[List[_SpanNode]] = None
        self._plan_spans = 0
        self._floor_replay: Optional[tuple] = None  # (provider, replay) made by floor_call
        if warm:
            self.warm_up(None if warm is True else list(warm))

    # -- modes -----------------------------------------------------------------------------

    def modes(self, include_loongsuite: bool = True) -> List[str]:
        """``none``, every backend, and ``loongsuite`` when installed."""
        return self.instrumentors.modes(include_loongsuite)

    @property
    def mode(self) -> str:
        """The mode the agent runs under now."""
        return self.instrumentors.mode

    def set_mode(self, mode: str, provider: Any = None) -> None:
        """Uninstrument everything, then instrument for ``mode`` with ``provider`` (default: the counting one)."""
        self.instrumentors.set_mode(mode, provider if provider is not None else self.provider)

    def close(self) -> None:
        """Uninstrument, and undo the warm-up's ``gc.freeze``."""
        self.instrumentors.release()
        if self._frozen:
            gc.unfreeze()
            self._frozen = False

    @property
    def store(self) -> Any:
        """Our instrumentation's store in one of our modes, else None."""
        return self.instrumentors.store

    # -- calls -------------------------------------------------------------------------------

    def message(self, tag: str) -> str:
        """The user message of call ``tag``."""
        return f"[conv:{tag}] {self.directives} hello"

    def call(self, tag: str = "b") -> Dict[str, Any]:
        """One ``run_conversation``."""
        return self.agent.run_conversation(self.message(tag))

    @staticmethod
    def completed(result: Any, tag: str = "b") -> bool:
        """Whether ``result`` is the final answer of call ``tag``."""
        return isinstance(result, dict) and result.get("final_response") == f"done {tag}"

    def reset(self) -> None:
        """Forget what the fake LLM and the bench tool recorded (they grow with every call)."""
        self.llm.reset()
        clear_tool_log()

    def warm_up(self, modes: Optional[Sequence[str]] = None) -> None:
        """The first conversation is slow (lazy imports); two calls in every mode (default: all) warm the wrappers too."""
        for mode in (modes if modes is not None else self.modes()):
            self.set_mode(mode)
            for _ in range(2):
                result = self.call("warm")
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
        """Seconds per call over ``calls`` sequential calls (of ``fn``, default :meth:`call`) in the current mode."""
        elapsed = timed_block(fn or self.call, calls)
        self.reset()
        return elapsed

    def spans_ended(self) -> int:
        """Spans ended on the counting provider so far."""
        return self.counter.ended

    # -- concurrency --------------------------------------------------------------------------

    def threads(self, n: int, total: int) -> float:
        """Seconds per call when ``n`` threads share the agent, ``total // n`` calls each, all released at once."""
        per = max(1, total // n)
        gate = threading.Barrier(n + 1)
        errors: List[BaseException] = []
        call = self.call

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
        """Seconds per call when ``n`` asyncio tasks on one loop each await ``asyncio.to_thread(call)`` ``total // n`` times.

        The loop's default executor gets ``n`` workers (started before the clock) so the ``n`` calls truly overlap.
        """
        per = max(1, total // n)
        call = self.call

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

    # -- correctness ----------------------------------------------------------------------------

    def correctness(self, mode: str, n: int = 16) -> Dict[str, Any]:
        """``n`` overlapping calls (threads) on the shared agent in ``mode``, judged by :func:`.traces.judge`.

        Returns ``correct`` (calls that completed and whose own tree is right), the
        aggregate ``orphans``, ``cross_talk``, ``never_ended`` and ``state_left``, ``ok`` and ``summary``.
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
                    return self.call(tags[i])

            results = run_threads(one, n)
            truths = [truth_of(self.llm, tag, tools=1) for tag in tags]
            verdict = recorder.verdict(truths, store=store, owners=[self.agent], live_before=live_before)
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
        """Record the span tree of one call in ``mode`` (default: the first backend) to replay as the floor."""
        mode = mode or self.modes(include_loongsuite=False)[1]
        recorder = Recorder("statebackends.agentbench.plan")
        previous = self.mode
        self.set_mode(mode, recorder.provider)
        try:
            self.call("plan")
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
        """Start and end, with the counting provider, the same span tree one instrumented call makes.

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


__all__ = [
    "LOONGSUITE",
    "NONE",
    "TOOL_DIRECTIVES",
    "AgentBench",
    "CountingSpanProcessor",
    "closed_loopback_url",
    "timed_block",
]
