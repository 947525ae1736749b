"""The state operations of this checkout's core beside another commit's, side by side in one process.

``python -m benchmarks.state_vs [REV] [--backend NAME ...] [--repeats N]`` copies ``statebackends/``
as it is at ``REV`` (default ``main``) into a temporary package, then times ``current()`` and one
``begin``/``end`` pair of each backend in both copies with :func:`benchmarks.stateops.measure_state_ops`
(the same loops, interleaved in a rotating order) and prints nanoseconds per operation and the ratio
this/REV with a 95% bootstrap interval over the paired repeats. Needs the core and git only.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import List, Optional

from .snapshot import write_snapshot
from .stateops import measure_state_ops
from .stats import bootstrap_ci, ratio_of_trimmed_means, trimmed_mean

SNAPSHOT = "statebackends_snapshot"


def load_snapshot(rev: str, into: Path) -> str:
    """Write ``statebackends/`` at ``rev`` as the package :data:`SNAPSHOT` under ``into``; put it on ``sys.path``."""
    write_snapshot(rev, "statebackends", into, SNAPSHOT)
    return SNAPSHOT


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", default="main", help="the commit to compare with (default: main)")
    parser.add_argument("--backend", action="append", help="a built-in backend (repeatable; default: all five)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    backends = args.backend or ["contextvar", "instance", "invocation_id", "otel_context", "threadlocal"]
    with tempfile.TemporaryDirectory() as tmp:
        snap = load_snapshot(args.rev, Path(tmp))
        subjects = [s for b in backends for s in (b, f"{snap}/{b}")]
        samples = measure_state_ops(subjects, repeats=args.repeats)
    print(f"ns per operation, trimmed mean of {args.repeats} paired repeats; ratio = this checkout / {args.rev}")
    print(f"| backend | op | this | {args.rev} | ratio (95% CI) |")
    print("|---|---|---|---|---|")
    for op in ("current", "begin_end"):
        for b in backends:
            this, then = samples[(b, op)], samples[(f"{snap}/{b}", op)]
            r, lo, hi = bootstrap_ci([this, then], ratio_of_trimmed_means)
            print(f"| {b} | {op} | {trimmed_mean(this):.0f} | {trimmed_mean(then):.0f} | {r:.3f} ({lo:.3f}-{hi:.3f}) |")


if __name__ == "__main__":
    main()
