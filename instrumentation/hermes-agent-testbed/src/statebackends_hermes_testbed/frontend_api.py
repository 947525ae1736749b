"""Serve Hermes's REAL OpenAI-compatible API server (``gateway/platforms/api_server.py``) in process, on loopback.

:class:`ApiServer` runs ``APIServerAdapter.connect()`` on an event loop of its own (a daemon thread), bound to
``127.0.0.1`` on a free port, with a strong random API key (``connect`` refuses to start without one, and
``X-Hermes-Session-Id`` is honoured only when a key is set). Its agents are built by the adapter itself, per request
(``APIServerAdapter._run_agent`` -> ``_create_agent``), from ``config.yaml`` in ``HERMES_HOME``:
:func:`api_server_config` points ``model.provider: custom`` / ``model.base_url`` at a fake LLM and lists the
toolsets of ``platform_toolsets.api_server``, and restores the file afterwards.

One piece of test code rides on the server: the outermost aiohttp middleware (where an aiohttp server
instrumentation would put its own) opens a SERVER span ``call <tag>`` for every request that names its tag in the
``X-Testbed-Call`` header. That span is the *caller span* of :mod:`statebackends_hermes_testbed.traces`: made by the
test, in the request's handler task, so the judge's truth never comes from the instrumentation under test.

Also here: :func:`post_chat` (a stdlib HTTP client), :class:`Meeting` and the tool ``sb_meet`` (a barrier inside a
tool, so overlapping turns are proven to overlap), and :func:`adopt_roots` (judge trees that start a trace of their
own, as they do when nothing carries the request's context over the server's executor hop).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from opentelemetry import trace

from .fakellm import CONTEXT_LENGTH
from .hermes_harness import BENCH_TOOLSET, MODEL, hermes_config, register_bench_tools, register_tool
from .traces import CALLER_PREFIX, _tag_in, kind_of

CALL_HEADER = "X-Testbed-Call"
"""Request header naming the call's tag: the test middleware opens the caller span ``call <tag>`` for it."""
FRONTEND_TOOLSET = "sb_frontend"
"""Toolset of ``sb_meet`` (kept out of :data:`hermes_harness.BENCH_TOOLSET`, which other tests' agents load)."""
MEET_TOOL = "sb_meet"
MEET_TIMEOUT = 30.0


# -- sb_meet: a barrier inside a tool ----------------------------------------------------------------------------


class Meeting:
    """The barrier ``sb_meet`` waits on: ``parties`` tool calls must all be running before any returns.

    A turn whose tool meets the others is proven to be open at the same time as theirs; a server that serialised
    the turns would break the barrier (a timeout), which :attr:`broken` reports.
    """

    _current: Optional["Meeting"] = None
    _lock = threading.Lock()

    def __init__(self, parties: int, timeout: float = MEET_TIMEOUT) -> None:
        self.parties = parties
        self.timeout = timeout
        self.barrier = threading.Barrier(parties)
        self.met: list[str] = []
        """The ``text`` of every tool call that met the others."""
        self.task_ids: dict[str, Any] = {}
        """``text`` -> the ``task_id`` Hermes handed the tool (``registry.dispatch(..., task_id=...)``)."""
        self.broken = False

    def wait(self, text: str, task_id: Any = None) -> str:
        """Wait until ``parties`` calls are waiting (``task_id`` is recorded), or break the meeting on a timeout."""
        with self._lock:
            self.task_ids[text] = task_id
        try:
            self.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            self.broken = True
            raise RuntimeError(f"sb_meet: {text} did not meet {self.parties - 1} other tool call(s)") from None
        with self._lock:
            self.met.append(text)
        return text

    @classmethod
    @contextlib.contextmanager
    def hold(cls, parties: int, timeout: float = MEET_TIMEOUT) -> Iterator["Meeting"]:
        """Make a meeting of ``parties`` the one ``sb_meet`` waits on, for the block."""
        meeting = cls(parties, timeout)
        with cls._lock:
            cls._current = meeting
        try:
            yield meeting
        finally:
            meeting.barrier.abort()  # nobody stays blocked past the block
            with cls._lock:
                cls._current = None


def _sb_meet(args: Mapping[str, Any], **kwargs: Any) -> str:
    """Handler of ``sb_meet``: wait at the current :class:`Meeting`'s barrier, then return ``args["text"]``."""
    meeting = Meeting._current
    text = str(args.get("text", ""))
    if meeting is None:
        raise RuntimeError("sb_meet: no meeting is being held")
    return meeting.wait(text, kwargs.get("task_id"))


def register_frontend_tools() -> None:
    """Register the bench tools and ``sb_meet`` (toolset :data:`FRONTEND_TOOLSET`, parallel-safe like ``sb_echo``)."""
    import agent.tool_dispatch_helpers as tdh

    register_bench_tools()
    register_tool(MEET_TOOL, FRONTEND_TOOLSET, _sb_meet, "Test tool: waits for the other calls of a meeting.")
    if MEET_TOOL not in tdh._PARALLEL_SAFE_TOOLS:
        tdh._PARALLEL_SAFE_TOOLS = tdh._PARALLEL_SAFE_TOOLS | {MEET_TOOL}


# -- config.yaml ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def api_server_config(
    base_url: str,
    *,
    toolsets: Sequence[str] = (BENCH_TOOLSET, FRONTEND_TOOLSET),
    model: str = MODEL,
    api_key: str = "sk-local-test",
) -> Iterator[Path]:
    """Point ``HERMES_HOME/config.yaml`` at ``base_url`` for the API server's agents; the old text is restored after.

    ``_create_agent`` reads provider, base URL and key through ``gateway.run._resolve_runtime_agent_kwargs``
    (``model.provider`` / ``model.base_url`` / ``model.api_key``), the model through ``_resolve_gateway_model``
    (``model.default``) and the tools through ``_get_platform_tools(config, "api_server")``
    (``platform_toolsets.api_server``). ``model.context_length`` is set: with a model named in a ``model`` mapping,
    ``model_tools._resolve_active_context_length`` would otherwise ask OpenRouter (``fetch_model_metadata``) while
    each agent loads its tools.
    """
    import yaml

    register_frontend_tools()

    def pointed(saved: Optional[str]) -> str:
        data = (yaml.safe_load(saved) if saved else None) or {}
        data["model"] = {"default": model, "provider": "custom", "base_url": base_url, "api_key": api_key,
                         "context_length": CONTEXT_LENGTH}
        data["platform_toolsets"] = {**(data.get("platform_toolsets") or {}), "api_server": list(toolsets)}
        return yaml.safe_dump(data, sort_keys=False)

    with hermes_config(pointed) as path:
        yield path


# -- the server --------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _cancel_other_tasks() -> None:
    """Cancel every task of the running loop but this one, and wait for them."""
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class ApiServer:
    """Hermes's ``APIServerAdapter`` serving on ``127.0.0.1:<free port>`` from an event loop in a daemon thread.

    ``tracer`` (optional): the test middleware opens ``call <tag>`` with it for requests carrying
    :data:`CALL_HEADER`, and keeps them in :attr:`request_spans` (tag -> the spans of the requests with that tag).
    """

    def __init__(self, tracer: Optional[trace.Tracer] = None) -> None:
        self.tracer = tracer
        self.key = secrets.token_hex(24)
        self.port = 0
        self.adapter: Any = None
        self.request_spans: dict[str, list[Any]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._executor: Optional[ThreadPoolExecutor] = None

    def _call(self, coro: Any, timeout: float = 60.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _middleware(self, inner: Any) -> Any:
        from aiohttp import web

        tracer, spans = self.tracer, self.request_spans

        @web.middleware
        async def caller_span(request: Any, handler: Any) -> Any:
            tag = request.headers.get(CALL_HEADER)
            if tracer is None or not tag:
                return await inner(request, handler)
            attributes = {"http.request.method": request.method, "url.path": request.path}
            with tracer.start_as_current_span(f"{CALLER_PREFIX}{tag}", kind=trace.SpanKind.SERVER,
                                              attributes=attributes) as span:
                spans.setdefault(tag, []).append(span)
                response = await inner(request, handler)
                span.set_attribute("http.response.status_code", response.status)
                return response

        return caller_span

    def start(self) -> "ApiServer":
        """Build the adapter (``PlatformConfig.extra``: host, port, key) and ``connect()`` it on the loop."""
        from gateway.config import PlatformConfig
        from gateway.platforms.api_server import APIServerAdapter

        self.port = free_port()
        self.adapter = APIServerAdapter(PlatformConfig(enabled=True, extra={
            "host": "127.0.0.1", "port": self.port, "key": self.key,
        }))
        make_prefix = self.adapter._make_profile_prefix_middleware  # the first middleware connect() installs
        self.adapter._make_profile_prefix_middleware = lambda: self._middleware(make_prefix())
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="api-server-loop", daemon=True)
        self._thread.start()
        self.renew_executor()
        if not self._call(self.adapter.connect()):
            self.stop()
            raise RuntimeError("APIServerAdapter.connect() refused to start")
        return self

    def renew_executor(self) -> None:
        """Give the loop a new default executor, with no worker thread yet, and shut the old one down.

        ``_run_agent``'s ``run_in_executor(None, ...)`` runs on the loop's default executor: a
        ``ThreadPoolExecutor`` as asyncio makes one (same class, same defaults). A worker thread started while
        opentelemetry-instrumentation-threading was on keeps the context it was started in attached for its whole
        life (the instrumentation wraps ``Thread.run``), so once the instrumentation is off again, later turns on
        that worker would hang under a request span long ended. A test that toggles the instrumentation renews the
        executor between runs; a real deployment does not toggle it.
        """

        async def swap() -> Optional[ThreadPoolExecutor]:
            old, self._executor = self._executor, ThreadPoolExecutor(thread_name_prefix="asyncio")
            asyncio.get_running_loop().set_default_executor(self._executor)
            return old

        old = self._call(swap())
        if old is not None:
            old.shutdown(wait=True)

    def stop(self) -> None:
        """``disconnect()``, cancel the loop's other tasks, shut its default executor down, stop it; idempotent."""
        loop = self._loop
        if loop is None:
            return
        try:
            if self.adapter is not None:
                self._call(self.adapter.disconnect())
            self._call(_cancel_other_tasks())  # connect()'s run-stream sweeper, which disconnect() leaves running
            self._call(loop.shutdown_default_executor())
        finally:
            self._loop = None
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(10)
                self._thread = None
            loop.close()

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def adapter_state(self) -> dict[str, int]:
        """The adapter's own in-flight counters (all 0 when every turn is over)."""
        a = self.adapter
        return {"inflight": a._inflight_agent_runs, "pending": a._pending_agent_requests,
                "work": a.active_agent_work_count()}


@dataclass
class Reply:
    """One HTTP answer of the server: status, headers, and the assistant's text (``content``)."""

    status: int
    headers: dict[str, str]
    body: Any
    """The JSON body (non-streaming), or the list of SSE events ``(event, data)`` (streaming)."""
    content: Optional[str] = None
    """``choices[0].message.content``, or the ``delta.content`` pieces of a stream joined."""
    raw: bytes = field(repr=False, default=b"")


def _sse_events(raw: bytes) -> list[tuple[str, Any]]:
    """``(event name, parsed data)`` of every SSE event in ``raw`` (name ``message`` when none is given)."""
    events: list[tuple[str, Any]] = []
    for block in raw.decode("utf-8", "replace").split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            text = "\n".join(data)
            try:
                events.append((name, json.loads(text)))
            except ValueError:
                events.append((name, text))
    return events


def post_chat(
    server: ApiServer,
    tag: str,
    content: str,
    *,
    session_id: Optional[str] = None,
    stream: bool = False,
    timeout: float = 120.0,
    headers: Optional[Mapping[str, str]] = None,
) -> Reply:
    """``POST /v1/chat/completions`` with the one user message ``content`` (``stream``: as SSE).

    ``tag`` goes in :data:`CALL_HEADER`; ``session_id`` (when given) in ``X-Hermes-Session-Id``; ``headers``
    (a W3C ``traceparent``, say) are sent too. ``server`` needs only ``port`` and ``key``.
    """
    body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": content}]}
    sent = {"Content-Type": "application/json", "Authorization": f"Bearer {server.key}", CALL_HEADER: tag,
            **(headers or {})}
    if session_id is not None:
        sent["X-Hermes-Session-Id"] = session_id
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=sent)
        response = conn.getresponse()
        raw = response.read()
        reply = Reply(response.status, {k: v for k, v in response.getheaders()}, None, raw=raw)
    finally:
        conn.close()
    if stream and reply.headers.get("Content-Type", "").startswith("text/event-stream"):
        reply.body = events = _sse_events(raw)
        pieces = [d["choices"][0]["delta"].get("content") or "" for name, d in events
                  if name == "message" and isinstance(d, dict) and d.get("choices")]
        reply.content = "".join(pieces)
        return reply
    try:
        reply.body = json.loads(raw)
        reply.content = reply.body["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    return reply


# -- judging trees that start a trace of their own ----------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    trace_id: int
    span_id: int


class _Adopted:
    """A read-only view of a span with another parent (everything else forwarded)."""

    def __init__(self, span: Any, parent: Any) -> None:
        self._span = span
        self.parent = parent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._span, name)


class _Caller:
    """A stand-in caller span ``call <tag>`` at the root of an adopted trace."""

    def __init__(self, tag: str, trace_id: int, span_id: int) -> None:
        self.name = f"{CALLER_PREFIX}{tag}"
        self.context = _Context(trace_id, span_id)
        self.parent = None
        self.attributes: dict[str, Any] = {}


def tags_under(spans: Sequence[Any], root: Any) -> set[str]:
    """The conversation tags of the fake LLM's ids (response ids, tool call ids) in ``root``'s subtree."""
    children: dict[int, list[Any]] = {}
    for s in spans:
        if s.parent is not None:
            children.setdefault(s.parent.span_id, []).append(s)
    found: set[str] = set()
    todo = [root]
    while todo:
        span = todo.pop()
        attrs = span.attributes or {}
        for value, prefix, sep in ((attrs.get("gen_ai.response.id"), "chatcmpl-", "-"),
                                   (attrs.get("gen_ai.tool.call.id"), "call_", "_")):
            tag = _tag_in(value, prefix, sep)
            if tag is not None:
                found.add(tag)
        todo.extend(children.get(span.context.span_id, ()))
    return found


def adopt_roots(spans: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """``spans`` with every ROOT ``invoke_agent`` span given a stand-in caller span ``call <tag>``, ``tag`` read from
    the fake LLM's ids in its subtree, so :func:`traces.judge` can judge trees that start traces of their own.

    Returns the spans to judge and notes; a root whose subtree names no tag or several is left a root (the judge
    then counts it an orphan) and noted. Only ``invoke_agent`` roots are adopted: any other root stays an orphan.
    """
    out: list[Any] = []
    notes: list[str] = []
    for n, span in enumerate(spans):
        if span.parent is None and kind_of(span) == "invoke_agent":
            tags = tags_under(spans, span)
            if len(tags) == 1:
                (tag,) = tags
                caller = _Caller(tag, span.context.trace_id, 0x5B0000 + n)
                out.append(caller)
                out.append(_Adopted(span, caller.context))
                continue
            notes.append(f"root {span.name} not adopted: its subtree names tags {sorted(tags)}")
        out.append(span)
    return out, notes


@dataclass
class AgentTree:
    """One ``invoke_agent`` span and the spans below it (down to, not into, a nested ``invoke_agent``)."""

    root: Any
    spans: list[Any] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Any]:
        """The spans of ``kind`` in the tree (the root not included)."""
        return [s for s in self.spans if kind_of(s) == kind]

    def tool_call_ids(self) -> list[str]:
        """The ``gen_ai.tool.call.id`` of the tree's tool spans, sorted."""
        return sorted(str((s.attributes or {}).get("gen_ai.tool.call.id")) for s in self.of_kind("execute_tool"))

    def parent_kinds(self, kind: str) -> list[Optional[str]]:
        """The kind of the parent of each span of ``kind`` in the tree."""
        by_id = {s.context.span_id: s for s in [self.root, *self.spans]}
        return [kind_of(by_id[s.parent.span_id]) for s in self.of_kind(kind)]


def agent_trees(spans: Sequence[Any]) -> tuple[list[AgentTree], list[Any]]:
    """Every ``invoke_agent`` span's tree, and the instrumentation spans under no ``invoke_agent`` at all."""
    by_id = {s.context.span_id: s for s in spans}
    trees = {s.context.span_id: AgentTree(s) for s in spans if kind_of(s) == "invoke_agent"}
    loose: list[Any] = []
    for span in spans:
        kind = kind_of(span)
        if kind is None or kind == "invoke_agent":
            continue
        current, hops = span, 0
        owner = None
        while current.parent is not None and hops < 64:
            current, hops = by_id.get(current.parent.span_id), hops + 1
            if current is None:
                break
            if kind_of(current) == "invoke_agent":
                owner = trees[current.context.span_id]
                break
        if owner is None:
            loose.append(span)
        else:
            owner.spans.append(span)
    return list(trees.values()), loose
