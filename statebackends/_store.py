"""The abstract per-call state store and the scope that undoes one ``begin``."""

from __future__ import annotations

import abc
import contextlib
import enum
import inspect
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, ParamSpec

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:  # a TypeVar with a default (PEP 696)
    from typing_extensions import TypeVar

_logger = logging.getLogger(__name__)


def log_safely(
    logger: logging.Logger, level: int, msg: str, *args: object, exc_info: bool | BaseException = False
) -> None:
    """``logger.log(level, msg, *args, exc_info=exc_info)`` that never raises: whatever a handler, filter or
    formatter raises is dropped, ``BaseException`` included; only ``KeyboardInterrupt`` goes through.

    Every path of the core that promises not to raise logs through it, and so can an instrumentation's.
    """
    try:
        logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)  # the record names the caller's line
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - a broken handler (even one raising SystemExit) never breaks the caller
        pass

S = TypeVar("S")
T = TypeVar("T", default=Any)
P = ParamSpec("P")
R = TypeVar("R")


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
    LATE_WORK = "late_work"
    """Work in a context copied during an invocation (a callback, a job a worker thread runs later) that runs after
    it ended, on the thread where the next invocation on that owner (sharing its id) or another owner's is open: it
    gets the first still-open invocation of its own context, or None, never the open one's state."""
    RAW_THREAD = "raw_thread"
    """Work handed to another thread with nothing copied (a plain ``Thread`` or ``executor.submit``)."""
    PROPAGATE = "propagate"
    """Work wrapped with :meth:`StateStore.propagate` before a raw hop, including a nested invocation on another owner
    there."""
    NESTED = "nested"
    """An invocation nested inside another on the same thread gets the outer state back when it ends."""
    SHARED_ID = "shared_id"
    """Overlapping invocations that carry the SAME invocation id (two turns of one Hermes session), each in its own
    thread or task."""
    SHARED_ID_RAW_THREAD = "shared_id_raw_thread"
    """A raw thread hop carrying only an id that several open invocations on one owner share: which one is meant
    cannot be told."""
    GREENLETS = "greenlets"
    """Invocations in gevent greenlets under ``gevent.monkey.patch_all()`` sharing one owner, including a greenlet
    spawned during an invocation (which starts with an empty ``contextvars`` context and its own ``threading.local``)
    and handed only the owner and the id."""

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Concurrency.THREADS: "threads sharing one owner",
    Concurrency.ASYNC_TASKS: "asyncio tasks on one loop",
    Concurrency.COPIED_CONTEXT: "pool hop with a context copy",
    Concurrency.LATE_WORK: "late work of an ended call, run where another is open",
    Concurrency.RAW_THREAD: "raw thread hop, only the owner or id carried",
    Concurrency.PROPAGATE: "raw hop wrapped by `propagate`",
    Concurrency.NESTED: "nested invocation, same thread",
    Concurrency.SHARED_ID: "overlapping invocations sharing one id",
    Concurrency.SHARED_ID_RAW_THREAD: "raw thread hop, only an id shared by open invocations on one owner",
    Concurrency.GREENLETS: "gevent greenlets sharing one owner, monkey-patched",
}


class Scope(Generic[S, T]):
    """One invocation: its ``state`` and the ``token`` its store needs to undo ``begin``.

    ``token`` is what the backend's ``_enter`` returned, of the backend's own
    type ``T`` (the second parameter of its :class:`StateStore`; ``Any`` when
    not given): only that store reads it. ``previous`` is the scope that was
    current where it began (``current()`` skips ended scopes along that chain,
    so no context ever gets an ended state back); ``evicted`` is True when the
    store had to drop the invocation from an index before its ``end`` (an
    instrumentation may mark the call incomplete).
    """

    __slots__ = ("__weakref__", "_epoch", "ended", "evicted", "invocation_id", "owner", "previous", "state", "token")

    token: T

    def __init__(self, state: S, owner: Any, invocation_id: Hashable | None) -> None:
        self.state = state
        self.owner = owner
        self.invocation_id = invocation_id
        self.ended = False
        self.previous: Scope[Any, Any] = NO_SCOPE
        self.evicted = False
        self._epoch = _fork_epoch

    def __repr__(self) -> str:
        return f"Scope(invocation_id={self.invocation_id!r}, ended={self.ended})"


_fork_epoch = 0  # bumped in a forked child: scopes begun before the fork do not count in its live()

NO_SCOPE: Scope[Any, Any] = Scope.__new__(Scope)  # made by hand: Scope() links every new scope to it
"""The bottom of every ``previous`` chain: never ended, its state is None (what ``current()`` gives outside any
invocation)."""
NO_SCOPE.state = NO_SCOPE.owner = NO_SCOPE.invocation_id = NO_SCOPE.token = None
NO_SCOPE.ended = NO_SCOPE.evicted = False
NO_SCOPE.previous, NO_SCOPE._epoch = NO_SCOPE, 0  # noqa: SLF001 - Scope's own module


def first_open(scope: Scope[S, T]) -> Scope[S, T]:
    """The first scope not ended along ``scope``'s ``previous`` chain (``NO_SCOPE`` at worst)."""
    while scope.ended:
        scope = scope.previous
    return scope


_stores: weakref.WeakSet[StateStore[Any, Any]] = weakref.WeakSet()


class StateStore(abc.ABC, Generic[S, T]):
    """Where an instrumentation keeps the state of one call, from ``begin`` to ``end``.

    Subclasses implement ``_enter``, ``_exit``, ``current`` and ``propagate``
    (and, for bookkeeping under the store's lock, ``_opened`` and ``_closed``);
    ``begin``, ``end``, ``invocation`` and ``live`` are shared. ``T`` is the
    type of the token ``_enter`` returns (``Any`` when not given: a
    ``StateStore[S]``). ``isolates`` declares, as data, the concurrency models
    the backend keeps apart; :mod:`statebackends.testing` checks the
    declaration against behaviour.

    Every backend obeys: ``current()`` never returns the state of an ended
    invocation, nor another invocation's, in any context (within what the
    backend declares it isolates); ends in any order, double ends and ends
    from another thread or context never raise (logged at debug level; what
    a backend's undo or a logging handler raises is logged or dropped, never
    raised, ``KeyboardInterrupt`` excepted); ``begin`` either works or
    raises leaving nothing behind.

    Fork: the child re-creates the store's locks (it cannot hang on a lock
    another thread of the parent held) and starts with ``live() == 0``:
    ``live()`` counts invocations begun in *this* process, and none begun
    before the fork is adopted, whether the forking thread began it or only
    runs under it (installed by :meth:`propagate`), since the child cannot
    tell whether that work will ever end there. The forking thread's context
    is copied as it was, so ``current()`` there still gives the invocation(s)
    in effect at the fork (the child is running their work); ending them in
    the child is harmless and not counted. They are not in the child's id
    index (``invocation_id``), and other threads' invocations are gone with
    their threads (except on ``instance``, whose state lives on the owner).
    """

    name: ClassVar[str] = ""
    isolates: ClassVar[frozenset[Concurrency]] = frozenset()

    def __init__(self, factory: Callable[[], S]) -> None:
        if not callable(factory):
            raise TypeError(f"factory must be callable, got {factory!r}")
        self.factory = factory
        self._lock = threading.Lock()
        self._live = 0
        _stores.add(self)

    # -- the contract -------------------------------------------------------

    def begin(self, owner: Any, invocation_id: Hashable | None = None) -> Scope[S, T]:
        """Open a fresh state for a new invocation on ``owner`` and make it current.

        If the backend cannot (``_enter`` or ``_opened`` raises), the exception
        propagates and nothing is left half-done: what ``_enter`` did is undone
        and the invocation is not counted as open.
        """
        scope: Scope[S, T] = Scope(self.factory(), owner, invocation_id)
        scope.token = self._enter(scope)
        try:
            with self._lock:
                after = self._opened(scope)
                self._live += 1
        except BaseException:
            scope.ended = True
            self._exit(scope)
            raise
        if after is not None:
            after()
        return scope

    def end(self, scope: Scope[S, T]) -> None:
        """Close the invocation and make current what was current before its ``begin``.

        Never raises (``KeyboardInterrupt`` excepted): a second ``end``, or one
        whose undoing is impossible here (another thread or context, or an inner
        invocation still open), is logged at debug level, and so is what the
        backend raises; ``current()`` skips the ended state everywhere.
        """
        try:
            with self._lock:
                again = scope.ended
                scope.ended = True
                if not again:
                    if scope._epoch == _fork_epoch:  # noqa: SLF001 - Scope's own module; begun before a fork: not counted
                        self._live -= 1
                    self._closed(scope)
            if again:
                log_safely(_logger, logging.DEBUG, "%s: end() of an already ended invocation %r ignored",
                           self.name, scope.invocation_id)
                return
            self._exit(scope)
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - the contract is "never raises" (KeyboardInterrupt excepted)
            log_safely(_logger, logging.DEBUG, "%s: could not undo begin() of invocation %r", self.name,
                       scope.invocation_id, exc_info=True)

    @abc.abstractmethod
    def current(self, owner: Any, invocation_id: Hashable | None = None) -> S | None:
        """The state of the open invocation in effect here, or None where none is."""

    @abc.abstractmethod
    def propagate(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Wrap ``fn`` so that, called later in another thread, it sees the current invocation."""

    def live(self) -> int | None:
        """How many invocations begun in this process are open (begun and not ended), or None where unknowable."""
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
    def _enter(self, scope: Scope[S, T]) -> T:
        """Make ``scope`` current (setting ``scope.previous``); return what ``_exit`` needs to undo it (its token)."""

    @abc.abstractmethod
    def _exit(self, scope: Scope[S, T]) -> None:
        """Undo ``_enter`` for ``scope`` (``scope.token`` holds its return value; ``scope.ended`` is already set);
        may raise (``end`` logs it)."""

    def _opened(self, scope: Scope[S, T]) -> Callable[[], object] | None:
        """Book ``scope`` as open (an index by id), under the store's lock, once ``_enter`` is done.

        May raise (``begin`` then undoes ``_enter``); may return a callable that ``begin`` calls once
        the lock is released (a warning to log: a handler may call back into the store).
        """
        return None

    def _closed(self, scope: Scope[S, T]) -> None:
        """Book ``scope`` as ended, under the store's lock, at its first ``end`` (before ``_exit``)."""

    def _after_fork_in_child(self) -> None:
        """Re-create locks and per-process bookkeeping in a forked child (one thread runs; see the class docstring)."""
        self._lock = threading.Lock()
        self._live = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} live={self.live()}>"


_fork_callbacks: list[Callable[[], Callable[[], object] | None]] = []
"""What :func:`at_fork_in_child` registered, in order: each gives the callback, or None once its object is gone."""


def at_fork_in_child(callback: Callable[[], object]) -> Callable[[], object]:
    """Run ``callback()`` in every child this process forks, once every store has re-made its locks; returns it.

    For what an instrumentation keeps per process (its locks, the prefix of the ids it makes up):
    ``os.register_at_fork(after_in_child=...)`` with three promises more. A bound method is held
    weakly and forgotten when its object dies, so registering keeps no object alive; callbacks run
    in the order they were registered; whatever one raises is logged at WARNING and the next one
    runs (``KeyboardInterrupt`` excepted).
    """
    if not callable(callback):
        raise TypeError(f"callback must be callable, got {callback!r}")
    if inspect.ismethod(callback):  # forgotten when its object dies, so registering in a loop keeps nothing
        _fork_callbacks.append(weakref.WeakMethod(callback, _forget_fork_callback))
    else:
        _fork_callbacks.append(lambda: callback)
    return callback


def _forget_fork_callback(ref: weakref.WeakMethod[Any]) -> None:
    with contextlib.suppress(ValueError):  # already dropped (a child's pass over the list, or never appended)
        _fork_callbacks.remove(ref)


def _after_fork_in_child() -> None:
    global _fork_epoch
    _fork_epoch += 1
    for store in list(_stores):
        try:
            store._after_fork_in_child()  # noqa: SLF001 - the hook StateStore defines in this module
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - a fork must never fail because of a store
            log_safely(_logger, logging.DEBUG, "%s: re-initialisation after fork failed", store.name, exc_info=True)
    for ref in list(_fork_callbacks):  # a copy: an object a callback lets die takes its entry out meanwhile
        callback = ref()
        if callback is None:  # its object is gone (its entry is on its way out)
            continue
        try:
            callback()
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - a fork must never fail because of a callback
            log_safely(_logger, logging.WARNING, "statebackends: fork callback %r failed in the child", callback,
                       exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
