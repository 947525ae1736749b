"""An async-native stub agent that drives the instrumentation's REAL wrappers on one event loop.

Hermes's ``AIAgent`` is synchronous, so it cannot show what happens when several
invocations are interleaved as asyncio tasks on ONE thread. :class:`AsyncStubAgent`
is the smallest agent that can: its LLM turn and its tools ``await`` (so the loop
switches tasks between them), and every step goes through the same methods of the
instrumentor's live :class:`statebackends_hermes_agent.wrappers.HermesWrappers`
that the ``wrapt`` wrappers call around Hermes (``_open_invocation``,
``_start_chat``/``_end_chat``, ``_start_tool``/``_end_tool``, the end of the
tool round as ``execute_tool_calls`` does it, ``_close_invocation``). The state
therefore lives in the real store under test.

The "LLM" is :class:`statebackends_hermes_testbed.fakellm.Script` itself (pass the bench server's
script so ``HermesBench.truth`` sees the calls): replies are real
``openai.types.chat.ChatCompletion`` objects with usage, response ids
``chatcmpl-TAG-k`` and tool call ids ``call_TAG_i``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, Mapping, Optional

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
    """An async agent shaped like Hermes's ``AIAgent`` as far as the wrappers look (``model``, ``provider``, ``session_id``).

    One instance is meant to be SHARED by the concurrent tasks, as one ``AIAgent`` is
    shared by Hermes's callers: it is the ``owner`` the store sees.
    ``wrappers`` is read at call time from ``get_wrappers`` (the instrumentor's
    live ``_wrappers``), so re-instrumenting with another backend is picked up.
    """

    model = MODEL
    provider = "custom"

    def __init__(
        self,
        get_wrappers: Callable[[], Any],
        script: Script,
        *,
        tools: Optional[Mapping[str, ToolFn]] = None,
        session_id: str = "stub-session",
    ) -> None:
        self._get_wrappers = get_wrappers
        self.script = script
        self.tools: dict[str, ToolFn] = {"sb_echo": echo_tool, **dict(tools or {})}
        self.session_id = session_id

    async def run_conversation(self, user_message: str, task_id: Optional[str] = None) -> dict[str, Any]:
        """One invocation: LLM turn, tools, LLM turn ... until a final answer, yielding between every step."""
        w = self._get_wrappers()
        kwargs = {"task_id": task_id} if task_id else {}
        # As HermesWrappers._invoke_agent does around AIAgent.run_conversation.
        _, call_kwargs, opened = w._open_invocation(self, (user_message,), kwargs)
        task_id = call_kwargs["task_id"]
        try:
            result = await self._loop(w, user_message, task_id)
        except BaseException as exc:
            w._close_invocation(opened, error=exc)
            raise
        w._close_invocation(opened, result=result)
        return result

    async def _loop(self, w: Any, user_message: str, task_id: str) -> dict[str, Any]:
        messages: list[dict[str, Any]] = [{"role": "user", "content": user_message}]
        while True:
            response = await self._chat(w, {"model": self.model, "messages": list(messages)})
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
            await self._execute_tool_calls(w, message.tool_calls, messages, task_id)

    async def _chat(self, w: Any, api_kwargs: dict[str, Any]) -> Any:
        """As ``HermesWrappers._chat`` does around ``AIAgent._interruptible_api_call`` (non-streaming)."""
        from openai.types.chat import ChatCompletion

        state, span, started, _, labels = w._start_chat(self, (api_kwargs,), {}, False)
        try:
            reply = self.script.plan(api_kwargs)  # the request reaches the "server"
            await asyncio.sleep(reply.delay_ms / 1000.0 if reply.delay_ms else 0)  # the round trip
            if reply.error is not None:
                raise StubLLMError(reply.error)
            response = ChatCompletion.model_validate(reply.completion())
        except BaseException as exc:
            w._end_chat(state, span, started, labels, None, exc)
            raise
        w._end_chat(state, span, started, labels, response, None)
        return response

    async def _execute_tool_calls(self, w: Any, tool_calls: Any, messages: list, task_id: str) -> None:
        """As ``HermesWrappers.execute_tool_calls`` + ``handle_function_call`` do around Hermes's tool round."""
        error: Optional[BaseException] = None
        try:
            for tc in tool_calls:
                name = tc.function.name
                args = json.loads(tc.function.arguments or "{}")
                span, token = w._start_tool(self, name, args, task_id, tc.id)
                try:
                    tool = self.tools.get(name)
                    if tool is None:
                        raise KeyError(f"unknown tool {name!r}")
                    result = await tool(name, args)
                except BaseException as exc:
                    w._end_tool(span, token, None, exc)
                    raise
                w._end_tool(span, token, result, None)
                messages.append({"role": "tool", "tool_call_id": tc.id, "content": result})
        except BaseException as exc:
            error = exc
            raise
        finally:
            w.end_tool_round(self, task_id, error)  # what HermesWrappers.execute_tool_calls does
