"""Judge exported spans against what each call should have produced.

Each driven call runs under a *caller span* named ``call <tag>`` (the test's
own span, made in the calling thread), so the truth about which invocation a
span belongs to never comes from the instrumentation under test: a span
belongs to the call whose caller span is at the root of its parent chain.
Identifiers the fake LLM puts in its replies (response ids ``chatcmpl-<tag>-<k>``
and tool call ids ``call_<tag>_<i>``) then expose cross-talk. Where a call's truth
lists the LLM requests the fake received (:attr:`CallTruth.requests`), each one's
``traceparent`` must name the call's trace and an HTTP client span that hangs under
one of the call's own ``chat`` spans (the one that got that response).
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GenAI
from opentelemetry.trace import SpanKind

CALLER_PREFIX = "call "


class Kind(enum.StrEnum):
    """What the judge makes of a span (the outcome it counts and compares; as ``str``, its value)."""

    INVOKE_AGENT = "invoke_agent"
    STEP = "step"
    CHAT = "chat"
    EXECUTE_TOOL = "execute_tool"
    LATE = "late_work"
    """An ``execute_tool sb_late_job`` span: work that outlived its call, counted apart from the call's own tree."""
    ENTRY = "entry"
    """A span the parentage checks look through and never count (:data:`ENTRY_OPERATIONS`)."""
    CALL = "call"
    """A caller span (``call <tag>``), the root of every driven call."""


KINDS = (Kind.INVOKE_AGENT, Kind.STEP, Kind.CHAT, Kind.EXECUTE_TOOL)
"""The kinds of a call's own tree, judged in every cell."""
LATE_TOOL = "sb_late_job"
"""The tool that work outliving its call runs (``late_work`` scenario): its spans are judged apart."""
LATE = Kind.LATE


OPERATION_KINDS: dict[str, Kind] = {
    "invoke_agent": Kind.INVOKE_AGENT,
    "create_agent": Kind.INVOKE_AGENT,
    "chat": Kind.CHAT,
    "text_completion": Kind.CHAT,
    "execute_tool": Kind.EXECUTE_TOOL,
    "react": Kind.STEP,
    "hermes.react_step": Kind.STEP,
}
"""``gen_ai.operation.name`` values and the kind they make a span (``react``: loongsuite's step spans;
``hermes.react_step``: ours)."""
ENTRY_OPERATIONS = frozenset({"enter"})
"""Operations of a span an instrumentation may put between the caller and ``invoke_agent`` (loongsuite's
``enter_ai_application_system``): transparent to the judge's parentage checks, never counted."""


def _operation(span: Any) -> Optional[str]:
    attrs = getattr(span, "attributes", None) or {}
    op = attrs.get(GenAI.GEN_AI_OPERATION_NAME)
    return op if isinstance(op, str) else None


def kind_of(span: ReadableSpan) -> Optional[Kind]:
    """The kind of an instrumentation span (one of :data:`KINDS`, or :data:`LATE`), None for any other span.

    Classified by the standard ``gen_ai.operation.name`` where the span carries a known one
    (:data:`OPERATION_KINDS`), else by its name (``invoke_agent ...``, ``react step``, ``chat ...``,
    ``execute_tool ...``), so any Hermes instrumentation is judged, not only ours (:data:`NATIVE`).
    """
    return NATIVE.kind(span)


def is_entry(span: Optional[ReadableSpan]) -> bool:
    """Whether ``span`` is an entry span (:data:`ENTRY_OPERATIONS`) that the parentage checks look through."""
    return span is not None and _operation(span) in ENTRY_OPERATIONS


ENTRY = Kind.ENTRY


def _native_tags(attrs: Mapping[str, Any]) -> Iterable[Optional[str]]:
    return (
        _tag_in(attrs.get(GenAI.GEN_AI_RESPONSE_ID), "chatcmpl-", "-"),
        _tag_in(attrs.get(GenAI.GEN_AI_TOOL_CALL_ID), "call_", "_"),
    )


def _gen_ai_usage(attrs: Mapping[str, Any]) -> tuple[Any, Any]:
    return attrs.get(GenAI.GEN_AI_USAGE_INPUT_TOKENS), attrs.get(GenAI.GEN_AI_USAGE_OUTPUT_TOKENS)


@dataclass(frozen=True)
class Reading:
    """How the judge reads one integration's spans: which span is which kind, where the ids the fake LLM minted and
    the token usage are, and where a turn's tree hangs. Written once per integration, as data; :data:`NATIVE` reads
    OpenTelemetry instrumentations (ours, loongsuite's, any ``BaseInstrumentor``)."""

    name: str
    names: tuple[tuple[str, str], ...] = (
        ("invoke_agent", "invoke_agent"), ("react step", "step"), ("chat ", "chat"), ("execute_tool", "execute_tool"),
    )
    """(span name prefix, kind), first match wins, for a span whose ``gen_ai.operation.name`` names no known kind
    (:data:`OPERATION_KINDS`); a kind :data:`ENTRY` makes the span transparent."""
    kinds: frozenset[str] = frozenset(KINDS)
    """The kinds the integration has spans for; the others are not judged (a turn's chats then hang under it)."""
    tags: Callable[[Mapping[str, Any]], Iterable[Optional[str]]] = _native_tags
    """The conversation tags named by the ids in a span's attributes (response ids, tool call ids, ...)."""
    tokens: Callable[[Mapping[str, Any]], tuple[Any, Any]] = _gen_ai_usage
    """(input, output) tokens a span reports, None where it reports none."""
    tokens_on: str = "invoke_agent"
    """The kind whose spans carry a turn's usage: ``invoke_agent`` (one total), or ``chat`` (summed per turn)."""
    under_caller: bool = True
    """Each turn's tree hangs under the caller's span. False: each turn is a trace of its own; a turn's spans
    belong to the call that the ids in it name (the most common tag), and its root may have no parent."""
    not_applicable: tuple[tuple[str, str], ...] = ()
    """(what is not judged, why), printed under the matrix."""

    def classify(self, span: Any) -> Optional[Kind]:
        """One of :data:`KINDS`, :data:`LATE` or :data:`ENTRY`; None for a span of no judged kind."""
        name = span.name
        op = _operation(span) or ""
        if op in ENTRY_OPERATIONS:
            return Kind.ENTRY
        kind = OPERATION_KINDS.get(op)
        if kind is None:
            kind = next((Kind(k) for prefix, k in self.names if name.startswith(prefix)), None)
        if kind is not None and kind != Kind.ENTRY and kind not in self.kinds:
            return None
        if kind == Kind.EXECUTE_TOOL:
            attrs = span.attributes or {}
            if attrs.get(GenAI.GEN_AI_TOOL_NAME) == LATE_TOOL or name.endswith(LATE_TOOL):
                return LATE
        return kind

    def kind(self, span: Optional[Any]) -> Optional[Kind]:
        """:meth:`classify`, with entry spans as None."""
        if span is None:
            return None
        kind = self.classify(span)
        return None if kind == ENTRY else kind

    def parent_kinds(self) -> dict[str, tuple[Optional[str], ...]]:
        """:data:`PARENT_KINDS` with the kinds this integration has no spans for collapsed into their parents (no
        step: chats and tools hang under the turn); a turn of its own trace may have no parent (None)."""
        out: dict[str, tuple[Optional[str], ...]] = {}
        for kind, parents in PARENT_KINDS.items():
            allowed: list[Optional[str]] = []
            todo = list(parents)
            while todo:
                parent = todo.pop(0)
                if parent == CALL or parent in self.kinds:
                    allowed.append(parent)
                else:
                    todo.extend(PARENT_KINDS.get(parent, ()))
            if kind == Kind.INVOKE_AGENT and not self.under_caller:
                allowed.append(None)
            out[kind] = tuple(dict.fromkeys(allowed))
        return out

    def foreign(self, attributes: Optional[Mapping[str, Any]], allowed: Iterable[str]) -> int:
        """How many of the ids in ``attributes`` name a tag not ``allowed``."""
        allowed = set(allowed) if not isinstance(allowed, (set, frozenset)) else allowed
        return sum(1 for tag in self.tags(attributes or {}) if tag is not None and tag not in allowed)


NATIVE = Reading("native")
"""The reading of OpenTelemetry instrumentations: the GenAI conventions' operations and span names, response and tool
call ids in ``gen_ai.response.id`` / ``gen_ai.tool.call.id``, the turn's usage on ``invoke_agent``."""


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


@dataclass(frozen=True)
class LLMRequest:
    """One chat request the fake LLM received: its ``traceparent`` header and the id of the response it got."""

    traceparent: Optional[str]
    response_id: Optional[str] = None
    """None for a request answered with an error."""


def is_llm_request(span: ReadableSpan) -> bool:
    """Whether ``span`` is an HTTP client span of a chat-completions request (as the httpx instrumentation makes)."""
    attrs = span.attributes or {}
    url = attrs.get("url.full") or attrs.get("http.url")  # stable or old HTTP semantic conventions
    return span.kind is SpanKind.CLIENT and isinstance(url, str) and "/chat/completions" in url


def parse_traceparent(value: Any) -> Optional[tuple[int, int]]:
    """(trace id, parent span id) of a W3C ``traceparent`` header, None when it is missing or malformed."""
    if not isinstance(value, str):
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None
    return (trace_id, span_id) if trace_id and span_id else None


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
    requests: Optional[Sequence[LLMRequest]] = None
    """The chat requests the fake LLM received for this call's tag (not its children's), to judge each one's HTTP
    span and ``traceparent``; None leaves them unjudged."""

    def all_tags(self) -> set[str]:
        """This call's tag and its children's, all the way down."""
        tags = {self.tag}
        for child in self.children:
            tags |= child.all_tags()
        return tags

    def total(self, kind: str) -> int:
        """Spans of ``kind`` this call and its children should have made."""
        own = {Kind.INVOKE_AGENT: 1, Kind.STEP: self.steps, Kind.CHAT: self.chats, Kind.EXECUTE_TOOL: self.tools,
               Kind.LATE: self.late}[Kind(kind)]
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
    requests_off_chat: int = 0
    """LLM requests whose ``traceparent`` is missing, names another trace, or names an HTTP span that is not under
    the call's own chat span for that request (judged only where :attr:`CallTruth.requests` is given)."""

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
            or self.requests_off_chat
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
            ("LLM requests off their chat", self.requests_off_chat),
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
            "requests_off_chat": self.requests_off_chat,
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


CALL = Kind.CALL
PARENT_KINDS: dict[Kind, tuple[Kind, ...]] = {
    Kind.INVOKE_AGENT: (Kind.CALL, Kind.EXECUTE_TOOL),  # top level, or nested under the tool that ran it
    Kind.STEP: (Kind.INVOKE_AGENT,),
    Kind.CHAT: (Kind.STEP,),
    Kind.EXECUTE_TOOL: (Kind.STEP,),
}
"""The kinds a span of each kind may hang under."""


def kind_or_call(span: Optional[ReadableSpan], reading: Optional[Reading] = None) -> Optional[Kind]:
    """:func:`kind_of` (by ``reading``), or :data:`CALL` for a caller span; None for no span."""
    if span is None:
        return None
    return CALL if span.name.startswith(CALLER_PREFIX) else (reading or NATIVE).kind(span)


def foreign_tags(attributes: Optional[Mapping[str, Any]], allowed: Iterable[str]) -> int:
    """How many of the ids the fake LLM made (response id, tool call id) in ``attributes`` name a tag not ``allowed``."""
    return NATIVE.foreign(attributes, allowed)


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
    reading: Reading = NATIVE,
) -> Verdict:
    """Compare the exported ``spans`` of ``calls`` (each run under a ``call <tag>`` span) with the truth, reading
    them as ``reading`` says (:data:`NATIVE`: an OpenTelemetry instrumentation; a Hermes plugin has its own).

    Besides the counts, ``Verdict.broken`` names every call whose own tree is wrong.
    """
    spans = list(spans)
    by_id = {s.context.span_id: s for s in spans}
    truth = {c.tag: c for c in calls}
    every: dict[str, CallTruth] = {}  # every tag, children's included -> its CallTruth
    top_of: dict[str, str] = {}  # every tag -> the tag of the driven call it belongs to

    def _index(call: CallTruth, top: str) -> None:
        every[call.tag], top_of[call.tag] = call, top
        for child in call.children:
            _index(child, top)

    for call in calls:
        _index(call, call.tag)
    kind_by_id = {s.context.span_id: reading.classify(s) for s in spans}

    def kind(span: Optional[ReadableSpan]) -> Optional[str]:
        if span is None:
            return None
        k = kind_by_id.get(span.context.span_id, ENTRY)
        return None if k == ENTRY else k

    judged = tuple(k for k in KINDS if k in reading.kinds)
    has_late = any(c.total(LATE) for c in calls) or any(k == LATE for k in kind_by_id.values())
    kinds = judged + ((LATE,) if has_late else ())
    parent_kinds = reading.parent_kinds()
    expected = {k: sum(c.total(k) for c in calls) for k in kinds}
    actual = {k: 0 for k in kinds}
    verdict = Verdict(expected=expected, actual=actual, state_left=state_left)
    verdict.never_ended = sum(1 for s in open_spans if reading.classify(s) is not None)
    per_call: dict[str, dict[str, int]] = {c.tag: {k: 0 for k in kinds} for c in calls}
    error_counts: dict[str, dict[str, int]] = {c.tag: {k: 0 for k in judged} for c in calls}
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

    def turn_of(span: ReadableSpan) -> int:
        """The span id of the turn ``span`` is in: its nearest ``invoke_agent`` (itself included), else the first
        ancestor never exported, else its root."""
        current, seen = span, 0
        while seen < 64:
            if kind(current) == Kind.INVOKE_AGENT or current.parent is None:
                return current.context.span_id
            parent = by_id.get(current.parent.span_id)
            if parent is None:
                return current.parent.span_id
            current, seen = parent, seen + 1
        return current.context.span_id

    turn_tag: dict[int, Optional[str]] = {}  # reading.under_caller False: a turn's owner, the tag its ids name most
    if not reading.under_caller:
        named: dict[int, Counter] = {}
        for span in spans:
            if kind(span) is not None:
                tags = [t for t in reading.tags(span.attributes or {}) if t is not None]
                named.setdefault(turn_of(span), Counter()).update(tags)
        turn_tag = {turn: (counts.most_common(1)[0][0] if counts else None) for turn, counts in named.items()}

    def owner_of(span: ReadableSpan) -> tuple[Optional[str], Optional[str]]:
        """(the driven call ``span`` belongs to, the tag whose ids it may carry along with that tag's children's)."""
        if reading.under_caller:
            owner = root_call(span)
            return owner, owner
        tag = turn_tag.get(turn_of(span))
        return top_of.get(tag) if tag is not None else None, tag

    late_tags = {tag for c in calls if c.total(LATE) for tag in c.all_tags()}

    def judge_late(span: ReadableSpan, owner: Optional[str], parent: Optional[ReadableSpan]) -> None:
        """Work that outlived its call: a root of its own, or under the tool span that started it, never in the call's tree."""
        if span.parent is not None:
            started_by_tool = kind(parent) == Kind.EXECUTE_TOOL and owner in late_tags if parent is not None else False
            if not started_by_tool:
                verdict.orphans += 1
                where = parent.name if parent is not None else "a span never exported"
                verdict.notes.append(f"late work landed under {where!r} of call {owner!r}, as if part of it")
                if owner in truth:
                    broken.add(owner)
        verdict.cross_talk += reading.foreign(span.attributes, late_tags)

    detached: list[str] = []  # judged spans with no caller span at the root of their trace
    caller_traces = {s.context.trace_id for s in spans if s.name.startswith(CALLER_PREFIX)}
    turn_tokens: dict[int, list[Any]] = {}  # tokens_on "chat": turn -> [input, output] summed over its chats
    top_turns: list[tuple[int, str]] = []  # the turns of driven calls (not of their children): (turn, call tag)

    def check_tokens(owner: str, tokens_in: Any, tokens_out: Any) -> None:
        call = truth[owner]
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

    for span in spans:
        k = kind(span)
        if k is None:
            continue
        actual[k] += 1
        owner, own_tag = owner_of(span)
        parent = by_id.get(span.parent.span_id) if span.parent is not None else None
        hops = 0
        while parent is not None and kind_by_id.get(parent.context.span_id) == ENTRY and parent.parent is not None and hops < 64:
            parent, hops = by_id.get(parent.parent.span_id), hops + 1  # look through entry spans
        if owner in per_call:
            per_call[owner][k] += 1
        if k == LATE:
            judge_late(span, owner, parent)
            continue
        if owner is None or owner not in truth:
            verdict.orphans += 1
            if owner is None and reading.under_caller:
                detached.append(span.name if span.context.trace_id in caller_traces else f"{span.name} (new trace)")
            continue
        parent_kind = kind_or_call(parent, reading) if parent is not None else None
        if parent_kind not in parent_kinds[k] or (parent is not None and parent.context.trace_id != span.context.trace_id):
            verdict.orphans += 1
            broken.add(owner)
        attrs: Mapping[str, Any] = span.attributes or {}
        if span.status.status_code.name == "ERROR":
            error_counts[owner][k] += 1
        crossed = reading.foreign(attrs, every[own_tag].all_tags() if own_tag in every else truth[owner].all_tags())
        if crossed:
            verdict.cross_talk += crossed
            broken.add(owner)
        if k == Kind.CHAT and reading.tokens_on == Kind.CHAT:
            sums = turn_tokens.setdefault(turn_of(span), [None, None])
            for i, value in enumerate(reading.tokens(attrs)):
                if isinstance(value, int):
                    sums[i] = (sums[i] or 0) + value
        top_level = parent_kind == CALL if reading.under_caller else own_tag == owner
        if k == Kind.INVOKE_AGENT and top_level:
            call = truth[owner]
            if reading.tokens_on == "invoke_agent":
                check_tokens(owner, *reading.tokens(attrs))
                rid = attrs.get(GenAI.GEN_AI_RESPONSE_ID)
                rid_tag = _tag_in(rid, "chatcmpl-", "-")
                if rid_tag is not None and rid_tag != owner:
                    verdict.notes.append(f"{owner}: response id {rid} belongs to {rid_tag}")
            else:
                top_turns.append((span.context.span_id, owner))
            is_error = span.status.status_code.name == "ERROR"
            if is_error != call.error:
                verdict.wrong_error += 1
                broken.add(owner)
    if reading.tokens_on != "invoke_agent":
        if not reading.under_caller:  # a turn whose root was never exported is still a turn of its own
            known = {turn for turn, _ in top_turns}
            top_turns += [(t, tag) for t, tag in turn_tag.items() if tag in truth and t not in known]
        for turn, owner in top_turns:
            check_tokens(owner, *turn_tokens.get(turn, (None, None)))
    for call in calls:
        if any(per_call[call.tag][k] != call.total(k) for k in judged):  # late work may rightly leave the tree
            broken.add(call.tag)
        if call.errors is None:
            continue
        for k in judged:
            want, got = int(call.errors.get(k, 0)), error_counts[call.tag][k]
            if want != got:
                verdict.wrong_error += abs(want - got)
                broken.add(call.tag)
                verdict.notes.append(f"{call.tag}: {got} {k} span(s) with error status, expected {want}")
    if detached:
        names = ", ".join(f"{n} x{detached.count(n)}" for n in sorted(set(detached)))
        verdict.notes.append(f"{len(detached)} span(s) with no caller span at their root: {names}")
    _judge_requests(verdict, calls, by_id, lambda span: owner_of(span)[0], broken, kind=kind, same_trace=reading.under_caller)
    verdict.broken = sorted(broken)
    return verdict


_REQUEST_NOTES = 6
"""Notes written about LLM requests off their chat, at most (the count has them all)."""


def _judge_requests(
    verdict: Verdict,
    calls: Sequence[CallTruth],
    by_id: Mapping[int, ReadableSpan],
    root_call: Any,
    broken: set[str],
    *,
    kind: Callable[[Optional[ReadableSpan]], Optional[Kind]] = kind_of,
    same_trace: bool = True,
) -> None:
    """Count the LLM requests of ``calls`` (and their children) whose ``traceparent`` is not under their own chat.

    ``root_call(span)``: the call a span belongs to; ``kind``: a span's kind (the integration's reading);
    ``same_trace``: the request must be in the caller's trace (False where each turn is a trace of its own)."""
    traces = {s.name[len(CALLER_PREFIX):]: s.context.trace_id for s in by_id.values() if s.name.startswith(CALLER_PREFIX)}

    def problem(request: LLMRequest, owner: str) -> Optional[str]:
        ids = parse_traceparent(request.traceparent)
        if ids is None:
            return f"sent no valid traceparent ({request.traceparent!r})"
        trace_id, span_id = ids
        if same_trace and trace_id != traces.get(owner):
            return "sent the traceparent of another trace"
        http = by_id.get(span_id)
        if http is None or not is_llm_request(http):
            return f"sent a traceparent whose span is {'not exported' if http is None else repr(http.name)}, not its HTTP span"
        chat = by_id.get(http.parent.span_id) if http.parent is not None else None
        if chat is None or kind(chat) != Kind.CHAT:
            return f"has its HTTP span under {chat.name if chat is not None else 'no exported span'!r}, not a chat"
        if root_call(chat) != owner:
            return "has its HTTP span under another call's chat"
        chat_id = (chat.attributes or {}).get(GenAI.GEN_AI_RESPONSE_ID)
        if request.response_id and chat_id and chat_id != request.response_id:
            return f"got {request.response_id} but its HTTP span is under the chat of {chat_id}"
        return None

    def visit(call: CallTruth, owner: str) -> None:
        for request in call.requests or ():
            found = problem(request, owner)
            if found is not None:
                verdict.requests_off_chat += 1
                broken.add(owner)
                if verdict.requests_off_chat <= _REQUEST_NOTES:
                    verdict.notes.append(f"{call.tag}: an LLM request {found}")
        for child in call.children:
            visit(child, owner)

    for call in calls:
        visit(call, call.tag)


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
