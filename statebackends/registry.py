"""Resolve a backend from a name, an environment variable or a third-party entry point."""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Mapping, TypeVar

from ._store import StateStore

_logger = logging.getLogger("statebackends")

S = TypeVar("S")

ENTRY_POINT_GROUP = "statebackends"
"""Entry-point group where a third-party package registers a backend: ``name = module:StoreClass``."""

ENV_STATE_BACKEND = "OTEL_PYTHON_STATE_BACKEND"
"""Library-wide environment variable naming the backend for every instrumentation that uses statebackends."""

DEFAULT_BACKEND = "contextvar"


def _builtins() -> dict[str, Callable[..., StateStore[Any]]]:
    from .contextvar import ContextVarStore
    from .instance import InstanceStore
    from .invocation_id import InvocationIdStore
    from .otel_context import OtelContextStore
    from .threadlocal import ThreadLocalStore

    classes = (InstanceStore, ContextVarStore, ThreadLocalStore, InvocationIdStore, OtelContextStore)
    return {cls.name: cls for cls in classes}


def _third_party() -> tuple[dict[str, Callable[..., StateStore[Any]]], dict[str, str]]:
    """Load the entry points of the group: (loaded backends, broken name -> error text)."""
    loaded: dict[str, Callable[..., StateStore[Any]]] = {}
    broken: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if not callable(obj):
                raise TypeError(f"{ep.value} is {obj!r}, not a StateStore class or factory")
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not hide the others
            broken[ep.name] = f"{type(exc).__name__}: {exc}"
            _logger.warning(
                "statebackends: entry point %r (%s) in group %r failed to load: %s",
                ep.name, ep.value, ENTRY_POINT_GROUP, broken[ep.name],
            )
            continue
        loaded[ep.name] = obj
    return loaded, broken


def _backends() -> tuple[dict[str, Callable[..., StateStore[Any]]], dict[str, str]]:
    third, broken = _third_party()
    backends = dict(third)
    backends.update(_builtins())  # a plugin cannot shadow a built-in name
    for name in third:
        if name in _builtins():
            _logger.warning("statebackends: entry point %r ignored: a built-in backend has that name", name)
    return backends, broken


def available() -> dict[str, Callable[..., StateStore[Any]]]:
    """Every backend that resolves by name: the built-ins and the loadable entry points."""
    return dict(sorted(_backends()[0].items()))


def get_store(name_or_store: str | StateStore[S], factory: Callable[[], S]) -> StateStore[S]:
    """A store for ``factory``'s state: the given store itself, or a new one of the named backend.

    Raises ``ValueError`` naming the bad value and every valid name.
    """
    if isinstance(name_or_store, StateStore):
        return name_or_store
    if not isinstance(name_or_store, str):
        raise ValueError(
            f"state backend must be a backend name or a StateStore, got {name_or_store!r}; "
            f"valid names: {', '.join(sorted(_backends()[0]))}"
        )
    name = name_or_store.strip().lower()
    backends, broken = _backends()
    if name in broken:
        raise ValueError(
            f"state backend {name_or_store!r} is registered in entry-point group "
            f"{ENTRY_POINT_GROUP!r} but failed to load ({broken[name]}); "
            f"valid names: {', '.join(sorted(backends))}"
        )
    try:
        cls = backends[name]
    except KeyError:
        raise ValueError(
            f"unknown state backend {name_or_store!r}; valid names: {', '.join(sorted(backends))}"
        ) from None
    store = cls(factory)
    if not isinstance(store, StateStore):
        raise ValueError(f"state backend {name!r} built {store!r}, which is not a StateStore")
    return store


def store_from_config(
    value: str | StateStore[S] | None,
    factory: Callable[[], S],
    *,
    env_vars: Iterable[str] = (ENV_STATE_BACKEND,),
    default: str = DEFAULT_BACKEND,
    environ: Mapping[str, str] | None = None,
) -> StateStore[S]:
    """The store an instrumentation should use: ``value``, else the first set variable, else ``default``.

    A bad ``value`` raises ``ValueError`` (the caller's code is wrong). A bad
    environment variable never raises: it logs one error naming the variable,
    its value and the valid names, and the default is used.
    """
    if value is not None:
        return get_store(value, factory)
    env = os.environ if environ is None else environ
    for var in env_vars:
        raw = env.get(var, "").strip()
        if not raw:
            continue
        try:
            store = get_store(raw, factory)
        except ValueError as exc:
            _logger.error("statebackends: %s=%r is not usable (%s); using %r", var, raw, exc, default)
            break
        _logger.debug("statebackends: backend %r chosen by %s", store.name or raw, var)
        return store
    return get_store(default, factory)
