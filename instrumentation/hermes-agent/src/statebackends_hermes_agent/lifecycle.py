"""The public lifecycle of the Hermes telemetry: start an invocation, a chat or a tool; stop or fail it.

In the spirit of ``opentelemetry-util-genai``'s invocation objects: :class:`HermesTelemetry`
holds the tracer, the meter, the state store and the content-capture flag, and its
``start_*`` methods return small objects (:class:`AgentInvocation`, :class:`ChatCall`,
:class:`ToolCall`) whose ``stop(result)`` and ``fail(exc)`` end what was started.

The contract, for every public method here: it NEVER raises (an ``Exception`` inside the
telemetry, from a span processor, a store, a meter, is logged and swallowed; only a
``BaseException`` that is not an ``Exception``, such as ``KeyboardInterrupt`` arriving
while a span starts, is re-raised after cleaning up), ``stop``/``fail`` are idempotent
(the first one wins), every span that was started is ended, and every state that was
begun in the store is ended, whatever failed before. So the instrumented agent's return
value, its exceptions and its tools' results are never changed by the telemetry.

Every span's parent comes from the invocation's state in the ``StateStore``, so the
backend alone decides whether the tree is right; this module never asks which backend
it is.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Meter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GenAI
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from statebackends import StateStore

from .state import InvocationState, read_response

__all__ = [
    "AGENT_NAME",
    "AgentInvocation",
    "ChatCall",
    "EVICTED_ATTRIBUTE",
    "EVICTED_EVENT",
    "HermesTelemetry",
    "REACT_FINISH_REASON",
    "REACT_ROUND",
    "STEP_SPAN_NAME",
    "ToolCall",
]

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
EVICTED_ATTRIBUTE = "statebackends.state.evicted"
"""Set (True) on an ``invoke_agent`` span whose state the store evicted while the call was still open."""
EVICTED_EVENT = "statebackends.state.evicted"
"""The span event recorded with :data:`EVICTED_ATTRIBUTE`; its ``statebackends.state.backend`` names the store."""
_OP_INVOKE_AGENT = GenAI.GenAiOperationNameValues.INVOKE_AGENT.value
_OP_CHAT = GenAI.GenAiOperationNameValues.CHAT.value
_OP_EXECUTE_TOOL = GenAI.GenAiOperationNameValues.EXECUTE_TOOL.value
AGENT_NAME = "hermes"
_AGENT_SPAN_NAME = f"invoke_agent {AGENT_NAME}"


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


def _end_span(span: Optional[Span], what: str) -> None:
    """``span.end()`` that never raises (a span processor's ``on_end`` may)."""
    if span is None:
        return
    try:
        span.end()
    except Exception:  # noqa: BLE001
        _logger.exception("hermes-agent instrumentation: could not end the %s span", what)


def _call_through(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


# -- invoke_agent ---------------------------------------------------------------------------------------------


class AgentInvocation:
    """One ``invoke_agent``: returned by :meth:`HermesTelemetry.start_invocation`, ended by ``stop`` or ``fail``.

    ``task_id`` is the invocation id the store keys the state by (the one given, or a new
    one): pass it to the agent so its tools carry it. ``span`` is the ``invoke_agent`` span,
    or None when the telemetry could not start it (the call then runs uninstrumented).
    """

    __slots__ = ("_telemetry", "task_id", "scope", "span", "_token", "_done")

    def __init__(self, telemetry: "HermesTelemetry", task_id: str) -> None:
        self._telemetry = telemetry
        self.task_id = task_id
        self.scope: Any = None
        self.span: Optional[Span] = None
        self._token: Any = None
        self._done = False

    @property
    def evicted(self) -> bool:
        """Whether the store evicted this invocation's state while it was open (its scope says so)."""
        return bool(getattr(self.scope, "evicted", False))

    def stop(self, result: Any = None) -> None:
        """End the invocation with the agent's ``result`` (a Hermes result dict may report a failure); never raises."""
        self._close(result, None)

    def fail(self, error: BaseException) -> None:
        """End the invocation with the agent's exception ``error``, recorded on the span; never raises."""
        self._close(None, error)

    def _close(self, result: Any, error: Optional[BaseException]) -> None:
        if self._done:
            return
        self._done = True
        scope = self.scope
        if scope is None:
            return
        telemetry = self._telemetry
        span = self.span
        try:
            state: InvocationState = scope.state
            failed = error is None and isinstance(result, dict) and bool(result.get("failed"))
            if state.step_span is not None:
                if failed:
                    try:
                        _mark_failed(state.step_span, result)
                    except Exception:  # noqa: BLE001
                        _logger.exception("hermes-agent instrumentation: could not mark the react step failed")
                telemetry._end_step(state, "error" if error is not None or failed else None, error)
            if span is not None:
                attributes: dict[str, Any] = {
                    GenAI.GEN_AI_USAGE_INPUT_TOKENS: state.input_tokens,
                    GenAI.GEN_AI_USAGE_OUTPUT_TOKENS: state.output_tokens,
                }
                if state.response_id:
                    attributes[GenAI.GEN_AI_RESPONSE_ID] = state.response_id
                if state.response_model:
                    attributes[GenAI.GEN_AI_RESPONSE_MODEL] = state.response_model
                if state.finish_reasons:
                    attributes[GenAI.GEN_AI_RESPONSE_FINISH_REASONS] = list(state.finish_reasons)
                if telemetry.capture_content and isinstance(result, dict) and result.get("final_response"):
                    attributes[_OUTPUT_MESSAGES] = json.dumps(
                        [{"role": "assistant", "parts": [{"type": "text", "content": str(result["final_response"])}]}]
                    )
                if getattr(scope, "evicted", False):
                    # Not an error of the call (the agent's answer is fine): the telemetry of this call may be
                    # incomplete, because its state was dropped to keep the store bounded.
                    attributes[EVICTED_ATTRIBUTE] = True
                    span.add_event(
                        EVICTED_EVENT,
                        {"statebackends.state.backend": telemetry.store.name or type(telemetry.store).__name__},
                    )
                span.set_attributes(attributes)
                if error is not None:
                    _record_error(span, error)
                elif failed:
                    _mark_failed(span, result)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete invoke_agent")
        finally:
            try:
                _end_span(span, "invoke_agent")
            finally:
                try:
                    if self._token is not None:
                        otel_context.detach(self._token)
                except Exception:  # noqa: BLE001
                    _logger.exception("hermes-agent instrumentation: could not detach the invoke_agent context")
                finally:
                    telemetry._end_scope(scope)


# -- chat ------------------------------------------------------------------------------------------------------


class ChatCall:
    """One LLM round trip (a ``chat`` span): returned by :meth:`HermesTelemetry.start_chat`.

    ``span`` is None when no span was started (the telemetry failed, or this is the plain
    call Hermes falls back to inside a streaming call, which the outer span already covers).
    """

    __slots__ = ("_telemetry", "_state", "span", "_started", "_labels", "_done")

    def __init__(
        self,
        telemetry: "HermesTelemetry",
        state: Optional[InvocationState],
        span: Optional[Span],
        started: float,
        labels: Optional[dict[str, Any]],
        done: bool = False,
    ) -> None:
        self._telemetry = telemetry
        self._state = state
        self.span = span
        self._started = started
        self._labels = labels
        self._done = done

    def first_chunk(self) -> None:
        """Record the time to the first streamed chunk on the span; never raises."""
        span = self.span
        if span is None:
            return
        try:
            span.set_attribute(_TIME_TO_FIRST_CHUNK, time.monotonic() - self._started)
        except Exception:  # noqa: BLE001
            _logger.debug("hermes-agent instrumentation: time to first chunk not recorded", exc_info=True)

    def wrap_first_delta(self, callback: Optional[Callable[[], Any]]) -> Callable[[], Any]:
        """A callback for Hermes's ``on_first_delta``: records :meth:`first_chunk`, then calls ``callback`` (if any)."""
        first_chunk = self.first_chunk

        def on_first_delta() -> Any:
            first_chunk()
            if callback is not None:
                return callback()
            return None

        return on_first_delta

    def stop(self, response: Any) -> None:
        """End the chat with the LLM's ``response`` (usage, ids, finish reasons, metrics); never raises."""
        if self._done:
            return
        self._done = True
        state = self._state
        try:
            if state is not None:
                state.llm_depth -= 1
            span = self.span
            if span is None:
                return
            try:
                input_tokens, output_tokens, reasons, wants_tools = read_response(response)
                response_id = getattr(response, "id", None)
                response_model = getattr(response, "model", None)
                attributes: dict[str, Any] = {
                    GenAI.GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
                    GenAI.GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
                }
                if response_id:
                    attributes[GenAI.GEN_AI_RESPONSE_ID] = str(response_id)
                if response_model:
                    attributes[GenAI.GEN_AI_RESPONSE_MODEL] = str(response_model)
                if reasons:
                    attributes[GenAI.GEN_AI_RESPONSE_FINISH_REASONS] = list(reasons)
                if state is not None:
                    state.input_tokens += input_tokens
                    state.output_tokens += output_tokens
                    if response_id:
                        state.response_id = str(response_id)
                    if response_model:
                        state.response_model = str(response_model)
                    state.finish_reasons = reasons or state.finish_reasons
                    if not wants_tools:  # a final answer closes the round
                        self._telemetry._end_step(state, reasons[0] if reasons else "stop")
                span.set_attributes(attributes)
                self._telemetry._record_metrics(self._labels, self._started, input_tokens, output_tokens)
            finally:
                _end_span(span, "chat")
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete the chat span")

    def fail(self, error: BaseException) -> None:
        """End the chat with the exception the LLM call raised, recorded on the span; never raises."""
        if self._done:
            return
        self._done = True
        try:
            if self._state is not None:
                self._state.llm_depth -= 1
            span = self.span
            if span is None:
                return
            try:
                _record_error(span, error)
            finally:
                _end_span(span, "chat")
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete the chat span")


# -- execute_tool -----------------------------------------------------------------------------------------------


class ToolCall:
    """One tool execution (an ``execute_tool`` span, current while the tool runs): from :meth:`HermesTelemetry.start_tool`."""

    __slots__ = ("_telemetry", "span", "_token", "_done")

    def __init__(self, telemetry: "HermesTelemetry", span: Optional[Span], token: Any, done: bool = False) -> None:
        self._telemetry = telemetry
        self.span = span
        self._token = token
        self._done = done

    def stop(self, result: Any) -> None:
        """End the tool with its ``result`` (a Hermes ``{"error": ...}`` result marks the span failed); never raises."""
        self._close(result, None)

    def fail(self, error: BaseException) -> None:
        """End the tool with the exception it raised, recorded on the span; never raises."""
        self._close(None, error)

    def _close(self, result: Any, error: Optional[BaseException]) -> None:
        if self._done:
            return
        self._done = True
        span = self.span
        try:
            if error is not None:
                _record_error(span, error)  # type: ignore[arg-type]
            else:
                failure = _tool_error_type(result)
                if failure is not None:
                    span.set_status(Status(StatusCode.ERROR, failure[1]))  # type: ignore[union-attr]
                    span.set_attribute(ERROR_TYPE, failure[0])  # type: ignore[union-attr]
                if self._telemetry.capture_content and result is not None:
                    span.set_attribute(  # type: ignore[union-attr]
                        _TOOL_RESULT, result if isinstance(result, str) else json.dumps(result, default=str)
                    )
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete the execute_tool span")
        finally:
            try:
                _end_span(span, "execute_tool")
            finally:
                try:
                    otel_context.detach(self._token)
                except Exception:  # noqa: BLE001
                    _logger.exception("hermes-agent instrumentation: could not detach the execute_tool context")


# -- subagents ---------------------------------------------------------------------------------------------------


class PendingSubagent:
    """A child agent built by ``delegate_task`` and not yet run: the parent span context and the store's launcher."""

    __slots__ = ("launcher", "parent")

    def __init__(self, launcher: Optional[Callable[..., Any]], parent: Optional[Context]) -> None:
        self.launcher = launcher
        self.parent = parent

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` through the store's launcher; a launcher that fails around ``fn`` never changes its outcome."""
        launcher = self.launcher
        if launcher is None:
            return fn(*args)
        outcome: list[Any] = []  # [result] once fn returned, [None, exc] once it raised

        def body(*inner: Any) -> Any:
            try:
                result = fn(*inner)
            except BaseException as exc:
                outcome[:] = [None, exc]
                raise
            outcome[:] = [result]
            return result

        try:
            return launcher(body, *args)
        except BaseException as exc:
            if len(outcome) == 2:  # the agent's own exception
                if exc is outcome[1]:
                    raise
                raise outcome[1]  # noqa: B904 - the agent's exception, not the launcher's
            if len(outcome) == 1:  # the launcher failed after the agent returned: keep the result
                _logger.exception("hermes-agent instrumentation: the subagent launcher failed after the call")
                return outcome[0]
            if not isinstance(exc, Exception):
                raise
            _logger.exception("hermes-agent instrumentation: the subagent launcher failed; running it directly")
        return fn(*args)


# -- the telemetry ------------------------------------------------------------------------------------------------


class HermesTelemetry:
    """The tracer, meter, state store and content-capture flag of one instrumentation, and its public lifecycle.

    ``start_invocation``, ``start_chat`` and ``start_tool`` never raise and return objects whose
    ``stop``/``fail`` never raise; ``end_tool_round`` and ``prepare_subagent`` never raise.
    """

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
        self._pending: "weakref.WeakKeyDictionary[Any, PendingSubagent]" = weakref.WeakKeyDictionary()
        self._pending_lock = threading.Lock()
        self._duration = self._tokens = None
        if meter is not None:
            try:
                self._duration = gen_ai_metrics.create_gen_ai_client_operation_duration(meter)
                self._tokens = gen_ai_metrics.create_gen_ai_client_token_usage(meter)
            except Exception:  # noqa: BLE001
                _logger.exception("hermes-agent instrumentation: metrics disabled, the instruments could not be created")
                self._duration = self._tokens = None

    # -- invoke_agent ---------------------------------------------------------------------------

    def start_invocation(
        self,
        agent: Any,
        task_id: Optional[str] = None,
        *,
        user_message: Any = None,
        parent: Optional[Context] = None,
    ) -> AgentInvocation:
        """Begin the state of one invocation of ``agent`` and start its ``invoke_agent`` span, current here.

        ``task_id`` is the invocation id (a new one when falsy: read it back from the result's
        ``task_id``). ``parent`` is the span context to hang under (a subagent's), else the
        enclosing invocation's or the caller's span. Never raises: on failure the invocation
        is returned with no span and nothing left in the store.
        """
        invocation = AgentInvocation(self, task_id or str(uuid.uuid4()))
        store = self.store
        scope = span = None
        try:
            if parent is None:
                parent = self._parent_of_agent(agent)
            scope = store.begin(agent, invocation_id=invocation.task_id)
            state = scope.state
            attributes: dict[str, Any] = {
                GenAI.GEN_AI_OPERATION_NAME: _OP_INVOKE_AGENT,
                GenAI.GEN_AI_AGENT_NAME: AGENT_NAME,
            }
            provider = getattr(agent, "provider", None)
            if provider:
                attributes[GenAI.GEN_AI_PROVIDER_NAME] = str(provider)
            model = getattr(agent, "model", None)
            if model:
                attributes[GenAI.GEN_AI_REQUEST_MODEL] = str(model)
            session_id = getattr(agent, "session_id", None)
            if session_id:
                attributes[GenAI.GEN_AI_CONVERSATION_ID] = str(session_id)
            if self.capture_content:
                attributes[_INPUT_MESSAGES] = json.dumps(
                    [{"role": "user", "parts": [{"type": "text", "content": str(user_message)}]}]
                )
            span = self.tracer.start_span(_AGENT_SPAN_NAME, context=parent, kind=SpanKind.INTERNAL, attributes=attributes)
            state.agent_span = span
            state.agent_ctx = trace.set_span_in_context(span, parent)
            invocation._token = otel_context.attach(trace.set_span_in_context(span))
        except BaseException as exc:
            # Undo whatever was made: the call runs uninstrumented, nothing is left open.
            if span is not None:
                _end_span(span, "invoke_agent")
            if scope is not None:
                self._end_scope(scope)
            if not isinstance(exc, Exception):
                raise
            _logger.exception("hermes-agent instrumentation: could not open invoke_agent; running uninstrumented")
            return invocation
        invocation.scope = scope
        invocation.span = span
        return invocation

    def _parent_of_agent(self, agent: Any) -> Optional[Context]:
        """A nested invocation hangs under its enclosing invocation; a top-level one under the caller's span."""
        try:
            enclosing = self.store.current(agent)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: store.current failed; no enclosing invocation")
            return None
        if enclosing is None or enclosing.agent_span is None:
            return None
        ambient = trace.get_current_span().get_span_context()
        if ambient.is_valid and ambient.trace_id == enclosing.agent_span.get_span_context().trace_id:
            return None  # same thread (or a copied context): the ambient span is the exact parent
        return enclosing.delegate_parent or enclosing.agent_ctx

    def _end_scope(self, scope: Any) -> None:
        try:
            self.store.end(scope)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: store.end failed")

    # -- react step -------------------------------------------------------------------------------

    def _start_step(self, state: InvocationState) -> None:
        state.round += 1
        span = self.tracer.start_span(
            STEP_SPAN_NAME, context=state.agent_ctx, kind=SpanKind.INTERNAL, attributes={REACT_ROUND: state.round}
        )
        state.step_span = span
        state.step_ctx = trace.set_span_in_context(span, state.agent_ctx)

    def _end_step(self, state: InvocationState, finish_reason: Optional[str], error: Optional[BaseException] = None) -> None:
        """End the open react step, if any; never raises."""
        span, state.step_span, state.step_ctx = state.step_span, None, None
        if span is None:
            return
        try:
            if finish_reason:
                span.set_attribute(REACT_FINISH_REASON, finish_reason)
            if error is not None:
                _record_error(span, error)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete the react step")
        finally:
            _end_span(span, "react step")

    def end_tool_round(self, owner: Any, task_id: Any = None, error: Optional[BaseException] = None) -> None:
        """Close the ReAct step of ``owner``'s invocation (found by ``task_id``) once its tools ran or failed; never raises."""
        try:
            state = self.store.current(owner, task_id or None)
            if state is not None:
                self._end_step(state, "error" if error is not None else "tool_calls", error)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not end the react step")

    # -- chat -----------------------------------------------------------------------------------------

    def start_chat(self, agent: Any, api_kwargs: Any = None, *, streaming: bool = False) -> ChatCall:
        """Start a ``chat`` span for one LLM request of ``agent`` (opening a react step if none is); never raises.

        ``api_kwargs`` is the request (its ``model`` names the span). With ``streaming`` pass
        :meth:`ChatCall.wrap_first_delta` as the call's ``on_first_delta``.
        """
        state = None
        try:
            state = self.store.current(agent)
            if state is not None:
                if state.llm_depth > 0:  # the streaming path falling back to the plain call: one span
                    state.llm_depth += 1
                    return ChatCall(self, state, None, 0.0, None)
                if state.step_span is None:
                    self._start_step(state)
            model = api_kwargs.get("model") if isinstance(api_kwargs, dict) else None
            model = model or getattr(agent, "model", None) or "unknown"
            attributes: dict[str, Any] = {GenAI.GEN_AI_OPERATION_NAME: _OP_CHAT, GenAI.GEN_AI_REQUEST_MODEL: str(model)}
            provider = getattr(agent, "provider", None)
            if provider:
                attributes[GenAI.GEN_AI_PROVIDER_NAME] = str(provider)
            span = self.tracer.start_span(
                f"chat {model}",
                context=state.step_ctx if state is not None else None,
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
        except BaseException as exc:
            if not isinstance(exc, Exception):
                raise
            _logger.exception("hermes-agent instrumentation: could not start the chat span")
            return ChatCall(self, None, None, 0.0, None, done=True)
        if state is not None:
            state.llm_depth += 1
        return ChatCall(self, state, span, time.monotonic(), attributes)

    def _record_metrics(self, labels: Optional[dict[str, Any]], started: float, input_tokens: int, output_tokens: int) -> None:
        """``labels`` are the chat span's start attributes: operation, provider and request model."""
        duration = self._duration
        if duration is None or labels is None:
            return
        try:
            duration.record(time.monotonic() - started, labels)
            if self._tokens is not None:
                self._tokens.record(input_tokens, {**labels, GenAI.GEN_AI_TOKEN_TYPE: "input"})
                self._tokens.record(output_tokens, {**labels, GenAI.GEN_AI_TOKEN_TYPE: "output"})
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not record the chat metrics")

    # -- execute_tool ---------------------------------------------------------------------------------

    def start_tool(
        self,
        owner: Any,
        name: str,
        arguments: Any = None,
        *,
        task_id: Any = None,
        tool_call_id: Any = None,
    ) -> ToolCall:
        """Start an ``execute_tool`` span under ``owner``'s open step (or its invocation) and make it current here.

        ``task_id`` finds the invocation where only the id travels (a tool pool). Never raises:
        on failure a :class:`ToolCall` without a span is returned.
        """
        span = None
        try:
            try:
                state = self.store.current(owner, task_id or None)
            except Exception:  # noqa: BLE001
                _logger.exception("hermes-agent instrumentation: store.current failed; the tool span has no parent")
                state = None
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
            token = otel_context.attach(span_ctx)
        except BaseException as exc:
            if span is not None:
                _end_span(span, "execute_tool")
            if not isinstance(exc, Exception):
                raise
            _logger.exception("hermes-agent instrumentation: could not start the execute_tool span")
            return ToolCall(self, None, None, done=True)
        return ToolCall(self, span, token)

    # -- subagents -------------------------------------------------------------------------------------

    def prepare_subagent(self, child: Any) -> None:
        """Remember, for ``child`` built in its parent's ``delegate_task``, where its invocation will hang; never raises.

        The look-up is made now, while the parent is open, exactly as the child would make it
        (through ``store.propagate``, with the child as owner), so the backend decides whether
        the parent is found; only the parent's ``delegate_task`` span context is kept, so the
        child hangs under it even when it runs after the parent's invocation ended.
        """
        try:
            launcher = self.store.propagate(_call_through)
            parent = launcher(self._subagent_parent, child)
            with self._pending_lock:
                self._pending[child] = PendingSubagent(launcher, parent)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: subagent will start a trace of its own")

    def _subagent_parent(self, child: Any) -> Optional[Context]:
        state = self.store.current(child)
        if state is None:
            return None
        return state.delegate_parent or state.agent_ctx

    def take_subagent(self, agent: Any) -> Optional[PendingSubagent]:
        """The pending record :meth:`prepare_subagent` made for ``agent`` (removed), or None; never raises."""
        if not self._pending:  # only subagents are registered: most calls skip the lock
            return None
        try:
            with self._pending_lock:
                return self._pending.pop(agent, None)
        except Exception:  # noqa: BLE001 - an unhashable agent
            _logger.debug("hermes-agent instrumentation: no subagent record for %r", agent, exc_info=True)
            return None
