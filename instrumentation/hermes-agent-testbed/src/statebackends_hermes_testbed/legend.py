"""The words under the matrix table: what each ``requires`` word means to a Hermes user, why a cell that is not
``ok`` can be expected, what the exit code means, and what to do next.

The ``requires`` words are the values of :class:`statebackends.Concurrency` (the JSON output's ``requires`` keys);
:data:`REQUIRES` says each in a Hermes user's words, one line each.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from statebackends import Concurrency

C = Concurrency

REQUIRES: dict[Concurrency, str] = {
    C.THREADS: "turns overlap on one shared agent, each in a thread of its own (a threaded web server)",
    C.ASYNC_TASKS: "turns overlap as asyncio tasks on one event loop",
    C.COPIED_CONTEXT: "work hops to a pool thread that copies the context (Hermes's own tool pool, asyncio.to_thread)",
    C.LATE_WORK: "work a turn started (a callback, a job on a worker thread) runs after that turn ended, where "
                 "another turn is open; it must not see that other turn",
    C.RAW_THREAD: "work hops to a thread that copies nothing (a plain Thread, executor.submit); only the agent or "
                  "the task id goes along",
    C.PROPAGATE: "work hops to a thread that copies nothing, wrapped by the backend's propagate() (a delegate_task "
                 "subagent's hop)",
    C.NESTED: "an agent runs inside another agent's tool, on the same thread",
    C.SHARED_ID: "overlapping turns carry the same task id (two turns of one Hermes session: its CLI, ACP adapter "
                 "and API server pass the session id)",
    C.SHARED_ID_RAW_THREAD: "those turns' tools hop to a thread that copies nothing, with only the shared id: which "
                            "turn is meant cannot be told, so no backend is right there",
    C.GREENLETS: "turns run in gevent greenlets (a monkey-patched gevent server)",
}

EXIT_CODES = ("Exit code: 0 when every cell is as its backend declares (its expected failures included), 1 when a "
              "cell is marked ✗ unexpected, 2 on a bad argument.")


def legend(cells: Sequence[Any], scenarios: Sequence[Any], default_backend: str, unexpected_mark: str) -> list[str]:
    """Markdown lines for under the table of ``cells`` (``matrix.Cell``) over ``scenarios``."""
    words = sorted({c for s in scenarios for c in s.requires}, key=list(Concurrency).index)
    judged = [c for c in cells if c.applicable and c.expected is not None]
    foreign = [c for c in cells if c.applicable and c.expected is None]
    lines = ["", "How to read it:", "",
             "- `ok`: every call's spans were all there, ended, under their own call, with that call's own response "
             "ids, tool call ids and token sums, and no state was left behind; any other text names what broke, "
             "with counts."]
    if judged:
        lines.append(
            "- A cell that is not `ok` is expected wherever the backend does not declare everything the row "
            "`requires`: the matrix shows each backend failing exactly where it says it would. Only a cell marked "
            f"`{unexpected_mark}` is a surprise.")
    if foreign:
        lines.append("- The column of another instrumentation has no declarations: its cells are what was observed, "
                     "and never change the exit code.")
    if words:
        lines.append("- What the `requires` words mean (how an application runs its turns):")
        lines += [f"  - `{w.value}`: {REQUIRES[w]}" for w in words]
    lines.append(f"- {EXIT_CODES}")
    lines += ["", "Next: " + next_step(cells, default_backend, unexpected_mark)]
    return lines


def next_step(cells: Sequence[Any], default_backend: str, unexpected_mark: str) -> str:
    """One sentence: what a user does with this result."""
    surprises = [c for c in cells if not c.as_expected]
    if surprises:
        first = surprises[0]
        return (f"{len(surprises)} cell(s) behave otherwise than their backend declares on this machine (the exit "
                f"code is 1): rerun one with `statebackends-matrix --backend {first.backend} --scenario "
                f"{first.scenario.id} --json` and report what it prints.")
    run = [c for c in cells if c.applicable]
    foreign = [c for c in run if c.expected is None]
    if foreign:
        name = foreign[0].backend
        bad = [c.scenario.id for c in foreign if not c.ok]
        if not bad:
            return f"`{name}` traced every row right here."
        # An --instrumentor column is named MODULE:CLASS; a --hermes-plugin column by the plugin's key, and ours can
        # run beside it (--backend), never beside an --instrumentor.
        see_ours = ("without `--instrumentor`" if ":" in name else
                    f"with `--backend {default_backend}` beside `--hermes-plugin {name}`")
        return (f"an application that runs its turns like the rows where `{name}` is not ok ({', '.join(bad)}) gets "
                f"wrong traces from it; run the same rows {see_ours} to see ours.")
    ok = Counter(c.backend for c in run if c.ok)
    rows = len({c.scenario.id for c in run})
    app = ("check your own application's traces with docs/examples/hermes-app/app.py, or by pointing it at "
           "`statebackends-fakellm --port 8765`")
    if any(c.backend == default_backend for c in run):
        return (f"keep the default backend, `{default_backend}` (ok in {ok[default_backend]} of {rows} rows here; "
                "README: \"Which backend for which application\" for the others), and " + app + ".")
    best = max(ok, key=lambda b: ok[b]) if ok else None
    if best is None:
        return "no backend was ok in any row run here; " + app + "."
    return f"of the backends run here, `{best}` is ok in the most rows ({ok[best]} of {rows}); " + app + "."
