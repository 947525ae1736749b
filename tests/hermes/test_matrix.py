"""The correctness matrix in pytest: one test per backend x scenario, expected outcome from the declarations.

A cell must be ok exactly when its backend declares (``isolates``) everything the
scenario requires. A known-bad cell that starts passing FAILS too: the
declaration (or the scenario) is then wrong and must be fixed, not ignored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from statebackends_hermes_testbed.matrix import run_cell
from statebackends_hermes_testbed.scenarios import SCENARIOS, expected_ok
from statebackends import Concurrency, available
from statebackends_hermes_testbed.table import isolation_table

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = list(available())
OVERLAPPING = {Concurrency.THREADS, Concurrency.ASYNC_TASKS}


@pytest.fixture(scope="session")
def matrix_bench(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The session's ``hermes_bench`` (tests/conftest.py) when there is one, else a bench of our own."""
    try:
        bench = request.getfixturevalue("hermes_bench")
    except pytest.FixtureLookupError:
        bench = None
    if bench is not None:
        yield bench
        return
    from statebackends_hermes_testbed.driver import HermesBench

    own = HermesBench()
    try:
        yield own
    finally:
        own.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_cell(matrix_bench: Any, scenario: Any, backend: str) -> None:
    try:
        cell = run_cell(matrix_bench, scenario, backend)
    finally:
        matrix_bench.uninstrument()  # leave the shared bench as the other tests expect it
        matrix_bench.reset()
    assert cell.error is None, f"{scenario.id} x {backend} raised: {cell.error}"
    verdict = cell.verdict
    requires = ", ".join(sorted(c.value for c in scenario.requires)) or "nothing"
    if cell.expected:
        assert verdict.ok, (
            f"{backend} declares it isolates {requires}, but {scenario.id} broke: {verdict.summary()}; {verdict.notes[:5]}"
        )
    else:
        assert not verdict.ok, (
            f"{backend} does not declare {requires}, yet {scenario.id} passed: "
            "fix the backend's `isolates` declaration or the scenario"
        )
    if backend == "instance" and scenario.requires & OVERLAPPING:
        assert verdict.orphans + verdict.cross_talk > 0, (
            f"the instance backend's corruption under {scenario.id} is not visible: {verdict.as_dict()}"
        )


def test_expectations_come_from_the_declarations() -> None:
    for scenario in SCENARIOS:
        for backend in BACKENDS:
            isolates = available()[backend]
            declared = getattr(isolates, "isolates", None)
            if declared is not None:
                assert expected_ok(scenario, backend) == (scenario.requires <= declared)


def test_matrix_cli_prints_valid_json() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "statebackends_hermes_testbed.matrix", "--scenario", "sequential", "--backend", "contextvar", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["total"] == 1 and data["as_expected"] == 1
    (cell,) = data["cells"]
    assert (cell["backend"], cell["scenario"], cell["expected"], cell["ok"]) == ("contextvar", "sequential", True, True)
    assert cell["verdict"]["summary"] == "ok"
    stamp = data["stamp"]
    assert stamp["python"] and stamp["cpu_count"]
    assert all(stamp["versions"][d] for d in ("hermes-agent", "opentelemetry-sdk", "statebackends"))
    assert data["callers"] == 8


def test_matrix_cli_names_the_valid_choices_for_a_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    from statebackends_hermes_testbed.matrix import main

    assert main(["--backend", "fibers"]) == 2
    err = capsys.readouterr().err
    assert "'fibers'" in err and all(name in err for name in BACKENDS)
    assert main(["--scenario", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and all(s.id in err for s in SCENARIOS)


def test_isolation_table_is_made_from_the_declarations() -> None:
    table = isolation_table()
    for name in ("contextvar", "instance", "invocation_id", "otel_context", "threadlocal"):
        assert f"`{name}`" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert rows["asyncio tasks on one loop"].count("**no**") == 2  # instance, threadlocal


def test_readme_embeds_the_current_isolation_table() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert isolation_table() in readme, "README's backend table drifted: paste isolation_table()"


def _late_trace(parent_kind: str | None) -> Any:
    """One finished call (``late``: one step, one tool) and a late-work span under ``parent_kind`` (None: a root)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from statebackends_hermes_testbed.traces import LATE_TOOL, CallTruth, judge

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    made: dict[str, Any] = {}
    with tracer.start_as_current_span("call late"):
        with tracer.start_as_current_span("invoke_agent hermes") as made["invoke_agent"]:
            with tracer.start_as_current_span("react step") as made["step"]:
                with tracer.start_as_current_span("chat fake-model"):
                    pass
                with tracer.start_as_current_span("execute_tool sb_late") as made["execute_tool"]:
                    pass
    context = trace.set_span_in_context(made[parent_kind]) if parent_kind else None
    tracer.start_span(f"execute_tool {LATE_TOOL}", context=context).end()
    truth = CallTruth(tag="late", steps=1, chats=1, tools=1, late=1)
    return judge(exporter.get_finished_spans(), [truth])


@pytest.mark.parametrize(("parent_kind", "ok"), [(None, True), ("execute_tool", True), ("step", False), ("invoke_agent", False)])
def test_judge_keeps_late_work_out_of_the_ended_call(parent_kind: str | None, ok: bool) -> None:
    """Late work may start a trace of its own or hang under the tool that started it; never in the call's own tree."""
    verdict = _late_trace(parent_kind)
    assert verdict.ok is ok, verdict.as_dict()
    assert verdict.actual["late_work"] == 1
    assert (verdict.broken == ["late"]) is not ok
