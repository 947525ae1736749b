"""The conformance kit: check that a ``StateStore`` backend obeys the contract and isolates what it declares.

``check_backend(MyStore)`` returns the list of :class:`Failure` (empty when the
backend conforms): the contract rules every backend obeys (:data:`RULES`) and,
for every model in ``MyStore.isolates``, an observation that the backend
really isolates it. ``observe(MyStore, model)`` observes one model, declared or
not. For pytest, subclass :class:`BackendContract`::

    from statebackends.testing import BackendContract

    class TestMyStore(BackendContract):
        store_class = MyStore

which collects one test per rule and one per declared model. Every check
looks for exactly the invocation's own state while it is open, and None
(never an ended invocation's, never another one's) after it ended, with
other invocations open meanwhile (on other owners, in other threads, some
sharing its id). Whatever the backend raises (any ``BaseException``) or a
hang is reported as a :class:`Failure`; hostile code runs only in daemon
threads, never joined once hung, so a hung backend cannot keep the process
alive. This module
imports neither pytest nor anything beyond the standard library and
opentelemetry-api; ``GREENLETS`` is observed in a subprocess that
monkey-patches with gevent first (when gevent is importable).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import functools
import gc
import importlib
import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from ._store import Concurrency, Scope, StateStore

__all__ = ["RULES", "BackendContract", "Failure", "Observation", "check_backend", "check_rule", "observe"]

TIMEOUT = 10.0
"""Seconds any single wait of the kit lasts at most (a hang is reported, not waited out)."""

Make = Callable[[], StateStore[Any]]


@dataclasses.dataclass(frozen=True)
class Failure:
    """One broken promise: the backend, the rule or ``Concurrency`` value it breaks, and what was observed."""

    backend: str
    check: str
    observed: str

    def __str__(self) -> str:
        return f"{self.backend} breaks {self.check}: {self.observed}"


@dataclasses.dataclass(frozen=True)
class Observation:
    """What running a backend under one concurrency model showed: ``isolated``, else ``detail`` says how not."""

    model: Concurrency
    isolated: bool
    detail: str = ""


class _Owner:
    """An instrumented object: accepts attributes, like an agent instance."""


class _Problems(list[str]):
    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


class Seen(str, enum.Enum):
    """What a probe found where it asked a store for the current state: the outcomes the kit compares (their values
    are the words it reports; as ``str`` they compare equal to those words, which is how they come back from the
    greenlet subprocess, as JSON)."""

    NONE = "None"
    OWN = "its own state"
    ENDED = "an ended invocation's state"
    OTHER = "another invocation's state"

    def __str__(self) -> str:  # the words, on every Python (3.11 changed what a str mixin's members print)
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def _describe(seen: Any, own: Any, ended: Any = ()) -> Seen:
    if seen is None:
        return Seen.NONE
    if seen is own:
        return Seen.OWN
    if any(seen is e for e in ended):
        return Seen.ENDED
    return Seen.OTHER


class _Raised(Exception):
    """What the backend raised in a kit thread (any ``BaseException``), carried to the caller to be reported."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a fresh daemon thread (a fresh context, no running event loop).

    What it raised (any ``BaseException``) comes back wrapped in :class:`_Raised`;
    a hang raises ``TimeoutError`` and the thread is abandoned, never joined
    again (it is a daemon: the interpreter can still exit).
    """
    box: dict[str, Any] = {}
    timeout = 6 * TIMEOUT

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, name="statebackends-testing", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"did not finish within {timeout:.0f}s (hung)")
    if "error" in box:
        raise _Raised(box["error"])
    return box.get("result")


def _threads(n: int, body: Callable[[int], Any]) -> tuple[list[Any], list[BaseException]]:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = body(i)
        except BaseException as exc:  # noqa: BLE001 - reported as a problem
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(3 * TIMEOUT)
    if any(t.is_alive() for t in ts):
        errors.append(TimeoutError("a thread did not finish (hung)"))
    return results, errors


class _Worker:
    """A pool thread of one daemon thread: calls run there with nothing copied, one after the other.

    A call that hangs raises ``TimeoutError`` in the caller; the worker is
    abandoned, never joined (unlike a ``ThreadPoolExecutor``'s, whose workers
    are joined at exit), so a hung backend cannot keep the process alive.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="statebackends-testing-hop", daemon=True).start()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, box, done = job
            try:
                box["result"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            done.set()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        box: dict[str, Any] = {}
        done = threading.Event()
        self._jobs.put((fn, args, box, done))
        if not done.wait(TIMEOUT):
            raise TimeoutError(f"a call in another thread did not finish within {TIMEOUT:g}s (hung)")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def close(self) -> None:
        self._jobs.put(None)


def _raw_hop(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn`` in a fresh pool thread with nothing copied (as ``executor.submit`` does)."""
    worker = _Worker()
    try:
        return worker.call(fn, *args)
    finally:
        worker.close()


@contextmanager
def _bystander(store: StateStore[Any], invocation_id: Any = None) -> Iterator[Any]:
    """An invocation on another owner, open in another thread meanwhile: its state is never anyone else's answer.

    Yields its state; it has ended when the block is left.
    """
    owner, box = _Owner(), dict[str, Any]()
    opened, release, ended = threading.Event(), threading.Event(), threading.Event()

    def run() -> None:
        try:
            scope = store.begin(owner, invocation_id)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
            opened.set()
            return
        box["state"] = scope.state
        opened.set()
        release.wait(6 * TIMEOUT)
        try:
            store.end(scope)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
        finally:
            ended.set()

    threading.Thread(target=run, name="statebackends-testing-bystander", daemon=True).start()
    if not opened.wait(TIMEOUT):
        raise TimeoutError("an invocation begun in another thread did not begin (hung)")
    if "error" in box:
        raise box["error"]
    try:
        yield box["state"]
    finally:
        release.set()
        if not ended.wait(TIMEOUT):
            raise TimeoutError("an invocation ended in another thread did not end (hung)")
        if "error" in box:
            raise box["error"]


_LOST_OR_ANOTHERS = {Seen.NONE: "nothing", Seen.OTHER: "another's state"}
"""What ``_count`` reports of an open invocation that should see its own state."""


def _count(results: list[Any], what: str, index: int, messages: dict[Seen, str]) -> list[str]:
    out = []
    for value, text in messages.items():
        k = sum(1 for r in results if r is not None and r[index] == value)
        if k:
            out.append(f"{k} of {len(results)} {what} {text} ({value})")
    return out


# -- the contract rules ------------------------------------------------------------


def _rule_begin_current_end(make: Make) -> list[str]:
    p, store, owner = _Problems(), make(), _Owner()
    p.expect(store.current(owner) is None, "current() before any begin() is not None")
    scope = store.begin(owner)
    p.expect(isinstance(scope, Scope), f"begin() returned {scope!r}, not a Scope")
    p.expect(store.current(owner, scope.invocation_id) is scope.state,
             "current(owner, id) in the invocation is not its state")
    p.expect(store.current(owner) is scope.state, "current(owner) in the invocation is not its state")
    p.expect(store.live() in (1, None), f"live() is {store.live()!r} with one invocation open")
    with _bystander(store):
        store.end(scope)
        p.expect(scope.ended, "the scope is not marked ended after end()")
        seen = store.current(owner)
        p.expect(seen is None, f"current(owner) after end() is {_describe(seen, None, [scope.state])}, not None")
        seen = store.current(owner, scope.invocation_id)
        p.expect(seen is None, f"current(owner, id) after end() is {_describe(seen, None, [scope.state])}, not None")
    p.expect(store.live() in (0, None), f"live() is {store.live()!r} after end()")
    return p


def _rule_fresh_state_per_begin(make: Make) -> list[str]:
    p, store, owner = _Problems(), make(), _Owner()
    with store.invocation(owner) as first:
        pass
    with store.invocation(owner) as second:
        p.expect(second is not first, "a second begin() got the first invocation's state object again")
        p.expect(store.current(owner) is second, "current() in the second invocation is not its state")
    return p


def _rule_nesting(make: Make) -> list[str]:
    p, store, owner = _Problems(), make(), _Owner()
    outer = store.begin(owner)
    inner = store.begin(owner)
    p.expect(inner.state is not outer.state, "the nested begin() got the outer state")
    p.expect(store.current(owner) is inner.state, "current() in the nested invocation is "
             + _describe(store.current(owner), inner.state))
    store.end(inner)
    p.expect(store.current(owner) is outer.state, "after the nested end(), current() is "
             + _describe(store.current(owner), outer.state, [inner.state]) + ", not the outer state")
    store.end(outer)
    p.expect(store.current(owner) is None, "after both ends current() is not None")
    return p


def _rule_double_end(make: Make) -> list[str]:
    p, store, owner = _Problems(), make(), _Owner()
    scope = store.begin(owner)
    store.end(scope)
    with _bystander(store):
        store.end(scope)  # raising here is reported by the runner
        seen = store.current(owner)
    p.expect(seen is None, f"current() after a double end() is {_describe(seen, None, [scope.state])}, not None")
    p.expect(store.live() in (0, None), f"live() is {store.live()!r} after a double end() of one invocation")
    again = store.begin(owner)
    store.end(scope)
    p.expect(store.current(owner) is again.state, "a late third end() of an old invocation disturbed the open one")
    store.end(again)
    p.expect(store.live() in (0, None), f"live() is {store.live()!r} after all ends")
    return p


def _rule_end_from_another_thread(make: Make) -> list[str]:
    p, store, owner = _Problems(), make(), _Owner()
    scope = store.begin(owner)
    _, errors = _threads(1, lambda i: store.end(scope))
    p.expect(not errors, f"end() in another thread raised {errors[0]!r}" if errors else "")
    p.expect(store.live() in (0, None), f"live() is {store.live()!r} after the end() in another thread")
    with _bystander(store):
        seen = store.current(owner), store.current(owner, scope.invocation_id)
    p.expect(seen == (None, None), f"after the end() in another thread, the thread of begin() gets "
             f"{_describe(seen[0], None, [scope.state])} / with the id "
             f"{_describe(seen[1], None, [scope.state])}, not None")
    with store.invocation(owner) as state:
        p.expect(store.current(owner) is state, "a later invocation in the thread of begin() does not see its state")
    p.expect(store.current(owner) is None, "current() after the later invocation is not None")
    return p


def _rule_never_raise(make: Make) -> list[str]:
    p, store, owner = _Problems(), make(), _Owner()

    def attempt(what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - what the rule looks for
            p.append(f"{what} raised {type(exc).__name__}: {exc}")
            return None

    attempt("current(None)", store.current, None)
    attempt("current(owner, unknown id)", store.current, owner, f"no-such-id-{uuid.uuid4()}")
    scope = attempt("begin()", store.begin, owner)
    if scope is None:
        return p
    attempt("end() in an empty Context", contextvars.Context().run, store.end, scope)
    attempt("end() again in a copied context", contextvars.copy_context().run, store.end, scope)
    scope = attempt("begin() after an odd end()", store.begin, owner)
    if scope is not None:
        attempt("end() in a copy of the begin() context", contextvars.copy_context().run, store.end, scope)
        attempt("end() after that", store.end, scope)
    fn = attempt("propagate() outside any invocation", store.propagate, lambda: store.current(owner))
    if fn is not None:
        attempt("a propagated call outside any invocation", _raw_hop, fn)
    def churn(i: int) -> None:
        for _ in range(50):
            store.end(store.begin(owner))

    _, errors = _threads(2, churn)
    p.extend(f"begin()/end() in threads raised {e!r}" for e in errors)
    return p


def _rule_live_returns_to_zero(make: Make) -> list[str]:
    p, store = _Problems(), make()

    def call() -> None:
        owner = _Owner()
        with store.invocation(owner), store.invocation(owner):
            store.current(owner)

    def calls(i: int) -> None:
        for _ in range(25):
            call()

    _, errors = _threads(8, calls)
    p.extend(f"begin()/end() in threads raised {e!r}" for e in errors[:1])

    async def task() -> None:
        owner = _Owner()
        with store.invocation(owner):
            await asyncio.sleep(0)

    async def tasks() -> None:
        await asyncio.gather(*(task() for _ in range(20)))

    asyncio.run(tasks())
    p.expect(store.live() in (0, None), f"live() is {store.live()!r} after every invocation ended")
    return p


def _rule_no_ended_state_in_copied_context(make: Make) -> list[str]:
    p, store, owner = _Problems(), make(), _Owner()
    sid = f"ended-{uuid.uuid4()}"
    with _bystander(store, sid):  # open on another owner with the same id throughout
        scope = store.begin(owner, sid)
        ended = scope.state
        ctx = contextvars.copy_context()
        wrapped = store.propagate(lambda: (store.current(owner), store.current(owner, sid)))
        store.end(scope)

        def looks(where: str, seen: tuple[Any, ...]) -> None:
            p.expect(all(s is None for s in seen),
                     f"{where} after the invocation ended, current() gives {_describe(seen[0], None, [ended])}"
                     f" / with the id {_describe(seen[1], None, [ended])}, not None")

        looks("a context copied during the invocation and run in a pool",
              _raw_hop(ctx.run, lambda: (store.current(owner), store.current(owner, sid))))
        looks("a function wrapped by propagate() during the invocation", _raw_hop(wrapped))
        looks("a raw thread carrying the owner and id",
              _raw_hop(lambda: (store.current(owner), store.current(owner, sid))))

        async def main() -> tuple[Any, ...]:
            s = store.begin(owner, sid)

            async def later() -> tuple[Any, ...]:
                await asyncio.sleep(0)
                return store.current(owner), store.current(owner, sid)

            task = asyncio.ensure_future(later())  # runs in a copy of this context
            store.end(s)
            seen = await asyncio.wait_for(task, TIMEOUT)
            return tuple(_describe(x, None, [s.state]) for x in seen)

        seen = asyncio.run(main())
        p.expect(seen == (Seen.NONE, Seen.NONE), f"an asyncio task created during the invocation and running after it "
                 f"ended gets {seen[0]} / with the id {seen[1]}, not None")

        outer = store.begin(owner)
        inner = store.begin(owner)
        ctx = contextvars.copy_context()
        store.end(inner)
        seen_inner = _raw_hop(ctx.run, store.current, owner)
        p.expect(seen_inner is outer.state or seen_inner is None,
                 f"a context copied in a nested invocation gets {_describe(seen_inner, outer.state, [inner.state])} "
                 "after the nested one ended (the outer one is open)")
        store.end(outer)
        seen_outer = _raw_hop(ctx.run, store.current, owner)
        p.expect(seen_outer is None,
                 f"that copied context gives {_describe(seen_outer, None, [inner.state, outer.state])} "
                 "after both ended")
    return p


def _context_snapshot() -> dict[Any, Any]:
    return dict(contextvars.copy_context().items())


def _rule_ends_in_any_order(make: Make) -> list[str]:
    import itertools

    p, store, owner = _Problems(), make(), _Owner()
    before = _context_snapshot()
    with _bystander(store):  # open on another owner throughout: never anyone's answer here
        base = store.live()
        for order in itertools.permutations(range(3)):
            scopes = [store.begin(owner) for _ in range(3)]
            states = [s.state for s in scopes]
            open_ = [0, 1, 2]
            for i in order:
                store.end(scopes[i])
                open_.remove(i)
                want = states[open_[-1]] if open_ else None
                ended_states = [x for k, x in enumerate(states) if k not in open_]
                seen = store.current(owner)
                if seen is not want:
                    p.append(f"ending in order {order}: after ending #{i} current() is "
                             f"{_describe(seen, want, ended_states)}, "
                             "not the innermost open invocation's" + ("" if open_ else " (None)"))
                    break
                for j in range(3):
                    got = store.current(owner, scopes[j].invocation_id)
                    fine = (states[j], want) if j in open_ else (None, want)
                    if not any(got is x for x in fine):
                        p.append(f"ending in order {order}: after ending #{i}, current(owner, id of "
                                 f"{'open' if j in open_ else 'ended'} #{j}) gives "
                                 f"{_describe(got, states[j] if j in open_ else None, ended_states)}")
                        break
                if p:
                    break
            live = store.live()
            p.expect(live is None or live == base, f"live() is {live!r} after ending in order {order} "
                     f"(one invocation open elsewhere: {base!r})")
            refs = [weakref.ref(s) for s in scopes]
            del scopes, states
            gc.collect()
            alive = [r() for r in refs if r() is not None]
            holders = sorted({type(x).__name__ for scope in alive for x in gc.get_referrers(scope)})
            p.expect(not alive, f"after ending in order {order}, {len(alive)} ended scope(s) are still kept alive "
                     f"(by {holders})")
            del alive
            if p:
                break
    p.expect(store.live() in (0, None), f"live() is {store.live()!r} after every invocation ended")
    after, missing = _context_snapshot(), object()
    changed = [getattr(k, "name", repr(k)) for k in set(before) | set(after)
               if before.get(k, missing) is not after.get(k, missing)]
    p.expect(not changed, f"the caller's context is left changed after all ends (variables {sorted(changed)})")
    return p


def _rule_shared_id_same_context(make: Make) -> list[str]:
    p, store, owner = _Problems(), make(), _Owner()
    sid = f"shared-{uuid.uuid4()}"
    first = store.begin(owner, sid)
    p.expect(store.current(owner, sid) is first.state, "current(owner, id) in the first invocation is not its state")
    second = store.begin(owner, sid)
    seen = store.current(owner, sid)
    p.expect(seen is second.state,
             f"a nested invocation with the same id gets {_describe(seen, second.state, [first.state])}")
    store.end(second)
    seen = store.current(owner, sid)
    p.expect(seen is first.state,
             f"after it ended, the same id gives {_describe(seen, first.state, [second.state])}, not the outer state")
    with _bystander(store, sid):  # the same id, open on another owner in another thread
        store.end(first)
        seen = store.current(owner, sid)
        p.expect(seen is None, f"after both ended the id gives {_describe(seen, None, [first.state, second.state])}")
        with store.invocation(owner, sid) as again:
            p.expect(store.current(owner, sid) is again, "the id reused by a later invocation does not give its state")
    p.expect(store.live() in (0, None), f"live() is {store.live()!r} after all ends")
    return p


RULES: dict[str, Callable[[Make], list[str]]] = {
    "begin_current_end": _rule_begin_current_end,
    "fresh_state_per_begin": _rule_fresh_state_per_begin,
    "nesting": _rule_nesting,
    "double_end": _rule_double_end,
    "end_from_another_thread": _rule_end_from_another_thread,
    "never_raise": _rule_never_raise,
    "live_returns_to_zero": _rule_live_returns_to_zero,
    "no_ended_state_in_copied_context": _rule_no_ended_state_in_copied_context,
    "ends_in_any_order": _rule_ends_in_any_order,
    "shared_id_same_context": _rule_shared_id_same_context,
}
"""Every contract rule, by name: each returns what it saw go wrong (empty when the backend obeys)."""


# -- the concurrency models, observed ----------------------------------------------


def _observe_threads(make: Make, n: int = 4, shared_id: str | None = None) -> list[str]:
    store, owner = make(), _Owner()
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    done = [threading.Event() for _ in range(n)]

    def call(i: int) -> tuple[str, str, str, str]:
        try:
            return look(i)
        except BaseException:
            barrier.abort()  # the others fail fast instead of waiting for this one
            for event in done:
                event.set()
            raise

    def look(i: int) -> tuple[str, str, str, str]:
        scope = store.begin(owner, shared_id)
        barrier.wait()
        with_id = store.current(owner, scope.invocation_id)
        without = store.current(owner)
        barrier.wait()
        if i and not done[i - 1].wait(TIMEOUT):  # one end at a time: the later threads are still open
            raise TimeoutError("the previous thread did not end (hung)")
        store.end(scope)
        # its own thread, after its end, the others open: never another's state (by the id too, unless shared)
        own = store.current(owner)
        if own is None and not shared_id:  # `is None`, not falsiness: the states of a dict factory are all {}
            own = store.current(owner, scope.invocation_id)
        done[i].set()
        barrier.wait()
        after = store.current(owner, scope.invocation_id)
        return (_describe(with_id, scope.state), _describe(without, scope.state),
                _describe(own, None, [scope.state]), _describe(after, None))

    results, errors = _threads(n, call)
    out = [f"a thread raised {e!r}" for e in errors[:1]]
    out += _count(results, "threads got, with current(owner, id),", 0, _LOST_OR_ANOTHERS)
    out += _count(results, "threads got, with current(owner),", 1, _LOST_OR_ANOTHERS)
    out += _count(results, "threads got, right after their own end (others open),", 2,
                  {Seen.ENDED: "the ended state", Seen.OTHER: "another's state"})
    out += _count(results, "threads got, after all ended,", 3, {Seen.OTHER: "a state"})
    if store.current(owner) is not None:
        out.append("a state is left behind after every thread ended")
    if store.live() not in (0, None):
        out.append(f"live() is {store.live()!r} after every thread ended")
    return out


def _observe_async_tasks(make: Make, n: int = 4) -> list[str]:
    """Tasks on one owner (the first two sharing an id), each with late work: a task created during it, run after it
    ended."""
    store, owner, sid = make(), _Owner(), f"shared-{uuid.uuid4()}"

    async def call(i: int, gate: asyncio.Event, started: list[int], done: list[asyncio.Event]) -> tuple[str, ...]:
        scope = store.begin(owner, sid if i < 2 else None)
        started.append(1)
        if len(started) == n:
            gate.set()
        await asyncio.wait_for(gate.wait(), TIMEOUT)
        ended = asyncio.Event()

        async def late_work() -> tuple[Any, Any]:
            await ended.wait()
            return store.current(owner), store.current(owner, scope.invocation_id)

        late = asyncio.ensure_future(late_work())  # created during the invocation: a copy of its context
        await asyncio.sleep(0)  # it starts (and waits for the end)
        without = store.current(owner)
        await asyncio.sleep(0)
        with_id = store.current(owner, scope.invocation_id)
        if i:
            await asyncio.wait_for(done[i - 1].wait(), TIMEOUT)  # one end at a time: the later tasks are open
        store.end(scope)
        after = store.current(owner)
        ended.set()
        late_seen = await asyncio.wait_for(late, TIMEOUT)  # runs while the later tasks are still open
        done[i].set()
        return (_describe(without, scope.state), _describe(with_id, scope.state), _describe(after, None),
                _describe(late_seen[0], None, [scope.state]), _describe(late_seen[1], None, [scope.state]))

    async def main() -> list[tuple[str, ...]]:
        gate, started, done = asyncio.Event(), list[int](), [asyncio.Event() for _ in range(n)]
        return list(await asyncio.gather(*(call(i, gate, started, done) for i in range(n))))

    results = asyncio.run(main())
    late = {Seen.ENDED: "the ended state", Seen.OTHER: "another's state"}
    out = _count(results, "tasks got, with current(owner),", 0, _LOST_OR_ANOTHERS)
    out += _count(results, "tasks got, with current(owner, id),", 1, _LOST_OR_ANOTHERS)
    out += _count(results, "tasks got, right after their own end,", 2, {Seen.OTHER: "a state"})
    out += _count(results, "tasks created during an invocation and run after it ended (others open) got", 3, late)
    out += _count(results, "tasks created during an invocation and run after it ended (others open) got, "
                  "with the id,", 4, late)
    if store.live() not in (0, None):
        out.append(f"live() is {store.live()!r} after every task ended")
    return out


def _observe_copied_context(make: Make) -> list[str]:
    p, store, owner, other = _Problems(), make(), _Owner(), _Owner()
    with _bystander(store):
        with store.invocation(owner) as state:
            ctx = contextvars.copy_context()

            def job() -> tuple[Any, Any, Any]:
                seen = store.current(owner)
                with store.invocation(other) as nested:
                    inside = store.current(other) is nested
                return seen, inside, store.current(owner)

            seen, inside, back = _raw_hop(ctx.run, job)
        left = store.current(owner)
    p.expect(seen is state, f"a pool job run through a context copy gets {_describe(seen, state)}")
    p.expect(inside, "an invocation nested in that job does not see its own state")
    p.expect(back is state, f"after the nested invocation the job gets {_describe(back, state)}")
    p.expect(left is None, f"after the invocation ended, current() gives {_describe(left, None, [state])}")
    return p


def _observe_late_work(make: Make) -> list[str]:
    """Late work of an ended invocation, run on its own thread while the next one (same owner, same id) is open, then
    while another owner's is, then of an ended nested one while a sibling is open: never the open one's state."""
    p, store, owner, other = _Problems(), make(), _Owner(), _Owner()
    sid = f"late-{uuid.uuid4()}"
    with _bystander(store, sid):  # the same id, open on another owner in another thread throughout
        ended = store.begin(owner, sid)
        late = contextvars.copy_context()  # e.g. a callback registered during the call, run after it
        store.end(ended)

        def looks(where: str) -> None:
            seen = late.run(lambda: (store.current(owner), store.current(owner, sid)))
            p.expect(all(s is None for s in seen),
                     f"late work of an ended invocation, run on its thread while {where} is open there, gets "
                     f"{_describe(seen[0], None, [ended.state])} / with the id "
                     f"{_describe(seen[1], None, [ended.state])}, not None")

        scope = store.begin(owner, sid)
        looks("the next invocation on its owner, with its id,")
        store.end(scope)
        scope = store.begin(other)
        looks("another owner's invocation")
        store.end(scope)
        outer = store.begin(owner)
        inner = store.begin(owner)
        late_inner = contextvars.copy_context()
        store.end(inner)
        sibling = store.begin(owner)
        seen = late_inner.run(store.current, owner)
        p.expect(seen is outer.state or seen is None,
                 f"late work of an ended nested invocation, run while a sibling nested one is open, gets "
                 f"{_describe(seen, outer.state, [inner.state])}, not the outer state")
        store.end(sibling)
        store.end(outer)
    return p


def _observe_raw_thread(make: Make) -> list[str]:
    store = make()
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    done = threading.Event()

    def call(i: int) -> tuple[str, str, str]:
        try:
            return look(i)
        except BaseException:
            barrier.abort()  # the other fails fast instead of waiting for this one
            done.set()
            raise

    def look(i: int) -> tuple[str, str, str]:
        owner = _Owner()
        scope = store.begin(owner)
        barrier.wait()
        seen = _raw_hop(store.current, owner, scope.invocation_id)
        barrier.wait()
        if i and not done.wait(TIMEOUT):  # the first ends and looks while the second is still open
            raise TimeoutError("the other thread did not end (hung)")
        store.end(scope)
        after = _raw_hop(store.current, owner, scope.invocation_id)
        after_owner = _raw_hop(store.current, owner)
        done.set()
        return (_describe(seen, scope.state), _describe(after, None, [scope.state]),
                _describe(after_owner, None, [scope.state]))

    with _bystander(store):  # a third invocation open on another owner throughout
        results, errors = _threads(2, call)
    out = [f"a thread raised {e!r}" for e in errors[:1]]
    after = {Seen.ENDED: "the ended state", Seen.OTHER: "another's state"}
    out += _count(results, "raw hops (owner and id carried) got", 0, _LOST_OR_ANOTHERS)
    out += _count(results, "raw hops (owner and id carried) after the end got", 1, after)
    out += _count(results, "raw hops (owner carried) after the end got", 2, after)
    return out


def _nothing() -> None:
    """A job that does nothing (run through ``propagate`` to see what it leaves behind)."""


def _observe_propagate(make: Make) -> list[str]:
    p, store, parent, child = _Problems(), make(), _Owner(), _Owner()
    scope = store.begin(parent)

    def run_child() -> tuple[Any, bool, Any]:
        before = store.current(child)
        with store.invocation(child) as child_state:
            inside = store.current(child) is child_state
        return before, inside, store.current(child)

    before, inside, back = _raw_hop(store.propagate(run_child))
    p.expect(before is scope.state, f"in a raw hop wrapped by propagate(), a subagent (another owner) gets "
             f"{_describe(before, scope.state)} before its own begin(), not its parent's")
    p.expect(inside, "the subagent's invocation there does not see its own state")
    p.expect(back is scope.state, f"after the subagent ended the hop gets {_describe(back, scope.state)}")
    seen = _raw_hop(store.propagate(functools.partial(store.current, parent)))
    p.expect(seen is scope.state, f"a propagated call gets {_describe(seen, scope.state)} on the parent owner")
    with _bystander(store):
        store.end(scope)
        worker = _Worker()
        try:
            worker.call(store.propagate(_nothing))
            left = worker.call(store.current, parent, scope.invocation_id)
        finally:
            worker.close()
    p.expect(left is None, f"the pool thread gets {_describe(left, None, [scope.state])} after the propagated call "
             "and the invocation ended")
    return p


def _observe_nested(make: Make) -> list[str]:
    p, store, owner = _Problems(), make(), _Owner()
    outer = store.begin(owner)
    inner = store.begin(owner)
    p.expect(store.current(owner) is inner.state, "the nested invocation does not see its own state")
    p.expect(store.current(owner, inner.invocation_id) is inner.state,
             "current(owner, id) in the nested invocation is not its state")
    store.end(inner)
    seen = store.current(owner)
    p.expect(seen is outer.state,
             f"after the nested end the outer invocation gets {_describe(seen, outer.state, [inner.state])}")
    seen = store.current(owner, outer.invocation_id)
    p.expect(seen is outer.state,
             f"with its id, the outer invocation gets {_describe(seen, outer.state, [inner.state])}")
    with _bystander(store):
        store.end(outer)
        left = store.current(owner)
    p.expect(left is None, f"after both ended current() gives {_describe(left, None, [inner.state, outer.state])}")
    return p


def _observe_shared_id(make: Make) -> list[str]:
    return _observe_threads(make, n=2, shared_id=f"shared-{uuid.uuid4()}")


def _observe_shared_id_raw_thread(make: Make) -> list[str]:
    store, owner, sid = make(), _Owner(), f"shared-{uuid.uuid4()}"
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    def call(i: int) -> tuple[str]:
        scope = store.begin(owner, sid)
        barrier.wait()
        seen = _raw_hop(store.current, owner, sid)
        barrier.wait()
        store.end(scope)
        return (_describe(seen, scope.state),)

    results, errors = _threads(2, call)
    out = [f"a thread raised {e!r}" for e in errors[:1]]
    out += _count(results, "raw hops carrying only the shared id got", 0,
                  {Seen.NONE: "nothing (the state is lost)", Seen.OTHER: "another's state"})
    return out


_GREENLET_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import importlib, json, sys

def load(path):
    module, _, qualname = path.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj

spec = json.loads(sys.argv[1])
store_class, factory = load(spec["store_class"]), load(spec["factory"])
from statebackends.testing import _greenlet_problems
print(json.dumps(_greenlet_problems(lambda: store_class(factory, **spec["kwargs"]))))
"""


def _greenlet_problems(make: Make, n: int = 4) -> list[str]:
    """Run in a monkey-patched process: greenlets on one owner, each spawning one during its invocation."""
    import gevent
    import gevent.event

    store, owner = make(), _Owner()
    started: list[int] = []

    def call() -> tuple[str, str, str, str]:
        scope = store.begin(owner)
        sid = scope.invocation_id
        started.append(1)
        while len(started) < n:
            gevent.sleep(0)
        mine = store.current(owner, sid)
        spawned = gevent.spawn(store.current, owner, sid).get(timeout=TIMEOUT)
        gevent.sleep(0)
        done = gevent.event.Event()
        late = gevent.spawn(lambda: (done.wait(TIMEOUT), store.current(owner, sid))[1])
        store.end(scope)
        done.set()
        after = late.get(timeout=TIMEOUT)
        return (_describe(mine, scope.state), _describe(spawned, scope.state),
                _describe(after, None, [scope.state]), _describe(store.current(owner, sid), None, [scope.state]))

    greenlets = [gevent.spawn(call) for _ in range(n)]
    gevent.joinall(greenlets, timeout=3 * TIMEOUT)
    results = [g.value for g in greenlets]
    out = [f"a greenlet raised {g.exception!r}" for g in greenlets if g.exception is not None][:1]
    if any(not g.ready() for g in greenlets):
        out.append("a greenlet did not finish (hung)")
    out += _count(results, "greenlets got, with current(owner, id),", 0, _LOST_OR_ANOTHERS)
    out += _count(results, "greenlets spawned during an invocation (owner and id handed over) got", 1,
                  _LOST_OR_ANOTHERS)
    out += _count(results, "greenlets spawned during an invocation and running after it ended got", 2,
                  {Seen.ENDED: "the ended state", Seen.OTHER: "a state"})
    out += _count(results, "greenlets got after their own end", 3, {Seen.ENDED: "the ended state"})
    if store.live() not in (0, None):
        out.append(f"live() is {store.live()!r} after every greenlet ended")
    return out


def _gevent_available() -> bool:
    return importlib.util.find_spec("gevent") is not None


def _import_path(obj: Any) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    return f"{module}:{qualname}"


def _observe_greenlets_in_subprocess(
    store_class: type, factory: Callable[[], Any], kwargs: dict[str, Any]
) -> list[str]:
    if not _gevent_available():
        return ["could not be observed: gevent is not installed (pip install gevent)"]
    cls_path = _import_path(store_class)
    if cls_path is None:
        return [f"could not be observed: {store_class!r} cannot be imported by name in a subprocess"]
    try:
        spec = json.dumps(
            {"store_class": cls_path, "factory": _import_path(factory) or "builtins:dict", "kwargs": kwargs}
        )
    except TypeError as exc:
        return [f"could not be observed: the store's keyword arguments are not JSON ({exc})"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)
    try:
        proc = subprocess.run([sys.executable, "-c", _GREENLET_SCRIPT, spec], capture_output=True, text=True,
                              timeout=6 * TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return [f"the gevent subprocess did not finish within {6 * TIMEOUT:.0f}s (hung)"]
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"could not be observed: the gevent subprocess failed ({tail})"]
    return list(json.loads(lines[-1]))


_OBSERVERS: dict[Concurrency, Callable[[Make], list[str]]] = {
    Concurrency.THREADS: _observe_threads,
    Concurrency.ASYNC_TASKS: _observe_async_tasks,
    Concurrency.COPIED_CONTEXT: _observe_copied_context,
    Concurrency.LATE_WORK: _observe_late_work,
    Concurrency.RAW_THREAD: _observe_raw_thread,
    Concurrency.PROPAGATE: _observe_propagate,
    Concurrency.NESTED: _observe_nested,
    Concurrency.SHARED_ID: _observe_shared_id,
    Concurrency.SHARED_ID_RAW_THREAD: _observe_shared_id_raw_thread,
}


# -- the public entry points -------------------------------------------------------


def _backend_name(store_class: type) -> str:
    return getattr(store_class, "name", "") or getattr(store_class, "__qualname__", repr(store_class))


def _run(body: Callable[[], list[str]]) -> list[str]:
    """The body's problems; what the backend raised (any ``BaseException``) or a hang is one problem, reported."""
    try:
        return list(_in_thread(body))
    except _Raised as raised:  # raised in the kit's thread: the backend's doing, reported whatever it is
        return [f"raised {type(raised.exc).__name__}: {raised.exc}"]
    except TimeoutError as exc:
        return [f"raised TimeoutError: {exc}"]


def observe(
    store_class: type[StateStore[Any]], model: Concurrency, factory: Callable[[], Any] = dict, **store_kwargs: Any
) -> Observation:
    """Run ``store_class`` under ``model`` (declared or not) and report whether it isolated it."""
    model = Concurrency(model)
    if model is Concurrency.GREENLETS:
        problems = _observe_greenlets_in_subprocess(store_class, factory, store_kwargs)
    else:
        observer = _OBSERVERS[model]
        problems = _run(lambda: observer(lambda: store_class(factory, **store_kwargs)))
    return Observation(model, not problems, "; ".join(problems))


def check_rule(
    store_class: type[StateStore[Any]], rule: str, factory: Callable[[], Any] = dict, **store_kwargs: Any
) -> list[Failure]:
    """The failures of one contract rule (a name in :data:`RULES`)."""
    body = RULES[rule]
    problems = _run(lambda: body(lambda: store_class(factory, **store_kwargs)))
    return [Failure(_backend_name(store_class), rule, problem) for problem in problems]


def check_model(
    store_class: type[StateStore[Any]], model: Concurrency, factory: Callable[[], Any] = dict, **store_kwargs: Any
) -> list[Failure]:
    """A failure if ``store_class`` claims ``model`` (in ``isolates``) but is not observed to isolate it."""
    if model not in getattr(store_class, "isolates", ()):
        return []
    seen = observe(store_class, model, factory, **store_kwargs)
    if seen.isolated:
        return []
    return [Failure(_backend_name(store_class), model.value,
                    f"claims to isolate {model.value} ({model.description}) but {seen.detail}")]


def _sorted_models(models: Any) -> list[Concurrency]:
    order = list(Concurrency)
    return sorted(models, key=order.index)


def _declaration(store_class: type[StateStore[Any]]) -> tuple[list[Concurrency], str | None]:
    """(the ``Concurrency`` members ``store_class.isolates`` declares, in order; what is wrong with it, or None)."""
    declared: object = getattr(store_class, "isolates", frozenset())
    if not isinstance(declared, (set, frozenset)):
        return [], f"isolates must be a frozenset of Concurrency members, got {declared!r}"
    bad = [m for m in declared if not isinstance(m, Concurrency)]
    models = _sorted_models(m for m in declared if isinstance(m, Concurrency))
    if bad:
        valid = ", ".join(f"Concurrency.{m.name}" for m in Concurrency)
        return models, f"isolates holds {bad!r}, which are not Concurrency members; valid: {valid}"
    return models, None


def check_backend(
    store_class: type[StateStore[Any]], factory: Callable[[], Any] = dict, **store_kwargs: Any
) -> list[Failure]:
    """Every failure of ``store_class``: the contract rules, then each declared model observed; empty when it
    conforms."""
    failures: list[Failure] = []
    models, wrong = _declaration(store_class)
    if wrong is not None:
        failures.append(Failure(_backend_name(store_class), "declaration", wrong))
    for rule in RULES:
        failures += check_rule(store_class, rule, factory, **store_kwargs)
    for model in models:
        failures += check_model(store_class, model, factory, **store_kwargs)
    return failures


class BackendContract:
    """A pytest base class: one test per contract rule and one per model the backend declares.

    Set ``store_class`` (and, if needed, ``factory`` and ``store_kwargs``)::

        class TestMyStore(BackendContract):
            store_class = MyStore

    Each test fails with the :class:`Failure` messages. Importing this class
    does not import pytest.
    """

    store_class: ClassVar[type[StateStore[Any]] | None] = None
    factory: ClassVar[Callable[[], Any]] = dict
    store_kwargs: ClassVar[dict[str, Any]] = {}

    @classmethod
    def contract_rules(cls) -> list[str]:
        return list(RULES)

    @classmethod
    def declared_models(cls) -> list[Concurrency]:
        """The :class:`Concurrency` members in ``store_class.isolates`` (anything else fails the declaration test)."""
        return [] if cls.store_class is None else _declaration(cls.store_class)[0]

    def pytest_generate_tests(self, metafunc: Any) -> None:
        cls = metafunc.cls
        if metafunc.function.__name__ == "test_contract_rule":
            metafunc.parametrize("rule", cls.contract_rules(), ids=str)
        elif metafunc.function.__name__ == "test_declared_isolation":
            models: list[Concurrency | None] = list(cls.declared_models()) or [None]
            metafunc.parametrize("model", models, ids=lambda m: m.value if m else "nothing_declared")

    def _store_class(self) -> type[StateStore[Any]]:
        cls = type(self).store_class
        if cls is None:
            raise AssertionError(f"{type(self).__name__} must set store_class to the backend under test")
        return cls

    def test_contract_rule(self, rule: str) -> None:
        failures = check_rule(self._store_class(), rule, type(self).factory, **type(self).store_kwargs)
        assert not failures, "\n".join(map(str, failures))

    def test_declaration(self) -> None:
        """``isolates`` is a (frozen)set of :class:`Concurrency` members: anything else is named, with the valid
        values."""
        wrong = _declaration(self._store_class())[1]
        assert wrong is None, f"{self._store_class().__name__}.{wrong}"

    def test_declared_isolation(self, model: Concurrency | None) -> None:
        if model is None:  # nothing declared: then nothing may be declared in a form the kit cannot read either
            wrong = _declaration(self._store_class())[1]
            assert wrong is None, f"{self._store_class().__name__}.{wrong}"
            return
        failures = check_model(self._store_class(), model, type(self).factory, **type(self).store_kwargs)
        assert not failures, "\n".join(map(str, failures))
