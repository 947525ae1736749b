"""Paired, interleaved timing of full agent calls: the overhead of each mode, and time per call against N.

Overheads are only trusted when *paired and interleaved in one process*
(:func:`paired_overhead`): every repeat times a block of calls in every mode, in a
rotating order, and the overhead of a mode is its block time minus the
uninstrumented block time of the same repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from statebackends_hermes_testbed.modes import NONE

from .stats import bootstrap_ci, mean, ratio_of_trimmed_means, trimmed_mean

if TYPE_CHECKING:  # pragma: no cover
    from statebackends_hermes_testbed.driver import HermesBench

CONCURRENCY = (1, 4, 16, 64)
"""Overlapping invocations on one shared agent."""
TOTAL_CALLS = 64
"""Calls per concurrency measurement, split evenly between the N callers."""
FLOOR = "floor"
"""The hot-loop floor: the span tree of one call replayed with the bare SDK."""
FLOOR_IN_SITU = "floor_in_situ"
"""An uninstrumented call followed by one replay of the floor, measured like a mode."""

@dataclass
class PairedResult:
    """Seconds per call per mode (one value per repeat, aligned), spans per call, and the floors.

    ``floor`` is the hot-loop floor (the span tree of one call replayed with the bare SDK,
    timed in a tight loop); ``per_call[FLOOR_IN_SITU]`` is an uninstrumented call followed
    by one replay, so ``overhead(FLOOR_IN_SITU)`` is the floor paid among Hermes's own work
    (cold caches included), measured exactly like an instrumentation's overhead.
    """

    per_call: Dict[str, List[float]]
    spans_per_call: Dict[str, float]
    floor: List[float]
    floor_spans: int
    repeats: int
    calls: int

    def overhead(self, mode: str) -> List[float]:
        """Paired overhead (seconds per call) of ``mode`` in every repeat."""
        return [t - b for t, b in zip(self.per_call[mode], self.per_call[NONE])]

    def overhead_ci(self, mode: str) -> Tuple[float, float, float]:
        """Trimmed mean (:func:`trimmed_mean`) of the paired overheads, with its 95% bootstrap interval."""
        return bootstrap_ci(self.overhead(mode), trimmed_mean)

    def ratio_ci(self, mode: str, other: str) -> Tuple[float, float, float]:
        """Overhead of ``mode`` / overhead of ``other`` (ratio of trimmed means, resampled with the same repeats)."""
        return bootstrap_ci([self.overhead(mode), self.overhead(other)], ratio_of_trimmed_means)

    def floor_ratio_ci(self, mode: str) -> Tuple[float, float, float]:
        """Overhead of ``mode`` / the hot-loop floor, resampled together."""
        return bootstrap_ci([self.overhead(mode), self.floor], ratio_of_trimmed_means)

    def as_dict(self) -> Dict[str, Any]:
        """JSON-able data that ``PairedResult(**data)`` rebuilds."""
        return {
            "per_call": self.per_call,
            "spans_per_call": self.spans_per_call,
            "floor": self.floor,
            "floor_spans": self.floor_spans,
            "repeats": self.repeats,
            "calls": self.calls,
        }



def paired_overhead(
    bench: HermesBench,
    modes: Optional[Sequence[str]] = None,
    *,
    repeats: int = 150,
    calls: int = 2,
    floor_calls: int = 20,
    in_situ_floor: bool = True,
    progress: Optional[Callable[[str], None]] = None,
) -> PairedResult:
    """Every repeat: for every mode, in a rotating order, instrument, make one untimed call, time ``calls`` calls.

    Short blocks (the default 2 calls) pair each mode with ``none`` within a fraction of a
    second: on a shared machine call times drift by tens of percent over seconds, and
    pairing close in time is what shrinks the interval. The hot-loop floor is timed in
    every repeat too (``floor_calls`` replays).
    """
    modes = list(modes if modes is not None else bench.modes())
    if NONE not in modes:
        modes.insert(0, NONE)
    if bench.plan_spans == 0:
        bench.record_plan()
    order = modes + ([FLOOR_IN_SITU] if in_situ_floor else []) + [FLOOR]
    per_call: Dict[str, List[float]] = {m: [] for m in order if m != FLOOR}
    spans: Dict[str, List[float]] = {m: [] for m in modes}
    floor: List[float] = []
    call, floor_call = bench.run, bench.floor_call

    def call_and_floor() -> None:
        call()
        floor_call()

    every = max(1, repeats // 10)
    try:
        for r in range(repeats):
            shift = r % len(order)
            for mode in order[shift:] + order[:shift]:
                if mode == FLOOR:
                    bench.set_mode(NONE)
                    floor.append(bench.floor_block(floor_calls))
                    continue
                bench.set_mode(NONE if mode == FLOOR_IN_SITU else mode)
                call("warm")  # the first call after instrumenting is not timed
                ended = bench.spans_ended()
                per_call[mode].append(bench.block(calls, call_and_floor if mode == FLOOR_IN_SITU else None))
                if mode in spans:
                    spans[mode].append((bench.spans_ended() - ended) / calls)
            if progress is not None and ((r + 1) % every == 0 or r + 1 == repeats):
                progress(f"paired overhead: repeat {r + 1}/{repeats}")
    finally:
        bench.set_mode(NONE)
        bench.reset()
    return PairedResult(
        per_call=per_call,
        spans_per_call={m: mean(v) for m, v in spans.items()},
        floor=floor,
        floor_spans=bench.plan_spans,
        repeats=repeats,
        calls=calls,
    )


def per_call_vs_n(
    bench: HermesBench,
    modes: Optional[Sequence[str]] = None,
    ns: Sequence[int] = CONCURRENCY,
    *,
    total: int = TOTAL_CALLS,
    repeats: int = 3,
    driver: str = "threads",
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Dict[int, List[float]]]:
    """Seconds per call with ``n`` overlapping callers on the shared agent, per mode, interleaved and rotated."""
    modes = list(modes if modes is not None else bench.modes())
    run = bench.threads if driver == "threads" else bench.asyncio_tasks
    out: Dict[str, Dict[int, List[float]]] = {m: {n: [] for n in ns} for m in modes}
    try:
        for r in range(repeats):
            for n in ns:
                shift = (r + n) % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    bench.set_mode(mode)
                    bench.run("warm")
                    out[mode][n].append(run(n, total))
            if progress is not None:
                progress(f"per call vs N ({driver}): repeat {r + 1}/{repeats}")
    finally:
        bench.set_mode(NONE)
        bench.reset()
    return out

