"""``statebackends-matrix``: every backend x every concurrency scenario, on this machine, as a markdown table.

Each cell runs one :mod:`statebackends_hermes_testbed.scenarios` scenario on the real hermes-agent
(or the async stub agent) with one backend and judges the exported spans. A cell
is EXPECTED ok when the backend declares (``type(store).isolates``) everything
the scenario requires; a cell whose outcome differs from that is marked
``✗ unexpected`` and makes the exit code 1.

    statebackends-matrix                      # the whole matrix, markdown
    statebackends-matrix --json               # machine-readable
    statebackends-matrix --backend contextvar --scenario threads --scenario soak
    statebackends-matrix --instrumentor opentelemetry.instrumentation.hermes_agent:HermesAgentInstrumentor
    statebackends-matrix --hermes-plugin otel_tracing --backend invocation_id --backend contextvar

``--instrumentor MODULE:CLASS`` judges ANY Hermes instrumentation (an OpenTelemetry
``BaseInstrumentor``): one column named after it, instrumented with nothing but the
bench's tracer provider, and judged only from the exported spans (kinds from
``gen_ai.operation.name``, else span names; parentage; response ids, tool call ids and
token usage per call) and spans never ended; no store is read. Scenarios that need our
own hooks or store (``Scenario.native``: the stub agents, the soak, the greenlets) are
``n/a`` there. A foreign column has no declaration, so its cells have no expected
outcome: they are printed as observed and never make the exit code 1.

``--hermes-plugin NAME`` (repeatable) judges a Hermes plugin: a ``hermes_agent.plugins`` entry point or a plugin
Hermes ships (``observability/langfuse``), enabled per scenario as a user enables it (its key in
``plugins.enabled`` of config.yaml, its own environment variables pointing it at an OTLP receiver on 127.0.0.1,
Hermes's plugin discovery) and put back after it. Its column is judged from what it exported, read as its
:class:`~statebackends_hermes_testbed.traces.Reading` says (:mod:`statebackends_hermes_testbed.hermes_plugins`);
what it cannot express is listed under the table. With ``--backend`` the backends' columns run beside it. A
plugin that is unknown, fails to load or registers no hook gives one error naming it and the plugins found; the
other columns still run, and the exit code is 2.

The scenarios with ``+threading`` in their id run with ``opentelemetry-instrumentation-threading``
enabled; ``greenlets`` runs in a subprocess under gevent monkey patching.

The fake LLM listens on 127.0.0.1; every other connection is refused while the
matrix runs. Hermes's own console output goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from statebackends import available

from statebackends_hermes_agent.config import DEFAULT_HERMES_BACKEND

from .legend import legend
from .stamp import stamp_line, version_stamp

UNEXPECTED = "✗ unexpected"


NOT_APPLICABLE = "n/a"


@dataclass
class Cell:
    """The outcome of one scenario with one backend (or one foreign instrumentor)."""

    scenario: Any  # statebackends_hermes_testbed.scenarios.Scenario
    backend: str
    expected: Optional[bool]
    """None for a foreign instrumentor's cell: no declaration, no expected outcome."""
    verdict: Any = None  # statebackends_hermes_testbed.traces.Verdict, None when the run raised
    error: Optional[str] = None
    seconds: float = 0.0
    applicable: bool = True
    """False when the scenario needs our own hooks and the column is a foreign instrumentor (``n/a``)."""

    @property
    def ok(self) -> bool:
        """The run raised nothing and its verdict is ok."""
        return self.applicable and self.error is None and self.verdict is not None and self.verdict.ok

    @property
    def as_expected(self) -> bool:
        """The outcome is what the backend's declaration predicts (always, where nothing is predicted)."""
        return self.expected is None or not self.applicable or self.ok == self.expected

    def text(self) -> str:
        """``ok``, the broken counts, the error or ``n/a``; prefixed with ``✗ unexpected`` when not as declared."""
        if not self.applicable:
            return NOT_APPLICABLE
        if self.error is not None:
            body = f"error: {self.error}"
        else:
            body = self.verdict.summary()
        if self.as_expected:
            return body
        return f"**{UNEXPECTED} ok**" if self.ok else f"**{UNEXPECTED}:** {body}"

    def as_dict(self) -> dict[str, Any]:
        """The cell as JSON-able data."""
        return {
            "backend": self.backend,
            "scenario": self.scenario.id,
            "title": self.scenario.title,
            "requires": sorted(c.value for c in self.scenario.requires),
            "expected": self.expected,
            "applicable": self.applicable,
            "ok": self.ok,
            "as_expected": self.as_expected,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "verdict": self.verdict.as_dict() if self.verdict is not None else None,
        }


def run_cell(bench: Any, scenario: Any, backend: str, *, foreign: bool = False) -> Cell:
    """Run one cell on ``bench``; an exception is recorded in the cell, never raised.

    ``foreign``: ``backend`` names an instrumentor added with ``bench.instrumentors.add_foreign`` (or a Hermes
    plugin added with ``add_plugin``); the cell has no expected outcome, a ``native`` scenario is not run
    (``n/a``), and the column is released after the cell (a plugin's settings put back).
    """
    from .scenarios import expected_ok

    if foreign:
        cell = Cell(scenario=scenario, backend=backend, expected=None, applicable=not scenario.native)
        if not cell.applicable:
            return cell
    else:
        cell = Cell(scenario=scenario, backend=backend, expected=expected_ok(scenario, backend))
    started = time.perf_counter()
    try:
        cell.verdict = scenario.run(bench, backend)
    except Exception as exc:  # noqa: BLE001 - one broken cell must not hide the others
        cell.error = f"{type(exc).__name__}: {exc}"
        cell.verdict = None
        traceback.print_exc(file=sys.stderr)
    finally:
        if foreign:
            try:
                bench.uninstrument()
            except Exception as exc:  # noqa: BLE001 - recorded in the cell like any failure
                cell.error = cell.error or f"releasing the column raised {type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
        cell.seconds = time.perf_counter() - started
    return cell


def markdown(cells: Sequence[Cell], backends: Sequence[str], scenarios: Sequence[Any], stamp: dict[str, Any], wall: float) -> str:
    """The matrix as a markdown table under the run's version stamp, with a line of totals."""
    by_key = {(c.scenario.id, c.backend): c for c in cells}
    lines = [
        f"statebackends correctness matrix: {stamp_line(stamp)}",
        "",
        "| scenario | requires | " + " | ".join(f"`{b}`" for b in backends) + " |",
        "|---|---|" + "---|" * len(backends),
    ]
    for s in scenarios:
        requires = ", ".join(sorted(c.value for c in s.requires)) or "-"
        row = [by_key[(s.id, b)].text() if (s.id, b) in by_key else "" for b in backends]
        lines.append(f"| {s.title} (`{s.id}`) | {requires} | " + " | ".join(row) + " |")
    run = [c for c in cells if c.applicable]
    n_ok = sum(c.ok for c in run)
    judged = [c for c in run if c.expected is not None]
    n_exp = sum(c.as_expected for c in judged)
    n_na = len(cells) - len(run)
    tail = f"{n_ok}/{len(run)} cells ok"
    if n_na:
        tail += f" ({n_na} n/a)"
    if judged:
        declared_bad = sum(1 for c in judged if c.as_expected and not c.ok)
        tail += (
            f"; {n_exp}/{len(judged)} as their backends declare"
            f"{f', {declared_bad} of them not ok where declared' if declared_bad else ''}"
            f"{'' if n_exp == len(judged) else f' ({len(judged) - n_exp} {UNEXPECTED})'}"
        )
    if len(judged) < len(run):
        tail += f"; {len(run) - len(judged)} cells of a foreign instrumentor: observed, no expectation"
    lines += ["", f"{tail}; {wall:.0f} s"]
    lines += legend(cells, scenarios, DEFAULT_HERMES_BACKEND, UNEXPECTED)
    return "\n".join(lines)


def plugin_notes(plugins: dict[str, Any], stamp: dict[str, Any], n_na: int) -> list[str]:
    """Lines under the table for Hermes plugin columns: what each is, what it cannot express and why, and the n/a rows."""
    if not plugins:
        return []
    lines = [""]
    for name, plugin in plugins.items():
        dist = plugin.spec.distribution
        version = stamp.get("versions", {}).get(dist) if dist else None
        what = f"{dist} {version}" if version else (dist or "a Hermes plugin")
        lines.append(f"`{name}` ({what}): a Hermes plugin, enabled per scenario through config.yaml and its own settings, "
                     "judged from the spans it exported over OTLP to 127.0.0.1 and the ones it left open.")
        for aspect, why in plugin.reading.not_applicable:
            lines.append(f"- not judged for `{name}`: {aspect}, because {why}.")
    if n_na:
        lines.append("- n/a rows: they drive our instrumentation's own hooks or store (async stub agents, soak, "
                     "greenlets), which a foreign column does not have.")
    return lines


def _pick(kind: str, wanted: Optional[list[str]], valid: Sequence[str]) -> list[str]:
    if not wanted:
        return list(valid)
    bad = [w for w in wanted if w not in valid]
    if bad:
        raise ValueError(f"unknown {kind} {', '.join(map(repr, bad))}; valid {kind}s: {', '.join(valid)}")
    return list(dict.fromkeys(wanted))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the chosen cells and print the table (or JSON); 0 when every cell is as declared (a foreign instrumentor's
    always are), 1 if not, 2 on bad arguments."""
    parser = argparse.ArgumentParser(
        prog="statebackends-matrix",
        description="Run every state backend through every concurrency scenario on the real hermes-agent "
        "and print which cells are ok, and whether that matches what each backend declares it isolates.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    parser.add_argument("--backend", action="append", metavar="NAME", help="only this backend (repeatable)")
    parser.add_argument("--scenario", action="append", metavar="ID", help="only this scenario (repeatable)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="concurrent callers, 2..16 (default 8)")
    parser.add_argument(
        "--instrumentor",
        metavar="MODULE:CLASS",
        help="judge this OpenTelemetry BaseInstrumentor instead of our backends (one column named after it; "
        "judged from exported spans only; scenarios needing our own hooks are n/a; never fails the exit code)",
    )
    parser.add_argument(
        "--hermes-plugin",
        action="append",
        metavar="NAME",
        help="judge this Hermes plugin (an entry point of hermes_agent.plugins or a bundled one such as "
        "observability/langfuse; repeatable): enabled per scenario as a user enables it, judged from what it exports "
        "to an OTLP receiver on 127.0.0.1; our backends run beside it only with --backend; its cells never fail the exit "
        "code, a plugin that is unknown or fails to load or register makes it 2 (the other columns still run)",
    )
    args = parser.parse_args(argv)

    from . import scenarios as sc
    from .modes import load_instrumentor

    foreign: Any = None
    try:
        if args.instrumentor is not None:
            if args.backend:
                raise ValueError("--backend does not apply with --instrumentor (a foreign instrumentor has no backends)")
            foreign = load_instrumentor(args.instrumentor)
            backends = [args.instrumentor]
        elif args.backend or not args.hermes_plugin:
            backends = _pick("backend", args.backend, list(available()))
        else:
            backends = []
        chosen = [sc.BY_ID[i] for i in _pick("scenario", args.scenario, [s.id for s in sc.SCENARIOS])]
    except ValueError as exc:
        print(f"statebackends-matrix: error: {exc}", file=sys.stderr)
        return 2
    from .driver import N_CALLERS, HermesBench
    from .hermes_harness import loopback_only

    callers = N_CALLERS if args.threads is None else args.threads
    if not 2 <= callers <= 16:
        print(f"statebackends-matrix: error: --threads must be 2..16, got {callers}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    cells: list[Cell] = []
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - a default the plugin set-up replaces
    plugins: dict[str, Any] = {}
    plugin_errors: list[str] = []
    with loopback_only() as guard, contextlib.redirect_stdout(sys.stderr):
        bench = HermesBench(callers=callers)
        if foreign is not None:
            bench.instrumentors.add_foreign(args.instrumentor, foreign)
        if args.hermes_plugin:
            from .hermes_plugins import PluginError, open_plugin

            for name in dict.fromkeys(args.hermes_plugin):
                try:
                    plugins[name] = open_plugin(name)
                except PluginError as exc:
                    plugin_errors.append(str(exc))
                    print(f"statebackends-matrix: error: {exc}", file=sys.stderr, flush=True)
            for name, plugin in plugins.items():
                bench.instrumentors.add_plugin(name, plugin)
        columns = backends + list(plugins)
        if not columns:  # every column asked for was a plugin that cannot be judged: nothing to run
            bench.close()
            return 2
        total = len(columns) * len(chosen)
        try:
            for s in chosen:
                for b in columns:
                    cell = run_cell(bench, s, b, foreign=foreign is not None or b in plugins)
                    cells.append(cell)
                    mark = "" if cell.as_expected else f"  {UNEXPECTED}"
                    progress(f"[{len(cells)}/{total}] {s.id} x {b}: {cell.text()} ({cell.seconds:.1f} s){mark}")
        finally:
            bench.close()
            for plugin in plugins.values():
                plugin.close()
    wall = time.perf_counter() - started
    stamp = version_stamp()
    if guard.blocked:
        progress(f"statebackends-matrix: refused connections beyond loopback: {guard.blocked}")
    if args.json:
        print(
            json.dumps(
                {
                    "stamp": stamp,
                    "callers": callers,
                    "wall_seconds": round(wall, 1),
                    "cells": [c.as_dict() for c in cells],
                    "instrumentor": args.instrumentor,
                    "hermes_plugins": {
                        name: {"not_applicable": dict(p.reading.not_applicable), "distribution": p.spec.distribution}
                        for name, p in plugins.items()
                    },
                    "errors": plugin_errors,
                    "ok": sum(c.ok for c in cells),
                    "as_expected": sum(c.as_expected for c in cells),
                    "not_applicable": sum(not c.applicable for c in cells),
                    "total": len(cells),
                    "blocked_connections": [list(b) for b in guard.blocked],
                },
                indent=2,
            )
        )
    else:
        text = markdown(cells, columns, chosen, stamp, wall)
        notes = plugin_notes(plugins, stamp, sum(not c.applicable for c in cells if c.backend in plugins))
        print("\n".join([text, *notes]) if notes else text)
    if plugin_errors:
        return 2
    return 0 if all(c.as_expected for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
