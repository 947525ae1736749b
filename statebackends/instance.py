"""``instance``: the state as an attribute of the instrumented object (the legacy behaviour)."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Hashable, TypeVar

from ._store import Concurrency, S, Scope, StateStore

F = TypeVar("F", bound=Callable[..., Any])
_ids = itertools.count()
_MISSING = object()


class InstanceStore(StateStore[S]):
    """Keeps the state on the owner, in one attribute per store.

    Isolates nothing that overlaps: two concurrent calls on one owner (threads
    or asyncio tasks) share the single slot, so the later ``begin`` overwrites
    the earlier call's state, an ``end`` restores a state that belongs to
    another call, and spans, tokens and response ids leak between calls. It is
    right only for strictly sequential use of each owner, where it is visible
    from any thread that holds the owner. Kept as the baseline that the other
    backends are measured against.
    """

    name = "instance"
    isolates = frozenset({Concurrency.COPIED_CONTEXT, Concurrency.RAW_THREAD, Concurrency.NESTED})

    def __init__(self, factory: Callable[[], S]) -> None:
        super().__init__(factory)
        self.attribute = f"_statebackends_state_{next(_ids)}"

    def _enter(self, scope: Scope[S]) -> Any:
        previous = getattr(scope.owner, self.attribute, _MISSING)
        setattr(scope.owner, self.attribute, scope.state)
        return previous

    def _exit(self, scope: Scope[S]) -> None:
        if scope.token is _MISSING:
            try:
                delattr(scope.owner, self.attribute)
            except AttributeError:
                pass
        else:
            setattr(scope.owner, self.attribute, scope.token)

    def current(self, owner: Any, invocation_id: Hashable | None = None) -> S | None:
        return getattr(owner, self.attribute, None)

    def propagate(self, fn: F) -> F:
        # The state lives on the owner: any thread holding the owner sees it.
        return fn
