"""The ``wrapt`` wrappers around hermes-agent's methods: thin calls into the public lifecycle.

Each wrapper starts an invocation, a chat or a tool through :class:`HermesWrappers`'s
inherited :class:`~statebackends_hermes_agent.lifecycle.HermesTelemetry` methods, calls the
wrapped Hermes method, and stops or fails what it started. The lifecycle never raises, so
the agent's return values, exceptions and tool results pass through unchanged; spans are
always ended and the state is always released.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from functools import partial
from typing import Any, Callable, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

from .lifecycle import (  # noqa: F401 - re-exported: the public span and attribute names
    AGENT_NAME,
    EVICTED_ATTRIBUTE,
    EVICTED_EVENT,
    REACT_FINISH_REASON,
    REACT_ROUND,
    STEP_SPAN_NAME,
    AgentInvocation,
    ChatCall,
    HermesTelemetry,
    PendingSubagent,
    ToolCall,
)

__all__ = ["HermesWrappers"]

_logger = logging.getLogger(__name__)

# The agent whose tool is running in this thread, set around Hermes's tool dispatch
# (same thread, synchronous), because ``handle_function_call`` is not given the agent.
_tool_owner: ContextVar[Any] = ContextVar("statebackends_hermes_tool_owner", default=None)
_tool_call_id: ContextVar[Optional[str]] = ContextVar("statebackends_hermes_tool_call_id", default=None)
# True on the thread (or greenlet, or copied context) where one of our chat wrappers is running the LLM call: a
# ``threading.Thread`` built there carries OpenTelemetry's current context (the chat span's) into its ``run``.
_in_chat: ContextVar[bool] = ContextVar("statebackends_hermes_in_chat", default=False)
_THREADING_CONTEXT = "_otel_context"
"""Where opentelemetry-instrumentation-threading keeps the context its ``Thread.start`` wrapper captured."""
_get_current = otel_context.get_current
_attach = otel_context.attach
_detach = otel_context.detach
_set_span_in_context = trace.set_span_in_context


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default



def _call(operation: Any, wrapped: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Run the wrapped Hermes method; ``stop`` ``operation`` with its result or ``fail`` it with its exception, which passes unchanged."""
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        operation.fail(exc)
        raise
    operation.stop(result)
    return result


def _call_current(call: ChatCall, wrapped: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """:func:`_call` with the chat's span current here, and carried into the threads built under it (see
    :meth:`HermesWrappers.thread_init`); what the wrapped call returns or raises passes unchanged."""
    span = call.span
    if span is None:  # nothing to make current (or the plain call inside a streaming one: its chat already is)
        return _call(call, wrapped, args, kwargs)
    token = gate = None
    try:
        token = _attach(_set_span_in_context(span))
        gate = _in_chat.set(True)
    except Exception:  # noqa: BLE001 - the call runs, its chat is just not current
        _logger.exception("hermes-agent instrumentation: could not make the chat span current")
    try:
        return _call(call, wrapped, args, kwargs)
    finally:
        if gate is not None:
            _in_chat.reset(gate)
        if token is not None:
            _detach(token)  # OpenTelemetry's detach logs its own failures, never raises


def _run_carried(thread: Any, context: Any) -> Any:
    """``thread``'s own ``run`` (its class's), with OpenTelemetry's ``context`` attached unless the threading
    instrumentation carries one itself; set, bound by ``functools.partial``, as the thread's instance attribute
    ``run`` by :meth:`HermesWrappers.thread_init`, and removed when it returns (no reference cycle left)."""
    token = None
    if _THREADING_CONTEXT not in thread.__dict__:  # else opentelemetry-instrumentation-threading attaches its copy
        try:
            token = _attach(context)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not carry the chat context into a thread")
    try:
        return type(thread).run(thread)
    finally:
        if token is not None:
            _detach(token)
        thread.__dict__.pop("run", None)


def _carry_only(wrapped: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The wrapped chat call under ``suppress_instrumentation()``: no span, but the (suppressed) context is carried into
    the request thread, so the instrumentations there (an HTTP client's) see the suppression too."""
    gate = _in_chat.set(True)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _in_chat.reset(gate)


class _SuppressedSubagent(PendingSubagent):
    """A child agent built under ``suppress_instrumentation()``: ``parent`` is that suppressed context, attached around
    the child's run in its worker (which copies no context), so the child traces nothing either."""

    __slots__ = ()


class HermesWrappers(HermesTelemetry):
    """The ``wrapt`` wrapper callables of one instrumentation, on top of its :class:`HermesTelemetry`.

    Each wrapper returns what the wrapped Hermes method returns and raises what it raises. Once
    ``active`` is False (``uninstrument()``), each only calls the wrapped method: a wrapper that could
    not be taken out (another instrumentation's patch on top of it) traces nothing. Inside
    ``opentelemetry.instrumentation.utils.suppress_instrumentation()`` each only calls the wrapped method
    too (no span, metric or event), and the suppression reaches the threads Hermes starts for the call's
    LLM requests and subagents.
    """

    active = True

    # -- invoke_agent -------------------------------------------------------------------

    def run_conversation(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        """``AIAgent.run_conversation``: one ``invoke_agent`` (a subagent's hangs under its ``delegate_task``)."""
        if not self.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        parent = None
        if self._pending_data:  # only subagents are registered: most calls skip the look-up
            pending = self.take_subagent(instance)
            if type(pending) is _SuppressedSubagent:  # built under suppress_instrumentation(): run it suppressed
                token = _attach(pending.parent)
                try:
                    return wrapped(*args, **kwargs)
                finally:
                    _detach(token)
            if pending is not None:  # a subagent: hang under its parent's delegate_task span
                parent = pending.parent
        task_id = args[3] if len(args) > 3 else kwargs.get("task_id")
        invocation = self.start_invocation(
            instance,
            task_id,
            user_message=_arg(args, kwargs, 0, "user_message") if self.capture_content else None,
            parent=parent,
        )
        if not task_id:
            # Hermes would make one (``task_id or uuid4()``); making it here lets the id reach the tools.
            if len(args) > 3:
                args = args[:3] + (invocation.task_id,) + args[4:]
            else:
                kwargs = {**kwargs, "task_id": invocation.task_id}
        return _call(invocation, wrapped, args, kwargs)

    # -- react step ------------------------------------------------------------------------

    def execute_tool_calls(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        """``AIAgent._execute_tool_calls``: names the agent for the tools it runs, then ends the react step."""
        if not self.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        token = _tool_owner.set(instance)
        error: Optional[BaseException] = None
        try:
            return wrapped(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _tool_owner.reset(token)
            self.end_tool_round(instance, args[2] if len(args) > 2 else kwargs.get("effective_task_id"), error)

    # -- chat ----------------------------------------------------------------------------------

    def api_call(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        """``AIAgent._interruptible_api_call``: one ``chat`` span."""
        if not self.active:
            return wrapped(*args, **kwargs)
        if not is_instrumentation_enabled():
            return _carry_only(wrapped, args, kwargs)
        call = self.start_chat(instance, args[0] if args else kwargs.get("api_kwargs"))
        return _call_current(call, wrapped, args, kwargs)

    def streaming_api_call(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        """``AIAgent._interruptible_streaming_api_call``: one ``chat`` span with the time to the first chunk."""
        if not self.active:
            return wrapped(*args, **kwargs)
        if not is_instrumentation_enabled():
            return _carry_only(wrapped, args, kwargs)
        call = self.start_chat(instance, _arg(args, kwargs, 0, "api_kwargs"), streaming=True)
        if call.span is not None:
            kwargs = {**kwargs, "on_first_delta": call.wrap_first_delta(kwargs.get("on_first_delta"))}
        return _call_current(call, wrapped, args, kwargs)

    def thread_init(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> None:
        """``threading.Thread.__init__``: a thread built while one of our chat calls runs here (Hermes's request
        worker) runs with OpenTelemetry's current context, the chat span's, attached.

        Only OpenTelemetry's context is carried, as opentelemetry-instrumentation-threading carries it (which,
        when active, carries it alone): the thread runs in its own ``contextvars`` context, as Hermes made it.
        """
        wrapped(*args, **kwargs)
        # Installed with enabled=_in_chat.get, wrapt calls this only where the gate is set; checked again for any
        # other installation (the benchmarks' stub, a copy of the wrapper).
        if _in_chat.get() and self.active:
            try:
                instance.run = partial(_run_carried, instance, _get_current())
            except Exception:  # noqa: BLE001 - the thread runs as it would, uncarried
                _logger.exception("hermes-agent instrumentation: could not carry the chat context into a thread")

    # -- execute_tool --------------------------------------------------------------------------

    def invoke_tool(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        """``AIAgent._invoke_tool``: names the agent and the tool call id for ``handle_function_call``."""
        if not self.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        owner = _tool_owner.set(instance)
        call_id = _tool_call_id.set(_arg(args, kwargs, 3, "tool_call_id"))
        try:
            return wrapped(*args, **kwargs)
        finally:
            _tool_call_id.reset(call_id)
            _tool_owner.reset(owner)

    def handle_function_call(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        """``run_agent.handle_function_call``: one ``execute_tool`` span."""
        if not self.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        n = len(args)  # handle_function_call(function_name, function_args, task_id=None, tool_call_id=None, ...)
        call = self.start_tool(
            _tool_owner.get(),
            str(args[0] if n else kwargs.get("function_name")),
            args[1] if n > 1 else kwargs.get("function_args"),
            task_id=args[2] if n > 2 else kwargs.get("task_id"),
            tool_call_id=(args[3] if n > 3 else kwargs.get("tool_call_id")) or _tool_call_id.get(),
        )
        return _call(call, wrapped, args, kwargs)

    def dispatch_delegate_task(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        """``AIAgent._dispatch_delegate_task``: the ``execute_tool delegate_task`` span its subagents hang under."""
        if not self.active or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        call = self.start_tool(
            instance, "delegate_task", _arg(args, kwargs, 0, "function_args"), tool_call_id=_tool_call_id.get()
        )
        return _call(call, wrapped, args, kwargs)

    # -- subagents -------------------------------------------------------------------------------

    def build_child_agent(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        """``tools.delegate_tool._build_child_agent``: remembers where the child's invocation will hang."""
        if not self.active:
            return wrapped(*args, **kwargs)
        child = wrapped(*args, **kwargs)
        # Built in the parent's tool thread; run later in a worker that copies no context.
        if is_instrumentation_enabled():
            self.prepare_subagent(child)
        else:
            try:
                with self._pending_lock:
                    self._pending[child] = _SuppressedSubagent(_get_current())
            except Exception:  # noqa: BLE001 - an unhashable child: it runs unsuppressed, a trace of its own
                _logger.exception("hermes-agent instrumentation: a subagent built under suppression runs traced")
        return child
