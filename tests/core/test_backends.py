"""Each backend's own promises, and its known failures asserted as failures."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading

import pytest
from opentelemetry import context as otel_context

from statebackends import get_store
from statebackends.invocation_id import InvocationIdStore


class Owner:
    pass


def test_instance_backend_cross_talk_between_two_overlapping_threads() -> None:
    """The legacy bug, shown: two threads on one owner read each other's state and leave one behind."""
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

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert seen["first"] == {"who": "second"}, "the first call reads the second call's state"
    assert seen["second"] is None, "the first call's end removed the second call's state"
    assert store.current(owner) == {"who": "first"}, "the second call's end left a finished call's state on the owner"


def test_threadlocal_backend_shares_state_between_tasks_on_one_loop() -> None:
    store = get_store("threadlocal", dict)
    owner = Owner()

    started: list[str] = []

    async def call(name: str) -> object:
        scope = store.begin(owner)
        scope.state["who"] = name
        started.append(name)
        while len(started) < 2:
            await asyncio.sleep(0)
        seen = store.current(owner)
        await asyncio.sleep(0)
        store.end(scope)
        return seen["who"]

    async def main() -> list:
        return await asyncio.gather(call("a"), call("b"))

    assert asyncio.run(main()) == ["b", "b"], "both tasks see the last begin's state"


@pytest.mark.parametrize("name", ["contextvar", "otel_context", "invocation_id"])
def test_no_state_left_in_the_callers_context_after_end(name: str) -> None:
    store = get_store(name, dict)
    owner = Owner()
    before = contextvars.copy_context()
    otel_before = otel_context.get_current()
    with store.invocation(owner):
        pass
    after = contextvars.copy_context()
    assert store.current(owner) is None
    # every variable holds the value it held before (reset, not merely set to None)
    assert {var: after[var] for var in after if var in before} == dict(before.items())
    assert otel_context.get_current() is otel_before


def test_contextvar_end_in_another_context_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    store = get_store("contextvar", dict)
    scope = store.begin(Owner())
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        contextvars.Context().run(store.end, scope)
    assert any("could not undo" in r.getMessage() for r in caplog.records)
    store.end(scope)  # already ended: a no-op
    assert store.live() == 0


def test_otel_context_end_out_of_order_does_not_detach_someone_elses_context(caplog: pytest.LogCaptureFixture) -> None:
    store = get_store("otel_context", dict)
    scope = store.begin(Owner())
    foreign = otel_context.attach(otel_context.set_value("foreign", 1))
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        store.end(scope)
    assert otel_context.get_value("foreign") == 1, "the foreign attach is untouched"
    otel_context.detach(foreign)
    assert any("could not undo" in r.getMessage() for r in caplog.records)


def test_threadlocal_end_from_another_thread_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    store = get_store("threadlocal", dict)
    scope = store.begin(Owner())
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        t = threading.Thread(target=store.end, args=(scope,))
        t.start()
        t.join()
    assert any("could not undo" in r.getMessage() for r in caplog.records)
    assert store.live() == 0


def test_invocation_id_explicit_id_is_found_from_any_thread() -> None:
    store = get_store("invocation_id", dict)
    seen = []
    with store.invocation(Owner(), invocation_id="task-42") as state:
        t = threading.Thread(target=lambda: seen.append(store.current(None, "task-42")))
        t.start()
        t.join()
    assert seen == [state]
    assert store.current(None, "task-42") is None


def test_invocation_id_generates_an_id_when_the_call_has_none() -> None:
    store = get_store("invocation_id", dict)
    scope = store.begin(Owner())
    assert isinstance(scope.invocation_id, str) and scope.invocation_id
    assert store.current(None, scope.invocation_id) is scope.state
    store.end(scope)


def test_invocation_id_is_bounded_by_size_and_counts_evictions() -> None:
    store = InvocationIdStore(dict, max_entries=3, max_age=None)
    scopes = [store.begin(Owner(), invocation_id=i) for i in range(10)]  # abandoned: end never comes
    assert store.live() == 3
    assert store.evicted == 7
    assert store.current(None, 0) is None and store.current(None, 9) is scopes[9].state
    for scope in reversed(scopes):
        store.end(scope)  # late ends of evicted entries are harmless
    assert store.live() == 0


def test_invocation_id_is_bounded_by_age(monkeypatch: pytest.MonkeyPatch) -> None:
    import statebackends.invocation_id as mod

    clock = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: clock[0])
    store = InvocationIdStore(dict, max_entries=100, max_age=60)
    abandoned = store.begin(Owner(), invocation_id="old")
    clock[0] += 61
    fresh = store.begin(Owner(), invocation_id="new")
    assert store.current(None, "old") is None
    assert store.evicted == 1
    store.end(fresh)
    store.end(abandoned)
    assert store.live() == 0


@pytest.mark.parametrize("kwargs", [{"max_entries": 0}, {"max_age": -1}])
def test_invocation_id_rejects_bad_bounds(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="max_"):
        InvocationIdStore(dict, **kwargs)
