"""The chat span is current for the code under it and carried into the thread Hermes makes its request in.

Hermes 0.19 makes each LLM request in a plain ``threading.Thread`` built inside ``_interruptible_api_call`` /
``_interruptible_streaming_api_call`` (no context copy). With ``opentelemetry-instrumentation-httpx`` (as
``opentelemetry-bootstrap`` installs it for Hermes) every request's HTTP client span must hang under its own
``chat`` span in the turn's trace, and the ``traceparent`` the LLM endpoint receives must name that span, with and
without ``opentelemetry-instrumentation-threading``, streaming or not. Judged from the exported spans and the
headers the fake LLM on 127.0.0.1 received, on the real agent.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import threading
import time
import weakref
from typing import Any, Iterator

import pytest
import wrapt
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from statebackends_hermes_agent import wrappers as hermes_wrappers
from statebackends_hermes_testbed.driver import HermesBench
from statebackends_hermes_testbed.scenarios import httpx_instrumentation, threading_instrumentation
from statebackends_hermes_testbed.traces import is_llm_request, kind_of, parse_traceparent

_marker: contextvars.ContextVar[str] = contextvars.ContextVar("test_chat_context_marker", default="unset")


def _requests_under_their_chats(bench: HermesBench, tag: str) -> list[Any]:
    """Assert each request of ``tag`` names, in the call's trace, an HTTP span under a chat of that call; the chats."""
    bench.provider.force_flush()
    spans = bench.exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    (caller,) = [s for s in spans if s.name == f"call {tag}"]
    requests = bench.server.requests(tag)
    assert requests, "the fake LLM received no request"
    chats = []
    for traceparent, response_id in requests:
        ids = parse_traceparent(traceparent)
        assert ids is not None, f"no traceparent reached the LLM: {traceparent!r}"
        assert ids[0] == caller.context.trace_id, "the traceparent names another trace"
        http = by_id[ids[1]]
        assert is_llm_request(http)
        chat = by_id[http.parent.span_id]
        assert kind_of(chat) == "chat", f"the HTTP span hangs under {chat.name!r}"
        assert chat.context.trace_id == caller.context.trace_id
        if chat.attributes.get("gen_ai.response.id") is not None:  # streamed responses carry none (Hermes's own id)
            assert chat.attributes["gen_ai.response.id"] == response_id
        chats.append(chat)
    assert len({c.context.span_id for c in chats}) == len(chats), "two requests under one chat"
    return chats


@pytest.mark.parametrize("threading_on", [False, True], ids=["httpx", "httpx+threading"])
@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_every_llm_request_hangs_under_its_own_chat(bench: HermesBench, streaming: bool, threading_on: bool) -> None:
    bench.instrument("invocation_id")
    agent = bench.agent(streaming=streaming)
    with contextlib.ExitStack() as stack:
        stack.enter_context(httpx_instrumentation(bench))
        if threading_on:
            stack.enter_context(threading_instrumentation())
        result = bench.call(agent, "cc", "[tools:1]")
        verdict = bench.verdict([bench.truth("cc", tools=1)], owners=[agent])
    assert result["final_response"] == "done cc"
    assert verdict.ok and verdict.requests_off_chat == 0, (verdict.summary(), verdict.notes)
    assert len(_requests_under_their_chats(bench, "cc")) == 2


def test_the_inline_request_of_a_cron_agent_runs_under_its_chat(bench: HermesBench) -> None:
    """A cron agent (``platform="cron"``) makes its request inline, on the calling thread: the chat span is current there."""
    bench.instrument("invocation_id")
    agent = bench.agent(fresh=True)
    agent.platform = "cron"
    with httpx_instrumentation(bench):
        result = bench.call(agent, "cron", "[tools:1]")
    assert result["final_response"] == "done cron"
    assert len(_requests_under_their_chats(bench, "cron")) == 2


@contextlib.contextmanager
def _spy_request_thread(agent: Any, seen: list[tuple[str, Any, str]]) -> Iterator[None]:
    """Record, where Hermes builds each request's client (in its request thread), the caller's ContextVar, the current
    span and the thread's name."""
    original = agent._create_request_openai_client

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((_marker.get(), trace.get_current_span(), threading.current_thread().name))
        return original(*args, **kwargs)

    agent._create_request_openai_client = spy
    try:
        yield
    finally:
        del agent._create_request_openai_client


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_only_opentelemetry_context_reaches_the_request_thread(bench: HermesBench, streaming: bool) -> None:
    """In Hermes's request thread the chat span is current, and no other context variable of the caller is visible:
    the thread runs in the context Hermes gives it (it sets ContextVars of its own in its workers)."""
    agent = bench.agent(streaming=streaming, fresh=True)
    token = _marker.set("caller")
    try:
        plain: list[tuple[str, Any, str]] = []
        with _spy_request_thread(agent, plain):
            bench.call(agent, "ctx0", "[tools:1]")  # uninstrumented
        bench.instrument("invocation_id")
        bench.reset()
        seen: list[tuple[str, Any, str]] = []
        with _spy_request_thread(agent, seen):
            bench.call(agent, "ctx1", "[tools:1]")
    finally:
        _marker.reset(token)
    assert [m for m, _, _ in seen] == [m for m, _, _ in plain] == ["unset", "unset"]
    assert all(name != threading.current_thread().name for _, _, name in seen), "the request ran in Hermes's thread"
    bench.provider.force_flush()
    chats = sorted((s for s in bench.exporter.get_finished_spans() if kind_of(s) == "chat"), key=lambda s: s.start_time)
    assert [span.get_span_context().span_id for _, span, _ in seen] == [c.context.span_id for c in chats]


def _our_attaches_off_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every attach our thread hook makes, by thread name (the calling thread's own attaches are not counted)."""
    caller = threading.get_ident()
    made: list[str] = []
    real_attach = hermes_wrappers._attach

    def counting_attach(context: Any) -> Any:
        if threading.get_ident() != caller:
            made.append(threading.current_thread().name)
        return real_attach(context)

    monkeypatch.setattr(hermes_wrappers, "_attach", counting_attach)
    return made


@pytest.mark.parametrize("order", ["threading first", "ours first", "ours alone"])
def test_the_threading_instrumentation_carries_the_context_alone(
    bench: HermesBench, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """Beside opentelemetry-instrumentation-threading (instrumented before or after ours), the request thread gets the
    chat's context once, from it; alone, ours attaches it once per request thread."""
    made = _our_attaches_off_the_calling_thread(monkeypatch)
    agent = bench.agent()
    with contextlib.ExitStack() as stack:
        if order == "threading first":
            stack.enter_context(threading_instrumentation())
        bench.instrument("invocation_id")
        if order == "ours first":
            stack.enter_context(threading_instrumentation())
        stack.enter_context(httpx_instrumentation(bench))
        bench.call(agent, "thr", "[tools:1]")
    assert len(_requests_under_their_chats(bench, "thr")) == 2
    assert len(made) == (2 if order == "ours alone" else 0), made


def _ours_on_thread_init(bench: HermesBench) -> bool:
    init = vars(threading.Thread)["__init__"]
    while isinstance(init, wrapt.FunctionWrapper):
        if bench.instrumentor._wrappers is not None and init._self_wrapper in bench.instrumentor._wrappers.callables:
            return True
        init = init.__wrapped__
    return False


def test_uninstrument_takes_the_thread_hook_out_in_any_order(bench: HermesBench) -> None:
    original = vars(threading.Thread)["__init__"]
    bench.instrument("invocation_id")
    assert _ours_on_thread_init(bench)
    with threading_instrumentation():  # wraps start and run, never __init__: its unwrap cannot peel ours
        bench.uninstrument()
        assert vars(threading.Thread)["__init__"] is original
        bench.instrument("contextvar")
        bench.instrument("invocation_id")  # re-instrumenting leaves one hook
        assert _ours_on_thread_init(bench)
        init = vars(threading.Thread)["__init__"]
        assert isinstance(init, wrapt.FunctionWrapper) and init.__wrapped__ is original
    bench.uninstrument()
    assert vars(threading.Thread)["__init__"] is original


def test_a_thread_built_outside_a_chat_is_not_touched(bench: HermesBench) -> None:
    bench.instrument("invocation_id")
    seen: list[Any] = []
    with bench.tracer.start_as_current_span("outside"):
        thread = threading.Thread(target=lambda: seen.append(trace.get_current_span()))
    assert "run" not in vars(thread)
    thread.start()
    thread.join()
    assert not seen[0].get_span_context().is_valid


def test_a_failing_carry_changes_nothing_the_agent_does(
    bench: HermesBench, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An attach that raises in the request thread (a broken runtime context): the request runs uncarried, the agent's
    result is the uninstrumented one, every span ends and nothing is left."""
    agent = bench.agent()
    expected = bench.call(agent, "fc0", "[tools:1]")["final_response"]
    caller = threading.get_ident()
    real_attach = hermes_wrappers._attach

    def attach(context: Any) -> Any:
        if threading.get_ident() != caller:
            raise RuntimeError("broken runtime context")
        return real_attach(context)

    monkeypatch.setattr(hermes_wrappers, "_attach", attach)
    store = bench.instrument("invocation_id")
    bench.reset()
    with caplog.at_level(logging.ERROR, logger="statebackends_hermes_agent"):
        result = bench.call(agent, "fc0", "[tools:1]")
        verdict = bench.verdict([bench.truth("fc0", tools=1)], owners=[agent])
    assert result["final_response"] == expected
    assert verdict.ok, verdict.summary()
    assert store.live() == 0
    assert sum("could not carry the chat context" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_a_keyboard_interrupt_making_the_chat_current_leaves_no_span_open(
    bench: HermesBench, monkeypatch: pytest.MonkeyPatch, streaming: bool
) -> None:
    """The one exception let through, raised where the chat span is made current (the runtime context's attach): it
    reaches the caller, after the chat span that had started is ended and the state released, as everywhere else."""
    agent = bench.agent(streaming=streaming)
    caller = threading.get_ident()
    real_attach = hermes_wrappers._attach

    def attach(context: Any) -> Any:
        if threading.get_ident() == caller and trace.get_current_span(context).is_recording():
            raise KeyboardInterrupt
        return real_attach(context)

    store = bench.instrument("invocation_id")
    bench.reset()
    monkeypatch.setattr(hermes_wrappers, "_attach", attach)
    with pytest.raises(KeyboardInterrupt):
        bench.call(agent, "kic", "[tools:1]")
    monkeypatch.setattr(hermes_wrappers, "_attach", real_attach)
    bench.provider.force_flush()
    chats = [s for s in bench.exporter.get_finished_spans() if kind_of(s) == "chat"]
    assert len(chats) == 1, "the chat that had started is ended"
    assert [s.name for s in bench.tracker.open_spans()] == []
    assert store.live() == 0


def test_an_abandoned_stream_worker_outlives_its_chat_harmlessly(
    bench: HermesBench, caplog: pytest.LogCaptureFixture
) -> None:
    """Streaming, interrupted while the fake LLM holds its answer: Hermes abandons the request thread, which still runs
    with the chat's context after the chat ended. Its request stays under that chat, the caller's context is given back
    exactly, and nothing fails when the worker finishes later (no detach error in any thread)."""
    bench.instrument("invocation_id")
    agent = bench.agent(streaming=True, fresh=True)

    def interrupt_once_asked() -> None:
        deadline = time.monotonic() + 20
        while not bench.server.log("abandon") and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        agent.interrupt()

    threading.Thread(target=interrupt_once_asked, daemon=True).start()
    with caplog.at_level(logging.WARNING), httpx_instrumentation(bench):
        with bench.tracer.start_as_current_span("call abandon") as caller:
            before = trace.get_current_span()
            result = agent.run_conversation("[conv:abandon] [delay_ms:1000] hello")
            after = trace.get_current_span()
        time.sleep(1.5)  # the abandoned worker gets its answer and returns
    assert result["interrupted"] is True
    assert before is after is caller
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower() or "carry" in r.getMessage()]
    (chat,) = _requests_under_their_chats(bench, "abandon")
    assert chat.status.status_code is StatusCode.ERROR and chat.attributes["error.type"] == "InterruptedError"
    assert bench.instrumentor.store.live() == 0


class _RunSetFirst(threading.Thread):
    """A thread whose ``run`` is an instance attribute set before ``Thread.__init__`` (which never touches it)."""

    def __init__(self, out: list[str]) -> None:
        self.out = out
        self.run = lambda: out.append("instance run")  # type: ignore[method-assign]
        super().__init__(daemon=True)

    def run(self) -> None:
        self.out.append("class run")


class _StaticRun(threading.Thread):
    """A thread whose class ``run`` is a staticmethod (its instance's ``run`` takes no argument)."""

    out: list[str] = []
    run = staticmethod(lambda: _StaticRun.out.append("static run"))  # type: ignore[assignment]


def _build_odd_threads(out: dict[str, Any]) -> None:
    """What code running in a chat's own thread may build: threads of unusual shapes, and one never started."""
    gc_was_enabled = gc.isenabled()
    gc.disable()  # only reference counting may free the thread below
    try:
        unstarted = threading.Thread(target=lambda: None)
        out["unstarted"] = weakref.ref(unstarted)
        del unstarted
    finally:
        if gc_was_enabled:
            gc.enable()
    runs: list[str] = []
    _StaticRun.out = runs
    failures: list[str] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: failures.append(repr(args.exc_value))
    try:
        for thread in (_RunSetFirst(runs), _StaticRun(daemon=True)):
            thread.start()
            thread.join()
    finally:
        threading.excepthook = previous_hook
    carried: list[Any] = []
    plain = threading.Thread(target=lambda: carried.append(trace.get_current_span()))
    plain.start()
    plain.join()
    out.update(runs=runs, failures=failures, carried=carried[0])


@pytest.mark.parametrize("instrumented", [False, True], ids=["plain", "instrumented"])
def test_threads_built_under_a_chat_run_as_they_would(bench: HermesBench, instrumented: bool) -> None:
    """Threads built by other code in a chat's thread (on Hermes 0.19 a cron agent makes its request there, so its client factory runs there):
    each runs what it would run uninstrumented (an instance ``run`` set before ``Thread.__init__``, a class ``run``
    that is a staticmethod), with the chat's context when instrumented, and a thread built there but never started is
    freed by reference counting (no cycle through its ``run`` attribute keeps it, and the chat's context, alive)."""
    if instrumented:
        bench.instrument("invocation_id")
    agent = bench.agent(fresh=True)
    agent.platform = "cron"
    original = agent._create_request_openai_client
    out: dict[str, Any] = {}

    def factory(*args: Any, **kwargs: Any) -> Any:
        if not out:
            out["in_chat_thread"] = threading.get_ident() == caller
            _build_odd_threads(out)
        return original(*args, **kwargs)

    agent._create_request_openai_client = factory
    caller = threading.get_ident()
    result = bench.call(agent, "odd", "[tools:1]")
    assert result["final_response"] == "done odd"
    assert out["runs"] == ["instance run", "static run"] and out["failures"] == [], out
    assert out["unstarted"]() is None, "a thread built under the chat, never started, is kept alive by a cycle"
    chats = sorted((s for s in bench.exporter.get_finished_spans() if kind_of(s) == "chat"), key=lambda s: s.start_time)
    if instrumented and out["in_chat_thread"]:
        assert out["carried"].get_span_context().span_id == chats[0].context.span_id
    elif instrumented:
        # Hermes before 0.19 builds a cron agent's client in its request thread, not in the chat's own thread: a thread
        # built there is not one the hook carries (as without the threading instrumentation), and its run is untouched
        assert not out["carried"].get_span_context().is_valid and len(chats) == 2
    else:
        assert not out["carried"].get_span_context().is_valid and chats == []
