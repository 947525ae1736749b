"""Shared measuring code for the asv suites (``bench_*.py``), ``tests/test_benchmarks.py`` and ``benchmarks.report``.

Importing this module has no side effects: Hermes, the SDK and the instrumentations
are imported only when an :class:`AgentBench` is built.

Two kinds of figures:

* **state operations** (:class:`StateOp`): ``current()`` and one ``begin``/``end``
  pair of each backend, and the bare primitive each one stands on
  (``ContextVar.get``, ``getattr`` on an object, a ``threading.local`` attribute,
  a locked dict lookup), each run :data:`BATCH` times per call so that
  sub-microsecond costs rise above timer noise.
* **full agent calls** (:class:`AgentBench`): one ``run_conversation`` of a REAL
  hermes-agent ``AIAgent`` (one LLM call asking for one tool, the tool, a final LLM
  call: directive ``[tools:1]``), with the LLM faked in process
  (:class:`statebackends_hermes_testbed.hermes_harness.InProcessLLM`: no HTTP in the timed path) and
  an SDK ``TracerProvider`` whose only span processor counts ended spans, so memory
  stays flat. A *mode* is ``"none"`` (uninstrumented), a ``statebackends`` backend
  name (our instrumentation with that backend) or ``"loongsuite"``
  (``loongsuite-instrumentation-hermes-agent``, when the ``compare`` extra is
  installed).

Overheads are only trusted when *paired and interleaved in one process*
(:func:`paired_overhead`): every repeat times a block of calls in every mode, in a
rotating order, and the overhead of a mode is its block time minus the
uninstrumented block time of the same repeat.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import importlib.util
import itertools
import math
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "BATCH",
    "CONCURRENCY",
    "NONE",
    "LOONGSUITE",
    "FLOOR",
    "FLOOR_IN_SITU",
    "WrapperReplay",
    "isolated_overhead",
    "PRIMITIVES",
    "REFERENCE",
    "CURRENT_TARGET",
    "backend_names",
    "loongsuite_available",
    "loongsuite_skip_reason",
    "StateOp",
    "state_subjects",
    "measure_state_ops",
    "retained_after",
    "AgentBench",
    "paired_overhead",
    "PairedResult",
    "per_call_vs_n",
    "correctness",
    "bootstrap_ci",
    "mean",
    "ratio_of_means",
    "trimmed_mean",
    "ratio_of_trimmed_means",
    "machine_info",
]

BATCH = 1000
"""State operations per timed call."""
CONCURRENCY = (1, 4, 16, 64)
"""Overlapping invocations on one shared agent."""
TOTAL_CALLS = 64
"""Calls per concurrency measurement, split evenly between the N callers."""
NONE = "none"
LOONGSUITE = "loongsuite"
FLOOR = "floor"
LOONGSUITE_MODULE = "opentelemetry.statebackends_hermes_agent"
LOONGSUITE_DIST = "loongsuite-instrumentation-hermes-agent"
TOOL_DIRECTIVES = "[tools:1]"
MAX_ITERATIONS = 100_000

BARE = "bare:"
PRIMITIVES = ("ContextVar.get", "getattr(obj)", "threading.local", "locked dict")
"""The bare primitives, as state-op subjects ``bare:<name>``."""
REFERENCE = {
    "contextvar": "ContextVar.get",
    "instance": "getattr(obj)",
    "threadlocal": "threading.local",
    "invocation_id": "locked dict",
    "otel_context": "ContextVar.get",
}
"""The bare primitive each built-in backend is compared with."""
CURRENT_TARGET = {"contextvar": 1.5, "threadlocal": 1.5, "instance": 1.5, "invocation_id": 3.0}
"""Target: ``current()`` within this factor of its reference primitive."""


def backend_names() -> List[str]:
    """Every backend that resolves by name (built-ins and loadable entry points), sorted."""
    import statebackends

    return list(statebackends.available())


def loongsuite_available() -> bool:
    try:
        return importlib.util.find_spec(LOONGSUITE_MODULE) is not None
    except (ImportError, ValueError):
        return False


def loongsuite_skip_reason() -> str:
    return (
        f"{LOONGSUITE_DIST} is not installed: install the 'compare' set in a virtualenv of its own "
        "(it pins opentelemetry-api/sdk < 1.40, opentelemetry-instrumentation 0.60b1, wrapt < 2): "
        "python3 -m venv .venv-compare && .venv-compare/bin/pip install -r requirements-compare.txt"
    )


# ---------------------------------------------------------------------------------------------
# State operations
# ---------------------------------------------------------------------------------------------


class _Owner:
    """Stands for the instrumented agent object."""


class StateOp:
    """One state operation run ``n`` times per :meth:`run`: ``open()``, ``run(n)`` any number of times, ``close()``.

    ``subject`` is a backend name or ``"bare:<primitive>"``; ``op`` is ``"current"``
    (inside one open invocation, as the wrappers call it: ``store.current(owner)``)
    or ``"begin_end"`` (one ``end(begin(owner))`` pair, state built by the factory).
    Every loop has the same shape (``for _ in repeat(None, n)``), so the loop's own
    cost is the same in a backend's row and in its primitive's row.
    """

    def __init__(self, subject: str, op: str = "current") -> None:
        if op not in ("current", "begin_end"):
            raise ValueError(f"op must be 'current' or 'begin_end', got {op!r}")
        self.subject, self.op = subject, op
        self.owner = _Owner()
        self._close: Callable[[], None] = lambda: None
        self.run: Callable[[int], Any] = self._not_open

    def _not_open(self, n: int = BATCH) -> Any:
        raise RuntimeError("StateOp.open() first")

    def __enter__(self) -> "StateOp":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        close, self._close = self._close, (lambda: None)
        self.run = self._not_open
        close()

    def open(self) -> "StateOp":
        self.close()
        if self.subject.startswith(BARE):
            self._open_bare(self.subject[len(BARE):])
        else:
            self._open_store(self.subject)
        return self

    # -- a backend ------------------------------------------------------------------------

    def _open_store(self, name: str) -> None:
        import statebackends

        store = statebackends.get_store(name, dict)
        self.store = store
        owner = self.owner
        if self.op == "current":
            scope = store.begin(owner)

            def run(n: int = BATCH) -> Any:
                current = store.current
                for _ in repeat(None, n):
                    current(owner)
                return current(owner)

            self._close = lambda: store.end(scope)
        else:

            def run(n: int = BATCH) -> Any:
                begin, end = store.begin, store.end
                for _ in repeat(None, n):
                    end(begin(owner))
                return store.live()

        self.run = run

    # -- a bare primitive ---------------------------------------------------------------------

    def _open_bare(self, name: str) -> None:
        owner = self.owner
        if name == "ContextVar.get":
            var: contextvars.ContextVar[Any] = contextvars.ContextVar("bench_bare", default=None)
            if self.op == "current":
                token = var.set({})

                def run(n: int = BATCH) -> Any:
                    get = var.get
                    for _ in repeat(None, n):
                        get()
                    return get()

                self._close = lambda: var.reset(token)
            else:

                def run(n: int = BATCH) -> Any:
                    set_, reset = var.set, var.reset
                    for _ in repeat(None, n):
                        reset(set_(dict()))
                    return var.get()

        elif name == "getattr(obj)":
            attribute = "_bench_state"
            if self.op == "current":
                setattr(owner, attribute, {})

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        getattr(owner, attribute, None)
                    return getattr(owner, attribute, None)

            else:

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        setattr(owner, attribute, dict())
                        delattr(owner, attribute)
                    return getattr(owner, attribute, None)

        elif name == "threading.local":
            local = threading.local()
            if self.op == "current":
                local.state = {}

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        getattr(local, "state", None)
                    return getattr(local, "state", None)

            else:

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        local.state = dict()
                        del local.state
                    return getattr(local, "state", None)

        elif name == "locked dict":
            lock = threading.Lock()
            table: Dict[Any, Any] = {}
            key = "inv-1"
            if self.op == "current":
                table[key] = {}

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        with lock:
                            table.get(key)
                    with lock:
                        return table.get(key)

            else:

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        with lock:
                            table[key] = dict()
                        with lock:
                            del table[key]
                    return table.get(key)

        else:
            raise ValueError(f"unknown primitive {name!r}; known: {', '.join(PRIMITIVES)}")
        self.run = run


def state_subjects() -> List[str]:
    """Every backend, then every bare primitive (``bare:<name>``)."""
    return backend_names() + [BARE + p for p in PRIMITIVES]


def measure_state_ops(
    subjects: Optional[Sequence[str]] = None,
    ops: Sequence[str] = ("current", "begin_end"),
    *,
    repeats: int = 15,
    batch: int = BATCH,
    calls: int = 5,
) -> Dict[Tuple[str, str], List[float]]:
    """Nanoseconds per operation, ``repeats`` samples per (subject, op), interleaved in a rotating order.

    Each sample is the best of ``calls`` timed ``run(batch)`` calls divided by ``batch``.
    """
    subjects = list(subjects if subjects is not None else state_subjects())
    items = [(s, op) for op in ops for s in subjects]
    opened = {item: StateOp(*item).open() for item in items}
    samples: Dict[Tuple[str, str], List[float]] = {item: [] for item in items}
    perf = time.perf_counter_ns
    try:
        for item in items:  # warm-up
            opened[item].run(batch)
        for r in range(repeats):
            shift = r % len(items)
            for item in items[shift:] + items[:shift]:
                run = opened[item].run
                best = math.inf
                for _ in range(calls):
                    t0 = perf()
                    run(batch)
                    best = min(best, perf() - t0)
                samples[item].append(best / batch)
    finally:
        for op in opened.values():
            op.close()
    return samples


def retained_after(name: str, invocations: int = 100_000, warmup: int = 1_000) -> Dict[str, Any]:
    """Bytes still allocated (``tracemalloc``) after ``invocations`` begin/end pairs on one store, and ``live()``."""
    import tracemalloc

    import statebackends

    store = statebackends.get_store(name, dict)
    owner = _Owner()
    for _ in range(warmup):
        store.end(store.begin(owner))
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(invocations):
            store.end(store.begin(owner))
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"retained": after - before, "peak": peak - before, "live": store.live(), "invocations": invocations}


# ---------------------------------------------------------------------------------------------
# Full agent calls
# ---------------------------------------------------------------------------------------------


def _closed_loopback_url() -> str:
    """A loopback URL nothing listens on: Hermes's construction probes are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _counting_processor_class() -> type:
    from opentelemetry.sdk.trace import SpanProcessor

    class CountingSpanProcessor(SpanProcessor):
        """Counts ended spans and keeps nothing: memory stays flat whatever the number of calls."""

        def __init__(self) -> None:
            self.ended = 0
            self._lock = threading.Lock()

        def on_end(self, span: Any) -> None:
            with self._lock:
                self.ended += 1

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    return CountingSpanProcessor


@dataclass
class _SpanNode:
    name: str
    kind: Any
    attributes: Dict[str, Any]
    children: List["_SpanNode"] = field(default_factory=list)


class AgentBench:
    """A real ``AIAgent`` built once, its LLM faked in process, and every mode one ``set_mode`` away.

    Building costs about 1.5 s and the first conversation about 1 s (lazy imports);
    the constructor does both, plus one warm-up call in every mode.
    """

    def __init__(self, directives: str = TOOL_DIRECTIVES, *, warm: bool | Sequence[str] = True) -> None:
        from statebackends_hermes_testbed.driver import ensure_hermes_home

        ensure_hermes_home()
        from opentelemetry.sdk.trace import TracerProvider

        from statebackends_hermes_agent import HermesAgentInstrumentor

        from statebackends_hermes_testbed.hermes_harness import InProcessLLM, clear_tool_log, make_agent

        self._clear_tool_log = clear_tool_log
        self.directives = directives
        self.llm = InProcessLLM()
        # Hermes keeps ONE iteration budget per instance (replaced at every turn's start and
        # consumed by every overlapping turn): 64 overlapping calls of 2 LLM rounds exhaust the
        # default 90 and take another code path. A large cap keeps every call on the same path.
        self.agent = self.llm.install(make_agent(_closed_loopback_url(), max_iterations=MAX_ITERATIONS))
        self.counter = _counting_processor_class()()
        self.provider = TracerProvider()
        self.provider.add_span_processor(self.counter)
        self.ours = HermesAgentInstrumentor()
        self.theirs = None
        if loongsuite_available():
            from opentelemetry.statebackends_hermes_agent import HermesAgentInstrumentor as Loongsuite

            self.theirs = Loongsuite()
        self.mode = NONE
        self._release()
        self._plan: Optional[List[_SpanNode]] = None
        self._plan_spans = 0
        if warm:
            self.warm_up(None if warm is True else list(warm))

    # -- modes -----------------------------------------------------------------------------

    def modes(self, include_loongsuite: bool = True) -> List[str]:
        """``none``, every backend, and ``loongsuite`` when installed."""
        modes = [NONE] + backend_names()
        if include_loongsuite and self.theirs is not None:
            modes.append(LOONGSUITE)
        return modes

    def _release(self) -> None:
        for instrumentor in (self.ours, self.theirs):
            if instrumentor is not None and instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.uninstrument()

    def set_mode(self, mode: str, provider: Any = None) -> None:
        """Uninstrument everything, then instrument for ``mode`` with ``provider`` (default: the counting one)."""
        provider = provider if provider is not None else self.provider
        self._release()
        self.mode = NONE
        if mode == NONE:
            pass
        elif mode == LOONGSUITE:
            if self.theirs is None:
                raise RuntimeError(loongsuite_skip_reason())
            self.theirs.instrument(tracer_provider=provider)
        else:
            self.ours.instrument(tracer_provider=provider, state_backend=mode)
        self.mode = mode

    def close(self) -> None:
        self._release()
        self.mode = NONE
        if getattr(self, "_frozen", False):
            gc.unfreeze()
            self._frozen = False

    @property
    def store(self) -> Any:
        return self.ours.store if self.mode not in (NONE, LOONGSUITE) else None

    # -- calls -------------------------------------------------------------------------------

    def message(self, tag: str) -> str:
        return f"[conv:{tag}] {self.directives} hello"

    def call(self, tag: str = "b") -> Dict[str, Any]:
        """One ``run_conversation``."""
        return self.agent.run_conversation(self.message(tag))

    @staticmethod
    def completed(result: Any, tag: str = "b") -> bool:
        return isinstance(result, dict) and result.get("final_response") == f"done {tag}"

    def reset(self) -> None:
        """Forget what the fake LLM and the bench tool recorded (they grow with every call)."""
        self.llm.reset()
        self._clear_tool_log()

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
        call = fn or self.call
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        elapsed = time.perf_counter() - t0
        self.reset()
        return elapsed / calls

    def spans_ended(self) -> int:
        return self.counter.ended

    # -- concurrency --------------------------------------------------------------------------

    def threads(self, n: int, total: int = TOTAL_CALLS) -> float:
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

    def asyncio_tasks(self, n: int, total: int = TOTAL_CALLS) -> float:
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

    # -- the floor: bare SDK spans with the same names, kinds and attributes ------------------------------

    def record_plan(self, mode: Optional[str] = None) -> int:
        """Record the span tree of one call in ``mode`` (default: the first backend) to replay as the floor."""
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        mode = mode or backend_names()[0]
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        previous = self.mode
        self.set_mode(mode, provider)
        try:
            self.call("plan")
        finally:
            self.set_mode(previous)
            self.reset()
        spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
        nodes = {s.context.span_id: _SpanNode(s.name, s.kind, dict(s.attributes or {})) for s in spans}
        roots: List[_SpanNode] = []
        for s in spans:
            parent = s.parent.span_id if s.parent is not None else None
            (nodes[parent].children if parent in nodes else roots).append(nodes[s.context.span_id])
        self._plan, self._plan_spans = roots, len(spans)
        return len(spans)

    @property
    def plan_spans(self) -> int:
        return self._plan_spans

    def floor_call(self) -> None:
        """Start and end, with the counting provider, the same span tree one instrumented call makes."""
        from opentelemetry import trace

        if self._plan is None:
            self.record_plan()
        tracer = self.provider.get_tracer("benchmarks.floor")
        set_in = trace.set_span_in_context

        def replay(node: _SpanNode, ctx: Any) -> None:
            span = tracer.start_span(node.name, context=ctx, kind=node.kind, attributes=node.attributes)
            if node.children:
                inner = set_in(span, ctx)
                for child in node.children:
                    replay(child, inner)
            span.end()

        for root in self._plan or ():
            replay(root, None)

    def floor_block(self, calls: int) -> float:
        """Seconds per replayed call."""
        floor_call = self.floor_call
        t0 = time.perf_counter()
        for _ in range(calls):
            floor_call()
        return (time.perf_counter() - t0) / calls


# ---------------------------------------------------------------------------------------------
# Our wrappers alone: the call sequence of one ``[tools:1]`` run_conversation on a stub
# ---------------------------------------------------------------------------------------------


_STUB_TARGETS = (
    ("run_agent", "AIAgent", "run_conversation"),
    ("run_agent", "AIAgent", "_interruptible_api_call"),
    ("run_agent", "AIAgent", "_execute_tool_calls"),
    ("run_agent", None, "handle_function_call"),
)
"""What one sequential ``[tools:1]`` conversation calls, in this order of nesting."""


def _installed_wrappers() -> Dict[str, Any]:
    """The wrapper callables the active instrumentor installed on :data:`_STUB_TARGETS` (``{}`` when none)."""
    import importlib

    found: Dict[str, Any] = {}
    for module, cls, name in _STUB_TARGETS:
        owner: Any = importlib.import_module(module)
        if cls is not None:
            owner = getattr(owner, cls)
        attribute = owner.__dict__.get(name) if cls is not None else getattr(owner, name)
        wrapper = getattr(attribute, "_self_wrapper", None)
        if wrapper is not None:
            found[name] = wrapper
    return found


class WrapperReplay:
    """An instrumentation's own cost per call, without Hermes's 8 ms of noisy work around it.

    Built while ``mode`` is instrumented on ``bench``: takes the very wrapper callables the
    instrumentor installed on ``AIAgent.run_conversation``, ``_interruptible_api_call``,
    ``_execute_tool_calls`` and ``run_agent.handle_function_call`` (ours or loongsuite's),
    and wraps them with ``wrapt.FunctionWrapper`` around a stub that calls them in the
    order of one ``[tools:1]`` conversation (LLM asks for a tool, the tool, final LLM
    answer) with the real ``ChatCompletion`` objects of the in-process fake LLM. Any
    other attribute the wrappers read on the instance (model, provider, session id,
    platform...) comes from the real agent. ``call()`` is the instrumented stub,
    ``bare_call()`` the same stub unwrapped; ``spans_per_call`` is checked against the
    real call's count by the callers.
    """

    def __init__(self, bench: "AgentBench", mode: str, responses: Optional[Sequence[Any]] = None) -> None:
        import wrapt

        first, final = responses if responses is not None else replay_responses(bench)
        previous = bench.mode
        bench.set_mode(mode)
        try:
            installed = _installed_wrappers()
            self.store = bench.store
        finally:
            bench.set_mode(previous)
        missing = [name for _, _, name in _STUB_TARGETS if name not in installed]
        if missing:
            raise RuntimeError(f"{mode}: no wrapper installed on {missing}")
        self.mode = mode
        real = bench.agent

        def handle_function_call(function_name: str, function_args: dict, task_id: Any = None,
                                 tool_call_id: Any = None, **kwargs: Any) -> str:
            return str(function_args.get("text", ""))

        def make(wrapped: bool) -> Any:
            hfc = wrapt.FunctionWrapper(handle_function_call, installed["handle_function_call"]) if wrapped \
                else handle_function_call

            class StubAgent:
                def __getattr__(self, name: str) -> Any:  # whatever else a wrapper reads: the real agent's
                    return getattr(real, name)

                def run_conversation(self, user_message: str, system_message: Any = None,
                                     conversation_history: Any = None, task_id: Any = None,
                                     **kwargs: Any) -> Dict[str, Any]:
                    task_id = task_id or "stub-task"
                    messages: List[Any] = [{"role": "user", "content": user_message}]
                    response = self._interruptible_api_call({"model": real.model, "messages": messages})
                    message = response.choices[0].message
                    messages.append({"role": "assistant", "content": None, "tool_calls": message.tool_calls})
                    self._execute_tool_calls(message, messages, task_id, 1)
                    response = self._interruptible_api_call({"model": real.model, "messages": messages})
                    return {"final_response": response.choices[0].message.content, "completed": True,
                            "messages": messages, "api_calls": 2}

                def _interruptible_api_call(self, api_kwargs: dict) -> Any:
                    return final if len(api_kwargs["messages"]) > 1 else first

                def _execute_tool_calls(self, assistant_message: Any, messages: list, effective_task_id: str,
                                        api_call_count: int = 0) -> None:
                    for tool_call in assistant_message.tool_calls:
                        result = hfc(tool_call.function.name, {"text": "x"}, effective_task_id,
                                     tool_call_id=tool_call.id, session_id=real.session_id)
                        messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": result})

            if wrapped:
                for _, _, name in _STUB_TARGETS[:3]:
                    setattr(StubAgent, name, wrapt.FunctionWrapper(StubAgent.__dict__[name], installed[name]))
            return StubAgent()

        self._instrumented = make(True)
        self._bare = make(False)
        self.message = bench.message("stub")

    def call(self) -> Dict[str, Any]:
        return self._instrumented.run_conversation(self.message)

    def bare_call(self) -> Dict[str, Any]:
        return self._bare.run_conversation(self.message)

    @staticmethod
    def timed_block(fn: Callable[[], Any], calls: int) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls


def replay_responses(bench: "AgentBench") -> Tuple[Any, Any]:
    """The two real ``ChatCompletion`` objects of a ``[tools:1]`` conversation, from the in-process fake LLM."""
    user = {"role": "user", "content": bench.message("stub")}
    first = bench.llm.create(model="fake-model", messages=[user])
    call = first.choices[0].message.tool_calls[0]
    final = bench.llm.create(model="fake-model", messages=[
        user,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "x"},
    ])
    bench.reset()
    return first, final


def isolated_overhead(
    bench: "AgentBench",
    modes: Optional[Sequence[str]] = None,
    *,
    repeats: int = 20,
    calls: int = 200,
) -> Dict[str, Any]:
    """Seconds per call of each instrumentation's wrappers alone (instrumented stub minus bare stub, paired), and the floor.

    ``modes`` default: every backend, and ``loongsuite`` when installed. Returns
    ``{mode: [seconds per call, one per repeat], "floor": [...], "spans": {mode: spans per stub call}}``;
    spans go to the same counting provider as the full calls.
    """
    modes = list(modes if modes is not None else [m for m in bench.modes() if m != NONE])
    responses = replay_responses(bench)
    replays = {m: WrapperReplay(bench, m, responses) for m in modes}
    if bench.plan_spans == 0:
        bench.record_plan()
    out: Dict[str, Any] = {m: [] for m in modes}
    out[FLOOR] = []
    spans: Dict[str, float] = {}
    for mode, replay in replays.items():  # warm-up, and the spans one stub call makes
        for _ in range(20):
            replay.call()
            replay.bare_call()
        ended = bench.spans_ended()
        replay.call()
        spans[mode] = bench.spans_ended() - ended
    items = modes + [FLOOR]
    for r in range(repeats):
        shift = r % len(items)
        for item in items[shift:] + items[:shift]:
            if item == FLOOR:
                out[FLOOR].append(WrapperReplay.timed_block(bench.floor_call, calls))
            else:
                replay = replays[item]
                bare = WrapperReplay.timed_block(replay.bare_call, calls)
                out[item].append(WrapperReplay.timed_block(replay.call, calls) - bare)
    out["spans"] = spans
    return out


# ---------------------------------------------------------------------------------------------
# Paired, interleaved overhead
# ---------------------------------------------------------------------------------------------


def bootstrap_ci(
    samples: Sequence[Sequence[float]] | Sequence[float],
    statistic: Callable[..., float],
    *,
    level: float = 0.95,
    resamples: int = 4000,
    seed: int = 12345,
) -> Tuple[float, float, float]:
    """``(estimate, low, high)``: percentile bootstrap over repeat indices.

    ``samples`` is one sequence, or several aligned ones (paired: resampled with the
    same indices); ``statistic`` takes as many sequences and returns a float.
    :func:`mean` and :func:`ratio_of_means` are vectorised with numpy when it is installed.
    """
    columns: List[List[float]]
    if samples and isinstance(samples[0], (list, tuple)):
        columns = [list(c) for c in samples]  # type: ignore[arg-type]
    else:
        columns = [list(samples)]  # type: ignore[arg-type]
    n = len(columns[0])
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    try:
        estimate = statistic(*columns)
    except ZeroDivisionError:
        estimate = float("nan")
    if n < 2:
        return estimate, float("nan"), float("nan")
    values: List[float]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with matplotlib in the bench extra
        np = None  # type: ignore[assignment]
    vectorised = (mean, ratio_of_means, trimmed_mean, ratio_of_trimmed_means)
    if np is not None and statistic in vectorised:
        idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        k = int(n * TRIM) if statistic in (trimmed_mean, ratio_of_trimmed_means) else 0
        if n - 2 * k <= 0:
            k = 0

        def row_stat(column: List[float]) -> Any:
            rows = np.asarray(column, dtype=float)[idx]
            if k:
                rows = np.sort(rows, axis=1)[:, k:n - k]
            return rows.mean(axis=1)

        arrays = [row_stat(c) for c in columns]
        with np.errstate(divide="ignore", invalid="ignore"):
            stats = arrays[0] if len(arrays) == 1 else arrays[0] / arrays[1]
        values = sorted(float(v) for v in stats if np.isfinite(v))
    else:
        rng = random.Random(seed)
        values = []
        for _ in range(resamples):
            idx_list = [rng.randrange(n) for _ in range(n)]
            try:
                values.append(statistic(*[[c[i] for i in idx_list] for c in columns]))
            except ZeroDivisionError:
                continue
        values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return estimate, float("nan"), float("nan")
    lo = values[int((1 - level) / 2 * (len(values) - 1))]
    hi = values[int((1 + level) / 2 * (len(values) - 1))]
    return estimate, lo, hi


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def ratio_of_means(a: Sequence[float], b: Sequence[float]) -> float:
    return mean(a) / mean(b)


TRIM = 0.2
"""Proportion cut from EACH end by :func:`trimmed_mean`."""


def trimmed_mean(xs: Sequence[float], proportion: float = TRIM) -> float:
    """Mean of the middle values: drops ``proportion`` of the values from each end (none when too few).

    Paired differences ``mode - none`` are noise ``e1 - e2`` (symmetric when both calls
    share the machine's noise) plus the overhead, so the trimmed mean estimates the
    overhead without letting one 100 ms stall of the shared machine decide it.
    """
    ordered = sorted(xs)
    k = int(len(ordered) * proportion)
    middle = ordered[k:len(ordered) - k] or ordered
    return sum(middle) / len(middle)


def ratio_of_trimmed_means(a: Sequence[float], b: Sequence[float]) -> float:
    return trimmed_mean(a) / trimmed_mean(b)


@dataclass
class PairedResult:
    """Seconds per call per mode (one value per repeat, aligned), spans per call, and the floors.

    ``floor`` is the hot-loop floor (the span tree of one call replayed with the bare SDK,
    timed in a tight loop); ``per_call[FLOOR_IN_SITU]`` is an uninstrumented call followed
    by one replay, so ``overhead(FLOOR_IN_SITU)`` is the floor paid among Hermes's own work
    (cold caches included), measured exactly like an instrumentation's overhead.
    """

    per_call: Dict[str, List[float]]
    spans_per_call: Dict[str, float]
    floor: List[float]
    floor_spans: int
    repeats: int
    calls: int

    def overhead(self, mode: str) -> List[float]:
        """Paired overhead (seconds per call) of ``mode`` in every repeat."""
        return [t - b for t, b in zip(self.per_call[mode], self.per_call[NONE])]

    def overhead_ci(self, mode: str) -> Tuple[float, float, float]:
        """Trimmed mean (:func:`trimmed_mean`) of the paired overheads, with its 95% bootstrap interval."""
        return bootstrap_ci(self.overhead(mode), trimmed_mean)

    def ratio_ci(self, mode: str, other: str) -> Tuple[float, float, float]:
        """Overhead of ``mode`` / overhead of ``other`` (ratio of trimmed means, resampled with the same repeats)."""
        return bootstrap_ci([self.overhead(mode), self.overhead(other)], ratio_of_trimmed_means)

    def floor_ratio_ci(self, mode: str) -> Tuple[float, float, float]:
        """Overhead of ``mode`` / the hot-loop floor, resampled together."""
        return bootstrap_ci([self.overhead(mode), self.floor], ratio_of_trimmed_means)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "per_call": self.per_call,
            "spans_per_call": self.spans_per_call,
            "floor": self.floor,
            "floor_spans": self.floor_spans,
            "repeats": self.repeats,
            "calls": self.calls,
        }


FLOOR_IN_SITU = "floor_in_situ"


def paired_overhead(
    bench: AgentBench,
    modes: Optional[Sequence[str]] = None,
    *,
    repeats: int = 150,
    calls: int = 2,
    floor_calls: int = 20,
    in_situ_floor: bool = True,
    progress: Optional[Callable[[str], None]] = None,
) -> PairedResult:
    """Every repeat: for every mode, in a rotating order, instrument, make one untimed call, time ``calls`` calls.

    Short blocks (the default 2 calls) pair each mode with ``none`` within a fraction of a
    second: on a shared machine call times drift by tens of percent over seconds, and
    pairing close in time is what shrinks the interval. The hot-loop floor is timed in
    every repeat too (``floor_calls`` replays).
    """
    modes = list(modes if modes is not None else bench.modes())
    if NONE not in modes:
        modes.insert(0, NONE)
    if bench.plan_spans == 0:
        bench.record_plan()
    order = modes + ([FLOOR_IN_SITU] if in_situ_floor else []) + [FLOOR]
    per_call: Dict[str, List[float]] = {m: [] for m in order if m != FLOOR}
    spans: Dict[str, List[float]] = {m: [] for m in modes}
    floor: List[float] = []
    call, floor_call = bench.call, bench.floor_call

    def call_and_floor() -> None:
        call()
        floor_call()

    every = max(1, repeats // 10)
    try:
        for r in range(repeats):
            shift = r % len(order)
            for mode in order[shift:] + order[:shift]:
                if mode == FLOOR:
                    bench.set_mode(NONE)
                    floor.append(bench.floor_block(floor_calls))
                    continue
                bench.set_mode(NONE if mode == FLOOR_IN_SITU else mode)
                call("warm")  # the first call after instrumenting is not timed
                ended = bench.spans_ended()
                per_call[mode].append(bench.block(calls, call_and_floor if mode == FLOOR_IN_SITU else None))
                if mode in spans:
                    spans[mode].append((bench.spans_ended() - ended) / calls)
            if progress is not None and ((r + 1) % every == 0 or r + 1 == repeats):
                progress(f"paired overhead: repeat {r + 1}/{repeats}")
    finally:
        bench.set_mode(NONE)
        bench.reset()
    return PairedResult(
        per_call=per_call,
        spans_per_call={m: mean(v) for m, v in spans.items()},
        floor=floor,
        floor_spans=bench.plan_spans,
        repeats=repeats,
        calls=calls,
    )


def per_call_vs_n(
    bench: AgentBench,
    modes: Optional[Sequence[str]] = None,
    ns: Sequence[int] = CONCURRENCY,
    *,
    total: int = TOTAL_CALLS,
    repeats: int = 3,
    driver: str = "threads",
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Dict[int, List[float]]]:
    """Seconds per call with ``n`` overlapping callers on the shared agent, per mode, interleaved and rotated."""
    modes = list(modes if modes is not None else bench.modes())
    run = bench.threads if driver == "threads" else bench.asyncio_tasks
    out: Dict[str, Dict[int, List[float]]] = {m: {n: [] for n in ns} for m in modes}
    try:
        for r in range(repeats):
            for n in ns:
                shift = (r + n) % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    bench.set_mode(mode)
                    bench.call("warm")
                    out[mode][n].append(run(n, total))
            if progress is not None:
                progress(f"per call vs N ({driver}): repeat {r + 1}/{repeats}")
    finally:
        bench.set_mode(NONE)
        bench.reset()
    return out


# ---------------------------------------------------------------------------------------------
# Correctness under concurrent load
# ---------------------------------------------------------------------------------------------


def correctness(bench: AgentBench, mode: str, n: int = 16) -> Dict[str, Any]:
    """``n`` overlapping calls on the shared agent, judged with :func:`statebackends_hermes_testbed.traces.judge`.

    Returns ``correct`` (calls whose own tree is complete and right), the aggregate
    ``orphans``, ``cross_talk``, ``never_ended`` and ``state_left``, and ``summary``.
    """
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from statebackends_hermes_testbed.driver import run_threads
    from statebackends_hermes_testbed.traces import CALLER_PREFIX, CallTruth, OpenSpanTracker, judge

    exporter = InMemorySpanExporter()
    tracker = OpenSpanTracker()
    provider = TracerProvider()
    provider.add_span_processor(tracker)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("benchmarks.overhead.caller")
    bench.set_mode(mode, provider)
    try:
        store = bench.store
        live_before = (store.live() or 0) if store is not None else 0
        bench.reset()
        tags = [f"k{i}" for i in range(n)]

        def one(i: int) -> Any:
            with tracer.start_as_current_span(CALLER_PREFIX + tags[i]):
                return bench.call(tags[i])

        results = run_threads(one, n)
        provider.force_flush()
        left = 0
        if store is not None:
            if store.current(bench.agent) is not None:
                left += 1
            live = store.live()
            if live is not None and live > live_before:
                left += live - live_before
        truths = []
        for tag in tags:
            chats = len(bench.llm.log(tag)) + bench.llm.errors(tag)
            tokens_in, tokens_out = bench.llm.totals(tag)
            truths.append(CallTruth(tag=tag, steps=chats, chats=chats, tools=1,
                                    input_tokens=tokens_in, output_tokens=tokens_out))
        spans = exporter.get_finished_spans()
        verdict = judge(spans, truths, tracker.open_spans(), state_left=left)
        by_id = {s.context.span_id: s for s in spans}

        def root_tag(span: Any) -> Optional[str]:
            current, hops = span, 0
            while current is not None and hops < 64:
                if current.name.startswith(CALLER_PREFIX):
                    return current.name[len(CALLER_PREFIX):]
                current = by_id.get(current.parent.span_id) if current.parent is not None else None
                hops += 1
            return None

        groups: Dict[str, List[Any]] = {tag: [] for tag in tags}
        for span in spans:
            tag = root_tag(span)
            if tag in groups:
                groups[tag].append(span)
        correct = sum(
            1
            for tag, truth, result in zip(tags, truths, results)
            if bench.completed(result, tag) and judge(groups[tag], [truth]).ok
        )
    finally:
        bench.set_mode(NONE)
        bench.reset()
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


# ---------------------------------------------------------------------------------------------
# Stamp
# ---------------------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info() -> Dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "versions": {
            dist: _version(dist)
            for dist in (
                "hermes-agent",
                "opentelemetry-api",
                "opentelemetry-sdk",
                "opentelemetry-instrumentation",
                "wrapt",
                LOONGSUITE_DIST,
            )
        },
    }


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))
