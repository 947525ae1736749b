"""Overlapping invocations on one shared owner, through every backend: who kept their own state?

Run ``python docs/examples/demo.py``. Needs nothing but the core package.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from typing import Any, Callable

from statebackends import available, get_store
from statebackends import StateStore


class _Owner:
    """Stands for the one shared agent object every call goes through."""


def _threads(store: StateStore[dict[str, Any]], owner: _Owner, n: int) -> int:
    barrier = threading.Barrier(n)
    kept = []

    def call(i: int) -> None:
        with store.invocation(owner) as state:
            state["caller"] = i
            barrier.wait()  # every call is open here at once
            seen = store.current(owner)
            barrier.wait()
            kept.append(seen is not None and seen.get("caller") == i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(kept)


def _tasks(store: StateStore[dict[str, Any]], owner: _Owner, n: int) -> int:
    async def call(i: int, gate: asyncio.Barrier) -> bool:
        with store.invocation(owner) as state:
            state["caller"] = i
            await gate.wait()
            seen = store.current(owner)
            await gate.wait()
            return seen is not None and seen.get("caller") == i

    async def main() -> int:
        gate = asyncio.Barrier(n) if hasattr(asyncio, "Barrier") else _AsyncBarrier(n)
        return sum(await asyncio.gather(*(call(i, gate) for i in range(n))))

    return asyncio.run(main())


class _AsyncBarrier:
    """asyncio.Barrier for Python 3.10, enough for this demo."""

    def __init__(self, n: int) -> None:
        self.n, self.count, self.event = n, 0, asyncio.Event()

    async def wait(self) -> None:
        self.count += 1
        if self.count % self.n == 0:
            self.event.set()
            self.event = asyncio.Event()
        else:
            await self.event.wait()


MODES: dict[str, Callable[[StateStore[dict[str, Any]], _Owner, int], int]] = {
    "threads": _threads,
    "asyncio tasks": _tasks,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=8, help="overlapping invocations (default 8)")
    args = parser.parse_args(argv)
    names = list(available())
    print(f"{args.n} overlapping invocations on one shared owner; cells: invocations that saw their own state")
    print("| backend | " + " | ".join(MODES) + " | left open |")
    print("|---|" + "---|" * (len(MODES) + 1))
    for name in names:
        store = get_store(name, dict)
        owner = _Owner()
        cells = [f"{fn(store, owner, args.n)}/{args.n}" for fn in MODES.values()]
        left = "none" if store.current(owner) is None and not store.live() else "STATE LEFT"
        print(f"| `{name}` | " + " | ".join(cells) + f" | {left} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
