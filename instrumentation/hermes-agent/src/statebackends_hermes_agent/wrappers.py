"""The ``wrapt`` wrappers around hermes-agent's methods: factories closing over one :class:`HermesTelemetry`.

As ``opentelemetry-instrumentation-openai-v2``'s ``patch.py`` does, each factory below takes the telemetry
(and the switch :class:`HermesWrappers` that ``uninstrument()`` turns off) and returns the wrapper:
a thin call into the public lifecycle around the wrapped Hermes method (the invocation objects its
``start_*`` methods make, built here from its components directly). The lifecycle never raises
what the telemetry raises (only ``KeyboardInterrupt`` is let through), so the agent's return values,
exceptions and tool results pass through unchanged; spans are always ended and the state is always
released. Inside ``opentelemetry.instrumentation.utils.suppress_instrumentation()`` every wrapper only
calls the wrapped method (no span, metric or event), and the suppression reaches the threads Hermes
starts for the call's LLM requests and subagents.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

from .lifecycle import (
    AgentInvocation,
    ChatCall,
    HermesTelemetry,
    Invocation,
    PendingSubagent,
    ToolCall,
    _contain,
)

__all__ = ["FACTORIES", "HermesWrappers", "Wrapper"]

Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]
"""A ``wrapt`` wrapper: ``(wrapped, instance, args, kwargs)``, returning what ``wrapped`` returns."""


class Switch(Protocol):
    """What the wrappers read on every call: whether they trace (False once ``uninstrument()`` ran)."""

    active: bool


# The agent whose tool is running in this thread, set around Hermes's tool dispatch
# (same thread, synchronous), because ``handle_function_call`` is not given the agent.
_tool_owner: ContextVar[Any] = ContextVar("statebackends_hermes_tool_owner", default=None)
_tool_call_id: ContextVar[str | None] = ContextVar("statebackends_hermes_tool_call_id", default=None)
# True on the thread (or greenlet, or copied context) where one of our chat wrappers is running the LLM call: a
# ``threading.Thread`` built there carries OpenTelemetry's current context (the chat span's) into its ``run``.
_in_chat: ContextVar[bool] = ContextVar("statebackends_hermes_in_chat", default=False)
_THREADING_CONTEXT = "_otel_context"
"""Where opentelemetry-instrumentation-threading keeps the context its ``Thread.start`` wrapper captured."""
_CLASS_RUN = object()
"""A thread that had no ``run`` instance attribute before ours (its class's ``run`` runs)."""
_weakref = weakref.ref
_get_current = otel_context.get_current
_attach = otel_context.attach
_detach = otel_context.detach
_set_span_in_context = trace.set_span_in_context


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _call(operation: Invocation, wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the wrapped Hermes method; ``stop`` ``operation`` with its result or ``fail`` it with its exception, which
    passes unchanged."""
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        operation.fail(exc)
        raise
    operation.stop(result)
    return result


def _call_current(call: ChatCall, wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """:func:`_call` with the chat's span current here, and carried into the threads built under it (see
    :func:`thread_init`); what the wrapped call returns or raises passes unchanged."""
    span = call.span
    if span is None:  # nothing to make current (or the plain call inside a streaming one: its chat already is)
        return _call(call, wrapped, args, kwargs)
    token = None
    try:
        token = _attach(_set_span_in_context(span))
    except BaseException as exc:  # noqa: BLE001 - the call runs, its chat is just not current
        if isinstance(exc, KeyboardInterrupt):  # let through: the chat that started is ended first
            call.fail(exc)
        _contain(exc, "could not make the chat span current")
    gate = _in_chat.set(True)
    try:  # _call, inlined: one frame less per chat
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            call.fail(exc)
            raise
        call.stop(result)
        return result
    finally:
        _in_chat.reset(gate)
        if token is not None:
            try:
                _detach(token)
            except BaseException as exc:  # noqa: BLE001 - detach logs its own failure: a raising log handler
                _contain(exc, "could not detach the chat context")


def _call_in(context: Any, wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The wrapped call with OpenTelemetry's ``context`` attached around it (when it can be)."""
    token = None
    try:
        token = _attach(context)
    except BaseException as exc:  # noqa: BLE001 - the call runs in its own context
        _contain(exc, "could not attach a subagent's context")
    try:
        return wrapped(*args, **kwargs)
    finally:
        if token is not None:
            _detach_contained(token)


def _detach_contained(token: Any) -> None:
    """``detach(token)``: OpenTelemetry logs a failed detach, and a raising log handler raises from there."""
    try:
        _detach(token)
    except BaseException as exc:  # noqa: BLE001 - the call went on: only our detach failed
        _contain(exc, "could not detach a context")


def _carry_only(wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The wrapped chat call under ``suppress_instrumentation()``: no span, but the (suppressed) context is carried into
    the request thread, so the instrumentations there (an HTTP client's) see the suppression too."""
    gate = _in_chat.set(True)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _in_chat.reset(gate)


def _run_carried(thread_ref: Callable[[], Any], run: Any, context: Any) -> Any:
    """The thread's own ``run``, with OpenTelemetry's ``context`` attached unless the threading instrumentation carries
    one itself; set, bound by ``functools.partial``, as the thread's instance attribute ``run`` by :func:`thread_init`.

    It first gives the thread back the ``run`` attribute it had (``run``: an instance attribute set before
    ``Thread.__init__``, or :data:`_CLASS_RUN` for none), so what then runs is exactly what would have run (an instance
    ``run``, a staticmethod, any descriptor). The thread is held weakly: a thread built under a chat and never started
    is freed by reference counting, with the chat's context."""
    thread = thread_ref()
    if thread is None:  # only this partial outlived its thread: nothing is left to run
        return None
    if run is _CLASS_RUN:
        thread.__dict__.pop("run", None)
    else:
        thread.__dict__["run"] = run
    token = None
    if _THREADING_CONTEXT not in thread.__dict__:  # else opentelemetry-instrumentation-threading attaches its copy
        try:
            token = _attach(context)
        except BaseException as exc:  # noqa: BLE001 - the thread runs uncarried
            _contain(exc, "could not carry the chat context into a thread")
    try:
        return thread.run()
    finally:
        if token is not None:
            try:
                _detach(token)
            except BaseException as exc:  # noqa: BLE001 - detach logs its own failure: a raising log handler
                _contain(exc, "could not detach the chat context in its request thread")


class _SuppressedSubagent(PendingSubagent):
    """A child agent built under ``suppress_instrumentation()``: ``parent`` is that suppressed context, attached around
    the child's run in its worker (which copies no context), so the child traces nothing either."""

    __slots__ = ()


# -- the factories: one per wrapped Hermes callable -------------------------------------------------------------


def run_conversation(telemetry: HermesTelemetry, switch: Switch) -> Wrapper:
    """``AIAgent.run_conversation``: one ``invoke_agent`` (a subagent's hangs under its ``delegate_task``); when the
    caller passes no ``task_id``, the one the invocation made (shaped as Hermes's own) is passed on, so the tools get
    it; one the caller passes reaches Hermes and its tools unchanged."""
    components, take_subagent = telemetry.components, telemetry.take_subagent
    content = telemetry.capture_content

    def traced_run_conversation(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                                kwargs: dict[str, Any]) -> Any:
        if not switch.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        parent = None
        pending = take_subagent(instance) if telemetry.subagents_pending else None
        if pending is not None:
            if type(pending) is _SuppressedSubagent:  # built under suppress_instrumentation(): run it suppressed
                return _call_in(pending.parent, wrapped, args, kwargs)
            parent = pending.parent  # a subagent: hang under its parent's delegate_task span
        task_id = args[3] if len(args) > 3 else kwargs.get("task_id")
        invocation = AgentInvocation(components, instance, task_id, parent=parent,  # telemetry.start_invocation
                                     user_message=_arg(args, kwargs, 0, "user_message") if content else None)
        if not task_id:
            # Hermes would make one (``task_id or uuid4()``); making it here lets the id reach the tools.
            if len(args) > 3:
                args = (*args[:3], invocation.task_id, *args[4:])
            else:
                kwargs = {**kwargs, "task_id": invocation.task_id}
        return _call(invocation, wrapped, args, kwargs)

    return traced_run_conversation


def execute_tool_calls(telemetry: HermesTelemetry, switch: Switch) -> Wrapper:
    """``AIAgent._execute_tool_calls``: names the agent for the tools it runs, then ends the react step."""
    end_tool_round = telemetry.end_tool_round

    def traced_execute_tool_calls(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                                  kwargs: dict[str, Any]) -> Any:
        if not switch.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        token = _tool_owner.set(instance)
        error: BaseException | None = None
        try:
            return wrapped(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _tool_owner.reset(token)
            end_tool_round(instance, args[2] if len(args) > 2 else kwargs.get("effective_task_id"), error)

    return traced_execute_tool_calls


def api_call(telemetry: HermesTelemetry, switch: Switch) -> Wrapper:
    """``AIAgent._interruptible_api_call``: one ``chat`` span, current for the call and carried into its request
    thread."""
    components = telemetry.components

    def traced_api_call(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        if not switch.active:
            return wrapped(*args, **kwargs)
        if not is_instrumentation_enabled():
            return _carry_only(wrapped, args, kwargs)
        call = ChatCall(components, instance, args[0] if args else kwargs.get("api_kwargs"))  # telemetry.start_chat
        return _call_current(call, wrapped, args, kwargs)

    return traced_api_call


def streaming_api_call(telemetry: HermesTelemetry, switch: Switch) -> Wrapper:
    """``AIAgent._interruptible_streaming_api_call``: one ``chat`` span with the time to the first chunk."""
    components = telemetry.components

    def traced_streaming_api_call(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                                  kwargs: dict[str, Any]) -> Any:
        if not switch.active:
            return wrapped(*args, **kwargs)
        if not is_instrumentation_enabled():
            return _carry_only(wrapped, args, kwargs)
        call = ChatCall(components, instance, _arg(args, kwargs, 0, "api_kwargs"))  # telemetry.start_chat
        if call.span is not None:
            kwargs = {**kwargs, "on_first_delta": call.wrap_first_delta(kwargs.get("on_first_delta"))}
        return _call_current(call, wrapped, args, kwargs)

    return traced_streaming_api_call


def thread_init(telemetry: HermesTelemetry, switch: Switch) -> Wrapper:
    """``threading.Thread.__init__``: a thread built while one of our chat calls runs here (Hermes's request worker)
    runs with OpenTelemetry's current context, the chat span's, attached.

    Only OpenTelemetry's context is carried, as opentelemetry-instrumentation-threading carries it (which, when
    active, carries it alone): the thread runs in its own ``contextvars`` context, as Hermes made it.
    """

    def traced_thread_init(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> None:
        wrapped(*args, **kwargs)
        # Installed with enabled=_in_chat.get, wrapt calls this only where the gate is set; checked again for any
        # other installation (the benchmarks' stub, a copy of the wrapper).
        if _in_chat.get() and switch.active:
            try:
                instance.run = partial(_run_carried, _weakref(instance), vars(instance).get("run", _CLASS_RUN),
                                       _get_current())
            except BaseException as exc:  # noqa: BLE001 - the thread runs as it would, uncarried
                _contain(exc, "could not carry the chat context into a thread")

    return traced_thread_init


def invoke_tool(telemetry: HermesTelemetry, switch: Switch) -> Wrapper:
    """``AIAgent._invoke_tool``: names the agent and the tool call id for ``handle_function_call``."""

    def traced_invoke_tool(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
        if not switch.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        owner = _tool_owner.set(instance)
        call_id = _tool_call_id.set(_arg(args, kwargs, 3, "tool_call_id"))
        try:
            return wrapped(*args, **kwargs)
        finally:
            _tool_call_id.reset(call_id)
            _tool_owner.reset(owner)

    return traced_invoke_tool


def handle_function_call(telemetry: HermesTelemetry, switch: Switch) -> Wrapper:
    """``run_agent.handle_function_call``: one ``execute_tool`` span."""
    components = telemetry.components

    def traced_handle_function_call(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                                    kwargs: dict[str, Any]) -> Any:
        if not switch.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        n = len(args)  # handle_function_call(function_name, function_args, task_id=None, tool_call_id=None, ...)
        call = ToolCall(  # telemetry.start_tool
            components,
            _tool_owner.get(),
            args[0] if n else kwargs.get("function_name"),
            args[1] if n > 1 else kwargs.get("function_args"),
            task_id=args[2] if n > 2 else kwargs.get("task_id"),
            tool_call_id=(args[3] if n > 3 else kwargs.get("tool_call_id")) or _tool_call_id.get(),
        )
        return _call(call, wrapped, args, kwargs)

    return traced_handle_function_call


def dispatch_delegate_task(telemetry: HermesTelemetry, switch: Switch) -> Wrapper:
    """``AIAgent._dispatch_delegate_task``: the ``execute_tool delegate_task`` span its subagents hang under."""
    components = telemetry.components

    def traced_dispatch_delegate_task(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                                      kwargs: dict[str, Any]) -> Any:
        if not switch.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        call = ToolCall(components, instance, "delegate_task", _arg(args, kwargs, 0, "function_args"),
                        tool_call_id=_tool_call_id.get())  # telemetry.start_tool
        return _call(call, wrapped, args, kwargs)

    return traced_dispatch_delegate_task


def build_child_agent(telemetry: HermesTelemetry, switch: Switch) -> Wrapper:
    """``tools.delegate_tool._build_child_agent``: remembers where the child's invocation will hang (built in the
    parent's tool thread; run later in a worker that copies no context)."""
    prepare_subagent, register_subagent = telemetry.prepare_subagent, telemetry.register_subagent

    def traced_build_child_agent(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                                 kwargs: dict[str, Any]) -> Any:
        if not switch.active:
            return wrapped(*args, **kwargs)
        child = wrapped(*args, **kwargs)
        if is_instrumentation_enabled():
            prepare_subagent(child)
        else:
            try:
                register_subagent(child, _SuppressedSubagent(_get_current()))
            except BaseException as exc:  # noqa: BLE001 - an unhashable child: it runs unsuppressed, a trace of its own
                _contain(exc, "a subagent built under suppression runs traced")
        return child

    return traced_build_child_agent


FACTORIES: dict[str, Callable[[HermesTelemetry, Switch], Wrapper]] = {
    "run_conversation": run_conversation,
    "api_call": api_call,
    "streaming_api_call": streaming_api_call,
    "execute_tool_calls": execute_tool_calls,
    "invoke_tool": invoke_tool,
    "dispatch_delegate_task": dispatch_delegate_task,
    "handle_function_call": handle_function_call,
    "build_child_agent": build_child_agent,
    "thread_init": thread_init,
}
"""Every wrapper factory, by the name the instrumentor installs its wrapper under."""


class HermesWrappers:
    """The ``wrapt`` wrappers of one instrumentation, made by :data:`FACTORIES` over its ``telemetry``, as attributes of
    the same names; and their switch.

    Each wrapper returns what the wrapped Hermes method returns and raises what it raises. Once ``active`` is False
    (``uninstrument()``), each only calls the wrapped method: a wrapper that could not be taken out (another
    instrumentation's patch on top of it) traces nothing.
    """

    run_conversation: Wrapper
    api_call: Wrapper
    streaming_api_call: Wrapper
    execute_tool_calls: Wrapper
    invoke_tool: Wrapper
    dispatch_delegate_task: Wrapper
    handle_function_call: Wrapper
    build_child_agent: Wrapper
    thread_init: Wrapper

    def __init__(self, telemetry: HermesTelemetry) -> None:
        self.telemetry = telemetry
        self.active = True
        made = {name: factory(telemetry, self) for name, factory in FACTORIES.items()}
        for name, wrapper in made.items():
            setattr(self, name, wrapper)
        self.callables: frozenset[Wrapper] = frozenset(made.values())
        """Every wrapper made here (how ``uninstrument()`` tells ours from another instrumentation's)."""
