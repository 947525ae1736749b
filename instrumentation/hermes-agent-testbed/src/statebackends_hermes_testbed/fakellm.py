"""Deterministic, scripted, OpenAI-compatible fake LLM (stdlib only).

Two ways to use it:

* Over HTTP, for a real ``openai`` client or a real Hermes ``AIAgent``::

      with FakeLLMServer() as srv:
          srv.base_url        # "http://127.0.0.1:PORT/v1"
          ...
          srv.log("c1"), srv.totals("c1")

* In process, without HTTP: :class:`Script` holds all the scripting and
  recording logic.  ``Script.plan(request)`` returns a :class:`Reply`, which
  renders as a ChatCompletion dict (``Reply.completion()``), as stream chunk
  dicts (``Reply.chunks()``) or as an OpenAI-style error body
  (``Reply.error_body()``).  ``statebackends_hermes_testbed.hermes_harness.InProcessLLM`` wraps
  the same class, so the HTTP server and the in-process fake never disagree.

* As a command: ``python -m statebackends_hermes_testbed.fakellm --port N`` (or
  ``statebackends-fakellm``) serves it until stopped; see
  :mod:`statebackends_hermes_testbed.fakellm_cli`.  The command is strict: a
  request with an unknown directive or a bad value is answered with HTTP 400
  naming it (:func:`directive_problems`).

Scripting contract (directives are read from the FIRST ``role: user`` message
of the request's ``messages``; they may appear anywhere in that text):

``[conv:TAG]``            conversation tag (default ``"anon"``).  Response ids
                          are ``chatcmpl-TAG-<k>``, ``k`` = 1, 2, ... counting
                          the responses sent for TAG (thread-safe).
``[tools:N]``             on the first LLM turn (no ``role: tool`` message after
                          the last user message) answer with N tool calls in one
                          assistant message, finish_reason ``"tool_calls"``:
                          tool ``sb_echo``, args ``{"text": "TAG-i"}``, ids
                          ``call_TAG_i`` with i = 1..N.  Once tool results are
                          present, answer ``"done TAG"`` (finish ``"stop"``).
                          With N = 0 (default) the first answer is final.
``[tool:NAME]``           use tool NAME instead of ``sb_echo``.
``[tool_ms:D]``           add ``"sleep_ms": D`` to each tool call's args (the
                          harness's ``sb_echo`` sleeps that long, so the calls
                          of one batch overlap in Hermes's tool pool).
``[files:P1,P2]``         first turn calls Hermes's ``read_file`` once per path,
                          ``{"path": P}``, ids ``call_TAG_i``, in one message
                          (Hermes runs reads of different paths in its tool pool).
``[delegate:KID]``        first turn calls Hermes ``delegate_task`` with
                          ``{"goal": "[conv:KID] ..."}`` (id ``call_TAG_delegate``)
                          so the child agent's own requests carry tag KID.
``[delegate_batch:A,B]``  same with ``{"tasks": [{"goal": "[conv:A] ..."}, ...]}``.
``[child_tools:N]``       add ``[tools:N]`` to the delegated goal(s).
``[llm_error]``           answer HTTP 400 with an OpenAI error body (type
                          ``invalid_request_error``); nothing is logged as a
                          response, ``errors(TAG)`` counts it.
``[delay_ms:D]``          sleep D ms before answering.

Usage is deterministic: the k-th response of a conversation has
``prompt_tokens = 100*k + 7`` and ``completion_tokens = 10*k + 3``.
Each sent response is recorded as a :class:`LogEntry`; ``log(tag)``,
``totals(tag)``, ``errors(tag)``, ``tags()`` and ``reset()`` read/clear them.
The W3C ``traceparent`` header of every chat request (answered or not; None
when absent) is recorded too: ``requests(tag)`` lists ``(traceparent, response
id or None)`` per request, and each :class:`LogEntry` has its own.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Directives",
    "LogEntry",
    "Reply",
    "Script",
    "ScriptRecords",
    "FakeLLMServer",
    "parse_directives",
    "directive_problems",
    "DIRECTIVES",
    "first_user_text",
    "iter_sse",
    "ERROR_STATUS",
    "DEFAULT_MODELS",
]

#: HTTP status used for ``[llm_error]``.  Hermes 0.19 classifies 400 as a
#: non-retryable client error: one request, no retry, and ``run_conversation``
#: RETURNS (does not raise) ``{"failed": True, "completed": False,
#: "error": "HTTP 400: ...", "final_response": "HTTP 400: ...", ...}``;
#: ``AIAgent.chat`` returns that error text.
ERROR_STATUS = 400
#: Models listed by ``GET /v1/models``.
DEFAULT_MODELS: Tuple[str, ...] = ("fake-model",)
#: Context window advertised for every model.
CONTEXT_LENGTH = 131072

_DIRECTIVE_RE = re.compile(r"\[(?P<key>[a-z_]+)(?::(?P<val>[^\]]*))?\]")


@dataclass(frozen=True)
class Directives:
    """The scripting directives found in a request's first user message."""

    conv: str = "anon"
    tools: int = 0
    tool: str = "sb_echo"
    delegate: Optional[str] = None
    delegate_batch: Tuple[str, ...] = ()
    child_tools: int = 0
    tool_ms: int = 0
    files: Tuple[str, ...] = ()
    llm_error: bool = False
    delay_ms: int = 0


def parse_directives(text: str) -> Directives:
    """Parse ``[key:value]`` / ``[key]`` directives out of ``text``.

    Unknown keys are ignored; the first occurrence of a key wins.
    """
    found: Dict[str, Optional[str]] = {}
    for m in _DIRECTIVE_RE.finditer(text or ""):
        found.setdefault(m.group("key"), m.group("val"))

    def _int(key: str) -> int:
        raw = found.get(key)
        try:
            return max(0, int(raw)) if raw is not None else 0
        except ValueError:
            return 0

    batch = found.get("delegate_batch")
    files = found.get("files")
    return Directives(
        conv=(found.get("conv") or "anon").strip() or "anon",
        tools=_int("tools"),
        tool=(found.get("tool") or "sb_echo").strip() or "sb_echo",
        delegate=(found.get("delegate") or "").strip() or None,
        delegate_batch=tuple(t.strip() for t in batch.split(",") if t.strip()) if batch else (),
        child_tools=_int("child_tools"),
        tool_ms=_int("tool_ms"),
        files=tuple(p.strip() for p in files.split(",") if p.strip()) if files else (),
        llm_error="llm_error" in found,
        delay_ms=_int("delay_ms"),
    )


#: Every directive: key -> (syntax, what it does), in the order ``--help`` lists them. Each key is a
#: field of :class:`Directives` (a test checks both ways).
DIRECTIVES: Dict[str, Tuple[str, str]] = {
    "conv": ("[conv:TAG]", "conversation tag (default anon): response ids are chatcmpl-TAG-1, -2, ... and the "
             "k-th response of TAG reports prompt_tokens 100*k+7, completion_tokens 10*k+3"),
    "tools": ("[tools:N]", "the first answer asks for N tool calls in one message (tool sb_echo, arguments "
              '{"text": "TAG-i"}, ids call_TAG_i); once tool results are back, the answer is "done TAG"'),
    "tool": ("[tool:NAME]", "call tool NAME instead of sb_echo"),
    "tool_ms": ("[tool_ms:D]", 'add "sleep_ms": D to each tool call\'s arguments'),
    "files": ("[files:P1,P2]", 'the first answer calls Hermes\'s read_file once per path ({"path": P}, ids '
              "call_TAG_i) in one message; Hermes runs reads of different paths in its tool pool"),
    "delegate": ("[delegate:KID]", "the first answer calls Hermes's delegate_task with the goal "
                 '"[conv:KID] subtask of TAG" (the subagent\'s requests then carry tag KID)'),
    "delegate_batch": ("[delegate_batch:A,B]", "the same with one task per tag"),
    "child_tools": ("[child_tools:N]", "add [tools:N] to the delegated goal(s)"),
    "llm_error": ("[llm_error]", "answer HTTP 400 with an OpenAI error body"),
    "delay_ms": ("[delay_ms:D]", "wait D milliseconds before answering"),
}
_NUMBER_DIRECTIVES = frozenset({"tools", "tool_ms", "child_tools", "delay_ms"})
_FLAG_DIRECTIVES = frozenset({"llm_error"})
_LIST_DIRECTIVES = frozenset({"delegate_batch", "files"})


def directive_problems(text: str) -> List[str]:
    """What is wrong with the directives in ``text``, one sentence each naming the directive (empty when all are valid).

    :func:`parse_directives` ignores these problems (an unknown key, a bad number); the command's strict server
    answers them with HTTP 400.
    """
    problems: List[str] = []
    for m in _DIRECTIVE_RE.finditer(text or ""):
        key, val, raw = m.group("key"), m.group("val"), m.group(0)
        if key not in DIRECTIVES:
            problems.append(f"unknown directive {raw}; valid directives: {', '.join(DIRECTIVES)}")
        elif key in _FLAG_DIRECTIVES:
            if val is not None:
                problems.append(f"{raw}: [{key}] takes no value")
        elif val is None or not val.strip() or (key in _LIST_DIRECTIVES and not val.replace(",", "").strip()):
            problems.append(f"{raw}: [{key}] needs a value, as in {DIRECTIVES[key][0]}")
        elif key in _NUMBER_DIRECTIVES and not (val.strip().isdigit() and val.strip().isascii()):
            problems.append(f"bad value {val!r} in {raw}: expected a whole number >= 0, as in {DIRECTIVES[key][0]}")
    return problems


def _content_text(content: Any) -> str:
    """Flatten an OpenAI message ``content`` (str or list of parts) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: List[str] = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return ""


def first_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Text of the first ``role: user`` message (``""`` if none)."""
    for msg in messages or ():
        if isinstance(msg, Mapping) and msg.get("role") == "user":
            return _content_text(msg.get("content"))
    return ""


def _tool_results_pending(messages: Sequence[Mapping[str, Any]]) -> bool:
    """True when a ``role: tool`` message follows the last user message."""
    seen_tool = False
    for msg in reversed(list(messages or ())):
        role = msg.get("role") if isinstance(msg, Mapping) else None
        if role == "user":
            return seen_tool
        if role == "tool":
            seen_tool = True
    return seen_tool


@dataclass(frozen=True)
class LogEntry:
    """One response the fake sent."""

    response_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    stream: bool
    traceparent: Optional[str] = None
    """The request's W3C ``traceparent`` header (None: none was sent, or the request came in process)."""


@dataclass(frozen=True)
class Reply:
    """A planned answer: either an error or one assistant message.

    ``tool_calls`` is a tuple of ``(id, name, arguments_json)``.
    """

    tag: str
    model: str
    stream: bool
    delay_ms: int
    response_id: str = ""
    created: int = 0
    content: Optional[str] = None
    tool_calls: Tuple[Tuple[str, str, str], ...] = ()
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    status: int = 200

    def usage(self) -> Dict[str, int]:
        """OpenAI ``usage`` dict."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def error_body(self) -> Dict[str, Any]:
        """OpenAI-style error JSON body (only meaningful when ``error``)."""
        return {
            "error": {
                "message": self.error or "",
                "type": "invalid_request_error",
                "param": None,
                "code": "fake_llm_error",
            }
        }

    def _tool_call_dicts(self, *, with_index: bool) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        for i, (call_id, name, args) in enumerate(self.tool_calls):
            d: Dict[str, Any] = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            if with_index:
                d["index"] = i
            out.append(d)
        return out

    def completion(self) -> Dict[str, Any]:
        """The reply as a non-streaming ``ChatCompletion`` dict."""
        message: Dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self._tool_call_dicts(with_index=False)
        return {
            "id": self.response_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}
            ],
            "usage": self.usage(),
        }

    def chunks(self) -> List[Dict[str, Any]]:
        """The reply as ``ChatCompletionChunk`` dicts: role, content or tool
        calls, finish_reason, then a final ``choices: []`` chunk with usage."""

        def chunk(choices: List[Dict[str, Any]], usage: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
            d: Dict[str, Any] = {
                "id": self.response_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": choices,
            }
            if usage is not None:
                d["usage"] = usage
            return d

        out = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
        if self.tool_calls:
            out.append(chunk([{"index": 0, "delta": {"tool_calls": self._tool_call_dicts(with_index=True)},
                               "finish_reason": None}]))
        elif self.content:
            words = self.content.split(" ")
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                out.append(chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        out.append(chunk([{"index": 0, "delta": {}, "finish_reason": self.finish_reason}]))
        out.append(chunk([], usage=self.usage()))
        return out


@dataclass
class _ConvState:
    count: int = 0
    errors: int = 0
    entries: List[LogEntry] = field(default_factory=list)
    requests: List[Tuple[Optional[str], Optional[str]]] = field(default_factory=list)


class Script:
    """Thread-safe scripting + recording shared by the HTTP and in-process fakes.

    ``plan(request)`` decides the answer for one chat-completions request body
    (a dict with ``model``, ``messages``, ``stream`` ...), assigns its response
    id and usage, records it, and returns a :class:`Reply`.  It never sleeps:
    the caller honours ``Reply.delay_ms``.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self._lock = threading.Lock()
        self._convs: Dict[str, _ConvState] = {}
        self.strict = strict
        """Answer a request whose directives are not all valid (:func:`directive_problems`) with HTTP 400."""

    # -- planning -----------------------------------------------------------
    def plan(self, request: Mapping[str, Any], traceparent: Optional[str] = None) -> Reply:
        """Plan (and record) the reply to one chat-completions request, which carried the header ``traceparent``."""
        messages = request.get("messages") or []
        text = first_user_text(messages)
        d = parse_directives(text)
        model = str(request.get("model") or "")
        stream = bool(request.get("stream"))
        problems = directive_problems(text) if self.strict else []
        if problems:
            return Reply(tag=d.conv, model=model, stream=stream, delay_ms=0, error="fake LLM: " + "; ".join(problems),
                         status=ERROR_STATUS, finish_reason="error")
        if d.llm_error:
            with self._lock:
                st = self._convs.setdefault(d.conv, _ConvState())
                st.errors += 1
                st.requests.append((traceparent, None))
            return Reply(tag=d.conv, model=model, stream=stream, delay_ms=d.delay_ms,
                         error=f"fake llm_error requested for conversation {d.conv}",
                         status=ERROR_STATUS, finish_reason="error")

        content: Optional[str]
        calls: Tuple[Tuple[str, str, str], ...] = ()
        if _tool_results_pending(messages):
            content, finish = f"done {d.conv}", "stop"
        elif d.delegate or d.delegate_batch:
            extra = f" [tools:{d.child_tools}]" if d.child_tools else ""
            if d.delegate_batch:
                args: Dict[str, Any] = {"tasks": [
                    {"goal": f"[conv:{kid}]{extra} subtask of {d.conv}"} for kid in d.delegate_batch
                ]}
            else:
                args = {"goal": f"[conv:{d.delegate}]{extra} subtask of {d.conv}"}
            calls = ((f"call_{d.conv}_delegate", "delegate_task", json.dumps(args)),)
            content, finish = None, "tool_calls"
        elif d.files:
            calls = tuple((f"call_{d.conv}_{i}", "read_file", json.dumps({"path": path}))
                          for i, path in enumerate(d.files, 1))
            content, finish = None, "tool_calls"
        elif d.tools > 0:
            def _args(i: int) -> str:
                a: Dict[str, Any] = {"text": f"{d.conv}-{i}"}
                if d.tool_ms:
                    a["sleep_ms"] = d.tool_ms
                return json.dumps(a)

            calls = tuple((f"call_{d.conv}_{i}", d.tool, _args(i)) for i in range(1, d.tools + 1))
            content, finish = None, "tool_calls"
        else:
            content, finish = f"done {d.conv}", "stop"

        with self._lock:
            st = self._convs.setdefault(d.conv, _ConvState())
            st.count += 1
            k = st.count
            entry = LogEntry(f"chatcmpl-{d.conv}-{k}", 100 * k + 7, 10 * k + 3, finish, stream, traceparent)
            st.entries.append(entry)
            st.requests.append((traceparent, entry.response_id))
        return Reply(tag=d.conv, model=model, stream=stream, delay_ms=d.delay_ms,
                     response_id=entry.response_id, created=int(time.time()),
                     content=content, tool_calls=calls, finish_reason=finish,
                     prompt_tokens=entry.prompt_tokens, completion_tokens=entry.completion_tokens)

    # -- recording ----------------------------------------------------------
    def log(self, tag: str) -> List[LogEntry]:
        """Responses sent for ``tag``, in the order they were planned."""
        with self._lock:
            st = self._convs.get(tag)
            return list(st.entries) if st else []

    def totals(self, tag: str) -> Tuple[int, int]:
        """``(sum prompt_tokens, sum completion_tokens)`` sent for ``tag``."""
        entries = self.log(tag)
        return (sum(e.prompt_tokens for e in entries), sum(e.completion_tokens for e in entries))

    def errors(self, tag: str) -> int:
        """Number of ``[llm_error]`` answers sent for ``tag``."""
        with self._lock:
            st = self._convs.get(tag)
            return st.errors if st else 0

    def requests(self, tag: str) -> List[Tuple[Optional[str], Optional[str]]]:
        """``(traceparent header, response id)`` of every chat request for ``tag``, in order: the header None where
        absent, the id None for a request answered with an error."""
        with self._lock:
            st = self._convs.get(tag)
            return list(st.requests) if st else []

    def tags(self) -> List[str]:
        """All conversation tags seen since the last reset, sorted."""
        with self._lock:
            return sorted(self._convs)

    def reset(self) -> None:
        """Forget all counters and logs."""
        with self._lock:
            self._convs.clear()


class _Handler(BaseHTTPRequestHandler):
    """Request handler; ``self.server`` is a :class:`_Server`."""

    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return

    def _send_json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _model_obj(self, name: str) -> Dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "fakellm",
                "context_length": CONTEXT_LENGTH, "max_model_len": CONTEXT_LENGTH}

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0].rstrip("/")
        self.server.owner._note(("GET", path))
        if path == "/v1/models":
            self._send_json(200, {"object": "list",
                                  "data": [self._model_obj(m) for m in self.server.owner.models]})
        elif path.startswith("/v1/models/"):
            self._send_json(200, self._model_obj(path[len("/v1/models/"):]))
        else:
            self._send_json(404, {"error": {"message": f"not found: {path}", "type": "not_found"}})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._read_body()
        self.server.owner._note(("POST", path))
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._send_json(404, {"error": {"message": f"not found: {path}", "type": "not_found"}})
            return
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            self._send_json(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
            return
        reply = self.server.owner.script.plan(request, self.headers.get("traceparent"))
        if reply.delay_ms:
            time.sleep(reply.delay_ms / 1000.0)
        if reply.error is not None:
            self._send_json(reply.status, reply.error_body())
        elif not reply.stream:
            self._send_json(200, reply.completion())
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for frame in iter_sse(reply):
                self.wfile.write(frame)
            self.wfile.flush()
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # many overlapping calls connect at once
    allow_reuse_address = True

    def __init__(self, owner: "FakeLLMServer", port: int = 0) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)


class ScriptRecords:
    """What a fake LLM sent, read from its :class:`Script` (shared by the server and the in-process fake)."""

    script: "Script"

    def log(self, tag: str) -> List[LogEntry]:
        """See :meth:`Script.log`."""
        return self.script.log(tag)

    def totals(self, tag: str) -> Tuple[int, int]:
        """See :meth:`Script.totals`."""
        return self.script.totals(tag)

    def errors(self, tag: str) -> int:
        """See :meth:`Script.errors`."""
        return self.script.errors(tag)

    def requests(self, tag: str) -> List[Tuple[Optional[str], Optional[str]]]:
        """See :meth:`Script.requests`."""
        return self.script.requests(tag)

    def tags(self) -> List[str]:
        """See :meth:`Script.tags`."""
        return self.script.tags()

    def reset(self) -> None:
        """See :meth:`Script.reset`."""
        self.script.reset()


class FakeLLMServer(ScriptRecords):
    """HTTP front of a :class:`Script` on ``127.0.0.1:<ephemeral>``.

    Context manager (or ``start()``/``stop()``); ``port`` 0 (the default) takes a free one, any other port
    that is in use makes ``start()`` raise ``OSError`` (``EADDRINUSE``).  Serves ``GET /v1/models``
    (lists ``models``), ``GET /v1/models/<m>``, ``POST /v1/chat/completions``
    (JSON or SSE) and answers anything else with a 404 JSON body.  Every
    request's ``(method, path)`` is appended to ``http_log``.
    """

    def __init__(self, *, script: Optional[Script] = None, models: Sequence[str] = DEFAULT_MODELS,
                 port: int = 0) -> None:
        self.script: Script = script or Script()
        self.requested_port = port
        self.models: Tuple[str, ...] = tuple(models)
        self.http_log: List[Tuple[str, str]] = []
        self._log_lock = threading.Lock()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    def _note(self, item: Tuple[str, str]) -> None:
        with self._log_lock:
            self.http_log.append(item)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> "FakeLLMServer":
        """Bind and serve in a daemon thread; idempotent."""
        if self._server is None:
            self._server = _Server(self, self.requested_port)
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name="fakellm-server", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """Bound port (server must be started)."""
        if self._server is None:
            raise RuntimeError("FakeLLMServer is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def reset(self) -> None:
        """Clear the script's logs and the HTTP log."""
        super().reset()
        with self._log_lock:
            self.http_log.clear()


def iter_sse(reply: Reply) -> Iterator[bytes]:
    """SSE byte frames for ``reply``: one ``data:`` frame per chunk, then ``[DONE]``."""
    for chunk in reply.chunks():
        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


if __name__ == "__main__":  # python -m statebackends_hermes_testbed.fakellm: the command
    from statebackends_hermes_testbed.fakellm_cli import main

    raise SystemExit(main())
