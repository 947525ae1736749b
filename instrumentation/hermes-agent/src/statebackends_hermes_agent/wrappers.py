"""The wrappers around hermes-agent's methods.

Every span's parent comes from the invocation's state in the ``StateStore``,
so the backend alone decides whether the tree is right. The wrappers never ask
which backend that is. Our own errors are logged and swallowed; the agent's
exceptions pass through unchanged; spans are always ended and the state is
always released.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import weakref
from contextvars import ContextVar
from typing import Any, Callable, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GenAI
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from statebackends import StateStore

from .state import InvocationState, read_response

_logger = logging.getLogger(__name__)

# Attribute names newer than the oldest semantic-conventions release we admit.
_TIME_TO_FIRST_CHUNK = getattr(GenAI, "GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK", "gen_ai.response.time_to_first_chunk")
_INPUT_MESSAGES = getattr(GenAI, "GEN_AI_INPUT_MESSAGES", "gen_ai.input.messages")
_OUTPUT_MESSAGES = getattr(GenAI, "GEN_AI_OUTPUT_MESSAGES", "gen_ai.output.messages")
_TOOL_ARGUMENTS = getattr(GenAI, "GEN_AI_TOOL_CALL_ARGUMENTS", "gen_ai.tool.call.arguments")
_TOOL_RESULT = getattr(GenAI, "GEN_AI_TOOL_CALL_RESULT", "gen_ai.tool.call.result")
# The ReAct step attributes of the existing Hermes instrumentation, kept so dashboards carry over.
REACT_ROUND = "gen_ai.react.round"
REACT_FINISH_REASON = "gen_ai.react.finish_reason"
STEP_SPAN_NAME = "react step"
_OP_INVOKE_AGENT = GenAI.GenAiOperationNameValues.INVOKE_AGENT.value
_OP_CHAT = GenAI.GenAiOperationNameValues.CHAT.value
_OP_EXECUTE_TOOL = GenAI.GenAiOperationNameValues.EXECUTE_TOOL.value
AGENT_NAME = "hermes"

# The agent whose tool is running in this thread, set around Hermes's tool dispatch
# (same thread, synchronous), because ``handle_function_call`` is not given the agent.
_tool_owner: ContextVar[Any] = ContextVar("statebackends_hermes_tool_owner", default=None)
_tool_call_id: ContextVar[Optional[str]] = ContextVar("statebackends_hermes_tool_call_id", default=None)


def _call_through(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _record_error(span: Span, exc: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
    span.record_exception(exc)


def _mark_failed(span: Span, result: dict) -> None:
    """Hermes reports some failures (a non-retryable LLM error) in its result instead of raising."""
    span.set_status(Status(StatusCode.ERROR, str(result.get("error") or "agent run failed")))
    span.set_attribute(ERROR_TYPE, "agent_run_failed")


def _tool_error_type(result: Any) -> Optional[tuple[str, str]]:
    """Hermes turns a tool's exception into a JSON ``{"error": ...}`` result: (error.type, message) or None."""
    if not isinstance(result, str) or not result.startswith("{") or '"error"' not in result:
        return None
    try:
        payload = json.loads(result)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not payload.get("error") or payload.get("success") is True:
        return None
    message = str(payload["error"])
    error_type = "tool_error"
    marker = "Tool execution failed: "
    _, found, rest = message.partition(marker)
    if found and ":" in rest:
        name = rest.split(":", 1)[0].strip()
        error_type = name if name.isidentifier() else error_type
    return error_type, message


class HermesWrappers:
    """The ``wrapt`` wrappers of one instrumentation: a tracer, a meter and one state store."""

    def __init__(
        self,
        tracer: Tracer,
        store: StateStore[InvocationState],
        meter: Optional[Meter] = None,
        capture_content: bool = False,
    ) -> None:
        self.tracer = tracer
        self.store = store
        self.capture_content = capture_content
        self._launchers: "weakref.WeakKeyDictionary[Any, Callable[..., Any]]" = weakref.WeakKeyDictionary()
        self._launchers_lock = threading.Lock()
        self._duration = self._tokens = None
        if meter is not None:
            self._duration = gen_ai_metrics.create_gen_ai_client_operation_duration(meter)
            self._tokens = gen_ai_metrics.create_gen_ai_client_token_usage(meter)

    # -- invoke_agent -------------------------------------------------------------------

    def run_conversation(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        launcher = None
        if self._launchers:  # only subagents are registered: most calls skip the lock
            with self._launchers_lock:
                launcher = self._launchers.pop(instance, None)
        if launcher is not None:  # a subagent: run where its parent's invocation is visible
            return launcher(self._invoke_agent, wrapped, instance, args, kwargs)
        return self._invoke_agent(wrapped, instance, args, kwargs)

    def _invoke_agent(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        try:
            call_args, call_kwargs, opened = self._open_invocation(instance, args, kwargs)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not open invoke_agent; running uninstrumented")
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*call_args, **call_kwargs)
        except BaseException as exc:
            self._close_invocation(opened, error=exc)
            raise
        self._close_invocation(opened, result=result)
        return result

    def _open_invocation(self, instance: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple]:
        task_id = _arg(args, kwargs, 3, "task_id")
        if not task_id:
            # Hermes would make one (``task_id or uuid4()``); making it here lets the id reach the tools.
            task_id = str(uuid.uuid4())
            if len(args) > 3:
                args = args[:3] + (task_id,) + args[4:]
            else:
                kwargs = {**kwargs, "task_id": task_id}
        enclosing = self.store.current(instance)
        parent = self._parent_of_agent(enclosing)
        scope = self.store.begin(instance, invocation_id=task_id)
        token = None
        try:
            state = scope.state
            model = getattr(instance, "model", None)
            attributes: dict[str, Any] = {
                GenAI.GEN_AI_OPERATION_NAME: _OP_INVOKE_AGENT,
                GenAI.GEN_AI_AGENT_NAME: AGENT_NAME,
            }
            provider = getattr(instance, "provider", None)
            if provider:
                attributes[GenAI.GEN_AI_PROVIDER_NAME] = str(provider)
            if model:
                attributes[GenAI.GEN_AI_REQUEST_MODEL] = str(model)
            session_id = getattr(instance, "session_id", None)
            if session_id:
                attributes[GenAI.GEN_AI_CONVERSATION_ID] = str(session_id)
            if self.capture_content:
                attributes[_INPUT_MESSAGES] = json.dumps(
                    [{"role": "user", "parts": [{"type": "text", "content": str(_arg(args, kwargs, 0, "user_message"))}]}]
                )
            span = self.tracer.start_span(
                f"invoke_agent {AGENT_NAME}", context=parent, kind=SpanKind.INTERNAL, attributes=attributes
            )
            state.agent_span = span
            state.agent_ctx = trace.set_span_in_context(span, parent)
            token = otel_context.attach(trace.set_span_in_context(span))
        except BaseException:
            self.store.end(scope)
            raise
        return args, kwargs, (scope, token)

    def _parent_of_agent(self, enclosing: Optional[InvocationState]) -> Optional[otel_context.Context]:
        """A nested invocation hangs under its enclosing invocation; a top-level one under the caller's span."""
        if enclosing is None or enclosing.agent_span is None:
            return None
        ambient = trace.get_current_span().get_span_context()
        if ambient.is_valid and ambient.trace_id == enclosing.agent_span.get_span_context().trace_id:
            return None  # same thread (or a copied context): the ambient span is the exact parent
        return enclosing.delegate_parent or enclosing.agent_ctx

    def _close_invocation(self, opened: tuple, result: Any = None, error: Optional[BaseException] = None) -> None:
        scope, token = opened
        state: InvocationState = scope.state
        span = state.agent_span
        failed = error is None and isinstance(result, dict) and bool(result.get("failed"))
        try:
            if state.step_span is not None:
                if failed:
                    _mark_failed(state.step_span, result)
                self._end_step(state, "error" if error is not None or failed else None, error)
            if span is not None:
                if state.response_id:
                    span.set_attribute(GenAI.GEN_AI_RESPONSE_ID, state.response_id)
                if state.response_model:
                    span.set_attribute(GenAI.GEN_AI_RESPONSE_MODEL, state.response_model)
                if state.finish_reasons:
                    span.set_attribute(GenAI.GEN_AI_RESPONSE_FINISH_REASONS, list(state.finish_reasons))
                span.set_attribute(GenAI.GEN_AI_USAGE_INPUT_TOKENS, state.input_tokens)
                span.set_attribute(GenAI.GEN_AI_USAGE_OUTPUT_TOKENS, state.output_tokens)
                if error is not None:
                    _record_error(span, error)
                elif failed:
                    _mark_failed(span, result)
                if self.capture_content and isinstance(result, dict) and result.get("final_response"):
                    span.set_attribute(
                        _OUTPUT_MESSAGES,
                        json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": str(result["final_response"])}]}]),
                    )
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete invoke_agent")
        finally:
            try:
                if span is not None:
                    span.end()
            finally:
                try:
                    if token is not None:
                        otel_context.detach(token)
                finally:
                    self.store.end(scope)

    # -- react step ------------------------------------------------------------------------

    def _start_step(self, state: InvocationState) -> None:
        state.round += 1
        span = self.tracer.start_span(
            STEP_SPAN_NAME,
            context=state.agent_ctx,
            kind=SpanKind.INTERNAL,
            attributes={REACT_ROUND: state.round},
        )
        state.step_span = span
        state.step_ctx = trace.set_span_in_context(span, state.agent_ctx)

    def _end_step(self, state: InvocationState, finish_reason: Optional[str], error: Optional[BaseException] = None) -> None:
        span, state.step_span, state.step_ctx = state.step_span, None, None
        if span is None:
            return
        try:
            if finish_reason:
                span.set_attribute(REACT_FINISH_REASON, finish_reason)
            if error is not None:
                _record_error(span, error)
        finally:
            span.end()

    def execute_tool_calls(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        token = _tool_owner.set(instance)
        error: Optional[BaseException] = None
        try:
            return wrapped(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _tool_owner.reset(token)
            self.end_tool_round(instance, _arg(args, kwargs, 2, "effective_task_id"), error)

    def end_tool_round(self, owner: Any, task_id: Any, error: Optional[BaseException]) -> None:
        """Close the ReAct step once its tools ran (or failed); never raises."""
        try:
            state = self.store.current(owner, task_id)
            if state is not None:
                self._end_step(state, "error" if error is not None else "tool_calls", error)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not end the react step")

    # -- chat ----------------------------------------------------------------------------------

    def api_call(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        return self._chat(wrapped, instance, args, kwargs, streaming=False)

    def streaming_api_call(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        return self._chat(wrapped, instance, args, kwargs, streaming=True)

    def _chat(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict, streaming: bool) -> Any:
        try:
            opened = self._start_chat(instance, args, kwargs, streaming)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not start the chat span")
            return wrapped(*args, **kwargs)
        state, span, started, call_kwargs, labels = opened
        try:
            response = wrapped(*args, **call_kwargs)
        except BaseException as exc:
            self._end_chat(state, span, started, labels, None, exc)
            raise
        self._end_chat(state, span, started, labels, response, None)
        return response

    def _start_chat(self, instance: Any, args: tuple, kwargs: dict, streaming: bool) -> tuple:
        state = self.store.current(instance)
        if state is not None:
            if state.llm_depth > 0:  # the streaming path falling back to the plain call: one span
                state.llm_depth += 1
                return state, None, 0.0, kwargs, None
            if state.step_span is None:
                self._start_step(state)
        api_kwargs = _arg(args, kwargs, 0, "api_kwargs") or {}
        model = api_kwargs.get("model") if isinstance(api_kwargs, dict) else None
        model = model or getattr(instance, "model", None) or "unknown"
        attributes: dict[str, Any] = {
            GenAI.GEN_AI_OPERATION_NAME: _OP_CHAT,
            GenAI.GEN_AI_REQUEST_MODEL: str(model),
        }
        provider = getattr(instance, "provider", None)
        if provider:
            attributes[GenAI.GEN_AI_PROVIDER_NAME] = str(provider)
        span = self.tracer.start_span(
            f"chat {model}",
            context=state.step_ctx if state is not None else None,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        started = time.monotonic()
        if streaming:
            original = kwargs.get("on_first_delta")

            def on_first_delta() -> Any:
                try:
                    span.set_attribute(_TIME_TO_FIRST_CHUNK, time.monotonic() - started)
                except Exception:  # noqa: BLE001
                    _logger.debug("hermes-agent instrumentation: time to first chunk not recorded", exc_info=True)
                if original is not None:
                    return original()
                return None

            kwargs = {**kwargs, "on_first_delta": on_first_delta}
        if state is not None:
            state.llm_depth += 1
        return state, span, started, kwargs, attributes

    def _end_chat(
        self,
        state: Optional[InvocationState],
        span: Optional[Span],
        started: float,
        labels: Optional[dict[str, Any]],
        response: Any,
        error: Optional[BaseException],
    ) -> None:
        try:
            if state is not None:
                state.llm_depth -= 1
            if span is None:
                return
            try:
                attributes: dict[str, Any] = {}
                if error is not None:
                    _record_error(span, error)
                else:
                    input_tokens, output_tokens, reasons, wants_tools = read_response(response)
                    response_id = getattr(response, "id", None)
                    response_model = getattr(response, "model", None)
                    if response_id:
                        attributes[GenAI.GEN_AI_RESPONSE_ID] = str(response_id)
                    if response_model:
                        attributes[GenAI.GEN_AI_RESPONSE_MODEL] = str(response_model)
                    if reasons:
                        attributes[GenAI.GEN_AI_RESPONSE_FINISH_REASONS] = list(reasons)
                    attributes[GenAI.GEN_AI_USAGE_INPUT_TOKENS] = input_tokens
                    attributes[GenAI.GEN_AI_USAGE_OUTPUT_TOKENS] = output_tokens
                    span.set_attributes(attributes)
                    if state is not None:
                        state.input_tokens += input_tokens
                        state.output_tokens += output_tokens
                        state.response_id = str(response_id) if response_id else state.response_id
                        state.response_model = str(response_model) if response_model else state.response_model
                        state.finish_reasons = reasons or state.finish_reasons
                        if not wants_tools:  # a final answer closes the round
                            self._end_step(state, reasons[0] if reasons else "stop")
                    self._record_metrics(labels or {}, started, input_tokens, output_tokens)
            finally:
                span.end()
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete the chat span")

    def _record_metrics(self, labels: dict[str, Any], started: float, input_tokens: int, output_tokens: int) -> None:
        """``labels`` are the chat span's start attributes: operation, provider and request model."""
        if self._duration is None:
            return
        self._duration.record(time.monotonic() - started, labels)
        if self._tokens is not None:
            self._tokens.record(input_tokens, {**labels, GenAI.GEN_AI_TOKEN_TYPE: "input"})
            self._tokens.record(output_tokens, {**labels, GenAI.GEN_AI_TOKEN_TYPE: "output"})

    # -- execute_tool --------------------------------------------------------------------------

    def invoke_tool(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        owner = _tool_owner.set(instance)
        call_id = _tool_call_id.set(_arg(args, kwargs, 3, "tool_call_id"))
        try:
            return wrapped(*args, **kwargs)
        finally:
            _tool_call_id.reset(call_id)
            _tool_owner.reset(owner)

    def handle_function_call(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        return self._tool(
            wrapped,
            args,
            kwargs,
            owner=_tool_owner.get(),
            name=_arg(args, kwargs, 0, "function_name"),
            arguments=_arg(args, kwargs, 1, "function_args"),
            task_id=_arg(args, kwargs, 2, "task_id"),
            tool_call_id=_arg(args, kwargs, 3, "tool_call_id") or _tool_call_id.get(),
        )

    def dispatch_delegate_task(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        return self._tool(
            wrapped,
            args,
            kwargs,
            owner=instance,
            name="delegate_task",
            arguments=_arg(args, kwargs, 0, "function_args"),
            task_id=None,
            tool_call_id=_tool_call_id.get(),
        )

    def _tool(
        self,
        wrapped: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        *,
        owner: Any,
        name: Any,
        arguments: Any,
        task_id: Any,
        tool_call_id: Any,
    ) -> Any:
        try:
            span, token = self._start_tool(owner, str(name), arguments, task_id, tool_call_id)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not start the execute_tool span")
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            self._end_tool(span, token, None, exc)
            raise
        self._end_tool(span, token, result, None)
        return result

    def _start_tool(self, owner: Any, name: str, arguments: Any, task_id: Any, tool_call_id: Any) -> tuple:
        state = self.store.current(owner, task_id or None)
        parent = None
        if state is not None:
            parent = state.step_ctx or state.agent_ctx
        attributes: dict[str, Any] = {
            GenAI.GEN_AI_OPERATION_NAME: _OP_EXECUTE_TOOL,
            GenAI.GEN_AI_TOOL_NAME: name,
            GenAI.GEN_AI_TOOL_TYPE: "function",
        }
        if tool_call_id:
            attributes[GenAI.GEN_AI_TOOL_CALL_ID] = str(tool_call_id)
        if self.capture_content and arguments is not None:
            attributes[_TOOL_ARGUMENTS] = json.dumps(arguments, default=str)
        span = self.tracer.start_span(f"execute_tool {name}", context=parent, kind=SpanKind.INTERNAL, attributes=attributes)
        span_ctx = trace.set_span_in_context(span)
        if state is not None and name == "delegate_task":
            state.delegate_parent = span_ctx
        return span, otel_context.attach(span_ctx)

    def _end_tool(self, span: Span, token: Any, result: Any, error: Optional[BaseException]) -> None:
        try:
            if error is not None:
                _record_error(span, error)
            else:
                failure = _tool_error_type(result)
                if failure is not None:
                    span.set_status(Status(StatusCode.ERROR, failure[1]))
                    span.set_attribute(ERROR_TYPE, failure[0])
                if self.capture_content and result is not None:
                    span.set_attribute(_TOOL_RESULT, result if isinstance(result, str) else json.dumps(result, default=str))
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete the execute_tool span")
        finally:
            try:
                span.end()
            finally:
                otel_context.detach(token)

    # -- subagents -------------------------------------------------------------------------------

    def build_child_agent(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        child = wrapped(*args, **kwargs)
        try:
            # Built in the parent's tool thread; run later in a worker that copies no context.
            launcher = self.store.propagate(_call_through)
            with self._launchers_lock:
                self._launchers[child] = launcher
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: subagent will start a trace of its own")
        return child
