"""The scenarios of the correctness matrix: every backend x every way Hermes (or an async agent) runs calls.

Each :class:`Scenario` drives the REAL instrumentation (the real ``AIAgent`` of
hermes-agent on the fake LLM, or :class:`statebackends_hermes_testbed.stub_agent.AsyncStubAgent`
through the instrumentor's live wrappers) under ONE backend and returns the
:class:`statebackends_hermes_testbed.traces.Verdict` of what it exported. ``requires`` is the
isolation a backend must DECLARE (``type(store).isolates``) for the cell to be
expected ok, so the expected outcome of every cell is derived from the
backends' declarations (:func:`expected_ok`), never written by hand.

Every cell instruments a fresh store (``bench.instrument(backend)``) and
starts from ``bench.reset()``, so an earlier cell's leftovers cannot leak into
the next. Hermes's agents are built once per bench and reused (building one
costs about 1.5 s); all of them are NON-streaming, because streaming calls
on one shared ``AIAgent`` instance interfere inside Hermes itself, whatever
the instrumentation does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import gc
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from opentelemetry import trace
from opentelemetry.sdk.trace import Span, TracerProvider

from statebackends import Concurrency, get_store

from .driver import HermesBench, run_threads
from .hermes_harness import (
    BENCH_TOOLSET,
    InProcessLLM,
    make_agent,
    register_bench_tools,
    register_tool,
    wait_for_delegations,
)
from .stub_agent import AsyncStubAgent
from .traces import CALLER_PREFIX, LATE_TOOL, CallTruth, StreamingJudge, Verdict, kind_of, state_left

C = Concurrency

SOAK_SEQUENTIAL = 1000
"""Soak: calls one after another (InProcessLLM, about 5-6 ms each with Hermes)."""
SOAK_THREADS = 8
SOAK_PER_THREAD = 100
"""Soak: then SOAK_THREADS threads x SOAK_PER_THREAD calls, overlapping. About 10-12 s per backend in all."""
SOAK_WARMUP = 100
SOAK_MEMORY_BOUND_KIB = 48 * 1024
"""Generous: RSS after the soak may exceed RSS after the warm-up by this much before the cell fails."""

MATRIX_TOOLSET = "sb_matrix"
NESTED_TOOL = "sb_nested"
LATE_LAUNCHER = "sb_late"
"""Matrix tool that starts a job (through a context copy) which runs only after the turn has returned."""

SESSION_ID = "session-42"
"""The task id every turn of one session carries (Hermes's CLI and ACP adapter pass the session id)."""
SHARED_ID_ROUNDS = 2
"""Two-agent shared-id scenarios: rounds of two overlapping turns, one per agent."""
LATE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Scenario:
    """One row of the matrix."""

    id: str
    title: str
    requires: frozenset[Concurrency]
    run: Callable[[HermesBench, str], Verdict] = field(repr=False, compare=False)
    doc: str = ""
    native: bool = False
    """Needs our own hooks or store (the stub agents, store probes): ``n/a`` for a foreign instrumentation."""
    also_ok: frozenset[str] = frozenset()
    """Backends expected ok although their declarations do not cover ``requires`` (see ``THREADING_VARIANTS``)."""


# -- expectations from the declarations ------------------------------------------------------------


def isolates_of(backend: str) -> frozenset[Concurrency]:
    """What the backend DECLARES it isolates (``type(store).isolates`` of a store built by name)."""
    store = get_store(backend, object)
    return frozenset(getattr(type(store), "isolates", frozenset()))


def expected_ok(scenario: Scenario, backend: str) -> bool:
    """A cell is expected ok exactly when the backend declares all that the scenario requires (or the scenario's
    data names the backend in ``also_ok``)."""
    return scenario.requires <= isolates_of(backend) or backend in scenario.also_ok


# -- agents, built once per bench ---------------------------------------------------------------------

_nested = threading.local()  # .child: the agent sb_nested runs inline


def _sb_nested(args: dict[str, Any], **_: Any) -> str:
    """Run another real agent INSIDE this tool, on this thread: ``[conv:<parent tag>-kid]``."""
    child = getattr(_nested, "child", None)
    if child is None:
        raise RuntimeError("sb_nested: no child agent set for this thread")
    text = str(args.get("text", ""))
    parent_tag = text.rpartition("-")[0] or text
    result = child.run_conversation(f"[conv:{parent_tag}-kid] hello")
    return str((result or {}).get("final_response") or "")


class _LateJobs:
    """The jobs ``sb_late`` started: each waits for :meth:`release`, then calls the wrapped ``handle_function_call``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gate = threading.Event()
        self.threads: list[threading.Thread] = []
        self.seen: list[str] = []
        """What a job found that it should not have (state of the ended call, an error)."""
        self.store: Any = None
        self.owner: Any = None

    def reset(self, store: Any, owner: Any) -> None:
        """Forget earlier jobs; later ones probe ``store`` for ``owner``'s state."""
        with self._lock:
            self.gate = threading.Event()
            self.threads, self.seen, self.store, self.owner = [], [], store, owner

    def start(self, text: str, task_id: Any) -> None:
        """Start one job in a copy of the calling tool's context (Hermes's background work does the same)."""
        ctx = contextvars.copy_context()
        gate, store, owner = self.gate, self.store, self.owner

        def job() -> None:
            if not gate.wait(LATE_TIMEOUT):
                self._saw(f"{text}: never released")
                return
            if store is not None and store.current(owner, task_id) is not None:
                self._saw(f"{text}: current() returned the ended call's state")
            try:
                import run_agent  # the module attribute the instrumentation wraps, looked up now

                run_agent.handle_function_call(LATE_TOOL, {"text": f"{text}-job"}, task_id)
            except Exception as exc:  # noqa: BLE001 - reported in the verdict
                self._saw(f"{text}: late handle_function_call raised {exc!r}")

        thread = threading.Thread(target=ctx.run, args=(job,), name="matrix-late", daemon=True)
        with self._lock:
            self.threads.append(thread)
        thread.start()

    def _saw(self, note: str) -> None:
        with self._lock:
            self.seen.append(note)

    def release(self) -> list[str]:
        """Let every job run, wait for them, and return what they saw."""
        self.gate.set()
        for thread in list(self.threads):
            thread.join(LATE_TIMEOUT)
            if thread.is_alive():
                self._saw("a late job did not finish")
        return list(self.seen)


_late = _LateJobs()


def _sb_late(args: dict[str, Any], **kwargs: Any) -> str:
    """Start a job that outlives this call (see :class:`_LateJobs`) and return at once."""
    text = str(args.get("text", ""))
    _late.start(text, kwargs.get("task_id"))
    return text


def _sb_late_job(args: dict[str, Any], **_: Any) -> str:
    return str(args.get("text", ""))


def register_matrix_tools() -> None:
    """``sb_echo``/``sb_fail`` (harness), ``sb_nested``, ``sb_late`` and ``sb_late_job`` in toolset ``sb_matrix``."""
    register_bench_tools()
    register_tool(NESTED_TOOL, MATRIX_TOOLSET, _sb_nested, "Matrix tool: runs another agent inline and returns its answer.")
    register_tool(LATE_LAUNCHER, MATRIX_TOOLSET, _sb_late, "Matrix tool: starts a job that runs after the call has returned.")
    register_tool(LATE_TOOL, MATRIX_TOOLSET, _sb_late_job, "Matrix tool: the job sb_late started.")


class _Agents:
    def __init__(self, bench: HermesBench) -> None:
        register_matrix_tools()  # before building: Hermes fixes an agent's tool names at construction
        self._url = bench.server.base_url
        self.main = self._build()
        self.delegating = bench.agent(delegation=True)
        self._twin: Any = None
        self._streamers: tuple[Any, ...] = ()

    def _build(self) -> Any:
        # Built with the session id its shared-id turns pass as task_id, as Hermes's CLI, ACP adapter and API server
        # build theirs (AIAgent(session_id=S) ... run_conversation(task_id=S)): hooks then see one id for both.
        return make_agent(self._url, toolsets=(BENCH_TOOLSET, MATRIX_TOOLSET), session_id=SESSION_ID)

    @property
    def twin(self) -> Any:
        """A second agent like ``main``, built on first use (one agent per turn of a session)."""
        if self._twin is None:
            self._twin = self._build()
        return self._twin

    @property
    def streamers(self) -> tuple[Any, ...]:
        """Two streaming agents (Hermes's default), built on first use: one open turn each at a time."""
        if not self._streamers:
            self._streamers = tuple(
                make_agent(self._url, streaming=True, toolsets=(BENCH_TOOLSET, MATRIX_TOOLSET)) for _ in range(2)
            )
        return self._streamers


_agents: "weakref.WeakKeyDictionary[HermesBench, _Agents]" = weakref.WeakKeyDictionary()
_agents_lock = threading.Lock()


def agents(bench: HermesBench) -> _Agents:
    """The matrix's agents on ``bench``'s server: ``main`` (sb_echo, sb_fail, sb_nested) and ``delegating``."""
    with _agents_lock:
        if bench not in _agents:
            _agents[bench] = _Agents(bench)
        return _agents[bench]


def _truth(bench: HermesBench, tag: str, *, errors: Optional[dict[str, int]] = None, **kwargs: Any) -> CallTruth:
    """``bench.truth`` plus the error-status spans expected per kind (``CallTruth.errors``)."""
    return dataclasses.replace(bench.truth(tag, **kwargs), errors=errors)


def _explain(bench: HermesBench, verdict: Verdict) -> Verdict:
    """When span counts are off, note the error-status spans (a retried request explains an extra chat span)."""
    if verdict.expected != verdict.actual:
        for span in bench.exporter.get_finished_spans():
            if kind_of(span) is not None and span.status.status_code.name == "ERROR":
                verdict.notes.append(f"{span.name}: {(span.status.description or '')[:160]}")
    return verdict


def _found(verdict: Verdict, findings: list[str], count: str = "state_left") -> Verdict:
    """Add what a scenario's own probes found to ``verdict``: noted, and counted in the field ``count``."""
    verdict.notes.extend(findings)
    setattr(verdict, count, getattr(verdict, count) + len(findings))
    return verdict


def _begin(bench: HermesBench, backend: str) -> Any:
    store = bench.instrument(backend)
    bench.reset()
    return store


# -- 1. control ------------------------------------------------------------------------------------------------


def run_sequential(bench: HermesBench, backend: str) -> Verdict:
    """Calls one after another on one agent, one tool each (Hermes runs a single tool inline): the control."""
    _begin(bench, backend)
    agent = agents(bench).main
    tags = [f"seq{i}" for i in range(3)]
    for tag in tags:
        bench.call(agent, tag, "[tools:1]")
    return _explain(bench, bench.verdict([bench.truth(t, tools=1) for t in tags], owners=[agent]))


# -- 2-4. threads --------------------------------------------------------------------------------------------


def _threads(
    bench: HermesBench,
    backend: str,
    directives: str,
    tools: int,
    prefix: str,
    *,
    task_id: Optional[str] = None,
    owners: Optional[list[Any]] = None,
    rounds: int = 1,
) -> Verdict:
    """Overlapping turns in threads (barrier): ``bench.callers`` on ``main``, or one per agent of ``owners`` in each round."""
    _begin(bench, backend)
    owners = owners or [agents(bench).main]
    n = bench.callers if len(owners) == 1 else len(owners)
    tags: list[str] = []
    for r in range(rounds):
        batch = [f"{prefix}{r * n + i}" for i in range(n)]
        tags += batch
        run_threads(lambda i: bench.call(owners[i % len(owners)], batch[i], directives, task_id=task_id), n)
    return _explain(bench, bench.verdict([bench.truth(t, tools=tools) for t in tags], owners=owners))


def run_threads_plain(bench: HermesBench, backend: str) -> Verdict:
    """N threads (barrier) on one shared agent, ``[tools:1] [delay_ms:20]``: one tool per call runs inline, so only threads are tested."""
    return _threads(bench, backend, "[tools:1] [delay_ms:20]", 1, "th")


def run_threads_tool_pool(bench: HermesBench, backend: str) -> Verdict:
    """N threads (barrier) on one shared agent, ``[tools:2] [delay_ms:20]``: each call's two tools ALSO go through Hermes's concurrent tool pool (a context-copying hop)."""
    return _threads(bench, backend, "[tools:2] [delay_ms:20]", 2, "tp")


def run_to_thread(bench: HermesBench, backend: str) -> Verdict:
    """N asyncio tasks, each driving the shared agent through ``asyncio.to_thread`` (the context is copied)."""
    _begin(bench, backend)
    agent = agents(bench).main
    tags = [f"tt{i}" for i in range(bench.callers)]

    async def main() -> None:
        await asyncio.gather(*(asyncio.to_thread(bench.call, agent, t, "[tools:1] [delay_ms:20]") for t in tags))

    asyncio.run(main())
    return _explain(bench, bench.verdict([bench.truth(t, tools=1) for t in tags], owners=[agent]))


def run_in_executor(bench: HermesBench, backend: str) -> Verdict:
    """N asyncio tasks through ``loop.run_in_executor`` on a ``ThreadPoolExecutor`` (the context is NOT copied)."""
    _begin(bench, backend)
    agent = agents(bench).main
    tags = [f"ex{i}" for i in range(bench.callers)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=bench.callers, thread_name_prefix="matrix-exec") as pool:
            await asyncio.gather(
                *(loop.run_in_executor(pool, bench.call, agent, t, "[tools:1] [delay_ms:20]") for t in tags)
            )

    asyncio.run(main())
    return _explain(bench, bench.verdict([bench.truth(t, tools=1) for t in tags], owners=[agent]))


# -- 5, 12. asyncio tasks on one loop (the stub agent through the live wrappers) ---------------


def _stub(bench: HermesBench, **kwargs: Any) -> AsyncStubAgent:
    return AsyncStubAgent(lambda: bench.instrumentor.telemetry, bench.server.script, **kwargs)


async def _stub_call(bench: HermesBench, stub: AsyncStubAgent, tag: str, directives: str) -> Any:
    with bench.tracer.start_as_current_span(f"{CALLER_PREFIX}{tag}"):
        return await stub.run_conversation(f"[conv:{tag}] {directives} hello")


def run_async_tasks(bench: HermesBench, backend: str) -> Verdict:
    """N asyncio tasks interleaved on ONE thread, one shared async stub agent; every LLM turn and tool awaits."""
    _begin(bench, backend)
    stub = _stub(bench)
    tags = [f"as{i}" for i in range(bench.callers)]

    async def main() -> None:
        await asyncio.gather(*(_stub_call(bench, stub, t, "[tools:2]") for t in tags))

    asyncio.run(main())
    return _explain(bench, bench.verdict([bench.truth(t, tools=2) for t in tags], owners=[stub]))


def run_cancel(bench: HermesBench, backend: str) -> Verdict:
    """Asyncio tasks on one loop; one is cancelled inside its tool while the others are in flight."""
    _begin(bench, backend)
    state: dict[str, Any] = {}

    async def block_tool(name: str, args: Any) -> str:
        state["inside"].set()
        await asyncio.Event().wait()  # until cancelled
        return "never"

    stub = _stub(bench, tools={"sb_block": block_tool})
    victim = "cx1"
    tags = [f"cx{i}" for i in range(max(3, bench.callers // 2))]
    notes: list[str] = []

    async def main() -> None:
        state["inside"] = asyncio.Event()
        tasks = {
            t: asyncio.create_task(
                _stub_call(bench, stub, t, "[tool:sb_block] [tools:1]" if t == victim else "[tools:2] [delay_ms:10]")
            )
            for t in tags
        }
        try:  # never hang the matrix: a victim that fails before its tool shows up as a broken cell
            await asyncio.wait_for(state["inside"].wait(), timeout=30)
        except asyncio.TimeoutError:
            notes.append("the victim never reached its tool")
        running = sum(1 for t, task in tasks.items() if t != victim and not task.done())
        if not running:
            notes.append("no other task was in flight when the victim was cancelled")
        tasks[victim].cancel()
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        if not isinstance(results[tags.index(victim)], asyncio.CancelledError):
            notes.append(f"victim ended with {results[tags.index(victim)]!r}, not CancelledError")

    asyncio.run(main())
    calls = [
        _truth(bench, t, tools=1, error=True, errors={"invoke_agent": 1, "step": 1, "execute_tool": 1})
        if t == victim
        else _truth(bench, t, tools=2, errors={})
        for t in tags
    ]
    return _found(_explain(bench, bench.verdict(calls, owners=[stub])), notes, "wrong_error")


# -- 6-7. tool pools -----------------------------------------------------------------------------------------------


def run_tool_pool(bench: HermesBench, backend: str) -> Verdict:
    """One call whose 3 tools run at once in Hermes's own concurrent tool pool (``propagate_context_to_thread``: a context copy)."""
    _begin(bench, backend)
    agent = agents(bench).main
    bench.call(agent, "pool", "[tools:3] [tool_ms:30]")
    return _explain(bench, bench.verdict([bench.truth("pool", tools=3)], owners=[agent]))


@contextlib.contextmanager
def raw_tool_pool() -> Iterator[None]:
    """Patch ``agent.tool_executor.propagate_context_to_thread`` to identity: Hermes's tool pool hops raw, nothing copied."""
    import agent.tool_executor as tool_executor

    saved = tool_executor.propagate_context_to_thread
    tool_executor.propagate_context_to_thread = lambda target: target
    try:
        yield
    finally:
        tool_executor.propagate_context_to_thread = saved


def run_raw_thread(bench: HermesBench, backend: str) -> Verdict:
    """As ``tool_pool``, with ``agent.tool_executor.propagate_context_to_thread`` patched to identity: a raw hop, nothing copied."""
    _begin(bench, backend)
    agent = agents(bench).main
    with raw_tool_pool():
        bench.call(agent, "raw", "[tools:3] [tool_ms:30]")
    return _explain(bench, bench.verdict([bench.truth("raw", tools=3)], owners=[agent]))


# -- shared task id: the turns of one session (Hermes's CLI and ACP adapter pass task_id=<session id>) -----

_SHARED = "[tools:2] [delay_ms:20] [tool_ms:10]"


def run_shared_task_id(bench: HermesBench, backend: str) -> Verdict:
    """N overlapping turns (threads, barrier) on ONE shared agent, all with ``task_id="session-42"``; two tools each
    in Hermes's concurrent pool (context copied): a double submit, a retry or two tabs on one session."""
    return _threads(bench, backend, _SHARED, 2, "sid", task_id=SESSION_ID)


def run_shared_task_id_two_agents(bench: HermesBench, backend: str) -> Verdict:
    """The same session id on two agents, one turn each, overlapping (rounds of two); two pooled tools per turn."""
    a = agents(bench)
    return _threads(bench, backend, _SHARED, 2, "sia", task_id=SESSION_ID, owners=[a.main, a.twin],
                    rounds=SHARED_ID_ROUNDS)


def run_shared_task_id_raw(bench: HermesBench, backend: str) -> Verdict:
    """As ``shared_task_id`` with Hermes's tool pool hopping raw (nothing copied): a worker knows only its agent and the
    session id, which every open turn on that agent shares."""
    with raw_tool_pool():
        return _threads(bench, backend, _SHARED, 2, "sir", task_id=SESSION_ID)


def run_shared_task_id_two_agents_raw(bench: HermesBench, backend: str) -> Verdict:
    """As ``shared_task_id_two_agents`` with the raw hop: the id is shared, but each agent has one open turn."""
    a = agents(bench)
    with raw_tool_pool():
        return _threads(bench, backend, _SHARED, 2, "sar", task_id=SESSION_ID, owners=[a.main, a.twin],
                        rounds=SHARED_ID_ROUNDS)


# -- work that outlives its call ---------------------------------------------------------------------------


def run_late_work(bench: HermesBench, backend: str) -> Verdict:
    """A tool (``sb_late``) starts a job through a context copy; the job runs only AFTER the turn has returned and calls
    the wrapped ``handle_function_call`` (as Hermes's background work would). Its span may start a trace of its own or
    hang under the tool span that started it, never in the ended call's tree; nothing of the call is found or left."""
    store = _begin(bench, backend)
    agent = agents(bench).main
    _late.reset(store, agent)
    live_before = (store.live() if store is not None else 0) or 0  # no store: a foreign instrumentation
    bench.call(agent, "late", f"[tool:{LATE_LAUNCHER}] [tools:1]", task_id=SESSION_ID)
    seen = _late.release()
    bench.call(agent, "after", "[tools:1]", task_id=SESSION_ID)  # the next turn of the session is untouched
    return _found(_explain(bench, bench.verdict(
        [bench.truth("late", tools=1, late=1), bench.truth("after", tools=1)], owners=[agent], live_before=live_before,
    )), seen)


# -- 8-9. subagents --------------------------------------------------------------------------------------------------


def run_nested(bench: HermesBench, backend: str) -> Verdict:
    """A tool (``sb_nested``) runs another real agent inline on the same thread; its invoke_agent hangs under that execute_tool."""
    _begin(bench, backend)
    a = agents(bench)
    _nested.child = a.delegating
    try:
        bench.call(a.main, "nest", f"[tool:{NESTED_TOOL}] [tools:1]")
        bench.call(a.main, "after", "[tools:1]")  # the outer state was given back: a plain call after
    finally:
        _nested.child = None
    kid = bench.truth("nest-kid", tokens=False)
    return _explain(bench, bench.verdict(
        [bench.truth("nest", tools=1, children=[kid]), bench.truth("after", tools=1)],
        owners=[a.main, a.delegating],
    ))


def run_delegate(bench: HermesBench, backend: str) -> Verdict:
    """``delegate_task`` with one goal: Hermes builds a child agent and runs it in its delegation worker thread (raw hop)."""
    _begin(bench, backend)
    agent = agents(bench).delegating
    bench.call(agent, "dlg", "[delegate:dlgkid]")
    wait_for_delegations(timeout=60)  # the child runs detached: its truth is complete only once it ended
    kid = bench.truth("dlgkid", tokens=False)
    return _explain(bench, bench.verdict([bench.truth("dlg", tools=1, children=[kid])], owners=[agent]))


def run_delegate_batch(bench: HermesBench, backend: str) -> Verdict:
    """``delegate_task`` with a batch of two goals: two children in Hermes's worker threads at once."""
    _begin(bench, backend)
    agent = agents(bench).delegating
    bench.call(agent, "dlb", "[delegate_batch:dlba,dlbb]")
    wait_for_delegations(timeout=60)
    kids = [bench.truth(k, tokens=False) for k in ("dlba", "dlbb")]
    return _explain(bench, bench.verdict([bench.truth("dlb", tools=1, children=kids)], owners=[agent]))


# -- 10. worker reuse ---------------------------------------------------------------------------------------------


def run_worker_reuse(bench: HermesBench, backend: str) -> Verdict:
    """Calls one after another on ONE reused pool worker (run_in_executor, max_workers=1); before each later call a
    probe on that worker checks that nothing of the earlier call is visible there (state, current span)."""
    store = _begin(bench, backend)
    agent = agents(bench).main
    tags = [f"wr{i}" for i in range(4)]
    seen: list[str] = []

    def probe(before: str) -> None:
        if store is not None and store.current(agent) is not None:
            seen.append(f"state of an earlier call visible on the worker before {before}")
        if trace.get_current_span().get_span_context().is_valid:
            seen.append(f"a span of an earlier call is current on the worker before {before}")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="matrix-reuse") as pool:
            for i, tag in enumerate(tags):
                if i:
                    await loop.run_in_executor(pool, probe, tag)
                await loop.run_in_executor(pool, bench.call, agent, tag, "[tools:1]")

    asyncio.run(main())
    return _found(_explain(bench, bench.verdict([bench.truth(t, tools=1) for t in tags], owners=[agent])), seen)


# -- streaming ---------------------------------------------------------------------------------------------------


def run_streaming(bench: HermesBench, backend: str) -> Verdict:
    """Streaming turns (Hermes's default) overlapping on two agents, one open turn per agent (rounds of two), two pooled
    tools each: Hermes opens and reads each stream in a worker thread of its own (one agent cannot serve two streams)."""
    return _threads(bench, backend, "[tools:2] [delay_ms:20]", 2, "stm", owners=list(agents(bench).streamers), rounds=2)


# -- 11. errors ---------------------------------------------------------------------------------------------------


def run_errors(bench: HermesBench, backend: str) -> Verdict:
    """An LLM error (HTTP 400: Hermes returns a failed result) and a failing tool (``sb_fail`` raises; Hermes returns an error result)."""
    _begin(bench, backend)
    agent = agents(bench).main
    bench.call(agent, "llmerr", "[llm_error]")
    bench.call(agent, "toolerr", "[tool:sb_fail] [tools:1]")
    bench.call(agent, "fine", "[tools:1]")  # and the state was released: a clean call after
    return _explain(bench, bench.verdict(
        [
            _truth(bench, "llmerr", error=True, errors={"invoke_agent": 1, "step": 1, "chat": 1}),
            _truth(bench, "toolerr", tools=1, errors={"execute_tool": 1}),
            _truth(bench, "fine", tools=1, errors={}),
        ],
        owners=[agent],
    ))


# -- 13. soak -----------------------------------------------------------------------------------------------------


def _rss_kib() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _alive() -> int:
    """Instrumentation objects alive: invocation states and SDK spans."""
    from statebackends_hermes_agent.state import InvocationState

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, (InvocationState, Span)))


def run_soak(bench: HermesBench, backend: str) -> Verdict:
    """Thousands of calls on the shared agent (in-process fake LLM): SOAK_SEQUENTIAL in a row, then SOAK_THREADS
    threads x SOAK_PER_THREAD overlapping; every 4th call runs one tool. Then nothing may be open (``live()``),
    left on the agent, never ended, or alive, and RSS may not grow past a generous bound after the warm-up."""
    agent = agents(bench).main
    bench.uninstrument()
    bench.reset()
    judge = StreamingJudge()
    provider = TracerProvider()
    provider.add_span_processor(judge)
    tracer = provider.get_tracer("statebackends.soak")
    bench.instrumentor.instrument(tracer_provider=provider, state_backend=backend)
    store = bench.instrumentor.store
    llm = InProcessLLM()
    llm.install(agent)
    calls = {"n": 0, "tools": 0}
    count_lock = threading.Lock()

    def call(tag: str, tools: bool) -> None:
        with tracer.start_as_current_span(f"{CALLER_PREFIX}{tag}"):
            agent.run_conversation(f"[conv:{tag}] {'[tools:1] ' if tools else ''}hello")
        with count_lock:
            calls["n"] += 1
            calls["tools"] += tools

    try:
        for i in range(SOAK_WARMUP):
            call(f"sw{i}", i % 4 == 0)
        llm.reset()
        alive_before, rss_before = _alive(), _rss_kib()
        for i in range(SOAK_SEQUENTIAL):
            call(f"ss{i}", i % 4 == 0)
            if i % 200 == 199:
                llm.reset()  # the fake's own log must not grow either
        run_threads(
            lambda k: [call(f"st{k}x{j}", j % 4 == 0) for j in range(SOAK_PER_THREAD)], SOAK_THREADS
        )
        llm.reset()
    finally:
        InProcessLLM.uninstall(agent)
        bench.instrument(backend)  # back on the bench's provider (a fresh store)
    provider.force_flush()
    alive_after, rss_after = _alive(), _rss_kib()

    n, with_tools = calls["n"], calls["tools"]
    expected = {"invoke_agent": n, "step": n + with_tools, "chat": n + with_tools, "execute_tool": with_tools}
    live = store.live()
    verdict = Verdict(
        expected=expected,
        actual=dict(judge.counts),
        never_ended=judge.never_ended(),
        orphans=judge.orphans,
        cross_talk=judge.cross_talk,
        state_left=state_left(store, [agent]),
        leaked=max(0, alive_after - alive_before),
    )
    if rss_before is not None and rss_after is not None:
        growth = rss_after - rss_before
        verdict.notes.append(f"rss {rss_before} -> {rss_after} KiB ({growth:+d}) over {n - SOAK_WARMUP} calls")
        verdict.memory_over_kib = max(0, growth - SOAK_MEMORY_BOUND_KIB)
    verdict.notes.append(f"live() at end: {live!r}; instrumentation objects alive {alive_before} -> {alive_after}")
    provider.shutdown()
    return verdict


# -- greenlets (a subprocess under gevent monkey patching) -----------------------------------------------------


def run_greenlets(bench: HermesBench, backend: str) -> Verdict:
    """N invocations as gevent greenlets on ONE real Hermes agent under ``monkey.patch_all()``, two tools each run in
    greenlets Hermes's tool pool spawns during the invocation, hopping raw (only the id travels); run in a subprocess
    (patching must come first) by :mod:`statebackends_hermes_testbed.greenlets`, whose JSON verdict makes the cell."""
    return _greenlet_verdict(backend, bench.callers)


def _greenlet_verdict(backend: str, callers: int, *, http: bool = False) -> Verdict:
    """The verdict of the greenlet subprocess (``http``: the LLM over HTTP, the httpx instrumentation and its requests judged)."""
    from .greenlets import run_in_subprocess

    data = run_in_subprocess(backend, callers, http=http)
    fields = {f.name for f in dataclasses.fields(Verdict)}
    verdict = Verdict(**{k: v for k, v in data.items() if k in fields})
    if not data.get("monkey_patched"):
        verdict.notes.append("the subprocess was not monkey-patched")
        verdict.wrong_error += 1
    for error in data.get("errors") or []:
        verdict.notes.append(error)
    if int(data.get("max_overlap") or 0) < 2:  # the greenlets never interleaved: the row tested nothing
        verdict.notes.append(f"at most {data.get('max_overlap')} invocation open at once")
        verdict.wrong_error += 1
    if data.get("errors") or data.get("blocked_connections"):
        verdict.wrong_error += len(data.get("errors") or []) + len(data.get("blocked_connections") or [])
    return verdict


# -- coexistence with opentelemetry-instrumentation-threading ---------------------------------------------------


@contextlib.contextmanager
def threading_instrumentation() -> Iterator[None]:
    """``ThreadingInstrumentor().instrument()`` for the block: OpenTelemetry's context rides ``Thread.start`` and
    ``ThreadPoolExecutor.submit`` (only OpenTelemetry's context, not a ``contextvars`` copy); uninstrumented after."""
    from opentelemetry.instrumentation.threading import ThreadingInstrumentor

    instrumentor = ThreadingInstrumentor()
    already = instrumentor.is_instrumented_by_opentelemetry
    if not already:
        instrumentor.instrument()
    try:
        yield
    finally:
        if not already:
            instrumentor.uninstrument()


def with_threading(run: Callable[[HermesBench, str], Verdict]) -> Callable[[HermesBench, str], Verdict]:
    """``run`` with :func:`threading_instrumentation` active around it."""

    def variant(bench: HermesBench, backend: str) -> Verdict:
        with threading_instrumentation():
            return run(bench, backend)

    variant.__doc__ = f"{(run.__doc__ or '').strip()} With opentelemetry-instrumentation-threading enabled."
    return variant


# -- the LLM's HTTP request under its chat (opentelemetry-instrumentation-httpx) -----------------------------------


@contextlib.contextmanager
def httpx_instrumentation(bench: HermesBench) -> Iterator[None]:
    """``HTTPXClientInstrumentor`` on the bench's provider for the block, and every call's LLM requests judged: each
    ``traceparent`` the fake LLM received must name the call's trace and an HTTP span under that request's own chat."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=bench.provider)
    bench.judge_requests = True
    try:
        yield
    finally:
        bench.judge_requests = False
        instrumentor.uninstrument()


def with_httpx(run: Callable[[HermesBench, str], Verdict]) -> Callable[[HermesBench, str], Verdict]:
    """``run`` with :func:`httpx_instrumentation` active around it."""

    def variant(bench: HermesBench, backend: str) -> Verdict:
        with httpx_instrumentation(bench):
            return run(bench, backend)

    variant.__doc__ = (f"{(run.__doc__ or '').strip()} With opentelemetry-instrumentation-httpx: every LLM request's "
                       "HTTP span and traceparent under its own chat.")
    return variant


def run_greenlets_httpx(bench: HermesBench, backend: str) -> Verdict:
    """As ``greenlets``, the LLM over HTTP with opentelemetry-instrumentation-httpx in the subprocess: every request's
    HTTP span (in the greenlet Hermes's request worker runs in) and traceparent under its own chat."""
    return _greenlet_verdict(backend, bench.callers, http=True)


OTEL_BRIDGED = frozenset({"otel_context"})
"""Backends expected to cross a raw thread hop once opentelemetry-instrumentation-threading carries OpenTelemetry's
context over it. ``otel_context`` keeps the state under a key of OpenTelemetry's ``Context`` and documents that it
crosses the hops OpenTelemetry bridges; ``contextvar`` keeps it in a ContextVar of its own, which the threading
instrumentation does NOT carry (it attaches OpenTelemetry's context only). The core's ``Concurrency`` has no member
for "raw hop bridged by OpenTelemetry's context propagation" (a proposed ``OTEL_BRIDGED_THREAD``, declared by
``otel_context``), so until it has one, this expectation is data here, by backend name, not a declaration."""


# -- the registry --------------------------------------------------------------------------------------------


def _s(
    id: str,
    title: str,
    requires: set[Concurrency],
    run: Callable[[HermesBench, str], Verdict],
    **options: Any,
) -> Scenario:
    return Scenario(id=id, title=title, requires=frozenset(requires), run=run, doc=(run.__doc__ or "").strip(), **options)


SCENARIOS: list[Scenario] = [
    _s("sequential", "sequential calls, one agent (control)", set(), run_sequential),
    _s("threads", "threads on one shared agent", {C.THREADS}, run_threads_plain),
    _s("threads_tool_pool", "threads on one agent, 2 tools each in Hermes's pool", {C.THREADS, C.COPIED_CONTEXT}, run_threads_tool_pool),
    _s("to_thread", "asyncio tasks via asyncio.to_thread", {C.THREADS}, run_to_thread),
    _s("run_in_executor", "asyncio tasks via run_in_executor (no context copy)", {C.THREADS}, run_in_executor),
    _s("async_tasks", "asyncio tasks interleaved on one loop (stub agent)", {C.ASYNC_TASKS}, run_async_tasks, native=True),
    _s("tool_pool", "tools in Hermes's concurrent pool (context copied)", {C.COPIED_CONTEXT}, run_tool_pool),
    _s("raw_thread", "tool pool without context copy (raw thread hop)", {C.RAW_THREAD}, run_raw_thread),
    _s("nested", "nested invocation inside a tool, same thread", {C.NESTED}, run_nested),
    _s("delegate", "delegate_task subagent in Hermes's worker", {C.PROPAGATE}, run_delegate),
    _s("delegate_batch", "delegate_task batch of two subagents", {C.PROPAGATE}, run_delegate_batch),
    _s("worker_reuse", "one reused pool worker, calls in turn", set(), run_worker_reuse),
    _s("errors", "LLM error and tool error mid-call", set(), run_errors),
    _s("cancel", "asyncio cancellation mid-call (stub agent)", {C.ASYNC_TASKS}, run_cancel, native=True),
    # The soak instruments our instrumentor with a backend on a provider of its own and reads the store.
    _s("soak", "soak: thousands of calls, in a row then in threads", {C.THREADS}, run_soak, native=True),
    _s("shared_task_id", "turns of one session overlap on one agent (shared task id, pooled tools)",
       {C.THREADS, C.COPIED_CONTEXT, C.SHARED_ID}, run_shared_task_id),
    # Each agent has one open turn at a time: no owner is shared, so neither THREADS nor SHARED_ID (both about
    # overlapping invocations on one owner) is needed; the owner-keyed `instance` backend is right here, and a
    # backend that mixes the two agents' turns while declaring the hop contradicts its declaration.
    _s("shared_task_id_two_agents", "one session id on two agents, turns overlapping",
       {C.COPIED_CONTEXT}, run_shared_task_id_two_agents),
    _s("shared_task_id_raw", "shared task id on one agent, tool pool without context copy",
       {C.THREADS, C.RAW_THREAD, C.SHARED_ID, C.SHARED_ID_RAW_THREAD}, run_shared_task_id_raw),
    _s("shared_task_id_two_agents_raw", "shared task id on two agents, tool pool without context copy",
       {C.RAW_THREAD}, run_shared_task_id_two_agents_raw),
    _s("late_work", "work started by a tool runs after its call returned", set(), run_late_work),
    _s("greenlets", "gevent greenlets on one agent, tools in greenlets spawned raw (subprocess)",
       {C.GREENLETS}, run_greenlets, native=True),
]

THREADING_VARIANTS: list[Scenario] = [
    # The raw-hop rows again with opentelemetry-instrumentation-threading enabled: the requirements stay those of the
    # plain rows (a declared RAW_THREAD still crosses the hop); `otel_context` is expected ok too (OTEL_BRIDGED).
    _s("raw_thread+threading", "tool pool without context copy, with threading instrumentation",
       {C.RAW_THREAD}, with_threading(run_raw_thread), also_ok=OTEL_BRIDGED),
    _s("shared_task_id_raw+threading", "shared task id on one agent, raw tool pool, with threading instrumentation",
       {C.THREADS, C.RAW_THREAD, C.SHARED_ID, C.SHARED_ID_RAW_THREAD}, with_threading(run_shared_task_id_raw),
       also_ok=OTEL_BRIDGED),
    _s("shared_task_id_two_agents_raw+threading",
       "shared task id on two agents, raw tool pool, with threading instrumentation",
       {C.RAW_THREAD}, with_threading(run_shared_task_id_two_agents_raw), also_ok=OTEL_BRIDGED),
]
"""The raw-hop rows with opentelemetry-instrumentation-threading enabled (ids ending ``+threading``); in the default run."""

SCENARIOS.extend(THREADING_VARIANTS)

HTTPX_VARIANTS: list[Scenario] = [
    # Rows judged also from the LLM's side: every request's HTTP client span (opentelemetry-instrumentation-httpx) must
    # hang under its own chat span, and the traceparent the fake LLM received must name it, in the turn's trace.
    _s("threads_tool_pool+httpx", "threads on one agent, pooled tools; LLM requests under their chat",
       {C.THREADS, C.COPIED_CONTEXT}, with_httpx(run_threads_tool_pool)),
    _s("shared_task_id+httpx", "turns of one session overlap on one agent; LLM requests under their chat",
       {C.THREADS, C.COPIED_CONTEXT, C.SHARED_ID}, with_httpx(run_shared_task_id)),
    _s("delegate_batch+httpx", "delegate_task batch of two subagents; LLM requests under their chat",
       {C.PROPAGATE}, with_httpx(run_delegate_batch)),
    _s("streaming+httpx", "streaming turns overlapping on two agents; LLM requests under their chat",
       {C.COPIED_CONTEXT}, with_httpx(run_streaming)),
    _s("greenlets+httpx", "gevent greenlets on one agent, LLM over HTTP; requests under their chat (subprocess)",
       {C.GREENLETS}, run_greenlets_httpx, native=True),
    _s("threads_tool_pool+httpx+threading", "threads on one agent, pooled tools; LLM requests under their chat, "
       "with threading instrumentation", {C.THREADS, C.COPIED_CONTEXT}, with_threading(with_httpx(run_threads_tool_pool))),
    _s("streaming+httpx+threading", "streaming turns overlapping on two agents; LLM requests under their chat, "
       "with threading instrumentation", {C.COPIED_CONTEXT}, with_threading(with_httpx(run_streaming))),
]
"""Rows that also judge the LLM's HTTP requests (ids with ``+httpx``); in the default run."""

SCENARIOS.extend(HTTPX_VARIANTS)

BY_ID: dict[str, Scenario] = {s.id: s for s in SCENARIOS}
