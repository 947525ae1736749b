"""The distribution as ``opentelemetry-instrument`` sees it: metadata, dependency checks, backend from the environment.

The subprocess tests run the real ``opentelemetry-instrument`` CLI of the virtualenv on a tiny app.
A throw-away distribution on ``PYTHONPATH`` (``sb_test_hooks``) gives them two things through
entry points: an ``opentelemetry_pre_instrument`` hook, which runs before any instrumentor is loaded
and sends log records to stderr as ``LOG <LEVEL> <logger>: <message>`` (and, when asked, makes
``importlib.metadata`` report hermes-agent as not installed), and a ``statebackends`` plugin
``exploding`` whose constructor raises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import distribution, entry_points
from pathlib import Path
from typing import Optional

import pytest
from packaging.requirements import Requirement

from statebackends_hermes_agent import HermesAgentInstrumentor
from statebackends_hermes_agent.package import _instruments

DIST = "statebackends-instrumentation-hermes-agent"
ENTRY_POINT = "statebackends_hermes_agent"
ENV_HERMES = "OTEL_INSTRUMENTATION_HERMES_AGENT_STATE_BACKEND"
OTHER_HERMES_INSTRUMENTATION = "hermes-agent"
"""loongsuite-instrumentation-hermes-agent's entry-point name."""
CLI = Path(sys.executable).parent / "opentelemetry-instrument"

APP = """
import run_agent
from statebackends_hermes_agent import HermesAgentInstrumentor
print("wrapped", hasattr(vars(run_agent.AIAgent)["run_conversation"], "__wrapped__"))
print("backend", HermesAgentInstrumentor().state_backend)
"""

HOOKS = '''
import importlib.metadata
import logging
import os
import sys


class HideHermes:
    """A meta-path finder that answers "not installed" for the hermes-agent distribution (modules still import)."""

    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        if name and name.replace("_", "-").lower() == "hermes-agent":
            raise importlib.metadata.PackageNotFoundError(name)
        return iter(())


def pre_instrument():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("LOG %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("opentelemetry.instrumentation.auto_instrumentation").setLevel(logging.DEBUG)
    if os.environ.get("SB_TEST_HIDE_HERMES"):
        sys.meta_path.insert(0, HideHermes())


from statebackends import StateStore


class ExplodingStore(StateStore):
    """A registered state backend (a real StateStore subclass) whose constructor raises."""

    name = "exploding"

    def __init__(self, factory):
        raise RuntimeError("the exploding backend cannot be built")

    def current(self, owner, invocation_id=None):
        return None

    def propagate(self, fn):
        return fn

    def _enter(self, scope):
        return None

    def _exit(self, scope):
        pass
'''


# -- metadata -------------------------------------------------------------------------------------------------------


def test_instruments_extra_equals_package_instruments() -> None:
    requires = distribution(DIST).requires or []
    extra = [Requirement(r) for r in requires if "extra" in r and "instruments" in r]
    assert extra, requires
    assert all(req.marker is not None and req.marker.evaluate({"extra": "instruments"}) for req in extra)
    got = sorted((req.name, str(req.specifier)) for req in extra)
    want = sorted((req.name, str(req.specifier)) for req in map(Requirement, _instruments))
    assert got == want
    assert list(HermesAgentInstrumentor().instrumentation_dependencies()) == list(_instruments)


def test_entry_point_name_and_target() -> None:
    ours = [ep for ep in entry_points(group="opentelemetry_instrumentor") if ep.value.startswith("statebackends_hermes_agent")]
    assert [ep.name for ep in ours] == [ENTRY_POINT]
    assert ours[0].value == "statebackends_hermes_agent:HermesAgentInstrumentor"
    assert ours[0].dist is not None and ours[0].dist.metadata["Name"] == DIST


# -- opentelemetry-instrument ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the ``sb_test_hooks`` module and its dist-info (entry points), to put on ``PYTHONPATH``."""
    folder = tmp_path_factory.mktemp("hooks")
    (folder / "sb_test_hooks.py").write_text(HOOKS)
    info = folder / "sb_test_hooks-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-test-hooks\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        "[opentelemetry_pre_instrument]\nsb_test_hooks = sb_test_hooks:pre_instrument\n\n"
        "[statebackends]\nexploding = sb_test_hooks:ExplodingStore\n"
    )
    return folder


@pytest.fixture(scope="module")
def old_hermes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose only content is the metadata of a hermes-agent 0.12.0 (outside our range)."""
    folder = tmp_path_factory.mktemp("oldhermes")
    info = folder / "hermes_agent-0.12.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hermes-agent\nVersion: 0.12.0\n")
    return folder


def run_instrumented(
    tmp_path: Path, hooks: Path, *, extra_path: Optional[Path] = None, env: Optional[dict[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    """``opentelemetry-instrument python -c APP`` with a private HOME, no exporters and the hooks on ``PYTHONPATH``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "STATEBACKENDS_")) and k not in ("PYTHONPATH", "SB_TEST_HIDE_HERMES")
    }
    paths = [str(p) for p in (extra_path, hooks) if p is not None]
    full = {
        **base,
        "HOME": str(tmp_path),
        "HERMES_HOME": str(tmp_path / ".hermes"),
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        # loongsuite's Hermes instrumentation (entry point "hermes-agent", in the compare set) wraps the
        # same methods: keep it off so "wrapped" speaks of ours alone.
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": OTHER_HERMES_INSTRUMENTATION,
        "PYTHONPATH": os.pathsep.join(paths),
        **(env or {}),
    }
    out = subprocess.run(
        [str(CLI), sys.executable, "-c", APP], capture_output=True, text=True, env=full, timeout=180, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def instruments_requirement() -> str:
    """The ``instruments`` requirement as the metadata spells it (what the dependency-conflict message quotes)."""
    (req,) = [r for r in distribution(DIST).requires or [] if "extra" in r and "instruments" in r]
    return req


def log_lines(out: subprocess.CompletedProcess[str], level: str) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith(f"LOG {level} ")]


def test_the_hooks_work_and_the_instrumentor_is_applied(tmp_path: Path, hooks: Path) -> None:
    """The control: with the installed hermes-agent visible, ``opentelemetry-instrument`` applies ours with the default backend."""
    out = run_instrumented(tmp_path, hooks)
    assert "wrapped True" in out.stdout and "backend invocation_id" in out.stdout, out.stdout + out.stderr[-2000:]
    assert any(f"Instrumented {ENTRY_POINT}" in line for line in log_lines(out, "DEBUG")), out.stderr[-2000:]
    assert log_lines(out, "ERROR") == []


@pytest.mark.parametrize("variable", [ENV_HERMES, "STATEBACKENDS_BACKEND"])
def test_the_backend_comes_from_the_environment(tmp_path: Path, hooks: Path, variable: str) -> None:
    """Under ``opentelemetry-instrument`` the backend named by either environment variable is the one in use."""
    out = run_instrumented(tmp_path, hooks, env={variable: "contextvar"})
    assert "wrapped True" in out.stdout and "backend contextvar" in out.stdout, out.stdout + out.stderr[-2000:]
    assert log_lines(out, "ERROR") == []


def test_skipped_when_hermes_agent_is_not_installed(tmp_path: Path, hooks: Path) -> None:
    out = run_instrumented(tmp_path, hooks, env={"SB_TEST_HIDE_HERMES": "1"})
    assert "wrapped False" in out.stdout and "backend None" in out.stdout, out.stdout
    # opentelemetry-instrumentation >= 0.61 words it as below; 0.60b1 (the compare set) logs
    # "Skipping instrumentation <name>: <the missing requirement's name>".
    message = (
        f'{ENTRY_POINT} only instruments "{instruments_requirement()}", but no installed version was found, '
        "so nothing can be instrumented."
    )
    older = f"Skipping instrumentation {ENTRY_POINT}: hermes-agent"
    assert any(message in line or line.endswith(older) for line in log_lines(out, "DEBUG") + log_lines(out, "ERROR")), out.stderr[-3000:]
    assert not any(f"Instrumented {ENTRY_POINT}" in line for line in out.stderr.splitlines())


def test_skipped_when_hermes_agent_is_outside_the_range(tmp_path: Path, hooks: Path, old_hermes: Path) -> None:
    out = run_instrumented(tmp_path, hooks, extra_path=old_hermes)
    assert "wrapped False" in out.stdout and "backend None" in out.stdout, out.stdout
    message = (
        f'{ENTRY_POINT} only instruments "{instruments_requirement()}", but currently installed version '
        '("hermes-agent 0.12.0") falls outside of that range, so nothing can be instrumented.'
    )
    older = f'Skipping instrumentation {ENTRY_POINT}: DependencyConflict: requested: "{instruments_requirement()}" but found: "hermes-agent 0.12.0"'
    assert [line for line in log_lines(out, "ERROR") + log_lines(out, "DEBUG") if message in line or older in line], out.stderr[-3000:]


def test_disabled_by_otel_python_disabled_instrumentations(tmp_path: Path, hooks: Path) -> None:
    out = run_instrumented(tmp_path, hooks, env={"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": f"requests, {OTHER_HERMES_INSTRUMENTATION}, {ENTRY_POINT}"})
    assert "wrapped False" in out.stdout and "backend None" in out.stdout, out.stdout
    assert any(f"Instrumentation skipped for library {ENTRY_POINT}" in line for line in log_lines(out, "DEBUG"))


@pytest.mark.parametrize("value", ["exploding", "fibers"])
def test_bad_backend_in_the_environment_logs_one_error_and_uses_the_default(
    tmp_path: Path, hooks: Path, value: str
) -> None:
    out = run_instrumented(tmp_path, hooks, env={ENV_HERMES: value})
    assert "wrapped True" in out.stdout and "backend invocation_id" in out.stdout, out.stdout + out.stderr[-3000:]
    errors = log_lines(out, "ERROR")
    assert len(errors) == 1, out.stderr[-3000:]
    (error,) = errors
    assert ENV_HERMES in error and repr(value) in error
    for name in ("contextvar", "instance", "invocation_id", "otel_context", "threadlocal"):
        assert name in error, error
    if value == "exploding":
        assert "the exploding backend cannot be built" in error, "the cause is named"


@pytest.mark.parametrize("value", ["exploding", "fibers"])
def test_bad_backend_kwarg_raises_value_error_from_instrument(tmp_path: Path, hooks: Path, value: str) -> None:
    """A bad ``state_backend=`` is the caller's bug: ``instrument()`` raises ``ValueError`` naming value, cause, names."""
    code = textwrap.dedent(
        f"""
        from statebackends_hermes_agent import HermesAgentInstrumentor
        instrumentor = HermesAgentInstrumentor()
        try:
            instrumentor.instrument(state_backend={value!r})
        except ValueError as exc:
            print("ValueError:", exc)
        print("instrumented", instrumentor.is_instrumented_by_opentelemetry)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STATEBACKENDS_"))}
    env.update(HOME=str(tmp_path), HERMES_HOME=str(tmp_path / ".hermes"), PYTHONPATH=str(hooks))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("ValueError:")]
    assert repr(value) in line
    for name in ("contextvar", "instance", "invocation_id", "otel_context", "threadlocal"):
        assert name in line, line
    if value == "exploding":
        assert "the exploding backend cannot be built" in line, "the cause is named"
    assert "instrumented False" in out.stdout


# -- Python versions: the README's claims are the distributions' requires-python ----------------------------------------

ROOT = Path(__file__).resolve().parents[2]
PYPROJECTS = {
    "`statebackends/`": ROOT / "pyproject.toml",
    "`instrumentation/hermes-agent/`": ROOT / "instrumentation" / "hermes-agent" / "pyproject.toml",
    "`instrumentation/hermes-agent-testbed/`": ROOT / "instrumentation" / "hermes-agent-testbed" / "pyproject.toml",
}


def _oldest_python(pyproject: Path) -> str:
    """The lowest Python ``requires-python`` admits, as ``3.N``."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["requires-python"])
    return next(f"3.{n}" for n in range(0, 30) if f"3.{n}.999" in spec)


def test_the_readmes_python_claims_are_the_distributions_requires_python() -> None:
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    oldest = {folder: _oldest_python(path) for folder, path in PYPROJECTS.items()}
    # The set-up commands install all three distributions: they need the highest of the three minimums, and
    # .ci/run runs them with exactly that Python (it reads the claim from the README).
    claim = re.search(r"Python \(>= (3\.\d+)\)", readme)
    assert claim is not None and claim.group(1) == max(oldest.values(), key=lambda v: int(v.split(".")[1])), oldest
    assert "grep -o -m1 'Python (>= 3" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # Each distribution's row of the layout table names its own minimum.
    for folder, version in oldest.items():
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| {folder} |")]
        assert f"Python >= {version} " in row, (folder, version, row)
