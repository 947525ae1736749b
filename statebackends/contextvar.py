"""``contextvar``: the state in a ``contextvars.ContextVar``, set and reset with tokens."""

from __future__ import annotations

import contextvars
import functools
import itertools
from typing import Any, Callable, Hashable, TypeVar

from ._store import Concurrency, S, Scope, StateStore

F = TypeVar("F", bound=Callable[..., Any])
_ids = itertools.count()


class ContextVarStore(StateStore[S]):
    """Keeps the state in a ``ContextVar`` private to this store.

    Isolates threads (each thread has its own context), asyncio tasks (each
    task runs in a copy of its creator's context) and work handed on through
    a context copy (``asyncio.to_thread``, ``copy_context().run``). Loses the
    state where work hops to a thread that does not copy the context, unless
    the hop is wrapped with :meth:`propagate`. ``end`` resets the variable
    with the token from ``begin``, so nothing is left in the caller's context.
    """

    name = "contextvar"
    isolates = frozenset(
        {
            Concurrency.THREADS,
            Concurrency.ASYNC_TASKS,
            Concurrency.COPIED_CONTEXT,
            Concurrency.PROPAGATE,
            Concurrency.NESTED,
        }
    )

    def __init__(self, factory: Callable[[], S]) -> None:
        super().__init__(factory)
        self._var: contextvars.ContextVar[S | None] = contextvars.ContextVar(
            f"statebackends_state_{next(_ids)}", default=None
        )

    def _enter(self, scope: Scope[S]) -> Any:
        return self._var.set(scope.state)

    def _exit(self, scope: Scope[S]) -> None:
        self._var.reset(scope.token)  # ValueError in another context: logged by end()

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        return self._var.get()

    def propagate(self, fn: F) -> F:
        captured = contextvars.copy_context()

        @functools.wraps(fn)
        def run_in_captured_context(*args: Any, **kwargs: Any) -> Any:
            # A fresh copy per call: one Context cannot be entered twice at once.
            return captured.copy().run(fn, *args, **kwargs)

        return run_in_captured_context  # type: ignore[return-value]
