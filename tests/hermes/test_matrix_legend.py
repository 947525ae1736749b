"""The words under the matrix table: each ``requires`` word in a user's words, why a cell that is not ``ok`` can be
expected, the exit code, and one "Next:" line that depends on what the run found. Built from cells made here (no run)."""

from __future__ import annotations

from typing import Any

import pytest

from statebackends import Concurrency
from statebackends_hermes_testbed.legend import EXIT_CODES, REQUIRES
from statebackends_hermes_testbed.matrix import UNEXPECTED, Cell, markdown
from statebackends_hermes_testbed.scenarios import BY_ID
from statebackends_hermes_testbed.traces import Verdict

STAMP: dict[str, Any] = {"implementation": "CPython", "python": "3.11", "cpu_count": 2, "platform": "linux", "versions": {}}
OK = Verdict(expected={"chat": 1}, actual={"chat": 1})
BROKEN = Verdict(expected={"chat": 2}, actual={"chat": 1}, orphans=1)


def cell(scenario: str, backend: str, expected: Any, verdict: Verdict) -> Cell:
    return Cell(scenario=BY_ID[scenario], backend=backend, expected=expected, verdict=verdict)


def table(cells: list[Cell]) -> str:
    backends = list(dict.fromkeys(c.backend for c in cells))
    scenarios = [BY_ID[i] for i in dict.fromkeys(c.scenario.id for c in cells)]
    return markdown(cells, backends, scenarios, STAMP, 1.0)


def test_every_requires_word_has_user_words() -> None:
    assert set(REQUIRES) == set(Concurrency)
    assert all(text and "\n" not in text for text in REQUIRES.values())


def test_the_legend_explains_the_words_of_the_rows_run_the_expected_failures_and_the_exit_code() -> None:
    cells = [cell("threads", "invocation_id", True, OK), cell("threads", "instance", False, BROKEN),
             cell("shared_task_id_raw", "invocation_id", False, BROKEN), cell("shared_task_id_raw", "instance", False, BROKEN)]
    text = table(cells)
    assert "1/4 cells ok; 4/4 as their backends declare, 3 of them not ok where declared" in text
    for word in BY_ID["shared_task_id_raw"].requires:  # threads, raw_thread, shared_id, shared_id_raw_thread
        assert f"  - `{word.value}`: {REQUIRES[word]}" in text
    assert f"`{Concurrency.GREENLETS.value}`:" not in text  # only the words of the rows run
    assert "is expected wherever the backend does not declare everything the row `requires`" in text
    assert EXIT_CODES in text
    (next_line,) = [line for line in text.splitlines() if line.startswith("Next: ")]
    assert "keep the default backend, `invocation_id` (ok in 1 of 2 rows here" in next_line
    assert "docs/examples/hermes-app/app.py" in next_line


def test_next_names_a_surprise_and_how_to_rerun_it() -> None:
    cells = [cell("threads", "invocation_id", True, OK), cell("delegate", "contextvar", True, BROKEN)]
    text = table(cells)
    assert f"({1} {UNEXPECTED})" in text
    (next_line,) = [line for line in text.splitlines() if line.startswith("Next: ")]
    assert next_line == ("Next: 1 cell(s) behave otherwise than their backend declares on this machine (the exit code "
                         "is 1): rerun one with `statebackends-matrix --backend contextvar --scenario delegate --json` "
                         "and report what it prints.")


@pytest.mark.parametrize(("delegate_ok", "says"), [(False, "(delegate) gets wrong traces from it"),
                                                    (True, "`x:Y` traced every row right here.")])
def test_next_for_another_instrumentation(delegate_ok: bool, says: str) -> None:
    cells = [cell("threads", "x:Y", None, OK), cell("delegate", "x:Y", None, OK if delegate_ok else BROKEN)]
    text = table(cells)
    assert "The column of another instrumentation has no declarations" in text
    assert "is expected wherever" not in text
    (next_line,) = [line for line in text.splitlines() if line.startswith("Next: ")]
    assert says in next_line


@pytest.mark.parametrize(("column", "see_ours"), [
    ("x:Y", "run the same rows without `--instrumentor` to see ours."),
    ("otel_tracing", "run the same rows with `--backend invocation_id` beside `--hermes-plugin otel_tracing` to see ours."),
])
def test_next_for_another_column_names_the_flag_that_made_it(column: str, see_ours: str) -> None:
    """A Hermes plugin's column comes from --hermes-plugin (was: 'without `--instrumentor`' for it too)."""
    text = table([cell("delegate", column, None, BROKEN)])
    (next_line,) = [line for line in text.splitlines() if line.startswith("Next: ")]
    assert next_line.endswith(see_ours), next_line
