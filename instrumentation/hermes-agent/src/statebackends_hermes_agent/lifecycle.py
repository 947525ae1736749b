"""The public lifecycle of the Hermes telemetry: start an invocation, a chat or a tool; stop or fail it.

In the shape of ``opentelemetry-util-genai``'s invocation objects: :class:`HermesTelemetry` holds the
:class:`Components` (tracer, store, histograms, event logger, content rules) and its ``start_*`` methods
return :class:`Invocation` objects (:class:`AgentInvocation`, :class:`ChatCall`, :class:`ToolCall`) made
from those components alone, whose ``stop(result)`` and ``fail(exc)`` end what was started, and which
are context managers (``with telemetry.start_chat(agent, kwargs) as chat: chat.result = call()``).

The contract, for every public method here: it never raises what the telemetry raises; only
``KeyboardInterrupt`` is let through. Each public entry is one boundary: whatever a span processor,
an exporter, a meter, a log handler (our own log records go through :func:`statebackends.log_safely`),
the OpenTelemetry log bridge, the store or a plugin raises inside it is contained there (logged, never
re-raised), ``BaseException`` included. ``stop``/``fail`` are idempotent (the first one wins), every span
that reached us is ended, and every state begun in the store is ended, whatever failed before. So the
instrumented agent's return value, its exceptions and its tools' results are never changed.

A span processor that raises in ``on_start`` makes the SDK's ``start_span`` raise before it returns the
span: that span never reaches us and can never be ended (see the README, "What a failing ``on_start``
leaves"). The rest goes on without it: the call keeps its state, its children hang under the span's
parent, its tokens and metrics are still recorded.

Every span's parent comes from the invocation's state in the ``StateStore``, so the backend alone
decides whether the tree is right; this module never asks which backend it is.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from contextvars import Token
from types import SimpleNamespace, TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Histogram, Meter, NoOpHistogram
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GenAI
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from statebackends import Scope, StateStore, at_fork_in_child, first_open, log_safely

from . import genai
from .descriptions import ToolDescriptions
from .genai import CaptureMode
from .state import InvocationState, read_response

__all__ = [
    "AGENT_NAME",
    "DEFAULT_CONTENT_MAX_LENGTH",
    "EVICTED_ATTRIBUTE",
    "EVICTED_EVENT",
    "LEGACY_REACT_FINISH_REASON",
    "LEGACY_REACT_ROUND",
    "OPENINFERENCE_SPAN_KIND",
    "REACT_FINISH_REASON",
    "REACT_ROUND",
    "STEP_OPERATION",
    "STEP_SPAN_NAME",
    "AgentInvocation",
    "ChatCall",
    "Components",
    "HermesTelemetry",
    "Invocation",
    "PendingSubagent",
    "ToolCall",
]

_logger = logging.getLogger(__name__)

# Attribute names newer than the oldest semantic-conventions release we admit.
_TIME_TO_FIRST_CHUNK = getattr(GenAI, "GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK", "gen_ai.response.time_to_first_chunk")
_INPUT_MESSAGES = getattr(GenAI, "GEN_AI_INPUT_MESSAGES", "gen_ai.input.messages")
_OUTPUT_MESSAGES = getattr(GenAI, "GEN_AI_OUTPUT_MESSAGES", "gen_ai.output.messages")
_TOOL_ARGUMENTS = getattr(GenAI, "GEN_AI_TOOL_CALL_ARGUMENTS", "gen_ai.tool.call.arguments")
_TOOL_RESULT = getattr(GenAI, "GEN_AI_TOOL_CALL_RESULT", "gen_ai.tool.call.result")
STEP_SPAN_NAME = "react step"
"""The name of the span of one ReAct round (loongsuite's Hermes instrumentation names its step span so too)."""
STEP_OPERATION = "hermes.react_step"
"""The step's ``gen_ai.operation.name``: ours, namespaced. The conventions have no value for one round of an agent's
loop (``invoke_workflow`` is a process of several agents, ``plan`` a planning phase told apart from reasoning), and
a custom value MAY be used; see the README."""
OPENINFERENCE_SPAN_KIND = "openinference.span.kind"
"""OpenInference's span kind, set (``CHAIN``) on the step only: Phoenix maps ``gen_ai.operation.name`` to its kinds
for the conventions' values alone (a custom one is UNKNOWN) and keeps a kind the span sets itself."""
REACT_ROUND = "hermes.react.round"
"""The step's round number in its invocation: 1, 2, ..."""
REACT_FINISH_REASON = "hermes.react.finish_reason"
"""How the step ended: ``tool_calls`` (it asked for tools, which ran), ``stop`` (the answer), ``error``."""
LEGACY_REACT_ROUND = "gen_ai.react.round"
LEGACY_REACT_FINISH_REASON = "gen_ai.react.finish_reason"
"""Deprecated: the names of :data:`REACT_ROUND` and :data:`REACT_FINISH_REASON` up to 0.2 (loongsuite's, inside the
``gen_ai`` namespace the conventions own), set beside them only with
``OTEL_INSTRUMENTATION_HERMES_AGENT_LEGACY_REACT_ATTRIBUTES=true``."""
EVICTED_ATTRIBUTE = "statebackends.state.evicted"
"""Set (True) on an ``invoke_agent`` span whose state the store evicted while the call was still open."""
EVICTED_EVENT = "statebackends.state.evicted"
"""The span event recorded with :data:`EVICTED_ATTRIBUTE`; its ``statebackends.state.backend`` names the store."""
DEFAULT_CONTENT_MAX_LENGTH = 16384
"""Characters kept of each captured text (a message part, tool arguments, a tool result) unless configured."""
AGENT_NAME = "hermes"
_OP_INVOKE_AGENT = GenAI.GenAiOperationNameValues.INVOKE_AGENT.value
_OP_CHAT = GenAI.GenAiOperationNameValues.CHAT.value
_OP_EXECUTE_TOOL = GenAI.GenAiOperationNameValues.EXECUTE_TOOL.value
# Looked up once: the hot path reads module globals, not attributes of the semconv module.
_INPUT_TOKENS = GenAI.GEN_AI_USAGE_INPUT_TOKENS
_OUTPUT_TOKENS = GenAI.GEN_AI_USAGE_OUTPUT_TOKENS
_RESPONSE_ID = GenAI.GEN_AI_RESPONSE_ID
_RESPONSE_MODEL = GenAI.GEN_AI_RESPONSE_MODEL
_FINISH_REASONS = GenAI.GEN_AI_RESPONSE_FINISH_REASONS
_OPERATION_NAME = GenAI.GEN_AI_OPERATION_NAME
_TOKEN_TYPE = GenAI.GEN_AI_TOKEN_TYPE
_TOOL_NAME = GenAI.GEN_AI_TOOL_NAME
_TOOL_TYPE = GenAI.GEN_AI_TOOL_TYPE
_TOOL_CALL_ID = GenAI.GEN_AI_TOOL_CALL_ID
_TOOL_DESCRIPTION = GenAI.GEN_AI_TOOL_DESCRIPTION
_REQUEST_MODEL = GenAI.GEN_AI_REQUEST_MODEL
_STEP_ATTRIBUTES: dict[str, AttributeValue] = {_OPERATION_NAME: STEP_OPERATION, OPENINFERENCE_SPAN_KIND: "CHAIN"}
_INTERNAL = SpanKind.INTERNAL
_CLIENT = SpanKind.CLIENT
_ERROR = StatusCode.ERROR
_set_span_in_context = trace.set_span_in_context
_attach = otel_context.attach
_detach = otel_context.detach
_monotonic = time.monotonic
_AGENT_SPAN_NAME = f"invoke_agent {AGENT_NAME}"
_RUN_FAILED = "agent_run_failed"
# hermes_constants.PARTIAL_STREAM_STUB_ID (not imported: Hermes is optional here)
_PARTIAL_STREAM_ID = "partial-stream-stub"
# agent.gemini_native_adapter makes up f"chatcmpl-{uuid.uuid4().hex[:12]}" for every response it translates (the
# Gemini API's own responseId is dropped): a real ChatCompletion's id is longer, and never on a SimpleNamespace.
_GEMINI_MADE_UP_ID = re.compile(r"chatcmpl-[0-9a-f]{12}")
# Every notice Hermes returns as an interrupted turn's final_response begins so (agent/conversation_loop.py:
# "Operation interrupted: waiting for model response (...", "... during retry (...", "...: handling API error ...").
_INTERRUPT_NOTICE = "Operation interrupted"
_CACHE_LIMIT = 256  # distinct (provider, base URL, model, ...) identities remembered before the caches restart


# -- what the telemetry raises --------------------------------------------------------------------------------


def _contain(exc: BaseException, what: str) -> None:
    """The boundary's one rule: a ``KeyboardInterrupt`` goes on; anything else the telemetry raised is logged
    (through :func:`statebackends.log_safely`, so a raising log handler changes nothing) and dropped."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    log_safely(_logger, logging.ERROR, "hermes-agent instrumentation: %s\n%s", what, _traceback_text(exc))


def _traceback_text(exc: BaseException) -> str:
    """``exc`` and its traceback as text, never its frames: a log handler that records each frame's local variables
    (Sentry's logging integration does by default) would be handed the call's messages and responses; nor the
    exceptions it was raised in (the agent's own, whose text can quote the conversation); never raises."""
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, chain=False)).rstrip()
    except Exception:  # noqa: BLE001 - an exception whose __str__ raises: its class alone
        return type(exc).__qualname__


# -- ids --------------------------------------------------------------------------------------------------


_task_id_prefix = str(uuid.uuid4())[:24]  # random per process: "xxxxxxxx-xxxx-4xxx-yxxx-"
_task_ids = itertools.count(1)


def _new_task_id() -> str:
    """A new invocation id shaped like Hermes's own (a UUID4 string): a per-process random prefix (74 random bits,
    drawn again in every forked child) and a 48-bit counter; about 10x cheaper than ``str(uuid.uuid4())``."""
    return f"{_task_id_prefix}{next(_task_ids) & 0xFFFFFFFFFFFF:012x}"


def _new_task_ids_after_fork() -> None:
    """In a forked child: a prefix of its own, so no id it makes repeats one its parent (or a sibling) makes."""
    global _task_id_prefix, _task_ids
    _task_id_prefix = str(uuid.uuid4())[:24]
    _task_ids = itertools.count(1)


at_fork_in_child(_new_task_ids_after_fork)


# -- reading Hermes's values --------------------------------------------------------------------------------


def _provider_id(response: Any, response_id: Any) -> str | None:
    """``response_id`` as a string, or None when it is empty, cannot be read, or Hermes made it up; never raises.

    Hermes rebuilds a streamed response as a ``SimpleNamespace`` and drops the provider's id for one
    of its own (``stream-<uuid4>``, or ``PARTIAL_STREAM_STUB_ID`` for a stream cut short), and its
    native Gemini client answers with a ``SimpleNamespace`` whose id it makes up (``chatcmpl-`` and
    12 hex digits): ``gen_ai.response.id`` is the provider's id, so none is recorded for those.
    """
    text: str | None = response_id if type(response_id) is str else _id_text(response_id)
    if not text:
        return None
    if type(response) is SimpleNamespace and (
        text.startswith("stream-") or text == _PARTIAL_STREAM_ID or _GEMINI_MADE_UP_ID.fullmatch(text) is not None
    ):
        return None
    return text


def _id_text(response_id: Any) -> str | None:
    """A response id that is not a ``str`` as text (bytes decoded), or None when empty or unreadable; never raises."""
    try:
        if not response_id:
            return None
        if isinstance(response_id, (bytes, bytearray)):
            return bytes(response_id).decode("utf-8", "replace")
        return str(response_id)
    except Exception as exc:  # noqa: BLE001 - an id whose __bool__ or __str__ raises: the rest of the chat is still recorded
        log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: response id not readable\n%s",
                   _traceback_text(exc))
        return None


def _outcome(result: Any) -> tuple[bool, bool, Any, Any]:
    """(failed, interrupted, final_response or None, error text or None) of Hermes's result dict; never raises.

    A result that cannot be read (a ``get`` or a ``__bool__`` that raises) counts as a plain one with no answer,
    so the spans are still completed and ended.
    """
    try:
        failed = bool(result.get("failed"))
        interrupted = bool(result.get("interrupted"))
        final = result.get("final_response")
        return failed, interrupted, (final if final else None), (result.get("error") if failed else None)
    except Exception as exc:  # noqa: BLE001 - an unreadable result counts as a plain one with no answer
        log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: the run's result could not be read\n%s",
                   _traceback_text(exc))  # its frame holds the result, the answer in it: text only
        return False, False, None, None


def _interrupted_answer(final: Any) -> bool:
    """Whether an interrupted turn's ``final_response`` is the model's own text (what it streamed before the
    interrupt, which Hermes keeps as the assistant's message), not one of Hermes's interruption notices."""
    return isinstance(final, str) and not final.startswith(_INTERRUPT_NOTICE)


def _tool_error_type(result: Any) -> tuple[str, str] | None:
    """Hermes turns a tool's exception into a JSON ``{"error": ...}`` result: (error.type, message) or None."""
    if not isinstance(result, str) or not result.startswith("{") or '"error"' not in result:
        return None
    try:
        payload = json.loads(result)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than json parses: not Hermes's error result
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


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """``cache[key] = value``, the cache emptied first when full; an unhashable key is not remembered."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    with contextlib.suppress(TypeError):
        cache[key] = value


# -- the components -------------------------------------------------------------------------------------------


class Components:
    """What the invocation objects record with, and all they know of the telemetry: the tracer, the state store,
    the histograms (None: not recorded), the event logger (None: no events) and the content rules.

    ``span_content`` / ``event_content``: message content goes on spans / in events; ``content``: either.
    ``error_text``: an error's message text (and stack trace) is recorded; otherwise only its class and
    content-free facts (:func:`~statebackends_hermes_agent.genai.error_summary`). ``limit``: characters kept of
    each captured text (0: unbounded). ``legacy_react``: the steps also carry the deprecated ``gen_ai.react.*``
    names. ``chunk_lock`` orders a streamed chat's first chunk against its end (made anew in a forked child). The
    identity caches keep the attributes of each (provider, model, ...) built once; ``tool_descriptions`` looks up
    the description of a tool Hermes's registry has.
    """

    __slots__ = (
        "agent_identities",
        "chat_identities",
        "chunk_lock",
        "content",
        "duration",
        "error_text",
        "event_content",
        "event_logger",
        "first_chunk",
        "legacy_react",
        "limit",
        "span_content",
        "store",
        "tokens",
        "tool_descriptions",
        "tracer",
    )

    def __init__(
        self,
        tracer: Tracer,
        store: StateStore[InvocationState],
        *,
        duration: Histogram | None = None,
        tokens: Histogram | None = None,
        first_chunk: Histogram | None = None,
        event_logger: Any = None,
        span_content: bool = False,
        error_text: bool = False,
        limit: int = DEFAULT_CONTENT_MAX_LENGTH,
        legacy_react: bool = False,
    ) -> None:
        self.tracer = tracer
        self.store = store
        self.duration = duration
        self.tokens = tokens
        self.first_chunk = first_chunk
        self.event_logger = event_logger
        self.span_content = span_content
        self.event_content = event_logger is not None
        self.content = span_content or self.event_content
        self.error_text = error_text or self.content
        self.limit = limit
        self.legacy_react = legacy_react
        self.chunk_lock = threading.Lock()
        self.tool_descriptions = ToolDescriptions()
        self.agent_identities: dict[tuple[Any, ...], _Identity] = {}
        """(provider label, model, session id) -> the ``invoke_agent`` attributes, built once."""
        self.chat_identities: dict[tuple[Any, ...], _Identity] = {}
        """(provider label, base URL, model) -> the chat span's name and attributes, built once."""


def _error(
    c: Components,
    span: Span,
    error_type: str,
    description: str,
    exc: BaseException | None = None,
    attributes: dict[str, Any] | None = None,
) -> None:
    """The one way an error is recorded on a span: ERROR status with ``description``, ``error.type`` (set with
    ``attributes`` in one call) and, for an exception, an ``exception`` event: the SDK's (message, stack trace)
    when ``c.error_text``, else its type alone."""
    span.set_status(Status(_ERROR, description))
    if attributes is None:
        span.set_attribute(ERROR_TYPE, error_type)
    else:
        attributes[ERROR_TYPE] = error_type
        span.set_attributes(attributes)
    if exc is not None:
        if c.error_text:
            span.record_exception(exc)
        else:
            span.add_event("exception", {"exception.type": type(exc).__qualname__})


def _exception_text(c: Components, exc: BaseException) -> str:
    """A status description for ``exc``: its class and message with ``c.error_text``, else its content-free summary."""
    if c.error_text:
        return f"{type(exc).__name__}: {genai.safe_str(exc)}"
    return genai.error_summary(exc)


def _end_step(
    c: Components,
    state: InvocationState,
    finish_reason: str | None,
    error_type: str | None = None,
    description: str = "",
    exc: BaseException | None = None,
) -> None:
    """End the open react step, if any, with ``finish_reason`` (and as failed when ``error_type`` is given); the state
    names no step from the first line on, and the span is ended even when recording on it raised."""
    span = state.step_span
    if span is None:
        return
    state.step_span = state.step_ctx = None
    try:
        finish = None
        if finish_reason:
            finish = {REACT_FINISH_REASON: finish_reason}
            if c.legacy_react:
                finish[LEGACY_REACT_FINISH_REASON] = finish_reason
        if error_type is not None:
            _error(c, span, error_type, description, exc, finish)
        elif finish is not None:
            span.set_attributes(finish)  # what the SDK's set_attribute calls
    finally:
        span.end()


# -- the invocation base ------------------------------------------------------------------------------------


class Invocation:
    """Something the telemetry started (a span, made current where it started if ``_token``), ended once by
    ``stop(result)`` or ``fail(error)`` (the first wins), or as a context manager: ``with`` ends it with ``fail``
    when the block raised, else with ``stop(self.result)``. Neither raises what the telemetry raises (only
    ``KeyboardInterrupt`` is let through), and the exception leaving a ``with`` block is never replaced.

    ``span`` is None when no span reached us (the telemetry could not start it, or it is not traced).
    Subclasses say what ending records (``_record``) and release what they hold (``_release``).
    """

    __slots__ = ("_c", "_done", "_token", "result", "span")
    _what = "could not complete the span"
    _streaming = False  # a streamed chat decides its end under the chunk lock (ChatCall)

    def __init__(self, components: Components) -> None:
        self._c = components
        self.span: Span | None = None
        self._token: Token[Context] | None = None
        self._done = False
        self.result: Any = None
        """What the ``with`` form ends the invocation with (``stop(result)``) when its block returns."""

    def stop(self, result: Any = None) -> None:
        """End it with the wrapped call's ``result``; never raises (only ``KeyboardInterrupt`` is let through)."""
        if self._done or (self._streaming and not self._end_streamed()):
            return
        self._done = True
        self._finish(result, None)

    def fail(self, error: BaseException) -> None:
        """End it with the exception ``error`` the wrapped call raised, recorded on the span; never raises (only
        ``KeyboardInterrupt`` is let through)."""
        if self._done or (self._streaming and not self._end_streamed()):
            return
        self._done = True
        self._finish(None, error)

    def __enter__(self) -> Invocation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.stop(self.result)
        else:
            self.fail(exc)

    def _end_streamed(self) -> bool:
        """Whether this stop/fail is the one ending a streamed chat (see :class:`ChatCall`)."""
        return not self._done

    def _record(self, result: Any, error: BaseException | None) -> None:
        """Record the outcome (``error`` None: ``result``) on the span, the state and the metrics; may raise."""

    _releases = False  # whether _release has anything to give back (a call saved where it has not)

    def _release(self) -> None:
        """Give back what the invocation holds beyond its span and context (its state); may raise."""

    def _finish(self, result: Any, error: BaseException | None) -> None:
        """Record the outcome, end the span, detach its context and release the rest, each whatever the one before
        raised; then contain the first failure: the one boundary of ``stop`` and ``fail``."""
        failure: BaseException | None = None
        try:
            self._record(result, error)
        except BaseException as exc:  # noqa: BLE001 - contained below, once everything is ended
            failure = exc
        span = self.span
        if span is not None:
            try:
                span.end()
            except BaseException as exc:  # noqa: BLE001 - a processor's on_end: the span is ended all the same
                if failure is None:
                    failure = exc
        token = self._token
        if token is not None:
            try:
                _detach(token)
            except BaseException as exc:  # noqa: BLE001 - detach logs its own failure: a raising log handler
                if failure is None:
                    failure = exc
        if self._releases:
            try:
                self._release()
            except BaseException as exc:  # noqa: BLE001 - a store's end
                if failure is None:
                    failure = exc
        if failure is not None:
            _contain(failure, self._what)


# -- invoke_agent ---------------------------------------------------------------------------------------------


class AgentInvocation(Invocation):
    """One ``invoke_agent``: returned by :meth:`HermesTelemetry.start_invocation`.

    ``task_id`` is the invocation id the store keys the state by (the one given, or a new one): pass it to the
    agent so its tools carry it. ``span`` is the ``invoke_agent`` span, current where it started; None when it
    could not be started (the call then keeps its state, and its chats and tools hang under the caller's span).
    ``scope`` is None when the store could not begin the state (the call then runs uninstrumented).
    ``stop`` takes Hermes's result dict, which may report a failure (``failed``).
    """

    __slots__ = ("_identity", "_started", "scope", "task_id")
    _what = "could not complete invoke_agent"

    _releases = True

    def __init__(
        self,
        components: Components,
        agent: Any,
        task_id: Any = None,
        *,
        user_message: Any = None,
        parent: Context | None = None,
    ) -> None:
        """Begin the state of one invocation of ``agent`` and start its span, current here (see
        :meth:`HermesTelemetry.start_invocation`, the way to make one); never raises (only ``KeyboardInterrupt``
        is let through, after undoing what was begun)."""
        # Every slot set here, the base's too (one call instead of two: this runs once per invocation).
        c = self._c = components
        self.span = None
        self._token = None
        self._done = False
        self.result = None
        self.task_id = task_id or _new_task_id()
        self.scope: Scope[InvocationState] | None = None
        self._started = 0.0
        self._identity: _Identity | None = None
        scope = span = None
        try:
            scope = c.store.begin(agent, invocation_id=self.task_id)
            state = scope.state
            if parent is None:  # the invocation that was current where this one began encloses it, if still open
                enclosing = first_open(scope.previous).state
                if enclosing is not None and enclosing.agent_span is not None:
                    parent = _parent_within(enclosing)
            key = (getattr(agent, "provider", None), getattr(agent, "model", None), getattr(agent, "session_id", None))
            try:
                identity = c.agent_identities.get(key)
            except TypeError:  # an unhashable label: built each time, not cached
                identity = None
            if identity is None:
                identity = _agent_identity(c, key)
            self._identity = identity
            attributes = identity.attributes
            if c.span_content and user_message is not None:
                attributes = {**attributes, _INPUT_MESSAGES: genai.to_json([genai.text_message("user", user_message,
                                                                                               None, c.limit)])}
            state.agent_ctx = parent  # the context its spans hang under until (unless) its own span starts
            self.scope = scope
            self._started = _monotonic()
            span = c.tracer.start_span(_AGENT_SPAN_NAME, context=parent, kind=_INTERNAL, attributes=attributes)
            self.span = state.agent_span = span
            current = _set_span_in_context(span)
            # With no explicit parent both contexts are the current one plus the span: build it once.
            state.agent_ctx = current if parent is None else _set_span_in_context(span, parent)
            self._token = _attach(current)
        except BaseException as exc:  # noqa: BLE001 - the one boundary of this entry
            if scope is None or isinstance(exc, KeyboardInterrupt):  # nothing begun, or undo all: uninstrumented
                self._done = True
                if span is not None:
                    _end_quietly(span)
                if scope is not None:
                    self.scope = None
                    _end_scope_quietly(c.store, scope)
            _contain(exc, "could not open invoke_agent" if scope is None else "invoke_agent started incompletely")

    @property
    def evicted(self) -> bool:
        """Whether the store evicted this invocation's state while it was open (its scope says so)."""
        scope = self.scope
        return scope is not None and scope.evicted

    def _record(self, result: Any, error: BaseException | None) -> None:
        scope = self.scope
        if scope is None:
            return
        c = self._c
        state = scope.state
        failed = interrupted = False
        final = failure_text = None
        if error is None and isinstance(result, dict):  # Hermes's result dict
            failed, interrupted, final, failure_text = _outcome(result)
        # The span, the metric and the step fail alone: each is tried whatever the one before raised; the first
        # failure is raised once all are done.
        failure: BaseException | None = None
        span = self.span
        if span is not None:
            try:
                self._record_span(span, state, error, failed, interrupted, final, failure_text)
            except BaseException as exc:  # noqa: BLE001 - raised below
                failure = exc
        identity = self._identity
        if identity is not None and c.duration is not None:
            try:
                error_type = type(error).__qualname__ if error is not None else (_RUN_FAILED if failed else None)
                labels = identity.finals.get((state.response_model, error_type)) if state.response_model else (
                    identity.labels if error_type is None else None)
                if labels is None:
                    labels = identity.final(state.response_model, error_type)
                c.duration.record(_monotonic() - self._started, labels)
            except BaseException as exc:  # noqa: BLE001 - raised below
                failure = failure if failure is not None else exc
        if state.step_span is not None:  # the step ends before the invocation
            if error is not None:
                _end_step(c, state, "error", type(error).__qualname__, _exception_text(c, error), error)
            elif failed:
                _end_step(c, state, "error", _RUN_FAILED, _failure_text(c, failure_text))
            else:
                _end_step(c, state, None)
        if failure is not None:
            raise failure

    def _record_span(
        self,
        span: Span,
        state: InvocationState,
        error: BaseException | None,
        failed: bool,
        interrupted: bool,
        final: Any,
        failure_text: Any,
    ) -> None:
        c = self._c
        attributes: dict[str, Any] = {_INPUT_TOKENS: state.input_tokens, _OUTPUT_TOKENS: state.output_tokens}
        if state.response_id:
            attributes[_RESPONSE_ID] = state.response_id
        if state.response_model:
            attributes[_RESPONSE_MODEL] = state.response_model
        if state.finish_reasons:
            attributes[_FINISH_REASONS] = list(state.finish_reasons)  # see ChatCall._record
        # A failed run's final_response is Hermes's error text, an interrupted run's Hermes's notice: never an
        # assistant message. But a reply the interrupt cut short (the model's text streamed so far, which Hermes
        # keeps as the assistant's message) is the answer, ended as its chat was: "error".
        if c.span_content and final is not None and not failed and (not interrupted or _interrupted_answer(final)):
            if interrupted:
                reason = "error"
            else:
                reason = genai.finish_reason(state.finish_reasons[-1] if state.finish_reasons else None)
            attributes[_OUTPUT_MESSAGES] = genai.to_json([genai.text_message("assistant", final, reason, c.limit)])
        scope = self.scope
        if scope is not None and scope.evicted:
            # Not an error of the call (the agent's answer is fine): the telemetry of this call may be incomplete,
            # because its state was dropped to keep the store bounded.
            attributes[EVICTED_ATTRIBUTE] = True
            span.add_event(EVICTED_EVENT, {"statebackends.state.backend": c.store.name or type(c.store).__name__})
        if interrupted:  # a cancel is not an error: the status stays unset
            attributes[genai.HERMES_INTERRUPTED] = True
        if error is not None:
            _error(c, span, type(error).__qualname__, _exception_text(c, error), error, attributes)
        elif failed:
            _error(c, span, _RUN_FAILED, _failure_text(c, failure_text), None, attributes)
        else:
            span.set_attributes(attributes)  # one call: what the SDK's set_attribute does per attribute

    def _release(self) -> None:
        scope = self.scope
        if scope is not None:
            self._c.store.end(scope)


def _failure_text(c: Components, text: Any) -> str:
    """The status description of a run Hermes reports failed: its error text with ``c.error_text``, else a fixed one."""
    if c.error_text and text:
        return genai.safe_str(text)
    return "agent run failed"


# -- chat ------------------------------------------------------------------------------------------------------


class ChatCall(Invocation):
    """One LLM round trip (a ``chat`` span): returned by :meth:`HermesTelemetry.start_chat`.

    ``span`` is None when no span reached us (the telemetry could not start it: the chat's tokens still count
    in its invocation; or this is the plain call Hermes falls back to inside a streaming call, which the outer
    chat already covers). ``stop`` takes the LLM's response.
    """

    __slots__ = ("_first_chunk", "_identity", "_inputs", "_started", "_state", "_streaming")
    _what = "could not complete the chat span"

    def __init__(self, components: Components, agent: Any, api_kwargs: Any = None) -> None:
        """Start the chat span of one LLM request of ``agent`` (opening a react step if none is open; see
        :meth:`HermesTelemetry.start_chat`); never raises (only ``KeyboardInterrupt`` is let through)."""
        # Every slot set here, the base's too (one call instead of two: this runs once per LLM call).
        c = self._c = components
        self.span = None
        self._token = None
        self._done = False
        self.result = None
        self._state: InvocationState | None = None  # the invocation it counts in (its llm_depth was raised)
        self._started = 0.0
        self._identity: _Identity | None = None  # None: a passive call (inside another chat) records nothing
        self._inputs: list[dict[str, Any]] | None = None  # the request's messages, only when content goes to events
        self._first_chunk = False
        self._streaming = False
        try:
            state = c.store.current(agent)
            if state is not None:
                self._state = state
                state.llm_depth += 1  # given back by the chat's end, however it ends
                if state.llm_depth > 1:  # the streaming path falling back to the plain call: one span, the outer one
                    return
                parent = state.step_ctx if state.step_span is not None else _open_step(c, state)
            else:
                parent = None
            model = api_kwargs.get("model") if isinstance(api_kwargs, dict) else None
            key = (getattr(agent, "provider", None), getattr(agent, "base_url", None),
                   model or getattr(agent, "model", None))
            try:
                identity = c.chat_identities.get(key)
            except TypeError:  # an unhashable label: built each time, not cached
                identity = None
            if identity is None:
                identity = _chat_identity(c, key)
            attributes = identity.attributes
            if c.content:  # spans or events: otherwise no message is ever built
                messages = api_kwargs.get("messages") if isinstance(api_kwargs, dict) else None
                inputs = genai.input_messages(messages, c.limit)
                if c.event_content:
                    self._inputs = inputs
                if c.span_content:
                    attributes = {**attributes, _INPUT_MESSAGES: genai.to_json(inputs)}
            self._identity = identity
            self._started = _monotonic()
            self.span = c.tracer.start_span(identity.name, context=parent, kind=_CLIENT, attributes=attributes)
        except BaseException as exc:  # noqa: BLE001 - the one boundary of this entry
            if isinstance(exc, KeyboardInterrupt):
                self._identity = None  # passive: its end records nothing, ends its span, gives its depth back
                self.stop(None)
            _contain(exc, "could not start the chat span")

    def first_chunk(self) -> None:
        """Record the time to the first streamed chunk (span attribute and metric), once, if the chat is still open;
        never raises (only ``KeyboardInterrupt`` is let through).

        A chunk that arrives after ``stop``/``fail`` (Hermes abandons the stream's worker thread when the agent is
        interrupted, and that thread may still read a chunk) is not recorded: the chat is over.
        """
        span = self.span
        if span is None or self._first_chunk or self._done:
            return
        try:
            # stop/fail take it to end the chat: a chunk is recorded before the end or not at all
            with self._c.chunk_lock:
                if not (self._first_chunk or self._done):
                    self._record_first_chunk(span)
        except BaseException as exc:  # noqa: BLE001 - the one boundary of this entry
            _contain(exc, "time to first chunk not recorded")

    def _record_first_chunk(self, span: Span) -> None:
        self._first_chunk = True
        elapsed = _monotonic() - self._started
        span.set_attribute(_TIME_TO_FIRST_CHUNK, elapsed)
        histogram, identity = self._c.first_chunk, self._identity
        if histogram is not None and identity is not None:
            histogram.record(elapsed, identity.labels)

    def wrap_first_delta(self, callback: Callable[[], Any] | None) -> Callable[[], Any]:
        """A callback for Hermes's ``on_first_delta``: records :meth:`first_chunk`, then calls ``callback`` (if any)."""
        self._streaming = True
        first_chunk = self.first_chunk

        def on_first_delta() -> Any:
            first_chunk()
            if callback is not None:
                return callback()
            return None

        return on_first_delta

    def _end_streamed(self) -> bool:
        """Whether this stop/fail is the one ending a streamed chat: decided (``_done`` set) under the chunk lock, so a
        first chunk being recorded is recorded before the end, and one arriving later is not recorded."""
        with self._c.chunk_lock:
            if self._done:
                return False
            self._done = True
            return True

    def _record(self, result: Any, error: BaseException | None) -> None:
        state = self._state
        if state is not None:  # first: given back however the rest goes
            state.llm_depth -= 1
        identity = self._identity
        if identity is None:  # passive
            return
        c = self._c
        span = self.span
        # Spans, metrics and events fail alone: each is tried whatever the one before raised; the first failure is
        # raised once all are done.
        failure: BaseException | None = None
        if error is not None:
            error_type = type(error).__qualname__
            if span is not None:
                try:
                    _error(c, span, error_type, _exception_text(c, error), error)
                except BaseException as exc:  # noqa: BLE001 - raised below
                    failure = exc
            if c.duration is not None:
                try:
                    c.duration.record(_monotonic() - self._started, identity.final(None, error_type))
                except BaseException as exc:  # noqa: BLE001 - raised below
                    failure = failure if failure is not None else exc
            if c.event_content and span is not None:
                # The request is reported; the error text is never an output message.
                _emit_details(c, span, identity.labels, {ERROR_TYPE: error_type}, self._inputs, None)
            if failure is not None:
                raise failure
            return
        input_tokens, output_tokens, reasons, wants_tools = read_response(result)
        response_id = _provider_id(result, getattr(result, "id", None))
        response_model = getattr(result, "model", None)
        response_model = str(response_model) if response_model else None
        if state is not None:
            state.input_tokens += input_tokens
            state.output_tokens += output_tokens
            state.response_id = response_id  # the latest response's (None: it has none of the provider's)
            if response_model:
                state.response_model = response_model
            if reasons:
                state.finish_reasons = reasons
        attributes: dict[str, Any] = {_INPUT_TOKENS: input_tokens, _OUTPUT_TOKENS: output_tokens}
        if response_id:
            attributes[_RESPONSE_ID] = response_id
        if response_model:
            attributes[_RESPONSE_MODEL] = response_model
        if reasons:
            # A list: the SDK's isinstance(value, Sequence) takes ~120 ns longer for a tuple (CPython 3.11's ABC
            # check), and it makes a tuple of either.
            attributes[_FINISH_REASONS] = list(reasons)
        outputs = None
        if c.content:  # on spans or in events
            outputs = genai.output_messages(result, c.limit)
            if c.span_content:
                attributes[_OUTPUT_MESSAGES] = genai.to_json(outputs)
        if span is not None:
            try:
                span.set_attributes(attributes)
            except BaseException as exc:  # noqa: BLE001 - raised below
                failure = exc
        if state is not None and not wants_tools:  # a final answer closes the round
            try:
                _end_step(c, state, reasons[0] if reasons else "stop")
            except BaseException as exc:  # noqa: BLE001 - raised below
                failure = failure if failure is not None else exc
        if c.duration is not None:
            try:
                found = identity.usages.get(response_model)
                final, tokens_in, tokens_out = found if found is not None else identity.usage(response_model)
                c.duration.record(_monotonic() - self._started, final)
                tokens = c.tokens
                if tokens is not None:
                    tokens.record(input_tokens, tokens_in)
                    tokens.record(output_tokens, tokens_out)
            except BaseException as exc:  # noqa: BLE001 - raised below
                failure = failure if failure is not None else exc
        if outputs is not None and c.event_content and span is not None:
            _emit_details(c, span, identity.labels, attributes, self._inputs, outputs)
        if failure is not None:
            raise failure



def _emit_details(
    c: Components,
    span: Span,
    labels: dict[str, Any],
    response: dict[str, Any],
    inputs: list[dict[str, Any]] | None,
    outputs: list[dict[str, Any]] | None,
) -> None:
    """Emit one ``gen_ai.client.inference.operation.details`` event for a chat, tied to its span."""
    attributes: dict[str, Any] = dict(labels)
    for key, value in response.items():
        if key != _OUTPUT_MESSAGES:
            attributes[key] = value
    if inputs is not None:
        attributes[_INPUT_MESSAGES] = inputs
    if outputs is not None:
        attributes[_OUTPUT_MESSAGES] = outputs
    genai.emit_details(c.event_logger, attributes, _set_span_in_context(span))


# -- execute_tool -----------------------------------------------------------------------------------------------


class ToolCall(Invocation):
    """One tool execution (an ``execute_tool`` span, current while the tool runs): from
    :meth:`HermesTelemetry.start_tool`.

    ``stop`` takes the tool's result: a Hermes ``{"error": ...}`` result marks the span failed.
    """

    __slots__ = ()
    _what = "could not complete the execute_tool span"

    def __init__(
        self, components: Components, owner: Any, name: Any, arguments: Any = None, *, task_id: Any = None,
        tool_call_id: Any = None,
    ) -> None:
        """Start an ``execute_tool`` span and make it current here (see :meth:`HermesTelemetry.start_tool`); never
        raises (only ``KeyboardInterrupt`` is let through)."""
        c = self._c = components
        self.span = None
        self._token = None
        self._done = False
        self.result = None
        try:
            state = c.store.current(owner, task_id or None)
            parent = None
            if state is not None:
                parent = state.step_ctx or state.agent_ctx
            if type(name) is not str:
                name = str(name)
            attributes: dict[str, Any] = {_OPERATION_NAME: _OP_EXECUTE_TOOL, _TOOL_NAME: name, _TOOL_TYPE: "function"}
            description = c.tool_descriptions(name)  # Hermes's registry, once per tool name
            if description is not None:
                attributes[_TOOL_DESCRIPTION] = description
            if tool_call_id:
                attributes[_TOOL_CALL_ID] = str(tool_call_id)
            if c.span_content and arguments is not None:
                attributes[_TOOL_ARGUMENTS] = (genai.bounded(arguments, c.limit) if isinstance(arguments, str)
                                               else genai.to_json(arguments, c.limit))
            span = self.span = c.tracer.start_span(f"execute_tool {name}", context=parent, kind=_INTERNAL,
                                                   attributes=attributes)
            span_ctx = _set_span_in_context(span)
            if state is not None and name == "delegate_task":
                state.delegate_parent = span_ctx
            self._token = _attach(span_ctx)
        except BaseException as exc:  # noqa: BLE001 - the one boundary of this entry
            if self.span is not None and (self._token is None or isinstance(exc, KeyboardInterrupt)):
                self.stop(None)  # not current: ended at once, nothing left open
            _contain(exc, "could not start the execute_tool span")

    def _record(self, result: Any, error: BaseException | None) -> None:
        span = self.span
        if span is None:
            return
        c = self._c
        if error is not None:
            _error(c, span, type(error).__qualname__, _exception_text(c, error), error)
            return
        attributes: dict[str, Any] | None = None
        if c.span_content and result is not None:
            attributes = {_TOOL_RESULT: genai.bounded(result, c.limit) if isinstance(result, str)
                          else genai.to_json(result, c.limit)}
        failure = _tool_error_type(result)
        if failure is not None:
            error_type, message = failure
            _error(c, span, error_type, message if c.error_text else error_type, None, attributes)
        elif attributes is not None:  # one call for the error type and the result
            span.set_attributes(attributes)


# -- subagents ---------------------------------------------------------------------------------------------------


class PendingSubagent:
    """A child agent built by ``delegate_task`` and not yet run: the span context its invocation will hang under."""

    __slots__ = ("parent",)

    def __init__(self, parent: Context | None) -> None:
        self.parent = parent


# -- identities: the attributes of one (provider, model, ...) built once --------------------------------------------


class _Identity:
    """The span name, start attributes and metric attributes of one (provider, base URL, model) or (provider, model,
    session id), and the metric attributes of its outcomes (response model, error type), each built once."""

    __slots__ = ("attributes", "finals", "labels", "name", "usages")

    def __init__(self, name: str, attributes: dict[str, Any], labels: dict[str, Any]) -> None:
        self.name = name
        self.attributes = attributes
        self.labels = labels  # shared by every call of this identity: never mutated
        self.finals: dict[tuple[str | None, str | None], dict[str, Any]] = {}
        self.usages: dict[str | None, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}

    def final(self, response_model: str | None, error_type: str | None) -> dict[str, Any]:
        """The metric attributes of an outcome: the start ones plus the response model and the error type."""
        if response_model is None and error_type is None:
            return self.labels
        key = (response_model, error_type)
        found = self.finals.get(key)
        if found is None:
            found = dict(self.labels)
            if response_model is not None:
                found[_RESPONSE_MODEL] = response_model
            if error_type is not None:
                found[ERROR_TYPE] = error_type
            _remember(self.finals, key, found)
        return found

    def usage(self, response_model: str | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(duration, input token, output token) metric attributes of a successful chat answered by
        ``response_model``."""
        found = self.usages.get(response_model)
        if found is None:
            final = self.final(response_model, None)
            found = (final, {**final, _TOKEN_TYPE: "input"}, {**final, _TOKEN_TYPE: "output"})
            _remember(self.usages, response_model, found)
        return found


# -- the telemetry ------------------------------------------------------------------------------------------------


class HermesTelemetry:
    """The public lifecycle of one instrumentation: starts invocations, chats and tools with its :class:`Components`.

    ``start_invocation``, ``start_chat``, ``start_tool``, ``end_tool_round``, ``prepare_subagent`` and
    ``take_subagent`` never raise what the telemetry raises (only ``KeyboardInterrupt`` is let through), nor do the
    ``stop``/``fail`` of what they return. ``capture_content`` is a
    :class:`~statebackends_hermes_agent.genai.CaptureMode` (``True`` means ``SPAN_ONLY``, ``False`` ``NO_CONTENT``);
    events need ``event_logger`` (a Logs API ``Logger``). ``error_text``: record error messages even with content
    capture off (content capture on records them anyway). ``content_max_length``: characters kept of each captured
    text (0: unbounded). ``legacy_react_attributes``: the steps also carry the deprecated ``gen_ai.react.round`` and
    ``gen_ai.react.finish_reason`` beside ``hermes.react.*``.
    """

    def __init__(
        self,
        tracer: Tracer,
        store: StateStore[InvocationState],
        meter: Meter | None = None,
        capture_content: bool | CaptureMode = False,
        event_logger: Any = None,
        *,
        error_text: bool = False,
        content_max_length: int = DEFAULT_CONTENT_MAX_LENGTH,
        legacy_react_attributes: bool = False,
    ) -> None:
        if isinstance(capture_content, CaptureMode):
            mode = capture_content
        else:
            mode = CaptureMode.SPAN_ONLY if capture_content else CaptureMode.NO_CONTENT
        self.capture_mode = mode
        histograms: list[Histogram | None] = [None, None, None]
        if meter is not None:
            try:
                # A no-op meter's histograms record nothing: dropped, so no attributes are built for them.
                histograms = [None if isinstance(h, NoOpHistogram) else h for h in genai.create_instruments(meter)]
            except BaseException as exc:  # noqa: BLE001 - metrics off, never instrument() failing
                _contain(exc, "metrics disabled, the instruments could not be created")
        self.components = Components(
            tracer,
            store,
            duration=histograms[0],
            tokens=histograms[1],
            first_chunk=histograms[2],
            event_logger=event_logger if mode.on_event else None,
            span_content=mode.on_span,
            error_text=error_text,
            limit=content_max_length,
            legacy_react=legacy_react_attributes,
        )
        self.tracer = tracer
        self.store = store
        self.capture_content = self.components.content
        """Whether any message content is recorded (the wrappers pass the user message only then)."""
        self._pending: weakref.WeakKeyDictionary[Any, PendingSubagent] = weakref.WeakKeyDictionary()
        self.subagents_pending = 0
        """Subagents registered and not taken yet (or whose child is gone): 0 lets a caller skip
        :meth:`take_subagent`."""
        self._pending_lock = threading.Lock()
        at_fork_in_child(self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        """In a forked child: the locks anew (another thread of the parent may have held one); the pending subagents
        are kept (the thread that forked may still run one of them here; the others' agents are freed with them)."""
        self._pending_lock = threading.Lock()
        self.components.chunk_lock = threading.Lock()

    # -- invoke_agent ---------------------------------------------------------------------------

    def start_invocation(
        self,
        agent: Any,
        task_id: str | None = None,
        *,
        user_message: Any = None,
        parent: Context | None = None,
    ) -> AgentInvocation:
        """Begin the state of one invocation of ``agent`` and start its ``invoke_agent`` span, current here.

        ``task_id`` is the invocation id (a new one when falsy: read it back from ``invocation.task_id``).
        ``parent`` is the span context to hang under (a subagent's), else the enclosing invocation's or the
        caller's span. Never raises (only ``KeyboardInterrupt`` is let through, after undoing what was begun):
        when the store cannot begin the state the call runs uninstrumented; when the span cannot be started the
        call keeps its state and its spans hang under ``parent``.
        """
        return AgentInvocation(self.components, agent, task_id, user_message=user_message, parent=parent)

    # -- react step -------------------------------------------------------------------------------

    def end_tool_round(self, owner: Any, task_id: Any = None, error: BaseException | None = None) -> None:
        """Close the ReAct step of ``owner``'s invocation (found by ``task_id``) once its tools ran or failed; never
        raises (only ``KeyboardInterrupt`` is let through)."""
        try:
            state = self.components.store.current(owner, task_id or None)
            if state is not None and state.step_span is not None:
                c = self.components
                if error is None:
                    _end_step(c, state, "tool_calls")
                else:
                    _end_step(c, state, "error", type(error).__qualname__, _exception_text(c, error), error)
        except BaseException as exc:  # noqa: BLE001 - the one boundary of this entry
            _contain(exc, "could not end the react step")

    # -- chat -----------------------------------------------------------------------------------------

    def start_chat(self, agent: Any, api_kwargs: Any = None, *, streaming: bool = False) -> ChatCall:
        """Start a ``chat`` span for one LLM request of ``agent`` (opening a react step if none is); never raises (only
        ``KeyboardInterrupt`` is let through).

        ``api_kwargs`` is the request (its ``model`` names the span). With ``streaming`` pass
        :meth:`ChatCall.wrap_first_delta` as the call's ``on_first_delta``.
        """
        return ChatCall(self.components, agent, api_kwargs)

    # -- execute_tool ---------------------------------------------------------------------------------

    def start_tool(
        self,
        owner: Any,
        name: Any,
        arguments: Any = None,
        *,
        task_id: Any = None,
        tool_call_id: Any = None,
    ) -> ToolCall:
        """Start an ``execute_tool`` span under ``owner``'s open step (or its invocation) and make it current here.

        ``task_id`` finds the invocation where only the id travels (a tool pool). Never raises (only
        ``KeyboardInterrupt`` is let through): on failure a :class:`ToolCall` without a span is returned.
        """
        return ToolCall(self.components, owner, name, arguments, task_id=task_id, tool_call_id=tool_call_id)

    # -- subagents -------------------------------------------------------------------------------------

    def prepare_subagent(self, child: Any) -> None:
        """Remember, for ``child`` built in its parent's ``delegate_task``, where its invocation will hang; never
        raises (only ``KeyboardInterrupt`` is let through).

        The look-up is made now, in the parent's tool thread while the parent is open, through
        the store with the child as owner, so the backend decides whether the parent is found
        (``instance`` cannot: the state lives on the parent object). Only the parent's
        ``delegate_task`` span context is kept, so the child hangs under it even when it runs
        after the parent's invocation ended; the child itself runs untouched in the context
        Hermes gives it (running it in a copy of the build-time context would hide the
        context variables its worker sets, such as Hermes's session working directory).
        """
        try:
            self.register_subagent(child, PendingSubagent(self._subagent_parent(child)))
        except BaseException as exc:  # noqa: BLE001 - the one boundary of this entry
            _contain(exc, "subagent will start a trace of its own")

    def register_subagent(self, child: Any, pending: PendingSubagent) -> None:
        """Keep ``pending`` for ``child`` until :meth:`take_subagent` (held weakly by the child: a child that never
        runs leaves nothing); may raise (an unhashable child)."""
        with self._pending_lock:
            self._pending[child] = pending
            self.subagents_pending += 1

    def _subagent_parent(self, child: Any) -> Context | None:
        state = self.components.store.current(child)
        if state is None:
            return None
        return state.delegate_parent or state.agent_ctx

    def take_subagent(self, agent: Any) -> PendingSubagent | None:
        """The pending record :meth:`prepare_subagent` made for ``agent`` (removed), or None; never raises (only
        ``KeyboardInterrupt`` is let through)."""
        if not self.subagents_pending:  # only subagents are registered: most calls skip the lock
            return None
        try:
            with self._pending_lock:
                pending = self._pending.pop(agent, None)
                if pending is not None or not self._pending:
                    self.subagents_pending = len(self._pending)
                return pending
        except BaseException as exc:  # noqa: BLE001 - an unhashable agent
            _contain(exc, "no subagent record for this agent")
            return None


def _agent_identity(c: Components, key: tuple[Any, ...]) -> _Identity:
    """The ``invoke_agent`` span attributes and metric attributes of one (provider, model, session id), remembered."""
    provider, model, session_id = key
    attributes: dict[str, Any] = {_OPERATION_NAME: _OP_INVOKE_AGENT, GenAI.GEN_AI_AGENT_NAME: AGENT_NAME}
    labels: dict[str, Any] = {_OPERATION_NAME: _OP_INVOKE_AGENT}
    if provider:
        attributes[GenAI.GEN_AI_PROVIDER_NAME] = labels[GenAI.GEN_AI_PROVIDER_NAME] = genai.provider_name(provider)
        attributes[genai.HERMES_PROVIDER] = str(provider)
    if model:
        attributes[_REQUEST_MODEL] = labels[_REQUEST_MODEL] = str(model)
    if session_id:
        attributes[GenAI.GEN_AI_CONVERSATION_ID] = str(session_id)
    identity = _Identity(_AGENT_SPAN_NAME, attributes, labels)
    _remember(c.agent_identities, key, identity)
    return identity


def _chat_identity(c: Components, key: tuple[Any, ...]) -> _Identity:
    """The chat span name, span start attributes and metric attributes of one (provider, base URL, model),
    remembered."""
    provider, base_url, model = key
    labels: dict[str, Any] = {_OPERATION_NAME: _OP_CHAT}
    if model:  # the conventions: the request model only if known, and then the span is named "chat"
        model = labels[_REQUEST_MODEL] = str(model)
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
    identity = _Identity(f"chat {model}" if model else _OP_CHAT, attributes, labels)
    _remember(c.chat_identities, key, identity)
    return identity


def _parent_within(enclosing: InvocationState) -> Context | None:
    """Where an invocation nested in ``enclosing`` (begun while it was current) hangs: under the ambient span when
    that is in the enclosing invocation's trace (same thread, or a copied context: the exact parent), else under
    the enclosing invocation's latest ``delegate_task`` span, else its ``invoke_agent``."""
    ambient = trace.get_current_span().get_span_context()
    agent_span = enclosing.agent_span
    if ambient.is_valid and agent_span is not None and ambient.trace_id == agent_span.get_span_context().trace_id:
        return None
    return enclosing.delegate_parent or enclosing.agent_ctx


def _open_step(c: Components, state: InvocationState) -> Context | None:
    """Open the invocation's next react step under its span; the context a chat hangs under: the step's, or the
    invocation's when the step could not be started (nothing is left half-open; only KeyboardInterrupt is raised)."""
    agent_ctx = state.agent_ctx
    step = None
    try:
        number = state.round + 1
        attributes: dict[str, AttributeValue] = {**_STEP_ATTRIBUTES, REACT_ROUND: number}
        if c.legacy_react:
            attributes[LEGACY_REACT_ROUND] = number
        step = c.tracer.start_span(STEP_SPAN_NAME, context=agent_ctx, kind=_INTERNAL, attributes=attributes)
        step_ctx = _set_span_in_context(step, agent_ctx)
    except BaseException as exc:  # noqa: BLE001 - the chat goes on under the invocation
        if step is not None:
            _end_quietly(step)
        _contain(exc, "could not start the react step")
        return agent_ctx
    state.round += 1
    state.step_span, state.step_ctx = step, step_ctx
    return step_ctx


def _end_quietly(span: Span) -> None:
    """``span.end()`` while undoing a start; what it raises is logged (a KeyboardInterrupt being raised already)."""
    try:
        span.end()
    except BaseException as exc:  # noqa: BLE001 - undoing: the first failure is the one reported
        log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: ending a span being undone failed\n%s",
                   _traceback_text(exc))


def _end_scope_quietly(store: StateStore[InvocationState], scope: Scope[InvocationState]) -> None:
    """``store.end(scope)`` while undoing a start (see :func:`_end_quietly`)."""
    try:
        store.end(scope)
    except BaseException as exc:  # noqa: BLE001 - undoing: the first failure is the one reported
        log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: ending a state being undone failed\n%s",
                   _traceback_text(exc))
