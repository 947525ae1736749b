"""The ``greenlets`` matrix cell, run in a SUBPROCESS under ``gevent.monkey.patch_all()``; prints one JSON verdict.

    python -m statebackends_hermes_testbed.greenlets --backend invocation_id [--callers 8] [--agent real|stub] [--http]

Monkey patching must come before anything imports ``threading`` or ``ssl``, so this module
patches first, and the matrix runs it in a fresh interpreter (:func:`run_in_subprocess`).

By default (``--agent real``) it runs the REAL Hermes ``AIAgent`` (LLM faked in process, see
``hermes_harness.InProcessLLM``): ``callers`` invocations run as gevent greenlets sharing ONE agent
(the owner), each asking for two tools, which Hermes's concurrent tool pool runs in worker
greenlets it spawns during the invocation; ``propagate_context_to_thread`` is patched to identity
(as in the ``raw_thread`` row), so a worker starts with an empty ``contextvars`` context and its own
greenlet-local ``threading.local`` and knows only the invocation id (``task_id``). Its
``execute_tool`` span finds its parent only through what the store finds for that id.

``--http`` has the real agent reach the fake LLM over HTTP (served in greenlets of this process)
with opentelemetry-instrumentation-httpx, and judges every request: its ``traceparent`` must name
an HTTP span under that request's own ``chat`` span, in the call's trace.

``--agent stub`` runs :class:`GreenletStubAgent` instead, a small greenlet agent driving our
instrumentation's PUBLIC lifecycle (``HermesAgentInstrumentor().telemetry``: ``start_invocation``,
``start_chat``, ``start_tool``, ``end_tool_round``, ``stop``/``fail``), which spawns a greenlet per
tool call handed only the owner and the id and joins it before the round ends (the fallback, kept
for a Hermes release that does not run under gevent).

The verdict includes ``max_overlap``: the most invocations open at once (below 2, the row tested nothing).
"""

from __future__ import annotations

if __name__ == "__main__":  # pragma: no branch - before anything imports threading or ssl
    from gevent import monkey

    monkey.patch_all()

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Optional, Sequence

GREENLET_DIRECTIVES = "[tools:2] [delay_ms:15]"
"""Each greenlet invocation: an LLM turn asking for two tools, the tools, a final LLM turn; every turn sleeps."""
SUBPROCESS_TIMEOUT = 180.0
STUB_NOTE = "greenlet stub agent (our public lifecycle), not the real Hermes AIAgent"
REAL_NOTE = "real Hermes AIAgent under gevent, tools in greenlets its pool spawned (raw hop: only the id)"


class GreenletStubAgent:
    """A synchronous agent shaped like Hermes's ``AIAgent`` for the telemetry; one instance is shared by all greenlets."""

    provider = "custom"

    def __init__(self, telemetry: Any, script: Any, model: str, session_id: str = "greenlet-session") -> None:
        self.telemetry = telemetry
        self.script = script
        self.model = model
        self.session_id = session_id

    def run_conversation(self, user_message: str, task_id: str) -> dict[str, Any]:
        """One invocation: LLM turn, tools (each in a freshly spawned greenlet), LLM turn ... until a final answer."""
        with self.telemetry.start_invocation(self, task_id, user_message=user_message) as invocation:
            invocation.result = self._loop(user_message, invocation.task_id)
        return invocation.result

    def _loop(self, user_message: str, task_id: str) -> dict[str, Any]:
        messages: list[dict[str, Any]] = [{"role": "user", "content": user_message}]
        while True:
            response = self._chat({"model": self.model, "messages": list(messages)})
            message = response.choices[0].message
            if not message.tool_calls:
                return {"final_response": message.content, "completed": True}
            messages.append(
                {"role": "assistant", "content": message.content, "tool_calls": [tc.model_dump() for tc in message.tool_calls]}
            )
            self._tool_round(message.tool_calls, messages, task_id)

    def _chat(self, api_kwargs: dict[str, Any]) -> Any:
        import time

        from openai.types.chat import ChatCompletion

        with self.telemetry.start_chat(self, api_kwargs) as call:
            reply = self.script.plan(api_kwargs)
            time.sleep(reply.delay_ms / 1000.0 if reply.delay_ms else 0)  # patched: the greenlet yields
            if reply.error is not None:
                raise RuntimeError(reply.error)
            call.result = ChatCompletion.model_validate(reply.completion())
        return call.result

    def _tool_round(self, tool_calls: Any, messages: list, task_id: str) -> None:
        import gevent

        error: Optional[BaseException] = None
        try:
            spawned = [
                gevent.spawn(self._tool_in_greenlet, self, tc.function.name, tc.function.arguments, task_id, tc.id)
                for tc in tool_calls
            ]
            gevent.joinall(spawned, timeout=30, raise_error=True)
            for tc, g in zip(tool_calls, spawned):
                messages.append({"role": "tool", "tool_call_id": tc.id, "content": str(g.value)})
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.telemetry.end_tool_round(self, task_id, error)

    def _tool_in_greenlet(self, owner: Any, name: str, arguments: str, task_id: str, tool_call_id: str) -> str:
        """Runs in a spawned greenlet that knows only the owner and the id: the store must find the invocation."""
        import time

        args = json.loads(arguments or "{}")
        with self.telemetry.start_tool(owner, name, args, task_id=task_id, tool_call_id=tool_call_id) as call:
            time.sleep(0.002)  # yield: the other greenlets' tools interleave
            call.result = str(args.get("text", ""))
        return str(call.result)


def max_overlap(spans: Sequence[Any]) -> int:
    """The most ``invoke_agent`` spans open at one instant (did the greenlets really interleave?)."""
    from .traces import kind_of

    edges = sorted(
        (t, step)
        for s in spans
        if kind_of(s) == "invoke_agent" and s.start_time is not None and s.end_time is not None
        for t, step in ((s.start_time, 1), (s.end_time, -1))
    )
    best = open_now = 0
    for _, step in edges:
        open_now += step
        best = max(best, open_now)
    return best


def run(backend: str, callers: int, agent_kind: str = "real", http: bool = False) -> dict[str, Any]:
    """Run ``callers`` greenlet invocations on one shared agent under ``backend``; the verdict as JSON-able data.

    ``agent_kind`` ``real``: the real Hermes ``AIAgent`` (in-process fake LLM), its tool pool hopping raw
    (``propagate_context_to_thread`` patched to identity), so each tool runs in a greenlet the pool spawns
    during the invocation with only the id; ``stub``: :class:`GreenletStubAgent`. ``http`` (real agent only): the LLM
    over HTTP with the httpx instrumentation, its requests judged.
    """
    import gevent

    from statebackends_hermes_agent import HermesAgentInstrumentor

    from .driver import Recorder, ensure_hermes_home, truth_of
    from .fakellm import FakeLLMServer, Script
    from .hermes_harness import BENCH_TOOLSET, MODEL, InProcessLLM, loopback_only, make_agent
    from .traces import CALLER_PREFIX

    ensure_hermes_home()
    errors: list[str] = []
    with loopback_only() as guard, contextlib.ExitStack() as stack:
        recorder = Recorder("statebackends.greenlets")
        instrumentor = HermesAgentInstrumentor()
        instrumentor.instrument(tracer_provider=recorder.provider, state_backend=backend)
        stack.callback(instrumentor.uninstrument)
        store = instrumentor.store
        if agent_kind == "real":
            from .scenarios import raw_tool_pool

            server = FakeLLMServer().start()  # answers the model probes of the agent's construction (and, http, the LLM)
            stack.callback(server.stop)
            agent: Any = make_agent(server.base_url, toolsets=(BENCH_TOOLSET,))
            if http:
                from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

                httpx_instrumentor = HTTPXClientInstrumentor()
                httpx_instrumentor.instrument(tracer_provider=recorder.provider)
                stack.callback(httpx_instrumentor.uninstrument)
                records: Any = server
                note = f"{REAL_NOTE}; LLM over HTTP, httpx instrumented"
            else:
                llm = InProcessLLM()
                llm.install(agent)
                records, note = llm, REAL_NOTE
            stack.enter_context(raw_tool_pool())
        else:
            script = Script()
            agent = GreenletStubAgent(instrumentor.telemetry, script, MODEL)
            records, note = script, STUB_NOTE
        tags = [f"gl{i}" for i in range(callers)]

        def call(tag: str) -> None:
            with recorder.tracer.start_as_current_span(f"{CALLER_PREFIX}{tag}"):
                agent.run_conversation(f"[conv:{tag}] {GREENLET_DIRECTIVES} hello", task_id=f"task-{tag}")

        greenlets = [gevent.spawn(call, t) for t in tags]
        gevent.joinall(greenlets, timeout=60)
        errors = [repr(g.exception) if g.ready() else "a greenlet did not finish" for g in greenlets
                  if g.exception is not None or not g.ready()]
        verdict = recorder.verdict([truth_of(records, t, tools=2, requests=http) for t in tags], store=store, owners=[agent])
        overlap = max_overlap(recorder.exporter.get_finished_spans())
    verdict.notes.insert(0, f"{note}; at most {overlap} invocations open at once")
    verdict.notes.extend(f"greenlet raised {e}" for e in errors)
    data = verdict.as_dict()
    data["ok"] = verdict.ok and not errors and not guard.blocked and overlap >= 2
    data["errors"] = errors
    data["agent"] = agent_kind
    data["max_overlap"] = overlap
    data["monkey_patched"] = _patched()
    data["blocked_connections"] = [list(b) for b in guard.blocked]
    return data


def _patched() -> bool:
    try:
        from gevent import monkey

        return bool(monkey.is_module_patched("threading"))
    except ImportError:
        return False


def run_in_subprocess(
    backend: str, callers: int, agent_kind: str = "real", timeout: float = SUBPROCESS_TIMEOUT, *, http: bool = False
) -> dict[str, Any]:
    """Run :func:`run` in a fresh interpreter (monkey patching comes first there); its JSON verdict, or RuntimeError."""
    cmd = [sys.executable, "-m", "statebackends_hermes_testbed.greenlets", "--backend", backend,
           "--callers", str(callers), "--agent", agent_kind, *(["--http"] if http else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("HERMES_HOME",)}  # the child makes a private home
    # Run outside any git work tree: Hermes's system prompt probes the working directory with `git` subprocesses,
    # which a monkey-patched fork makes slow (about 3 s per turn in this repository's checkout, the turns queued).
    with tempfile.TemporaryDirectory(prefix="statebackends-greenlets-") as cwd:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"greenlet subprocess exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return json.loads(lines[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the JSON verdict of one greenlet run on stdout (one line); 0 when it ran, whatever the verdict, 2 if unpatched."""
    parser = argparse.ArgumentParser(prog="python -m statebackends_hermes_testbed.greenlets")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--agent", choices=("real", "stub"), default="real")
    parser.add_argument("--http", action="store_true", help="real agent: the LLM over HTTP, httpx instrumented, requests judged")
    args = parser.parse_args(argv)
    if not _patched():
        print("statebackends_hermes_testbed.greenlets: gevent monkey patching is not active", file=sys.stderr)
        return 2
    out = sys.stdout
    sys.stdout = sys.stderr  # Hermes's or anything else's console output stays off the JSON line
    try:
        data = run(args.backend, args.callers, args.agent, args.http)
    finally:
        sys.stdout = out
    print(json.dumps(data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
