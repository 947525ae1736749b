"""The state of one ``run_conversation`` call, kept in whichever ``StateStore`` was chosen."""

from __future__ import annotations

from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span


class InvocationState:
    """Everything the wrappers share between the methods of one agent invocation."""

    __slots__ = (
        "agent_ctx",
        "agent_span",
        "delegate_parent",
        "finish_reasons",
        "input_tokens",
        "llm_depth",
        "output_tokens",
        "response_id",
        "response_model",
        "round",
        "step_ctx",
        "step_span",
    )

    def __init__(self) -> None:
        self.agent_span: Span | None = None
        self.agent_ctx: Context | None = None
        self.step_span: Span | None = None
        self.step_ctx: Context | None = None
        self.round = 0
        self.llm_depth = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reasons: tuple[str, ...] = ()
        # context of the latest delegate_task tool span: parent of the subagents it starts
        self.delegate_parent: Context | None = None

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"InvocationState(round={self.round}, in={self.input_tokens}, out={self.output_tokens})"


def read_response(response: Any) -> tuple[int, int, tuple[str, ...], bool]:
    """(input tokens, output tokens, finish reasons, whether it asks for tools) of a chat response, in one pass.

    Never raises: what cannot be read counts as none (no tokens, no reasons, no tool request).
    """
    try:  # the OpenAI SDK's ChatCompletion with one choice (what Hermes asks for): plain attribute reads
        usage = response.usage
        choices = response.choices
        if usage is not None and type(choices) is list and len(choices) == 1:
            choice = choices[0]
            reason = choice.finish_reason
            return (
                int(usage.prompt_tokens or 0),
                int(usage.completion_tokens or 0),
                (str(reason),) if reason else (),
                bool(choice.message.tool_calls),
            )
    except Exception:  # noqa: BLE001 - anything odd is read the general way
        pass
    try:
        return _read_any_response(response)
    except Exception:  # noqa: BLE001 - a property that raises, a count that is not a number
        return 0, 0, (), False


def _count(value: Any) -> int:
    """A token count as an int (0 when missing or not a number)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def _read_any_response(response: Any) -> tuple[int, int, tuple[str, ...], bool]:
    """:func:`read_response` for anything shaped loosely like a ChatCompletion (missing parts count as none)."""
    usage = getattr(response, "usage", None)
    if usage is not None:
        input_tokens = _count(getattr(usage, "prompt_tokens", 0))
        output_tokens = _count(getattr(usage, "completion_tokens", 0))
    else:
        input_tokens = output_tokens = 0
    choices = getattr(response, "choices", None)
    if not choices:
        return input_tokens, output_tokens, (), False
    reasons: list[str] = []
    wants_tools = False
    for choice in choices:
        reason = getattr(choice, "finish_reason", None)
        if reason:
            reasons.append(str(reason))
        if not wants_tools and getattr(getattr(choice, "message", None), "tool_calls", None):
            wants_tools = True
    return input_tokens, output_tokens, tuple(reasons), wants_tools
