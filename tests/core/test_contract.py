"""The contract every registered backend obeys (built-in and third-party alike)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import statebackends
from statebackends import Concurrency, StateStore, get_store

BACKENDS = sorted(statebackends.available())


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> StateStore[dict]:
    return get_store(request.param, dict)


class Owner:
    pass


def test_begin_current_end(store: StateStore[dict]) -> None:
    owner = Owner()
    assert store.current(owner) is None
    scope = store.begin(owner)
    assert store.current(owner, scope.invocation_id) is scope.state
    assert store.current(owner) is scope.state
    assert store.live() in (1, None)
    store.end(scope)
    assert store.current(owner) is None
    assert store.live() in (0, None)


def test_each_begin_gets_a_fresh_state_from_the_factory(store: StateStore[dict]) -> None:
    owner = Owner()
    with store.invocation(owner) as first:
        first["x"] = 1
    with store.invocation(owner) as second:
        assert second == {} and second is not first


def test_nesting_restores_the_outer_state(store: StateStore[dict]) -> None:
    owner = Owner()
    with store.invocation(owner) as outer:
        with store.invocation(owner) as inner:
            assert inner is not outer
            assert store.current(owner) is inner
        assert store.current(owner) is outer
    assert store.current(owner) is None


def test_double_end_never_raises_and_is_logged(store: StateStore[dict], caplog: pytest.LogCaptureFixture) -> None:
    owner = Owner()
    scope = store.begin(owner)
    store.end(scope)
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        store.end(scope)
    assert store.current(owner) is None
    assert store.live() in (0, None)
    assert any("already ended" in r.getMessage() for r in caplog.records)


def test_end_from_another_thread_never_raises(store: StateStore[dict]) -> None:
    owner = Owner()
    scope = store.begin(owner)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            store.end(scope)
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors == []
    assert store.live() in (0, None)


def test_invocation_context_manager_ends_on_exception(store: StateStore[dict]) -> None:
    owner = Owner()
    with pytest.raises(KeyError, match="boom"):
        with store.invocation(owner):
            raise KeyError("boom")
    assert store.current(owner) is None
    assert store.live() in (0, None)


def test_current_is_none_outside_any_invocation_in_a_new_thread(store: StateStore[dict]) -> None:
    owner = Owner()
    seen = []
    t = threading.Thread(target=lambda: seen.append(store.current(Owner())))
    t.start()
    t.join()
    assert seen == [None]
    assert store.current(owner) is None


def test_propagate_carries_the_invocation_to_a_raw_thread(store: StateStore[dict]) -> None:
    owner = Owner()
    seen = []
    with store.invocation(owner) as state:
        fn = store.propagate(lambda: seen.append(store.current(owner)))
        with ThreadPoolExecutor(1) as pool:  # executor.submit copies no context
            pool.submit(fn).result()
    assert seen == [state]


def test_propagate_into_a_nested_invocation_on_another_owner(store: StateStore[dict]) -> None:
    """A subagent (another owner) started in a raw thread finds its parent's state before its own begin."""
    parent, child = Owner(), Owner()
    seen = []

    def run_child() -> None:
        seen.append(store.current(child))
        with store.invocation(child) as child_state:
            seen.append(store.current(child) is child_state)

    with store.invocation(parent) as state:
        t = threading.Thread(target=store.propagate(run_child))
        t.start()
        t.join()
    declared = Concurrency.PROPAGATE in type(store).isolates
    assert (seen[0] is state) == declared
    assert seen[1] is True


def test_live_returns_to_zero_after_many_overlapping_invocations(store: StateStore[dict]) -> None:
    def call() -> None:
        with store.invocation(Owner()):
            pass

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(call) for _ in range(200)]:
            f.result()
    assert store.live() in (0, None)


def test_declaration_is_data(store: StateStore[dict]) -> None:
    assert isinstance(type(store).isolates, frozenset)
    assert all(isinstance(m, Concurrency) for m in type(store).isolates)
    assert type(store).name in BACKENDS


# -- the declared isolation, observed ------------------------------------------------


def _threads_isolated(store: StateStore[dict], n: int = 4) -> bool:
    owner, barrier, ok = Owner(), threading.Barrier(n), []

    def call(i: int) -> None:
        scope = store.begin(owner)
        scope.state["i"] = i
        barrier.wait()
        mine = store.current(owner, scope.invocation_id)
        barrier.wait()
        store.end(scope)
        ok.append(mine is scope.state)

    ts = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return all(ok) and store.current(owner) is None


def _tasks_isolated(store: StateStore[dict], n: int = 4) -> bool:
    owner = Owner()

    async def call(gate: asyncio.Event, started: list) -> bool:
        scope = store.begin(owner)
        started.append(1)
        if len(started) == n:
            gate.set()
        await gate.wait()
        mine = store.current(owner)  # no id: the ambient binding must be the task's own
        await asyncio.sleep(0)
        store.end(scope)
        return mine is scope.state

    async def main() -> bool:
        gate, started = asyncio.Event(), []
        results = await asyncio.gather(*(call(gate, started) for _ in range(n)))
        return all(results) and store.current(owner) is None

    return asyncio.run(main())


def _copied_context_sees_state(store: StateStore[dict]) -> bool:
    owner = Owner()
    with store.invocation(owner) as state:
        ctx = contextvars.copy_context()
        with ThreadPoolExecutor(1) as pool:
            seen = pool.submit(ctx.run, store.current, owner).result()
    return seen is state


def _raw_thread_sees_state(store: StateStore[dict]) -> bool:
    owner = Owner()
    scope = store.begin(owner)
    try:
        with ThreadPoolExecutor(1) as pool:
            # the hop carries what a framework hands to its work: the owner and the call's id
            seen = pool.submit(store.current, owner, scope.invocation_id).result()
    finally:
        store.end(scope)
    return seen is scope.state


OBSERVERS = {
    Concurrency.THREADS: _threads_isolated,
    Concurrency.ASYNC_TASKS: _tasks_isolated,
    Concurrency.COPIED_CONTEXT: _copied_context_sees_state,
    Concurrency.RAW_THREAD: _raw_thread_sees_state,
}


@pytest.mark.parametrize("model", list(OBSERVERS), ids=lambda m: m.value)
def test_declared_isolation_matches_behaviour(store: StateStore[dict], model: Concurrency) -> None:
    assert OBSERVERS[model](store) == (model in type(store).isolates)
