"""The public lifecycle of the Hermes telemetry: start an invocation, a chat or a tool; stop or fail it.

In the spirit of ``opentelemetry-util-genai``'s invocation objects: :class:`HermesTelemetry`
holds the tracer, the meter, the event logger, the state store and the content-capture mode, and its
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

import itertools
import json
import logging
import re
import threading
import time
import uuid
import weakref
from types import SimpleNamespace
from typing import Any, Callable, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Meter, NoOpHistogram
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GenAI
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from statebackends import StateStore

from . import genai
from .genai import CaptureMode
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
# The names loongsuite's Hermes instrumentation gives its step span and two of its step attributes. Only
# these: its gen_ai.operation.name "react", gen_ai.span.kind "STEP" and gen_ai.agent.name "Hermes" are not
# set (see the README: dashboards keyed on those do not carry over).
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
# Looked up once: the hot path reads module globals, not attributes of the semconv module.
_INPUT_TOKENS = GenAI.GEN_AI_USAGE_INPUT_TOKENS
_OUTPUT_TOKENS = GenAI.GEN_AI_USAGE_OUTPUT_TOKENS
_RESPONSE_ID = GenAI.GEN_AI_RESPONSE_ID
_RESPONSE_MODEL = GenAI.GEN_AI_RESPONSE_MODEL
_FINISH_REASONS = GenAI.GEN_AI_RESPONSE_FINISH_REASONS
_OPERATION_NAME = GenAI.GEN_AI_OPERATION_NAME
_TOOL_NAME = GenAI.GEN_AI_TOOL_NAME
_TOOL_TYPE = GenAI.GEN_AI_TOOL_TYPE
_TOOL_CALL_ID = GenAI.GEN_AI_TOOL_CALL_ID
_INTERNAL = SpanKind.INTERNAL
_CLIENT = SpanKind.CLIENT
_set_span_in_context = trace.set_span_in_context
_attach = otel_context.attach
_detach = otel_context.detach
_AGENT_SPAN_NAME = f"invoke_agent {AGENT_NAME}"
_PARTIAL_STREAM_ID = "partial-stream-stub"  # hermes_constants.PARTIAL_STREAM_STUB_ID (not imported: Hermes is optional here)
# agent.gemini_native_adapter makes up f"chatcmpl-{uuid.uuid4().hex[:12]}" for every response it translates (the
# Gemini API's own responseId is dropped): a real ChatCompletion's id is longer, and never on a SimpleNamespace.
_GEMINI_MADE_UP_ID = re.compile(r"chatcmpl-[0-9a-f]{12}")
# Every notice Hermes returns as an interrupted turn's final_response begins so (agent/conversation_loop.py:
# "Operation interrupted: waiting for model response (...", "... during retry (...", "...: handling API error ...").
_INTERRUPT_NOTICE = "Operation interrupted"
_CACHE_LIMIT = 256  # distinct (provider, base URL, model, ...) identities remembered before the caches restart


_TASK_ID_PREFIX = str(uuid.uuid4())[:24]  # random per process: "xxxxxxxx-xxxx-4xxx-yxxx-"
_task_ids = itertools.count(1)


def _new_task_id() -> str:
    """A new invocation id shaped like Hermes's own (a UUID4 string): a per-process random prefix and a
    48-bit counter, unique in the process and, by the 74 random bits, across processes; about 10x
    cheaper than ``str(uuid.uuid4())``."""
    return f"{_TASK_ID_PREFIX}{next(_task_ids) & 0xFFFFFFFFFFFF:012x}"


def _provider_id(response: Any, response_id: Any) -> Optional[str]:
    """``response_id`` as a string, or None when it is empty, cannot be read, or Hermes made it up; never raises.

    Hermes rebuilds a streamed response as a ``SimpleNamespace`` and drops the provider's id for one
    of its own (``stream-<uuid4>``, or ``PARTIAL_STREAM_STUB_ID`` for a stream cut short), and its
    native Gemini client answers with a ``SimpleNamespace`` whose id it makes up (``chatcmpl-`` and
    12 hex digits): ``gen_ai.response.id`` is the provider's id, so none is recorded for those.
    """
    if type(response_id) is not str:
        response_id = _id_text(response_id)
    if not response_id:
        return None
    if type(response) is SimpleNamespace and (
        response_id.startswith("stream-")
        or response_id == _PARTIAL_STREAM_ID
        or _GEMINI_MADE_UP_ID.fullmatch(response_id) is not None
    ):
        return None
    return response_id


def _id_text(response_id: Any) -> Optional[str]:
    """A response id that is not a ``str`` as text (bytes decoded), or None when empty or unreadable; never raises."""
    try:
        if not response_id:
            return None
        if isinstance(response_id, (bytes, bytearray)):
            return bytes(response_id).decode("utf-8", "replace")
        return str(response_id)
    except Exception:  # noqa: BLE001 - an id whose __bool__ or __str__ raises: the rest of the chat is still recorded
        _logger.debug("hermes-agent instrumentation: response id not readable", exc_info=True)
        return None


def _outcome(result: Any, content: bool) -> tuple[bool, bool, Any]:
    """(failed, interrupted, final_response or None) of Hermes's result dict (final_response only when ``content``).

    Never raises: a result that cannot be read (a ``get`` or a ``__bool__`` that raises) counts as a plain
    one with no answer, so the spans are still completed and ended.
    """
    try:
        failed = bool(result.get("failed"))
        interrupted = bool(result.get("interrupted"))
        final = result.get("final_response") if content else None
        return failed, interrupted, (final if final else None)
    except Exception:  # noqa: BLE001
        _logger.debug("hermes-agent instrumentation: the run's result could not be read", exc_info=True)
        return False, False, None


def _interrupted_answer(final: Any) -> bool:
    """Whether an interrupted turn's ``final_response`` is the model's own text (what it streamed before the
    interrupt, which Hermes keeps as the assistant's message), not one of Hermes's interruption notices."""
    return isinstance(final, str) and not final.startswith(_INTERRUPT_NOTICE)


def _live(instrument: Any) -> bool:
    """Whether recording into ``instrument`` (None for no-op ones) can reach a meter: False for the API's
    proxy instrument before any SDK meter provider is set, so no attribute dict is built for nothing."""
    # The API's proxy instrument keeps the real one in ``_real_instrument`` (None until a provider is set);
    # anything without that attribute is a real instrument. None (no instrument) stays None.
    return getattr(instrument, "_real_instrument", instrument) is not None


def _remember(cache: dict, key: tuple, value: Any) -> None:
    """``cache[key] = value``, the cache emptied first when full; an unhashable key is not remembered."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    try:
        cache[key] = value
    except TypeError:
        pass


def _error_labels(labels: dict[str, Any], response_model: Optional[str], error_type: Optional[str]) -> dict[str, Any]:
    """Metric attributes of one finished operation: its start ``labels`` plus response model and error type."""
    if response_model is None and error_type is None:
        return labels
    out = dict(labels)
    if response_model is not None:
        out[GenAI.GEN_AI_RESPONSE_MODEL] = response_model
    if error_type is not None:
        out[ERROR_TYPE] = error_type
    return out


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


def _detach_token(token: Any, what: str) -> None:
    """Detach the context a span attached; never raises (None: nothing was attached)."""
    if token is None:
        return
    try:
        _detach(token)
    except Exception:  # noqa: BLE001
        _logger.exception("hermes-agent instrumentation: could not detach the %s context", what)


class _Ended:
    """Something started by the telemetry that ``stop(result)`` or ``fail(error)`` ends, once (the first wins); neither raises."""

    __slots__ = ("_done",)

    def stop(self, result: Any = None) -> None:
        """End it with the wrapped call's ``result``; never raises."""
        if not self._done:
            self._done = True
            self._finish(result, None)

    def fail(self, error: BaseException) -> None:
        """End it with the exception ``error`` the wrapped call raised, recorded on the span; never raises."""
        if not self._done:
            self._done = True
            self._finish(None, error)

    def _finish(self, result: Any, error: Optional[BaseException]) -> None:
        raise NotImplementedError


# -- invoke_agent ---------------------------------------------------------------------------------------------


class AgentInvocation(_Ended):
    """One ``invoke_agent``: returned by :meth:`HermesTelemetry.start_invocation`, ended by ``stop`` or ``fail``.

    ``task_id`` is the invocation id the store keys the state by (the one given, or a new
    one): pass it to the agent so its tools carry it. ``span`` is the ``invoke_agent`` span,
    or None when the telemetry could not start it (the call then runs uninstrumented).
    ``stop`` takes Hermes's result dict, which may report a failure (``failed``).
    """

    __slots__ = ("_telemetry", "task_id", "scope", "span", "_token", "_started", "_labels")

    def __init__(self, telemetry: "HermesTelemetry", task_id: str) -> None:
        self._telemetry = telemetry
        self.task_id = task_id
        self.scope: Any = None
        self.span: Optional[Span] = None
        self._token: Any = None
        self._done = False
        self._started = 0.0
        self._labels: Optional[dict[str, Any]] = None

    @property
    def evicted(self) -> bool:
        """Whether the store evicted this invocation's state while it was open (its scope says so)."""
        return bool(getattr(self.scope, "evicted", False))

    def _finish(self, result: Any, error: Optional[BaseException]) -> None:
        scope = self.scope
        if scope is None:
            return
        telemetry = self._telemetry
        span = self.span
        state: Optional[InvocationState] = None
        try:
            state = scope.state
            if error is None and isinstance(result, dict):  # Hermes's result dict
                failed, interrupted, final = _outcome(result, telemetry._span_content)
            else:
                failed = interrupted = False
                final = None
            if state.step_span is not None:
                if failed:
                    try:
                        _mark_failed(state.step_span, result)
                    except Exception:  # noqa: BLE001
                        _logger.exception("hermes-agent instrumentation: could not mark the react step failed")
                telemetry._end_step(state, "error" if error is not None or failed else None, error)
            if span is not None:
                attributes: dict[str, Any] = {_INPUT_TOKENS: state.input_tokens, _OUTPUT_TOKENS: state.output_tokens}
                if state.response_id:
                    attributes[_RESPONSE_ID] = state.response_id
                if state.response_model:
                    attributes[_RESPONSE_MODEL] = state.response_model
                if state.finish_reasons:
                    attributes[_FINISH_REASONS] = list(state.finish_reasons)  # see ChatCall.stop
                # A failed run's final_response is Hermes's error text, an interrupted run's Hermes's notice: never an
                # assistant message. But a reply the interrupt cut short (the model's text streamed so far, which
                # Hermes keeps as the assistant's message) is the answer, ended as its chat was: "error".
                if final is not None and not failed and (not interrupted or _interrupted_answer(final)):
                    if interrupted:
                        reason = "error"
                    else:
                        reason = genai.finish_reason(state.finish_reasons[-1] if state.finish_reasons else None)
                    attributes[_OUTPUT_MESSAGES] = genai.to_json([genai.text_message("assistant", final, reason)])
                if getattr(scope, "evicted", False):
                    # Not an error of the call (the agent's answer is fine): the telemetry of this call may be
                    # incomplete, because its state was dropped to keep the store bounded.
                    attributes[EVICTED_ATTRIBUTE] = True
                    span.add_event(
                        EVICTED_EVENT,
                        {"statebackends.state.backend": telemetry.store.name or type(telemetry.store).__name__},
                    )
                if interrupted:  # a cancel is not an error: the status stays unset
                    attributes[genai.HERMES_INTERRUPTED] = True
                if error is not None:
                    attributes[ERROR_TYPE] = type(error).__qualname__
                elif failed:
                    attributes[ERROR_TYPE] = "agent_run_failed"
                span.set_attributes(attributes)  # one call: the error type rides along with the rest
                if error is not None:
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                    span.record_exception(error)
                elif failed:
                    span.set_status(Status(StatusCode.ERROR, str(result.get("error") or "agent run failed")))
            if self._labels is not None and _live(telemetry._duration):
                error_type = type(error).__qualname__ if error is not None else ("agent_run_failed" if failed else None)
                telemetry._record_duration(self._labels, self._started, state.response_model, error_type)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete invoke_agent")
        finally:  # each step even if the one before raised a BaseException
            try:
                if state is not None and state.step_span is not None:  # left open by a failure above
                    telemetry._end_step(state, None)
                _end_span(span, "invoke_agent")
            finally:
                try:
                    _detach_token(self._token, "invoke_agent")
                finally:
                    telemetry._end_scope(scope)


# -- chat ------------------------------------------------------------------------------------------------------


class ChatCall:
    """One LLM round trip (a ``chat`` span): returned by :meth:`HermesTelemetry.start_chat`.

    ``span`` is None when no span was started (the telemetry failed, or this is the plain
    call Hermes falls back to inside a streaming call, which the outer span already covers).
    """

    __slots__ = ("_telemetry", "_state", "span", "_started", "_labels", "_done", "_inputs", "_first_chunk", "_chunk_lock")

    def __init__(
        self,
        telemetry: "HermesTelemetry",
        state: Optional[InvocationState],
        span: Optional[Span],
        started: float,
        labels: Optional[dict[str, Any]],
        done: bool = False,
        inputs: Optional[list[dict[str, Any]]] = None,
    ) -> None:
        self._telemetry = telemetry
        self._state = state
        self.span = span
        self._started = started
        self._labels = labels  # the metric attributes known at start (shared: never mutated)
        self._done = done
        self._inputs = inputs  # the request's messages in the conventions' shape, only when content goes to events
        self._first_chunk = False
        # Streaming only: the stream's reader thread may call first_chunk while another thread ends the chat.
        self._chunk_lock: Optional[threading.Lock] = None

    def first_chunk(self) -> None:
        """Record the time to the first streamed chunk (span attribute and metric), once, if the chat is still open; never raises.

        A chunk that arrives after ``stop``/``fail`` (Hermes abandons the stream's worker thread when the
        agent is interrupted, and that thread may still read a chunk) is not recorded: the chat is over.
        """
        span = self.span
        if span is None or self._first_chunk or self._done:
            return
        lock = self._chunk_lock
        if lock is None:
            self._record_first_chunk(span)
            return
        with lock:  # stop/fail take it to end the chat: a chunk is recorded before the end or not at all
            if not (self._first_chunk or self._done):
                self._record_first_chunk(span)

    def _record_first_chunk(self, span: Span) -> None:
        self._first_chunk = True
        try:
            elapsed = time.monotonic() - self._started
            span.set_attribute(_TIME_TO_FIRST_CHUNK, elapsed)
            histogram = self._telemetry._ttfc
            if self._labels is not None and _live(histogram):
                histogram.record(elapsed, self._labels)
        except Exception:  # noqa: BLE001
            _logger.debug("hermes-agent instrumentation: time to first chunk not recorded", exc_info=True)

    def _end_streamed(self) -> bool:
        """Mark a streaming chat done under its chunk lock; False if it already was."""
        with self._chunk_lock:  # type: ignore[union-attr]
            if self._done:
                return False
            self._done = True
            return True

    def wrap_first_delta(self, callback: Optional[Callable[[], Any]]) -> Callable[[], Any]:
        """A callback for Hermes's ``on_first_delta``: records :meth:`first_chunk`, then calls ``callback`` (if any)."""
        if self._chunk_lock is None:
            self._chunk_lock = threading.Lock()
        first_chunk = self.first_chunk

        def on_first_delta() -> Any:
            first_chunk()
            if callback is not None:
                return callback()
            return None

        return on_first_delta

    def stop(self, response: Any) -> None:
        """End the chat with the LLM's ``response`` (usage, ids, finish reasons, content, metrics); never raises."""
        if self._done or (self._chunk_lock is not None and not self._end_streamed()):
            return
        self._done = True
        state = self._state
        span = self.span
        try:
            if state is not None:
                state.llm_depth -= 1
            if span is None:
                return
            try:
                telemetry = self._telemetry
                input_tokens, output_tokens, reasons, wants_tools = read_response(response)
                response_id = _provider_id(response, getattr(response, "id", None))
                response_model = getattr(response, "model", None)
                attributes: dict[str, Any] = {_INPUT_TOKENS: input_tokens, _OUTPUT_TOKENS: output_tokens}
                if response_id:
                    attributes[_RESPONSE_ID] = response_id
                if response_model:
                    response_model = attributes[_RESPONSE_MODEL] = str(response_model)
                else:
                    response_model = None
                if reasons:
                    # A list: the SDK's isinstance(value, Sequence) takes ~120 ns longer for a tuple
                    # (CPython 3.11's ABC check), and it makes a tuple of either.
                    attributes[_FINISH_REASONS] = list(reasons)
                if state is not None:
                    state.input_tokens += input_tokens
                    state.output_tokens += output_tokens
                    state.response_id = response_id  # the latest response's (None: it has none of the provider's)
                    if response_model:
                        state.response_model = response_model
                    if reasons:
                        state.finish_reasons = reasons
                    if not wants_tools:  # a final answer closes the round
                        telemetry._end_step(state, reasons[0] if reasons else "stop")
                outputs = None
                if telemetry.capture_content:  # on spans or in events
                    outputs = genai.output_messages(response)
                    if telemetry._span_content:
                        attributes[_OUTPUT_MESSAGES] = genai.to_json(outputs)
                span.set_attributes(attributes)
                labels = self._labels
                if labels is not None and _live(telemetry._duration):
                    telemetry._record_chat(labels, self._started, response_model, input_tokens, output_tokens)
                if outputs is not None and telemetry._event_content:
                    telemetry._emit_details(span, labels, attributes, self._inputs, outputs)
            finally:
                _end_span(span, "chat")
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete the chat span")

    def fail(self, error: BaseException) -> None:
        """End the chat with the exception the LLM call raised (span, duration with ``error.type``); never raises."""
        if self._done or (self._chunk_lock is not None and not self._end_streamed()):
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
                telemetry = self._telemetry
                labels = self._labels
                error_type = type(error).__qualname__
                if labels is not None:
                    telemetry._record_duration(labels, self._started, None, error_type)
                    if telemetry._event_content:
                        # The request is reported; the error text is never an output message.
                        telemetry._emit_details(span, labels, {ERROR_TYPE: error_type}, self._inputs, None)
            finally:
                _end_span(span, "chat")
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete the chat span")


# -- execute_tool -----------------------------------------------------------------------------------------------


class ToolCall(_Ended):
    """One tool execution (an ``execute_tool`` span, current while the tool runs): from :meth:`HermesTelemetry.start_tool`.

    ``stop`` takes the tool's result: a Hermes ``{"error": ...}`` result marks the span failed.
    """

    __slots__ = ("_telemetry", "span", "_token")

    def __init__(self, telemetry: "HermesTelemetry", span: Optional[Span], token: Any, done: bool = False) -> None:
        self._telemetry = telemetry
        self.span = span
        self._token = token
        self._done = done

    def _finish(self, result: Any, error: Optional[BaseException]) -> None:
        span = self.span
        try:
            if error is not None:
                _record_error(span, error)  # type: ignore[arg-type]
            else:
                failure = _tool_error_type(result)
                attributes: Optional[dict[str, Any]] = None
                if failure is not None:
                    span.set_status(Status(StatusCode.ERROR, failure[1]))  # type: ignore[union-attr]
                    attributes = {ERROR_TYPE: failure[0]}
                if self._telemetry._span_content and result is not None:
                    if attributes is None:
                        attributes = {}
                    attributes[_TOOL_RESULT] = result if isinstance(result, str) else genai.to_json(result)
                if attributes is not None:  # one call for the error type and the result
                    span.set_attributes(attributes)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not complete the execute_tool span")
        finally:
            try:
                _end_span(span, "execute_tool")
            finally:
                _detach_token(self._token, "execute_tool")


# -- subagents ---------------------------------------------------------------------------------------------------


class PendingSubagent:
    """A child agent built by ``delegate_task`` and not yet run: the span context its invocation will hang under."""

    __slots__ = ("parent",)

    def __init__(self, parent: Optional[Context]) -> None:
        self.parent = parent


# -- the telemetry ------------------------------------------------------------------------------------------------


class HermesTelemetry:
    """The tracer, meter, event logger, state store and content-capture mode of one instrumentation, and its public lifecycle.

    ``start_invocation``, ``start_chat`` and ``start_tool`` never raise and return objects whose
    ``stop``/``fail`` never raise; ``end_tool_round`` and ``prepare_subagent`` never raise.
    ``capture_content`` is a :class:`~statebackends_hermes_agent.genai.CaptureMode` (``True`` means
    ``SPAN_ONLY``, ``False`` ``NO_CONTENT``); events need ``event_logger`` (a Logs API ``Logger``).
    """

    def __init__(
        self,
        tracer: Tracer,
        store: StateStore[InvocationState],
        meter: Optional[Meter] = None,
        capture_content: "bool | CaptureMode" = False,
        event_logger: Any = None,
    ) -> None:
        self.tracer = tracer
        self.store = store
        if isinstance(capture_content, CaptureMode):
            mode = capture_content
        else:
            mode = CaptureMode.SPAN_ONLY if capture_content else CaptureMode.NO_CONTENT
        self.capture_mode = mode
        self._span_content = mode.on_span
        self._event_content = mode.on_event and event_logger is not None
        self._event_logger = event_logger if self._event_content else None
        self.capture_content = self._span_content or self._event_content
        """Whether any message content is recorded (the wrappers pass the user message only then)."""
        self._pending: "weakref.WeakKeyDictionary[Any, PendingSubagent]" = weakref.WeakKeyDictionary()
        # Its plain dict of entries (never replaced): empty means no record, checked without the Python __len__.
        self._pending_data: dict = getattr(self._pending, "data", self._pending)
        self._pending_lock = threading.Lock()
        # (provider label, base URL, model) -> (chat span name, chat span attributes, metric attributes)
        self._chat_identities: dict[tuple, tuple[str, dict[str, Any], dict[str, Any]]] = {}
        # (provider label, model, session id) -> (invoke_agent span attributes, metric attributes)
        self._agent_identities: dict[tuple, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._duration = self._tokens = self._ttfc = None
        if meter is not None:
            try:
                instruments = genai.create_instruments(meter)
                # A no-op meter's histograms record nothing: drop them so no attributes are built for them.
                self._duration, self._tokens, self._ttfc = (
                    None if isinstance(h, NoOpHistogram) else h for h in instruments
                )
            except Exception:  # noqa: BLE001
                _logger.exception("hermes-agent instrumentation: metrics disabled, the instruments could not be created")
                self._duration = self._tokens = self._ttfc = None

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
        invocation = AgentInvocation(self, task_id or _new_task_id())
        store = self.store
        scope = span = None
        try:
            if parent is None:
                parent = self._parent_of_agent(agent)
            scope = store.begin(agent, invocation_id=invocation.task_id)
            state = scope.state
            key = (getattr(agent, "provider", None), getattr(agent, "model", None), getattr(agent, "session_id", None))
            try:
                identity = self._agent_identities.get(key)
            except TypeError:  # an unhashable label: built each time, not cached
                identity = None
            if identity is None:
                identity = self._agent_identity(key)
            attributes, invocation._labels = identity
            if self._span_content and user_message is not None:
                attributes = {**attributes, _INPUT_MESSAGES: genai.to_json([genai.text_message("user", user_message)])}
            invocation._started = time.monotonic()
            span = self.tracer.start_span(_AGENT_SPAN_NAME, context=parent, kind=_INTERNAL, attributes=attributes)
            state.agent_span = span
            current = _set_span_in_context(span)
            # With no explicit parent both contexts are the current one plus the span: build it once.
            state.agent_ctx = current if parent is None else _set_span_in_context(span, parent)
            invocation._token = _attach(current)
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

    def _agent_identity(self, key: tuple) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``invoke_agent`` span attributes and metric attributes of one (provider, model, session id)."""
        provider, model, session_id = key
        attributes: dict[str, Any] = {GenAI.GEN_AI_OPERATION_NAME: _OP_INVOKE_AGENT, GenAI.GEN_AI_AGENT_NAME: AGENT_NAME}
        labels: dict[str, Any] = {GenAI.GEN_AI_OPERATION_NAME: _OP_INVOKE_AGENT}
        if provider:
            attributes[GenAI.GEN_AI_PROVIDER_NAME] = labels[GenAI.GEN_AI_PROVIDER_NAME] = genai.provider_name(provider)
            attributes[genai.HERMES_PROVIDER] = str(provider)
        if model:
            attributes[GenAI.GEN_AI_REQUEST_MODEL] = labels[GenAI.GEN_AI_REQUEST_MODEL] = str(model)
        if session_id:
            attributes[GenAI.GEN_AI_CONVERSATION_ID] = str(session_id)
        identity = (attributes, labels)
        cache = self._agent_identities
        _remember(cache, key, identity)
        return identity

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

    def _end_step(self, state: InvocationState, finish_reason: Optional[str], error: Optional[BaseException] = None) -> None:
        """End the open react step, if any; never raises."""
        span, state.step_span, state.step_ctx = state.step_span, None, None
        if span is None:
            return
        try:
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                if finish_reason:  # one call for both attributes
                    span.set_attributes({REACT_FINISH_REASON: finish_reason, ERROR_TYPE: type(error).__qualname__})
                else:
                    span.set_attribute(ERROR_TYPE, type(error).__qualname__)
                span.record_exception(error)
            elif finish_reason:
                span.set_attributes({REACT_FINISH_REASON: finish_reason})  # what the SDK's set_attribute calls
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
                if state.step_span is None:  # open a react step: its round number, under the invocation
                    agent_ctx = state.agent_ctx
                    number = state.round + 1
                    step = self.tracer.start_span(
                        STEP_SPAN_NAME, context=agent_ctx, kind=_INTERNAL, attributes={REACT_ROUND: number}
                    )
                    try:
                        step_ctx = _set_span_in_context(step, agent_ctx)
                    except BaseException:  # no half-open step: the state names a step only with its context
                        _end_span(step, "react step")
                        raise
                    state.round, state.step_span, state.step_ctx = number, step, step_ctx
                else:
                    step_ctx = state.step_ctx
            else:
                step_ctx = None
            model = api_kwargs.get("model") if isinstance(api_kwargs, dict) else None
            key = (getattr(agent, "provider", None), getattr(agent, "base_url", None), model or getattr(agent, "model", None))
            try:
                identity = self._chat_identities.get(key)
            except TypeError:  # an unhashable label: built each time, not cached
                identity = None
            if identity is None:
                identity = self._chat_identity(key)
            name, attributes, labels = identity
            inputs = None
            if self.capture_content:  # spans or events: otherwise no message is ever built
                messages = api_kwargs.get("messages") if isinstance(api_kwargs, dict) else None
                inputs = genai.input_messages(messages)
                if self._span_content:
                    attributes = {**attributes, _INPUT_MESSAGES: genai.to_json(inputs)}
            span = self.tracer.start_span(name, context=step_ctx, kind=_CLIENT, attributes=attributes)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                raise
            _logger.exception("hermes-agent instrumentation: could not start the chat span")
            return ChatCall(self, None, None, 0.0, None, done=True)
        if state is not None:
            state.llm_depth += 1
        return ChatCall(self, state, span, time.monotonic(), labels, False, inputs if self._event_content else None)

    def _chat_identity(self, key: tuple) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """The chat span name, span start attributes and metric attributes of one (provider, base URL, model)."""
        provider, base_url, model = key
        model = str(model) if model else "unknown"
        labels: dict[str, Any] = {GenAI.GEN_AI_OPERATION_NAME: _OP_CHAT, GenAI.GEN_AI_REQUEST_MODEL: model}
        if provider:
            labels[GenAI.GEN_AI_PROVIDER_NAME] = genai.provider_name(provider)
        address, port = genai.server_of(base_url)
        if address:
            labels[SERVER_ADDRESS] = address
            if port:
                labels[SERVER_PORT] = port
        attributes = dict(labels)
        if provider:
            attributes[genai.HERMES_PROVIDER] = str(provider)
        identity = (f"chat {model}", attributes, labels)
        cache = self._chat_identities
        _remember(cache, key, identity)
        return identity

    def _record_duration(
        self, labels: dict[str, Any], started: float, response_model: Optional[str], error_type: Optional[str]
    ) -> None:
        """Record one operation's ``gen_ai.client.operation.duration`` (with ``error.type`` when it failed); never raises."""
        duration = self._duration
        if not _live(duration):
            return
        try:
            duration.record(time.monotonic() - started, _error_labels(labels, response_model, error_type))
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not record the operation duration")

    def _record_chat(
        self, labels: dict[str, Any], started: float, response_model: Optional[str], input_tokens: int, output_tokens: int
    ) -> None:
        """Record a successful chat's duration and token usage; never raises."""
        try:
            final = _error_labels(labels, response_model, None)
            self._duration.record(time.monotonic() - started, final)  # type: ignore[union-attr]
            tokens = self._tokens
            if tokens is not None:
                tokens.record(input_tokens, {**final, GenAI.GEN_AI_TOKEN_TYPE: "input"})
                tokens.record(output_tokens, {**final, GenAI.GEN_AI_TOKEN_TYPE: "output"})
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not record the chat metrics")

    def _emit_details(
        self,
        span: Span,
        labels: Optional[dict[str, Any]],
        response: dict[str, Any],
        inputs: Optional[list[dict[str, Any]]],
        outputs: Optional[list[dict[str, Any]]],
    ) -> None:
        """Emit one ``gen_ai.client.inference.operation.details`` event for a chat, tied to its span; never raises."""
        logger = self._event_logger
        if logger is None:
            return
        try:
            attributes: dict[str, Any] = dict(labels or ())
            for key, value in response.items():
                if key != _OUTPUT_MESSAGES:
                    attributes[key] = value
            if inputs is not None:
                attributes[_INPUT_MESSAGES] = inputs
            if outputs is not None:
                attributes[_OUTPUT_MESSAGES] = outputs
            genai.emit_details(logger, attributes, trace.set_span_in_context(span))
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: could not emit the inference details event")

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
            attributes: dict[str, Any] = {_OPERATION_NAME: _OP_EXECUTE_TOOL, _TOOL_NAME: name, _TOOL_TYPE: "function"}
            if tool_call_id:
                attributes[_TOOL_CALL_ID] = str(tool_call_id)
            if self._span_content and arguments is not None:
                attributes[_TOOL_ARGUMENTS] = arguments if isinstance(arguments, str) else genai.to_json(arguments)
            span = self.tracer.start_span(f"execute_tool {name}", context=parent, kind=_INTERNAL, attributes=attributes)
            span_ctx = _set_span_in_context(span)
            if state is not None and name == "delegate_task":
                state.delegate_parent = span_ctx
            token = _attach(span_ctx)
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

        The look-up is made now, in the parent's tool thread while the parent is open, through
        the store with the child as owner, so the backend decides whether the parent is found
        (``instance`` cannot: the state lives on the parent object). Only the parent's
        ``delegate_task`` span context is kept, so the child hangs under it even when it runs
        after the parent's invocation ended; the child itself runs untouched in the context
        Hermes gives it (running it in a copy of the build-time context would hide the
        context variables its worker sets, such as Hermes's session working directory).
        """
        try:
            parent = self._subagent_parent(child)
            with self._pending_lock:
                self._pending[child] = PendingSubagent(parent)
        except Exception:  # noqa: BLE001
            _logger.exception("hermes-agent instrumentation: subagent will start a trace of its own")

    def _subagent_parent(self, child: Any) -> Optional[Context]:
        state = self.store.current(child)
        if state is None:
            return None
        return state.delegate_parent or state.agent_ctx

    def take_subagent(self, agent: Any) -> Optional[PendingSubagent]:
        """The pending record :meth:`prepare_subagent` made for ``agent`` (removed), or None; never raises."""
        if not self._pending_data:  # only subagents are registered: most calls skip the lock
            return None
        try:
            with self._pending_lock:
                return self._pending.pop(agent, None)
        except Exception:  # noqa: BLE001 - an unhashable agent
            _logger.debug("hermes-agent instrumentation: no subagent record for %r", agent, exc_info=True)
            return None
