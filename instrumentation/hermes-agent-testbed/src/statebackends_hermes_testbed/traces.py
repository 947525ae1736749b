"""Judge exported spans against what each call should have produced.

Each driven call runs under a *caller span* named ``call <tag>`` (the test's
own span, made in the calling thread), so the truth about which invocation a
span belongs to never comes from the instrumentation under test: a span
belongs to the call whose caller span is at the root of its parent chain.
Identifiers the fake LLM puts in its replies (response ids ``chatcmpl-<tag>-<k>``
and tool call ids ``call_<tag>_<i>``) then expose cross-talk.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GenAI

CALLER_PREFIX = "call "
KINDS = ("invoke_agent", "step", "chat", "execute_tool")
LATE_TOOL = "sb_late_job"
"""The tool that work outliving its call runs (``late_work`` scenario): its spans are judged apart."""
LATE = "late_work"
"""The kind of an ``execute_tool sb_late_job`` span: counted apart from the call's own tree."""


OPERATION_KINDS: dict[str, str] = {
    "invoke_agent": "invoke_agent",
    "create_agent": "invoke_agent",
    "chat": "chat",
    "text_completion": "chat",
    "execute_tool": "execute_tool",
    "react": "step",
}
"""``gen_ai.operation.name`` values and the kind they make a span (``react``: loongsuite's step spans)."""
ENTRY_OPERATIONS = frozenset({"enter"})
"""Operations of a span an instrumentation may put between the caller and ``invoke_agent`` (loongsuite's
``enter_ai_application_system``): transparent to the judge's parentage checks, never counted."""


def _operation(span: Any) -> Optional[str]:
    attrs = getattr(span, "attributes", None) or {}
    op = attrs.get(GenAI.GEN_AI_OPERATION_NAME)
    return op if isinstance(op, str) else None


def kind_of(span: ReadableSpan) -> Optional[str]:
    """The kind of an instrumentation span (one of :data:`KINDS`, or :data:`LATE`), None for any other span.

    Classified by the standard ``gen_ai.operation.name`` where the span carries a known one
    (:data:`OPERATION_KINDS`), else by its name (``invoke_agent ...``, ``react step``, ``chat ...``,
    ``execute_tool ...``), so any Hermes instrumentation is judged, not only ours.
    """
    name = span.name
    attrs = span.attributes or {}
    kind = OPERATION_KINDS.get(_operation(span) or "")
    if kind is None:
        if name.startswith("invoke_agent"):
            kind = "invoke_agent"
        elif name == "react step":
            kind = "step"
        elif name.startswith("chat "):
            kind = "chat"
        elif name.startswith("execute_tool"):
            kind = "execute_tool"
    if kind == "execute_tool" and (attrs.get(GenAI.GEN_AI_TOOL_NAME) == LATE_TOOL or name == f"execute_tool {LATE_TOOL}"):
        return LATE
    return kind


def is_entry(span: Optional[ReadableSpan]) -> bool:
    """Whether ``span`` is an entry span (:data:`ENTRY_OPERATIONS`) that the parentage checks look through."""
    return span is not None and _operation(span) in ENTRY_OPERATIONS


def is_instrumentation_span(span: ReadableSpan) -> bool:
    """A span the instrumentation made: one of the judged kinds or an entry span (counted when never ended)."""
    return kind_of(span) is not None or is_entry(span)


class SpanProcessorBase(SpanProcessor):
    """A span processor that does nothing: the testbed's processors override only what they watch."""

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        """Called when ``span`` starts; nothing by default."""

    def on_end(self, span: ReadableSpan) -> None:
        """Called when ``span`` ends; nothing by default."""

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered: always flushed."""
        return True


class OpenSpanTracker(SpanProcessorBase):
    """Remembers every span started and not yet ended."""

    def __init__(self) -> None:
        self._open: dict[int, Span] = {}
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        with self._lock:
            self._open[span.context.span_id] = span

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self._open.pop(span.context.span_id, None)

    def open_spans(self) -> list[Span]:
        """The spans started and not ended, now."""
        with self._lock:
            return list(self._open.values())

    def clear(self) -> None:
        """Forget every open span."""
        with self._lock:
            self._open.clear()


@dataclass
class CallTruth:
    """What one driven call should have produced."""

    tag: str
    steps: int
    chats: int
    tools: int
    input_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    children: Sequence["CallTruth"] = ()
    error: bool = False
    errors: Optional[Mapping[str, int]] = None
    """Spans with ERROR status expected per kind in this call's whole tree (children included);
    None leaves them unchecked. Kinds not named are expected to have none."""
    late: int = 0
    """Late-work spans (:data:`LATE_TOOL`) this call's tools started and that ran after it returned."""

    def all_tags(self) -> set[str]:
        """This call's tag and its children's, all the way down."""
        tags = {self.tag}
        for child in self.children:
            tags |= child.all_tags()
        return tags

    def total(self, kind: str) -> int:
        """Spans of ``kind`` this call and its children should have made."""
        own = {"invoke_agent": 1, "step": self.steps, "chat": self.chats, "execute_tool": self.tools, LATE: self.late}[kind]
        return own + sum(child.total(kind) for child in self.children)


@dataclass
class Verdict:
    """What broke in one cell, with counts; ``ok`` when nothing did."""

    expected: dict[str, int]
    actual: dict[str, int]
    never_ended: int = 0
    orphans: int = 0
    cross_talk: int = 0
    state_left: int = 0
    wrong_error: int = 0
    notes: list[str] = field(default_factory=list)
    leaked: int = 0
    """Objects of the instrumentation (states, spans) still alive after a run that should have freed them."""
    memory_over_kib: int = 0
    """How far memory grew past the bound a run allows (KiB), 0 when within it."""
    broken: list[str] = field(default_factory=list)
    """Tags of the calls whose own tree is wrong (counts, parents, ids, tokens or status)."""

    @property
    def ok(self) -> bool:
        """True when the counts match and nothing broke."""
        return self.expected == self.actual and not (
            self.never_ended
            or self.orphans
            or self.cross_talk
            or self.state_left
            or self.wrong_error
            or self.leaked
            or self.memory_over_kib
        )

    def summary(self) -> str:
        """``ok``, or what broke, with counts, in one line."""
        if self.ok:
            return "ok"
        parts = []
        missing = [f"{k} {self.actual.get(k, 0)}/{n}" for k, n in self.expected.items() if self.actual.get(k, 0) != n]
        if missing:
            parts.append("spans " + ", ".join(missing))
        for label, value in (
            ("orphans", self.orphans),
            ("cross-talk", self.cross_talk),
            ("never ended", self.never_ended),
            ("state left", self.state_left),
            ("wrong status", self.wrong_error),
            ("leaked", self.leaked),
            ("memory over bound KiB", self.memory_over_kib),
        ):
            if value:
                parts.append(f"{label} {value}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The verdict as JSON-able data."""
        return {
            "ok": self.ok,
            "summary": self.summary(),
            "expected": self.expected,
            "actual": self.actual,
            "never_ended": self.never_ended,
            "orphans": self.orphans,
            "cross_talk": self.cross_talk,
            "state_left": self.state_left,
            "wrong_error": self.wrong_error,
            "leaked": self.leaked,
            "memory_over_kib": self.memory_over_kib,
            "broken": self.broken,
            "notes": self.notes,
        }


def _tag_in(value: Any, prefix: str, sep: str) -> Optional[str]:
    """The conversation tag in an id the fake LLM made (``chatcmpl-TAG-k``, ``call_TAG_i``)."""
    if not isinstance(value, str) or not value.startswith(prefix):
        return None
    rest = value[len(prefix):]
    tag, _, _ = rest.rpartition(sep)
    return tag or None


CALL = "call"
"""The kind of a caller span (``call <tag>``), the root of every driven call."""
PARENT_KINDS: dict[str, tuple[str, ...]] = {
    "invoke_agent": (CALL, "execute_tool"),  # top level, or nested under the tool that ran it
    "step": ("invoke_agent",),
    "chat": ("step",),
    "execute_tool": ("step",),
}
"""The kinds a span of each kind may hang under."""


def kind_or_call(span: Optional[ReadableSpan]) -> Optional[str]:
    """:func:`kind_of`, or :data:`CALL` for a caller span; None for no span."""
    if span is None:
        return None
    return CALL if span.name.startswith(CALLER_PREFIX) else kind_of(span)


def foreign_tags(attributes: Optional[Mapping[str, Any]], allowed: Iterable[str]) -> int:
    """How many of the ids the fake LLM made (response id, tool call id) in ``attributes`` name a tag not ``allowed``."""
    attrs = attributes or {}
    allowed = set(allowed) if not isinstance(allowed, (set, frozenset)) else allowed
    found = (
        _tag_in(attrs.get(GenAI.GEN_AI_RESPONSE_ID), "chatcmpl-", "-"),
        _tag_in(attrs.get(GenAI.GEN_AI_TOOL_CALL_ID), "call_", "_"),
    )
    return sum(1 for tag in found if tag is not None and tag not in allowed)


def state_left(store: Any, owners: Iterable[Any] = (), live_before: int = 0) -> int:
    """States a finished run left: one per owner that still has a current state here, plus invocations still open."""
    if store is None:
        return 0
    left = sum(1 for owner in owners if store.current(owner) is not None)
    live = store.live()
    if live is not None and live > live_before:
        left += live - live_before
    return left


def judge(
    spans: Iterable[ReadableSpan],
    calls: Sequence[CallTruth],
    open_spans: Sequence[Any] = (),
    state_left: int = 0,
) -> Verdict:
    """Compare the exported ``spans`` of ``calls`` (each run under a ``call <tag>`` span) with the truth.

    Besides the counts, ``Verdict.broken`` names every call whose own tree is wrong.
    """
    spans = list(spans)
    by_id = {s.context.span_id: s for s in spans}
    truth = {c.tag: c for c in calls}
    kinds = KINDS + ((LATE,) if any(c.total(LATE) for c in calls) or any(kind_of(s) == LATE for s in spans) else ())
    expected = {k: sum(c.total(k) for c in calls) for k in kinds}
    actual = {k: 0 for k in kinds}
    verdict = Verdict(expected=expected, actual=actual, state_left=state_left)
    verdict.never_ended = sum(1 for s in open_spans if is_instrumentation_span(s))
    per_call: dict[str, dict[str, int]] = {c.tag: {k: 0 for k in kinds} for c in calls}
    error_counts: dict[str, dict[str, int]] = {c.tag: {k: 0 for k in KINDS} for c in calls}
    broken: set[str] = set()

    def root_call(span: ReadableSpan) -> Optional[str]:
        seen = 0
        current = span
        while current.parent is not None and seen < 64:
            parent = by_id.get(current.parent.span_id)
            if parent is None:
                return None
            if parent.name.startswith(CALLER_PREFIX):
                return parent.name[len(CALLER_PREFIX):]
            current, seen = parent, seen + 1
        return None

    late_tags = {tag for c in calls if c.total(LATE) for tag in c.all_tags()}

    def judge_late(span: ReadableSpan, owner: Optional[str], parent: Optional[ReadableSpan]) -> None:
        """Work that outlived its call: a root of its own, or under the tool span that started it, never in the call's tree."""
        if span.parent is not None:
            started_by_tool = kind_of(parent) == "execute_tool" and owner in late_tags if parent is not None else False
            if not started_by_tool:
                verdict.orphans += 1
                where = parent.name if parent is not None else "a span never exported"
                verdict.notes.append(f"late work landed under {where!r} of call {owner!r}, as if part of it")
                if owner in truth:
                    broken.add(owner)
        verdict.cross_talk += foreign_tags(span.attributes, late_tags)

    detached: list[str] = []  # judged spans with no caller span at the root of their trace
    caller_traces = {s.context.trace_id for s in spans if s.name.startswith(CALLER_PREFIX)}

    for span in spans:
        kind = kind_of(span)
        if kind is None:
            continue
        actual[kind] += 1
        owner = root_call(span)
        parent = by_id.get(span.parent.span_id) if span.parent is not None else None
        hops = 0
        while is_entry(parent) and parent.parent is not None and hops < 64:  # look through entry spans
            parent, hops = by_id.get(parent.parent.span_id), hops + 1
        if owner in per_call:
            per_call[owner][kind] += 1
        if kind == LATE:
            judge_late(span, owner, parent)
            continue
        if owner is None or owner not in truth:
            verdict.orphans += 1
            if owner is None:
                detached.append(span.name if span.context.trace_id in caller_traces else f"{span.name} (new trace)")
            continue
        if kind_or_call(parent) not in PARENT_KINDS[kind] or parent.context.trace_id != span.context.trace_id:
            verdict.orphans += 1
            broken.add(owner)
        attrs: Mapping[str, Any] = span.attributes or {}
        if span.status.status_code.name == "ERROR":
            error_counts[owner][kind] += 1
        crossed = foreign_tags(attrs, truth[owner].all_tags())
        if crossed:
            verdict.cross_talk += crossed
            broken.add(owner)
        if kind == "invoke_agent" and kind_or_call(parent) == CALL:
            call = truth[owner]
            tokens_in = attrs.get(GenAI.GEN_AI_USAGE_INPUT_TOKENS)
            tokens_out = attrs.get(GenAI.GEN_AI_USAGE_OUTPUT_TOKENS)
            if tokens_in is None and call.input_tokens == 0:
                tokens_in = 0  # no usage reported where none was used: not a mismatch
            if tokens_out is None and call.output_tokens == 0:
                tokens_out = 0
            if call.input_tokens is not None and tokens_in != call.input_tokens:
                verdict.cross_talk += 1
                broken.add(owner)
                verdict.notes.append(f"{owner}: input tokens {tokens_in} != {call.input_tokens}")
            if call.output_tokens is not None and tokens_out != call.output_tokens:
                verdict.cross_talk += 1
                broken.add(owner)
                verdict.notes.append(f"{owner}: output tokens {tokens_out} != {call.output_tokens}")
            rid = attrs.get(GenAI.GEN_AI_RESPONSE_ID)
            rid_tag = _tag_in(rid, "chatcmpl-", "-")
            if rid_tag is not None and rid_tag != owner:
                verdict.notes.append(f"{owner}: response id {rid} belongs to {rid_tag}")
            is_error = span.status.status_code.name == "ERROR"
            if is_error != call.error:
                verdict.wrong_error += 1
                broken.add(owner)
    for call in calls:
        if any(per_call[call.tag][k] != call.total(k) for k in KINDS):  # late work may rightly leave the tree
            broken.add(call.tag)
        if call.errors is None:
            continue
        for kind in KINDS:
            want, got = int(call.errors.get(kind, 0)), error_counts[call.tag][kind]
            if want != got:
                verdict.wrong_error += abs(want - got)
                broken.add(call.tag)
                verdict.notes.append(f"{call.tag}: {got} {kind} span(s) with error status, expected {want}")
    if detached:
        names = ", ".join(f"{n} x{detached.count(n)}" for n in sorted(set(detached)))
        verdict.notes.append(f"{len(detached)} span(s) with no caller span at their root: {names}")
    verdict.broken = sorted(broken)
    return verdict


class StreamingJudge(SpanProcessorBase):
    """Judges spans as they end and keeps none of them (a soak must not grow with its exporter).

    Counts spans per kind, orphans (a parent of a kind not in :data:`PARENT_KINDS`,
    or no caller span at the root), cross-talk (a response id or tool call id of
    another call) and the spans still open. Only open spans are remembered, by id.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, tuple[Optional[str], Optional[str], Optional[str]]] = {}
        self.counts = {k: 0 for k in KINDS}
        self.orphans = 0
        self.cross_talk = 0

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        kind = kind_or_call(span)
        with self._lock:
            parent = self._open.get(span.parent.span_id) if span.parent is not None else None
            root = span.name[len(CALLER_PREFIX):] if kind == CALL else (parent[1] if parent is not None else None)
            parent_kind = parent[0] if parent is not None else None
            if is_entry(span):  # transparent: its children see its parent's kind
                self._open[span.context.span_id] = (parent_kind, root, parent[2] if parent is not None else None)
                return
            self._open[span.context.span_id] = (kind, root, parent_kind)

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            kind, root, parent_kind = self._open.pop(span.context.span_id, (None, None, None))
            if kind not in self.counts or is_entry(span):
                return
            self.counts[kind] += 1
            if root is None or parent_kind not in PARENT_KINDS[kind]:
                self.orphans += 1
                return
            self.cross_talk += foreign_tags(span.attributes, (root,))

    def never_ended(self) -> int:
        """Instrumentation spans started and not ended."""
        with self._lock:
            return sum(1 for kind, _, _ in self._open.values() if kind in self.counts)
