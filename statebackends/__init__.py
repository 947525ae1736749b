"""Where an OpenTelemetry instrumentation keeps the state of one call.

``StateStore`` is the interface; each backend (``instance``, ``contextvar``,
``threadlocal``, ``invocation_id``, ``otel_context``, and third-party ones
registered in the ``statebackends`` entry-point group) is one small module.
``statebackends.testing`` is the conformance kit a backend is checked with.
"""

from ._store import NO_SCOPE, Concurrency, Scope, StateStore, at_fork_in_child, first_open, log_safely
from .registry import (
    DEFAULT_BACKEND,
    DEPRECATED_ENV_STATE_BACKEND,
    ENTRY_POINT_GROUP,
    ENV_STATE_BACKEND,
    available,
    get_store,
    invalidate_caches,
    store_from_config,
)
from .version import __version__

__all__ = [
    "DEFAULT_BACKEND",
    "DEPRECATED_ENV_STATE_BACKEND",
    "ENTRY_POINT_GROUP",
    "ENV_STATE_BACKEND",
    "NO_SCOPE",
    "Concurrency",
    "Scope",
    "StateStore",
    "__version__",
    "at_fork_in_child",
    "available",
    "first_open",
    "get_store",
    "invalidate_caches",
    "log_safely",
    "store_from_config",
]
