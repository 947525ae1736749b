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

from .fakellm import FakeLLMServer
from .hermes_harness import hermes_home, make_agent, wait_for_delegations
from .traces import CallTruth, OpenSpanTracker, Verdict, judge

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


class HermesBench:
    """One fake LLM server, one SDK tracer provider with an in-memory exporter, and the instrumentor."""

    def __init__(self) -> None:
        ensure_hermes_home()
        self.server = FakeLLMServer().start()
        self.exporter = InMemorySpanExporter()
        self.tracker = OpenSpanTracker()
        self.provider = TracerProvider()
        self.provider.add_span_processor(self.tracker)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("statebackends.driver")
        self._agents: dict[tuple, Any] = {}
        from statebackends_hermes_agent import HermesAgentInstrumentor

        self.instrumentor = HermesAgentInstrumentor()

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
        self.uninstrument()
        self.instrumentor.instrument(tracer_provider=self.provider, state_backend=backend)
        return self.instrumentor.store

    def uninstrument(self) -> None:
        if self.instrumentor.is_instrumented_by_opentelemetry:
            self.instrumentor.uninstrument()

    @property
    def store(self) -> StateStore[Any]:
        return self.instrumentor.store

    def reset(self) -> None:
        self.exporter.clear()
        self.tracker.clear()
        self.server.reset()

    def close(self) -> None:
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
        with self.tracer.start_as_current_span(f"call {tag}"):
            message = f"[conv:{tag}] {directives} hello".strip()
            if method == "chat":
                return agent.chat(message)
            if task_id is not None:
                return agent.run_conversation(message, task_id=task_id)
            return agent.run_conversation(message)

    def truth(
        self,
        tag: str,
        *,
        tools: int = 0,
        rounds: Optional[int] = None,
        children: Sequence[CallTruth] = (),
        error: bool = False,
        tokens: bool = True,
        late: int = 0,
    ) -> CallTruth:
        """The truth of one call from what the fake LLM actually sent for ``tag``."""
        sent = self.server.log(tag)
        chats = len(sent) + self.server.errors(tag)
        steps = rounds if rounds is not None else chats
        input_tokens, output_tokens = self.server.totals(tag)
        return CallTruth(
            tag=tag,
            steps=steps,
            chats=chats,
            tools=tools,
            input_tokens=input_tokens if tokens else None,
            output_tokens=output_tokens if tokens else None,
            children=children,
            error=error,
            late=late,
        )

    def verdict(self, calls: Sequence[CallTruth], *, owners: Iterable[Any] = (), live_before: int = 0) -> Verdict:
        """Judge the spans exported so far against ``calls``; count state left for ``owners`` here."""
        wait_for_delegations(timeout=30)
        self.provider.force_flush()
        left = 0
        store = self.store
        for owner in owners:
            if store is not None and store.current(owner) is not None:
                left += 1
        if store is not None:
            live = store.live()
            if live is not None and live > live_before:
                left += live - live_before
        return judge(self.exporter.get_finished_spans(), calls, self.tracker.open_spans(), state_left=left)


def run_threads(target: Callable[[int], Any], n: int, *, barrier: bool = True) -> list[Any]:
    """Run ``target(i)`` in ``n`` threads at once, re-raising the first error."""
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
