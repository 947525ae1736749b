"""Build and drive a REAL hermes-agent ``run_agent.AIAgent`` offline.

Public API (all Hermes imports are lazy, so ``hermes_home`` can run first):

* :func:`hermes_home` - context manager: temp ``HOME``/``HERMES_HOME`` with a
  minimal ``config.yaml``.  Several Hermes modules read the home directory at
  import time, so enter it BEFORE the first import of ``run_agent`` /
  ``model_tools`` / ``tools.*`` in the process and keep it for the process's
  life when in doubt.
* :func:`register_tool` - registers one tool (a ``text`` argument) in a toolset, idempotently.
* :func:`register_bench_tools` - registers ``sb_echo`` / ``sb_fail`` in the
  toolset :data:`BENCH_TOOLSET` of Hermes's tool registry; they dispatch
  through ``model_tools.handle_function_call`` -> ``registry.dispatch`` like
  real tools, and are added to Hermes's parallel-safe set so a batch of 2+
  of them runs on ``agent.tool_executor.execute_tool_calls_concurrent``.
* :func:`make_agent` - an ``AIAgent`` pointed at a fake OpenAI endpoint.
* :class:`InProcessLLM` - the :class:`statebackends_hermes_testbed.fakellm.Script` without HTTP,
  installed per agent by replacing ``agent._create_request_openai_client``.
* :func:`wait_for_delegations` - join Hermes's background ``delegate_task``
  units (top-level delegations run detached from the parent's turn).
* :func:`loopback_only` - network guard for tests.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from statebackends_hermes_testbed.fakellm import Reply, Script, ScriptRecords

if TYPE_CHECKING:  # pragma: no cover
    from run_agent import AIAgent

__all__ = [
    "BENCH_TOOLSET",
    "DELEGATION_TOOLSET",
    "API_KEY",
    "MODEL",
    "hermes_version",
    "minimal_config_text",
    "hermes_home",
    "register_bench_tools",
    "register_tool",
    "ToolCallRecord",
    "tool_log",
    "clear_tool_log",
    "make_agent",
    "InProcessLLM",
    "wait_for_delegations",
    "NetworkBlockedError",
    "NetGuard",
    "loopback_only",
]

#: Toolset holding ``sb_echo`` and ``sb_fail`` (a registry-only toolset).
BENCH_TOOLSET = "sb_bench"
#: Hermes's static toolset that contains ``delegate_task``.
DELEGATION_TOOLSET = "delegation"
API_KEY = "sk-local-test"
MODEL = "fake-model"

PathLike = Union[str, "os.PathLike[str]"]


def hermes_version() -> Tuple[int, ...]:
    """The installed hermes-agent's version as numbers, ``(0, 19, 0)``: where its behaviour differs by release."""
    from importlib.metadata import version

    return tuple(int(part) for part in version("hermes-agent").split(".")[:3] if part.isdigit())


# ---------------------------------------------------------------------------
# HERMES_HOME
# ---------------------------------------------------------------------------

def minimal_config_text(model: str = MODEL) -> str:
    """YAML for a minimal, valid ``config.yaml``.

    Hermes deep-merges the user file over ``hermes_cli.config.DEFAULT_CONFIG``
    and caches the result on the file's (mtime, size); with NO file the cache
    is skipped and every ``load_config()`` deep-copies the defaults again.
    Any mapping is valid; we pin the current ``_config_version`` (read from
    the installed package when importable) so nothing treats it as legacy.
    """
    version = 33
    try:
        from hermes_cli.config import DEFAULT_CONFIG  # lazy: home must be set first

        version = int(DEFAULT_CONFIG.get("_config_version", version))
    except Exception:
        pass
    return (
        f"_config_version: {version}\n"
        f"model: {model}\n"
        "delegation:\n"
        "  max_concurrent_children: 8\n"
    )


@contextlib.contextmanager
def hermes_home(tmpdir: PathLike, *, model: str = MODEL) -> Iterator[Path]:
    """Point ``HOME`` and ``HERMES_HOME`` at ``<tmpdir>`` (created if needed),
    write ``<tmpdir>/.hermes/config.yaml`` and yield that ``.hermes`` folder.

    The previous values of both variables are restored on exit.  Hermes caches
    paths derived from the home in module globals at import time
    (``hermes_state.DEFAULT_DB_PATH`` and others): enter this before importing
    Hermes modules, and do not expect a later, different home to move them.
    """
    root = Path(tmpdir).resolve()
    home = root / ".hermes"
    home.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("HOME", "HERMES_HOME")}
    os.environ["HOME"] = str(root)
    os.environ["HERMES_HOME"] = str(home)
    try:
        (home / "config.yaml").write_text(minimal_config_text(model), encoding="utf-8")
        yield home
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def hermes_config(text: Union[str, Callable[[Optional[str]], str]]) -> Iterator[Path]:
    """Write ``$HERMES_HOME/config.yaml`` while inside (``text``, or ``text(old text or None)``); yield its path.

    The old file comes back on exit (or goes away again if there was none), whatever happened inside.
    """
    path = Path(os.environ["HERMES_HOME"]) / "config.yaml"
    saved = path.read_text(encoding="utf-8") if path.exists() else None
    path.write_text(text(saved) if callable(text) else text, encoding="utf-8")
    try:
        yield path
    finally:
        if saved is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(saved, encoding="utf-8")


# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCallRecord:
    """One execution of a bench tool: tool name, its ``text`` arg, thread name."""

    name: str
    text: str
    thread: str


_tool_log: List[ToolCallRecord] = []
_tool_log_lock = threading.Lock()


def _record(name: str, args: Dict[str, Any]) -> str:
    text = str(args.get("text", ""))
    sleep_ms = args.get("sleep_ms")
    if isinstance(sleep_ms, (int, float)) and sleep_ms > 0:
        time.sleep(sleep_ms / 1000.0)
    rec = ToolCallRecord(name, text, threading.current_thread().name)
    with _tool_log_lock:
        _tool_log.append(rec)
    return text


def tool_log() -> List[ToolCallRecord]:
    """Bench tool executions since the last :func:`clear_tool_log`, in order."""
    with _tool_log_lock:
        return list(_tool_log)


def clear_tool_log() -> None:
    """Forget recorded bench tool executions."""
    with _tool_log_lock:
        _tool_log.clear()


def _sb_echo(args: Dict[str, Any], **_: Any) -> str:
    """Handler of ``sb_echo``: sleeps ``args["sleep_ms"]`` if given, records the
    call and returns ``args["text"]``."""
    return _record("sb_echo", args)


def _sb_fail(args: Dict[str, Any], **_: Any) -> str:
    """Handler of ``sb_fail``: records the call, then raises ``RuntimeError("tool boom")``."""
    _record("sb_fail", args)
    raise RuntimeError("tool boom")


def _schema(name: str, description: str, sleep: bool = True) -> Dict[str, Any]:
    properties: Dict[str, Any] = {"text": {"type": "string", "description": "Text to echo."}}
    if sleep:
        properties["sleep_ms"] = {"type": "integer", "description": "Optional delay before answering."}
    return {
        "name": name,
        "description": description,
        "parameters": {"type": "object", "properties": properties, "required": ["text"]},
    }


_register_lock = threading.Lock()


def register_tool(name: str, toolset: str, handler: Any, description: str, *, sleep: bool = False) -> None:
    """Register ``handler`` as tool ``name`` (one ``text`` argument, ``sleep_ms`` too when ``sleep``) in ``toolset``,
    unless it already is; a toolset absent from ``toolsets.TOOLSETS`` resolves through the registry."""
    from tools.registry import registry

    with _register_lock:
        entry = registry.get_entry(name)
        if entry is None or entry.handler is not handler:
            registry.register(name=name, toolset=toolset, schema=_schema(name, description, sleep),
                              handler=handler, description=description, emoji="*")


def register_bench_tools(parallel_safe: Iterable[str] = ("sb_echo", "sb_fail")) -> None:
    """Register ``sb_echo`` and ``sb_fail`` in toolset :data:`BENCH_TOOLSET`.

    Uses ``tools.registry.registry.register(name, toolset, schema, handler)``
    (no ``check_fn``, so always available); a toolset name absent from
    ``toolsets.TOOLSETS`` is picked up by ``toolsets.validate_toolset`` /
    ``resolve_toolset`` through the registry.  Names in ``parallel_safe`` are
    added to ``agent.tool_dispatch_helpers._PARALLEL_SAFE_TOOLS`` (a module
    frozenset read on every batch by ``_plan_tool_batch_segments``), which is
    Hermes's only non-MCP notion of a parallel-safe tool.  Idempotent.
    """
    try:
        import agent.tool_dispatch_helpers as tdh
    except ImportError:  # hermes-agent before 0.15 keeps the set in run_agent itself
        import run_agent as tdh

    register_tool("sb_echo", BENCH_TOOLSET, _sb_echo, "Benchmark tool: returns its text argument.", sleep=True)
    register_tool("sb_fail", BENCH_TOOLSET, _sb_fail, "Benchmark tool: always raises RuntimeError.", sleep=True)
    with _register_lock:
        wanted = frozenset(parallel_safe)
        if not wanted <= tdh._PARALLEL_SAFE_TOOLS:
            tdh._PARALLEL_SAFE_TOOLS = tdh._PARALLEL_SAFE_TOOLS | wanted


# ---------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------

def make_agent(
    base_url: str,
    *,
    streaming: bool = False,
    toolsets: Sequence[str] = (BENCH_TOOLSET,),
    delegation: bool = False,
    model: str = MODEL,
    api_key: str = API_KEY,
    max_iterations: int = 90,
    **kwargs: Any,
) -> "AIAgent":
    """Construct a real ``run_agent.AIAgent`` for ``base_url`` (``.../v1``).

    Registers the bench tools first.  ``toolsets`` become ``enabled_toolsets``
    (``delegation=True`` appends :data:`DELEGATION_TOOLSET`, i.e. the
    ``delegate_task`` tool); ``streaming=False`` sets
    ``agent._disable_streaming = True`` (Hermes streams by default).  Extra
    ``kwargs`` go to ``AIAgent``.  Construction sends ~11 model-probing GETs
    to ``base_url`` (``/api/v1/models``, ``/api/tags``, ``/v1/props``,
    ``/props``, ``/version``, ``/v1/models``; 404 is fine) even when the LLM is
    later faked in process; a closed loopback port is tolerated too.
    Takes ~0.4-1.5 s: build once, reuse (concurrent non-streaming
    ``run_conversation`` calls on one agent are fine).
    """
    register_bench_tools()
    from run_agent import AIAgent

    enabled = list(toolsets)
    if delegation and DELEGATION_TOOLSET not in enabled:
        enabled.append(DELEGATION_TOOLSET)
    params: Dict[str, Any] = dict(
        base_url=base_url, api_key=api_key, provider="custom", model=model,
        quiet_mode=True, skip_memory=True, skip_context_files=True,
        enabled_toolsets=enabled, max_iterations=max_iterations,
        save_trajectories=False,
    )
    params.update(kwargs)
    agent = AIAgent(**params)
    if not streaming:
        agent._disable_streaming = True
    return agent


# ---------------------------------------------------------------------------
# In-process fake LLM
# ---------------------------------------------------------------------------

class _Completions:
    def __init__(self, owner: "InProcessLLM") -> None:
        self._owner = owner

    def create(self, **kwargs: Any) -> Any:
        return self._owner.create(**kwargs)


class _Chat:
    def __init__(self, owner: "InProcessLLM") -> None:
        self.completions = _Completions(owner)


class _FakeClient:
    """What ``agent._create_request_openai_client`` returns when installed."""

    def __init__(self, owner: "InProcessLLM") -> None:
        self.chat = _Chat(owner)

    def close(self) -> None:
        return None


class InProcessLLM(ScriptRecords):
    """The fake LLM without HTTP, sharing :class:`Script` with the server.

    ``create(**kw)`` plans the reply with the script, sleeps ``delay_ms`` and
    returns an ``openai.types.chat.ChatCompletion`` (or, for ``stream=True``,
    an iterator of ``ChatCompletionChunk`` ending with a usage chunk); for
    ``[llm_error]`` it raises ``openai.BadRequestError`` (HTTP 400) as the SDK
    would.  ``install(agent)`` makes every Hermes LLM request of that agent
    use it.  Child agents built by ``delegate_task`` are NOT covered (they get
    a fresh client factory): use the HTTP server for delegation.
    """

    def __init__(self, script: Optional[Script] = None) -> None:
        self.script: Script = script or Script()
        self.client = _FakeClient(self)

    def create(self, **kwargs: Any) -> Any:
        """OpenAI ``chat.completions.create`` look-alike (see class doc)."""
        from openai.types.chat import ChatCompletion, ChatCompletionChunk

        reply = self.script.plan(kwargs)
        if reply.delay_ms:
            time.sleep(reply.delay_ms / 1000.0)
        if reply.error is not None:
            raise self._error(reply)
        if reply.stream:
            return iter([ChatCompletionChunk.model_validate(c) for c in reply.chunks()])
        return ChatCompletion.model_validate(reply.completion())

    @staticmethod
    def _error(reply: Reply) -> Exception:
        """The ``openai`` exception the SDK raises for ``reply``'s HTTP status."""
        import httpx
        import openai

        body = reply.error_body()
        request = httpx.Request("POST", "http://in-process.invalid/v1/chat/completions")
        response = httpx.Response(reply.status, json=body, request=request)
        cls = openai.BadRequestError if reply.status == 400 else openai.APIStatusError
        return cls(reply.error or "", response=response, body=body["error"])

    def install(self, agent: "AIAgent") -> "AIAgent":
        """Shadow ``agent._create_request_openai_client`` with this fake."""

        def _factory(*, reason: str = "", api_kwargs: Optional[dict] = None) -> _FakeClient:
            return self.client

        agent._create_request_openai_client = _factory  # type: ignore[method-assign]  # this agent's client factory, shadowed
        return agent

    @staticmethod
    def uninstall(agent: "AIAgent") -> None:
        """Restore the class's client factory on ``agent``."""
        agent.__dict__.pop("_create_request_openai_client", None)


# ---------------------------------------------------------------------------
# Delegations
# ---------------------------------------------------------------------------

def wait_for_delegations(timeout: float = 30.0, poll: float = 0.02) -> bool:
    """Block until Hermes has no background delegation running.

    A top-level ``delegate_task`` returns a ``"dispatched"`` handle at once;
    the child ``run_conversation`` runs in ``tools.async_delegation``'s
    daemon pool (thread ``async-delegate_*``) and its completion is pushed on
    ``tools.process_registry.process_registry.completion_queue``.  This polls
    ``tools.async_delegation.active_count()`` (running + finalizing units).
    Returns True when idle, False on timeout. Before hermes-agent 0.17 (no
    ``tools.async_delegation``) subagents run inside the tool call: nothing to wait for.
    """
    try:
        from tools import async_delegation
    except ImportError:
        return True

    deadline = time.monotonic() + timeout
    while async_delegation.active_count() > 0:
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


# ---------------------------------------------------------------------------
# Network guard
# ---------------------------------------------------------------------------

class NetworkBlockedError(ConnectionError):
    """Raised by :func:`loopback_only` for a non-loopback destination."""


_ALLOWED_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _host_allowed(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").lower()
    if host in _ALLOWED_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip == ipaddress.ip_address("127.0.0.1") or ip == ipaddress.ip_address("::1") or (
        isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped == ipaddress.ip_address("127.0.0.1")
    )


@dataclass
class NetGuard:
    """Records of one :func:`loopback_only` block.

    ``attempts``: every checked ``(api, host)``; ``blocked``: the refused ones.
    """

    attempts: List[Tuple[str, str]] = field(default_factory=list)
    blocked: List[Tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self, api: str, host: Any) -> None:
        """Record ``(api, host)``; raise :class:`NetworkBlockedError` unless loopback."""
        item = (api, str(host))
        ok = _host_allowed(host)
        with self._lock:
            self.attempts.append(item)
            if not ok:
                self.blocked.append(item)
        if not ok:
            raise NetworkBlockedError(f"loopback_only: {api} to {host!r} blocked")


def _address_host(address: Any) -> Any:
    """Host part of a socket address; None for AF_UNIX paths (always allowed)."""
    if isinstance(address, tuple) and address:
        return address[0]
    return None


@contextlib.contextmanager
def loopback_only() -> Iterator[NetGuard]:
    """Patch ``socket.socket.connect``/``connect_ex``, ``socket.create_connection``
    and ``socket.getaddrinfo`` so any host other than 127.0.0.1 / localhost /
    ::1 raises :class:`NetworkBlockedError`; yields the :class:`NetGuard`
    recording attempts.  Process-wide (all threads) while active; restored on
    exit.  Not re-entrant across overlapping guards in different threads.
    """
    guard = NetGuard()
    sock_cls = socket.socket
    saved_cls_attrs = {name: sock_cls.__dict__.get(name) for name in ("connect", "connect_ex")}
    orig_connect = sock_cls.connect
    orig_connect_ex = sock_cls.connect_ex
    orig_create_connection = socket.create_connection
    orig_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        guard.check("connect", _address_host(address))
        return orig_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        guard.check("connect_ex", _address_host(address))
        return orig_connect_ex(self, address)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        guard.check("create_connection", _address_host(address))
        return orig_create_connection(address, *args, **kwargs)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        guard.check("getaddrinfo", host)
        return orig_getaddrinfo(host, *args, **kwargs)

    sock_cls.connect = connect  # type: ignore[method-assign]  # the guard patches socket for the block
    sock_cls.connect_ex = connect_ex  # type: ignore[method-assign]  # likewise
    socket.create_connection = create_connection  # type: ignore[assignment]  # likewise
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]  # likewise
    try:
        yield guard
    finally:
        for name, value in saved_cls_attrs.items():
            if value is None:
                with contextlib.suppress(AttributeError):
                    delattr(sock_cls, name)
            else:
                setattr(sock_cls, name, value)
        socket.create_connection = orig_create_connection  # type: ignore[assignment]  # put back
        socket.getaddrinfo = orig_getaddrinfo  # type: ignore[assignment]  # put back
