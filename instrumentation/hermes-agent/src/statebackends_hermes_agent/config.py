"""How the instrumentation is configured: backend choice and content capture, from kwargs and environment."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from statebackends import ENV_STATE_BACKEND, StateStore, store_from_config

_logger = logging.getLogger(__name__)

ENV_HERMES_STATE_BACKEND = "OTEL_INSTRUMENTATION_HERMES_AGENT_STATE_BACKEND"
"""Names the state backend of this instrumentation only; wins over ``OTEL_PYTHON_STATE_BACKEND``."""

ENV_CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
"""``true`` records message content and tool arguments/results; anything else records none."""

STATE_BACKEND_ENV_VARS = (ENV_HERMES_STATE_BACKEND, ENV_STATE_BACKEND)

DEFAULT_HERMES_BACKEND = "invocation_id"
"""Right in every scenario of the correctness matrix: Hermes hands its task id to every tool, so the
state is found even in a tool pool that copies no context; elsewhere it behaves like ``contextvar``."""


def resolve_store(value: str | StateStore[Any] | None, factory: Callable[[], Any]) -> StateStore[Any]:
    """The kwarg (a bad one raises ``ValueError``), else the env vars in order (a bad one logs), else the default."""
    store = store_from_config(value, factory, env_vars=STATE_BACKEND_ENV_VARS, default=DEFAULT_HERMES_BACKEND)
    source = "instrument(state_backend=...)" if value is not None else next(
        (var for var in STATE_BACKEND_ENV_VARS if os.environ.get(var, "").strip()), "default"
    )
    _logger.debug("hermes-agent instrumentation: state backend %r (from %s)", store.name, source)
    return store


def capture_content() -> bool:
    return os.environ.get(ENV_CAPTURE_CONTENT, "").strip().lower() == "true"
