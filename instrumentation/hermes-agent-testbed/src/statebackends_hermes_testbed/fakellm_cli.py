"""The scripted fake LLM as a command: serves it on 127.0.0.1 until stopped (Ctrl-C or SIGTERM).

    python -m statebackends_hermes_testbed.fakellm --port 8765
    statebackends-fakellm --port 8765          # the same, as a console script

Point any OpenAI-compatible client, or a Hermes ``AIAgent``, at ``http://127.0.0.1:8765/v1`` and
script each conversation with directives in its first user message (``--help`` lists them). The
command is strict where the library class is lenient: a request whose directives are not all valid
is answered with HTTP 400 naming the directive, and the same line is printed here. Bad arguments and
a port in use end the command with one line naming the value, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import textwrap
import threading
from typing import Any, Mapping, Optional, Sequence

from .fakellm import DEFAULT_MODELS, DIRECTIVES, FakeLLMServer, Reply, Script

__all__ = ["main"]

PROG = "statebackends-fakellm"


def _port(text: str) -> int:
    """An argparse type: a TCP port number, 0 meaning any free one."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a whole number from 0 to 65535 (0 picks a free port)")
    return port


def _model(text: str) -> str:
    """An argparse type: a model name, one word."""
    name = text.strip()
    if not name or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a model name: give one word, such as fake-model")
    return name


def _epilog() -> str:
    width = max(len(syntax) for syntax, _ in DIRECTIVES.values())
    lines = ["directives (read from the first user message of each request, anywhere in its text):"]
    for syntax, meaning in DIRECTIVES.values():
        lines += textwrap.wrap(meaning, 100, initial_indent=f"  {syntax:<{width}}  ", subsequent_indent=" " * (width + 4))
    lines += [
        "",
        "Without directives the answer is \"done anon\". Served: GET /v1/models, GET /v1/models/<name>,",
        "POST /v1/chat/completions (JSON, or server-sent events with a final usage chunk when stream is true);",
        "anything else gets a 404 JSON body. Any API key is accepted. Only 127.0.0.1 is listened on.",
        "",
        "example:",
        f"  {PROG} --port 8765",
        "  then ask http://127.0.0.1:8765/v1 (model fake-model) for \"[conv:demo] [tools:2] hello\"",
    ]
    return "\n".join(lines)


def _describe(reply: Reply) -> str:
    """One log line for a planned reply."""
    mode = "stream" if reply.stream else "json"
    if reply.error is not None:
        return f"conv {reply.tag} ({mode}): HTTP {reply.status}: {reply.error}"
    if reply.tool_calls:
        names = sorted({name for _, name, _ in reply.tool_calls})
        what = f"{len(reply.tool_calls)} tool call(s) to {', '.join(names)}"
    else:
        what = repr(reply.content)
    return f"conv {reply.tag} ({mode}): {reply.response_id} -> {what}"


class _Announcing(Script):
    """A strict script that prints one line per chat request it answers."""

    def __init__(self, quiet: bool) -> None:
        super().__init__(strict=True)
        self._quiet = quiet
        self._print_lock = threading.Lock()

    def plan(self, request: Mapping[str, Any], traceparent: Optional[str] = None) -> Reply:
        reply = super().plan(request, traceparent)
        if not self._quiet or reply.error is not None:
            with self._print_lock:
                print(_describe(reply), file=sys.stderr, flush=True)
        return reply


def _bind_error(port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on 127.0.0.1 is already in use: stop what listens there, or pick another --port (0 picks a free one)"
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on port {port} of 127.0.0.1: pick a port above 1023, or 0 for a free one"
    return f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until SIGINT or SIGTERM; 0 when stopped that way, 1 when the port cannot be bound, 2 on bad arguments."""
    invoked_as_module = os.path.basename(sys.argv[0] or "") in ("fakellm.py", "__main__.py", "-m")
    parser = argparse.ArgumentParser(
        prog="python -m statebackends_hermes_testbed.fakellm" if invoked_as_module else PROG,
        description="Serve the scripted, deterministic OpenAI-compatible fake LLM of statebackends-hermes-testbed\n"
        "on 127.0.0.1 until stopped (Ctrl-C or SIGTERM).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=_port, default=0, metavar="N",
                        help="TCP port on 127.0.0.1 (default 0: any free port; the URL is printed)")
    parser.add_argument("--model", type=_model, action="append", metavar="NAME",
                        help=f"a model GET /v1/models lists (repeatable; default {', '.join(DEFAULT_MODELS)}); "
                        "requests may name any model")
    parser.add_argument("--quiet", action="store_true", help="print nothing per request (errors still are)")
    args = parser.parse_args(argv)

    server = FakeLLMServer(script=_Announcing(args.quiet), models=args.model or DEFAULT_MODELS, port=args.port)
    try:
        server.start()
    except OSError as exc:
        print(f"{parser.prog}: error: {_bind_error(args.port, exc)}", file=sys.stderr)
        return 1
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print(f"fake LLM serving on {server.base_url} (models: {', '.join(server.models)}); Ctrl-C stops it",
              flush=True)
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
    print("fake LLM stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
