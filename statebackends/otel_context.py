"""``otel_context``: the invocation's scope as a value in the OpenTelemetry ``Context``."""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
from collections.abc import Callable, Hashable
from typing import Any, ParamSpec, TypeAlias, TypeVar

from opentelemetry import context as otel_context
from opentelemetry.context import Context

from . import NO_SCOPE, Concurrency, Scope, StateStore, first_open, log_safely

_logger = logging.getLogger(__name__)

S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")
_ids = itertools.count()


Cell: TypeAlias = "list[Scope[Any, Any]]"
"""What the store puts in a ``Context`` under its key: a one-item list holding the scope.

Never the scope itself: a ``Context`` is immutable, so an ``end`` that cannot detach yet (a
foreign attach on top) lets go of the scope's state by putting a husk in the cell instead.
"""
ContextToken: TypeAlias = "tuple[Context, contextvars.Token[Context], contextvars.Token[None], Cell] | None"
"""The token of an ``otel_context`` scope: the ``Context`` it attached, the tokens to undo that, and its cell;
None once detached."""
_NO_CELL: Cell = [NO_SCOPE]


class OtelContextStore(StateStore[S, ContextToken]):
    """Keeps the invocation's scope under a private key of the OpenTelemetry ``Context``.

    The state goes wherever OpenTelemetry's own context goes: with the default
    ``contextvars`` runtime context it isolates what ``contextvar`` isolates
    (ids are ignored), and it also crosses the thread hops that OpenTelemetry
    itself bridges (``opentelemetry-instrumentation-threading``, a runtime
    context chosen with ``OTEL_PYTHON_CONTEXT``). ``end`` detaches with the
    token from ``begin`` only where that is safe (the attached context is
    current, in the context that attached it), then every ended context of
    this store it uncovers; OpenTelemetry never logs a failed detach and no
    foreign attach is undone. Contexts are never changed: each ``begin``
    makes a new one with ``set_value``.

    Where the detach cannot be done at ``end`` (a foreign attach, such as a
    span made current, is on top; an end out of order, in another thread or
    in a copy of the context), the context this store attached (and every
    context derived from it) is made to point at a husk without state or
    owner, so the state is not kept alive by them, and ``current()`` skips
    it. The detach itself is left to the next ``begin``, ``current`` or
    ``end`` of this store in the attaching context once that context is on
    top again (OpenTelemetry has no hook on a foreign ``detach``): until then
    ``get_current()`` there is this store's context, holding only the husk
    under the store's private key and otherwise the values of the context
    before ``begin``. A foreign context derived from ours while the
    invocation was open, if the invocation ends normally, holds the ended
    scope (and its state) for as long as it lives; ``current()`` skips it.
    """

    name = "otel_context"
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
        n = next(_ids)
        self._key = otel_context.create_key(f"statebackends-state-{n}")
        # Set beside each attach: its reset fails (ValueError) outside the contextvars context of begin().
        self._probe: contextvars.ContextVar[None] = contextvars.ContextVar(f"statebackends_otel_probe_{n}")

    def _here(self, context: Context | None = None) -> Scope[S, ContextToken]:
        """The scope (or husk) ``context`` (by default the current one) holds under this store's key, or NO_SCOPE."""
        here = otel_context.get_current() if context is None else context
        cell: Cell = here.get(self._key, _NO_CELL)  # type: ignore[assignment]  # only we write our key: a Cell
        return cell[0]

    def _enter(self, scope: Scope[S, ContextToken]) -> ContextToken:
        parent = otel_context.get_current()
        previous = self._here(parent)
        if previous.ended:  # ended contexts of ours on top (a foreign detach uncovered them): detach them first
            self._unwind_here()
            parent = otel_context.get_current()
            previous = self._here(parent)
        scope.previous = first_open(previous)
        cell = [scope]
        ctx = otel_context.set_value(self._key, cell, parent)
        return ctx, otel_context.attach(ctx), self._probe.set(None), cell

    def _exit(self, scope: Scope[S, ContextToken]) -> None:
        if self._detach(scope):
            if self._here().ended:  # ended contexts of ours it uncovered (they ended out of order)
                self._unwind_here()
            return
        log_safely(_logger, logging.DEBUG, "%s: invocation %r ended out of order or outside its context; detached "
                   "later", self.name, scope.invocation_id)
        attached = scope.token
        if attached is not None:  # our context stays attached for now: let it hold a husk, not the state
            husk: Scope[None, ContextToken] = Scope(None, None, scope.invocation_id)
            husk.token, husk.ended, husk.previous, scope.token = attached, True, scope.previous, None
            attached[3][0] = husk

    def _unwind_here(self) -> None:
        """Detach the ended contexts of this store on top here (a foreign detach may have uncovered them)."""
        top = self._here()
        while top.ended and self._detach(top):
            top = self._here()

    def _detach(self, scope: Scope[Any, ContextToken]) -> bool:
        attached = scope.token
        if attached is None:
            return False
        ctx, token, probe, _ = attached
        if otel_context.get_current() is not ctx:
            return False
        try:
            self._probe.reset(probe)
        except (ValueError, RuntimeError):  # a copy of the context that attached it
            return False
        otel_context.detach(token)
        scope.token = None
        return True

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        # _here(), inlined (the hot path). A Context holds objects; only this store writes its key: a Cell.
        cell: Cell = otel_context.get_current().get(self._key, _NO_CELL)  # type: ignore[assignment]
        scope: Scope[S, ContextToken] = cell[0]
        if not scope.ended:
            return scope.state
        self._unwind_here()
        return first_open(scope).state

    def propagate(self, fn: Callable[P, R]) -> Callable[P, R]:
        captured = otel_context.get_current()

        @functools.wraps(fn)
        def run_in_captured_context(*args: P.args, **kwargs: P.kwargs) -> R:
            # A copy: never the very Context this store attached, which only begin()'s attach may detach.
            token = otel_context.attach(Context(captured))
            try:
                return fn(*args, **kwargs)
            finally:
                otel_context.detach(token)

        return run_in_captured_context
