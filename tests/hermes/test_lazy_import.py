"""``instrument()`` imports nothing of Hermes: Hermes's modules are wrapped when Hermes imports them.

Hermes's CLI applies ``-p PROFILE`` (it sets ``HERMES_HOME``) when ``hermes_cli.main`` is imported, "before any
hermes module import": modules such as ``tools.skills_tool`` and ``tools.process_registry`` fix their home paths
when first imported. Under ``opentelemetry-instrument`` our ``instrument()`` runs before the program; had it imported
``run_agent`` there, those paths would point at the root home, not at the profile. Each test runs a fresh
interpreter (subprocess), with ``HOME`` in a temporary folder and nothing reachable beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

PROFILE = "work"

# Hermes's own entry: the `hermes` command is hermes_cli.main:main, and importing that module applies -p.
PROBE = textwrap.dedent(
    """
    import json, sys
    imported_before = sorted(m for m in ("run_agent", "tools.delegate_tool", "tools.skills_tool") if m in sys.modules)
    from statebackends_hermes_testbed.hermes_harness import loopback_only
    with loopback_only() as guard:
        sys.argv = ["hermes", "-p", %(profile)r, "config", "path"]
        from hermes_cli.main import main
        try:
            main()
        except SystemExit:
            pass
        import tools.process_registry, tools.skills_tool
        import run_agent
    wrapper = getattr(run_agent.AIAgent.__dict__["run_conversation"], "_self_wrapper", None)
    print("PROBE " + json.dumps({
        "imported_before": imported_before,
        "skills_home": str(tools.skills_tool.HERMES_HOME),
        "checkpoint_path": str(tools.process_registry.CHECKPOINT_PATH),
        "ours_on_run_conversation": getattr(wrapper, "__module__", None) == "statebackends_hermes_agent.wrappers",
        "blocked": [list(b) for b in guard.blocked],
    }))
    """
) % {"profile": PROFILE}


LOONGSUITE_ENTRY_POINT = "hermes-agent"
"""loongsuite-instrumentation-hermes-agent's opentelemetry_instrumentor entry point."""


def _env(home: Path, disabled: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERMES_", "OTEL_"))}
    env.update(HOME=str(home), OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    if disabled:
        env["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = disabled
    return env


def _run(cmd: list[str], home: Path, cwd: Path, disabled: str = "") -> dict[str, Any]:
    proc = subprocess.run(cmd, env=_env(home, disabled), cwd=cwd, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(lines[-1][len("PROBE "):])


def test_hermes_profile_reaches_its_import_time_paths_under_opentelemetry_instrument(tmp_path: Path) -> None:
    """`hermes -p work` through Hermes's entry, plain and under opentelemetry-instrument: the same profile paths, and
    under opentelemetry-instrument nothing of Hermes was imported before Hermes's own import, which got wrapped."""
    home = tmp_path / "home"
    profile = home / ".hermes" / "profiles" / PROFILE
    profile.mkdir(parents=True)
    (tmp_path / "probe.py").write_text(PROBE)
    instrument = Path(sys.executable).with_name("opentelemetry-instrument")
    plain = _run([sys.executable, "probe.py"], home, tmp_path)
    # Ours alone: loongsuite's Hermes instrumentation (the compare set) imports run_agent in its instrument().
    traced = _run([str(instrument), sys.executable, "probe.py"], home, tmp_path, disabled=LOONGSUITE_ENTRY_POINT)
    assert plain["skills_home"] == str(profile) and plain["checkpoint_path"] == str(profile / "processes.json")
    assert (traced["skills_home"], traced["checkpoint_path"]) == (plain["skills_home"], plain["checkpoint_path"])
    assert traced["imported_before"] == [] and traced["ours_on_run_conversation"] is True
    assert plain["ours_on_run_conversation"] is False
    assert plain["blocked"] == traced["blocked"] == []
    from statebackends_hermes_testbed.modes import loongsuite_available

    if loongsuite_available():  # KNOWN-BAD, theirs: loongsuite 0.9.0's instrument() imports run_agent at start-up
        both = _run([str(instrument), sys.executable, "probe.py"], home, tmp_path)
        assert both["skills_home"] == str(home / ".hermes"), both


HOOKS = textwrap.dedent(
    """
    import json, logging, sys
    from wrapt import importer
    import statebackends_hermes_agent as sha
    from statebackends_hermes_agent import HermesAgentInstrumentor

    TARGETS = [(m, n) for m, n, _ in sha._WRAPPED]

    def ours(module, name):
        owner = sys.modules[module]
        *path, attribute = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        node, count = vars(owner)[attribute], 0
        while hasattr(node, "_self_wrapper"):
            count += getattr(node._self_wrapper, "__module__", None) == "statebackends_hermes_agent.wrappers"
            node = node.__wrapped__
        return count

    def pending():
        return sum(isinstance(h, sha._WrapOnImport) for hooks in importer._post_import_hooks.values() for h in hooks or ())

    out = {}
    inst = HermesAgentInstrumentor()
    if sys.argv[1] == "twice":  # instrument, uninstrument, instrument, then Hermes imports its modules
        inst.instrument(state_backend="contextvar")
        out["imported_after_instrument"] = [m for m in ("run_agent", "tools.delegate_tool") if m in sys.modules]
        inst.uninstrument()
        out["pending_after_uninstrument"] = pending()
        inst.instrument(state_backend="contextvar")
        out["pending_after_reinstrument"] = pending()
        import run_agent, tools.delegate_tool
        out["ours"] = [ours(m, n) for m, n in TARGETS]
        out["pending_after_import"] = pending()
        inst.uninstrument()
        out["ours_after_uninstrument"] = [ours(m, n) for m, n in TARGETS]
    elif sys.argv[1] == "never":  # instrument, uninstrument, then the import: nothing wrapped
        inst.instrument(state_backend="contextvar")
        inst.uninstrument()
        import run_agent, tools.delegate_tool
        out["ours"] = [ours(m, n) for m, n in TARGETS]
    elif sys.argv[1] == "already":  # Hermes imported first: wrapped at once
        import run_agent, tools.delegate_tool
        inst.instrument(state_backend="contextvar")
        out["ours"] = [ours(m, n) for m, n in TARGETS]
        out["pending"] = pending()
    elif sys.argv[1] == "failing":  # a wrap that raises inside the hook: Hermes's import still succeeds
        records = []
        logging.getLogger("statebackends_hermes_agent").addHandler(type("H", (logging.Handler,), {
            "emit": lambda self, record: records.append(record.getMessage())})())
        real = sha.wrap_function_wrapper
        def broken(module, *args, **kwargs):  # breaks on Hermes's modules only (threading's hook is installed at once)
            if getattr(module, "__name__", module) in sha._MODULES:
                raise RuntimeError("broken wrapt")
            return real(module, *args, **kwargs)
        sha.wrap_function_wrapper = broken
        inst.instrument(state_backend="contextvar")
        import run_agent, tools.delegate_tool
        out["imported"] = hasattr(run_agent, "AIAgent") and hasattr(tools.delegate_tool, "_build_child_agent")
        out["logged"] = sum("could not wrap" in r for r in records)
    print("HOOKS " + json.dumps(out))
    """
)


def _hooks(case: str, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "hooks.py").write_text(HOOKS)
    (tmp_path / "home").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "hooks.py", case], env=_env(tmp_path / "home"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("HOOKS ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(lines[-1][len("HOOKS "):])


def test_instrument_uninstrument_instrument_before_the_import_leaves_one_live_wrapping(tmp_path: Path) -> None:
    out = _hooks("twice", tmp_path)
    assert out["imported_after_instrument"] == []
    assert out["pending_after_uninstrument"] == 0, "uninstrument left a post-import hook registered"
    assert out["pending_after_reinstrument"] == 2  # one per module: run_agent, tools.delegate_tool
    assert out["ours"] == [1] * len(out["ours"]) and out["pending_after_import"] == 0
    assert out["ours_after_uninstrument"] == [0] * len(out["ours"])


@pytest.mark.parametrize(("case", "expected"), [("never", 0), ("already", 1)])
def test_hooks_wrap_only_while_instrumented_and_at_once_when_hermes_is_imported(
    tmp_path: Path, case: str, expected: int
) -> None:
    out = _hooks(case, tmp_path)
    assert out["ours"] == [expected] * len(out["ours"])
    if case == "already":
        assert out["pending"] == 0


def test_a_wrap_that_fails_in_the_hook_never_fails_hermess_import(tmp_path: Path) -> None:
    out = _hooks("failing", tmp_path)
    assert out["imported"] is True and out["logged"] == 8


# -- instrument() while Hermes is still importing run_agent --------------------------------------------------------------
#
# `import run_agent` imports model_tools before it defines AIAgent, and model_tools runs Hermes's plugin discovery at
# import: an enabled Hermes plugin's register(ctx) runs while run_agent is in sys.modules, partly executed. A plugin
# that turns tracing on there (the natural place inside Hermes's CLI, gateway or any app that imports run_agent),
# or an instrument() in another thread during that import, finds a run_agent without AIAgent yet.

PLUGIN = textwrap.dedent(
    """
    import sys, threading


    def register(ctx):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from statebackends_hermes_agent import HermesAgentInstrumentor

        app = sys.modules["__main__"]
        app.EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(app.EXPORTER))
        app.PARTIAL = "run_agent" in sys.modules and not hasattr(sys.modules["run_agent"], "AIAgent")
        instrumentor = HermesAgentInstrumentor()
        try:
            if app.MODE == "thread":  # another thread instruments while this one is inside Hermes's import
                worker = threading.Thread(target=instrumentor.instrument, kwargs={"tracer_provider": provider})
                worker.start()
                worker.join()
            else:
                instrumentor.instrument(tracer_provider=provider)
            if app.MODE == "uninstrument":
                instrumentor.uninstrument()
        except BaseException as exc:
            app.RAISED = repr(exc)
    """
)

PLUGGED = textwrap.dedent(
    """
    import json, logging, sys, types
    from pathlib import Path

    from statebackends_hermes_testbed.fakellm import FakeLLMServer
    from statebackends_hermes_testbed.hermes_harness import hermes_home, loopback_only, make_agent

    MODE, RAISED, PARTIAL, EXPORTER = sys.argv[1], None, None, None
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("statebackends_hermes_agent").addHandler(handler)
    with hermes_home(Path("home")) as home, FakeLLMServer() as llm, loopback_only() as guard:
        plugin = home / "plugins" / "tracing"
        plugin.mkdir(parents=True)
        (plugin / "plugin.yaml").write_text("name: tracing\\nversion: 0.1.0\\ndescription: OpenTelemetry tracing\\n")
        (plugin / "__init__.py").write_text(Path("plugin.py").read_text())
        config = home / "config.yaml"
        config.write_text(config.read_text() + "plugins:\\n  enabled: [tracing]\\n")
        import run_agent  # its model_tools import discovers the plugins: register() runs before AIAgent exists
        plain = type(run_agent) is types.ModuleType
        result = make_agent(llm.base_url).run_conversation("[conv:plug] [tools:1] hello")
    print("PLUGGED " + json.dumps({
        "partial_at_register": PARTIAL,
        "raised": RAISED,
        "final": result.get("final_response"),
        "plain_module_after_import": plain,
        "plain_module_after_turn": type(run_agent) is types.ModuleType,
        "spans": sorted(s.name.split(" ")[0] for s in EXPORTER.get_finished_spans()) if EXPORTER else None,
        "logged": [r.getMessage() for r in records],
        "blocked": [list(b) for b in guard.blocked],
    }))
    """
)


def _plugged(mode: str, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "plugged.py").write_text(PLUGGED)
    (tmp_path / "plugin.py").write_text(PLUGIN)
    proc = subprocess.run([sys.executable, "plugged.py", mode], env=_env(tmp_path / "home"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PLUGGED ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(lines[-1][len("PLUGGED "):])


@pytest.mark.parametrize("mode", ["plugin", "thread"])
def test_instrument_while_hermes_imports_run_agent_traces_its_turns(tmp_path: Path, mode: str) -> None:
    """instrument() from an enabled Hermes plugin's register() (inside `import run_agent`), or from another thread
    during that import: run_agent is wrapped once its import has defined it, and a real turn is traced whole."""
    out = _plugged(mode, tmp_path)
    assert out["partial_at_register"] is True  # the case under test: AIAgent not defined yet
    assert out["raised"] is None and out["final"] and out["blocked"] == []
    assert out["logged"] == [], out["logged"]  # no 'has no run_agent.AIAgent...' for a release that has them all
    assert out["spans"] == ["chat", "chat", "execute_tool", "invoke_agent", "react", "react"], out["spans"]
    assert out["plain_module_after_turn"] is True  # run_agent is a plain module again once wrapped


def test_uninstrument_while_hermes_imports_run_agent_leaves_it_untouched(tmp_path: Path) -> None:
    out = _plugged("uninstrument", tmp_path)
    assert out["partial_at_register"] is True
    assert out["raised"] is None and out["final"] and out["logged"] == []
    assert out["spans"] == [] and out["plain_module_after_import"] is True
