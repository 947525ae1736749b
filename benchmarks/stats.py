"""Statistics of paired, noisy timings: percentile bootstrap intervals and trimmed means."""

from __future__ import annotations

import math
import random
import statistics
from typing import Any, Callable, Iterable, List, Sequence, Tuple

def bootstrap_ci(
    samples: Sequence[Sequence[float]] | Sequence[float],
    statistic: Callable[..., float],
    *,
    level: float = 0.95,
    resamples: int = 4000,
    seed: int = 12345,
) -> Tuple[float, float, float]:
    """``(estimate, low, high)``: percentile bootstrap over repeat indices.

    ``samples`` is one sequence, or several aligned ones (paired: resampled with the
    same indices); ``statistic`` takes as many sequences and returns a float.
    :func:`mean` and :func:`ratio_of_means` are vectorised with numpy when it is installed.
    """
    columns: List[List[float]]
    if samples and isinstance(samples[0], (list, tuple)):
        columns = [list(c) for c in samples]  # type: ignore[arg-type]  # several sequences: checked above
    else:
        columns = [list(samples)]  # type: ignore[arg-type]  # one sequence of floats
    n = len(columns[0])
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    try:
        estimate = statistic(*columns)
    except ZeroDivisionError:
        estimate = float("nan")
    if n < 2:
        return estimate, float("nan"), float("nan")
    values: List[float]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with matplotlib in the bench extra
        np = None  # type: ignore[assignment]  # numpy is optional: None means pure Python
    vectorised = (mean, ratio_of_means, trimmed_mean, ratio_of_trimmed_means)
    if np is not None and statistic in vectorised:
        idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        k = int(n * TRIM) if statistic in (trimmed_mean, ratio_of_trimmed_means) else 0
        if n - 2 * k <= 0:
            k = 0

        def row_stat(column: List[float]) -> Any:
            rows = np.asarray(column, dtype=float)[idx]
            if k:
                rows = np.sort(rows, axis=1)[:, k:n - k]
            return rows.mean(axis=1)

        arrays = [row_stat(c) for c in columns]
        with np.errstate(divide="ignore", invalid="ignore"):
            stats = arrays[0] if len(arrays) == 1 else arrays[0] / arrays[1]
        values = sorted(float(v) for v in stats if np.isfinite(v))
    else:
        rng = random.Random(seed)
        values = []
        for _ in range(resamples):
            idx_list = [rng.randrange(n) for _ in range(n)]
            try:
                values.append(statistic(*[[c[i] for i in idx_list] for c in columns]))
            except ZeroDivisionError:
                continue
        values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return estimate, float("nan"), float("nan")
    lo = values[int((1 - level) / 2 * (len(values) - 1))]
    hi = values[int((1 + level) / 2 * (len(values) - 1))]
    return estimate, lo, hi


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean of ``xs``."""
    return sum(xs) / len(xs)


def ratio_of_means(a: Sequence[float], b: Sequence[float]) -> float:
    """``mean(a) / mean(b)``."""
    return mean(a) / mean(b)


TRIM = 0.2
"""Proportion cut from EACH end by :func:`trimmed_mean`."""


def trimmed_mean(xs: Sequence[float], proportion: float = TRIM) -> float:
    """Mean of the middle values: drops ``proportion`` of the values from each end (none when too few).

    Paired differences ``mode - none`` are noise ``e1 - e2`` (symmetric when both calls
    share the machine's noise) plus the overhead, so the trimmed mean estimates the
    overhead without letting one 100 ms stall of the shared machine decide it.
    """
    ordered = sorted(xs)
    k = int(len(ordered) * proportion)
    middle = ordered[k:len(ordered) - k] or ordered
    return sum(middle) / len(middle)


def ratio_of_trimmed_means(a: Sequence[float], b: Sequence[float]) -> float:
    """``trimmed_mean(a) / trimmed_mean(b)``."""
    return trimmed_mean(a) / trimmed_mean(b)



def median(xs: Iterable[float]) -> float:
    """The median of ``xs``."""
    return statistics.median(list(xs))
