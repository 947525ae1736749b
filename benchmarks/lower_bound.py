"""How low the wrappers-alone figure can go: the same spans through minimal hand-written wrappers.

``python -m benchmarks.lower_bound [repeats]`` replays, side by side in one process
(:class:`~benchmarks.replay.WrapperReplay`, blocks interleaved, order rotated), our
instrumentation's wrappers, loongsuite's when installed, the floor (6 bare SDK spans), and
*minimal* ``wrapt`` wrappers that make exactly our 6 spans (names, kinds, the attributes
recorded from a real call, set at start or at end as ours are), attach the same three
contexts (the chat's carried into its request thread as ours carries it) and keep the
per-call state in the same ``invocation_id`` store, with nothing
else: no guard around any OpenTelemetry or store call, no lifecycle objects, no metrics or
content switches, no subagent or Hermes-failure handling. Not an instrumentation anyone
should run: a lower bound for any that keeps our span tree and our store.

``python -m benchmarks.lower_bound --paths [repeats]`` swaps one of our three wrapper paths at a time
(``invoke_agent``, ``chat``, ``execute_tool``) for the minimal one, on one shared store, to show what
each path costs beyond the minimum (:func:`path_costs`).

``python -m benchmarks.lower_bound --carry [repeats]`` times ours beside ours with the chat wrapper of
the release before (the chat span not made current, nothing carried into the request thread, no
hook on ``threading.Thread.__init__``): what making the chat current and carrying it costs
(:func:`carry_cost`).
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import Any, Dict, List, Optional

from statebackends_hermes_testbed.driver import HermesBench
from statebackends_hermes_testbed.modes import LOONGSUITE

from .replay import THREAD_INIT_ENABLED, WrapperReplay, interleaved, replay_responses, warm_up
from .stats import trimmed_mean
from .timing import FLOOR

MINIMAL = "minimal"
END_KEYS = ("gen_ai.usage.", "gen_ai.response.")  # what ours sets when the call ends, not at span start


def minimal_wrappers(bench: HermesBench, provider: Any = None, store: Any = None, *, carry: bool = True) -> Dict[str, Any]:
    """The minimal wrapper callables, by target name, on ``provider`` (default ``bench``'s; see the module doc).

    ``store``: the ``invocation_id`` store to keep the state in (default a new one), so that they can share
    one with our wrappers (:func:`path_costs`). ``carry=False``: the chat is not made current nor carried into its
    request thread (no hook on ``threading.Thread.__init__``), as before this release (:func:`carry_cost`).
    """
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from statebackends_hermes_agent.config import resolve_store
    from statebackends_hermes_agent.lifecycle import REACT_FINISH_REASON, REACT_ROUND
    from statebackends_hermes_agent.state import InvocationState

    if bench.plan_spans == 0:
        bench.record_plan()
    agent_plan = bench._plan[0]  # noqa: SLF001 - the recorded span tree of one real call
    step_plan = agent_plan.children[0]
    chat_plan, tool_plan = step_plan.children[0], step_plan.children[1]
    agent_attributes = {k: v for k, v in agent_plan.attributes.items() if not k.startswith(END_KEYS)}
    chat_attributes = {k: v for k, v in chat_plan.attributes.items() if not k.startswith(END_KEYS)}
    step_attributes = {k: v for k, v in step_plan.attributes.items() if k != REACT_FINISH_REASON}
    tool_attributes = dict(tool_plan.attributes)  # its name and call id are the call's
    tracer = trace.get_tracer(MINIMAL, "0", provider if provider is not None else bench.provider)
    start_span, set_in = tracer.start_span, trace.set_span_in_context
    attach, detach, get_current = otel_context.attach, otel_context.detach, otel_context.get_current
    store = store if store is not None else resolve_store("invocation_id", InvocationState)
    owner: ContextVar[Any] = ContextVar("minimal_tool_owner", default=None)
    in_chat: ContextVar[bool] = ContextVar("minimal_in_chat", default=False)

    def run_conversation(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        scope = store.begin(instance, invocation_id="minimal")
        state = scope.state
        span = start_span(agent_plan.name, kind=agent_plan.kind, attributes=agent_attributes)
        state.agent_span, state.agent_ctx = span, set_in(span)
        token = attach(state.agent_ctx)
        try:
            return wrapped(*args, **{**kwargs, "task_id": "minimal"})
        finally:
            span.set_attributes({
                "gen_ai.usage.input_tokens": state.input_tokens, "gen_ai.usage.output_tokens": state.output_tokens,
                "gen_ai.response.id": state.response_id, "gen_ai.response.model": state.response_model,
                "gen_ai.response.finish_reasons": list(state.finish_reasons),
            })
            span.end()
            detach(token)
            store.end(scope)

    def api_call(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        state = store.current(instance)
        if state.step_span is None:
            state.round += 1
            step = start_span(step_plan.name, context=state.agent_ctx, kind=step_plan.kind,
                              attributes={**step_attributes, REACT_ROUND: state.round})
            state.step_span, state.step_ctx = step, set_in(step, state.agent_ctx)
        span = start_span(chat_plan.name, context=state.step_ctx, kind=chat_plan.kind, attributes=chat_attributes)
        if carry:
            token, gate = attach(set_in(span)), in_chat.set(True)
            try:
                response = wrapped(*args, **kwargs)
            finally:
                in_chat.reset(gate)
                detach(token)
        else:
            response = wrapped(*args, **kwargs)
        usage, choice = response.usage, response.choices[0]
        state.input_tokens += usage.prompt_tokens
        state.output_tokens += usage.completion_tokens
        state.response_id, state.response_model = response.id, response.model
        state.finish_reasons = (choice.finish_reason,)
        span.set_attributes({
            "gen_ai.usage.input_tokens": usage.prompt_tokens, "gen_ai.usage.output_tokens": usage.completion_tokens,
            "gen_ai.response.id": response.id, "gen_ai.response.model": response.model,
            "gen_ai.response.finish_reasons": [choice.finish_reason],
        })
        span.end()
        if not choice.message.tool_calls:
            step, state.step_span = state.step_span, None
            step.set_attributes({REACT_FINISH_REASON: choice.finish_reason})
            step.end()
        return response

    def execute_tool_calls(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        token = owner.set(instance)
        try:
            return wrapped(*args, **kwargs)
        finally:
            owner.reset(token)
            state = store.current(instance, args[2])
            step, state.step_span = state.step_span, None
            step.set_attributes({REACT_FINISH_REASON: "tool_calls"})
            step.end()

    def handle_function_call(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        state = store.current(owner.get(), args[2])
        attributes = {**tool_attributes, "gen_ai.tool.name": args[0], "gen_ai.tool.call.id": kwargs["tool_call_id"]}
        span = start_span(f"execute_tool {args[0]}", context=state.step_ctx, kind=tool_plan.kind,
                          attributes=attributes)
        token = attach(set_in(span))
        try:
            return wrapped(*args, **kwargs)
        finally:
            span.end()
            detach(token)

    def thread_init(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> None:
        wrapped(*args, **kwargs)
        if in_chat.get():
            run, context = instance.run, get_current()

            def carried_run() -> None:
                token = attach(context)
                try:
                    run()
                finally:
                    detach(token)
                    del instance.run

            instance.run = carried_run

    out = {"run_conversation": run_conversation, "_interruptible_api_call": api_call,
           "_execute_tool_calls": execute_tool_calls, "handle_function_call": handle_function_call}
    if carry:
        out["Thread.__init__"] = thread_init
    return out


def measure(bench: HermesBench, *, repeats: int = 20, calls: int = 200, mode: str = "invocation_id") -> Dict[str, List[float]]:
    """Seconds per call, one per repeat, of ``mode``'s wrappers, the minimal ones, loongsuite's (when installed) and the floor."""
    responses = replay_responses(bench)
    bench.record_plan()
    replays = {mode: WrapperReplay(bench, mode, responses),
               MINIMAL: WrapperReplay(bench, MINIMAL, responses, wrappers=minimal_wrappers(bench))}
    if LOONGSUITE in bench.modes():
        replays[LOONGSUITE] = WrapperReplay(bench, LOONGSUITE, responses)
    warm_up(bench, replays, expect=[name for name in replays if name != LOONGSUITE])  # ours and the minimal: our tree
    return interleaved(bench, replays, repeats=repeats, calls=calls)


PATHS = {
    "invoke_agent": ("run_conversation",),
    "chat": ("_interruptible_api_call",),
    "execute_tool": ("_execute_tool_calls", "handle_function_call"),  # one path: the tool's owner travels between them
}
"""Our three wrapper paths, by the wrapper callables each one is made of."""


def path_costs(bench: HermesBench, *, repeats: int = 20, calls: int = 200) -> Dict[str, List[float]]:
    """Seconds per call, one per repeat, of our ``invocation_id`` wrappers with one path at a time swapped for the
    minimal one (``"minimal <path>"``), of ours and of the minimal wrappers whole, and of the floor.

    Ours and the minimal wrappers share one store, so a swap changes only the Python of that path; ours minus
    ``minimal <path>`` is what that path costs beyond the minimum.
    """
    from .replay import installed_ours

    responses = replay_responses(bench)
    bench.record_plan()
    ours, telemetry = installed_ours(bench)
    minimal = minimal_wrappers(bench, store=telemetry.store)
    variants = {"ours": ours, MINIMAL: minimal}
    for path, names in PATHS.items():
        variants[f"{MINIMAL} {path}"] = {**ours, **{name: minimal[name] for name in names}}
    replays = {label: WrapperReplay(bench, label, responses, wrappers=wrappers) for label, wrappers in variants.items()}
    warm_up(bench, replays, expect=list(replays))  # every variant must make our span count
    return interleaved(bench, replays, repeats=repeats, calls=calls)


UNCARRIED = "ours, chat not current"
"""The label of ours with the chat wrapper of the release before (:func:`carry_cost`)."""
CURRENT_ONLY = "ours, chat current, not carried"
"""The label of ours without the hook on ``threading.Thread.__init__``: the chat made current, nothing carried."""
MINIMAL_UNCARRIED = "minimal, chat not current"
"""The label of the minimal wrappers without making the chat current or carrying it (:func:`carry_cost`)."""


def uncarried_wrappers(ours: Dict[str, Any], telemetry: Any) -> Dict[str, Any]:
    """``ours`` with the chat wrapper of the release before: the chat span is started and ended, never made current,
    and nothing is carried into the request thread (no hook on ``threading.Thread.__init__``); the suppression check
    of this release is kept, so that only making the chat current and carrying it differ."""
    from opentelemetry.instrumentation.utils import is_instrumentation_enabled

    from statebackends_hermes_agent.wrappers import _call

    def api_call(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        call = telemetry.start_chat(instance, args[0] if args else kwargs.get("api_kwargs"))
        return _call(call, wrapped, args, kwargs)

    out = {**ours, "_interruptible_api_call": api_call}
    out.pop("Thread.__init__", None)
    out.pop(THREAD_INIT_ENABLED, None)
    return out


def carry_cost(bench: HermesBench, *, repeats: int = 20, calls: int = 200) -> Dict[str, List[float]]:
    """CPU seconds per call, one per repeat, of our ``invocation_id`` wrappers, of the same without the thread hook
    (the chat made current, nothing carried), of the same without making the chat current or carrying it
    (:func:`uncarried_wrappers`), of the minimal wrappers with and without the same mechanism
    (what it costs with nothing around it), and of the floor; the stub's two chats each build and run their request
    thread in all of them. Ours minus the other, halved, is the cost per chat. Timed in this thread's CPU time
    (:func:`~benchmarks.replay.cpu_block`): on a shared machine other processes' turns would swamp a microsecond."""
    from .replay import cpu_block, installed_ours

    responses = replay_responses(bench)
    bench.record_plan()
    ours, telemetry = installed_ours(bench)
    if "Thread.__init__" not in ours:
        raise RuntimeError("our instrumentation installed no hook on threading.Thread.__init__")
    store = telemetry.store
    minimal = minimal_wrappers(bench, store=store)
    replays = {"ours": WrapperReplay(bench, "ours", responses, wrappers=ours),
               CURRENT_ONLY: WrapperReplay(bench, CURRENT_ONLY, responses, wrappers={
                   k: v for k, v in ours.items() if k not in ("Thread.__init__", THREAD_INIT_ENABLED)}),
               UNCARRIED: WrapperReplay(bench, UNCARRIED, responses, wrappers=uncarried_wrappers(ours, telemetry)),
               MINIMAL: WrapperReplay(bench, MINIMAL, responses, wrappers=minimal),
               MINIMAL_UNCARRIED: WrapperReplay(bench, MINIMAL_UNCARRIED, responses,
                                                wrappers=minimal_wrappers(bench, store=store, carry=False))}
    warm_up(bench, replays, expect=list(replays))  # every variant must make our span count
    return interleaved(bench, replays, repeats=repeats, calls=calls, block=cpu_block)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths, carry = "--paths" in argv, "--carry" in argv
    argv = [a for a in argv if a not in ("--paths", "--carry")]
    repeats = int(argv[0]) if argv else 20
    bench = HermesBench.timing()
    try:
        if carry:
            out = carry_cost(bench, repeats=repeats)
        elif paths:
            out = path_costs(bench, repeats=repeats)
        else:
            out = measure(bench, repeats=repeats)
    finally:
        bench.close()
    if carry:
        from .stats import bootstrap_ci, mean

        us = {k: trimmed_mean(v) * 1e6 for k, v in out.items()}
        print(f"making the chat current and carrying it into its request thread, {repeats} interleaved blocks of "
              "200 calls (2 chats each), this thread's CPU time, 20%-trimmed mean")
        print("| wrappers | us per call | / floor |")
        print("|---|---:|---:|")
        for name, value in us.items():
            print(f"| {name} | {value:.1f} | {value / us[FLOOR]:.3f}x |")
        for with_it, without in (("ours", UNCARRIED), (CURRENT_ONLY, UNCARRIED), (MINIMAL, MINIMAL_UNCARRIED)):
            diffs = [(a - b) * 1e6 / 2 for a, b in zip(out[with_it], out[without])]
            est, lo, hi = bootstrap_ci(diffs, trimmed_mean)
            print(f"{with_it}: {est:+.2f} us per chat [{lo:+.2f}, {hi:+.2f}] (95% bootstrap over the paired blocks; "
                  f"mean {mean(diffs):+.2f})")
        return 0
    if paths:
        us = {k: trimmed_mean(v) * 1e6 for k, v in out.items()}
        print(f"our wrapper paths beyond the minimum, {repeats} interleaved blocks of 200 calls, 20%-trimmed mean")
        print("| wrappers | us per call | / floor | ours minus this |")
        print("|---|---:|---:|---:|")
        for name, value in us.items():
            print(f"| {name} | {value:.1f} | {value / us[FLOOR]:.3f}x | {us['ours'] - value:+.1f} |")
        return 0
    us = {k: trimmed_mean(v) * 1e6 for k, v in out.items()}
    loong = us.get(LOONGSUITE)
    print(f"wrappers alone, {repeats} interleaved blocks of 200 calls, 20%-trimmed mean")
    print("| wrappers | us per call | / floor | / loongsuite 0.9.0 |")
    print("|---|---:|---:|---:|")
    for name, value in us.items():
        vs_loong = f"{value / loong:.3f}x" if loong else "n/a"
        print(f"| {name} | {value:.1f} | {value / us[FLOOR]:.3f}x | {vs_loong} |")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
