"""``python -m benchmarks.report``: where it writes, and what it prints for a ratio a busy machine made unreadable.

The pipeline runs once on tiny settings (every measurement, about 20 s); ``main`` is then driven with that
data in a temporary working folder.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report
from statebackends_hermes_testbed.modes import NONE

TINY = {"state_repeats": 1, "isolated_repeats": 1, "isolated_calls": 3, "paired_repeats": 4, "paired_calls": 1,
        "n_repeats": 1, "ns": (1, 2), "total_calls": 2, "correctness_calls": 2, "retained_invocations": 1000}


@pytest.fixture(scope="module")
def tiny_data() -> dict[str, Any]:
    return report.run(True, overrides=TINY, log=report.Log(quiet=True))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_data: dict[str, Any]) -> Path:
    """A working folder of its own, ``report.run`` answering with the tiny data at once."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "run", lambda *a, **k: copy.deepcopy(tiny_data))
    return tmp_path


# -- where it writes ---------------------------------------------------------------------------------------------------


def test_by_default_it_writes_to_an_untracked_folder(in_tmp: Path) -> None:
    assert report.main(["--quick", "--quiet"]) == 0
    assert sorted(p.name for p in (in_tmp / "benchmark-report").iterdir()) == ["overhead.png", "report.json", "report.md"]
    assert not (in_tmp / "docs").exists()
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text(encoding="utf-8").split()
    assert "/benchmark-report/" in ignored


def test_the_dated_figures_only_with_docs(in_tmp: Path) -> None:
    assert report.main(["--quick", "--quiet", "--docs"]) == 0
    assert (in_tmp / "docs" / "benchmarks" / "report.md").read_text(encoding="utf-8").startswith("# Benchmarks")
    assert not (in_tmp / "benchmark-report").exists()


def test_docs_and_out_together_is_a_usage_error(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        report.main(["--docs", "--out", "elsewhere"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not any(in_tmp.iterdir())


# -- ratios a busy machine made unreadable --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ci", "text"),
    [
        ((0.38, 0.37, 0.39), "0.38x [0.37, 0.39]"),
        ((1.81, 1.28, 2.78), "1.81x [1.28, 2.78]"),
        ((-9.88, -31.5, 12.25), "too wide to read (95% CI -31.50 to 12.25)"),
        ((0.4, -0.1, 0.9), "too wide to read (95% CI -0.10 to 0.90)"),
        ((1.0, 0.2, 4.5), "too wide to read (95% CI 0.20 to 4.50)"),
        ((0.5, math.nan, math.nan), "0.50x"),
        ((-1.2, math.nan, math.nan), "too wide to read (one repeat: -1.20)"),  # one noisy block, no interval
    ],
)
def test_a_ratio_is_printed_only_when_its_interval_can_be_read(ci: tuple[float, float, float], text: str) -> None:
    assert report._ci_x(ci) == text


def test_a_target_is_not_judged_on_an_unreadable_interval() -> None:
    assert report._verdict_upper((-9.88, -31.5, 12.25), 2.0) == "not judged: the interval is too wide to read"
    assert report._verdict_upper((1.45, 1.43, 1.48), 2.0) == "**met**"


def test_a_noisy_run_says_so_instead_of_printing_meaningless_ratios(tiny_data: dict[str, Any]) -> None:
    data = copy.deepcopy(tiny_data)
    per_call = data["paired"]["per_call"]
    noisy = next(m for m in per_call if m not in (NONE, report.LOONGSUITE) and not m.startswith("floor"))
    # The mode's overhead swings +-300 us around zero from repeat to repeat, as on a loaded machine.
    per_call[noisy] = [none + (3e-4 if i % 2 else -3e-4) for i, none in enumerate(per_call[NONE])]
    text = report.render(data, "python -m benchmarks.report", "now")
    row = next(line for line in text.splitlines() if line.startswith(f"| `{noisy}` | ") and "% |" in line)
    assert "too wide to read (95% CI" in row
    assert not re.search(r"(?<![\d.])-\d+\.\d+x", text), "a negative ratio was printed"
    lines = text.splitlines()
    assert lines[2].startswith("**") and "too wide to read**" in lines[2] and "--paired-repeats" in lines[2]
