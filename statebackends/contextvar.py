"""``contextvar``: the invocation's scope in a ``contextvars.ContextVar``, set and reset with tokens."""

from __future__ import annotations

import contextvars
import functools
import itertools
from typing import Any, Callable, Hashable, TypeVar

from ._store import NO_SCOPE, Concurrency, S, Scope, StateStore, first_open, unwind_var

F = TypeVar("F", bound=Callable[..., Any])
_ids = itertools.count()


class ContextVarStore(StateStore[S]):
    """Keeps the invocation's scope in a ``ContextVar`` private to this store.

    Isolates threads (each thread has its own context), asyncio tasks (each
    task runs in a copy of its creator's context) and work handed on through
    a context copy (``asyncio.to_thread``, ``copy_context().run``); ids are
    ignored, so invocations sharing one id stay apart. Loses the state where
    work hops to a thread that does not copy the context, unless the hop is
    wrapped with :meth:`propagate`, and in a gevent greenlet spawned during the
    call (it starts with an empty context). A copy made during the call and
    run after it ended sees the first still-open outer invocation, or None.
    ``end`` resets the variable with the token from ``begin`` (ends in any
    order: the last one unwinds the others), so nothing is left in the
    caller's context.
    """

    name = "contextvar"
    isolates = frozenset(
        {
            Concurrency.THREADS,
            Concurrency.ASYNC_TASKS,
            Concurrency.COPIED_CONTEXT,
            Concurrency.PROPAGATE,
            Concurrency.NESTED,
            Concurrency.SHARED_ID,
        }
    )

    def __init__(self, factory: Callable[[], S]) -> None:
        super().__init__(factory)
        self._var: contextvars.ContextVar[Scope[S]] = contextvars.ContextVar(
            f"statebackends_state_{next(_ids)}", default=NO_SCOPE
        )

    def _enter(self, scope: Scope[S]) -> Any:
        scope.previous = first_open(self._var.get())
        return self._var.set(scope)

    def _exit(self, scope: Scope[S]) -> None:
        unwind_var(self._var, scope, self.name)

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        scope = self._var.get()
        if not scope.ended:
            return scope.state
        return first_open(scope).state

    def propagate(self, fn: F) -> F:
        captured = contextvars.copy_context()

        @functools.wraps(fn)
        def run_in_captured_context(*args: Any, **kwargs: Any) -> Any:
            # A fresh copy per call: one Context cannot be entered twice at once.
            return captured.copy().run(fn, *args, **kwargs)

        return run_in_captured_context  # type: ignore[return-value]
