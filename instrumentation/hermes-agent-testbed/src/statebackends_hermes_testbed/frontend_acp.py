"""Drive Hermes's REAL ACP adapter (``acp_adapter.server.HermesACPAgent``) in process, against the fake LLM.

The adapter is the agent side of the Agent Client Protocol; :class:`RecordingClient` is the other
side (what an editor is), reduced to recording the ``session/update`` notifications the adapter sends
and refusing permission requests. No stdio, no subprocess: the adapter's async methods
(``initialize``, ``new_session``, ``prompt``, ``cancel``) are awaited on an asyncio loop, exactly as
``acp``'s connection would call them.

* :func:`acp_runtime` - for the duration of a ``with``: Hermes's ``config.yaml`` (in ``HERMES_HOME``)
  points the ``custom`` provider at a fake LLM's base URL, with the context length given (no model
  metadata probe beyond loopback), automatic session titles and background reviews off (extra LLM calls);
  the file's previous text is put back afterwards. Registers :data:`ACP_TOOL` in Hermes's
  ``hermes-acp`` toolset, the toolset ``SessionManager._make_agent`` enables for every ACP agent.
* :class:`TurnScript` - the fake LLM's :class:`~statebackends_hermes_testbed.fakellm.Script`, reading
  the directives of the LATEST user message (each ACP turn re-sends the session's whole history, so
  the first user message would give every turn of a session the first turn's tag and tool call ids).
* :class:`AcpFrontend` - one adapter, its client, and a tracer for the caller spans.
* :func:`invocations` - each exported ``invoke_agent`` span with the spans under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GenAI

from statebackends_hermes_agent.lifecycle import REACT_ROUND

from .fakellm import Reply, Script, _content_text
from .hermes_harness import API_KEY, MODEL, _sb_echo, hermes_config, register_tool
from .traces import CALLER_PREFIX, kind_of

__all__ = [
    "ACP_GATE",
    "ACP_TOOL",
    "GATE",
    "Rendezvous",
    "ACP_TOOLSET",
    "AcpFrontend",
    "Invocation",
    "RecordingClient",
    "TurnScript",
    "acp_config_text",
    "acp_runtime",
    "invocations",
    "register_acp_tool",
    "strays",
    "wait_until",
]

ACP_TOOLSET = "hermes-acp"
"""The toolset ``acp_adapter.session.SessionManager._make_agent`` gives every ACP agent."""
ACP_TOOL = "sb_acp_echo"
"""The bench echo tool (``sleep_ms`` honoured), registered in :data:`ACP_TOOLSET`; prompts name it with ``[tool:sb_acp_echo]``."""
ACP_GATE = "sb_acp_gate"
"""A rendezvous tool in :data:`ACP_TOOLSET` (see :class:`Rendezvous`); prompts name it with ``[tool:sb_acp_gate]``."""
CONTEXT_LENGTH = 131072


class TurnScript(Script):
    """A :class:`Script` that plans from the latest user message on (the current turn), not from the first one.

    Hermes joins a user message left without an answer (the prompt of a cancelled turn) with the next one; when
    the latest user message holds several ``[conv:...]`` directives, only the text from the last one on (the
    newest prompt) is planned from.
    """

    def plan(self, request: Mapping[str, Any], traceparent: Optional[str] = None) -> Reply:
        messages = list(request.get("messages") or [])
        last_user = max((i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "user"),
                        default=None)
        if last_user is not None:
            turn = messages[last_user:]
            text = _content_text(turn[0].get("content"))
            cut = text.rfind("[conv:")
            if cut > 0:
                turn = [{**turn[0], "content": text[cut:]}] + turn[1:]
            request = {**request, "messages": turn}
        return super().plan(request, traceparent)


def acp_config_text(base_url: str, *, model: str = MODEL, api_key: str = API_KEY) -> str:
    """``config.yaml`` for ACP agents on ``base_url``: provider ``custom``, a fixed context length, no auto titles,
    and no background memory/skill review (``memory.nudge_interval`` / ``skills.creation_nudge_interval`` 0): after
    every 10 tool iterations Hermes would otherwise start a review agent on a ``bg-review`` thread, an extra
    invocation and LLM traffic outliving the turn."""
    from .hermes_harness import minimal_config_text

    return (
        minimal_config_text(model).replace(f"model: {model}\n", "")
        + "model:\n"
        f"  default: {model}\n"
        "  provider: custom\n"
        f"  base_url: {base_url}\n"
        f"  api_key: {api_key}\n"
        f"  context_length: {CONTEXT_LENGTH}\n"
        "auxiliary:\n"
        "  title_generation:\n"
        "    enabled: false\n"
        "memory:\n"
        "  nudge_interval: 0\n"
        "skills:\n"
        "  creation_nudge_interval: 0\n"
    )


class Rendezvous:
    """What :data:`ACP_GATE` does: each call (``text`` = ``TAG-i``) waits until calls of every expected tag have
    arrived, so the turns of those tags are provably inside a tool at one moment; then it returns its text.

    A call never waits longer than ``timeout`` seconds (it then returns all the same); ``met`` tells whether every
    expected tag arrived while the first one was still waiting.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._expected: frozenset[str] = frozenset()
        self._arrived: set[str] = set()
        self.met = False
        self.timeout = 20.0
        self.task_ids: dict[str, set[Any]] = {}

    def expect(self, tags: Iterable[str]) -> None:
        """Arm the gate for ``tags`` (forgetting earlier arrivals)."""
        with self._cond:
            self._expected = frozenset(tags)
            self._arrived = set()
            self.met = False
            self.task_ids = {}

    def __call__(self, args: dict[str, Any], **kwargs: Any) -> str:
        text = str(args.get("text", ""))
        tag = text.rpartition("-")[0] or text
        with self._cond:
            self.task_ids.setdefault(tag, set()).add(kwargs.get("task_id"))
            self._arrived.add(tag)
            if self._expected <= self._arrived:
                self.met = True
                self._cond.notify_all()
            else:
                self._cond.wait_for(lambda: self._expected <= self._arrived, timeout=self.timeout)
        return text


GATE = Rendezvous()
"""The handler of :data:`ACP_GATE`."""


def _gate(args: dict[str, Any], **kwargs: Any) -> str:
    return GATE(args, **kwargs)


def register_acp_tool() -> None:
    """Register :data:`ACP_TOOL` and :data:`ACP_GATE` in :data:`ACP_TOOLSET` (plugin-style registry tools), both parallel-safe."""
    import agent.tool_dispatch_helpers as tdh

    register_tool(ACP_TOOL, ACP_TOOLSET, _sb_echo, "Benchmark tool: returns its text argument.", sleep=True)
    register_tool(ACP_GATE, ACP_TOOLSET, _gate, "Benchmark tool: waits for its peers, returns its text argument.")
    wanted = {ACP_TOOL, ACP_GATE}
    if not wanted <= tdh._PARALLEL_SAFE_TOOLS:
        tdh._PARALLEL_SAFE_TOOLS = tdh._PARALLEL_SAFE_TOOLS | wanted


@contextlib.contextmanager
def acp_runtime(base_url: str) -> Iterator[Path]:
    """Point Hermes's config (``$HERMES_HOME/config.yaml``) at ``base_url`` while inside; yield the file's path."""
    with hermes_config(acp_config_text(base_url)) as path:
        register_acp_tool()
        yield path


@dataclass
class RecordingClient:
    """The client side of ACP for the adapter: records every ``session_update`` and denies permissions."""

    updates: list[tuple[str, Any]] = field(default_factory=list)
    permission_requests: int = 0

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        self.updates.append((session_id, update))

    async def request_permission(self, *args: Any, **kwargs: Any) -> Any:
        from acp.schema import DeniedOutcome, RequestPermissionResponse

        self.permission_requests += 1
        return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))

    def mark(self) -> int:
        """A position in the record: pass it as ``since`` to read only what came after."""
        return len(self.updates)

    def of(self, session_id: str, kind: Optional[str] = None, *, since: int = 0) -> list[Any]:
        """The updates sent for ``session_id`` (of ``session_update`` kind ``kind`` when given) after ``since``, in order."""
        return [u for s, u in self.updates[since:] if s == session_id and (kind is None or u.session_update == kind)]

    def agent_text(self, session_id: str, *, since: int = 0) -> str:
        """The agent message text the client was shown for ``session_id``, chunks joined."""
        return "".join(u.content.text for u in self.of(session_id, "agent_message_chunk", since=since))

    def user_text(self, session_id: str, *, since: int = 0) -> str:
        """The user message text the adapter sent for ``session_id`` (the queued prompts it runs)."""
        return "".join(u.content.text for u in self.of(session_id, "user_message_chunk", since=since))


class AcpFrontend:
    """One real ``HermesACPAgent`` (its own ``SessionManager``) connected to a :class:`RecordingClient`."""

    def __init__(self, tracer: Any) -> None:
        from acp_adapter.server import HermesACPAgent

        self.tracer = tracer
        self.adapter = HermesACPAgent()
        self.client = RecordingClient()
        self.adapter.on_connect(self.client)

    async def initialize(self) -> Any:
        import acp

        return await self.adapter.initialize(protocol_version=acp.PROTOCOL_VERSION)

    async def new_session(self, cwd: str) -> str:
        """``session/new`` in ``cwd``; the new session id (the adapter builds its ``AIAgent`` here)."""
        return (await self.adapter.new_session(cwd=cwd)).session_id

    def state(self, session_id: str) -> Any:
        """The adapter's ``SessionState`` of ``session_id``."""
        return self.adapter.session_manager.get_session(session_id)

    async def prompt(self, session_id: str, text: str, *, caller: Optional[str] = None) -> Any:
        """``session/prompt`` with one text block, under a ``call <caller>`` span when ``caller`` is given."""
        from acp.schema import TextContentBlock

        blocks = [TextContentBlock(type="text", text=text)]
        if caller is None:
            return await self.adapter.prompt(prompt=blocks, session_id=session_id)
        with self.tracer.start_as_current_span(f"{CALLER_PREFIX}{caller}"):
            return await self.adapter.prompt(prompt=blocks, session_id=session_id)

    async def cancel(self, session_id: str) -> None:
        """``session/cancel`` (a notification: no response)."""
        await self.adapter.cancel(session_id=session_id)

    def close(self) -> None:
        """Forget every session of this adapter (memory and Hermes's session DB)."""
        with contextlib.suppress(Exception):
            self.adapter.session_manager.cleanup()


async def wait_until(predicate: Any, *, timeout: float = 30.0, poll: float = 0.005) -> None:
    """Yield to the loop until ``predicate()`` is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {getattr(predicate, '__name__', predicate)!r}")
        await asyncio.sleep(poll)


# -- span trees --------------------------------------------------------------------------------------


@dataclass
class Invocation:
    """One ``invoke_agent`` span and the instrumentation spans under it (its own tree)."""

    span: ReadableSpan
    caller: Optional[str]
    """The ``call <tag>`` span it hangs under (its tag), None when its parent is no caller span."""
    steps: list[ReadableSpan] = field(default_factory=list)
    chats: list[ReadableSpan] = field(default_factory=list)
    tools: list[ReadableSpan] = field(default_factory=list)

    @property
    def response_ids(self) -> list[str]:
        return [str(s.attributes.get(GenAI.GEN_AI_RESPONSE_ID)) for s in self.chats
                if s.attributes and s.attributes.get(GenAI.GEN_AI_RESPONSE_ID) is not None]

    @property
    def tool_call_ids(self) -> list[str]:
        return [str(s.attributes.get(GenAI.GEN_AI_TOOL_CALL_ID)) for s in self.tools
                if s.attributes and s.attributes.get(GenAI.GEN_AI_TOOL_CALL_ID) is not None]

    @property
    def rounds(self) -> list[int]:
        """The react round numbers of its steps, in start order."""
        return [int(s.attributes.get(REACT_ROUND, -1)) for s in sorted(self.steps, key=lambda s: s.start_time)]

    @property
    def tokens(self) -> tuple[Any, Any]:
        attrs = self.span.attributes or {}
        return attrs.get(GenAI.GEN_AI_USAGE_INPUT_TOKENS), attrs.get(GenAI.GEN_AI_USAGE_OUTPUT_TOKENS)

    @property
    def conversation_id(self) -> Any:
        return (self.span.attributes or {}).get(GenAI.GEN_AI_CONVERSATION_ID)


def invocations(spans: Iterable[ReadableSpan]) -> list[Invocation]:
    """Every ``invoke_agent`` span in ``spans`` (start order) with the step/chat/tool spans whose nearest
    ``invoke_agent`` ancestor it is; spans of those kinds with no such ancestor are left out (see :func:`strays`)."""
    spans = list(spans)
    by_id = {s.context.span_id: s for s in spans}
    result: dict[int, Invocation] = {}
    for s in spans:
        if kind_of(s) == "invoke_agent":
            parent = by_id.get(s.parent.span_id) if s.parent is not None else None
            caller = parent.name[len(CALLER_PREFIX):] if parent is not None and parent.name.startswith(CALLER_PREFIX) else None
            result[s.context.span_id] = Invocation(s, caller)
    for s in spans:
        kind = kind_of(s)
        if kind not in ("step", "chat", "execute_tool"):
            continue
        owner = _owner(s, by_id)
        if owner is None or owner not in result:
            continue
        inv = result[owner]
        {"step": inv.steps, "chat": inv.chats, "execute_tool": inv.tools}[kind].append(s)
    return sorted(result.values(), key=lambda i: i.span.start_time)


def strays(spans: Iterable[ReadableSpan]) -> list[ReadableSpan]:
    """Step/chat/tool spans with no ``invoke_agent`` ancestor among ``spans``."""
    spans = list(spans)
    by_id = {s.context.span_id: s for s in spans}
    return [s for s in spans if kind_of(s) in ("step", "chat", "execute_tool") and _owner(s, by_id) is None]


def _owner(span: ReadableSpan, by_id: Mapping[int, ReadableSpan]) -> Optional[int]:
    current, hops = span, 0
    while current.parent is not None and hops < 64:
        parent = by_id.get(current.parent.span_id)
        if parent is None:
            return None
        if kind_of(parent) == "invoke_agent":
            return parent.context.span_id
        current, hops = parent, hops + 1
    return None
