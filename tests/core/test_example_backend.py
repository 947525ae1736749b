"""The README's third-party backend example: registered by entry point, checked with the conformance kit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import statebackends
from statebackends.testing import RULES, check_backend

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "third-party-backend"


@pytest.fixture
def example_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example's source on sys.path with a dist-info that registers its entry point, as pip would."""
    info = tmp_path / "statebackends_example_threadident-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: statebackends-example-threadident\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[statebackends]\nthreadident = statebackends_example_threadident:ThreadIdentStore\n"
    )
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path))
    statebackends.invalidate_caches()
    yield tmp_path
    sys.modules.pop("statebackends_example_threadident", None)
    statebackends.invalidate_caches()


def test_example_backend_resolves_by_name_and_conforms(example_installed: Path) -> None:
    store = statebackends.get_store("threadident", dict)
    assert type(store).__name__ == "ThreadIdentStore"
    assert check_backend(type(store)) == []


def test_example_backend_contract_suite_runs_one_test_per_rule_and_model(example_installed: Path) -> None:
    from statebackends_example_threadident import ThreadIdentStore

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLE / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(EXAMPLE / "tests")],
        cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = int(re.search(r"(\d+) passed", proc.stdout).group(1))
    assert passed == len(RULES) + len(ThreadIdentStore.isolates) + 1, proc.stdout


def test_example_backend_claiming_more_than_it_isolates_fails_the_kit(example_installed: Path) -> None:
    from statebackends_example_threadident import ThreadIdentStore

    class Overclaiming(ThreadIdentStore):  # a thread hop finds nothing, yet it claims the raw hop
        isolates = ThreadIdentStore.isolates | {statebackends.Concurrency.RAW_THREAD}

    failures = check_backend(Overclaiming)
    assert [f.check for f in failures] == [statebackends.Concurrency.RAW_THREAD.value], failures
