"""Drive the REAL hermes-agent under the instrumentation, and judge the spans: shared by tests, matrix and benchmarks."""

from __future__ import annotations

import atexit
import os
import tempfile
import threading
from contextlib import ExitStack
from typing import Any, Callable, Iterable, Optional, Sequence

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from statebackends import StateStore

from .fakellm import FakeLLMServer, ScriptRecords
from .hermes_harness import hermes_home, make_agent, wait_for_delegations
from .modes import Instrumentors
from .traces import CALLER_PREFIX, CallTruth, LLMRequest, OpenSpanTracker, Verdict, judge, state_left

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


class HermesBench:
    """One fake LLM server, a :class:`Recorder`, and the instrumentors; ``callers`` overlapping calls per scenario."""

    def __init__(self, *, callers: int = N_CALLERS) -> None:
        ensure_hermes_home()
        self.callers = callers
        self.server = FakeLLMServer().start()
        self.recorder = Recorder()
        self.exporter, self.tracker = self.recorder.exporter, self.recorder.tracker
        self.provider, self.tracer = self.recorder.provider, self.recorder.tracer
        self._agents: dict[tuple, Any] = {}
        self.instrumentors = Instrumentors()
        self.instrumentor = self.instrumentors.ours
        self.judge_requests = False
        """Whether :meth:`truth` lists the LLM requests received, for the judge to check their HTTP spans."""
        self.fixtures: dict[Any, Any] = {}
        """What code driving this bench builds once and keeps with it, by a key of its own (the scenarios' agents)."""

    # -- set-up --------------------------------------------------------------------------

    def agent(self, *, streaming: bool = False, delegation: bool = False, fresh: bool = False) -> Any:
        """A real AIAgent on the fake server, built once per kind (building costs about a second)."""
        key = (streaming, delegation)
        if fresh or key not in self._agents:
            agent = make_agent(self.server.base_url, streaming=streaming, delegation=delegation)
            if fresh:
                return agent
            self._agents[key] = agent
        return self._agents[key]

    def instrument(self, backend: str | StateStore[Any]) -> StateStore[Any]:
        """Instrument with ``backend`` (a name or a store) on the recorder's provider; return the store in use."""
        self.instrumentors.set_mode(backend, self.provider)
        return self.instrumentors.store

    def uninstrument(self) -> None:
        """Remove whichever instrumentation is active."""
        self.instrumentors.release()

    @property
    def store(self) -> StateStore[Any]:
        """Our instrumentation's store (None when uninstrumented or a foreign instrumentor is active)."""
        return self.instrumentors.store

    def reset(self) -> None:
        """Forget the spans recorded and what the fake LLM sent."""
        self.recorder.clear()
        self.server.reset()

    def close(self) -> None:
        """Uninstrument and stop the fake server."""
        self.uninstrument()
        self.server.stop()

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
        """:func:`truth_of` the fake server's records for ``tag`` (with its requests when :attr:`judge_requests`)."""
        kwargs.setdefault("requests", self.judge_requests)
        return truth_of(self.server, tag, **kwargs)

    def verdict(self, calls: Sequence[CallTruth], *, owners: Iterable[Any] = (), live_before: int = 0) -> Verdict:
        """Judge the spans exported so far against ``calls``, once Hermes's background delegations are done."""
        wait_for_delegations(timeout=30)
        return self.recorder.verdict(calls, store=self.store, owners=owners, live_before=live_before,
                                     source=self.instrumentors.source)


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
