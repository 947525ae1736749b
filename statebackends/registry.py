"""Resolve a backend from a name, an environment variable or a third-party entry point."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from ._store import StateStore, log_safely

_logger = logging.getLogger(__name__)

S = TypeVar("S")

ENTRY_POINT_GROUP = "statebackends"
"""Entry-point group where a third-party package registers a backend: ``name = module:StoreClass``."""

ENV_STATE_BACKEND = "STATEBACKENDS_BACKEND"
"""Library-wide environment variable naming the backend for every instrumentation that uses statebackends."""

DEPRECATED_ENV_STATE_BACKEND = "OTEL_PYTHON_STATE_BACKEND"
"""The former name of :data:`ENV_STATE_BACKEND`, still read after it (with a warning)."""

DEFAULT_BACKEND = "contextvar"


Backends = dict[str, Callable[..., StateStore[Any]]]
_builtin_backends: Backends | None = None
_registered: tuple[Backends, dict[str, str]] | None = None
"""What the entry points gave (see :func:`_backends`), loaded once per process; None until needed."""


def _builtins() -> Backends:
    global _builtin_backends
    if _builtin_backends is None:
        from .contextvar import ContextVarStore
        from .instance import InstanceStore
        from .invocation_id import InvocationIdStore
        from .otel_context import OtelContextStore
        from .threadlocal import ThreadLocalStore

        classes = (InstanceStore, ContextVarStore, ThreadLocalStore, InvocationIdStore, OtelContextStore)
        _builtin_backends = {cls.name: cls for cls in classes}
    return _builtin_backends


def invalidate_caches() -> None:
    """Forget the entry points loaded so far: the next look-up that needs them reads the group again.

    Third-party backends are loaded once per process, the first time a name that is not a built-in
    is resolved (or :func:`available` is called); call this after installing or removing one in a
    running process.
    """
    global _registered
    _registered = None


def _norm(name: str) -> str:
    """How backend names compare: case-insensitively, surrounding blanks ignored."""
    return name.strip().lower()


def _third_party() -> tuple[dict[str, Callable[..., StateStore[Any]]], dict[str, str]]:
    """Load the entry points of the group: (loaded backends, broken name -> error text), by registered name."""
    loaded: dict[str, Callable[..., StateStore[Any]]] = {}
    broken: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if not callable(obj) or (isinstance(obj, type) and not issubclass(obj, StateStore)):
                raise TypeError(f"{ep.value} is {obj!r}, not a StateStore class or factory")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a broken plugin (even one calling sys.exit) hides nothing
            broken[ep.name] = f"{type(exc).__name__}: {exc}"
            log_safely(
                _logger, logging.WARNING, "statebackends: entry point %r (%s) in group %r failed to load: %s",
                ep.name, ep.value, ENTRY_POINT_GROUP, broken[ep.name],
            )
            continue
        loaded[ep.name] = obj
    return loaded, broken


def _backends() -> tuple[Backends, dict[str, str]]:
    """(backends, broken plugins), keyed by registered name; names that compare equal keep the first (built-ins first).

    Loaded once per process (until :func:`invalidate_caches`); callers never change what it returns.
    """
    global _registered
    registered = _registered
    if registered is None:  # two threads may both load: the same modules, one result kept
        registered = _registered = _load_backends()
    return registered


def _load_backends() -> tuple[Backends, dict[str, str]]:
    backends: Backends = dict(_builtins())
    taken = {_norm(name) for name in backends}
    third, broken = _third_party()
    for name, obj in list(third.items()) + [(name, None) for name in broken]:
        if _norm(name) in taken:
            log_safely(_logger, logging.WARNING, "statebackends: entry point %r ignored: a backend named %r is already "
                        "registered (names compare case-insensitively)", name, _norm(name))
            broken.pop(name, None)
            continue
        taken.add(_norm(name))
        if obj is not None:
            backends[name] = obj
    return backends, broken


def _find(mapping: Mapping[str, Any], name: str) -> str | None:
    """The registered spelling in ``mapping`` of ``name`` (compared case-insensitively), or None."""
    wanted = _norm(name)
    return next((key for key in mapping if _norm(key) == wanted), None)


def available() -> dict[str, Callable[..., StateStore[Any]]]:
    """Every backend that resolves by name (case-insensitively), under its registered spelling: the built-ins and
    the loadable entry points."""
    return dict(sorted(_backends()[0].items()))


def get_store(name_or_store: str | StateStore[S], factory: Callable[[], S]) -> StateStore[S]:
    """A store for ``factory``'s state: the given store itself, or a new one of the named backend.

    Names compare case-insensitively (``"AcmeStore"``, ``"acmestore"``).
    Raises ``TypeError`` if ``factory`` is not callable, and ``ValueError``
    naming the backend, the cause and every valid name if the backend is
    unknown, failed to load (even by raising ``SystemExit`` or another
    ``BaseException``; ``KeyboardInterrupt`` excepted), or its class or
    factory raised or built something that is not a ``StateStore``.
    """
    if isinstance(name_or_store, StateStore):
        return name_or_store
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    if not isinstance(name_or_store, str):
        raise ValueError(
            f"state backend must be a backend name or a StateStore, got {name_or_store!r}; "
            f"valid names: {_valid()}"
        )
    builtins = _builtins()
    name = _find(builtins, name_or_store)  # a built-in name never loads a plugin (built-ins win a clash anyway)
    if name is not None:
        make = builtins[name]
    else:
        backends, broken = _backends()
        name = _find(broken, name_or_store)
        if name is not None:
            raise ValueError(
                f"state backend {name_or_store!r} is registered in entry-point group "
                f"{ENTRY_POINT_GROUP!r} but failed to load ({broken[name]}); valid names: {_valid()}"
            )
        name = _find(backends, name_or_store)
        if name is None:
            raise ValueError(f"unknown state backend {name_or_store!r}; valid names: {_valid()}")
        make = backends[name]
    try:
        store = make(factory)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a plugin's failure (even SystemExit) is reported, not propagated raw
        raise ValueError(
            f"state backend {name!r} could not be created ({type(exc).__name__}: {exc}); valid names: {_valid()}"
        ) from exc
    if not isinstance(store, StateStore):
        raise ValueError(f"state backend {name!r} built {store!r}, which is not a StateStore; valid names: {_valid()}")
    return store


def _valid() -> str:
    return ", ".join(sorted(_backends()[0]))


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
    environment variable never raises: whatever fails (unknown name, broken
    plugin, a backend that raises when built) logs one error naming the
    variable, its value and the cause, and the default is used. Where
    ``env_vars`` lists :data:`ENV_STATE_BACKEND`, its deprecated former name
    ``OTEL_PYTHON_STATE_BACKEND`` is read right after it, with one warning.
    """
    if value is not None:
        return get_store(value, factory)
    env = os.environ if environ is None else environ
    for var in _with_deprecated_alias(env_vars):
        raw = env.get(var, "").strip()
        if not raw:
            continue
        if var == DEPRECATED_ENV_STATE_BACKEND:
            log_safely(_logger, logging.WARNING, "statebackends: %s is deprecated; set %s=%r instead",
                       var, ENV_STATE_BACKEND, raw)
        try:
            store = get_store(raw, factory)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - configuration from the environment never crashes the host
            log_safely(_logger, logging.ERROR, "statebackends: %s=%r is not usable (%s); using %r",
                       var, raw, exc, default)
            break
        log_safely(_logger, logging.DEBUG, "statebackends: backend %r chosen by %s",
                   getattr(store, "name", "") or raw, var)
        return store
    return get_store(default, factory)


def _with_deprecated_alias(env_vars: Iterable[str]) -> list[str]:
    names = list(env_vars)
    if ENV_STATE_BACKEND in names and DEPRECATED_ENV_STATE_BACKEND not in names:
        names.insert(names.index(ENV_STATE_BACKEND) + 1, DEPRECATED_ENV_STATE_BACKEND)
    return names
