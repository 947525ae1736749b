"""``otel_context``: the invocation's scope as a value in the OpenTelemetry ``Context``."""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
from typing import Any, Callable, Hashable, Iterable, TypeVar

from opentelemetry import context as otel_context

from ._store import NO_SCOPE, Concurrency, S, Scope, StateStore, first_open, open_chain

F = TypeVar("F", bound=Callable[..., Any])
_logger = logging.getLogger("statebackends")
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
    current, in the context that attached it): an end out of order leaves
    the detach to the end of the inner invocation, which then detaches every
    ended context it uncovers, so OpenTelemetry never logs a failed detach
    and no foreign attach is undone.
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
        parent = otel_context.get_current()
        scope.previous = first_open(parent.get(self._key, NO_SCOPE))  # type: ignore[arg-type]
        ctx = otel_context.set_value(self._key, scope, parent)
        token = otel_context.attach(ctx)
        return (token, ctx, self._probe.set(scope))

    def _exit(self, scope: Scope[S]) -> None:
        if not self._detach(scope):
            _logger.debug("%s: invocation %r ended out of order or outside its context; detached later",
                          self.name, scope.invocation_id)
            return
        uncovered = otel_context.get_current().get(self._key, NO_SCOPE)
        while uncovered.ended and self._detach(uncovered):  # type: ignore[union-attr]
            uncovered = otel_context.get_current().get(self._key, NO_SCOPE)

    def _detach(self, scope: Scope[Any]) -> bool:
        if scope.token is _DETACHED:
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
        return first_open(scope).state  # type: ignore[arg-type]

    def propagate(self, fn: F) -> F:
        captured = otel_context.get_current()

        @functools.wraps(fn)
        def run_in_captured_context(*args: Any, **kwargs: Any) -> Any:
            token = otel_context.attach(captured)
            try:
                return fn(*args, **kwargs)
            finally:
                otel_context.detach(token)

        return run_in_captured_context  # type: ignore[return-value]

    def _scopes_here(self) -> Iterable[Scope[S]]:
        return open_chain(otel_context.get_current().get(self._key, NO_SCOPE))  # type: ignore[arg-type]
