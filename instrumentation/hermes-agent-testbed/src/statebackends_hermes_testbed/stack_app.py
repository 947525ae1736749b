"""A small Hermes app with no tracing code of its own, to run under ``opentelemetry-instrument`` (zero code).

    opentelemetry-instrument python -m statebackends_hermes_testbed.stack_app turns --base-url http://127.0.0.1:P/v1
    opentelemetry-instrument python -m statebackends_hermes_testbed.stack_app api --base-url http://127.0.0.1:P/v1

``turns`` builds a real ``AIAgent`` per session (``--sessions``) on an OpenAI-compatible endpoint (the testbed's
fake LLM) and runs the turns named by ``--turn`` (default: two turns of one session, one tool then two tools in
Hermes's pool), each with ``run_conversation(message, task_id=<its session>)``, as Hermes's own front ends do. Streaming is Hermes's
default (``--no-stream`` turns it off). It prints one JSON line: what each turn returned, with nothing that
differs from run to run (no timings), so a run under ``opentelemetry-instrument`` can be compared with a plain one.

``api`` serves Hermes's real OpenAI-compatible API server (``APIServerAdapter``, through
:class:`~statebackends_hermes_testbed.frontend_api.ApiServer`) on a free port of 127.0.0.1, its agents pointed
at ``--base-url``; it prints one JSON line ``{"port": P, "key": K}`` (K: the bearer key it requires) and
serves until SIGTERM or Ctrl-C, then stops the server and exits normally, so the SDK's exit handler flushes
the spans.

``HERMES_HOME`` must name a throw-away folder (Hermes writes ``config.yaml``, ``state.db``, logs and sessions).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any, Optional, Sequence

DEFAULT_TURNS = ("[conv:turn1] [tools:1] hello", "[conv:turn2] [tools:2] hello")


def outcome(result: Any) -> dict[str, Any]:
    """What a turn returned, reduced to what is the same in every run: final text, flags and the messages."""
    if not isinstance(result, dict):
        return {"type": type(result).__name__, "value": str(result)}
    messages = []
    for message in result.get("messages") or []:
        if not isinstance(message, dict):
            continue
        calls = [(c.get("id"), (c.get("function") or {}).get("name"), (c.get("function") or {}).get("arguments"))
                 for c in message.get("tool_calls") or [] if isinstance(c, dict)]
        messages.append({"role": message.get("role"), "content": message.get("content"),
                         "tool_calls": calls, "tool_call_id": message.get("tool_call_id")})
    return {
        "final_response": result.get("final_response"),
        "completed": result.get("completed"),
        "failed": result.get("failed"),
        "error": result.get("error"),
        "messages": messages,
    }


def run_turns(args: argparse.Namespace) -> int:
    from .hermes_harness import make_agent

    turns = args.turns or list(DEFAULT_TURNS)
    sessions = (args.sessions or "stack-session").split(",")
    sessions += [sessions[-1]] * (len(turns) - len(sessions))
    agents: dict[str, Any] = {}  # one agent per session, as Hermes's CLI keeps one per session
    outcomes = []
    for turn, session in zip(turns, sessions):
        if session not in agents:
            agents[session] = make_agent(args.base_url, streaming=not args.no_stream, session_id=session)
        outcomes.append(outcome(agents[session].run_conversation(turn, task_id=session)))
    print(json.dumps({"turns": outcomes}, sort_keys=True), flush=True)
    return 0


def serve_api(args: argparse.Namespace) -> int:
    from .frontend_api import ApiServer, api_server_config

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with api_server_config(args.base_url), ApiServer() as server:
        print(json.dumps({"port": server.port, "key": server.key}), flush=True)
        try:
            while not stop.wait(0.2):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m statebackends_hermes_testbed.stack_app",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    turns = commands.add_parser("turns", help="run turns on one agent and print what they returned")
    turns.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, http://127.0.0.1:PORT/v1")
    turns.add_argument("--turn", action="append", dest="turns", help="a turn's user message (repeatable)")
    turns.add_argument("--sessions", help="the session of each turn, comma-separated (the last one repeats; default "
                       "stack-session): one agent per session (its session_id), the session id as each turn's task_id")
    turns.add_argument("--no-stream", action="store_true", help="turn Hermes's streaming off")
    api = commands.add_parser("api", help="serve Hermes's API server until SIGTERM")
    api.add_argument("--base-url", required=True, help="the endpoint its agents call, http://127.0.0.1:PORT/v1")
    args = parser.parse_args(argv)
    return run_turns(args) if args.command == "turns" else serve_api(args)


if __name__ == "__main__":
    sys.exit(main())
