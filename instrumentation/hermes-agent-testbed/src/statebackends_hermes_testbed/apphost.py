"""What a small Hermes service needs around it that Hermes has no public switch for (used by docs/examples/hermes-app).

* :func:`offline` - run against the scripted fake LLM: a throw-away ``HERMES_HOME`` (made before Hermes is
  first imported, since Hermes caches paths under it at import time) and the fake LLM on 127.0.0.1.
* :func:`shareable` - let one ``AIAgent`` serve overlapping turns (streaming off; see there why).
* :func:`wait_for_background_work` - wait for the subagents a top-level ``delegate_task`` left running.

Each is a name for one Hermes-internal step, so that an application's own code uses Hermes's public API only.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Any, Iterator

from .fakellm import FakeLLMServer, Script
from .hermes_harness import API_KEY, MODEL, hermes_home, wait_for_delegations

__all__ = ["API_KEY", "MODEL", "offline", "shareable", "wait_for_background_work"]


@contextlib.contextmanager
def offline(*, port: int = 0) -> Iterator[FakeLLMServer]:
    """A throw-away ``HOME``/``HERMES_HOME`` and the strict scripted fake LLM on ``127.0.0.1:port`` while inside.

    Enter it before the first import of Hermes in the process. The server's ``base_url`` is the endpoint; any API
    key and the model :data:`MODEL` do. A request with a bad directive is answered HTTP 400 naming it.
    """
    with tempfile.TemporaryDirectory(prefix="hermes-app-") as folder, hermes_home(folder), \
            FakeLLMServer(script=Script(strict=True), port=port) as server:
        yield server


def shareable(agent: Any) -> Any:
    """Let ``agent`` serve overlapping turns from several threads or tasks; returns it.

    Hermes streams every LLM call by default, and overlapping streamed turns on one ``AIAgent`` interfere inside
    Hermes (0.18 and 0.19: one stream supersedes the other, "Streaming attempt superseded by a newer stream",
    which Hermes then retries, or merges). Without streaming, overlapping turns on one agent complete normally.
    Hermes has no public switch for it (hermes-agent 0.13 to 0.19); this sets the attribute its own fallbacks
    set when a provider cannot stream.
    """
    agent._disable_streaming = True
    return agent


def wait_for_background_work(timeout: float = 60.0) -> bool:
    """Wait until no subagent of a top-level ``delegate_task`` is running; True when none is left.

    From hermes-agent 0.17 a top-level ``delegate_task`` returns at once and its subagent runs in the background,
    often after the turn that started it returned. A service that keeps running need not wait; a script that is
    about to exit (and flush its spans) should.
    """
    return wait_for_delegations(timeout=timeout)
