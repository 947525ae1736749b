"""Each instrumentation's wrappers alone: the call sequence of one ``[tools:1]`` run_conversation on a stub.

Takes the very wrapper callables an instrumentor installed on the real ``AIAgent``
(ours or loongsuite's) and replays them around a stub, so what the code costs is
measured without the noise of Hermes's own 8 ms of work around it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from statebackends_hermes_testbed.modes import NONE

from .timing import FLOOR

if TYPE_CHECKING:  # pragma: no cover - importing it builds nothing, but pulls in the SDK
    from statebackends_hermes_testbed.driver import HermesBench

_STUB_TARGETS = (
    ("run_agent", "AIAgent", "run_conversation"),
    ("run_agent", "AIAgent", "_interruptible_api_call"),
    ("run_agent", "AIAgent", "_execute_tool_calls"),
    ("run_agent", None, "handle_function_call"),
)
"""What one sequential ``[tools:1]`` conversation calls, in this order of nesting."""
_THREAD_INIT = "Thread.__init__"
"""Our hook on ``threading.Thread.__init__`` (carries a chat's context into the request thread built under it), by
this name among the installed wrappers when the instrumentation has one."""
THREAD_INIT_ENABLED = "Thread.__init__ enabled"
"""The ``enabled`` switch that hook was installed with (wrapt skips the hook when it returns False), if any."""


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
    import threading

    init = vars(threading.Thread).get("__init__")
    wrapper = getattr(init, "_self_wrapper", None)
    if wrapper is not None:
        found[_THREAD_INIT] = wrapper
        found[THREAD_INIT_ENABLED] = getattr(init, "_self_enabled", None)
    return found


def _switch_of(bench: HermesBench) -> Any:
    """The switch of our instrumentor's installed wrappers (their ``HermesWrappers``), None when it is not active."""
    ours = bench.instrumentors.ours
    return getattr(ours, "_wrappers", None) if ours.is_instrumented_by_opentelemetry else None


def installed_ours(bench: HermesBench, mode: str = "invocation_id", provider: Any = None) -> Tuple[Dict[str, Any], Any]:
    """The wrappers our instrumentor installs in ``mode`` (by target name; on ``provider``, default the bench's), kept
    tracing after ``bench`` went back to its mode, and the
    :class:`~statebackends_hermes_agent.lifecycle.HermesTelemetry` they close over."""
    previous = bench.mode
    bench.set_mode(mode, provider)
    try:
        installed = _installed_wrappers()
        switch = _switch_of(bench)
    finally:
        bench.set_mode(previous)
    if switch is None:
        raise RuntimeError(f"{mode}: our instrumentor installed no wrappers")
    switch.active = True
    return installed, switch.telemetry


class WrapperReplay:
    """An instrumentation's own cost per call, without Hermes's 8 ms of noisy work around it.

    Built while ``mode`` is instrumented on ``bench``: takes the very wrapper callables the
    instrumentor installed on ``AIAgent.run_conversation``, ``_interruptible_api_call``,
    ``_execute_tool_calls`` and ``run_agent.handle_function_call`` (ours or loongsuite's),
    and wraps them with ``wrapt.FunctionWrapper`` around a stub that calls them in the
    order of one ``[tools:1]`` conversation (LLM asks for a tool, the tool, final LLM
    answer) with the real ``ChatCompletion`` objects of the in-process fake LLM. As
    Hermes does, each LLM call builds a ``threading.Thread`` for its request inside
    ``_interruptible_api_call`` (an instrumentation's hook on ``threading.Thread.__init__``,
    ours, wraps that thread class's ``__init__``, so it runs as on the real agent) and
    runs it: in place (``thread.run()``), since starting and joining an OS thread is
    Hermes's own cost, tens of µs that vary far more than any instrumentation's. Every
    other attribute the wrappers read on the instance (model, provider, session id,
    platform, the ``base_url`` property...) is the real agent's, read at the real
    agent's cost: the stub is an instance of a subclass of the agent's class holding a
    copy of its instance attributes. ``call()`` is the instrumented stub,
    ``bare_call()`` the same stub unwrapped; ``spans_per_call`` is checked against the
    real call's count by the callers.
    """

    def __init__(
        self,
        bench: HermesBench,
        mode: str,
        responses: Optional[Sequence[Any]] = None,
        wrappers: Optional[Dict[str, Any]] = None,
    ) -> None:
        import threading

        import wrapt

        first, final = responses if responses is not None else replay_responses(bench)
        if wrappers is not None:  # given wrapper callables by target name; ``mode`` only labels them
            installed, self.store = dict(wrappers), None
        else:
            previous = bench.mode
            bench.set_mode(mode)
            try:
                installed = _installed_wrappers()
                self.store = bench.store
                ours = _switch_of(bench)
            finally:
                bench.set_mode(previous)
            if ours is not None:
                # Our wrappers pass calls through once their instrumentor is uninstrumented (set_mode above did):
                # these ones, taken out of the classes, run here as they ran while installed.
                ours.active = True
        missing = [name for _, _, name in _STUB_TARGETS if name not in installed]
        if missing:
            raise RuntimeError(f"{mode}: no wrapper installed on {missing}")
        self.mode = mode
        real = bench.timed_agent

        def handle_function_call(function_name: str, function_args: dict, task_id: Any = None,
                                 tool_call_id: Any = None, **kwargs: Any) -> str:
            return str(function_args.get("text", ""))

        def make(wrapped: bool) -> Any:
            hfc = wrapt.FunctionWrapper(handle_function_call, installed["handle_function_call"]) if wrapped \
                else handle_function_call
            request_thread: Any = threading.Thread
            if wrapped and installed.get(_THREAD_INIT) is not None:
                class RequestThread(threading.Thread):  # what the hook on threading.Thread.__init__ sees
                    __init__ = wrapt.FunctionWrapper(threading.Thread.__init__, installed[_THREAD_INIT],
                                                     enabled=installed.get(THREAD_INIT_ENABLED))

                request_thread = RequestThread

            class StubAgent(type(real)):  # type: ignore[misc]  # the real class's properties and class attributes
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
                    # Hermes's interruptible_api_call builds the request's thread here; run in place (see above).
                    got: List[Any] = []
                    thread = request_thread(target=got.append, args=(final if len(api_kwargs["messages"]) > 1 else first,),
                                            daemon=True)
                    thread.run()
                    return got[0]

                def _execute_tool_calls(self, assistant_message: Any, messages: list, effective_task_id: str,
                                        api_call_count: int = 0) -> None:
                    for tool_call in assistant_message.tool_calls:
                        result = hfc(tool_call.function.name, {"text": "x"}, effective_task_id,
                                     tool_call_id=tool_call.id, session_id=real.session_id)
                        messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": result})

            if wrapped:
                for _, _, name in _STUB_TARGETS[:3]:
                    setattr(StubAgent, name, wrapt.FunctionWrapper(StubAgent.__dict__[name], installed[name]))
            # Not constructed (AIAgent.__init__ builds clients and probes): a subclass instance holding the real
            # agent's instance attributes, so every read a wrapper makes (an instance attribute, a property
            # such as base_url, a missing attribute with a default) costs what it costs on the real agent.
            stub = object.__new__(StubAgent)
            stub.__dict__.update(vars(real))
            return stub

        self._instrumented = make(True)
        self._bare = make(False)
        self.message = bench.message("stub")

    def call(self) -> Dict[str, Any]:
        """One instrumented stub conversation."""
        return self._instrumented.run_conversation(self.message)

    def bare_call(self) -> Dict[str, Any]:
        """The same stub conversation, unwrapped."""
        return self._bare.run_conversation(self.message)


def replay_responses(bench: HermesBench) -> Tuple[Any, Any]:
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
    bench: HermesBench,
    modes: Optional[Sequence[str]] = None,
    *,
    repeats: int = 20,
    calls: int = 200,
    block: Optional[Callable[[Callable[[], Any], int], float]] = None,
) -> Dict[str, Any]:
    """Seconds per call of each instrumentation's wrappers alone (instrumented stub minus bare stub, paired), and the floor.

    ``modes`` default: every backend, and ``loongsuite`` when installed. ``block`` times one block (see
    :func:`interleaved`: wall time by default, :func:`cpu_block` for this thread's CPU time). Returns
    ``{mode: [seconds per call, one per repeat], "floor": [...], "spans": {mode: spans per stub call}}``;
    spans go to the same counting provider as the full calls.
    """
    modes = list(modes if modes is not None else [m for m in bench.modes() if m != NONE])
    responses = replay_responses(bench)
    replays = {m: WrapperReplay(bench, m, responses) for m in modes}
    if bench.plan_spans == 0:
        bench.record_plan()
    out: Dict[str, Any] = {}
    spans = warm_up(bench, replays)
    out.update(interleaved(bench, replays, repeats=repeats, calls=calls, block=block))
    out["spans"] = spans
    return out


def warm_up(bench: HermesBench, replays: Dict[str, "WrapperReplay"], *, rounds: int = 20,
            expect: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Run each replay ``rounds`` times beside its bare stub, then once more counting the spans it makes; return
    ``{label: spans per call}``. Each label in ``expect`` must make the recorded plan's span count (a replay that
    makes another tree would time other work): a :class:`RuntimeError` names the one that does not."""
    spans: Dict[str, float] = {}
    for label, replay in replays.items():
        for _ in range(rounds):
            replay.call()
            replay.bare_call()
        ended = bench.spans_ended()
        replay.call()
        spans[label] = bench.spans_ended() - ended
        if expect is not None and label in expect and spans[label] != bench.plan_spans:
            raise RuntimeError(f"{label}: {spans[label]:.0f} spans per call, not {bench.plan_spans}")
    return spans


def cpu_block(fn: Callable[[], Any], calls: int) -> float:
    """Seconds of this thread's CPU time per call of ``calls`` sequential calls of ``fn`` (time this thread was not
    running, such as other processes' turns on a shared machine, does not count; the stubs run on this thread)."""
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls


def interleaved(
    bench: HermesBench,
    replays: Dict[str, WrapperReplay],
    *,
    repeats: int,
    calls: int,
    block: Optional[Callable[[Callable[[], Any], int], float]] = None,
) -> Dict[str, List[float]]:
    """Seconds per call, one per repeat, of each replay (instrumented stub minus bare stub) and of the floor.

    Blocks of ``calls`` calls, every replay and the floor in each repeat, the order rotated by one each repeat.
    ``block`` times one block (default: wall time, ``driver.timed_block``; :func:`cpu_block` for CPU time).
    """
    from statebackends_hermes_testbed.driver import timed_block as wall_block

    timed_block = block or wall_block

    out: Dict[str, List[float]] = {name: [] for name in [*replays, FLOOR]}
    items = list(out)
    for r in range(repeats):
        shift = r % len(items)
        for item in items[shift:] + items[:shift]:
            if item == FLOOR:
                out[FLOOR].append(timed_block(bench.floor_call, calls))
            else:
                replay = replays[item]
                bare = timed_block(replay.bare_call, calls)
                out[item].append(timed_block(replay.call, calls) - bare)
    return out

