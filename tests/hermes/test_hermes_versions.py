"""The installed hermes-agent has what the wrappers rely on, where they read it, and ``instruments`` admits exactly
the releases that were read. CI runs this module on the oldest release admitted (0.13.0) and on 0.19.0."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from packaging.requirements import Requirement

from statebackends_hermes_agent import _WRAPPED
from statebackends_hermes_agent.package import _instruments

READ = ("0.13.0", "0.14.0", "0.15.0", "0.15.1", "0.15.2", "0.16.0", "0.17.0", "0.18.0", "0.18.1", "0.18.2", "0.19.0")
"""Every hermes-agent release on PyPI from 0.13.0 on, each read for the methods and arguments below."""


def test_instruments_admits_the_releases_read_and_nothing_else() -> None:
    (requirement,) = [Requirement(r) for r in _instruments if Requirement(r).name == "hermes-agent"]
    assert [v for v in READ if v in requirement.specifier] == list(READ)
    assert not any(v in requirement.specifier for v in ("0.12.9", "0.20.0", "1.0.0"))


def _target(module: str, path: str) -> Any:
    import importlib

    owner: Any = importlib.import_module(module)
    for part in path.split("."):
        owner = getattr(owner, part)
    return inspect.unwrap(owner)


def _positional(module: str, path: str) -> list[str]:
    return [p.name for p in inspect.signature(_target(module, path)).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize(("module", "path"), [(m, p) for m, p, _ in _WRAPPED])
def test_every_wrapped_method_exists(module: str, path: str) -> None:
    assert callable(_target(module, path))


@pytest.mark.parametrize(
    ("module", "path", "prefix"),
    [
        # args[3] / kwargs["task_id"] (wrappers.run_conversation)
        ("run_agent", "AIAgent.run_conversation", ["self", "user_message", "system_message", "conversation_history", "task_id"]),
        # args[0] / kwargs["api_kwargs"]
        ("run_agent", "AIAgent._interruptible_api_call", ["self", "api_kwargs"]),
        ("run_agent", "AIAgent._interruptible_streaming_api_call", ["self", "api_kwargs"]),
        # args[2] / kwargs["effective_task_id"]
        ("run_agent", "AIAgent._execute_tool_calls", ["self", "assistant_message", "messages", "effective_task_id"]),
        # args[3] / kwargs["tool_call_id"]
        ("run_agent", "AIAgent._invoke_tool", ["self", "function_name", "function_args", "effective_task_id", "tool_call_id"]),
        ("run_agent", "AIAgent._dispatch_delegate_task", ["self", "function_args"]),
        # args[0..3] / kwargs of the same names
        ("run_agent", "handle_function_call", ["function_name", "function_args", "task_id", "tool_call_id"]),
    ],
)
def test_the_arguments_the_wrappers_read_are_where_they_read_them(module: str, path: str, prefix: list[str]) -> None:
    assert _positional(module, path)[: len(prefix)] == prefix


def test_the_streaming_call_takes_on_first_delta_by_keyword() -> None:
    parameter = inspect.signature(_target("run_agent", "AIAgent._interruptible_streaming_api_call")).parameters["on_first_delta"]
    assert parameter.kind is parameter.KEYWORD_ONLY
