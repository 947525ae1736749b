"""The abstract per-call state store and the scope that undoes one ``begin``."""

from __future__ import annotations

import abc
import enum
import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Generic, Hashable, Iterator, TypeVar

_logger = logging.getLogger("statebackends")

S = TypeVar("S")
F = TypeVar("F", bound=Callable[..., Any])


class Concurrency(str, enum.Enum):
    """A way a program runs invocations, which a backend may or may not isolate.

    A backend *isolates* a model when, under it, every invocation sees its own
    state and only its own state, and no state survives the invocation.
    """

    THREADS = "threads"
    """Concurrent invocations on one shared owner, each in its own thread."""
    ASYNC_TASKS = "asyncio_tasks"
    """Concurrent invocations as asyncio tasks interleaved on one event loop thread."""
    COPIED_CONTEXT = "copied_context"
    """Work handed to a pool thread through a ``contextvars`` copy (``asyncio.to_thread``, Hermes's tool pool)."""
    RAW_THREAD = "raw_thread"
    """Work handed to another thread with nothing copied (a plain ``Thread`` or ``executor.submit``)."""
    PROPAGATE = "propagate"
    """Work wrapped with :meth:`StateStore.propagate` before a raw hop, including a nested invocation on another owner there."""
    NESTED = "nested"
    """An invocation nested inside another on the same thread gets the outer state back when it ends."""

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Concurrency.THREADS: "threads sharing one owner",
    Concurrency.ASYNC_TASKS: "asyncio tasks on one loop",
    Concurrency.COPIED_CONTEXT: "pool hop with a context copy",
    Concurrency.RAW_THREAD: "raw thread hop, only the owner or id carried",
    Concurrency.PROPAGATE: "raw hop wrapped by `propagate`",
    Concurrency.NESTED: "nested invocation, same thread",
}


class Scope(Generic[S]):
    """One open invocation: its ``state`` and what its store needs to undo ``begin``."""

    __slots__ = ("state", "owner", "invocation_id", "token", "ended", "__weakref__")

    def __init__(self, state: S, owner: Any, invocation_id: Hashable | None, token: Any = None) -> None:
        self.state = state
        self.owner = owner
        self.invocation_id = invocation_id
        self.token = token
        self.ended = False

    def __repr__(self) -> str:
        return f"Scope(invocation_id={self.invocation_id!r}, ended={self.ended})"


class StateStore(abc.ABC, Generic[S]):
    """Where an instrumentation keeps the state of one call, from ``begin`` to ``end``.

    Subclasses implement ``_enter``, ``_exit``, ``current`` and ``propagate``;
    ``begin``, ``end``, ``invocation`` and ``live`` are shared. ``isolates``
    declares, as data, the concurrency models the backend keeps apart; the
    correctness matrix checks the declaration against behaviour.
    """

    name: ClassVar[str] = ""
    isolates: ClassVar[frozenset[Concurrency]] = frozenset()

    def __init__(self, factory: Callable[[], S]) -> None:
        if not callable(factory):
            raise TypeError(f"factory must be callable, got {factory!r}")
        self.factory = factory
        self._lock = threading.Lock()
        self._live = 0

    # -- the contract -------------------------------------------------------

    def begin(self, owner: Any, invocation_id: Hashable | None = None) -> Scope[S]:
        """Open a fresh state for a new invocation on ``owner`` and make it current."""
        scope: Scope[S] = Scope(self.factory(), owner, invocation_id)
        scope.token = self._enter(scope)
        with self._lock:
            self._live += 1
        return scope

    def end(self, scope: Scope[S]) -> None:
        """Close the invocation and make current what was current before its ``begin``.

        Never raises: a second ``end``, or one whose undoing is impossible here
        (another thread or context), is logged at debug level.
        """
        with self._lock:
            if scope.ended:
                _logger.debug("%s: end() of an already ended %r ignored", self.name, scope)
                return
            scope.ended = True
            self._live -= 1
        try:
            self._exit(scope)
        except Exception:  # noqa: BLE001 - the contract is "never raises"
            _logger.debug("%s: could not undo begin() of %r", self.name, scope, exc_info=True)

    @abc.abstractmethod
    def current(self, owner: Any, invocation_id: Hashable | None = None) -> S | None:
        """The state of the invocation in effect here, or None where none is."""

    @abc.abstractmethod
    def propagate(self, fn: F) -> F:
        """Wrap ``fn`` so that, called later in another thread, it sees the current invocation."""

    def live(self) -> int | None:
        """How many invocations are open (begun and not ended), or None where unknowable."""
        return self._live

    @contextmanager
    def invocation(self, owner: Any, invocation_id: Hashable | None = None) -> Iterator[S]:
        """``begin`` on entry, ``end`` on exit (exceptions included); yields the state."""
        scope = self.begin(owner, invocation_id)
        try:
            yield scope.state
        finally:
            self.end(scope)

    # -- what a backend implements -----------------------------------------

    @abc.abstractmethod
    def _enter(self, scope: Scope[S]) -> Any:
        """Make ``scope.state`` current; return what ``_exit`` needs to undo it."""

    @abc.abstractmethod
    def _exit(self, scope: Scope[S]) -> None:
        """Undo ``_enter`` for ``scope`` (``scope.token`` holds its return value); may raise."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} live={self.live()}>"
