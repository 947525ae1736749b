"""How the instrumentation is configured: backend choice and content capture, from kwargs and environment."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Optional

import statebackends
from statebackends import StateStore, get_store, store_from_config

from . import genai
from .genai import CaptureMode

_logger = logging.getLogger(__name__)

ENV_HERMES_STATE_BACKEND = "OTEL_INSTRUMENTATION_HERMES_AGENT_STATE_BACKEND"
"""Names the state backend of this instrumentation only; wins over the library-wide variable."""

ENV_LIBRARY_STATE_BACKEND: str = statebackends.ENV_STATE_BACKEND
"""The library-wide variable (``STATEBACKENDS_BACKEND``; ``OTEL_PYTHON_STATE_BACKEND`` before statebackends renamed it)."""

_DEPRECATED_LIBRARY_STATE_BACKEND = "OTEL_PYTHON_STATE_BACKEND"
"""The library's old variable name, still honoured by ``store_from_config`` as an alias."""

ENV_CAPTURE_CONTENT = genai.ENV_CAPTURE_CONTENT
"""``NO_CONTENT`` (default), ``SPAN_ONLY``, ``EVENT_ONLY``, ``SPAN_AND_EVENT`` (any case), ``true`` (``SPAN_ONLY``) or
``false`` (``NO_CONTENT``)."""

STATE_BACKEND_ENV_VARS = (ENV_HERMES_STATE_BACKEND, ENV_LIBRARY_STATE_BACKEND)

DEFAULT_HERMES_BACKEND = "invocation_id"
"""Right in every scenario of the correctness matrix: Hermes hands its task id to every tool, so the
state is found even in a tool pool that copies no context; elsewhere it behaves like ``contextvar``."""


def _valid_names() -> str:
    try:
        return ", ".join(sorted(statebackends.available()))
    except Exception:  # noqa: BLE001 - only used in an error message
        return "(could not be listed)"


def _env_source(environ: Mapping[str, str]) -> Optional[tuple[str, str]]:
    """The first set backend variable and its value, in the order the library reads them."""
    names = dict.fromkeys((*STATE_BACKEND_ENV_VARS, _DEPRECATED_LIBRARY_STATE_BACKEND))
    for var in names:
        raw = environ.get(var, "").strip()
        if raw:
            return var, raw
    return None


def resolve_store(value: str | StateStore[Any] | None, factory: Callable[[], Any]) -> StateStore[Any]:
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
                f"state backend {value!r} could not be built ({type(exc).__name__}: {exc}); valid names: {_valid_names()}"
            ) from exc
        _logger.debug("hermes-agent instrumentation: state backend %r (from instrument(state_backend=...))", store.name)
        return store
    source = _env_source(os.environ)
    try:
        store = store_from_config(None, factory, env_vars=STATE_BACKEND_ENV_VARS, default=DEFAULT_HERMES_BACKEND)
    except Exception as exc:  # noqa: BLE001 - never raise for the environment
        var, raw = source if source is not None else ("the environment", "")
        _logger.error(
            "hermes-agent instrumentation: %s=%r is not usable (%s: %s); valid names: %s; using %r",
            var, raw, type(exc).__name__, exc, _valid_names(), DEFAULT_HERMES_BACKEND,
        )
        store = get_store(DEFAULT_HERMES_BACKEND, factory)
    if source is None:
        origin = "the default"
    elif store.name == source[1].strip().lower():
        origin = source[0]
    else:
        origin = f"the default: {source[0]} was not usable"
    _logger.debug("hermes-agent instrumentation: state backend %r (from %s)", store.name, origin)
    return store


def capture_mode() -> CaptureMode:
    """The content capture mode :data:`ENV_CAPTURE_CONTENT` names (an invalid value warns once, captures nothing)."""
    return genai.capture_mode()


def capture_content() -> bool:
    """Whether :data:`ENV_CAPTURE_CONTENT` asks for any message content to be recorded (spans or events)."""
    return capture_mode() is not CaptureMode.NO_CONTENT
