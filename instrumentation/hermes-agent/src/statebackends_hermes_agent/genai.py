"""What the GenAI semantic conventions ask of the telemetry, apart from where the state lives.

Content capture modes (the ``opentelemetry-util-genai`` vocabulary), messages in the
conventions' JSON shape, the well-known ``gen_ai.provider.name`` values, the server
address of an agent's base URL and the metric instruments with the conventions'
advisory bucket boundaries. Pure functions: nothing here touches the state store.
Follows semantic conventions 1.37.0 (``gen_ai.input.messages`` / ``gen_ai.output.messages``,
``gen_ai.client.inference.operation.details``); the time-to-first-chunk metric is from a later
release (named with a fallback where the installed semconv package lacks it).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from opentelemetry.metrics import Histogram, Meter
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from opentelemetry.semconv.schemas import Schemas

from statebackends import at_fork_in_child, log_safely

_logger = logging.getLogger(__name__)

ENV_CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
"""``NO_CONTENT`` (default), ``SPAN_ONLY``, ``EVENT_ONLY`` or ``SPAN_AND_EVENT``, case-insensitive; ``true`` means
``SPAN_ONLY`` and ``false`` ``NO_CONTENT`` (the two values ``opentelemetry-instrumentation-openai-v2`` documents)."""

SEMCONV_VERSION = "1.37.0"
"""The semantic-conventions release this instrumentation follows: its attribute names (``gen_ai.provider.name``,
``gen_ai.input.messages``, ...), message shapes, metrics and event are those of 1.37.0."""
SCHEMA_URL: str = Schemas.V1_37_0.value
"""The schema URL of :data:`SEMCONV_VERSION`, given with the tracer, meter and logger
(``opentelemetry-semantic-conventions`` 0.58b0, the oldest release admitted, lists it)."""

# -- content capture ----------------------------------------------------------------------------


class CaptureMode(enum.Enum):
    """Where message content goes: nowhere, on spans, in events, or both (util-genai's names)."""

    NO_CONTENT = "NO_CONTENT"
    SPAN_ONLY = "SPAN_ONLY"
    EVENT_ONLY = "EVENT_ONLY"
    SPAN_AND_EVENT = "SPAN_AND_EVENT"

    @property
    def on_span(self) -> bool:
        """Whether content goes on the spans."""
        return self in (CaptureMode.SPAN_ONLY, CaptureMode.SPAN_AND_EVENT)

    @property
    def on_event(self) -> bool:
        """Whether content goes in ``gen_ai.client.inference.operation.details`` events."""
        return self in (CaptureMode.EVENT_ONLY, CaptureMode.SPAN_AND_EVENT)


_ALIASES = {"TRUE": CaptureMode.SPAN_ONLY, "FALSE": CaptureMode.NO_CONTENT}
"""openai-v2's boolean spellings (any case; it reads ``true`` as on and anything else as off), so a variable set for it
beside ours means the same here, without a warning."""
_warned: set[str] = set()
_warned_lock = threading.Lock()


def _new_warned_lock_after_fork() -> None:
    """A child forked while another thread held :data:`_warned_lock` gets a free one (it would wait forever)."""
    global _warned_lock
    _warned_lock = threading.Lock()


at_fork_in_child(_new_warned_lock_after_fork)


def capture_mode(environ: Mapping[str, str] | None = None) -> CaptureMode:
    """The capture mode that ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` names; never raises.

    Unset means ``NO_CONTENT``; ``true`` is an alias of ``SPAN_ONLY`` and ``false`` of ``NO_CONTENT`` (any case);
    any other value logs one warning (once per distinct value in the process) naming the value and the valid ones,
    and captures nothing. ``OTEL_SEMCONV_STABILITY_OPT_IN`` is not read: this instrumentation has only ever emitted
    the conventions these names belong to (see the README).
    """
    raw = (os.environ if environ is None else environ).get(ENV_CAPTURE_CONTENT, "").strip()
    if not raw:
        return CaptureMode.NO_CONTENT
    key = raw.upper()
    if key in CaptureMode.__members__:
        return CaptureMode[key]
    if key in _ALIASES:
        return _ALIASES[key]
    with _warned_lock:
        first = raw not in _warned
        _warned.add(raw)
    if first:
        log_safely(_logger, logging.WARNING,
                   "%s=%r is not a valid content capture mode; valid: %s (or true, false); capturing no content",
                   ENV_CAPTURE_CONTENT, raw, ", ".join(CaptureMode.__members__))
    return CaptureMode.NO_CONTENT


# -- messages ---------------------------------------------------------------------------------


_FINISH_REASONS = {"tool_calls": "tool_call", "function_call": "tool_call"}


def finish_reason(reason: Any) -> str:
    """The conventions' finish reason for a provider's (OpenAI's ``tool_calls`` is ``tool_call``)."""
    text = str(reason) if reason else "stop"
    return _FINISH_REASONS.get(text, text)


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _arguments(raw: Any, limit: int) -> Any:
    if isinstance(raw, str):
        if limit and len(raw) > limit:  # cut, it would not parse: kept as (bounded) text
            return bounded(raw, limit)
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _text(content: Any, limit: int) -> str | None:
    """Chat content as text (at most ``limit`` characters and the cut's mark): a string, or the text pieces of a list
    of content parts."""
    if content is None:
        return None
    if isinstance(content, str):
        return bounded(content, limit)
    if isinstance(content, Iterable) and not isinstance(content, (Mapping, bytes)):
        pieces = [safe_str(_get(p, "text")) for p in content if _get(p, "text") is not None]
        return bounded("".join(pieces), limit) if pieces else None
    return bounded(safe_str(content), limit)


def _tool_call_parts(tool_calls: Any, limit: int) -> list[dict[str, Any]]:
    parts = []
    for call in tool_calls or ():
        function = _get(call, "function")
        part: dict[str, Any] = {"type": "tool_call", "name": str(_get(function, "name") or "")}
        call_id = _get(call, "id")
        if call_id is not None:  # optional in the conventions; absent rather than null
            part["id"] = str(call_id)
        arguments = _arguments(_get(function, "arguments"), limit)
        if arguments is not None:
            part["arguments"] = arguments
        parts.append(part)
    return parts


def chat_message(message: Any, default_role: str = "user", limit: int = 0) -> dict[str, Any]:
    """One OpenAI-style chat message (dict or object) in the conventions' shape: role and parts (each text at most
    ``limit`` characters, 0: unbounded; see :func:`bounded`)."""
    role = str(_get(message, "role") or default_role)
    parts: list[dict[str, Any]] = []
    if role == "tool":
        part: dict[str, Any] = {"type": "tool_call_response", "response": _text(_get(message, "content"), limit) or ""}
        call_id = _get(message, "tool_call_id")
        if call_id is not None:
            part["id"] = str(call_id)
        parts.append(part)
    else:
        text = _text(_get(message, "content"), limit)
        if text:
            parts.append({"type": "text", "content": text})
        parts.extend(_tool_call_parts(_get(message, "tool_calls"), limit))
    return {"role": role, "parts": parts}


def input_messages(messages: Any, limit: int = 0) -> list[dict[str, Any]]:
    """The request's chat history in the conventions' shape (``gen_ai.input.messages``), texts bounded by ``limit``."""
    return [chat_message(m, "user", limit) for m in messages or ()]


def output_messages(response: Any, limit: int = 0) -> list[dict[str, Any]]:
    """Each choice of a chat completion as an output message with its ``finish_reason``, texts bounded by ``limit``."""
    out = []
    for choice in _get(response, "choices") or ():
        message = chat_message(_get(choice, "message") or {}, "assistant", limit)
        message["finish_reason"] = finish_reason(_get(choice, "finish_reason"))
        out.append(message)
    return out


def text_message(role: str, text: Any, reason: str | None = None, limit: int = 0) -> dict[str, Any]:
    """A message of one text part (at most ``limit`` characters); with ``reason``, an output message."""
    message: dict[str, Any] = {"role": role, "parts": [{"type": "text", "content": bounded(safe_str(text), limit)}]}
    if reason is not None:
        message["finish_reason"] = reason
    return message


def bounded(text: str, limit: int) -> str:
    """``text`` cut to its first ``limit`` characters followed by the mark ``…[+N chars]`` (N: how many were cut);
    ``text`` itself when it fits or ``limit`` is 0."""
    if limit and len(text) > limit:
        return f"{text[:limit]}…[+{len(text) - limit} chars]"
    return text


def safe_str(value: Any) -> str:
    """``str(value)``, or ``<TypeName>`` when its ``__str__`` raises; never raises an ``Exception``."""
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - an object whose __str__ raises is written as its type
        return f"<{type(value).__name__}>"


def to_json(value: Any, limit: int = 0) -> str:
    """Compact JSON for a span attribute, at most ``limit`` characters (:func:`bounded`; 0: unbounded); never raises.

    Unknown objects are written as their ``str`` (``<TypeName>`` when that raises); a value JSON cannot write (a
    cycle, keys of other types) as its ``repr`` in a JSON string (``<TypeName>`` when that raises).
    """
    try:
        text = json.dumps(value, default=safe_str, ensure_ascii=False, separators=(",", ":"))
    except Exception:  # noqa: BLE001 - a circular structure, keys json cannot write, a nesting too deep
        try:
            shown = repr(value)
        except Exception:  # noqa: BLE001 - a __repr__ that raises: the type names it
            shown = f"<{type(value).__name__}>"
        text = json.dumps(shown, ensure_ascii=False)
    return bounded(text, limit)


# -- errors -------------------------------------------------------------------------------------


_FACT = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
"""What a provider's error code or type must look like to be recorded: an identifier, never free text."""


def _attribute(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - a property that raises: no fact
        return None


def error_summary(error: BaseException) -> str:
    """The class of ``error`` and the content-free facts it carries, never its message: an HTTP status
    (``status_code``, or that of its ``response``), a provider's error ``code`` and ``type`` when they are
    identifiers; e.g. ``BadRequestError (HTTP 400, code context_length_exceeded, type invalid_request_error)``."""
    facts = []
    status = _attribute(error, "status_code")
    if status is None:
        status = _attribute(_attribute(error, "response"), "status_code")
    if type(status) is int:
        facts.append(f"HTTP {status}")
    for name in ("code", "type"):
        value = _attribute(error, name)
        if isinstance(value, str) and _FACT.fullmatch(value):
            facts.append(f"{name} {value}")
    name = type(error).__name__
    return f"{name} ({', '.join(facts)})" if facts else name


# -- events -------------------------------------------------------------------------------------


INFERENCE_DETAILS_EVENT = "gen_ai.client.inference.operation.details"
"""The conventions' event carrying one inference's request, response and (structured) messages."""


def event_logger(logger_provider: Any = None, version: str = "") -> Any:
    """A Logs API ``Logger`` of this instrumentation on ``logger_provider`` (the global one when None), with
    :data:`SCHEMA_URL`."""
    from opentelemetry import _logs

    return _logs.get_logger(__name__.rsplit(".", 1)[0], version, logger_provider, schema_url=SCHEMA_URL)


def emit_details(logger: Any, attributes: Mapping[str, Any], context: Any = None) -> None:
    """Emit :data:`INFERENCE_DETAILS_EVENT` with ``attributes`` (messages as structured values) in ``context``."""
    from opentelemetry._logs import LogRecord

    logger.emit(LogRecord(event_name=INFERENCE_DETAILS_EVENT, attributes=dict(attributes), context=context))


# -- provider and server ----------------------------------------------------------------------


PROVIDER_NAMES = {
    "anthropic": "anthropic",
    "openai-api": "openai",
    "openai-codex": "openai",
    "azure-foundry": "azure.ai.inference",
    "bedrock": "aws.bedrock",
    "gemini": "gcp.gemini",
    "vertex": "gcp.vertex_ai",
    "xai": "x_ai",
    "xai-oauth": "x_ai",
    "deepseek": "deepseek",
}
"""Hermes 0.19 provider ids (``hermes_cli.auth.PROVIDER_REGISTRY`` and its provider plugins) that are a
provider the conventions list; any other label (``openrouter``, ``nous``, ``custom``, ...) is used as is.
Hermes's bare ``openai`` is an alias of ``openrouter`` (an aggregator), so it is not mapped."""

HERMES_PROVIDER = "hermes.provider"
"""Hermes's own provider label (``openrouter``, ``nous``, ``custom``, ...), always recorded."""

HERMES_INTERRUPTED = "hermes.interrupted"
"""Set (True) on an ``invoke_agent`` span whose turn Hermes reports as interrupted (a cancel, ``/stop``, a new
message): not an error, so the status stays unset."""


def provider_name(label: Any) -> str | None:
    """``gen_ai.provider.name`` for a Hermes provider label: the well-known value, else the label."""
    if not label:
        return None
    text = str(label)
    return PROVIDER_NAMES.get(text.lower(), text)


def server_of(base_url: Any) -> tuple[str | None, int | None]:
    """(``server.address``, ``server.port``) of a base URL; the port defaults by scheme; never raises."""
    if not base_url:
        return None, None
    try:
        parts = urlsplit(str(base_url))
        host = parts.hostname
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except (TypeError, ValueError):
        return None, None
    return (host, port) if host else (None, None)


_DEFAULT_PORTS = {"https": 443, "http": 80}


# -- metrics ----------------------------------------------------------------------------------


DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
"""Advisory bucket boundaries, in seconds, of ``gen_ai.client.operation.duration``."""
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
"""Advisory bucket boundaries of ``gen_ai.client.token.usage``."""
FIRST_CHUNK_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
"""Advisory bucket boundaries, in seconds, of ``gen_ai.client.operation.time_to_first_chunk`` (those of the
conventions' other first-token/first-chunk latencies, e.g. ``gen_ai.server.time_to_first_token``)."""

OPERATION_DURATION: str = getattr(gen_ai_metrics, "GEN_AI_CLIENT_OPERATION_DURATION",
                                  "gen_ai.client.operation.duration")
TOKEN_USAGE: str = getattr(gen_ai_metrics, "GEN_AI_CLIENT_TOKEN_USAGE", "gen_ai.client.token.usage")
TIME_TO_FIRST_CHUNK: str = getattr(
    gen_ai_metrics, "GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK", "gen_ai.client.operation.time_to_first_chunk"
)


class Instruments(NamedTuple):
    """The histograms this instrumentation records."""

    duration: Histogram
    tokens: Histogram
    time_to_first_chunk: Histogram


def _histogram(meter: Meter, name: str, unit: str, description: str, buckets: tuple[float, ...]) -> Histogram:
    """A histogram with the advisory ``buckets`` (without them on an API too old to take the advice)."""
    try:
        return meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=list(buckets)
        )
    except TypeError:  # an opentelemetry-api older than the advisory parameter
        return meter.create_histogram(name, unit=unit, description=description)


def create_instruments(meter: Meter) -> Instruments:
    """The conventions' client histograms, with their advisory bucket boundaries."""
    return Instruments(
        _histogram(meter, OPERATION_DURATION, "s", "GenAI operation duration", DURATION_BUCKETS),
        _histogram(meter, TOKEN_USAGE, "{token}", "Number of input and output tokens used", TOKEN_BUCKETS),
        _histogram(
            meter, TIME_TO_FIRST_CHUNK, "s", "Time to receive the first chunk of a streaming response",
            FIRST_CHUNK_BUCKETS,
        ),
    )
