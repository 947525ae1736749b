"""The state of one ``run_conversation`` call, kept in whichever ``StateStore`` was chosen."""

from __future__ import annotations

from typing import Any, Optional

from opentelemetry.context import Context
from opentelemetry.trace import Span


class InvocationState:
    """Everything the wrappers share between the methods of one agent invocation."""

    __slots__ = (
        "agent_span",
        "agent_ctx",
        "step_span",
        "step_ctx",
        "round",
        "llm_depth",
        "input_tokens",
        "output_tokens",
        "response_id",
        "response_model",
        "finish_reasons",
        "delegate_parent",
    )

    def __init__(self) -> None:
        self.agent_span: Optional[Span] = None
        self.agent_ctx: Optional[Context] = None
        self.step_span: Optional[Span] = None
        self.step_ctx: Optional[Context] = None
        self.round = 0
        self.llm_depth = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.response_id: Optional[str] = None
        self.response_model: Optional[str] = None
        self.finish_reasons: tuple[str, ...] = ()
        # context of the latest delegate_task tool span: parent of the subagents it starts
        self.delegate_parent: Optional[Context] = None

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"InvocationState(round={self.round}, in={self.input_tokens}, out={self.output_tokens})"


def usage_of(response: Any) -> tuple[int, int]:
    usage = getattr(response, "usage", None)
    if usage is None:
        return 0, 0
    return int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)


def finish_reasons_of(response: Any) -> tuple[str, ...]:
    return tuple(
        str(reason)
        for choice in (getattr(response, "choices", None) or ())
        if (reason := getattr(choice, "finish_reason", None))
    )


def asks_for_tools(response: Any) -> bool:
    for choice in getattr(response, "choices", None) or ():
        message = getattr(choice, "message", None)
        if getattr(message, "tool_calls", None):
            return True
    return False
