"""How the instrumentation is configured: backend choice and content rules, from ``instrument()``'s keywords and the
environment, resolved once per ``instrument()`` into :class:`Settings`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import statebackends
from statebackends import StateStore, get_store, log_safely, store_from_config

from . import genai
from .genai import CaptureMode
from .lifecycle import DEFAULT_CONTENT_MAX_LENGTH

__all__ = [
    "DEFAULT_CONTENT_MAX_LENGTH",
    "DEFAULT_HERMES_BACKEND",
    "ENV_CAPTURE_CONTENT",
    "ENV_CAPTURE_ERROR_TEXT",
    "ENV_CONTENT_MAX_LENGTH",
    "ENV_HERMES_STATE_BACKEND",
    "ENV_LEGACY_REACT_ATTRIBUTES",
    "ENV_LIBRARY_STATE_BACKEND",
    "STATE_BACKEND_ENV_VARS",
    "Settings",
    "resolve",
    "resolve_store",
]

_logger = logging.getLogger(__name__)

ENV_HERMES_STATE_BACKEND = "OTEL_INSTRUMENTATION_HERMES_AGENT_STATE_BACKEND"
"""Names the state backend of this instrumentation only; wins over the library-wide variable."""

ENV_LIBRARY_STATE_BACKEND: str = statebackends.ENV_STATE_BACKEND
"""The library-wide variable (``STATEBACKENDS_BACKEND``; ``OTEL_PYTHON_STATE_BACKEND`` before statebackends renamed
it)."""

_DEPRECATED_LIBRARY_STATE_BACKEND = statebackends.DEPRECATED_ENV_STATE_BACKEND
"""The library's old variable name, still honoured by ``store_from_config`` as an alias."""

ENV_CAPTURE_CONTENT = genai.ENV_CAPTURE_CONTENT
"""``NO_CONTENT`` (default), ``SPAN_ONLY``, ``EVENT_ONLY``, ``SPAN_AND_EVENT`` (any case), ``true`` (``SPAN_ONLY``) or
``false`` (``NO_CONTENT``)."""

ENV_CAPTURE_ERROR_TEXT = "OTEL_INSTRUMENTATION_HERMES_AGENT_CAPTURE_ERROR_TEXT"
"""``true``: errors keep their text (exception messages and stack traces, Hermes's and tools' error text) with content
capture off; ``false`` (default) records only their class and content-free facts. Content capture on records the
text."""

ENV_CONTENT_MAX_LENGTH = "OTEL_INSTRUMENTATION_HERMES_AGENT_CONTENT_MAX_LENGTH"
"""Characters kept of each captured text (a message part, tool arguments, a tool result); ``0``: unbounded; default
:data:`DEFAULT_CONTENT_MAX_LENGTH`."""

ENV_LEGACY_REACT_ATTRIBUTES = "OTEL_INSTRUMENTATION_HERMES_AGENT_LEGACY_REACT_ATTRIBUTES"
"""Deprecated, for one release: ``true`` also puts the step attributes under their old names, ``gen_ai.react.round``
and ``gen_ai.react.finish_reason``, beside ``hermes.react.round`` and ``hermes.react.finish_reason``; ``false``
(default): the new names only."""

STATE_BACKEND_ENV_VARS = (ENV_HERMES_STATE_BACKEND, ENV_LIBRARY_STATE_BACKEND)

DEFAULT_HERMES_BACKEND = "invocation_id"
"""Right in every scenario of the correctness matrix: Hermes hands its task id to every tool, so the
state is found even in a tool pool that copies no context; elsewhere it behaves like ``contextvar``."""

_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off", ""})


@dataclass(frozen=True)
class Settings:
    """Everything ``instrument()`` is configured with, read once (keywords, then the environment)."""

    store: StateStore[Any]
    capture_mode: CaptureMode
    error_text: bool
    content_max_length: int
    legacy_react_attributes: bool = False


def resolve(
    kwargs: Mapping[str, Any], factory: Callable[[], Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """The :class:`Settings` of one ``instrument(**kwargs)``: the environment is read once, here.

    A bad ``state_backend`` keyword raises ``ValueError``; a bad environment variable never raises (one log record
    names it, its value and the valid ones; its default is used).
    """
    env = dict(os.environ if environ is None else environ)
    return Settings(
        store=resolve_store(kwargs.get("state_backend"), factory, env),
        capture_mode=genai.capture_mode(env),
        error_text=_flag(env, ENV_CAPTURE_ERROR_TEXT),
        content_max_length=_length(env, ENV_CONTENT_MAX_LENGTH, DEFAULT_CONTENT_MAX_LENGTH),
        legacy_react_attributes=_flag(env, ENV_LEGACY_REACT_ATTRIBUTES),
    )


def _flag(environ: Mapping[str, str], var: str) -> bool:
    raw = environ.get(var, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value not in _FALSE:
        log_safely(_logger, logging.ERROR, "hermes-agent instrumentation: %s=%r is not a boolean; valid: true, false "
                   "(or 1, 0, yes, no, on, off); using false", var, raw)
    return False


def _length(environ: Mapping[str, str], var: str, default: int) -> int:
    raw = environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        log_safely(_logger, logging.ERROR, "hermes-agent instrumentation: %s=%r is not a number of characters; valid: "
                   "an integer >= 0 (0: unbounded); using %d", var, raw, default)
        return default
    return value


def _valid_names() -> str:
    try:
        return ", ".join(sorted(statebackends.available()))
    except Exception:  # noqa: BLE001 - only used in an error message
        return "(could not be listed)"


def _env_source(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The first set backend variable and its value, in the order the library reads them."""
    for var in dict.fromkeys((*STATE_BACKEND_ENV_VARS, _DEPRECATED_LIBRARY_STATE_BACKEND)):
        raw = environ.get(var, "").strip()
        if raw:
            return var, raw
    return None


def resolve_store(
    value: str | StateStore[Any] | None, factory: Callable[[], Any], environ: Mapping[str, str] | None = None
) -> StateStore[Any]:
    """The store to use: the kwarg, else the environment variables in order, else :data:`DEFAULT_HERMES_BACKEND`.

    A bad kwarg raises ``ValueError`` naming the value, the cause and the valid names. A bad
    environment variable never raises: it logs one error (naming the variable, its value and the
    valid names) and the default backend is used.
    """
    if value is not None:
        try:
            store = get_store(value, factory)
        except ValueError:
            raise
        except Exception as exc:  # a plugin whose constructor raised, before statebackends wrapped it
            raise ValueError(
                f"state backend {value!r} could not be built ({type(exc).__name__}: {exc}); "
                f"valid names: {_valid_names()}"
            ) from exc
        log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: state backend %r (from "
                   "instrument(state_backend=...))", store.name)
        return store
    env = dict(os.environ if environ is None else environ)
    source = _env_source(env)
    try:
        store = store_from_config(None, factory, env_vars=STATE_BACKEND_ENV_VARS, default=DEFAULT_HERMES_BACKEND,
                                  environ=env)
    except Exception as exc:  # noqa: BLE001 - never raise for the environment
        var, raw = source if source is not None else ("the environment", "")
        log_safely(_logger, logging.ERROR, "hermes-agent instrumentation: %s=%r is not usable (%s: %s); valid names: "
                   "%s; using %r", var, raw, type(exc).__name__, exc, _valid_names(), DEFAULT_HERMES_BACKEND)
        store = get_store(DEFAULT_HERMES_BACKEND, factory)
    if source is None:
        origin = "the default"
    elif store.name == source[1].strip().lower():
        origin = source[0]
    else:
        origin = f"the default: {source[0]} was not usable"
    log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: state backend %r (from %s)", store.name, origin)
    return store
