"""``threadident``: an example third-party backend, the invocation's scope in a dict keyed by thread id."""

from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, ParamSpec, TypeVar

from statebackends import NO_SCOPE, Concurrency, Scope, StateStore, first_open

S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")


class ThreadIdentStore(StateStore[S, int]):
    """Keeps each thread's innermost scope under ``threading.get_ident()``: isolates threads and nesting only.

    Its token (``StateStore[S, int]``) is the id of the thread that began the scope.
    """

    name = "threadident"
    isolates = frozenset({Concurrency.THREADS, Concurrency.NESTED, Concurrency.SHARED_ID})

    def __init__(self, factory: Callable[[], S]) -> None:
        super().__init__(factory)
        self._slots: dict[int, Scope[S, int]] = {}

    def _enter(self, scope: Scope[S, int]) -> int:
        thread = threading.get_ident()
        scope.previous = first_open(self._slots.get(thread, NO_SCOPE))
        self._slots[thread] = scope
        return thread

    def _exit(self, scope: Scope[S, int]) -> None:
        if self._slots.get(scope.token) is scope:  # else: ended out of order, skipped by current()
            uncovered = first_open(scope.previous)
            if uncovered is NO_SCOPE:
                del self._slots[scope.token]
            else:
                self._slots[scope.token] = uncovered

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        scope: Scope[S, int] = self._slots.get(threading.get_ident(), NO_SCOPE)
        return first_open(scope).state

    def propagate(self, fn: Callable[P, R]) -> Callable[P, R]:
        return fn  # a thread hop finds nothing: PROPAGATE is not declared
