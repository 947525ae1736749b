"""The scenarios of the correctness matrix: every backend x every way Hermes (or an async agent) runs calls.

Each :class:`Scenario` drives the REAL instrumentation (the real ``AIAgent`` of
hermes-agent on the fake LLM, or :class:`statebackends_hermes_testbed.stub_agent.AsyncStubAgent`
through the instrumentor's live wrappers) under ONE backend and returns the
:class:`statebackends_hermes_testbed.traces.Verdict` of what it exported. ``requires`` is the
isolation a backend must DECLARE (``type(store).isolates``) for the cell to be
expected ok, so the expected outcome of every cell is derived from the
backends' declarations (:func:`expected_ok`), never written by hand.

Scenarios are data: each row of :data:`SCENARIOS` names its requirements and its runner, and most runners are
parameterised records (:class:`Turns`, :class:`InARow`, :class:`OneCall`, :class:`AsyncHop`) whose fields say what
is driven and what each call's truth is; the rest are functions for what has no shape in common (the stub agent,
subagents, late work, the soak). Every cell instruments a fresh store (``bench.instrument(backend)``) and starts
from ``bench.reset()`` (:func:`begin`), so an earlier cell's leftovers cannot leak into the next. The agents and
what their tools share live in one :class:`Rig` per bench (no module state): Hermes's agents are built once and
reused (building one costs about 1.5 s); all but the streamers are NON-streaming, because streaming calls on one
shared ``AIAgent`` instance interfere inside Hermes itself, whatever the instrumentation does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import gc
import os
import threading
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
LATE_KEEPER = "sb_late_kept"
"""Matrix tool that keeps a job in a copy of its context, for a later turn to run (:data:`LATE_RUNNER`)."""
LATE_RUNNER = "sb_late_run"
"""Matrix tool that runs, on its own thread and while its turn is open, the jobs an earlier turn kept."""

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


# -- the rig: agents built once per bench, and what their tools share --------------------------------------------


class LateJobs:
    """Work a matrix tool started that outlives its call: jobs a thread runs once :meth:`release` lets it
    (``sb_late``), and jobs kept in a copy of their tool's context for a later turn to run (``sb_late_kept``,
    ``sb_late_run``). Each job calls the wrapped ``handle_function_call`` (as Hermes's background work would) and
    notes what it should not have found: the state of an ended call, or of the open one it runs beside."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gate = threading.Event()
        self.threads: list[threading.Thread] = []
        self.kept: list[tuple[contextvars.Context, Callable[[], None]]] = []
        self.seen: list[str] = []
        """What a job found that it should not have (state of another call, an error)."""
        self.store: Any = None
        self.owner: Any = None

    def reset(self, store: Any, owner: Any) -> None:
        """Forget earlier jobs; later ones probe ``store`` for ``owner``'s state."""
        with self._lock:
            self.gate = threading.Event()
            self.threads, self.kept, self.seen, self.store, self.owner = [], [], [], store, owner

    def _job(self, text: str, task_id: Any, found: str) -> Callable[[], None]:
        store, owner = self.store, self.owner

        def job() -> None:
            if store is not None and store.current(owner, task_id) is not None:
                self._saw(f"{text}: current() returned {found}")
            try:
                import run_agent  # the module attribute the instrumentation wraps, looked up now

                run_agent.handle_function_call(LATE_TOOL, {"text": f"{text}-job"}, task_id)
            except Exception as exc:  # noqa: BLE001 - reported in the verdict
                self._saw(f"{text}: late handle_function_call raised {exc!r}")

        return job

    def start(self, text: str, task_id: Any) -> None:
        """Start one job in a copy of the calling tool's context (Hermes's background work does the same); it runs
        once :meth:`release` lets it."""
        ctx = contextvars.copy_context()
        gate, job = self.gate, self._job(text, task_id, "the ended call's state")

        def gated() -> None:
            if not gate.wait(LATE_TIMEOUT):
                self._saw(f"{text}: never released")
                return
            job()

        thread = threading.Thread(target=ctx.run, args=(gated,), name="matrix-late", daemon=True)
        with self._lock:
            self.threads.append(thread)
        thread.start()

    def keep(self, text: str, task_id: Any) -> None:
        """Keep one job with a copy of the calling tool's context, for :meth:`run_kept`."""
        with self._lock:
            self.kept.append((contextvars.copy_context(), self._job(text, task_id, "the state of a call open beside it")))

    def run_kept(self) -> int:
        """Run the kept jobs here, each in its own context copy; how many ran."""
        with self._lock:
            kept, self.kept = self.kept, []
        for ctx, job in kept:
            ctx.run(job)
        return len(kept)

    def _saw(self, note: str) -> None:
        with self._lock:
            self.seen.append(note)

    def release(self) -> list[str]:
        """Let every started job run, wait for them, and return what the jobs saw."""
        self.gate.set()
        for thread in list(self.threads):
            thread.join(LATE_TIMEOUT)
            if thread.is_alive():
                self._saw("a late job did not finish")
        return list(self.seen)


def _sb_late_job(args: dict[str, Any], **_: Any) -> str:
    return str(args.get("text", ""))


class Rig:
    """The matrix's agents on one bench's fake LLM, built once, and the state their tools share: ``main`` (sb_echo,
    sb_fail and the matrix tools, built with the session id its shared-id turns pass as ``task_id``), ``delegating``
    (``delegate_task``), a ``twin`` of ``main`` and two ``streamers``, built on first use.

    The matrix tools are this rig's bound methods, registered in Hermes's tool registry (:meth:`activate`, done for
    every cell), so what a tool shares lives here, with its bench, not in the module.
    """

    def __init__(self, bench: HermesBench) -> None:
        self.late = LateJobs()
        self.nested_child: Any = None
        """The agent ``sb_nested`` runs inline (set by the nested row while it runs)."""
        self.activate()  # before building: Hermes fixes an agent's tool names at construction
        self._bench = bench
        self.main = self._build()
        self.delegating = bench.agent(delegation=True)
        self._twin: Any = None
        self._streamers: tuple[Any, ...] = ()

    def activate(self) -> None:
        """Register the bench tools and this rig's tools (``sb_nested``, ``sb_late``, ``sb_late_kept``,
        ``sb_late_run``, ``sb_late_job``) in toolset ``sb_matrix``, unless they already are."""
        register_bench_tools()
        register_tool(NESTED_TOOL, MATRIX_TOOLSET, self.sb_nested,
                      "Matrix tool: runs another agent inline and returns its answer.")
        register_tool(LATE_LAUNCHER, MATRIX_TOOLSET, self.sb_late,
                      "Matrix tool: starts a job that runs after the call has returned.")
        register_tool(LATE_KEEPER, MATRIX_TOOLSET, self.sb_late_kept,
                      "Matrix tool: keeps a job for a later turn to run.")
        register_tool(LATE_RUNNER, MATRIX_TOOLSET, self.sb_late_run,
                      "Matrix tool: runs the jobs an earlier turn kept.")
        register_tool(LATE_TOOL, MATRIX_TOOLSET, _sb_late_job, "Matrix tool: the job sb_late started.")

    def sb_nested(self, args: dict[str, Any], **_: Any) -> str:
        """Run another real agent INSIDE this tool, on this thread: ``[conv:<parent tag>-kid]``."""
        child = self.nested_child
        if child is None:
            raise RuntimeError("sb_nested: no child agent set")
        text = str(args.get("text", ""))
        parent_tag = text.rpartition("-")[0] or text
        result = child.run_conversation(f"[conv:{parent_tag}-kid] hello")
        return str((result or {}).get("final_response") or "")

    def sb_late(self, args: dict[str, Any], **kwargs: Any) -> str:
        """Start a job that outlives this call (:meth:`LateJobs.start`) and return at once."""
        text = str(args.get("text", ""))
        self.late.start(text, kwargs.get("task_id"))
        return text

    def sb_late_kept(self, args: dict[str, Any], **kwargs: Any) -> str:
        """Keep a job in a copy of this tool's context (:meth:`LateJobs.keep`) and return at once."""
        text = str(args.get("text", ""))
        self.late.keep(text, kwargs.get("task_id"))
        return text

    def sb_late_run(self, args: dict[str, Any], **_: Any) -> str:
        """Run the kept jobs here, inside this turn's tool (:meth:`LateJobs.run_kept`)."""
        ran = self.late.run_kept()
        return f"{args.get('text', '')} ran {ran}"

    def _build(self) -> Any:
        # Built with the session id its shared-id turns pass as task_id, as Hermes's CLI, ACP adapter and API server
        # build theirs (AIAgent(session_id=S) ... run_conversation(task_id=S)): hooks then see one id for both.
        return self._bench.agent(toolsets=(BENCH_TOOLSET, MATRIX_TOOLSET), session_id=SESSION_ID, fresh=True)

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
                self._bench.agent(streaming=True, toolsets=(BENCH_TOOLSET, MATRIX_TOOLSET), fresh=True) for _ in range(2)
            )
        return self._streamers


def rig(bench: HermesBench) -> Rig:
    """``bench``'s :class:`Rig` (made on first use, kept in ``bench.fixtures``), its tools registered."""
    made = bench.fixtures.get(Rig)
    if made is None:
        made = bench.fixtures.setdefault(Rig, Rig(bench))
    made.activate()
    return made


def agents(bench: HermesBench) -> Rig:
    """The matrix's agents on ``bench``'s server (its :class:`Rig`): ``main``, ``delegating``, ``twin``, ``streamers``."""
    return rig(bench)


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


def begin(bench: HermesBench, backend: str) -> Any:
    """Every cell's set-up: ``backend`` instrumented on the bench (a fresh store, returned), spans and the fake LLM's
    records forgotten."""
    store = bench.instrument(backend)
    bench.reset()
    return store


# -- the shapes most rows share: parameterised runners (the row's data) --------------------------------------------


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


def _pool(raw: bool) -> contextlib.AbstractContextManager[None]:
    return raw_tool_pool() if raw else contextlib.nullcontext()


@dataclass(frozen=True)
class InARow:
    """``calls`` calls one after another on ``main``, each ``directives`` (its truth: ``tools`` tools each)."""

    calls: int
    directives: str
    tools: int
    prefix: str

    def __call__(self, bench: HermesBench, backend: str) -> Verdict:
        begin(bench, backend)
        agent = rig(bench).main
        tags = [f"{self.prefix}{i}" for i in range(self.calls)]
        for tag in tags:
            bench.call(agent, tag, self.directives)
        return _explain(bench, bench.verdict([bench.truth(t, tools=self.tools) for t in tags], owners=[agent]))


@dataclass(frozen=True)
class Turns:
    """Overlapping turns in threads released by a barrier: ``bench.callers`` on ``main`` (``agents="main"``), or one
    per agent in each of ``rounds`` rounds (``"pair"``: ``main`` and its twin; ``"streamers"``: two streaming agents),
    each ``directives`` with ``task_id`` as its front end would pass it; ``raw``: Hermes's tool pool hops raw. Truth:
    ``tools`` tools per turn."""

    directives: str
    tools: int
    prefix: str
    task_id: Optional[str] = None
    agents: str = "main"
    """``main``, ``pair`` or ``streamers`` (the last two built on first use)."""
    rounds: int = 1
    raw: bool = False

    def __call__(self, bench: HermesBench, backend: str) -> Verdict:
        begin(bench, backend)
        r = rig(bench)
        if self.agents == "pair":
            owners = [r.main, r.twin]
        elif self.agents == "streamers":
            owners = list(r.streamers)
        else:
            owners = [r.main]
        n = bench.callers if len(owners) == 1 else len(owners)
        tags: list[str] = []
        with _pool(self.raw):
            for round_ in range(self.rounds):
                batch = [f"{self.prefix}{round_ * n + i}" for i in range(n)]
                tags += batch
                run_threads(lambda i: bench.call(owners[i % len(owners)], batch[i], self.directives,  # noqa: B023 - run_threads runs it in this round
                                                 task_id=self.task_id), n)
        return _explain(bench, bench.verdict([bench.truth(t, tools=self.tools) for t in tags], owners=owners))


@dataclass(frozen=True)
class OneCall:
    """One call on ``main``, ``directives`` (its truth: ``tools`` tools); ``raw``: Hermes's tool pool hops raw."""

    tag: str
    directives: str
    tools: int
    raw: bool = False

    def __call__(self, bench: HermesBench, backend: str) -> Verdict:
        begin(bench, backend)
        agent = rig(bench).main
        with _pool(self.raw):
            bench.call(agent, self.tag, self.directives)
        return _explain(bench, bench.verdict([bench.truth(self.tag, tools=self.tools)], owners=[agent]))


@dataclass(frozen=True)
class AsyncHop:
    """``bench.callers`` asyncio tasks each driving ``main`` in a thread: ``asyncio.to_thread`` (``hop="to_thread"``:
    the context is copied) or ``loop.run_in_executor`` on a pool of its own (``"executor"``: nothing copied)."""

    hop: str
    prefix: str
    directives: str = "[tools:1] [delay_ms:20]"
    tools: int = 1

    def __call__(self, bench: HermesBench, backend: str) -> Verdict:
        begin(bench, backend)
        agent = rig(bench).main
        tags = [f"{self.prefix}{i}" for i in range(bench.callers)]

        async def main() -> None:
            if self.hop == "to_thread":
                await asyncio.gather(*(asyncio.to_thread(bench.call, agent, t, self.directives) for t in tags))
                return
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(max_workers=bench.callers, thread_name_prefix="matrix-exec") as pool:
                await asyncio.gather(*(loop.run_in_executor(pool, bench.call, agent, t, self.directives) for t in tags))

        asyncio.run(main())
        return _explain(bench, bench.verdict([bench.truth(t, tools=self.tools) for t in tags], owners=[agent]))


_SHARED = "[tools:2] [delay_ms:20] [tool_ms:10]"
"""Each turn of one session in the shared-task-id rows: two tools in Hermes's concurrent pool."""


# -- asyncio tasks on one loop (the stub agent through the live telemetry) -------------------------------------------


def _stub(bench: HermesBench, **kwargs: Any) -> AsyncStubAgent:
    return AsyncStubAgent(lambda: bench.instrumentor.telemetry, bench.server.script, **kwargs)


async def _stub_call(bench: HermesBench, stub: AsyncStubAgent, tag: str, directives: str) -> Any:
    with bench.tracer.start_as_current_span(f"{CALLER_PREFIX}{tag}"):
        return await stub.run_conversation(f"[conv:{tag}] {directives} hello")


def run_async_tasks(bench: HermesBench, backend: str) -> Verdict:
    """N asyncio tasks interleaved on ONE thread, one shared async stub agent; every LLM turn and tool awaits."""
    begin(bench, backend)
    stub = _stub(bench)
    tags = [f"as{i}" for i in range(bench.callers)]

    async def main() -> None:
        await asyncio.gather(*(_stub_call(bench, stub, t, "[tools:2]") for t in tags))

    asyncio.run(main())
    return _explain(bench, bench.verdict([bench.truth(t, tools=2) for t in tags], owners=[stub]))


def run_cancel(bench: HermesBench, backend: str) -> Verdict:
    """Asyncio tasks on one loop; one is cancelled inside its tool while the others are in flight."""
    begin(bench, backend)
    inside = asyncio.Event()

    async def block_tool(name: str, args: Any) -> str:
        inside.set()
        await asyncio.Event().wait()  # until cancelled
        return "never"

    stub = _stub(bench, tools={"sb_block": block_tool})
    victim = "cx1"
    tags = [f"cx{i}" for i in range(max(3, bench.callers // 2))]
    notes: list[str] = []

    async def main() -> None:
        tasks = {
            t: asyncio.create_task(
                _stub_call(bench, stub, t, "[tool:sb_block] [tools:1]" if t == victim else "[tools:2] [delay_ms:10]")
            )
            for t in tags
        }
        try:  # never hang the matrix: a victim that fails before its tool shows up as a broken cell
            await asyncio.wait_for(inside.wait(), timeout=30)
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


# -- work that outlives its call ---------------------------------------------------------------------------


def run_late_work(bench: HermesBench, backend: str) -> Verdict:
    """A tool (``sb_late``) starts a job through a context copy; the job runs only AFTER the turn has returned and calls
    the wrapped ``handle_function_call`` (as Hermes's background work would). Its span may start a trace of its own or
    hang under the tool span that started it, never in the ended call's tree; nothing of the call is found or left."""
    store = begin(bench, backend)
    r = rig(bench)
    r.late.reset(store, r.main)
    live_before = (store.live() if store is not None else 0) or 0  # no store: a foreign instrumentation
    bench.call(r.main, "late", f"[tool:{LATE_LAUNCHER}] [tools:1]", task_id=SESSION_ID)
    seen = r.late.release()
    bench.call(r.main, "after", "[tools:1]", task_id=SESSION_ID)  # the next turn of the session is untouched
    return _found(_explain(bench, bench.verdict(
        [bench.truth("late", tools=1, late=1), bench.truth("after", tools=1)], owners=[r.main], live_before=live_before,
    )), seen)


def run_late_work_next_turn(bench: HermesBench, backend: str) -> Verdict:
    """A tool of one turn (``sb_late_kept``) keeps a job in a copy of its context; the NEXT turn of the session, on the
    same agent and thread, runs it from its own tool (``sb_late_run``) while it is open; the job calls the wrapped
    ``handle_function_call``. Its span may hang under the tool span that kept it (the first turn's), never in the open
    turn's tree, and the job must not be handed the open turn's state: a backend with one slot per thread or per
    owner (``threadlocal``, ``instance``) gives it the open turn's."""
    store = begin(bench, backend)
    r = rig(bench)
    r.late.reset(store, r.main)
    live_before = (store.live() if store is not None else 0) or 0
    bench.call(r.main, "kept", f"[tool:{LATE_KEEPER}] [tools:1]", task_id=SESSION_ID)
    bench.call(r.main, "runs", f"[tool:{LATE_RUNNER}] [tools:1]", task_id=SESSION_ID)
    if r.late.kept:
        r.late.seen.append("the kept job never ran")
    return _found(_explain(bench, bench.verdict(
        [bench.truth("kept", tools=1, late=1), bench.truth("runs", tools=1)], owners=[r.main], live_before=live_before,
    )), list(r.late.seen), "cross_talk")


# -- subagents -------------------------------------------------------------------------------------------------------


def run_nested(bench: HermesBench, backend: str) -> Verdict:
    """A tool (``sb_nested``) runs another real agent inline on the same thread; its invoke_agent hangs under that execute_tool."""
    begin(bench, backend)
    r = rig(bench)
    r.nested_child = r.delegating
    try:
        bench.call(r.main, "nest", f"[tool:{NESTED_TOOL}] [tools:1]")
        bench.call(r.main, "after", "[tools:1]")  # the outer state was given back: a plain call after
    finally:
        r.nested_child = None
    kid = bench.truth("nest-kid", tokens=False)
    return _explain(bench, bench.verdict(
        [bench.truth("nest", tools=1, children=[kid]), bench.truth("after", tools=1)],
        owners=[r.main, r.delegating],
    ))


@dataclass(frozen=True)
class Delegation:
    """``delegate_task`` from ``delegating``: one goal per kid tag (one: Hermes's single path; several: its batch
    path), each child run in Hermes's delegation worker thread (a raw hop); each child is judged under the call."""

    tag: str
    kids: tuple[str, ...]

    def __call__(self, bench: HermesBench, backend: str) -> Verdict:
        begin(bench, backend)
        agent = rig(bench).delegating
        directive = f"[delegate:{self.kids[0]}]" if len(self.kids) == 1 else f"[delegate_batch:{','.join(self.kids)}]"
        bench.call(agent, self.tag, directive)
        wait_for_delegations(timeout=60)  # the children run detached: their truth is complete only once they ended
        kids = [bench.truth(k, tokens=False) for k in self.kids]
        return _explain(bench, bench.verdict([bench.truth(self.tag, tools=1, children=kids)], owners=[agent]))


# -- worker reuse -----------------------------------------------------------------------------------------------------


def run_worker_reuse(bench: HermesBench, backend: str) -> Verdict:
    """Calls one after another on ONE reused pool worker (run_in_executor, max_workers=1); before each later call a
    probe on that worker checks that nothing of the earlier call is visible there (state, current span)."""
    store = begin(bench, backend)
    agent = rig(bench).main
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


# -- errors ---------------------------------------------------------------------------------------------------------


def run_errors(bench: HermesBench, backend: str) -> Verdict:
    """An LLM error (HTTP 400: Hermes returns a failed result) and a failing tool (``sb_fail`` raises; Hermes returns an error result)."""
    begin(bench, backend)
    agent = rig(bench).main
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
    agent = rig(bench).main
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


Runner = Callable[[HermesBench, str], Verdict]
"""What a row runs: ``(bench, backend) -> Verdict``."""


@dataclass(frozen=True)
class WithThreading:
    """``run`` with :func:`threading_instrumentation` active around it."""

    run: Runner

    def __call__(self, bench: HermesBench, backend: str) -> Verdict:
        with threading_instrumentation():
            return self.run(bench, backend)


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


@dataclass(frozen=True)
class WithHttpx:
    """``run`` with :func:`httpx_instrumentation` active around it."""

    run: Runner

    def __call__(self, bench: HermesBench, backend: str) -> Verdict:
        with httpx_instrumentation(bench):
            return self.run(bench, backend)


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


def _s(id: str, title: str, requires: set[Concurrency], run: Runner, doc: str = "", **options: Any) -> Scenario:
    return Scenario(id=id, title=title, requires=frozenset(requires), run=run, doc=doc or (run.__doc__ or "").strip(),
                    **options)


_THREADS_DOC = "N threads (barrier) on one shared agent"
_STREAMING = Turns("[tools:2] [delay_ms:20]", 2, "stm", agents="streamers", rounds=2)
_STREAMING_DOC = ("Streaming turns (Hermes's default) overlapping on two agents, one open turn per agent (rounds of two), "
                  "two pooled tools each: Hermes opens and reads each stream in a worker thread of its own (one agent "
                  "cannot serve two streams).")
_SHARED_TURNS = Turns(_SHARED, 2, "sid", task_id=SESSION_ID)
_SHARED_DOC = ("N overlapping turns (threads, barrier) on ONE shared agent, all with task_id=\"session-42\"; two tools "
               "each in Hermes's concurrent pool (context copied): a double submit, a retry or two tabs on one session.")
_SHARED_RAW = Turns(_SHARED, 2, "sir", task_id=SESSION_ID, raw=True)
_SHARED_RAW_DOC = ("As shared_task_id with Hermes's tool pool hopping raw (nothing copied): a worker knows only its "
                   "agent and the session id, which every open turn on that agent shares.")
_PAIR_RAW = Turns(_SHARED, 2, "sar", task_id=SESSION_ID, agents="pair", rounds=SHARED_ID_ROUNDS, raw=True)
_PAIR_RAW_DOC = "As shared_task_id_two_agents with the raw hop: the id is shared, but each agent has one open turn."
_POOLED = Turns("[tools:2] [delay_ms:20]", 2, "tp")
_POOLED_DOC = (f"{_THREADS_DOC}, [tools:2] [delay_ms:20]: each call's two tools ALSO go through Hermes's concurrent "
               "tool pool (a context-copying hop).")
_RAW_POOL = OneCall("raw", "[tools:3] [tool_ms:30]", 3, raw=True)
_RAW_POOL_DOC = ("As tool_pool, with agent.tool_executor.propagate_context_to_thread patched to identity: a raw hop, "
                 "nothing copied.")
_BATCH = Delegation("dlb", ("dlba", "dlbb"))
_BATCH_DOC = "delegate_task with a batch of two goals: two children in Hermes's worker threads at once."
_THREADING = " With opentelemetry-instrumentation-threading enabled."
_HTTPX = " With opentelemetry-instrumentation-httpx: every LLM request's HTTP span and traceparent under its own chat."

SCENARIOS: list[Scenario] = [
    _s("sequential", "sequential calls, one agent (control)", set(), InARow(3, "[tools:1]", 1, "seq"),
       "Calls one after another on one agent, one tool each (Hermes runs a single tool inline): the control."),
    _s("threads", "threads on one shared agent", {C.THREADS}, Turns("[tools:1] [delay_ms:20]", 1, "th"),
       f"{_THREADS_DOC}, [tools:1] [delay_ms:20]: one tool per call runs inline, so only threads are tested."),
    _s("threads_tool_pool", "threads on one agent, 2 tools each in Hermes's pool", {C.THREADS, C.COPIED_CONTEXT},
       _POOLED, _POOLED_DOC),
    _s("to_thread", "asyncio tasks via asyncio.to_thread", {C.THREADS}, AsyncHop("to_thread", "tt"),
       "N asyncio tasks, each driving the shared agent through asyncio.to_thread (the context is copied)."),
    _s("run_in_executor", "asyncio tasks via run_in_executor (no context copy)", {C.THREADS},
       AsyncHop("executor", "ex"),
       "N asyncio tasks through loop.run_in_executor on a ThreadPoolExecutor (the context is NOT copied)."),
    _s("async_tasks", "asyncio tasks interleaved on one loop (stub agent)", {C.ASYNC_TASKS}, run_async_tasks,
       native=True),
    _s("tool_pool", "tools in Hermes's concurrent pool (context copied)", {C.COPIED_CONTEXT},
       OneCall("pool", "[tools:3] [tool_ms:30]", 3),
       "One call whose 3 tools run at once in Hermes's own concurrent tool pool (propagate_context_to_thread: a "
       "context copy)."),
    _s("raw_thread", "tool pool without context copy (raw thread hop)", {C.RAW_THREAD}, _RAW_POOL, _RAW_POOL_DOC),
    _s("nested", "nested invocation inside a tool, same thread", {C.NESTED}, run_nested),
    _s("delegate", "delegate_task subagent in Hermes's worker", {C.PROPAGATE}, Delegation("dlg", ("dlgkid",)),
       "delegate_task with one goal: Hermes builds a child agent and runs it in its delegation worker thread (raw hop)."),
    _s("delegate_batch", "delegate_task batch of two subagents", {C.PROPAGATE}, _BATCH, _BATCH_DOC),
    _s("worker_reuse", "one reused pool worker, calls in turn", set(), run_worker_reuse),
    _s("errors", "LLM error and tool error mid-call", set(), run_errors),
    _s("cancel", "asyncio cancellation mid-call (stub agent)", {C.ASYNC_TASKS}, run_cancel, native=True),
    # The soak instruments our instrumentor with a backend on a provider of its own and reads the store.
    _s("soak", "soak: thousands of calls, in a row then in threads", {C.THREADS}, run_soak, native=True),
    _s("shared_task_id", "turns of one session overlap on one agent (shared task id, pooled tools)",
       {C.THREADS, C.COPIED_CONTEXT, C.SHARED_ID}, _SHARED_TURNS, _SHARED_DOC),
    # Each agent has one open turn at a time: no owner is shared, so neither THREADS nor SHARED_ID (both about
    # overlapping invocations on one owner) is needed; the owner-keyed `instance` backend is right here, and a
    # backend that mixes the two agents' turns while declaring the hop contradicts its declaration.
    _s("shared_task_id_two_agents", "one session id on two agents, turns overlapping", {C.COPIED_CONTEXT},
       Turns(_SHARED, 2, "sia", task_id=SESSION_ID, agents="pair", rounds=SHARED_ID_ROUNDS),
       "The same session id on two agents, one turn each, overlapping (rounds of two); two pooled tools per turn."),
    _s("shared_task_id_raw", "shared task id on one agent, tool pool without context copy",
       {C.THREADS, C.RAW_THREAD, C.SHARED_ID, C.SHARED_ID_RAW_THREAD}, _SHARED_RAW, _SHARED_RAW_DOC),
    _s("shared_task_id_two_agents_raw", "shared task id on two agents, tool pool without context copy",
       {C.RAW_THREAD}, _PAIR_RAW, _PAIR_RAW_DOC),
    _s("late_work", "work started by a tool runs after its call returned", set(), run_late_work),
    _s("late_work_next_turn", "work kept by a tool runs in the next turn, while it is open", {C.LATE_WORK},
       run_late_work_next_turn),
    _s("greenlets", "gevent greenlets on one agent, tools in greenlets spawned raw (subprocess)",
       {C.GREENLETS}, run_greenlets, native=True),
]

THREADING_VARIANTS: list[Scenario] = [
    # The raw-hop rows again with opentelemetry-instrumentation-threading enabled: the requirements stay those of the
    # plain rows (a declared RAW_THREAD still crosses the hop); `otel_context` is expected ok too (OTEL_BRIDGED).
    _s("raw_thread+threading", "tool pool without context copy, with threading instrumentation",
       {C.RAW_THREAD}, WithThreading(_RAW_POOL), _RAW_POOL_DOC + _THREADING, also_ok=OTEL_BRIDGED),
    _s("shared_task_id_raw+threading", "shared task id on one agent, raw tool pool, with threading instrumentation",
       {C.THREADS, C.RAW_THREAD, C.SHARED_ID, C.SHARED_ID_RAW_THREAD}, WithThreading(_SHARED_RAW),
       _SHARED_RAW_DOC + _THREADING, also_ok=OTEL_BRIDGED),
    _s("shared_task_id_two_agents_raw+threading",
       "shared task id on two agents, raw tool pool, with threading instrumentation",
       {C.RAW_THREAD}, WithThreading(_PAIR_RAW), _PAIR_RAW_DOC + _THREADING, also_ok=OTEL_BRIDGED),
]
"""The raw-hop rows with opentelemetry-instrumentation-threading enabled (ids ending ``+threading``); in the default run."""

SCENARIOS.extend(THREADING_VARIANTS)

HTTPX_VARIANTS: list[Scenario] = [
    # Rows judged also from the LLM's side: every request's HTTP client span (opentelemetry-instrumentation-httpx) must
    # hang under its own chat span, and the traceparent the fake LLM received must name it, in the turn's trace.
    _s("threads_tool_pool+httpx", "threads on one agent, pooled tools; LLM requests under their chat",
       {C.THREADS, C.COPIED_CONTEXT}, WithHttpx(_POOLED), _POOLED_DOC + _HTTPX),
    _s("shared_task_id+httpx", "turns of one session overlap on one agent; LLM requests under their chat",
       {C.THREADS, C.COPIED_CONTEXT, C.SHARED_ID}, WithHttpx(_SHARED_TURNS), _SHARED_DOC + _HTTPX),
    _s("delegate_batch+httpx", "delegate_task batch of two subagents; LLM requests under their chat",
       {C.PROPAGATE}, WithHttpx(_BATCH), _BATCH_DOC + _HTTPX),
    _s("streaming+httpx", "streaming turns overlapping on two agents; LLM requests under their chat",
       {C.COPIED_CONTEXT}, WithHttpx(_STREAMING), _STREAMING_DOC + _HTTPX),
    _s("greenlets+httpx", "gevent greenlets on one agent, LLM over HTTP; requests under their chat (subprocess)",
       {C.GREENLETS}, run_greenlets_httpx, native=True),
    _s("threads_tool_pool+httpx+threading", "threads on one agent, pooled tools; LLM requests under their chat, "
       "with threading instrumentation", {C.THREADS, C.COPIED_CONTEXT}, WithThreading(WithHttpx(_POOLED)),
       _POOLED_DOC + _HTTPX + _THREADING),
    _s("streaming+httpx+threading", "streaming turns overlapping on two agents; LLM requests under their chat, "
       "with threading instrumentation", {C.COPIED_CONTEXT}, WithThreading(WithHttpx(_STREAMING)),
       _STREAMING_DOC + _HTTPX + _THREADING),
]
"""Rows that also judge the LLM's HTTP requests (ids with ``+httpx``); in the default run."""

SCENARIOS.extend(HTTPX_VARIANTS)

BY_ID: dict[str, Scenario] = {s.id: s for s in SCENARIOS}
