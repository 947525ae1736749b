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
