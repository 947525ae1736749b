"""pytest-benchmark figures: state operations per backend against the bare primitives, and one full
``run_conversation`` per mode (uninstrumented, each backend, loongsuite when installed).

In the default run (``addopts = --benchmark-disable``) every benchmark body runs once as a
plain test and asserts what it produced (the state was visible, nothing left open, the
call completed, the spans were made); the whole module costs a few seconds (one agent
build). For figures::

    python -m pytest tests/hermes/test_benchmarks.py --benchmark-enable
    python -m pytest tests/hermes/test_benchmarks.py --benchmark-enable --benchmark-json=.benchmarks/run.json
    python -m pytest tests/hermes/test_benchmarks.py --benchmark-enable --benchmark-autosave
    python -m pytest tests/hermes/test_benchmarks.py --benchmark-enable --benchmark-compare   # against the last autosave

The state-op benchmarks run 1000 operations per round (``extra_info["ops_per_round"]``):
divide by 1000 for one operation. Overheads between modes measured in separate tests
are as noisy as the machine; the paired, interleaved figures are in
``python -m benchmarks.report``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from benchmarks import replay as rp, stateops, stats
from statebackends_hermes_testbed.modes import LOONGSUITE, NONE, loongsuite_skip_reason

ROOT = Path(__file__).resolve().parents[2]
SPANS_PER_CALL = 6  # invoke_agent, 2 x react step, 2 x chat, 1 x execute_tool for "[tools:1]"


# -- state operations ----------------------------------------------------------------------------


@pytest.fixture
def state_op(request: pytest.FixtureRequest) -> Iterator[stateops.StateOp]:
    subject, op = request.param
    with stateops.StateOp(subject, op) as opened:
        yield opened


SUBJECTS = stateops.state_subjects()


@pytest.mark.benchmark(group="state: current()")
@pytest.mark.parametrize("state_op", [(s, "current") for s in SUBJECTS], ids=SUBJECTS, indirect=True)
def test_state_current(benchmark: Any, state_op: stateops.StateOp) -> None:
    benchmark.extra_info["ops_per_round"] = stateops.BATCH
    seen = benchmark(state_op.run, stateops.BATCH)
    assert seen == {}, f"{state_op.subject}: current() inside an open invocation returned {seen!r}"


@pytest.mark.benchmark(group="state: begin+end")
@pytest.mark.parametrize("state_op", [(s, "begin_end") for s in SUBJECTS], ids=SUBJECTS, indirect=True)
def test_state_begin_end(benchmark: Any, state_op: stateops.StateOp) -> None:
    benchmark.extra_info["ops_per_round"] = stateops.BATCH
    left = benchmark(state_op.run, stateops.BATCH)
    assert not left, f"{state_op.subject}: {left!r} left after begin/end pairs"


# -- one full run_conversation ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_bench() -> Iterator[Any]:
    import run_agent  # noqa: F401 - hermes-agent comes with requirements-dev.txt: a missing one fails, never skips
    from statebackends_hermes_testbed.driver import HermesBench

    bench = HermesBench.timing(warm=[NONE])
    try:
        yield bench
    finally:
        bench.close()


MODES = [NONE] + stateops.backend_names() + [LOONGSUITE]


@pytest.mark.benchmark(group="run_conversation [tools:1]")
@pytest.mark.parametrize("mode", MODES)
def test_full_call(benchmark: Any, agent_bench: Any, mode: str) -> None:
    if mode == LOONGSUITE and agent_bench.theirs is None:
        pytest.skip(loongsuite_skip_reason())
    agent_bench.set_mode(mode)
    try:
        agent_bench.run("warm")
        calls = 0
        ended = agent_bench.spans_ended()

        def one() -> Any:
            nonlocal calls
            calls += 1
            return agent_bench.run()

        result = benchmark(one)
        spans = (agent_bench.spans_ended() - ended) / calls
    finally:
        agent_bench.set_mode(NONE)
        agent_bench.reset()
    assert agent_bench.completed(result), result
    benchmark.extra_info["spans_per_call"] = spans
    if mode == NONE:
        assert spans == 0
    elif mode == LOONGSUITE:
        assert spans > 0
    else:
        assert spans == SPANS_PER_CALL


@pytest.mark.benchmark(group="run_conversation [tools:1]")
def test_floor_spans(benchmark: Any, agent_bench: Any) -> None:
    """The floor: the span tree of one call started and ended with the bare SDK (same names and attributes)."""
    assert agent_bench.record_plan() == SPANS_PER_CALL
    ended = agent_bench.spans_ended()
    benchmark(agent_bench.floor_call)
    assert (agent_bench.spans_ended() - ended) % SPANS_PER_CALL == 0 and agent_bench.spans_ended() > ended


@pytest.mark.benchmark(group="wrappers alone (stub agent)")
@pytest.mark.parametrize("mode", stateops.backend_names() + [LOONGSUITE])
def test_wrappers_alone(benchmark: Any, agent_bench: Any, mode: str) -> None:
    """The wrappers an instrumentor installed, on a stub agent: what the instrumentation's own code costs."""
    if mode == LOONGSUITE and agent_bench.theirs is None:
        pytest.skip(loongsuite_skip_reason())
    replay = rp.WrapperReplay(agent_bench, mode)
    calls = 0

    def one() -> Any:
        nonlocal calls
        calls += 1
        return replay.call()

    ended = agent_bench.spans_ended()
    result = benchmark(one)
    assert result["final_response"] == "done stub"
    spans = (agent_bench.spans_ended() - ended) / calls
    if mode == LOONGSUITE:
        assert spans > 0
    else:
        assert spans == SPANS_PER_CALL
        assert not replay.store.live()


# -- the measuring code itself ------------------------------------------------------------------------


def test_bootstrap_interval_brackets_the_estimate() -> None:
    xs = [float(i % 7) for i in range(50)]
    est, lo, hi = stats.bootstrap_ci(xs, stats.mean)
    assert lo <= est <= hi and hi - lo < 2
    ratio, rlo, rhi = stats.bootstrap_ci([[2.0 * x + 1 for x in xs], [x + 0.5 for x in xs]], stats.ratio_of_means)
    assert ratio == pytest.approx(2.0) and rlo == pytest.approx(2.0) and rhi == pytest.approx(2.0)


def test_modules_import_without_side_effects() -> None:
    """asv imports every module of benchmarks/: ours must not import Hermes or instrument anything."""
    code = (
        "import sys, benchmarks.stateops, benchmarks.stats, benchmarks.timing, benchmarks.replay, benchmarks.report\n"
        "import benchmarks.bench_state, benchmarks.bench_hermes\n"
        "bad = [m for m in ('run_agent', 'statebackends_hermes_agent', 'opentelemetry.sdk.trace') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_asv_sees_only_the_bench_modules() -> None:
    import asv_runner  # noqa: F401 - asv is in the test extra: a missing one fails, never skips
    code = (
        "from asv_runner.discovery import disc_benchmarks\n"
        "names = sorted(b.name for b in disc_benchmarks('benchmarks'))\n"
        "print('\\n'.join(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                         capture_output=True, text=True).stdout.split()
    assert out, "asv discovered no benchmark"
    stray = [n for n in out if not n.startswith(("bench_state.", "bench_hermes."))]
    assert not stray, f"asv-visible names outside benchmarks/bench_*.py: {stray}"
    for expected in ("bench_state.StateOps.time_current", "bench_hermes.FullCall.time_run_conversation",
                     "bench_hermes.Correctness.track_correct_calls", "bench_state.StateMemory.peakmem_begin_end"):
        assert expected in out


def test_report_end_to_end_on_tiny_settings(agent_bench: Any, tmp_path: Path) -> None:
    """The report pipeline (every measurement, render, plot) on tiny settings: the tables are there."""
    import matplotlib  # noqa: F401 - in the test extra: a missing one fails, never skips
    from benchmarks import report

    tiny = {"state_repeats": 1, "isolated_repeats": 1, "isolated_calls": 3, "paired_repeats": 2, "paired_calls": 1,
            "n_repeats": 1, "ns": (1, 2), "total_calls": 2, "correctness_calls": 2, "retained_invocations": 1000,
            "carry_repeats": 2}
    data = report.run(True, overrides=tiny, log=report.Log(quiet=True))
    data["command"], data["stamp"] = "tiny", "now"
    text = report.render(data, "tiny", "now")
    for heading in ("## State operations per backend", "## Overhead of one full `run_conversation`",
                    "## Each instrumentation's wrappers alone", "## Making the chat current and carrying it",
                    "## Correctness under load", "## Time per call against", "## Targets"):
        assert heading in text
    assert set(data["carry"]) >= {"ours", "minimal"} and all(len(v) == 2 for v in data["carry"].values())
    assert "| ours: made current and carried | " in text and "about 1 µs" in text
    assert all(data["correctness"][b]["correct"] == 2 for b in ("contextvar", "invocation_id", "otel_context"))
    # The full calls wait on the fake LLM (so Hermes's log thread keeps up); nothing else does.
    delay = report.SETTINGS["llm_delay_ms"][0]
    assert delay > 0 and data["paired_directives"] == f"{agent_bench.directives}[delay_ms:{delay}]"
    assert f"waits {delay} ms per request" in text and "[delay_ms:" not in agent_bench.directives
    report.plot(data, tmp_path / "overhead.png", "now", "tiny")
    assert (tmp_path / "overhead.png").stat().st_size > 10_000


def _tree(spans: Any) -> list[tuple]:
    """(name, kind, attribute keys, parent's name) of each span, sorted: the shape a span tree records."""
    by_id = {s.context.span_id: s for s in spans}
    return sorted((s.name, s.kind.name, tuple(sorted(s.attributes or {})),
                   by_id[s.parent.span_id].name if s.parent is not None and s.parent.span_id in by_id else None)
                  for s in spans)


def test_lower_bound_wrappers_make_our_span_tree(agent_bench: Any) -> None:
    """The minimal wrappers of ``benchmarks.lower_bound`` make the same tree as ours (names, kinds, attribute keys,
    parents), so the lower bound is measured like for like."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from benchmarks import lower_bound
    from statebackends_hermes_testbed.driver import Recorder

    def spans_of(wrappers: Any, exporter: Any) -> list[tuple]:
        replay = rp.WrapperReplay(agent_bench, "x", wrappers=wrappers)
        exporter.clear()
        assert replay.call()["final_response"] == "done stub"
        return _tree(exporter.get_finished_spans())

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    minimal = spans_of(lower_bound.minimal_wrappers(agent_bench, provider), exporter)
    recorder = Recorder("test.lower_bound")
    installed, _ = rp.installed_ours(agent_bench, "invocation_id", recorder.provider)
    assert agent_bench.mode == NONE
    ours = spans_of(installed, recorder.exporter)
    assert len(ours) == SPANS_PER_CALL and minimal == ours


def test_path_costs_swap_one_path_on_one_shared_store(agent_bench: Any) -> None:
    """``benchmarks.lower_bound.path_costs`` times ours, the minimal wrappers and ours with each path swapped for the
    minimal one (it checks that each variant makes our span count, and raises otherwise), and the floor, one figure
    per repeat; the bench is left uninstrumented."""
    from benchmarks import lower_bound

    out = lower_bound.path_costs(agent_bench, repeats=1, calls=2)
    assert set(out) == {"ours", "minimal", "minimal invoke_agent", "minimal chat", "minimal execute_tool", "floor"}
    assert all(len(times) == 1 for times in out.values()) and out["floor"][0] > 0
    assert agent_bench.mode == NONE


def test_the_replay_builds_each_chats_request_thread_under_our_hook(agent_bench: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrappers-alone stub builds a request thread inside each chat as Hermes does: our hook on
    ``threading.Thread.__init__`` carries the chat's context into both; the release-before variant carries none."""
    from benchmarks import lower_bound
    from statebackends_hermes_agent import wrappers as hermes_wrappers

    carried: list[str] = []
    real = hermes_wrappers._run_carried

    def spy(thread: Any, run: Any, context: Any) -> Any:
        from opentelemetry import trace

        carried.append(trace.get_current_span(context).name)
        return real(thread, run, context)

    monkeypatch.setattr(hermes_wrappers, "_run_carried", spy)
    ours, telemetry = rp.installed_ours(agent_bench)
    assert "Thread.__init__" in ours
    assert rp.WrapperReplay(agent_bench, "x", wrappers=ours).call()["final_response"] == "done stub"
    assert carried == ["chat fake-model", "chat fake-model"]
    carried.clear()
    uncarried = lower_bound.uncarried_wrappers(ours, telemetry)
    assert rp.WrapperReplay(agent_bench, "y", wrappers=uncarried).call()["final_response"] == "done stub"
    assert carried == []
    out = lower_bound.carry_cost(agent_bench, repeats=1, calls=2)
    assert set(out) == {"ours", lower_bound.CURRENT_ONLY, lower_bound.UNCARRIED, lower_bound.MINIMAL,
                        lower_bound.MINIMAL_UNCARRIED, "floor"}
    assert agent_bench.mode == NONE
