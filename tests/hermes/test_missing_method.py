"""A Hermes release without one of the wrapped methods: one WARNING naming the release and the method, no traceback,
and every other method is still wrapped (what the missing one does runs untraced)."""

from __future__ import annotations

import importlib.metadata
import logging
import types
from typing import Any

import pytest

import statebackends_hermes_agent as instrumentation
from statebackends_hermes_agent import HermesAgentInstrumentor


def _fake_run_agent() -> types.ModuleType:
    """A ``run_agent`` as a release might have it: every wrapped method but ``_dispatch_delegate_task``."""
    module = types.ModuleType("run_agent")

    class AIAgent:
        def run_conversation(self, user_message: str, system_message: Any = None, conversation_history: Any = None,
                             task_id: Any = None) -> dict:
            return {"final_response": "hi"}

        def _interruptible_api_call(self, api_kwargs: dict) -> Any:
            return None

        def _interruptible_streaming_api_call(self, api_kwargs: dict, *, on_first_delta: Any = None) -> Any:
            return None

        def _execute_tool_calls(self, assistant_message: Any, messages: list, effective_task_id: str,
                                api_call_count: int = 0) -> None:
            return None

        def _invoke_tool(self, function_name: str, function_args: dict, effective_task_id: str,
                         tool_call_id: Any = None) -> str:
            return ""

    def handle_function_call(function_name: str, function_args: dict, task_id: Any = None) -> str:
        return ""

    module.AIAgent = AIAgent  # type: ignore[attr-defined]
    module.handle_function_call = handle_function_call  # type: ignore[attr-defined]
    return module


def test_a_missing_method_is_one_warning_and_the_rest_is_wrapped(caplog: pytest.LogCaptureFixture) -> None:
    instrumentor = HermesAgentInstrumentor()
    instrumentor.instrument()
    try:
        fake = _fake_run_agent()
        hook = instrumentation._WrapOnImport("run_agent", instrumentor._wrappers)
        with caplog.at_level(logging.DEBUG, logger="statebackends_hermes_agent"):
            hook(fake)
    finally:
        instrumentor.uninstrument()
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    (record,) = records
    assert record.levelno == logging.WARNING and not record.exc_info
    message = record.getMessage()
    release = importlib.metadata.version("hermes-agent")  # the installed release is named (was: "(version unknown)")
    assert f"hermes-agent {release} has no run_agent.AIAgent._dispatch_delegate_task, so what it does runs untraced" \
        in message
    assert "hermes-agent >= 0.13.0, < 0.20" in message
    for name in ("run_conversation", "_interruptible_api_call", "_interruptible_streaming_api_call",
                 "_execute_tool_calls", "_invoke_tool"):
        assert hasattr(vars(fake.AIAgent)[name], "__wrapped__"), name
    assert hasattr(fake.handle_function_call, "__wrapped__")
    assert fake.AIAgent().run_conversation("hello") == {"final_response": "hi"}
