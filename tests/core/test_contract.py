"""The project's five backends, checked through the public conformance kit; and the kit, shown able to fail."""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

import statebackends
from statebackends import Concurrency, Scope, StateStore
from statebackends.contextvar import ContextVarStore
from statebackends.instance import InstanceStore
from statebackends.invocation_id import InvocationIdStore
from statebackends.otel_context import OtelContextStore
from statebackends.testing import RULES, BackendContract, Failure, check_backend, check_rule, observe
from statebackends.threadlocal import ThreadLocalStore

BUILTIN_CLASSES = [ContextVarStore, InstanceStore, InvocationIdStore, OtelContextStore, ThreadLocalStore]


class TestContextVar(BackendContract):
    store_class = ContextVarStore


class TestInstance(BackendContract):
    store_class = InstanceStore


class TestInvocationId(BackendContract):
    store_class = InvocationIdStore


class TestOtelContext(BackendContract):
    store_class = OtelContextStore


class TestThreadLocal(BackendContract):
    store_class = ThreadLocalStore


class TestInvocationIdSmallBound(BackendContract):
    """The bound is no excuse: with room for only four open invocations the contract still holds."""

    store_class = InvocationIdStore
    store_kwargs: ClassVar[dict[str, Any]] = {"max_entries": 4}


def test_every_registered_builtin_is_checked_here() -> None:
    assert {cls.name for cls in BUILTIN_CLASSES} == {
        name for name, cls in statebackends.available().items() if cls.__module__.startswith("statebackends.")
    }


# -- declared == observed, undeclared models included (known-bad shown bad) ------------


@pytest.mark.parametrize("model", list(Concurrency), ids=lambda m: m.value)
@pytest.mark.parametrize("store_class", BUILTIN_CLASSES, ids=lambda c: c.name)
def test_declaration_is_exactly_what_is_observed(store_class: type[StateStore[Any]], model: Concurrency) -> None:
    seen = observe(store_class, model)
    assert seen.isolated == (model in store_class.isolates), seen.detail or "isolated, but not declared"


EXPECTED = {
    # what each backend is declared (and observed) to isolate; a change here is a documented decision
    "contextvar": {"threads", "asyncio_tasks", "copied_context", "late_work", "propagate", "nested", "shared_id"},
    "otel_context": {"threads", "asyncio_tasks", "copied_context", "late_work", "propagate", "nested", "shared_id"},
    "threadlocal": {"threads", "propagate", "nested", "shared_id"},
    "instance": {"copied_context", "raw_thread", "nested"},
    "invocation_id": {"threads", "asyncio_tasks", "copied_context", "late_work", "raw_thread", "propagate", "nested",
                      "shared_id", "greenlets"},
}


@pytest.mark.parametrize("store_class", BUILTIN_CLASSES, ids=lambda c: c.name)
def test_declarations(store_class: type[StateStore[Any]]) -> None:
    assert isinstance(store_class.isolates, frozenset)
    assert {m.value for m in store_class.isolates} == EXPECTED[store_class.name]
    assert Concurrency.SHARED_ID_RAW_THREAD not in store_class.isolates  # nobody can tell which one is meant


@pytest.mark.parametrize("store_class", [ThreadLocalStore, InstanceStore], ids=lambda c: c.name)
def test_late_work_is_observed_broken_where_the_slot_is_the_threads_or_the_owners(
    store_class: type[StateStore[Any]],
) -> None:
    seen = observe(store_class, Concurrency.LATE_WORK)
    assert not seen.isolated and "while the next invocation on its owner" in seen.detail
    assert "another invocation's state" in seen.detail and "ended invocation's" not in seen.detail


def test_threadlocal_on_async_tasks_is_observed_broken() -> None:
    seen = observe(ThreadLocalStore, Concurrency.ASYNC_TASKS)
    assert not seen.isolated and "another's state" in seen.detail


def test_contextvar_loses_the_state_in_a_spawned_greenlet() -> None:
    seen = observe(ContextVarStore, Concurrency.GREENLETS)
    assert not seen.isolated and "spawned during an invocation" in seen.detail and "nothing" in seen.detail


def test_every_model_has_a_description() -> None:
    assert all(m.description for m in Concurrency)
    assert Concurrency.GREENLETS.description == "gevent greenlets sharing one owner, monkey-patched"


# -- the kit can fail ------------------------------------------------------------------


class ThreadLocalClaimingTasks(ThreadLocalStore):
    """Claims asyncio tasks, but is a threading.local: tasks on one loop share its slot."""

    name = "threadlocal_claiming_tasks"
    isolates = ThreadLocalStore.isolates | {Concurrency.ASYNC_TASKS}


class HandsOutEndedState(StateStore):
    """The old ``contextvar`` design: the bare state in the variable, so a context copied during the call keeps it."""

    name = "hands_out_ended_state"
    isolates = frozenset({Concurrency.THREADS})

    def __init__(self, factory: Any) -> None:
        super().__init__(factory)
        self._var: contextvars.ContextVar[Any] = contextvars.ContextVar("hands_out_ended_state", default=None)

    def _enter(self, scope: Scope) -> Any:
        return self._var.set(scope.state)

    def _exit(self, scope: Scope) -> None:
        self._var.reset(scope.token)

    def current(self, owner: Any = None, invocation_id: Any = None) -> Any:
        return self._var.get()

    def propagate(self, fn: Any) -> Any:
        return fn


class RaisesInEnd(ContextVarStore):
    """Breaks "end never raises"."""

    name = "raises_in_end"

    def end(self, scope: Scope) -> None:
        super().end(scope)
        raise RuntimeError("end went wrong")


class LeakyStore(ContextVarStore):
    """Claims the raw hop, and there falls back to its owner's open invocation, else to ANY open invocation."""

    name = "leaky"
    isolates = (ContextVarStore.isolates - {Concurrency.ASYNC_TASKS}) | {Concurrency.RAW_THREAD}

    def __init__(self, factory: Any) -> None:
        super().__init__(factory)
        self._open: list[Scope] = []

    def _enter(self, scope: Scope) -> Any:
        token = super()._enter(scope)
        with self._lock:
            self._open.append(scope)
        return token

    def _exit(self, scope: Scope) -> None:
        with self._lock:
            if scope in self._open:
                self._open.remove(scope)
        super()._exit(scope)

    def current(self, owner: Any = None, invocation_id: Any = None) -> Any:
        here = super().current(owner, invocation_id)
        if here is not None:
            return here
        with self._lock:
            mine = [s for s in self._open if s.owner is owner and not s.ended]
            others = [s for s in self._open if not s.ended]
        return (mine or others or [Scope(None, None, None)])[-1].state  # someone else's state


class IdLookupIgnoringEndedTurns(InvocationIdStore):
    """The id look-up before the fix: any single open invocation with the id, whoever's work asks."""

    name = "id_lookup_ignoring_ended_turns"

    def _look_up(self, scope: Scope, owner: Any, invocation_id: Any) -> Any:
        from statebackends import NO_SCOPE

        ambient = scope
        while ambient is not NO_SCOPE:
            if not ambient.ended and (invocation_id is None or ambient.invocation_id == invocation_id):
                return ambient.state
            ambient = ambient.previous
        candidates = [s for s in self._by_id.get(invocation_id, ()) if not s.ended] if invocation_id else []
        return candidates[0].state if len(candidates) == 1 else None


class ContextVarClaimingGreenlets(ContextVarStore):
    name = "contextvar_claiming_greenlets"
    isolates = ContextVarStore.isolates | {Concurrency.GREENLETS}


def _by_check(failures: list[Failure]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in failures:
        out.setdefault(f.check, []).append(str(f))
    return out


@pytest.mark.parametrize("store_class", BUILTIN_CLASSES, ids=lambda c: c.name)
def test_check_backend_passes_the_builtins(store_class: type[StateStore[Any]]) -> None:
    assert check_backend(store_class) == []


def test_a_threadlocal_claiming_async_tasks_fails_naming_the_model() -> None:
    failures = check_backend(ThreadLocalClaimingTasks)
    assert {f.check for f in failures} == {"asyncio_tasks"}
    (failure,) = failures
    assert failure.backend == "threadlocal_claiming_tasks"
    assert "claims to isolate asyncio_tasks" in str(failure) and "another's state" in str(failure)
    assert "\n" not in str(failure)


def test_a_backend_handing_out_ended_state_fails_that_rule() -> None:
    checks = _by_check(check_backend(HandsOutEndedState))
    assert "no_ended_state_in_copied_context" in checks
    assert any("an ended invocation's state" in m for m in checks["no_ended_state_in_copied_context"])
    assert "threads" not in checks  # what it does isolate is not reported


def test_a_backend_raising_in_end_fails_with_the_exception() -> None:
    checks = _by_check(check_backend(RaisesInEnd))
    assert "begin_current_end" in checks and "double_end" in checks and "never_raise" in checks
    assert all("end went wrong" in m for m in checks["begin_current_end"])


def test_a_backend_handing_another_invocations_state_to_a_raw_hop_fails() -> None:
    checks = _by_check(check_backend(LeakyStore))
    assert "raw_thread" in checks and "another's state" in checks["raw_thread"][0], checks
    for rule in ("ends_in_any_order", "no_ended_state_in_copied_context", "begin_current_end"):
        assert rule in checks and any("another invocation's state" in m for m in checks[rule]), (rule, checks)
    assert any("asyncio task" in m for m in checks["no_ended_state_in_copied_context"])


def test_an_id_lookup_handing_late_work_the_next_turns_state_fails() -> None:
    checks = _by_check(check_backend(IdLookupIgnoringEndedTurns))
    assert "asyncio_tasks" in checks and "run after it ended" in checks["asyncio_tasks"][0], checks
    assert "shared_id_same_context" in checks and "no_ended_state_in_copied_context" in checks
    assert "another invocation's state" in checks["shared_id_same_context"][0]


class _Fatal(BaseException):
    pass


@pytest.mark.parametrize("exc", [asyncio.CancelledError, SystemExit, _Fatal, GeneratorExit],
                         ids=lambda e: e.__name__)
def test_a_backend_raising_a_base_exception_is_reported_not_raised(exc: type[BaseException]) -> None:
    class Raises(ContextVarStore):
        name = "raises_base"

        def current(self, owner: Any = None, invocation_id: Any = None) -> Any:
            raise exc("from the backend")

    failures = check_backend(Raises)
    checks = _by_check(failures)
    assert set(RULES) <= set(checks), checks
    assert any(f"raised {exc.__name__}" in m for m in checks["begin_current_end"]), checks
    assert not observe(Raises, Concurrency.THREADS).isolated


def test_a_hung_backend_is_reported_and_the_process_still_exits(tmp_path: Path) -> None:
    (tmp_path / "hung_backend.py").write_text(textwrap.dedent(
        """
        import threading
        import statebackends.testing as kit
        from statebackends import Concurrency
        from statebackends.contextvar import ContextVarStore

        kit.TIMEOUT = 0.5
        forever = threading.Event()

        class HangsInOtherThreads(ContextVarStore):
            name = "hangs_in_other_threads"

            def __init__(self, factory):
                super().__init__(factory)
                self.began_in = set()

            def _enter(self, scope):
                self.began_in.add(threading.get_ident())
                return super()._enter(scope)

            def current(self, owner=None, invocation_id=None):
                if threading.get_ident() not in self.began_in:
                    forever.wait()  # a look-up that never returns in a pool thread
                return super().current(owner, invocation_id)

        print(kit.observe(HangsInOtherThreads, Concurrency.RAW_THREAD).detail, flush=True)
        print(kit.check_rule(HangsInOtherThreads, "never_raise")[0].observed, flush=True)
        """
    ))
    run = subprocess.run([sys.executable, str(tmp_path / "hung_backend.py")], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)  # before the fix: reported "hung", then never exited
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2 and all("hung" in line for line in lines), run.stdout


def test_a_backend_claiming_greenlets_it_does_not_isolate_fails() -> None:
    failures = check_rule(ContextVarClaimingGreenlets, "begin_current_end") + check_backend(ContextVarClaimingGreenlets)
    assert [f.check for f in failures] == ["greenlets"]
    assert "claims to isolate greenlets" in str(failures[0]) and "spawned" in str(failures[0])


def test_greenlets_claimed_without_gevent_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import statebackends.testing as kit

    monkeypatch.setattr(kit, "_gevent_available", lambda: False)
    failures = [f for f in check_backend(InvocationIdStore) if f.check == "greenlets"]
    assert len(failures) == 1 and "could not be observed" in str(failures[0]) and "gevent" in str(failures[0])


def test_a_local_class_claiming_greenlets_cannot_be_observed() -> None:
    class Local(InvocationIdStore):
        name = "local"

    seen = observe(Local, Concurrency.GREENLETS)
    assert not seen.isolated and "could not be observed" in seen.detail


def test_a_hanging_backend_is_reported_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    import statebackends.testing as kit

    monkeypatch.setattr(kit, "TIMEOUT", 0.5)
    release = threading.Event()

    class Hangs(ContextVarStore):
        name = "hangs"

        def current(self, owner: Any = None, invocation_id: Any = None) -> Any:
            release.wait(30)
            return super().current(owner, invocation_id)

    try:
        failures = check_rule(Hangs, "begin_current_end")
    finally:
        release.set()
    assert failures and "hung" in str(failures[0])


def test_rules_are_the_documented_ones() -> None:
    assert list(RULES) == [
        "begin_current_end", "fresh_state_per_begin", "nesting", "double_end", "end_from_another_thread",
        "never_raise", "live_returns_to_zero", "no_ended_state_in_copied_context", "ends_in_any_order",
        "shared_id_same_context",
    ]


def test_backend_contract_collects_one_test_per_rule_and_declared_model_and_fails_with_the_messages(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_third_party.py").write_text(textwrap.dedent(
        """
        from statebackends import Concurrency
        from statebackends.testing import BackendContract
        from statebackends.threadlocal import ThreadLocalStore

        class Claims(ThreadLocalStore):
            name = "claims"
            isolates = frozenset({Concurrency.THREADS, Concurrency.ASYNC_TASKS})

        class TestClaims(BackendContract):
            store_class = Claims
        """
    ))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    out = run.stdout
    assert run.returncode == 1, out
    assert f"{len(RULES) + 2} passed" in out and "1 failed" in out, out
    assert "TestClaims::test_declared_isolation[asyncio_tasks]" in out
    assert "claims breaks asyncio_tasks: claims to isolate asyncio_tasks" in out
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                                str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=120).stdout
    ids = {line.split("::", 2)[-1] for line in collected.splitlines() if "::" in line}
    assert ids == {f"test_contract_rule[{r}]" for r in RULES} | {
        "test_declaration", "test_declared_isolation[threads]", "test_declared_isolation[asyncio_tasks]"}


def test_backend_contract_names_a_declaration_the_kit_cannot_read(tmp_path: Path) -> None:
    """A string in ``isolates`` (or no set at all) fails with the bad value and the valid ones, not a collection
    error."""
    (tmp_path / "test_typo.py").write_text(textwrap.dedent(
        """
        from statebackends import Concurrency
        from statebackends.testing import BackendContract
        from statebackends.threadlocal import ThreadLocalStore

        class Typo(ThreadLocalStore):
            name = "typo"
            isolates = frozenset({Concurrency.THREADS, "asyncio"})

        class NotASet(ThreadLocalStore):
            name = "notaset"
            isolates = "threads"

        class IsNone(ThreadLocalStore):
            name = "isnone"
            isolates = None

        class TestTypo(BackendContract):
            store_class = Typo

        class TestNotASet(BackendContract):
            store_class = NotASet

        class TestIsNone(BackendContract):
            store_class = IsNone
        """
    ))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    out = run.stdout
    assert run.returncode == 1, out
    assert "TestTypo::test_declaration" in out and "holds ['asyncio']" in out and "Concurrency.THREADS" in out, out
    assert "TestNotASet::test_declaration" in out and "must be a frozenset" in out, out
    assert "TestNotASet::test_declared_isolation[nothing_declared]" in out, out  # the kit read nothing from it
    assert "TestIsNone::test_declaration" in out and "got None" in out, out  # collected, not a collection error
    assert "5 failed" in out, out  # those five; Typo's THREADS claim is still observed, and holds
    assert "TestTypo::test_declared_isolation[threads]" not in out, out


def test_check_backend_reports_a_declaration_it_cannot_read_as_a_failure() -> None:
    class Typo(ThreadLocalStore):
        name = "typo"
        isolates = frozenset({Concurrency.THREADS, "asyncio"})  # type: ignore[arg-type]

    class OneMember(ThreadLocalStore):
        name = "onemember"
        isolates = Concurrency.THREADS  # type: ignore[assignment]

    for store_class, said in ((Typo, "holds ['asyncio']"), (OneMember, "must be a frozenset")):
        failures = check_backend(store_class)
        assert [f.check for f in failures] == ["declaration"], failures
        assert said in failures[0].observed, failures
    assert "valid: Concurrency.THREADS" in check_backend(Typo)[0].observed


def test_the_kit_imports_without_pytest() -> None:
    code = ("import sys; sys.modules['pytest'] = None; import statebackends.testing as t; "
            "print(t.BackendContract.__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "BackendContract", run.stderr


class FallsBackToAnyOpen(ThreadLocalStore):
    """Asked without an id where its own thread has nothing, hands out any open invocation's state.

    Its states come from ``dict``, so they are all ``{}``: falsy, yet another invocation's.
    """

    name = "falls_back_to_any_open"

    def __init__(self, factory: Any) -> None:
        super().__init__(factory)
        self._all: list[Scope] = []
        self._ids = iter(range(1 << 30))

    def begin(self, owner: Any, invocation_id: Any = None) -> Scope:
        scope = super().begin(owner, invocation_id if invocation_id is not None else f"gen-{next(self._ids)}")
        self._all.append(scope)
        return scope

    def current(self, owner: Any = None, invocation_id: Any = None) -> Any:
        here = super().current(owner, invocation_id)
        if here is None and invocation_id is None:
            others = [s for s in list(self._all) if not s.ended]
            return others[0].state if others else None
        return here


def test_another_threads_falsy_state_is_still_another_threads_state() -> None:
    """The threads observation compares with ``is None``: a leak of an empty ``{}`` state is caught too."""
    observation = observe(FallsBackToAnyOpen, Concurrency.THREADS, dict)
    assert not observation.isolated and "another" in observation.detail, observation
