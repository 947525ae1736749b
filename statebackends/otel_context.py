"""``otel_context``: the state as a value in the OpenTelemetry ``Context``."""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Hashable, TypeVar

from opentelemetry import context as otel_context

from ._store import Concurrency, S, Scope, StateStore

F = TypeVar("F", bound=Callable[..., Any])
_ids = itertools.count()


class OtelContextStore(StateStore[S]):
    """Keeps the state under a private key of the OpenTelemetry ``Context``.

    The state goes wherever OpenTelemetry's own context goes: with the default
    ``contextvars`` runtime context it isolates what ``contextvar`` isolates,
    and it also crosses the thread hops that OpenTelemetry itself bridges
    (``opentelemetry-instrumentation-threading``, a runtime context chosen with
    ``OTEL_PYTHON_CONTEXT``). ``end`` detaches with the token from ``begin``.
    """

    name = "otel_context"
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
        self._key = otel_context.create_key(f"statebackends-state-{next(_ids)}")

    def _enter(self, scope: Scope[S]) -> Any:
        ctx = otel_context.set_value(self._key, scope.state)
        return (otel_context.attach(ctx), ctx)

    def _exit(self, scope: Scope[S]) -> None:
        token, ctx = scope.token
        if otel_context.get_current() is not ctx:
            # Another context (or an attach left open inside the call): detaching
            # here would make OpenTelemetry log an error and restore the wrong frame.
            raise RuntimeError("end() outside the context that begin() attached")
        otel_context.detach(token)

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        return otel_context.get_value(self._key)  # type: ignore[return-value]

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
