"""``instance``: the invocation's scope as an attribute of the instrumented object (the legacy behaviour)."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Hashable, TypeVar

from ._store import NO_SCOPE, Concurrency, S, Scope, StateStore, first_open

F = TypeVar("F", bound=Callable[..., Any])
_logger = logging.getLogger("statebackends")
_ids = itertools.count()


class InstanceStore(StateStore[S]):
    """Keeps the invocation's scope on the owner, in one attribute per store.

    Isolates nothing that overlaps: two concurrent calls on one owner
    (threads, asyncio tasks, greenlets, turns sharing an id) share the single
    slot, so the later ``begin`` hides the earlier call's state and spans,
    tokens and response ids leak between calls. It is right only for strictly
    sequential use of each owner, where it is visible from any thread that
    holds the owner. An ended call's state is never handed out, and ends in
    any order leave nothing on the owner. Kept as the baseline that the other
    backends are measured against.
    """

    name = "instance"
    isolates = frozenset({Concurrency.COPIED_CONTEXT, Concurrency.RAW_THREAD, Concurrency.NESTED})

    def __init__(self, factory: Callable[[], S]) -> None:
        super().__init__(factory)
        self.attribute = f"_statebackends_state_{next(_ids)}"

    def _enter(self, scope: Scope[S]) -> Any:
        with self._lock:
            scope.previous = first_open(getattr(scope.owner, self.attribute, NO_SCOPE))
            setattr(scope.owner, self.attribute, scope)
        return None

    def _exit(self, scope: Scope[S]) -> None:
        owner = scope.owner
        with self._lock:
            if getattr(owner, self.attribute, None) is not scope:
                _logger.debug("%s: invocation %r ended out of order; cleared later", self.name, scope.invocation_id)
                return
            uncovered = first_open(scope.previous)
            if uncovered is NO_SCOPE:
                delattr(owner, self.attribute)
            else:
                setattr(owner, self.attribute, uncovered)

    def current(self, owner: Any, invocation_id: Hashable | None = None) -> S | None:
        scope = getattr(owner, self.attribute, NO_SCOPE)
        if not scope.ended:
            return scope.state
        return first_open(scope).state

    def propagate(self, fn: F) -> F:
        # The state lives on the owner: any thread holding the owner sees it.
        return fn
