"""``otel_context``: the invocation's scope as a value in the OpenTelemetry ``Context``."""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
from typing import Any, Callable, Hashable, TypeVar

from opentelemetry import context as otel_context
from opentelemetry.context import Context

from ._store import NO_SCOPE, Concurrency, S, Scope, StateStore, log_safely, first_open

_logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_ids = itertools.count()
_DETACHED = object()


class OtelContextStore(StateStore[S]):
    """Keeps the invocation's scope under a private key of the OpenTelemetry ``Context``.

    The state goes wherever OpenTelemetry's own context goes: with the default
    ``contextvars`` runtime context it isolates what ``contextvar`` isolates
    (ids are ignored), and it also crosses the thread hops that OpenTelemetry
    itself bridges (``opentelemetry-instrumentation-threading``, a runtime
    context chosen with ``OTEL_PYTHON_CONTEXT``). ``end`` detaches with the
    token from ``begin`` only where that is safe (the attached context is
    current, in the context that attached it), then every ended context of
    this store it uncovers; OpenTelemetry never logs a failed detach and no
    foreign attach is undone.

    Where the detach cannot be done at ``end`` (a foreign attach, such as a
    span made current, is on top; an end out of order, in another thread or
    in a copy of the context), the ended scope is replaced, in the context
    this store attached, by a husk without state or owner, so the state is
    not kept alive by it, and ``current()`` skips it. The detach itself is
    left to the next ``begin``, ``current`` or ``end`` of this store in the
    attaching context once that context is on top again (OpenTelemetry has
    no hook on a foreign ``detach``): until then ``get_current()`` there is
    this store's context, holding only the husk under the store's private key
    and otherwise the values of the context before ``begin``. A foreign
    context derived from ours while the invocation was open holds the ended
    scope (and its state) for as long as it lives; ``current()`` skips it.
    """

    name = "otel_context"
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
        n = next(_ids)
        self._key = otel_context.create_key(f"statebackends-state-{n}")
        # Set beside each attach: its reset fails (ValueError) outside the contextvars context of begin().
        self._probe: contextvars.ContextVar[Any] = contextvars.ContextVar(f"statebackends_otel_probe_{n}")

    def _enter(self, scope: Scope[S]) -> Any:
        self._unwind_here()
        parent = otel_context.get_current()
        scope.previous = first_open(parent.get(self._key, NO_SCOPE))  # type: ignore[arg-type]
        ctx = otel_context.set_value(self._key, scope, parent)
        token = otel_context.attach(ctx)
        return (token, ctx, self._probe.set(None))

    def _exit(self, scope: Scope[S]) -> None:
        if self._detach(scope):
            self._unwind_here()
            return
        log_safely(_logger, logging.DEBUG, "%s: invocation %r ended out of order or outside its context; detached later",
                    self.name, scope.invocation_id)
        if type(scope.token) is tuple:  # our context stays attached for now: let it hold a husk, not the state
            husk: Scope[Any] = Scope(None, None, scope.invocation_id, scope.token)
            husk.ended, husk.previous, scope.token = True, scope.previous, _DETACHED
            dict.__setitem__(husk.token[1], self._key, husk)  # our own Context object, our private key

    def _unwind_here(self) -> None:
        """Detach the ended contexts of this store on top here (a foreign detach may have uncovered them)."""
        top = otel_context.get_current().get(self._key, NO_SCOPE)
        while top.ended and self._detach(top):  # type: ignore[union-attr]
            top = otel_context.get_current().get(self._key, NO_SCOPE)

    def _detach(self, scope: Scope[Any]) -> bool:
        if type(scope.token) is not tuple:
            return False
        token, ctx, probe = scope.token
        if otel_context.get_current() is not ctx:
            return False
        try:
            self._probe.reset(probe)
        except (ValueError, RuntimeError):  # a copy of the context that attached it
            return False
        otel_context.detach(token)
        scope.token = _DETACHED
        return True

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        scope = otel_context.get_current().get(self._key, NO_SCOPE)
        if not scope.ended:  # type: ignore[union-attr]
            return scope.state  # type: ignore[union-attr]
        self._unwind_here()
        return first_open(scope).state  # type: ignore[arg-type]

    def propagate(self, fn: F) -> F:
        captured = otel_context.get_current()

        @functools.wraps(fn)
        def run_in_captured_context(*args: Any, **kwargs: Any) -> Any:
            # A copy: never the very Context this store attached, which only begin()'s attach may detach.
            token = otel_context.attach(Context(captured))
            try:
                return fn(*args, **kwargs)
            finally:
                otel_context.detach(token)

        return run_in_captured_context  # type: ignore[return-value]
