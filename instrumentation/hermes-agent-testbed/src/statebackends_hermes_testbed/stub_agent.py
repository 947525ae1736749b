"""An async-native stub agent that drives the instrumentation's PUBLIC lifecycle on one event loop.

Hermes's ``AIAgent`` is synchronous, so it cannot show what happens when several
invocations are interleaved as asyncio tasks on ONE thread. :class:`AsyncStubAgent`
is the smallest agent that can: its LLM turn and its tools ``await`` (so the loop
switches tasks between them), and every step goes through the same public
:class:`statebackends_hermes_agent.lifecycle.HermesTelemetry` methods that the
``wrapt`` wrappers call around Hermes (``start_invocation`` ... ``stop``/``fail``,
``start_chat``, ``start_tool``, ``end_tool_round``). The state therefore lives in
the real store under test.

The "LLM" is :class:`statebackends_hermes_testbed.fakellm.Script` itself (pass the bench server's
script so ``HermesBench.truth`` sees the calls): replies are real
``openai.types.chat.ChatCompletion`` objects with usage, response ids
``chatcmpl-TAG-k`` and tool call ids ``call_TAG_i``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, Mapping, Optional

from statebackends_hermes_agent.lifecycle import HermesTelemetry

from .fakellm import Script
from .hermes_harness import MODEL


class StubLLMError(RuntimeError):
    """What the stub's LLM turn raises for ``[llm_error]``."""


ToolFn = Callable[[str, Mapping[str, Any]], Awaitable[str]]


async def echo_tool(name: str, args: Mapping[str, Any]) -> str:
    """``sb_echo``: yield to the loop (``sleep_ms`` if given), return ``args["text"]``."""
    sleep_ms = args.get("sleep_ms")
    await asyncio.sleep(sleep_ms / 1000.0 if isinstance(sleep_ms, (int, float)) and sleep_ms > 0 else 0)
    return str(args.get("text", ""))


class AsyncStubAgent:
    """An async agent shaped like Hermes's ``AIAgent`` as far as the telemetry looks (``model``, ``provider``, ``session_id``).

    One instance is meant to be SHARED by the concurrent tasks, as one ``AIAgent`` is
    shared by Hermes's callers: it is the ``owner`` the store sees.
    The telemetry is read at call time from ``get_telemetry`` (e.g. the instrumentor's
    live ``telemetry``), so re-instrumenting with another backend is picked up; when it
    returns None the agent runs uninstrumented. Every step is a ``with`` block of the
    public lifecycle, which ends it with ``fail`` when the block raises.
    """

    model = MODEL
    provider = "custom"

    def __init__(
        self,
        get_telemetry: Callable[[], Optional[HermesTelemetry]],
        script: Script,
        *,
        tools: Optional[Mapping[str, ToolFn]] = None,
        session_id: str = "stub-session",
    ) -> None:
        self._get_telemetry = get_telemetry
        self.script = script
        self.tools: dict[str, ToolFn] = {"sb_echo": echo_tool, **dict(tools or {})}
        self.session_id = session_id

    async def run_conversation(self, user_message: str, task_id: Optional[str] = None) -> dict[str, Any]:
        """One invocation: LLM turn, tools, LLM turn ... until a final answer, yielding between every step."""
        t = self._get_telemetry()
        if t is None:
            return await self._loop(None, user_message, task_id or "stub-task")
        with t.start_invocation(self, task_id, user_message=user_message) as invocation:
            invocation.result = await self._loop(t, user_message, invocation.task_id)
        return invocation.result

    async def _loop(self, t: Optional[HermesTelemetry], user_message: str, task_id: str) -> dict[str, Any]:
        messages: list[dict[str, Any]] = [{"role": "user", "content": user_message}]
        while True:
            response = await self._chat(t, {"model": self.model, "messages": list(messages)})
            message = response.choices[0].message
            if not message.tool_calls:
                return {"final_response": message.content, "completed": True, "messages": messages}
            messages.append(
                {
                    "role": "assistant",
                    "content": message.content,
                    "tool_calls": [tc.model_dump() for tc in message.tool_calls],
                }
            )
            await self._execute_tool_calls(t, message.tool_calls, messages, task_id)

    async def _llm(self, api_kwargs: dict[str, Any]) -> Any:
        from openai.types.chat import ChatCompletion

        reply = self.script.plan(api_kwargs)  # the request reaches the "server"
        await asyncio.sleep(reply.delay_ms / 1000.0 if reply.delay_ms else 0)  # the round trip
        if reply.error is not None:
            raise StubLLMError(reply.error)
        return ChatCompletion.model_validate(reply.completion())

    async def _chat(self, t: Optional[HermesTelemetry], api_kwargs: dict[str, Any]) -> Any:
        """As the chat wrapper does around ``AIAgent._interruptible_api_call`` (non-streaming)."""
        if t is None:
            return await self._llm(api_kwargs)
        with t.start_chat(self, api_kwargs) as call:
            call.result = await self._llm(api_kwargs)
        return call.result

    async def _run_tool(self, name: str, args: Mapping[str, Any]) -> str:
        tool = self.tools.get(name)
        if tool is None:
            raise KeyError(f"unknown tool {name!r}")
        return await tool(name, args)

    async def _execute_tool_calls(self, t: Optional[HermesTelemetry], tool_calls: Any, messages: list, task_id: str) -> None:
        """As the tool-round and ``handle_function_call`` wrappers do around Hermes's tool round."""
        error: Optional[BaseException] = None
        try:
            for tc in tool_calls:
                name = tc.function.name
                args = json.loads(tc.function.arguments or "{}")
                if t is None:
                    result = await self._run_tool(name, args)
                else:
                    with t.start_tool(self, name, args, task_id=task_id, tool_call_id=tc.id) as call:
                        call.result = result = await self._run_tool(name, args)
                messages.append({"role": "tool", "tool_call_id": tc.id, "content": result})
        except BaseException as exc:
            error = exc
            raise
        finally:
            if t is not None:
                t.end_tool_round(self, task_id, error)
