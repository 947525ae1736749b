"""``threadlocal``: the invocation's scope in a ``threading.local``."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any, ParamSpec, TypeVar

from . import NO_SCOPE, Concurrency, Scope, StateStore, first_open, log_safely

_logger = logging.getLogger(__name__)

S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")


class ThreadLocalStore(StateStore[S, None]):
    """Keeps the invocation's scope in a ``threading.local`` private to this store.

    Isolates concurrent threads (ids are ignored, so invocations sharing one
    id in two threads stay apart), and nothing finer: asyncio tasks
    interleaved on one loop share their thread's slot and see each other's
    state, and work handed to a pool thread (even through a context copy)
    finds no state there unless the hop is wrapped with :meth:`propagate`,
    which re-installs the captured scope in the worker for the duration of
    the call. Under gevent monkey-patching the slot is greenlet-local, so a
    greenlet spawned during the call finds nothing. Late work is not isolated
    either: a context copied during a call and run after it ended, on a thread
    where another call is open, gets that call's state (the slot is the
    thread's, not the context's; never an ended call's). An ``end`` from another
    thread, or before an inner invocation's, only marks the scope ended
    (``current()`` skips it); the slot is cleared by the next ``end`` there.
    """

    name = "threadlocal"
    isolates = frozenset({Concurrency.THREADS, Concurrency.PROPAGATE, Concurrency.NESTED, Concurrency.SHARED_ID})

    def __init__(self, factory: Callable[[], S]) -> None:
        super().__init__(factory)
        self._local = threading.local()

    def _enter(self, scope: Scope[S, None]) -> None:
        scope.previous = first_open(getattr(self._local, "scope", NO_SCOPE))
        self._local.scope = scope
        return None

    def _exit(self, scope: Scope[S, None]) -> None:
        local = self._local
        if getattr(local, "scope", None) is not scope:
            log_safely(_logger, logging.DEBUG, "%s: invocation %r ended out of order or in another thread; cleared "
                       "later", self.name, scope.invocation_id)
            return
        uncovered = first_open(scope.previous)
        if uncovered is NO_SCOPE:
            del local.scope
        else:
            local.scope = uncovered

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        scope: Scope[S, None] = getattr(self._local, "scope", NO_SCOPE)
        if not scope.ended:
            return scope.state
        return first_open(scope).state

    def propagate(self, fn: Callable[P, R]) -> Callable[P, R]:
        captured = getattr(self._local, "scope", NO_SCOPE)
        local = self._local

        @functools.wraps(fn)
        def run_with_captured_scope(*args: P.args, **kwargs: P.kwargs) -> R:
            previous = getattr(local, "scope", NO_SCOPE)
            local.scope = captured
            try:
                return fn(*args, **kwargs)
            finally:
                if previous is NO_SCOPE:
                    local.__dict__.pop("scope", None)
                else:
                    local.scope = previous

        return run_with_captured_scope
