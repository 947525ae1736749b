"""The README's quick start, run as a user runs it.

The Python block under ``<!-- quickstart-code -->`` is run verbatim in a fresh process, before a real Hermes turn
against the fake LLM on 127.0.0.1, with ``OTEL_EXPORTER_OTLP_ENDPOINT`` naming an OTLP sink on 127.0.0.1 (the way
the block's comment says to point it): the turn's spans must arrive there, whole. The install lines under
``<!-- user-install -->`` and ``<!-- user-install-git -->`` are run by CI (``.ci/run``'s ``user_installs`` stage);
here they are only checked to be what that stage expects.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from statebackends_hermes_testbed.otlp import OTLPSink

README = Path(__file__).resolve().parents[2] / "README.md"
TIMEOUT = 300


def block_after(marker: str) -> str:
    """The fenced block right after the HTML comment ``<!-- marker -->`` in the README (without its fences)."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"^<!-- {re.escape(marker)} -->\n```[a-z]*\n(.*?)^```$", text, re.M | re.S)
    assert found, f"no block after <!-- {marker} --> in README.md"
    return found.group(1)


@pytest.fixture
def sink() -> Iterator[OTLPSink]:
    server = OTLPSink(traces_path="/v1/traces").start()
    yield server
    server.stop()


# After the README's block: one real turn with a tool, on the fake LLM, then the provider flushed and shut down.
TURN = textwrap.dedent(
    """
    from statebackends_hermes_testbed.apphost import offline

    with offline() as llm:
        from run_agent import AIAgent  # Hermes imported after instrument(), as most apps do
        from statebackends_hermes_testbed.hermes_harness import BENCH_TOOLSET, register_bench_tools

        register_bench_tools()  # sb_echo, the tool the fake LLM's [tools:N] directive calls
        agent = AIAgent(base_url=llm.base_url, api_key="sk-local", provider="custom", model="fake-model",
                        quiet_mode=True, skip_memory=True, skip_context_files=True, max_iterations=8,
                        enabled_toolsets=[BENCH_TOOLSET], save_trajectories=False)
        result = agent.run_conversation("[conv:readme] [tools:1] hello")
        print("ANSWER", result["final_response"])
    provider.shutdown()
    """
)


def test_the_quick_start_code_exports_each_turn_whole(tmp_path: Path, sink: OTLPSink) -> None:
    code = block_after("quickstart-code") + TURN
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STATEBACKENDS_", "HERMES"))}
    env.update(HOME=str(tmp_path), OTEL_EXPORTER_OTLP_ENDPOINT=sink.base_url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ANSWER done readme" in result.stdout, result.stdout[-2000:]
    spans = sink.readable_spans()
    names = sorted(span.name for span in spans)
    assert names == sorted(["invoke_agent hermes", "react step", "react step", "chat fake-model", "chat fake-model",
                            "execute_tool sb_echo"]), names
    (agent,) = [s for s in spans if s.name == "invoke_agent hermes"]
    assert {s.context.trace_id for s in spans} == {agent.context.trace_id}  # one trace for the turn
    assert all(s.end_time for s in spans)
    assert agent.attributes["gen_ai.usage.input_tokens"] == 107 + 207  # what the fake LLM's two responses reported
    # The default: no content anywhere.
    assert not any(key.endswith((".messages", ".arguments", ".result")) for s in spans for key in s.attributes)


def test_the_install_lines_are_the_ones_ci_runs() -> None:
    assert block_after("user-install").strip() == "pip install ./ ./instrumentation/hermes-agent"
    git_line = block_after("user-install-git").strip()
    assert git_line.startswith("pip install ") and "$REPO" in git_line
    assert "#subdirectory=instrumentation/hermes-agent" in git_line
