"""``invocation_id``: the invocation's scope bound in its context, and a bounded, locked index by id."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, ParamSpec, TypeVar

from . import NO_SCOPE, Concurrency, Scope, first_open, log_safely
from .contextvar import ContextVarStore, VarToken

_logger = logging.getLogger(__name__)

S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")

ENV_MAX_ENTRIES = "STATEBACKENDS_INVOCATION_ID_MAX_ENTRIES"
"""Environment variable bounding how many open invocations the id index holds (a positive integer)."""
DEFAULT_MAX_ENTRIES = 10_000
EVICTION_WARNING_INTERVAL = 60.0
"""Seconds between two eviction warnings of one store (the first eviction always warns)."""
_NO_CLOCK = float("inf")
"""The start time recorded while ``max_age`` is None (no clock read per begin): never too old."""


def _id_prefix() -> str:
    """The prefix of the ids a store makes up in this process: its pid and 32 random bits (pids are reused)."""
    return f"inv-{os.getpid():x}-{secrets.token_hex(4)}-"


def _max_entries_from_env() -> int:
    raw = os.environ.get(ENV_MAX_ENTRIES, "").strip()
    if not raw:
        return DEFAULT_MAX_ENTRIES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        log_safely(_logger, logging.ERROR, "statebackends: %s=%r is not valid (a positive integer is); using %d",
                    ENV_MAX_ENTRIES, raw, DEFAULT_MAX_ENTRIES)
        return DEFAULT_MAX_ENTRIES
    return value


class InvocationIdStore(ContextVarStore[S]):
    """Binds each invocation's scope in its context and indexes it by id, so a bare id finds it.

    ``begin`` binds the scope in a ``ContextVar`` (the *ambient* binding) and
    adds it to a locked index ``id -> open scopes`` (an id is made up when
    the call has none, unique across forks). ``current(owner, id)``:

    * the ambient invocation wins when no id is passed or its id matches (an
      outer invocation of this context too): two overlapping invocations
      begun with the SAME id (two turns of one Hermes session) each see
      their own state;
    * if this context belongs to an invocation with that id that has ENDED
      (an ended scope with the id on the ambient chain: a task or copy made
      during the call, running after it), the answer is None: that work
      belongs to the ended invocation, never to another one sharing its id;
    * otherwise (a raw thread hop carrying only the id) the index is asked:
      of the open invocations with that id, those whose ``owner`` is the
      given owner (any of them when no owner is given, ``owner=None``); one
      is the answer; none gives None; several give None, never another
      invocation's state: the look-up is counted in ``ambiguous`` and logged
      as a WARNING once per store.

    So it isolates what ``contextvar`` isolates and also reaches threads that
    receive nothing but the id, and greenlets spawned during the call that are
    handed the id. The index is bounded: beyond ``max_entries`` open
    invocations (constructor argument, else ``STATEBACKENDS_INVOCATION_ID_MAX_ENTRIES``,
    else 10000), or older than ``max_age`` seconds if set (off by default: an
    agent run may rightly last hours), the oldest are evicted, counted in
    ``evicted``, marked ``scope.evicted`` and logged as a WARNING (the first,
    then at most once a minute, with the count). An evicted invocation keeps
    working through its ambient binding; only id look-ups lose it (they never
    fall back to another invocation sharing its id on another owner). Adding
    and removing an invocation costs O(1), however many share its id.
    """

    name = "invocation_id"
    isolates = frozenset(
        {
            Concurrency.THREADS,
            Concurrency.ASYNC_TASKS,
            Concurrency.COPIED_CONTEXT,
            Concurrency.LATE_WORK,
            Concurrency.RAW_THREAD,
            Concurrency.PROPAGATE,
            Concurrency.NESTED,
            Concurrency.SHARED_ID,
            Concurrency.GREENLETS,
        }
    )

    def __init__(
        self,
        factory: Callable[[], S],
        *,
        max_entries: int | None = None,
        max_age: float | None = None,
    ) -> None:
        super().__init__(factory)
        if max_entries is None:
            max_entries = _max_entries_from_env()
        elif max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        if max_age is not None and max_age <= 0:
            raise ValueError(f"max_age must be > 0 seconds or None, got {max_age!r}")
        self.max_entries = max_entries
        self.max_age = max_age
        self.evicted = 0
        """Open invocations dropped from the id index (see the class docstring)."""
        self.ambiguous = 0
        """Id look-ups answered None because several open invocations (of the given owner) share the id."""
        self._warned_ambiguous = False
        self._evicted_warned = 0
        self._next_eviction_warning = float("-inf")
        # scope -> monotonic start time, oldest first; id -> the open scopes with that id (as dict keys, in order).
        self._open: OrderedDict[Scope[S, VarToken], float] = OrderedDict()
        self._by_id: dict[Hashable, dict[Scope[S, VarToken], None]] = {}
        self._prefix = _id_prefix()
        self._counter = itertools.count(1)

    def _enter(self, scope: Scope[S, VarToken]) -> VarToken:
        """Bind ``scope`` in this context (as ``contextvar``), under an id made up if it has none."""
        if scope.invocation_id is None:
            scope.invocation_id = f"{self._prefix}{next(self._counter)}"
        else:
            hash(scope.invocation_id)  # an unhashable id fails here, before anything is changed
        var = self._var
        previous = var.get()
        while previous.ended:  # first_open(), inlined: begin is on every call's path
            previous = previous.previous
        scope.previous = previous
        return var.set(scope)

    def _opened(self, scope: Scope[S, VarToken]) -> Callable[[], object] | None:
        """Index ``scope`` by its id (the lock is held); past the bounds, evict the oldest and make a warning due."""
        key = scope.invocation_id
        same_id = self._by_id.get(key)
        if same_id is None:
            self._by_id[key] = {scope: None}
        else:
            same_id[scope] = None
        opened = self._open
        if self.max_age is None:
            opened[scope] = _NO_CLOCK
            if len(opened) <= self.max_entries or not self._evict(_NO_CLOCK):
                return None
            due = self._eviction_report(time.monotonic())
        else:
            opened[scope] = now = time.monotonic()
            if not self._evict(now):
                return None
            due = self._eviction_report(now)
        return None if due is None else functools.partial(self._warn_evicted, due)

    def _closed(self, scope: Scope[S, VarToken]) -> None:
        if self._open.pop(scope, None) is not None:
            self._unindex(scope)

    def _warn_evicted(self, report: tuple[int, int]) -> None:
        log_safely(
            _logger, logging.WARNING,
            "%s: evicted %d still-open invocation(s) from the id index since the last warning (%d in all; "
            "bound max_entries=%d, max_age=%s, set by %s); they keep their state in their own context, but "
            "id look-ups from other threads lose them",
            self.name, report[0], report[1], self.max_entries, self.max_age, ENV_MAX_ENTRIES,
        )

    def _evict(self, now: float) -> int:
        """Drop the oldest open invocations beyond the bounds (the lock is held)."""
        n = 0
        opened = self._open
        while len(opened) > self.max_entries:
            self._drop(opened.popitem(last=False)[0])
            n += 1
        if self.max_age is not None:
            horizon = now - self.max_age
            while opened:
                oldest, started = next(iter(opened.items()))
                if started >= horizon:
                    break
                del opened[oldest]
                self._drop(oldest)
                n += 1
        self.evicted += n
        return n

    def _drop(self, scope: Scope[S, VarToken]) -> None:
        scope.evicted = True
        self._unindex(scope)

    def _unindex(self, scope: Scope[S, VarToken]) -> None:
        key = scope.invocation_id
        same_id = self._by_id.get(key)
        if same_id is not None:
            if len(same_id) == 1:
                if scope in same_id:
                    del self._by_id[key]
            else:
                same_id.pop(scope, None)

    def _eviction_report(self, now: float) -> tuple[int, int] | None:
        """(evicted since the last warning, evicted in all) if a warning is due (the lock is held)."""
        if now < self._next_eviction_warning:
            return None
        self._next_eviction_warning = now + EVICTION_WARNING_INTERVAL
        since, self._evicted_warned = self.evicted - self._evicted_warned, self.evicted
        return since, self.evicted

    def current(self, owner: Any = None, invocation_id: Hashable | None = None) -> S | None:
        scope = self._var.get()
        if not scope.ended and (invocation_id is None or scope.invocation_id == invocation_id):
            return scope.state
        return self._look_up(scope, owner, invocation_id)

    def _look_up(self, scope: Scope[S, VarToken], owner: Any, invocation_id: Hashable | None) -> S | None:
        if invocation_id is None:
            return first_open(scope).state
        ended_here = False
        while scope is not NO_SCOPE:  # this context's chain, innermost first
            if scope.invocation_id == invocation_id:
                if not scope.ended:
                    return scope.state
                ended_here = True
            scope = scope.previous
        if ended_here:  # work of an ended invocation with that id: never another's state
            return None
        try:
            same_id = self._by_id.get(invocation_id)
        except TypeError:  # unhashable id: nothing has it
            return None
        if same_id is None:
            return None
        with self._lock:
            candidates = [s for s in same_id if not s.ended and (owner is None or s.owner is owner)]
        if len(candidates) == 1:
            return candidates[0].state
        if candidates:
            self._ambiguous(invocation_id)
        return None

    def _ambiguous(self, invocation_id: Hashable) -> None:
        with self._lock:
            self.ambiguous += 1
            warn, self._warned_ambiguous = not self._warned_ambiguous, True
        if warn:
            log_safely(
                _logger, logging.WARNING,
                "%s: several open invocations (of the owner given, if any) share the id %r and the look-up "
                "came without their context (a raw thread hop): returning None rather than another invocation's state; "
                "further cases are counted in %s.ambiguous, not logged",
                self.name, invocation_id, type(self).__name__,
            )

    def propagate(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Wrap ``fn`` to run with this context's binding only (no other variable is carried, unlike ``contextvar``)."""
        captured, var = self._var.get(), self._var

        @functools.wraps(fn)
        def run_with_captured_scope(*args: P.args, **kwargs: P.kwargs) -> R:
            token = var.set(captured)
            try:
                return fn(*args, **kwargs)
            finally:
                var.reset(token)

        return run_with_captured_scope

    def _after_fork_in_child(self) -> None:
        super()._after_fork_in_child()
        # Nothing begun before the fork is adopted (see StateStore): the forking
        # thread's invocations keep their ambient binding, the index starts empty.
        self._open = OrderedDict()
        self._by_id = {}
        self._prefix = _id_prefix()  # the ids it makes up never repeat the parent's
