"""Each tool's description from Hermes's tool registry, for ``gen_ai.tool.description``: looked up once per tool."""

from __future__ import annotations

import logging
import sys
from typing import Any

from statebackends import log_safely

__all__ = ["ToolDescriptions"]

_logger = logging.getLogger(__name__)

_REGISTRY_MODULE = "tools.registry"
"""Hermes's tool registry module; its ``registry`` (a ``ToolRegistry``) holds every tool Hermes can call (built-in,
plugin and MCP tools): name, toolset, JSON schema (the description the model is given) and handler."""


class ToolDescriptions:
    """``descriptions(name)``: the description Hermes's registry holds for the tool ``name``, or None; never raises.

    The description is the one in the tool's JSON schema, the text the model is given (the registry entry's own
    ``description`` when the schema has none); runtime overrides Hermes merges in when it builds the model's tool
    list (``delegate_task``'s current limits) are not. Each name is looked up once: the answer (None included) is
    cached, and the cache starts again when the registry changes (its generation counter, bumped on every
    registration, including an MCP server's refresh) or holds ``limit`` names. Hermes is never imported: until
    Hermes has imported its registry (a driver without Hermes) the answer is None.
    """

    __slots__ = ("_limit", "_registry", "_state")

    def __init__(self, limit: int = 256) -> None:
        self._registry: Any = None
        self._state: tuple[Any, dict[str, str | None]] = (None, {})
        self._limit = limit

    def __call__(self, name: str) -> str | None:
        try:
            registry = self._registry
            if registry is None:
                module = sys.modules.get(_REGISTRY_MODULE)
                registry = self._registry = getattr(module, "registry", None)
                if registry is None:
                    return None
            generation = getattr(registry, "_generation", None)
            state = self._state
            if state[0] != generation:  # the registry changed: forget every answer (one swap, for the threads too)
                state = self._state = (generation, {})
            cache = state[1]
            try:
                return cache[name]
            except KeyError:
                pass
            description = _look_up(registry, name)
            if len(cache) >= self._limit:
                cache.clear()
            cache[name] = description
            return description
        except Exception:  # noqa: BLE001 - a registry that raises: the tool is recorded without its description
            log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: no description for tool %r", name,
                       exc_info=True)
            return None


def _look_up(registry: Any, name: str) -> str | None:
    """The registry's description of ``name``: its schema's, else its entry's; None when it has none."""
    entry = registry.get_entry(name)
    if entry is None:
        return None
    schema = getattr(entry, "schema", None)
    text = schema.get("description") if isinstance(schema, dict) else None
    if not (isinstance(text, str) and text):
        text = getattr(entry, "description", None)
    return text if isinstance(text, str) and text else None
