"""The ``greenlets`` matrix cell, run in a SUBPROCESS under ``gevent.monkey.patch_all()``; prints one JSON verdict.

    python -m statebackends_hermes_testbed.greenlets --backend invocation_id [--callers 8]

Monkey patching must come before anything imports ``threading`` or ``ssl``, so this module
patches first, and the matrix runs it in a fresh interpreter (:func:`run_in_subprocess`).

It drives our instrumentation's PUBLIC lifecycle (``HermesAgentInstrumentor().telemetry``:
``start_invocation``, ``start_chat``, ``start_tool``, ``end_tool_round``, ``stop``/``fail``) from
:class:`GreenletStubAgent`, a small synchronous agent whose LLM turns sleep (so gevent switches
greenlets between them): ``callers`` invocations run as gevent greenlets sharing ONE agent (the
owner), and each tool round dispatches every tool call in a greenlet SPAWNED during the invocation
and handed only the owner and the invocation id (``task_id``), joined before the round ends. That
greenlet starts with an empty ``contextvars`` context and its own (greenlet-local) ``threading.local``:
its ``execute_tool`` span finds its parent only through what the store finds for (owner, id).

The real Hermes ``AIAgent`` is not used here: this cell uses the stub, and says so in its notes.
"""

from __future__ import annotations

if __name__ == "__main__":  # pragma: no branch - before anything imports threading or ssl
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Optional, Sequence

GREENLET_DIRECTIVES = "[tools:2] [delay_ms:15]"
"""Each greenlet invocation: an LLM turn asking for two tools, the tools, a final LLM turn; every turn sleeps."""
SUBPROCESS_TIMEOUT = 180.0
STUB_NOTE = "greenlet stub agent (our public lifecycle), not the real Hermes AIAgent"


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
        invocation = self.telemetry.start_invocation(self, task_id, user_message=user_message)
        try:
            result = self._loop(user_message, invocation.task_id)
        except BaseException as exc:
            invocation.fail(exc)
            raise
        invocation.stop(result)
        return result

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

        call = self.telemetry.start_chat(self, api_kwargs)
        try:
            reply = self.script.plan(api_kwargs)
            time.sleep(reply.delay_ms / 1000.0 if reply.delay_ms else 0)  # patched: the greenlet yields
            if reply.error is not None:
                raise RuntimeError(reply.error)
            response = ChatCompletion.model_validate(reply.completion())
        except BaseException as exc:
            call.fail(exc)
            raise
        call.stop(response)
        return response

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
        call = self.telemetry.start_tool(owner, name, args, task_id=task_id, tool_call_id=tool_call_id)
        time.sleep(0.002)  # yield: the other greenlets' tools interleave
        result = str(args.get("text", ""))
        call.stop(result)
        return result


def run(backend: str, callers: int) -> dict[str, Any]:
    """Run ``callers`` greenlet invocations on one shared stub agent under ``backend``; the verdict as JSON-able data."""
    import gevent
    from opentelemetry.sdk.trace import TracerProvider  # noqa: F401 - imported after patching

    from statebackends_hermes_agent import HermesAgentInstrumentor

    from .driver import Recorder, ensure_hermes_home, truth_of
    from .fakellm import Script
    from .hermes_harness import MODEL, loopback_only
    from .traces import CALLER_PREFIX

    ensure_hermes_home()
    with loopback_only() as guard:
        recorder = Recorder("statebackends.greenlets")
        instrumentor = HermesAgentInstrumentor()
        instrumentor.instrument(tracer_provider=recorder.provider, state_backend=backend)
        try:
            telemetry = instrumentor.telemetry
            store = instrumentor.store
            script = Script()
            agent = GreenletStubAgent(telemetry, script, MODEL)
            tags = [f"gl{i}" for i in range(callers)]

            def call(tag: str) -> None:
                with recorder.tracer.start_as_current_span(f"{CALLER_PREFIX}{tag}"):
                    agent.run_conversation(f"[conv:{tag}] {GREENLET_DIRECTIVES} hello", task_id=f"task-{tag}")

            greenlets = [gevent.spawn(call, t) for t in tags]
            gevent.joinall(greenlets, timeout=60)
            errors = [repr(g.exception) for g in greenlets if g.exception is not None or not g.ready()]
            verdict = recorder.verdict([truth_of(script, t, tools=2) for t in tags], store=store, owners=[agent])
        finally:
            instrumentor.uninstrument()
    verdict.notes.insert(0, STUB_NOTE)
    verdict.notes.extend(f"greenlet raised {e}" for e in errors)
    data = verdict.as_dict()
    data["ok"] = verdict.ok and not errors and not guard.blocked
    data["errors"] = errors
    data["monkey_patched"] = _patched()
    data["blocked_connections"] = [list(b) for b in guard.blocked]
    return data


def _patched() -> bool:
    try:
        from gevent import monkey

        return bool(monkey.is_module_patched("threading"))
    except ImportError:
        return False


def run_in_subprocess(backend: str, callers: int, timeout: float = SUBPROCESS_TIMEOUT) -> dict[str, Any]:
    """Run :func:`run` in a fresh interpreter (monkey patching comes first there); its JSON verdict, or RuntimeError."""
    cmd = [sys.executable, "-m", "statebackends_hermes_testbed.greenlets", "--backend", backend, "--callers", str(callers)]
    env = {k: v for k, v in os.environ.items() if k not in ("HERMES_HOME",)}  # the child makes a private home
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"greenlet subprocess exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return json.loads(lines[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the JSON verdict of one greenlet run on stdout (one line); 0 when it ran, whatever the verdict."""
    parser = argparse.ArgumentParser(prog="python -m statebackends_hermes_testbed.greenlets")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--callers", type=int, default=8)
    args = parser.parse_args(argv)
    if not _patched():
        print("statebackends_hermes_testbed.greenlets: gevent monkey patching is not active", file=sys.stderr)
        return 2
    out = sys.stdout
    sys.stdout = sys.stderr  # Hermes's or anything else's console output stays off the JSON line
    try:
        data = run(args.backend, args.callers)
    finally:
        sys.stdout = out
    print(json.dumps(data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
