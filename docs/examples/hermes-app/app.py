"""A small Hermes service with true traces: one shared agent answers overlapping questions.

    python docs/examples/hermes-app/app.py                 # against the scripted fake LLM, offline

    HERMES_APP_BASE_URL=https://api.example.com/v1 HERMES_APP_MODEL=some-model HERMES_APP_API_KEY=... \\
        python docs/examples/hermes-app/app.py ["a question" ...]

One ``AIAgent`` is built once and shared; each question is one turn of its own session, asked from a thread
pool, overlapping the others. The agent can read files (Hermes's ``file`` toolset: reads of different files run
in Hermes's own tool pool) and hand work to a subagent (``delegate_task``). Tracing is set up in code, the way
an application does it: an SDK tracer provider, an exporter, and ``HermesAgentInstrumentor().instrument()``.

Environment:
  HERMES_APP_BASE_URL   an OpenAI-compatible endpoint (``.../v1``); unset: the scripted fake LLM, offline
  HERMES_APP_MODEL      the model to ask (required with HERMES_APP_BASE_URL)
  HERMES_APP_API_KEY    its API key (default: ``no-key``, for local servers that need none)
  OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT)  export the spans with OTLP/HTTP there, too

Exit code: 0 when every question was answered, 1 when a turn failed, 2 on a bad setting or an endpoint that
cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from statebackends_hermes_agent import HermesAgentInstrumentor

NOTES = Path(__file__).resolve().parent / "notes"
LAUNCH, PRICING = NOTES / "launch.md", NOTES / "pricing.md"

QUESTIONS: dict[str, str] = {
    "alice": f"Read {LAUNCH} and {PRICING} and say in two sentences what ships when, at what price.",
    "bob": f"Hand this to a subagent: draft a one-line release announcement from {LAUNCH}.",
    "carol": "Say hello to the team in five words.",
    "dave": f"What does the Team plan cost? The answer is in {PRICING}.",
}
"""The questions asked of a real endpoint, one session each."""

SCRIPTED: dict[str, str] = {
    "alice": f"[conv:alice] [files:{LAUNCH},{PRICING}] What ships when, at what price?",
    "bob": "[conv:bob] [delegate:bob-subagent] Draft a release announcement.",
    "carol": "[conv:carol] Say hello.",
    "dave": f"[conv:dave] [files:{PRICING}] What does the Team plan cost?",
}
"""The same questions for the fake LLM, which follows the directives in them (``statebackends-fakellm --help``)."""


class AppError(Exception):
    """A setting or an endpoint the app cannot work with; the message says which and what to do."""


@dataclass(frozen=True)
class Endpoint:
    """Where the LLM is."""

    base_url: str
    model: str
    api_key: str

    @classmethod
    def from_env(cls) -> Optional["Endpoint"]:
        """The endpoint HERMES_APP_* name, None when HERMES_APP_BASE_URL is unset; AppError if one is bad."""
        base_url = os.environ.get("HERMES_APP_BASE_URL", "").strip()
        if not base_url:
            return None
        try:
            parts = urllib.parse.urlsplit(base_url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
        except ValueError:  # an unclosed [IPv6] host, a bad port
            parts = None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or any(c.isspace() or not c.isprintable() for c in base_url)):
            raise AppError(f"HERMES_APP_BASE_URL={base_url!r} is not an http(s) URL such as "
                           "https://api.example.com/v1 or http://127.0.0.1:8765/v1")
        model = os.environ.get("HERMES_APP_MODEL", "").strip()
        if not model:
            raise AppError(f"HERMES_APP_MODEL is not set: name the model {base_url} should answer with")
        return cls(base_url.rstrip("/"), model, os.environ.get("HERMES_APP_API_KEY", "").strip() or "no-key")

    def check(self, timeout: float = 10.0) -> None:
        """Raise AppError unless the endpoint answers HTTP at all (any status will do: some need a key to list models)."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise AppError(f"cannot reach HERMES_APP_BASE_URL={self.base_url!r} ({reason}): set it to an "
                           "OpenAI-compatible endpoint, or unset it to run against the fake LLM") from None


# -- tracing, set up in code -------------------------------------------------------------------------------------------


def setup_tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A tracer provider that keeps the spans to print at the end, and exports them with OTLP when asked; instrumented."""
    provider = TracerProvider(resource=Resource.create({"service.name": "hermes-app"}))
    kept = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    HermesAgentInstrumentor().instrument(tracer_provider=provider)  # state backend: invocation_id, the default
    return provider, kept


# -- the service -------------------------------------------------------------------------------------------------------


def build_agent(endpoint: Endpoint) -> Any:
    """The one agent every question shares: file tools and delegation, nothing read from the working folder."""
    from run_agent import AIAgent  # imported late: Hermes reads HERMES_HOME when first imported

    from statebackends_hermes_testbed.apphost import shareable

    agent = AIAgent(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key,
        provider="custom",
        model=endpoint.model,
        enabled_toolsets=["file", "delegation"],
        quiet_mode=True,
        skip_context_files=True,  # no AGENTS.md or similar from the folder the app runs in
        skip_memory=True,
        save_trajectories=False,
    )
    return shareable(agent)  # Hermes cannot stream overlapping turns on one agent: see apphost.shareable


def ask(agent: Any, session: str, question: str) -> tuple[str, bool]:
    """One turn of ``session`` under the service's own span; (answer, ok)."""
    tracer = trace.get_tracer("hermes-app")
    with tracer.start_as_current_span(f"ask {session}", kind=trace.SpanKind.SERVER, attributes={"session.id": session}):
        result = agent.run_conversation(question, task_id=session)  # as Hermes's own front ends pass the session
    answer = str(result.get("final_response") or result.get("error") or "")
    return answer, not result.get("failed")


def serve(endpoint: Endpoint, questions: dict[str, str], workers: int) -> int:
    """Ask every question at once from a thread pool, print the answers and the span trees; the exit code."""
    from statebackends_hermes_testbed.apphost import wait_for_background_work

    provider, kept = setup_tracing()
    agent = build_agent(endpoint)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="request") as pool:
        futures = {session: pool.submit(ask, agent, session, q) for session, q in questions.items()}
        answers = {session: f.result() for session, f in futures.items()}
    wait_for_background_work()  # a delegated subagent may still be running: let its spans end before exit
    provider.force_flush()
    for session, (answer, ok) in answers.items():
        print(f"{session}: {answer if ok else 'FAILED: ' + answer}")
    print()
    print("\n".join(span_trees(kept.get_finished_spans())))
    provider.shutdown()
    return 0 if all(ok for _, ok in answers.values()) else 1


def span_trees(spans: Sequence[ReadableSpan]) -> Iterator[str]:
    """Each trace as an indented tree of span names, in start order."""
    children: dict[Optional[int], list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)

    def walk(span: ReadableSpan, depth: int) -> Iterator[str]:
        yield "  " * depth + span.name
        for child in children.get(span.context.span_id, []):
            yield from walk(child, depth + 1)

    for root in children.get(None, []):
        yield f"trace {root.context.trace_id:032x}"
        yield from walk(root, 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("questions", nargs="*", help="questions to ask (default: four built-in ones)")
    parser.add_argument("--workers", type=int, default=4, help="overlapping turns at most (default 4)")
    args = parser.parse_args(argv)
    try:
        if args.workers < 1:
            raise AppError(f"--workers must be 1 or more, got {args.workers}")
        endpoint = Endpoint.from_env()
        asked = {f"s{i}": q for i, q in enumerate(args.questions, 1)}
        if endpoint is None:
            from statebackends_hermes_testbed.apphost import MODEL, offline

            with offline() as server:
                print(f"(no HERMES_APP_BASE_URL: asking the scripted fake LLM at {server.base_url})", file=sys.stderr)
                return serve(Endpoint(server.base_url, MODEL, "no-key"), asked or SCRIPTED, args.workers)
        endpoint.check()
        return serve(endpoint, asked or QUESTIONS, args.workers)
    except AppError as exc:
        print(f"hermes-app: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
