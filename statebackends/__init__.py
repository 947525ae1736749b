"""Where an OpenTelemetry instrumentation keeps the state of one call.

``StateStore`` is the interface; each backend (``instance``, ``contextvar``,
``threadlocal``, ``invocation_id``, ``otel_context``, and third-party ones
registered in the ``statebackends`` entry-point group) is one small module.
"""

from ._store import Concurrency, Scope, StateStore
from .registry import (
    DEFAULT_BACKEND,
    ENTRY_POINT_GROUP,
    ENV_STATE_BACKEND,
    available,
    get_store,
    store_from_config,
)
from .table import isolation_table

__all__ = [
    "Concurrency",
    "DEFAULT_BACKEND",
    "ENTRY_POINT_GROUP",
    "ENV_STATE_BACKEND",
    "Scope",
    "StateStore",
    "available",
    "get_store",
    "isolation_table",
    "store_from_config",
]
__version__ = "0.1.0"
