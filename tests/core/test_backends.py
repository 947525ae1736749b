"""Each backend's own promises and policies, and its known failures asserted as failures."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry import context as otel_context

from statebackends import Scope, StateStore, get_store, log_safely
from statebackends.contextvar import ContextVarStore
from statebackends.invocation_id import DEFAULT_MAX_ENTRIES, ENV_MAX_ENTRIES, InvocationIdStore

BUILTINS = ["contextvar", "instance", "invocation_id", "otel_context", "threadlocal"]


class Owner:
    pass


class Fatal(BaseException):
    """What a broken handler or backend may raise beyond ``Exception`` (a custom ``BaseException`` subclass)."""


def raw_hop(fn: Any, *args: Any) -> Any:
    with ThreadPoolExecutor(1) as pool:  # executor.submit copies no context
        return pool.submit(fn, *args).result(10)


@contextlib.contextmanager
def open_elsewhere(store: StateStore[Any], owner: Any, invocation_id: Any) -> Iterator[Any]:
    """An invocation of ``owner`` held open in another thread for the block; yields its state."""
    opened, release = threading.Event(), threading.Event()
    states: list[Any] = []

    def turn() -> None:
        with store.invocation(owner, invocation_id) as state:
            states.append(state)
            opened.set()
            release.wait(10)

    t = threading.Thread(target=turn)
    t.start()
    assert opened.wait(10)
    try:
        yield states[0]
    finally:
        release.set()
        t.join(10)


def run_threads(*targets: Any) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    [t.start() for t in threads]
    [t.join(20) for t in threads]
    assert not any(t.is_alive() for t in threads)


# -- no ended state, in any context ------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_ended_state_is_never_handed_to_a_context_copied_during_the_call(name: str) -> None:
    store = get_store(name, dict)
    owner = Owner()
    scope = store.begin(owner)
    copied = contextvars.copy_context()
    store.end(scope)
    assert raw_hop(copied.run, store.current, owner) is None
    assert raw_hop(copied.run, store.current, owner, scope.invocation_id) is None

    async def main() -> Any:
        s = store.begin(owner)

        async def job_started_during_the_call() -> Any:
            await asyncio.sleep(0)
            return store.current(owner)

        task = asyncio.ensure_future(job_started_during_the_call())
        store.end(s)
        return await task

    assert asyncio.run(main()) is None


@pytest.mark.parametrize("name", BUILTINS)
def test_late_work_run_where_the_next_call_is_open_gets_none_exactly_where_late_work_is_declared(name: str) -> None:
    """A copy made during turn A, run on A's thread after A ended while turn B (same owner, same id) is open:
    ``None`` where the backend declares ``LATE_WORK``; B's state (known-bad, asserted as bad) on ``threadlocal``
    and ``instance``, whose slot is the thread's or the owner's, not the context's."""
    from statebackends import Concurrency

    store = get_store(name, dict)
    owner = Owner()
    a = store.begin(owner, "session")
    late = contextvars.copy_context()
    store.end(a)
    b = store.begin(owner, "session")
    seen = late.run(lambda: (store.current(owner), store.current(owner, "session")))
    store.end(b)
    if Concurrency.LATE_WORK in type(store).isolates:
        assert seen == (None, None)
    else:
        assert name in ("threadlocal", "instance") and all(s is b.state for s in seen)


@pytest.mark.parametrize("name", ["contextvar", "otel_context", "invocation_id"])
def test_a_copy_made_in_a_nested_call_falls_back_to_the_open_outer_call(name: str) -> None:
    store = get_store(name, dict)
    owner = Owner()
    outer = store.begin(owner)
    inner = store.begin(owner)
    copied = contextvars.copy_context()
    store.end(inner)
    assert raw_hop(copied.run, store.current, owner) is outer.state
    store.end(outer)
    assert raw_hop(copied.run, store.current, owner) is None


@pytest.mark.parametrize("name", BUILTINS)
def test_ends_in_any_order_restore_nothing_that_ended(name: str) -> None:
    def body() -> None:
        store = get_store(name, dict)
        owner = Owner()
        before = dict(contextvars.copy_context().items())
        otel_before = otel_context.get_current()
        a = store.begin(owner)
        b = store.begin(owner)
        store.end(a)
        assert store.current(owner) is b.state
        store.end(b)
        assert store.current(owner) is None
        assert store.live() == 0
        assert dict(contextvars.copy_context().items()) == before
        assert otel_context.get_current() is otel_before
        assert not any(isinstance(v, Scope) for v in vars(owner).values())

    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _record(errors, body), daemon=True)  # a fresh context
    t.start()
    t.join(10)
    assert not t.is_alive(), "hung"
    assert not errors, errors


def _record(errors: list[BaseException], fn: Any) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)


@pytest.mark.parametrize("name", BUILTINS)
def test_double_end_is_logged_at_debug(name: str, caplog: pytest.LogCaptureFixture) -> None:
    store = get_store(name, dict)
    scope = store.begin(Owner())
    store.end(scope)
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        store.end(scope)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "already ended" in caplog.records[0].getMessage()
    assert store.live() == 0


def test_contextvar_end_in_another_context_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    store = get_store("contextvar", dict)
    owner = Owner()
    scope = store.begin(owner)
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        contextvars.Context().run(store.end, scope)
    assert any("outside its context" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert store.current(owner) is None and store.live() == 0
    with store.invocation(owner):  # the next end here unwinds the ended scope too
        pass
    assert store._var.get().state is None


def test_otel_context_end_out_of_order_does_not_detach_someone_elses_context(caplog: pytest.LogCaptureFixture) -> None:
    store = get_store("otel_context", dict)
    original = otel_context.get_current()
    owner = Owner()
    scope = store.begin(owner)
    foreign = otel_context.attach(otel_context.set_value("foreign", 1))
    with caplog.at_level(logging.DEBUG):
        store.end(scope)
        assert otel_context.get_value("foreign") == 1, "the foreign attach is untouched"
        assert store.current(owner) is None
        otel_context.detach(foreign)
        assert store.current(owner) is None
        with store.invocation(owner):  # unwinds the ended scope it uncovers
            pass
        # an end in a copy of the attaching context is skipped, not a failed detach
        other = store.begin(owner)
        contextvars.copy_context().run(store.end, other)
        assert store.current(owner) is None
        with store.invocation(owner):
            pass
    assert otel_context.get_current() is original
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "no 'Failed to detach context'"


def test_threadlocal_end_from_another_thread_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    store = get_store("threadlocal", dict)
    owner = Owner()
    scope = store.begin(owner)
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        run_threads(lambda: store.end(scope))
    assert any("in another thread" in r.getMessage() for r in caplog.records)
    assert store.live() == 0 and store.current(owner) is None


def test_instance_backend_still_cross_talks_between_two_overlapping_threads() -> None:
    """The legacy bug, shown (not declared isolated): the first call reads the second's state; nothing is left after."""
    store = get_store("instance", dict)
    owner = Owner()
    first_open, second_open, first_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def first() -> None:
        scope = store.begin(owner)
        scope.state["who"] = "first"
        first_open.set()
        second_open.wait(5)
        seen["first"] = store.current(owner)
        store.end(scope)
        first_done.set()

    def second() -> None:
        first_open.wait(5)
        scope = store.begin(owner)
        scope.state["who"] = "second"
        second_open.set()
        first_done.wait(5)
        seen["second"] = store.current(owner)
        store.end(scope)

    run_threads(first, second)
    assert seen["first"] == {"who": "second"}, "the first call reads the second call's state"
    assert seen["second"] == {"who": "second"}, "the first call's end no longer removes the second's state"
    assert store.current(owner) is None, "no finished call's state is left on the owner"


# -- begin and end: nothing half-done, never raising -----------------------------------


class EnterFails(ContextVarStore):
    name = "enter_fails"

    def _enter(self, scope: Scope) -> Any:
        raise OSError("cannot enter")


def test_begin_whose_enter_raises_leaves_nothing_half_done() -> None:
    store = EnterFails(dict)
    with pytest.raises(OSError, match="cannot enter"):
        store.begin(Owner())
    assert store.live() == 0 and store.current(Owner()) is None


def test_begin_whose_opened_hook_raises_undoes_enter_and_counts_nothing() -> None:
    """The bookkeeping hook runs after ``_enter``: if it raises, ``begin`` undoes ``_enter`` before re-raising."""

    class IndexFails(InvocationIdStore[Any]):
        def _opened(self, scope: Scope[Any, Any]) -> Any:
            raise MemoryError("no room in the index")

    store = IndexFails(dict)
    owner = Owner()
    before = dict(contextvars.copy_context().items())
    with pytest.raises(MemoryError):
        store.begin(owner, "x")
    assert store.live() == 0 and store.current(owner) is None and store.current(owner, "x") is None
    assert dict(contextvars.copy_context().items()) == before and not store._open and store._by_id == {}


def test_invocation_id_begin_with_an_unhashable_id_leaves_nothing_behind() -> None:
    store = InvocationIdStore(dict)
    with pytest.raises(TypeError):
        store.begin(Owner(), invocation_id=["unhashable"])  # type: ignore[arg-type]
    assert store.live() == 0 and store._open == {} and store._by_id == {}
    assert store.current(Owner()) is None


@pytest.mark.parametrize("exc", [OSError, GeneratorExit, SystemExit, Fatal], ids=lambda e: e.__name__)
def test_end_whose_exit_raises_is_logged_not_raised(exc: type[BaseException], caplog: pytest.LogCaptureFixture) -> None:
    class ExitFails(ContextVarStore[Any]):
        def _exit(self, scope: Scope[Any]) -> None:
            super()._exit(scope)
            raise exc("cannot exit")

    store = ExitFails(dict)
    scope = store.begin(Owner())
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        store.end(scope)
    assert store.live() == 0 and store.current(Owner()) is None
    assert any("could not undo" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_end_lets_a_keyboard_interrupt_through() -> None:
    """The one thing the core never swallows: the user's Ctrl-C, wherever it lands."""

    class Interrupted(ContextVarStore[Any]):
        def _exit(self, scope: Scope[Any]) -> None:
            super()._exit(scope)
            raise KeyboardInterrupt

    store = Interrupted(dict)
    with pytest.raises(KeyboardInterrupt):
        store.end(store.begin(Owner()))
    assert store.live() == 0


def test_log_safely_drops_what_a_handler_raises_but_a_keyboard_interrupt(raising_handler: Any) -> None:
    logger = logging.getLogger("statebackends.test")
    log_safely(logger, logging.ERROR, "a message %s", "arg", exc_info=True)  # raising here fails the test
    raising_handler.exc = KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        log_safely(logger, logging.ERROR, "a message")


# -- invocation_id: shared ids ---------------------------------------------------------


def test_shared_id_in_overlapping_threads_each_sees_its_own_state() -> None:
    store = InvocationIdStore(dict)
    owner = Owner()
    barrier = threading.Barrier(2, timeout=10)
    ok: list[bool] = []

    def turn(name: str) -> None:
        scope = store.begin(owner, "session-1")  # a front end reuses the session id as task id
        scope.state["who"] = name
        barrier.wait()
        ok.append(store.current(owner, "session-1") is scope.state and store.current(owner) is scope.state)
        barrier.wait()
        store.end(scope)

    run_threads(lambda: turn("a"), lambda: turn("b"))
    assert ok == [True, True]
    assert store.live() == 0 and store._by_id == {} and not store._open
    assert raw_hop(store.current, owner, "session-1") is None


@pytest.mark.parametrize("first_to_end", [0, 1])
def test_shared_id_in_overlapping_tasks_each_sees_its_own_state_and_nothing_survives(first_to_end: int) -> None:
    store = InvocationIdStore(dict)
    owner = Owner()

    async def main() -> list[bool]:
        gate = asyncio.Event()
        ends = [asyncio.Event(), asyncio.Event()]

        async def turn(i: int) -> bool:
            scope = store.begin(owner, "session-1")
            if i == 1:
                gate.set()
            await gate.wait()
            mine = store.current(owner, "session-1") is scope.state
            if i != first_to_end:
                await ends[first_to_end].wait()
            store.end(scope)
            ends[i].set()
            return mine and store.current(owner) is None

        return list(await asyncio.gather(turn(0), turn(1)))

    assert asyncio.run(main()) == [True, True]
    assert store.live() == 0
    assert raw_hop(store.current, owner, "session-1") is None


@contextlib.contextmanager
def open_turns(store: StateStore[Any], owners: list[Any], invocation_id: str) -> Iterator[list[Any]]:
    """One thread per owner holds an invocation with ``invocation_id`` open for the block; yields their states."""
    opened, done = threading.Barrier(len(owners) + 1, timeout=10), threading.Event()
    states: list[Any] = [None] * len(owners)

    def turn(i: int) -> None:
        with store.invocation(owners[i], invocation_id) as state:
            states[i] = state
            opened.wait()
            done.wait(10)

    threads = [threading.Thread(target=turn, args=(i,)) for i in range(len(owners))]
    [t.start() for t in threads]
    opened.wait()
    try:
        yield states
    finally:
        done.set()
        [t.join(10) for t in threads]


def test_shared_id_raw_hop_with_two_owners_picks_by_owner() -> None:
    store = InvocationIdStore(dict)
    a, b = Owner(), Owner()
    with open_turns(store, [a, b], "session-1") as (state_a, state_b):
        assert raw_hop(store.current, a, "session-1") is state_a
        assert raw_hop(store.current, b, "session-1") is state_b
        assert store.ambiguous == 0
    assert store.live() == 0


def test_shared_id_raw_hop_on_one_owner_is_none_counted_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    store = InvocationIdStore(dict)
    owner = Owner()
    with open_turns(store, [owner, owner], "session-1"):
        with caplog.at_level(logging.DEBUG, logger="statebackends"):
            seen = [raw_hop(store.current, owner, "session-1") for _ in range(5)]
        assert seen == [None] * 5, "never another invocation's state"
        assert store.ambiguous == 5
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "session-1" in warnings[0].getMessage()
    assert store.live() == 0


def test_ambient_invocation_wins_over_an_id_lookup() -> None:
    store = InvocationIdStore(dict)
    owner, other = Owner(), Owner()
    with open_elsewhere(store, other, "session-1"), store.invocation(owner, "session-1") as mine:
        assert store.current(owner, "session-1") is mine
        assert store.current(other, "session-1") is mine  # this context's invocation, whatever the owner
        with store.invocation(owner, "child-7") as child:  # nested, another id
            assert store.current(owner) is child
            assert store.current(owner, "session-1") is mine  # an outer invocation of this context


# -- invocation_id: eviction -----------------------------------------------------------


def test_eviction_is_counted_marked_and_warned_once_with_the_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import statebackends.invocation_id as mod

    clock = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: clock[0])
    store = InvocationIdStore(dict, max_entries=3)
    owner = Owner()
    with caplog.at_level(logging.WARNING, logger="statebackends"):
        scopes = [store.begin(owner, invocation_id=i) for i in range(10)]  # nested in this context
    assert store.evicted == 7
    assert [s.evicted for s in scopes] == [True] * 7 + [False] * 3
    (warning,) = caplog.records
    assert "evicted 1" in warning.getMessage() and ENV_MAX_ENTRIES in warning.getMessage()
    # the evicted invocation keeps working through its ambient binding; raw-hop id look-ups lose it
    assert store.current(owner, 0) is scopes[0].state
    assert raw_hop(store.current, owner, 0) is None
    assert raw_hop(store.current, owner, 9) is scopes[9].state
    assert store.live() == 10
    caplog.clear()
    clock[0] += 61
    with caplog.at_level(logging.WARNING, logger="statebackends"):
        late = store.begin(owner, invocation_id="late")
    (warning,) = caplog.records
    assert "evicted 7" in warning.getMessage() and "8 in all" in warning.getMessage()
    store.end(late)
    for scope in reversed(scopes):
        store.end(scope)  # late ends of evicted invocations are harmless
    assert store.live() == 0 and store.current(owner) is None and not store._open


def test_eviction_by_age(monkeypatch: pytest.MonkeyPatch) -> None:
    import statebackends.invocation_id as mod

    clock = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: clock[0])
    store = InvocationIdStore(dict, max_entries=100, max_age=60)
    abandoned = store.begin(Owner(), invocation_id="old")
    clock[0] += 61
    fresh = store.begin(Owner(), invocation_id="new")
    assert raw_hop(store.current, None, "old") is None and abandoned.evicted
    assert store.evicted == 1 and not fresh.evicted
    store.end(fresh)
    store.end(abandoned)
    assert store.live() == 0


@pytest.mark.parametrize("kwargs", [{"max_entries": 0}, {"max_age": -1}])
def test_invocation_id_rejects_bad_bounds_given_in_code(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="max_"):
        InvocationIdStore(dict, **kwargs)


def test_eviction_bound_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MAX_ENTRIES, " 5 ")
    assert InvocationIdStore(dict).max_entries == 5
    assert get_store("invocation_id", dict).max_entries == 5  # type: ignore[attr-defined]
    assert InvocationIdStore(dict, max_entries=7).max_entries == 7  # the argument wins


@pytest.mark.parametrize("bad", ["ten", "0", "-3", "1.5"])
def test_bad_eviction_bound_in_the_environment_logs_and_uses_the_default(
    bad: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_MAX_ENTRIES, bad)
    with caplog.at_level(logging.WARNING, logger="statebackends"):
        store = get_store("invocation_id", dict)
    assert store.max_entries == DEFAULT_MAX_ENTRIES == 10_000  # type: ignore[attr-defined]
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.ERROR
    assert ENV_MAX_ENTRIES in message and repr(bad) in message and "positive integer" in message


# -- fork safety ---------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only: os.fork")
def test_fork_while_threads_hold_the_locks_never_hangs_the_child() -> None:
    stores: list[StateStore[dict]] = [InvocationIdStore(dict), ContextVarStore(dict)]
    stop = threading.Event()

    def churn(i: int) -> None:
        owner = Owner()
        while not stop.is_set():
            for store in stores:
                scope = store.begin(owner, f"thread-{i}")
                store.current(owner, f"thread-{i}")
                store.end(scope)

    workers = [threading.Thread(target=churn, args=(i,), daemon=True) for i in range(4)]
    [w.start() for w in workers]
    forker = Owner()
    before_fork = stores[0].begin(forker, "forking-thread")  # visible in the child, not counted there
    failures: list[str] = []
    try:
        for n in range(100):
            pid = os.fork()
            if pid == 0:  # the child: one thread, the parent's locks possibly held by threads that are gone
                code = 3  # what an exception in the child exits with
                try:
                    checks = 0
                    for store in stores:
                        owner = Owner()
                        scope = store.begin(owner, "child")
                        if store.current(owner, "child") is not scope.state or store.current(owner) is not scope.state:
                            checks = checks or 1
                        store.end(scope)
                    if stores[0].current(forker, "forking-thread") is not before_fork.state:
                        checks = checks or 1
                    if stores[0].live() != 0 or stores[1].live() != 0:
                        checks = checks or 2
                    stores[0].end(before_fork)  # harmless, not counted
                    if stores[0].live() != 0 or stores[0].current(forker, "forking-thread") is not None:
                        checks = checks or 2
                    code = checks
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 10
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                        failures.append(f"fork {n}: child exited with status {status}")
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    failures.append(f"fork {n}: child hung (killed after 10 s)")
                    break
                time.sleep(0.002)
            if len(failures) >= 3:
                break
    finally:
        stop.set()
        [w.join(10) for w in workers]
        stores[0].end(before_fork)
    assert not failures, failures
    assert [s.live() for s in stores] == [0, 0]


# -- regressions: another invocation's state, half-done begin, raising handlers ---------------


def test_invocation_id_raw_hop_never_gets_an_invocation_of_another_owner_sharing_the_id() -> None:
    """An evicted invocation's own raw hop (owner and id carried) must not fall to another owner's turn."""
    store = InvocationIdStore(dict, max_entries=1)
    owner1, owner2 = Owner(), Owner()
    a = store.begin(owner1, "session-1")
    with open_elsewhere(store, owner2, "session-1") as b:  # evicts A (max_entries=1)
        assert a.evicted
        assert store.current(owner1, "session-1") is a.state  # its ambient binding still works
        assert raw_hop(store.current, owner1, "session-1") is None  # not B's state
        assert raw_hop(store.current, owner2, "session-1") is b
        assert raw_hop(store.current, None, "session-1") is b  # no owner given: the only one
        assert store.ambiguous == 0
        store.end(a)
        assert raw_hop(store.current, owner1, "session-1") is None  # an owner with nothing open
    assert store.live() == 0 and store._by_id == {}


@pytest.mark.parametrize("name", ["invocation_id", "contextvar"])
def test_invocation_id_late_work_of_an_ended_turn_never_gets_the_next_turn_sharing_its_id(name: str) -> None:
    store = get_store(name, dict)
    agent = Owner()

    async def main() -> tuple[Any, Any, Any]:
        a = store.begin(agent, "s")

        async def late() -> tuple[Any, Any]:
            await asyncio.sleep(0.01)
            return store.current(agent, "s"), store.current(agent)

        task = asyncio.ensure_future(late())  # a callback task of turn A, created during it
        copied = contextvars.copy_context()
        store.end(a)
        b = store.begin(agent, "s")  # the next turn of the session, concurrent with A's late work
        seen = await task
        in_pool = raw_hop(copied.run, store.current, agent, "s")
        mine = store.current(agent, "s") is b.state
        store.end(b)
        return seen, in_pool, mine

    seen, in_pool, mine = asyncio.run(main())
    assert seen == (None, None), name
    assert in_pool is None, name
    assert mine, name
    assert store.live() == 0


def test_invocation_id_index_adds_and_removes_in_constant_time_for_a_shared_id() -> None:
    """Many open invocations sharing one id: each keeps one dict entry (no per-id tuple rebuilt per begin/end)."""
    store = InvocationIdStore(dict, max_entries=3)
    owner = Owner()
    scopes = [store.begin(owner, sid) for sid in ("a", "b", "a", "c", "a")]
    assert [s.evicted for s in scopes] == [True, True, False, False, False]  # oldest first, over all ids
    assert type(store._by_id["a"]) is dict and list(store._by_id["a"]) == scopes[2::2]
    assert "b" not in store._by_id and list(store._by_id["c"]) == [scopes[3]]
    for scope in reversed(scopes):
        store.end(scope)
    assert store._by_id == {} and not store._open and store.live() == 0
    big = InvocationIdStore(dict, max_entries=10**6)
    many = [big.begin(owner, "same-session") for _ in range(2000)]
    bucket = big._by_id["same-session"]
    for scope in many:  # ends in begin order, the old worst case
        big.end(scope)
        assert big._by_id.get("same-session", {}) is bucket or not big._by_id
    assert big._by_id == {} and big.live() == 0


class Boom(logging.Handler):
    def __init__(self, exc: type[BaseException] = RuntimeError) -> None:
        super().__init__()
        self.exc = exc

    def emit(self, record: logging.LogRecord) -> None:
        raise self.exc("handler failed")


@pytest.fixture(params=[RuntimeError, GeneratorExit, SystemExit, Fatal], ids=lambda e: e.__name__)
def raising_handler(request: pytest.FixtureRequest) -> Any:
    logger = logging.getLogger("statebackends")
    handler, level = Boom(request.param), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("name", BUILTINS)
def test_a_raising_log_handler_never_breaks_begin_end_or_current(name: str, raising_handler: Any) -> None:
    store = get_store(name, dict)
    owner = Owner()
    scope = store.begin(owner)
    store.end(scope)
    store.end(scope)  # double end: logged at debug
    outer, inner = store.begin(owner), store.begin(owner)
    store.end(outer)  # out of order: logged at debug
    assert store.current(owner) is inner.state
    store.end(inner)
    other = store.begin(owner)
    contextvars.Context().run(store.end, other)  # outside its context
    assert store.current(owner) is None and store.live() == 0
    with store.invocation(owner) as state:
        assert store.current(owner) is state
    assert store.current(owner) is None and store.live() == 0


def test_invocation_id_begin_whose_eviction_warning_raises_is_complete(raising_handler: Any) -> None:
    store = InvocationIdStore(dict, max_entries=1)
    owner = Owner()
    a = store.begin(owner, "a")
    b = store.begin(owner, "b")  # evicts A; the warning's handler raises
    assert a.evicted and store.live() == 2
    assert store.current(owner) is b.state and raw_hop(store.current, owner, "b") is b.state
    store.end(b)
    store.end(a)
    assert store.live() == 0 and store.current(owner) is None and not store._open and store._by_id == {}
    shared = InvocationIdStore(dict)
    with open_turns(shared, [owner, owner], "shared"):
        assert raw_hop(shared.current, owner, "shared") is None  # ambiguous: warned through the raising handler
        assert shared.ambiguous == 1
    assert shared.live() == 0


# -- regressions: instance owners ------------------------------------------------------------


def _in_daemon(fn: Any, timeout: float = 10) -> Any:
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: _record_result(box, fn), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _record_result(box: dict[str, Any], fn: Any) -> None:
    try:
        box["result"] = fn()
    except BaseException as exc:  # noqa: BLE001
        box["error"] = exc


def test_instance_with_a_mock_owner_begins_and_ends() -> None:
    from unittest import mock

    store = get_store("instance", dict)
    owner = mock.MagicMock()

    def body() -> None:
        scope = store.begin(owner)
        assert store.current(owner) is scope.state
        assert store.current(mock.MagicMock()) is None
        store.end(scope)
        assert store.current(owner) is None and store.live() == 0

    _in_daemon(body)


def test_instance_treats_a_value_that_is_not_a_scope_as_no_invocation() -> None:
    store = get_store("instance", dict)
    owner = Owner()
    from unittest import mock

    for junk in ("junk", mock.MagicMock()):  # a mock's .ended is truthy, its .previous another mock
        owner.__dict__[store.attribute] = junk  # type: ignore[attr-defined]
        assert _in_daemon(lambda: store.current(owner)) is None
        with store.invocation(owner) as state:
            assert store.current(owner) is state
        assert store.current(owner) is None and store.attribute not in owner.__dict__  # type: ignore[attr-defined]


class Slotted:
    __slots__ = ("x",)


@pytest.mark.parametrize("make_owner", [lambda: Owner, lambda: object(), lambda: Slotted(), lambda: 42],
                         ids=["class", "object", "slotted", "int"])
def test_instance_rejects_an_owner_without_its_own_dict_before_anything_changes(make_owner: Any) -> None:
    store = get_store("instance", dict)
    owner = make_owner()
    with pytest.raises(TypeError, match="instance __dict__"):
        store.begin(owner)
    assert store.live() == 0 and store.current(owner) is None
    assert store.attribute not in getattr(owner, "__dict__", {})  # type: ignore[attr-defined]
    instance = Owner()
    with store.invocation(instance) as state:
        assert store.current(instance) is state


def test_instance_class_slot_never_shows_through_an_instance() -> None:
    store = get_store("instance", dict)
    scope = Scope({"who": "class"}, Owner, None)
    type.__setattr__(Owner, store.attribute, scope)  # as the legacy code would have left it
    try:
        assert store.current(Owner()) is None
    finally:
        type.__delattr__(Owner, store.attribute)


def test_instance_never_runs_owner_code_under_its_lock() -> None:
    store = get_store("instance", dict)
    calls: list[str] = []

    class Reentrant:
        def __setattr__(self, name: str, value: Any) -> None:
            calls.append("setattr")
            store.live(), store.current(self)
            with store.invocation(Owner()):  # takes the store's lock
                pass
            object.__setattr__(self, name, value)

        def __getattr__(self, name: str) -> Any:
            calls.append("getattr")
            with store.invocation(Owner()):
                pass
            raise AttributeError(name)

    owner = Reentrant()

    def body() -> None:
        outer = store.begin(owner)
        inner = store.begin(owner)
        assert store.current(owner) is inner.state
        store.end(outer)
        store.end(inner)
        assert store.current(owner) is None and store.live() == 0

    _in_daemon(body)


# -- regressions: otel_context under a foreign attach ------------------------------------------


def test_otel_context_end_under_a_foreign_attach_releases_the_state_and_detaches_once_uncovered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import gc
    import weakref

    class State(dict):  # type: ignore[type-arg]
        pass

    def body() -> None:
        store = get_store("otel_context", State)
        owner = Owner()
        root = otel_context.get_current()
        scope = store.begin(owner)
        ref = weakref.ref(scope.state)
        token = otel_context.attach(otel_context.set_value("user-key", 1))  # e.g. a span made current
        store.end(scope)
        assert otel_context.get_value("user-key") == 1, "the foreign attach is untouched"
        assert store.current(owner) is None
        otel_context.detach(token)
        del scope
        gc.collect()
        assert ref() is None, "the ended state is kept alive by the store's context"
        assert store.current(owner) is None
        assert otel_context.get_current() is root, "the store's attach is undone once uncovered"
        assert store.live() == 0
        # the next begin/end there also unwinds it
        scope = store.begin(owner)
        token = otel_context.attach(otel_context.set_value("user-key", 2))
        store.end(scope)
        otel_context.detach(token)
        with store.invocation(owner) as state:
            assert store.current(owner) is state
        assert otel_context.get_current() is root
        assert dict(contextvars.copy_context().items()).keys() == before_vars

    with caplog.at_level(logging.DEBUG):
        errors: list[BaseException] = []
        before_vars = dict(contextvars.Context().items()).keys()
        t = threading.Thread(target=lambda: _record(errors, body), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "hung"
        assert not errors, errors
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "no 'Failed to detach context'"


def test_otel_context_never_changes_a_context_it_attached() -> None:
    """OpenTelemetry's ``Context`` is immutable (its ``__setitem__`` raises): an end that has to leave our context
    attached under a foreign one changes no ``Context``, and still lets go of the state."""
    import gc
    import weakref

    class State(dict):  # type: ignore[type-arg]
        pass

    def body() -> None:
        store = get_store("otel_context", State)
        owner = Owner()
        scope = store.begin(owner)
        ours = otel_context.get_current()
        before = dict(ours)
        token = otel_context.attach(otel_context.set_value("user-key", 1))  # e.g. a span made current
        derived = otel_context.get_current()  # a foreign context made from ours while the call is open
        ref = weakref.ref(scope.state)
        store.end(scope)  # cannot detach here: deferred
        assert dict(ours).keys() == before.keys() and all(ours[k] is v for k, v in before.items()), \
            "a Context this store attached was changed"
        assert store.current(owner) is None and otel_context.get_value("user-key") == 1
        del scope
        gc.collect()
        assert ref() is None, "the ended state is kept alive by a context"
        inner = otel_context.attach(derived)
        assert store.current(owner) is None
        otel_context.detach(inner)
        otel_context.detach(token)
        assert store.current(owner) is None and store.live() == 0

    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _record(errors, body), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "hung"
    assert not errors, errors


# -- the public fork hook ---------------------------------------------------------------------


def in_forked_child(fn: Any, timeout: float = 10) -> Any:
    """``fn()`` run in a forked child; its result (or ``("raised", repr)`` of what it raised) comes back pickled."""
    import pickle

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read)
            try:
                out: Any = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the parent
                out = ("raised", repr(exc))
            with os.fdopen(write, "wb") as f:
                pickle.dump(out, f)
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung")
        time.sleep(0.002)
    with os.fdopen(read, "rb") as f:
        return pickle.load(f)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only: os.fork")
def test_ids_invocation_id_makes_up_never_repeat_across_a_fork() -> None:
    store = get_store("invocation_id", dict)
    owner = Owner()
    store.end(store.begin(owner))
    in_child = in_forked_child(lambda: [store.begin(owner).invocation_id for _ in range(3)])
    in_parent = [store.begin(owner).invocation_id for _ in range(3)]
    assert not set(in_child) & set(in_parent), (in_child, in_parent)
    assert len(set(in_child)) == len(set(in_parent)) == 3


class ForkWatcher:
    """Callbacks as bound methods: held weakly, so they go away with the watcher at the end of a test."""

    def __init__(self, store: StateStore[Any], seen: list[Any]) -> None:
        self.store, self.seen = store, seen

    def first(self) -> None:  # runs once every store is re-made: its lock is free, nothing of the parent's counted
        self.seen.append(("first", self.store._lock.acquire(blocking=False), self.store.live()))

    def raises(self) -> None:
        raise Fatal("a broken callback")

    def last(self) -> None:
        self.seen.append("last")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only: os.fork")
def test_at_fork_in_child_runs_in_order_after_the_stores_and_survives_a_raising_callback() -> None:
    import gc

    from statebackends import at_fork_in_child

    store = InvocationIdStore(dict)
    seen: list[Any] = []
    watcher, dropped = ForkWatcher(store, seen), ForkWatcher(store, seen)
    assert at_fork_in_child(watcher.first) == watcher.first
    at_fork_in_child(watcher.raises)
    at_fork_in_child(dropped.last)  # held weakly: gone before the fork, never run
    at_fork_in_child(watcher.last)
    del dropped
    gc.collect()
    scope = store.begin(Owner())
    try:
        with store._lock:  # held by the parent at the fork: the child re-makes it
            in_child = in_forked_child(lambda: seen)
    finally:
        store.end(scope)
    assert in_child == [("first", True, 0), "last"]
    assert seen == []  # nothing ran in the parent


def test_at_fork_in_child_rejects_what_cannot_be_called() -> None:
    from statebackends import at_fork_in_child

    with pytest.raises(TypeError, match="42"):
        at_fork_in_child(42)  # type: ignore[arg-type]


# -- regressions: fork inside a propagated call ----------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only: os.fork")
@pytest.mark.parametrize("name", BUILTINS)
def test_fork_in_a_propagated_call_adopts_nothing(name: str) -> None:
    store = get_store(name, dict)
    owner = Owner()
    a = store.begin(owner)  # the request thread's invocation, which cannot end in the child

    def job() -> int:
        pid = os.fork()
        if pid == 0:
            code = 1  # what an exception in the child exits with
            try:
                s = store.begin(owner)
                store.end(s)
                checks = 0 if store.live() == 0 else 2
                store.end(a)  # harmless, not counted
                if store.live() != 0:
                    checks = 3
                code = checks
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1

    try:
        assert raw_hop(store.propagate(job)) == 0
    finally:
        store.end(a)
    assert store.live() == 0


# -- every built-in backend is written with what a third-party backend has ------------------------


BACKEND_MODULES = ["contextvar", "instance", "invocation_id", "otel_context", "threadlocal"]
_BYPASSING_DUNDERS = {"__setitem__", "__delitem__", "__setattr__", "__delattr__"}


def _private_reaches(path: Any) -> list[str]:
    """What a backend module takes that a third party could not: private core names, private attributes of
    other objects, and a type's mutating dunder called on an object to bypass that object's own (``dict.__setitem__``
    on an OpenTelemetry ``Context``, which forbids setting)."""
    import ast

    import statebackends

    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and not module.startswith("statebackends"):
                continue  # the standard library, OpenTelemetry
            parts = module.split(".")[1 if node.level == 0 else 0:]
            if any(p.startswith("_") for p in parts):
                found.append(f"line {node.lineno}: imports from the private module {module!r}")
            for alias in node.names:
                if not parts and alias.name not in statebackends.__all__:
                    found.append(f"line {node.lineno}: imports {alias.name!r}, not in statebackends.__all__")
                elif alias.name.startswith("_"):
                    found.append(f"line {node.lineno}: imports the private name {alias.name!r}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            dunder = node.attr.startswith("__") and node.attr.endswith("__")
            base = node.value
            on_self = (isinstance(base, ast.Name) and base.id in ("self", "cls")) or (
                isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super")
            if dunder and node.attr in _BYPASSING_DUNDERS and isinstance(node.value, ast.Name):
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr} bypasses an object's own {node.attr}")
            elif not dunder and not on_self:
                found.append(f"line {node.lineno}: reads the private attribute .{node.attr} of {ast.unparse(base)}")
    return found


@pytest.mark.parametrize("module", BACKEND_MODULES)
def test_each_built_in_backend_uses_only_what_a_third_party_backend_has(module: str) -> None:
    """No private fork epoch, no private helper, no ``dict.__setitem__`` on a ``Context``: public names of
    ``statebackends`` and of its public modules, and a backend's own attributes."""
    from pathlib import Path

    import statebackends

    assert _private_reaches(Path(statebackends.__file__).parent / f"{module}.py") == []


def test_at_fork_in_child_forgets_a_bound_method_once_its_object_is_gone() -> None:
    """Registering in a loop (instrument and uninstrument, again and again) keeps nothing: a bound method's entry goes
    with its object, not only at the next fork (on 83a5a81 every dead entry stayed until a fork)."""
    import gc

    from statebackends import _store, at_fork_in_child

    class Owner:
        def hook(self) -> None:
            pass

    before = len(_store._fork_callbacks)
    for _ in range(100):
        at_fork_in_child(Owner().hook)  # the Owner dies as soon as this line is done
    gc.collect()
    assert len(_store._fork_callbacks) == before
    kept = Owner()
    at_fork_in_child(kept.hook)
    assert len(_store._fork_callbacks) == before + 1
    del kept
    gc.collect()
    assert len(_store._fork_callbacks) == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only: os.fork")
def test_a_fork_callback_that_lets_an_earlier_ones_object_die_skips_no_later_callback() -> None:
    """An object freed while the child runs the callbacks takes its entry out of the list being run: the ones after
    it still run, and one registered in the child during the pass stays (on 7eefe10 the list shifted under the loop:
    'last' never ran)."""
    from statebackends import _store, at_fork_in_child

    class Hooked:
        def hook(self) -> None:
            pass

    seen: list[Any] = []
    box = [Hooked()]
    at_fork_in_child(box[0].hook)  # before the one that lets it die

    def let_it_die() -> None:
        box.clear()  # the earlier callback's object is freed here, in the middle of the pass
        seen.append("let it die")
        at_fork_in_child(Hooked.hook.__get__(keep))  # a registration made in the child, during the pass

    keep = Hooked()
    at_fork_in_child(let_it_die)
    at_fork_in_child(lambda: seen.append("last"))

    def child() -> Any:
        return [seen, any(ref() == keep.hook for ref in _store._fork_callbacks)]

    assert in_forked_child(child) == [["let it die", "last"], True]
