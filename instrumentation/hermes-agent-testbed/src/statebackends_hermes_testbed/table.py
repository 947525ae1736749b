"""The README's table of what each backend isolates, made from the backends' declarations."""

from __future__ import annotations

from statebackends import Concurrency


def isolation_table() -> str:
    """A markdown table: one row per concurrency model, one column per available backend."""
    from statebackends import available

    backends = available()
    names = list(backends)
    lines = [
        "| concurrency model | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for model in Concurrency:
        cells = ["yes" if model in getattr(backends[n], "isolates", frozenset()) else "**no**" for n in names]
        lines.append(f"| {model.description} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
