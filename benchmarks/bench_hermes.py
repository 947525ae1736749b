"""asv: the Hermes agent instrumentation on a REAL hermes-agent ``AIAgent``.

One ``run_conversation`` with directive ``[tools:1]`` (an LLM call asking for one
tool, the tool, a final LLM call), the LLM faked in process (no HTTP in the timed
path), spans to an SDK ``TracerProvider`` whose only processor counts them. A
*mode* is ``none`` (uninstrumented), a state backend (our instrumentation with
it), or ``loongsuite`` (loongsuite-instrumentation-hermes-agent 0.9.0, skipped
unless the project's ``compare`` extra is installed).

asv runs every parameter in a fresh process, so ``time_`` figures of two modes
come from two processes and differ by the machine's run-to-run noise (about 20%
here). The trustworthy overhead figures are the ``PairedOverhead.track_*`` ones:
paired and interleaved in one process (see ``benchmarks.timing.paired_overhead``).
The agent bench is the testbed's (``statebackends_hermes_testbed.driver.HermesBench.timing``).
Nothing here imports Hermes until a benchmark's setup runs.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from .bench_state import _backends
from .timing import CONCURRENCY

try:
    from statebackends_hermes_testbed.modes import LOONGSUITE, NONE, loongsuite_available, loongsuite_skip_reason
except ImportError:  # a commit whose testbed predates modes.py: _unavailable() skips every benchmark here
    NONE, LOONGSUITE = "none", "loongsuite"

    def loongsuite_available() -> bool:
        """Never, without the testbed's modes."""
        return False

    def loongsuite_skip_reason() -> str:
        """Why loongsuite's mode is skipped here."""
        return "the installed testbed has no statebackends_hermes_testbed.modes"


BACKENDS = _backends()
MODES = [NONE] + BACKENDS + [LOONGSUITE]


def _unavailable() -> str | None:
    """Why the Hermes benchmarks cannot run in this environment/commit, or None."""
    try:
        import statebackends_hermes_agent  # noqa: F401 - imported to see that it can be
        import run_agent  # noqa: F401 - likewise (hermes-agent)
        import statebackends_hermes_testbed.driver  # noqa: F401 - likewise
    except Exception as exc:  # noqa: BLE001 - whatever fails, the benchmarks say why they cannot run
        return f"Hermes instrumentation or hermes-agent not importable here: {type(exc).__name__}: {exc}"
    return None


def _check_mode(mode: str) -> None:
    if mode == LOONGSUITE and not loongsuite_available():
        raise NotImplementedError(loongsuite_skip_reason())
    if mode not in (NONE, LOONGSUITE) and mode not in BACKENDS:
        raise NotImplementedError(f"backend {mode!r} not available in this commit")


def _bench(modes: List[str]) -> Any:
    reason = _unavailable()
    if reason:
        raise NotImplementedError(reason)
    from statebackends_hermes_testbed.driver import HermesBench

    return HermesBench.timing(warm=modes)


def _skip_if(cache: Dict[str, Any]) -> None:
    if cache.get("skip"):
        raise NotImplementedError(cache["skip"])


def _skip_without_loongsuite(cache: Dict[str, Any], mode: str) -> None:
    """Per-benchmark asv setup (a function attribute): a skip, not a failure, without the compare extra."""
    if not cache.get("vs_loongsuite"):
        raise NotImplementedError(loongsuite_skip_reason())


def _track(unit: str, doc: str, key: str, *, by_param: bool = False) -> Callable[..., float]:
    """An asv ``track_`` method reading ``cache[key][param]`` (``cache[param][key]`` when ``by_param``)."""

    def track(self: Any, cache: Dict[str, Any], param: str) -> float:
        return cache[param][key] if by_param else cache[key][param]

    track.unit = unit  # type: ignore[attr-defined]  # asv reads attributes set on the function
    track.__doc__ = doc
    return track


class FullCall:
    """Seconds per ``run_conversation`` call, per mode (agent built and warmed up in setup, ~3 s)."""

    params = [MODES]
    param_names = ["mode"]
    timeout = 300
    sample_time = 0.05
    warmup_time = 0.5
    repeat = (3, 20, 20.0)

    def setup(self, mode: str) -> None:
        _check_mode(mode)
        self.bench = _bench([mode])
        self.bench.set_mode(mode)
        ended = self.bench.spans_ended()
        result = self.bench.run()
        if not self.bench.completed(result):
            raise RuntimeError(f"{mode}: the call did not complete: {result!r}")
        if mode != NONE and self.bench.spans_ended() == ended:
            raise RuntimeError(f"{mode}: no span was produced")

    def teardown(self, mode: str) -> None:
        if getattr(self, "bench", None) is not None:  # asv tears down after a skipped setup too
            self.bench.close()

    def time_run_conversation(self, mode: str) -> None:
        self.bench.run()


class Concurrency:
    """Seconds per call with N overlapping calls on one shared agent (64 calls in all, split between the N callers).

    Measured in ``setup_cache`` in one process, modes interleaved and rotated, median
    of 3 repeats: ``threads`` (N threads) and ``asyncio`` (N tasks on one loop, each
    awaiting ``asyncio.to_thread(call)``). Flat means no contention added.
    """

    params = [MODES, list(CONCURRENCY)]
    param_names = ["mode", "n"]
    unit = "seconds"
    timeout = 1800
    repeats = 3

    def setup_cache(self) -> Dict[str, Any]:
        import statistics

        from .timing import per_call_vs_n

        try:
            bench = _bench([m for m in MODES if m != LOONGSUITE or loongsuite_available()])
        except NotImplementedError as exc:
            return {"skip": str(exc)}
        try:
            modes = bench.modes()
            out: Dict[str, Any] = {}
            for driver in ("threads", "asyncio"):
                runs = per_call_vs_n(bench, modes, CONCURRENCY, repeats=self.repeats, driver=driver)
                out[driver] = {m: {n: statistics.median(v) for n, v in d.items()} for m, d in runs.items()}
            return out
        finally:
            bench.close()

    def setup(self, cache: Dict[str, Any], mode: str, n: int) -> None:
        _skip_if(cache)
        _check_mode(mode)

    def track_threads_per_call(self, cache: Dict[str, Any], mode: str, n: int) -> float:
        return cache["threads"][mode][n]

    def track_asyncio_per_call(self, cache: Dict[str, Any], mode: str, n: int) -> float:
        return cache["asyncio"][mode][n]


class PairedOverhead:
    """Per-call overhead of each mode, paired and interleaved with uninstrumented calls in one process.

    ``track_overhead_us``: 20%-trimmed mean of instrumented-minus-bare microseconds per call;
    ``track_overhead_vs_floor``: that over the floor (the same span tree started and
    ended with the bare SDK); ``track_overhead_vs_loongsuite``: that over loongsuite's
    overhead measured in the same repeats (skipped without the ``compare`` extra).
    """

    params = [BACKENDS + [LOONGSUITE]]
    param_names = ["mode"]
    timeout = 1800
    repeats = 120

    def setup_cache(self) -> Dict[str, Any]:
        from .stats import trimmed_mean
        from .timing import paired_overhead

        try:
            bench = _bench([m for m in MODES if m != LOONGSUITE or loongsuite_available()])
        except NotImplementedError as exc:
            return {"skip": str(exc)}
        try:
            result = paired_overhead(bench, repeats=self.repeats, in_situ_floor=False)
        finally:
            bench.close()
        modes = [m for m in result.per_call if m != NONE]
        floor = trimmed_mean(result.floor)
        out: Dict[str, Any] = {"overhead_us": {}, "vs_floor": {}, "vs_loongsuite": {}}
        for m in modes:
            overhead = trimmed_mean(result.overhead(m))
            out["overhead_us"][m] = overhead * 1e6
            out["vs_floor"][m] = overhead / floor
            if LOONGSUITE in modes:
                out["vs_loongsuite"][m] = overhead / trimmed_mean(result.overhead(LOONGSUITE))
        return out

    def setup(self, cache: Dict[str, Any], mode: str) -> None:
        _skip_if(cache)
        _check_mode(mode)

    track_overhead_us = _track("microseconds", "Trimmed mean overhead per call, us.", "overhead_us")
    track_overhead_vs_floor = _track("ratio", "Overhead / the floor.", "vs_floor")
    track_overhead_vs_loongsuite = _track("ratio", "Overhead / loongsuite's.", "vs_loongsuite")
    track_overhead_vs_loongsuite.setup = _skip_without_loongsuite  # type: ignore[attr-defined]  # likewise


class Correctness:
    """16 overlapping calls (threads) on one shared agent per backend, judged by ``statebackends_hermes_testbed.traces.judge``."""

    params = [BACKENDS]
    param_names = ["backend"]
    timeout = 600
    calls = 16

    def setup_cache(self) -> Dict[str, Any]:
        try:
            bench = _bench([])
        except NotImplementedError as exc:
            return {"skip": str(exc)}
        try:
            bench.warm_up([NONE])
            return {b: bench.correctness(b, self.calls) for b in bench.modes(include_loongsuite=False) if b != NONE}
        finally:
            bench.close()

    def setup(self, cache: Dict[str, Any], backend: str) -> None:
        _skip_if(cache)
        if backend not in cache:
            raise NotImplementedError(f"backend {backend!r} not available in this commit")

    track_correct_calls = _track("calls", "Calls (of 16) whose own span tree is complete and right.", "correct", by_param=True)
    track_orphans = _track("spans", "Spans outside their call's tree.", "orphans", by_param=True)
    track_cross_talk = _track("attributes", "Ids or token sums of another call.", "cross_talk", by_param=True)
    track_never_ended = _track("spans", "Spans started and never ended.", "never_ended", by_param=True)
    track_state_left = _track("states", "States left in the store.", "state_left", by_param=True)


class AgentMemory:
    """Peak RSS over N full calls per mode (flat: 300 calls cost what 30 cost)."""

    params = [MODES, [30, 300]]
    param_names = ["mode", "calls"]
    timeout = 300

    def setup(self, mode: str, calls: int) -> None:
        _check_mode(mode)
        self.bench = _bench([mode])
        self.bench.set_mode(mode)

    def teardown(self, mode: str, calls: int) -> None:
        if getattr(self, "bench", None) is not None:  # asv tears down after a skipped setup too
            self.bench.close()

    def peakmem_run_conversation(self, mode: str, calls: int) -> None:
        bench = self.bench
        for i in range(calls):
            bench.run()
            if i % 50 == 49:
                bench.reset()  # the fake LLM's and the bench tool's own logs, not the instrumentation's
        bench.reset()
