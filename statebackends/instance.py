"""``instance``: the invocation's scope as an attribute of the instrumented object (the legacy behaviour)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Hashable
from typing import Any, ParamSpec, TypeVar

from . import NO_SCOPE, Concurrency, Scope, StateStore, first_open, log_safely

_logger = logging.getLogger(__name__)

S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")
_ids = itertools.count()
_own_dict = object.__getattribute__


def _slots_of(owner: Any) -> dict[str, Any]:
    """The owner's own instance ``__dict__``, read without running the owner's code; TypeError if it has none."""
    try:
        slots = _own_dict(owner, "__dict__")
    except Exception:  # noqa: BLE001 - no instance __dict__ (slots, built-ins)
        slots = None
    if type(slots) is not dict:  # a class (mappingproxy), a slotted or built-in object
        kind = "a class" if isinstance(owner, type) else f"a {type(owner).__qualname__} object"
        raise TypeError(
            f"the instance backend keeps the state in the owner's own instance __dict__, which this owner "
            f"({kind}) does not have; use an instance of a class without __slots__ "
            f"(not a class, a built-in or a slotted object), or another backend"
        )
    return slots


class InstanceStore(StateStore[S, None]):
    """Keeps the invocation's scope on the owner, in one attribute per store.

    Isolates nothing that overlaps: two concurrent calls on one owner
    (threads, asyncio tasks, greenlets, turns sharing an id) share the single
    slot, so the later ``begin`` hides the earlier call's state and spans,
    tokens and response ids leak between calls; late work of an ended call
    gets the state of the call open on its owner. It is right only for strictly
    sequential use of each owner, where it is visible from any thread that
    holds the owner. An ended call's state is never handed out, and ends in
    any order leave nothing on the owner. Kept as the baseline that the other
    backends are measured against.

    Owners: objects with a plain instance ``__dict__`` (instances of classes
    without ``__slots__``, modules, ``unittest.mock`` objects). The slot is
    read and written in that ``__dict__`` directly, never through the owner's
    ``__getattr__``/``__setattr__`` (so no owner code runs under the store's
    lock, and a class's slot never shows through its instances); a foreign
    value there (not a :class:`Scope`) never makes ``begin`` or ``current``
    loop or raise: it counts as no invocation. ``begin`` on any other owner
    (a class, a built-in such as ``object()``, a slotted object) raises
    ``TypeError`` before anything changes; ``current`` on one is None.
    """

    name = "instance"
    isolates = frozenset({Concurrency.COPIED_CONTEXT, Concurrency.RAW_THREAD, Concurrency.NESTED})

    def __init__(self, factory: Callable[[], S]) -> None:
        super().__init__(factory)
        self.attribute = f"_statebackends_state_{next(_ids)}"

    def _enter(self, scope: Scope[S, None]) -> None:
        slots = _slots_of(scope.owner)
        key = self.attribute
        with self._lock:
            top = slots.get(key, NO_SCOPE)
            scope.previous = first_open(top) if type(top) is Scope else NO_SCOPE
            slots[key] = scope
        return None

    def _exit(self, scope: Scope[S, None]) -> None:
        slots, key = _slots_of(scope.owner), self.attribute
        with self._lock:
            on_top = slots.get(key) is scope
            if on_top:
                uncovered = first_open(scope.previous)
                if uncovered is NO_SCOPE:
                    del slots[key]
                else:
                    slots[key] = uncovered
        if not on_top:
            log_safely(_logger, logging.DEBUG, "%s: invocation %r ended out of order; cleared later",
                        self.name, scope.invocation_id)

    def current(self, owner: Any, invocation_id: Hashable | None = None) -> S | None:
        try:
            scope: Scope[S, None] = owner.__dict__.get(self.attribute, NO_SCOPE)  # or a foreign value: see below
            if not scope.ended:
                return scope.state
        except Exception:  # noqa: BLE001 - no __dict__, or not a Scope there: no invocation
            return None
        return first_open(scope).state if type(scope) is Scope else None

    def propagate(self, fn: Callable[P, R]) -> Callable[P, R]:
        # The state lives on the owner: any thread holding the owner sees it.
        return fn
