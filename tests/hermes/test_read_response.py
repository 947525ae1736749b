"""``read_response``: the fast path for Hermes's one-choice ``ChatCompletion`` and the general path agree."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from statebackends_hermes_agent.state import _read_any_response, read_response


def _completion(choices: list[dict], usage: dict | None = None) -> ChatCompletion:
    return ChatCompletion.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": choices, "usage": usage,
    })


def _choice(index: int, reason: str, tool_calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": None if tool_calls else "hi"}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "finish_reason": reason, "message": message}


_TOOL = [{"id": "call_1", "type": "function", "function": {"name": "t", "arguments": "{}"}}]
_USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}

CASES = {
    "one choice, final": (_completion([_choice(0, "stop")], _USAGE), (7, 3, ("stop",), False)),
    "one choice, tools": (_completion([_choice(0, "tool_calls", _TOOL)], _USAGE), (7, 3, ("tool_calls",), True)),
    "no usage": (_completion([_choice(0, "stop")]), (0, 0, ("stop",), False)),
    "two choices": (
        _completion([_choice(0, "stop"), _choice(1, "tool_calls", _TOOL)], _USAGE), (7, 3, ("stop", "tool_calls"), True)
    ),
    "no choices": (_completion([], _USAGE), (7, 3, (), False)),
    "duck-typed, partial": (
        SimpleNamespace(usage=SimpleNamespace(prompt_tokens=None), choices=[SimpleNamespace(finish_reason="length")]),
        (0, 0, ("length",), False),
    ),
    "not a response": (object(), (0, 0, (), False)),
    "choices in a dict": (
        SimpleNamespace(usage=SimpleNamespace(prompt_tokens=1, completion_tokens=2),
                        choices={"a": SimpleNamespace(finish_reason="stop")}),
        (1, 2, (), False),  # iterating a dict gives its keys: no choice object, nothing read
    ),
    "counts that are not numbers": (
        SimpleNamespace(usage=SimpleNamespace(prompt_tokens="abc", completion_tokens=float("inf")), choices=[]),
        (0, 0, (), False),
    ),
    "None": (None, (0, 0, (), False)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_read_response(case: str) -> None:
    response, expected = CASES[case]
    assert read_response(response) == expected
    assert _read_any_response(response) == expected  # the fast path answers exactly what the general one does


class _Raising:
    @property
    def usage(self) -> Any:
        raise RuntimeError("a property that raises")


def test_read_response_never_raises() -> None:
    assert read_response(_Raising()) == (0, 0, (), False)


def _turn_spans(responses: list[Any]) -> tuple[Any, list[Any]]:
    """One turn through the public lifecycle, a chat per response: (the store, the finished spans)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from statebackends_hermes_agent.config import resolve_store
    from statebackends_hermes_agent.lifecycle import HermesTelemetry
    from statebackends_hermes_agent.state import InvocationState

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = HermesTelemetry(provider.get_tracer("t"), resolve_store("invocation_id", InvocationState))
    agent = SimpleNamespace(provider="custom", model="m", base_url="http://127.0.0.1:1/v1", session_id="s")
    invocation = telemetry.start_invocation(agent)
    for response in responses:
        telemetry.start_chat(agent, {"model": "m"}).stop(response)
    invocation.stop({"final_response": "hi"})
    return telemetry.store, list(exporter.get_finished_spans())


def _recorded_response_ids(responses: list[Any]) -> tuple[list[Any], Any]:
    """The ``gen_ai.response.id`` of a chat span per response, and the invoke_agent span's, through the lifecycle."""
    _, spans = _turn_spans(responses)
    chats = [s.attributes.get("gen_ai.response.id") for s in spans if s.name.startswith("chat ")]
    (agent_span,) = [s for s in spans if s.name.startswith("invoke_agent")]
    return chats, agent_span.attributes.get("gen_ai.response.id")


def _streamed(response_id: str) -> SimpleNamespace:
    """Shaped as Hermes rebuilds a streamed response (``agent.chat_completion_helpers``)."""
    choice = SimpleNamespace(index=0, finish_reason="stop", message=SimpleNamespace(content="hi", tool_calls=None))
    return SimpleNamespace(id=response_id, model="m", choices=[choice], usage=None)


def test_ids_hermes_makes_for_streamed_responses_are_not_recorded() -> None:
    """``stream-<uuid4>`` and the partial-stream stub's id on Hermes's rebuilt response are not the provider's: no
    ``gen_ai.response.id``, on the chat or on invoke_agent (the last response's); a provider id is kept, even one
    spelled ``stream-...`` when it comes in a real ``ChatCompletion``."""
    provider_streamish = _completion([_choice(0, "stop")], _USAGE).model_copy(update={"id": "stream-from-provider"})
    chats, last = _recorded_response_ids([
        _completion([_choice(0, "tool_calls", _TOOL)], _USAGE),
        _streamed("stream-0b6f6e52-8e2c-4b55-b3a4-3c8f1d0f9a11"),
        _streamed("partial-stream-stub"),
        _streamed("chatcmpl-rebuilt-by-someone-else"),
        provider_streamish,
    ])
    assert chats == ["chatcmpl-1", None, None, "chatcmpl-rebuilt-by-someone-else", "stream-from-provider"]
    assert last == "stream-from-provider"
    chats, last = _recorded_response_ids([_completion([_choice(0, "tool_calls", _TOOL)], _USAGE), _streamed("stream-x")])
    assert chats == ["chatcmpl-1", None] and last is None, "the last response had no provider id: no stale one"


def test_ids_hermes_makes_up_for_gemini_responses_are_not_recorded() -> None:
    """Hermes's native Gemini client (``agent.gemini_native_adapter``, used for provider ``gemini`` on Google's
    endpoint) drops the API's ``responseId`` and answers with a ``SimpleNamespace`` whose id it makes up
    (``chatcmpl-`` and 12 hex digits, new for every response): not the provider's, not recorded; a real
    ``ChatCompletion`` with the same spelling keeps its id."""
    from agent.gemini_native_adapter import _empty_response, translate_gemini_response

    translated = translate_gemini_response(
        {
            "responseId": "the-api-s-own-id",
            "candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2},
        },
        "gemini-2.5-flash",
    )
    assert type(translated) is SimpleNamespace and translated.id.startswith("chatcmpl-"), "Hermes's shape"
    real = _completion([_choice(0, "stop")], _USAGE).model_copy(update={"id": "chatcmpl-0123456789ab"})
    chats, last = _recorded_response_ids([translated, _empty_response("gemini-2.5-flash"), real])
    assert chats == [None, None, "chatcmpl-0123456789ab"] and last == "chatcmpl-0123456789ab"
    chats, last = _recorded_response_ids([_completion([_choice(0, "stop")], _USAGE), translated])
    assert chats == ["chatcmpl-1", None] and last is None


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("an id whose __str__ raises")


class _Untestable:
    def __bool__(self) -> bool:
        raise RuntimeError("an id whose __bool__ raises")


def test_an_odd_response_id_costs_the_chat_nothing_else() -> None:
    """An id that cannot be read as text records no ``gen_ai.response.id``, and the chat keeps its tokens, its
    finish reason and the end of its react step; bytes are decoded, a number is written as text."""
    for odd, expected in ((_Unprintable(), None), (_Untestable(), None), (b"resp-1", "resp-1"), (42, "42")):
        store, finished = _turn_spans([_completion([_choice(0, "stop")], _USAGE).model_copy(update={"id": odd})])
        spans = {s.name.split()[0]: s for s in finished}
        chat, step, turn = spans["chat"], spans["react"], spans["invoke_agent"]
        assert chat.attributes.get("gen_ai.response.id") == expected, type(odd)
        assert chat.attributes["gen_ai.usage.input_tokens"] == 7 and chat.attributes["gen_ai.response.finish_reasons"] == ("stop",)
        assert step.attributes["hermes.react.finish_reason"] == "stop"
        assert turn.attributes["gen_ai.usage.input_tokens"] == 7 and turn.attributes.get("gen_ai.response.id") == expected
        assert store.live() == 0
