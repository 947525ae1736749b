"""``invocation_id``: a bounded, thread-safe map from invocation id to state."""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, TypeVar

from ._store import Concurrency, S, Scope, StateStore

F = TypeVar("F", bound=Callable[..., Any])
_logger = logging.getLogger("statebackends")
_ids = itertools.count()
_MISSING = object()


class InvocationIdStore(StateStore[S]):
    """Keeps each invocation's state under its id, in one locked map.

    The id comes from the call where the call carries one (Hermes hands its
    task id to every tool; an id given is looked up strictly, never replaced),
    else from an ambient binding that ``begin`` makes
    in a ``ContextVar``. So it isolates what ``contextvar`` isolates and also
    reaches threads that receive nothing but the id (a raw thread hop whose
    work is called with the id). Entries are removed at ``end``; entries
    whose ``end`` never comes are evicted, oldest first, once more than
    ``max_entries`` are open, or once older than ``max_age`` seconds if one is
    set (off by default: an agent run may rightly last hours), and counted in
    ``evicted``: the map never grows without limit.
    """

    name = "invocation_id"
    isolates = frozenset(
        {
            Concurrency.THREADS,
            Concurrency.ASYNC_TASKS,
            Concurrency.COPIED_CONTEXT,
            Concurrency.RAW_THREAD,
            Concurrency.PROPAGATE,
            Concurrency.NESTED,
        }
    )

    def __init__(
        self,
        factory: Callable[[], S],
        *,
        max_entries: int = 10_000,
        max_age: float | None = None,
    ) -> None:
        super().__init__(factory)
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        if max_age is not None and max_age <= 0:
            raise ValueError(f"max_age must be > 0 seconds or None, got {max_age!r}")
        self.max_entries = max_entries
        self.max_age = max_age
        self.evicted = 0
        # id -> (state, monotonic start time); insertion order is age order.
        self._entries: OrderedDict[Hashable, tuple[S, float]] = OrderedDict()
        self._map_lock = threading.Lock()
        self._ambient: contextvars.ContextVar[Hashable | None] = contextvars.ContextVar(
            f"statebackends_invocation_id_{next(_ids)}", default=None
        )
        self._prefix = f"inv-{os.getpid():x}-{next(_ids):x}-"
        self._counter = itertools.count(1)

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._counter)}"

    def _enter(self, scope: Scope[S]) -> Any:
        if scope.invocation_id is None:
            scope.invocation_id = self._new_id()
        key = scope.invocation_id
        now = time.monotonic()
        with self._map_lock:
            previous = self._entries.pop(key, _MISSING)  # same id again: nested, restored at end
            self._entries[key] = (scope.state, now)
            self._evict(now)
        return (previous, self._ambient.set(key))

    def _evict(self, now: float) -> None:
        entries = self._entries
        while len(entries) > self.max_entries:
            key, _ = entries.popitem(last=False)
            self.evicted += 1
            _logger.debug("%s: evicted %r (more than %d open)", self.name, key, self.max_entries)
        if self.max_age is not None:
            horizon = now - self.max_age
            while entries:
                key, (_, started) = next(iter(entries.items()))
                if started >= horizon:
                    break
                del entries[key]
                self.evicted += 1
                _logger.debug("%s: evicted %r (older than %ss)", self.name, key, self.max_age)

    def _exit(self, scope: Scope[S]) -> None:
        previous, token = scope.token
        with self._map_lock:
            entry = self._entries.get(scope.invocation_id)
            if entry is not None and entry[0] is scope.state:
                if previous is _MISSING:
                    del self._entries[scope.invocation_id]
                else:
                    self._entries[scope.invocation_id] = previous
        self._ambient.reset(token)  # ValueError in another context: logged by end()

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        entries = self._entries
        key = self._ambient.get() if invocation_id is None else invocation_id
        if key is None:
            return None
        entry = entries.get(key)
        return None if entry is None else entry[0]

    def live(self) -> int | None:
        return len(self._entries)

    def propagate(self, fn: F) -> F:
        captured = self._ambient.get()
        ambient = self._ambient

        @functools.wraps(fn)
        def run_with_captured_id(*args: Any, **kwargs: Any) -> Any:
            token = ambient.set(captured)
            try:
                return fn(*args, **kwargs)
            finally:
                ambient.reset(token)

        return run_with_captured_id  # type: ignore[return-value]
