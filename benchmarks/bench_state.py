"""asv: state-store operations per backend, against the bare primitives, and memory over many invocations.

Every ``time_`` benchmark runs :data:`benchmarks.stateops.BATCH` (1000) operations per
call: divide asv's figure by 1000 for one operation. The ``bare:*`` rows are the
primitives the backends stand on (``ContextVar.get``, ``getattr`` on an object, a
``threading.local`` attribute, a locked dict lookup), in the same loop shape.
"""

from __future__ import annotations

from .stateops import BARE, BATCH, PRIMITIVES, StateOp

_BUILTIN_BACKENDS = ["contextvar", "instance", "invocation_id", "otel_context", "threadlocal"]


def _backends() -> list:
    try:
        from .stateops import backend_names

        return backend_names()
    except Exception:  # noqa: BLE001 - an old commit without the registry: asv skips the missing ones
        return list(_BUILTIN_BACKENDS)


def _open(subject: str, op: str) -> StateOp:
    try:
        return StateOp(subject, op).open()
    except (ImportError, ValueError) as exc:  # backend absent in this commit
        raise NotImplementedError(f"{subject}: {exc}") from exc


class StateOps:
    """``current()`` inside one open invocation, and one ``begin``/``end`` pair; x1000 per call."""

    params = [_backends() + [BARE + p for p in PRIMITIVES]]
    param_names = ["subject"]
    warmup_time = 0.2

    def setup(self, subject: str) -> None:
        self.current = _open(subject, "current")
        self.pair = _open(subject, "begin_end")

    def teardown(self, subject: str) -> None:
        for op in (getattr(self, "current", None), getattr(self, "pair", None)):  # after a skipped setup too
            if op is not None:
                op.close()

    def time_current(self, subject: str) -> None:
        """1000 x ``store.current(owner)`` (or the bare primitive's read)."""
        self.current.run(BATCH)

    def time_begin_end(self, subject: str) -> None:
        """1000 x ``store.end(store.begin(owner))`` (or the bare primitive's set and restore)."""
        self.pair.run(BATCH)


class StateMemory:
    """Peak RSS of the process over N begin/end pairs (flat: 100,000 costs what 1,000 costs)."""

    params = [_backends(), [1_000, 100_000]]
    param_names = ["backend", "invocations"]
    timeout = 300

    def setup(self, backend: str, invocations: int) -> None:
        self.pair = _open(backend, "begin_end")

    def teardown(self, backend: str, invocations: int) -> None:
        if getattr(self, "pair", None) is not None:
            self.pair.close()

    def peakmem_begin_end(self, backend: str, invocations: int) -> None:
        self.pair.run(invocations)
        if self.pair.store.live():
            raise AssertionError(f"{backend}: {self.pair.store.live()} invocations left open")


class StateRetained:
    """Bytes still allocated (tracemalloc) after 100,000 begin/end pairs: 0-100 means nothing accumulates."""

    params = [_backends()]
    param_names = ["backend"]
    timeout = 300
    unit = "bytes"

    def setup(self, backend: str) -> None:
        _open(backend, "begin_end").close()

    def track_retained_bytes_after_100k(self, backend: str) -> int:
        from .stateops import retained_after

        return int(retained_after(backend, 100_000)["retained"])
