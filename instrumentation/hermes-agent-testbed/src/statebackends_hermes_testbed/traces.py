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


def kind_of(span: ReadableSpan) -> Optional[str]:
    """The kind of an instrumentation span (one of :data:`KINDS`, or :data:`LATE`), None for any other span."""
    name = span.name
    if name == f"execute_tool {LATE_TOOL}":
        return LATE
    if name.startswith("invoke_agent"):
        return "invoke_agent"
    if name == "react step":
        return "step"
    if name.startswith("chat "):
        return "chat"
    if name.startswith("execute_tool"):
        return "execute_tool"
    return None


class OpenSpanTracker(SpanProcessor):
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
        with self._lock:
            return list(self._open.values())

    def clear(self) -> None:
        with self._lock:
            self._open.clear()

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


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
        tags = {self.tag}
        for child in self.children:
            tags |= child.all_tags()
        return tags

    def total(self, kind: str) -> int:
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

    @property
    def ok(self) -> bool:
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
            "notes": self.notes,
        }


def _tag_in(value: Any, prefix: str, sep: str) -> Optional[str]:
    """The conversation tag in an id the fake LLM made (``chatcmpl-TAG-k``, ``call_TAG_i``)."""
    if not isinstance(value, str) or not value.startswith(prefix):
        return None
    rest = value[len(prefix):]
    tag, _, _ = rest.rpartition(sep)
    return tag or None


_EXPECTED_PARENT = {"step": ("invoke_agent",), "chat": ("step",), "execute_tool": ("step",)}


def judge(
    spans: Iterable[ReadableSpan],
    calls: Sequence[CallTruth],
    open_spans: Sequence[Any] = (),
    state_left: int = 0,
) -> Verdict:
    """Compare the exported ``spans`` of ``calls`` (each run under a ``call <tag>`` span) with the truth."""
    spans = list(spans)
    by_id = {s.context.span_id: s for s in spans}
    truth = {c.tag: c for c in calls}
    kinds = KINDS + ((LATE,) if any(c.total(LATE) for c in calls) or any(kind_of(s) == LATE for s in spans) else ())
    expected = {k: sum(c.total(k) for c in calls) for k in kinds}
    actual = {k: 0 for k in kinds}
    verdict = Verdict(expected=expected, actual=actual, state_left=state_left)
    verdict.never_ended = sum(1 for s in open_spans if kind_of(s) is not None)
    error_counts: dict[str, dict[str, int]] = {c.tag: {k: 0 for k in KINDS} for c in calls}

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
            started_by_tool = parent is not None and kind_of(parent) == "execute_tool" and owner in late_tags
            if not started_by_tool:
                verdict.orphans += 1
                where = parent.name if parent is not None else "a span never exported"
                verdict.notes.append(f"late work landed under {where!r} of call {owner!r}, as if part of it")
        tag = _tag_in((span.attributes or {}).get(GenAI.GEN_AI_TOOL_CALL_ID), "call_", "_")
        if tag is not None and tag not in late_tags:
            verdict.cross_talk += 1

    for span in spans:
        kind = kind_of(span)
        if kind is None:
            continue
        actual[kind] += 1
        owner = root_call(span)
        parent = by_id.get(span.parent.span_id) if span.parent is not None else None
        parent_kind = kind_of(parent) if parent is not None else None
        if kind == LATE:
            judge_late(span, owner, parent)
            continue
        if owner is None or owner not in truth:
            verdict.orphans += 1
            continue
        if parent is not None and parent.context.trace_id != span.context.trace_id:
            verdict.orphans += 1
            continue
        if kind == "invoke_agent":
            top_level = parent is not None and parent.name.startswith(CALLER_PREFIX)
            nested = parent_kind == "execute_tool"
            if not (top_level or nested):
                verdict.orphans += 1
        elif parent_kind not in _EXPECTED_PARENT[kind]:
            verdict.orphans += 1
        allowed = truth[owner].all_tags()
        attrs: Mapping[str, Any] = span.attributes or {}
        if span.status.status_code.name == "ERROR":
            error_counts[owner][kind] += 1
        for tag in (
            _tag_in(attrs.get(GenAI.GEN_AI_RESPONSE_ID), "chatcmpl-", "-"),
            _tag_in(attrs.get(GenAI.GEN_AI_TOOL_CALL_ID), "call_", "_"),
        ):
            if tag is not None and tag not in allowed:
                verdict.cross_talk += 1
        if kind == "invoke_agent" and parent is not None and parent.name.startswith(CALLER_PREFIX):
            call = truth[owner]
            tokens_in = attrs.get(GenAI.GEN_AI_USAGE_INPUT_TOKENS)
            tokens_out = attrs.get(GenAI.GEN_AI_USAGE_OUTPUT_TOKENS)
            if call.input_tokens is not None and tokens_in != call.input_tokens:
                verdict.cross_talk += 1
                verdict.notes.append(f"{owner}: input tokens {tokens_in} != {call.input_tokens}")
            if call.output_tokens is not None and tokens_out != call.output_tokens:
                verdict.cross_talk += 1
                verdict.notes.append(f"{owner}: output tokens {tokens_out} != {call.output_tokens}")
            rid = attrs.get(GenAI.GEN_AI_RESPONSE_ID)
            rid_tag = _tag_in(rid, "chatcmpl-", "-")
            if rid_tag is not None and rid_tag != owner:
                verdict.notes.append(f"{owner}: response id {rid} belongs to {rid_tag}")
            is_error = span.status.status_code.name == "ERROR"
            if is_error != call.error:
                verdict.wrong_error += 1
    for call in calls:
        if call.errors is None:
            continue
        for kind in KINDS:
            want, got = int(call.errors.get(kind, 0)), error_counts[call.tag][kind]
            if want != got:
                verdict.wrong_error += abs(want - got)
                verdict.notes.append(f"{call.tag}: {got} {kind} span(s) with error status, expected {want}")
    return verdict
