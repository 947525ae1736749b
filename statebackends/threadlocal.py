"""``threadlocal``: the state in a ``threading.local``."""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Hashable, TypeVar

from ._store import Concurrency, S, Scope, StateStore

F = TypeVar("F", bound=Callable[..., Any])
_MISSING = object()


class ThreadLocalStore(StateStore[S]):
    """Keeps the state in a ``threading.local`` private to this store.

    Isolates concurrent threads, and nothing finer: asyncio tasks interleaved
    on one loop share their thread's slot and see each other's state, and work
    handed to a pool thread (even through a context copy) finds no state there
    unless the hop is wrapped with :meth:`propagate`, which re-installs the
    captured state in the worker for the duration of the call.
    """

    name = "threadlocal"
    isolates = frozenset({Concurrency.THREADS, Concurrency.PROPAGATE, Concurrency.NESTED})

    def __init__(self, factory: Callable[[], S]) -> None:
        super().__init__(factory)
        self._local = threading.local()

    def _enter(self, scope: Scope[S]) -> Any:
        previous = getattr(self._local, "state", _MISSING)
        self._local.state = scope.state
        return (threading.get_ident(), previous)

    def _exit(self, scope: Scope[S]) -> None:
        thread, previous = scope.token
        if thread != threading.get_ident():
            raise RuntimeError("end() from another thread cannot reach the thread-local slot of begin()")
        if previous is _MISSING:
            del self._local.state
        else:
            self._local.state = previous

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        return getattr(self._local, "state", None)

    def propagate(self, fn: F) -> F:
        captured = self.current()
        local = self._local

        @functools.wraps(fn)
        def run_with_captured_state(*args: Any, **kwargs: Any) -> Any:
            previous = getattr(local, "state", _MISSING)
            local.state = captured
            try:
                return fn(*args, **kwargs)
            finally:
                if previous is _MISSING:
                    del local.state
                else:
                    local.state = previous

        return run_with_captured_state  # type: ignore[return-value]
