"""``contextvar``: the invocation's scope in a ``contextvars.ContextVar``, set and reset with tokens."""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
from collections.abc import Callable, Hashable
from typing import Any, Optional, ParamSpec, TypeAlias, TypeVar

from . import NO_SCOPE, Concurrency, Scope, StateStore, first_open, log_safely

_logger = logging.getLogger(__name__)

S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")
VarToken: TypeAlias = Optional["contextvars.Token[Scope[Any, Any]]"]
"""The token of a ``ContextVar`` backend's scope: what its ``set`` returned, None once reset."""
_ids = itertools.count()


class ContextVarStore(StateStore[S, VarToken]):
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
            Concurrency.LATE_WORK,
            Concurrency.PROPAGATE,
            Concurrency.NESTED,
            Concurrency.SHARED_ID,
        }
    )

    def __init__(self, factory: Callable[[], S]) -> None:
        super().__init__(factory)
        self._var: contextvars.ContextVar[Scope[S, VarToken]] = contextvars.ContextVar(
            f"statebackends_state_{next(_ids)}", default=NO_SCOPE
        )

    def _enter(self, scope: Scope[S, VarToken]) -> VarToken:
        scope.previous = first_open(self._var.get())
        return self._var.set(scope)

    def _exit(self, scope: Scope[S, VarToken]) -> None:
        """Reset the variable to what it held before ``scope``, if that can be done here.

        Only when ``scope`` is what the variable holds (ends in another order
        leave it for the inner scope's end, which then unwinds the ended scopes
        it uncovers with their own tokens), and only in the context that set it.
        """
        var, token = self._var, scope.token
        if token is not None:  # else already reset: only the ended scopes it covered are left to unwind
            if var.get() is not scope:
                log_safely(_logger, logging.DEBUG, "%s: invocation %r ended out of order or outside its context; "
                           "unwound later", self.name, scope.invocation_id)
                return
            try:
                var.reset(token)
            except (ValueError, RuntimeError):  # a copy of the context that set it
                log_safely(_logger, logging.DEBUG, "%s: invocation %r ended in a copy of its context; left to "
                           "that context", self.name, scope.invocation_id)
                return
            scope.token = None
        uncovered = var.get()
        while uncovered.ended and uncovered.token is not None:  # the ended scopes it uncovers, with their tokens
            try:
                var.reset(uncovered.token)
            except (ValueError, RuntimeError):
                return
            uncovered.token = None
            uncovered = var.get()

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        scope = self._var.get()
        if not scope.ended:
            return scope.state
        return first_open(scope).state

    def propagate(self, fn: Callable[P, R]) -> Callable[P, R]:
        captured = contextvars.copy_context()

        @functools.wraps(fn)
        def run_in_captured_context(*args: P.args, **kwargs: P.kwargs) -> R:
            # A fresh copy per call: one Context cannot be entered twice at once.
            return captured.copy().run(fn, *args, **kwargs)

        return run_in_captured_context
