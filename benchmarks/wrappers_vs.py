"""The instrumentation's wrappers alone, this checkout beside another commit's, side by side in one process.

``python -m benchmarks.wrappers_vs [REV] [--this REV2] [--backend NAME] [--repeats N] [--calls N]`` copies
``instrumentation/hermes-agent/src/statebackends_hermes_agent/`` as it is at ``REV`` (default ``main``) into a
temporary package (``--this REV2``: REV2's too, in place of this checkout), builds each copy's wrappers over the
same components ``instrument()`` would give them (the bench's tracer provider, the global meter provider or the one ``--meter`` names, content capture off, a fresh store
of ``--backend``; the hook on ``threading.Thread.__init__`` with the gate ``instrument()`` installs it with, and none
for a release before the chat carry, whose stub then builds its request threads unwrapped), and
replays both around the same stub (:class:`~benchmarks.replay.WrapperReplay`: one ``[tools:1]`` conversation, its
request threads built under the chat as Hermes builds them) with the floor (the same spans with the bare SDK),
interleaved in a rotating order (:func:`~benchmarks.replay.interleaved`), each block timed in this thread's CPU time
(:func:`~benchmarks.replay.cpu_block`; ``--wall`` for wall-clock time: on a shared machine other processes' turns land
in it). Prints microseconds per call, each one's ratio to the floor and the ratio this/REV with a 95% bootstrap
interval over the paired repeats. Needs git, the testbed and hermes-agent (the stub reads the real agent's attributes).
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from .replay import THREAD_INIT_ENABLED
from .snapshot import write_snapshot
from .stats import bootstrap_ci, ratio_of_trimmed_means, trimmed_mean
from .timing import FLOOR

PACKAGE = "instrumentation/hermes-agent/src/statebackends_hermes_agent"
SNAPSHOT = "statebackends_hermes_agent_snapshot"
THIS = "this checkout"
TARGETS = {  # the stub's wrapped callables (benchmarks.replay) -> the wrapper's name in either release
    "run_conversation": "run_conversation",
    "_interruptible_api_call": "api_call",
    "_execute_tool_calls": "execute_tool_calls",
    "handle_function_call": "handle_function_call",
    "Thread.__init__": "thread_init",
}


def load_snapshot(rev: str, into: Path, name: str = SNAPSHOT) -> Any:
    """The instrumentation package at ``rev``, written under ``into`` as the package ``name`` and imported."""
    write_snapshot(rev, PACKAGE, into, name)
    return importlib.import_module(name)


METERS = ("global", "noop", "sdk")
"""Where the wrappers' metrics go: the global meter provider as ``instrument()`` gets it with none given (the API's
proxy until an SDK provider is set: nothing set here), ``NoOpMeterProvider``, or an SDK ``MeterProvider`` with an
in-memory reader (every point recorded)."""


def meter_provider(kind: str) -> Any:
    """The meter provider of :data:`METERS` ``kind`` (None: the global one)."""
    if kind == "noop":
        from opentelemetry.metrics import NoOpMeterProvider

        return NoOpMeterProvider()
    if kind == "sdk":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        return MeterProvider(metric_readers=[InMemoryMetricReader()])
    return None


def wrappers_of(package: Any, provider: Any, backend: str, meters: Any = None) -> Dict[str, Any]:
    """The wrapper callables of ``package`` (either release's shape), by stub target, as ``instrument()`` builds them
    on ``provider`` and the meter provider ``meters`` (None: the global one): content capture off, a fresh
    ``backend`` store."""
    from opentelemetry import metrics, trace

    from statebackends import get_store

    wrappers_module = importlib.import_module(f"{package.__name__}.wrappers")
    lifecycle = importlib.import_module(f"{package.__name__}.lifecycle")
    state = importlib.import_module(f"{package.__name__}.state")
    tracer = trace.get_tracer(package.__name__, "0", provider)
    meter = metrics.get_meter(package.__name__, "0", meters)
    store = get_store(backend, state.InvocationState)
    cls = wrappers_module.HermesWrappers
    if issubclass(cls, lifecycle.HermesTelemetry):  # the release before: the wrappers ARE the telemetry
        wrappers = cls(tracer, store, meter=meter)
    else:
        wrappers = cls(lifecycle.HermesTelemetry(tracer, store, meter=meter))
    found = {target: getattr(wrappers, name, None) for target, name in TARGETS.items()}
    if found["Thread.__init__"] is None:  # a release before the chat carry (issue 16): Thread.__init__ stays unwrapped
        del found["Thread.__init__"]
    else:  # the gate instrument() installs the hook with (wrapt's enabled=), where the release has one
        gate = getattr(wrappers_module, "_in_chat", None)
        if gate is not None:
            found[THREAD_INIT_ENABLED] = gate.get
    missing = [target for target in TARGETS if target != "Thread.__init__" and found.get(target) is None]
    if missing:
        raise RuntimeError(f"{package.__name__}: no wrapper for {missing}")
    return found


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("rev", nargs="?", default="main", help="the commit to compare with (default: main)")
    parser.add_argument("--backend", default="invocation_id")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--wall", action="store_true", help="time blocks in wall-clock time, not this thread's CPU time")
    parser.add_argument("--meter", choices=METERS, default="global", help="where the metrics go (default: global)")
    parser.add_argument("--this", default=None, metavar="REV",
                        help="a commit to stand in for this checkout (a snapshot too: two commits side by side)")
    args = parser.parse_args(argv)

    import statebackends_hermes_agent
    from statebackends_hermes_testbed.driver import HermesBench

    from .replay import WrapperReplay, cpu_block, interleaved, replay_responses, warm_up

    this_label = args.this or THIS
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = load_snapshot(args.rev, Path(tmp))
        this = load_snapshot(args.this, Path(tmp), f"{SNAPSHOT}_this") if args.this else statebackends_hermes_agent
        bench = HermesBench.timing(warm=["none"])
        try:
            responses = replay_responses(bench)
            bench.record_plan(args.backend)
            meters = meter_provider(args.meter)
            replays = {
                this_label: WrapperReplay(bench, this_label, responses,
                                          wrappers=wrappers_of(this, bench.provider, args.backend, meters)),
                args.rev: WrapperReplay(bench, args.rev, responses,
                                        wrappers=wrappers_of(snapshot, bench.provider, args.backend, meters)),
            }
            warm_up(bench, replays, rounds=50, expect=list(replays))  # both must make the real call's span count
            for _ in range(50):
                bench.floor_call()
            out = interleaved(bench, replays, repeats=args.repeats, calls=args.calls,
                              block=None if args.wall else cpu_block)
        finally:
            bench.close()
    us = {k: trimmed_mean(v) * 1e6 for k, v in out.items()}
    r, lo, hi = bootstrap_ci([out[this_label], out[args.rev]], ratio_of_trimmed_means)
    clock = "wall-clock" if args.wall else "CPU"
    print(f"wrappers alone ({args.backend}, metrics to the {args.meter} meter provider), {args.repeats} interleaved "
          f"blocks of {args.calls} calls, {clock} time, 20%-trimmed mean")
    print("| wrappers | us per call | / floor |")
    print("|---|---:|---:|")
    for name in (this_label, args.rev, FLOOR):
        print(f"| {name} | {us[name]:.1f} | {us[name] / us[FLOOR]:.3f}x |")
    print(f"{this_label} / {args.rev}: {r:.3f} (95% CI {lo:.3f}-{hi:.3f}, paired repeats)")


if __name__ == "__main__":
    main()
