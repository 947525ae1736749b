"""State operations per backend against the bare primitives they stand on, and memory over many invocations.

``current()`` and one ``begin``/``end`` pair of each backend, and the bare primitive
each one stands on (``ContextVar.get``, ``getattr`` on an object, a
``threading.local`` attribute, a locked dict lookup), each run :data:`BATCH` times
per call so that sub-microsecond costs rise above timer noise. Needs the core only.
"""

from __future__ import annotations

import contextvars
import gc
import math
import threading
import time
from itertools import repeat
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

BATCH = 1000
"""State operations per timed call."""

BARE = "bare:"
PRIMITIVES = ("ContextVar.get", "getattr(obj)", "threading.local", "locked dict")
"""The bare primitives, as state-op subjects ``bare:<name>``."""
REFERENCE = {
    "contextvar": "ContextVar.get",
    "instance": "getattr(obj)",
    "threadlocal": "threading.local",
    "invocation_id": "locked dict",
    "otel_context": "ContextVar.get",
}
"""The bare primitive each built-in backend is compared with."""
CURRENT_TARGET = {"contextvar": 1.5, "threadlocal": 1.5, "instance": 1.5, "invocation_id": 3.0}
"""Target: ``current()`` within this factor of its reference primitive."""


def backend_names() -> List[str]:
    """Every backend that resolves by name (built-ins and loadable entry points), sorted."""
    import statebackends

    return list(statebackends.available())


class _Owner:
    """Stands for the instrumented agent object."""


class StateOp:
    """One state operation run ``n`` times per :meth:`run`: ``open()``, ``run(n)`` any number of times, ``close()``.

    ``subject`` is a backend name (``"package/name"`` for a backend of another copy of the core, as
    :mod:`benchmarks.state_vs` loads one) or ``"bare:<primitive>"``; ``op`` is ``"current"``
    (inside one open invocation, as the wrappers call it: ``store.current(owner)``)
    or ``"begin_end"`` (one ``end(begin(owner))`` pair, state built by the factory).
    Every loop has the same shape (``for _ in repeat(None, n)``), so the loop's own
    cost is the same in a backend's row and in its primitive's row.
    """

    def __init__(self, subject: str, op: str = "current") -> None:
        if op not in ("current", "begin_end"):
            raise ValueError(f"op must be 'current' or 'begin_end', got {op!r}")
        self.subject, self.op = subject, op
        self.owner = _Owner()
        self._close: Callable[[], None] = lambda: None
        self.run: Callable[[int], Any] = self._not_open

    def _not_open(self, n: int = BATCH) -> Any:
        raise RuntimeError("StateOp.open() first")

    def __enter__(self) -> "StateOp":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End what :meth:`open` began; ``run`` refuses until the next ``open``."""
        close, self._close = self._close, (lambda: None)
        self.run = self._not_open
        close()

    def open(self) -> "StateOp":
        """Build the subject (a store with one open invocation, or the primitive) and make ``run`` ready."""
        self.close()
        if self.subject.startswith(BARE):
            self._open_bare(self.subject[len(BARE):])
        else:
            self._open_store(self.subject)
        return self

    # -- a backend ------------------------------------------------------------------------

    def _open_store(self, name: str) -> None:
        import importlib

        package, _, name = name.rpartition("/")  # "pkg/name": a backend of another copy of the core (state_vs)
        store = importlib.import_module(package or "statebackends").get_store(name, dict)
        self.store = store
        owner = self.owner
        if self.op == "current":
            scope = store.begin(owner)

            def run(n: int = BATCH) -> Any:
                current = store.current
                for _ in repeat(None, n):
                    current(owner)
                return current(owner)

            self._close = lambda: store.end(scope)
        else:

            def run(n: int = BATCH) -> Any:
                begin, end = store.begin, store.end
                for _ in repeat(None, n):
                    end(begin(owner))
                return store.live()

        self.run = run

    # -- a bare primitive ---------------------------------------------------------------------

    def _open_bare(self, name: str) -> None:
        owner = self.owner
        if name == "ContextVar.get":
            var: contextvars.ContextVar[Any] = contextvars.ContextVar("bench_bare", default=None)
            if self.op == "current":
                token = var.set({})

                def run(n: int = BATCH) -> Any:
                    get = var.get
                    for _ in repeat(None, n):
                        get()
                    return get()

                self._close = lambda: var.reset(token)
            else:

                def run(n: int = BATCH) -> Any:
                    set_, reset = var.set, var.reset
                    for _ in repeat(None, n):
                        reset(set_(dict()))
                    return var.get()

        elif name == "getattr(obj)":
            attribute = "_bench_state"
            if self.op == "current":
                setattr(owner, attribute, {})

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        getattr(owner, attribute, None)
                    return getattr(owner, attribute, None)

            else:

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        setattr(owner, attribute, dict())
                        delattr(owner, attribute)
                    return getattr(owner, attribute, None)

        elif name == "threading.local":
            local = threading.local()
            if self.op == "current":
                local.state = {}

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        getattr(local, "state", None)
                    return getattr(local, "state", None)

            else:

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        local.state = dict()
                        del local.state
                    return getattr(local, "state", None)

        elif name == "locked dict":
            lock = threading.Lock()
            table: Dict[Any, Any] = {}
            key = "inv-1"
            if self.op == "current":
                table[key] = {}

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        with lock:
                            table.get(key)
                    with lock:
                        return table.get(key)

            else:

                def run(n: int = BATCH) -> Any:
                    for _ in repeat(None, n):
                        with lock:
                            table[key] = dict()
                        with lock:
                            del table[key]
                    return table.get(key)

        else:
            raise ValueError(f"unknown primitive {name!r}; known: {', '.join(PRIMITIVES)}")
        self.run = run


def state_subjects() -> List[str]:
    """Every backend, then every bare primitive (``bare:<name>``)."""
    return backend_names() + [BARE + p for p in PRIMITIVES]


def measure_state_ops(
    subjects: Optional[Sequence[str]] = None,
    ops: Sequence[str] = ("current", "begin_end"),
    *,
    repeats: int = 15,
    batch: int = BATCH,
    calls: int = 5,
) -> Dict[Tuple[str, str], List[float]]:
    """Nanoseconds per operation, ``repeats`` samples per (subject, op), interleaved in a rotating order.

    Each sample is the best of ``calls`` timed ``run(batch)`` calls divided by ``batch``.
    """
    subjects = list(subjects if subjects is not None else state_subjects())
    items = [(s, op) for op in ops for s in subjects]
    opened = {item: StateOp(*item).open() for item in items}
    samples: Dict[Tuple[str, str], List[float]] = {item: [] for item in items}
    perf = time.perf_counter_ns
    try:
        for item in items:  # warm-up
            opened[item].run(batch)
        for r in range(repeats):
            shift = r % len(items)
            for item in items[shift:] + items[:shift]:
                run = opened[item].run
                best = math.inf
                for _ in range(calls):
                    t0 = perf()
                    run(batch)
                    best = min(best, perf() - t0)
                samples[item].append(best / batch)
    finally:
        for op in opened.values():
            op.close()
    return samples


def retained_after(name: str, invocations: int = 100_000, warmup: int = 1_000) -> Dict[str, Any]:
    """Bytes still allocated (``tracemalloc``) after ``invocations`` begin/end pairs on one store, and ``live()``."""
    import tracemalloc

    import statebackends

    store = statebackends.get_store(name, dict)
    owner = _Owner()
    for _ in range(warmup):
        store.end(store.begin(owner))
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(invocations):
            store.end(store.begin(owner))
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"retained": after - before, "peak": peak - before, "live": store.live(), "invocations": invocations}

