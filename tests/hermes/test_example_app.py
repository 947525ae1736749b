"""docs/examples/hermes-app: the example service, run as a user runs it, and the traces it exports.

Each run is the real ``app.py`` in a subprocess (the real hermes-agent, one shared agent, four overlapping turns,
Hermes's tool pool, one ``delegate_task``), exporting with OTLP/HTTP to a sink on 127.0.0.1; the received spans
are judged by the testbed's judge, each question's ``ask <session>`` span standing for the caller span.
"""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from statebackends_hermes_testbed.driver import truth_of
from statebackends_hermes_testbed.fakellm import FakeLLMServer, Script
from statebackends_hermes_testbed.otlp import OTLPSink
from statebackends_hermes_testbed.traces import CALLER_PREFIX, CallTruth, judge

APP = Path(__file__).resolve().parents[2] / "docs" / "examples" / "hermes-app" / "app.py"
NOTES = APP.parent / "notes"
TIMEOUT = 300


@pytest.fixture
def sink() -> Iterator[OTLPSink]:
    server = OTLPSink(traces_path="/v1/traces").start()
    yield server
    server.stop()


def run_app(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python app.py ARGS`` with a private HOME, no HERMES_APP_* / OTEL_* of this process, and ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HERMES", "OTEL_", "STATEBACKENDS_"))}
    clean.update(HOME=str(tmp_path), HERMES_HOME=str(tmp_path / ".hermes"), **env)
    return subprocess.run([sys.executable, str(APP), *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=clean, cwd=tmp_path)


def exported(sink: OTLPSink) -> list[Any]:
    """The spans the app exported, its ``ask <session>`` spans renamed as the judge's caller spans."""
    spans = sink.readable_spans()
    for span in spans:
        if span.name.startswith("ask "):
            span._name = CALLER_PREFIX + span.name[len("ask "):]
    return spans


def scripted(tag: str, *, chats: int, tools: int = 0, children: tuple[CallTruth, ...] = ()) -> CallTruth:
    """The truth of a call to the fake LLM: its k-th response reports 100k+7 prompt and 10k+3 completion tokens."""
    return CallTruth(tag=tag, steps=chats, chats=chats, tools=tools, children=children,
                     input_tokens=sum(100 * k + 7 for k in range(1, chats + 1)),
                     output_tokens=sum(10 * k + 3 for k in range(1, chats + 1)))


def test_one_command_runs_it_offline_with_true_traces(tmp_path: Path, sink: OTLPSink) -> None:
    result = run_app(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=sink.base_url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[:4] == ["alice: done alice", "bob: done bob", "carol: done carol", "dave: done dave"]
    assert "ask bob\n    invoke_agent hermes\n" in result.stdout  # the printed span trees
    spans = exported(sink)
    calls = [
        scripted("alice", chats=2, tools=2),  # two read_file calls in one batch: Hermes's tool pool
        scripted("bob", chats=2, tools=1, children=(scripted("bob-subagent", chats=1),)),  # delegate_task
        scripted("carol", chats=1),
        scripted("dave", chats=2, tools=1),
    ]
    verdict = judge(spans, calls)
    assert verdict.ok, verdict.as_dict()
    tools = sorted(s.attributes.get("gen_ai.tool.name") for s in spans if s.name.startswith("execute_tool"))
    assert tools == ["delegate_task", "read_file", "read_file", "read_file"]
    assert len({s.context.trace_id for s in spans}) == 4  # one trace per question, the subagent in bob's


def test_the_same_app_against_an_endpoint_named_in_the_environment(tmp_path: Path, sink: OTLPSink) -> None:
    questions = [f"[conv:s1] [files:{NOTES / 'launch.md'},{NOTES / 'pricing.md'}] hi",
                 "[conv:s2] [delegate:s2-kid] hi", "[conv:s3] hi"]
    with FakeLLMServer(script=Script(strict=True), models=("their-model",)) as llm:
        result = run_app(tmp_path, *questions, "--workers", "3", OTEL_EXPORTER_OTLP_ENDPOINT=sink.base_url,
                         HERMES_APP_BASE_URL=llm.base_url, HERMES_APP_MODEL="their-model", HERMES_APP_API_KEY="k")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.splitlines()[:3] == ["s1: done s1", "s2: done s2", "s3: done s3"]
        calls = [truth_of(llm, "s1", tools=2), truth_of(llm, "s2", tools=1, children=[truth_of(llm, "s2-kid")]),
                 truth_of(llm, "s3")]
    assert [c.chats for c in calls] == [2, 2, 1]
    spans = exported(sink)
    verdict = judge(spans, calls)
    assert verdict.ok, verdict.as_dict()
    assert {s.attributes.get("gen_ai.request.model") for s in spans if s.name.startswith("chat")} == {"their-model"}


def test_a_turn_the_endpoint_refuses_fails_the_exit_code_with_its_error(tmp_path: Path) -> None:
    with FakeLLMServer(script=Script(strict=True)) as llm:
        result = run_app(tmp_path, "[conv:s1] [toolz:1] hi", "[conv:s2] hi",
                         HERMES_APP_BASE_URL=llm.base_url, HERMES_APP_MODEL="fake-model")
    assert result.returncode == 1, result.stderr[-3000:]
    answers = [line for line in result.stdout.splitlines() if line.startswith(("s1: ", "s2: "))]  # Hermes prints too
    assert len(answers) == 2, result.stdout
    assert answers[0].startswith("s1: FAILED: ") and "unknown directive [toolz:1]" in answers[0], answers[0]
    assert answers[1] == "s2: done s2"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HERMES_APP_BASE_URL": "http://127.0.0.1:{port}/v1", "HERMES_APP_MODEL": "m"},
         "hermes-app: error: cannot reach HERMES_APP_BASE_URL='http://127.0.0.1:{port}/v1' ("),
        ({"HERMES_APP_BASE_URL": "127.0.0.1:8765/v1", "HERMES_APP_MODEL": "m"},
         "hermes-app: error: HERMES_APP_BASE_URL='127.0.0.1:8765/v1' is not an http(s) URL"),
        ({"HERMES_APP_BASE_URL": "http://127.0.0.1:8765/v1"},
         "hermes-app: error: HERMES_APP_MODEL is not set"),
        ({"HERMES_APP_BASE_URL": "http://[::1/v1", "HERMES_APP_MODEL": "m"},
         "hermes-app: error: HERMES_APP_BASE_URL='http://[::1/v1' is not an http(s) URL"),
        ({"HERMES_APP_BASE_URL": "http://localhost:abc/v1", "HERMES_APP_MODEL": "m"},
         "hermes-app: error: HERMES_APP_BASE_URL='http://localhost:abc/v1' is not an http(s) URL"),
        ({"HERMES_APP_BASE_URL": "http://127.0.0.1:99999/v1", "HERMES_APP_MODEL": "m"},
         "hermes-app: error: HERMES_APP_BASE_URL='http://127.0.0.1:99999/v1' is not an http(s) URL"),
        ({"HERMES_APP_BASE_URL": "http://127.0.0.1:8765/v1 x", "HERMES_APP_MODEL": "m"},
         "hermes-app: error: HERMES_APP_BASE_URL='http://127.0.0.1:8765/v1 x' is not an http(s) URL"),
    ],
    ids=["unreachable", "not-a-url", "no-model", "bad-ipv6", "bad-port", "port-out-of-range", "space"],
)
def test_a_bad_endpoint_is_one_line_naming_it(tmp_path: Path, env: dict[str, str], message: str) -> None:
    port = _closed_port()
    result = run_app(tmp_path, **{k: v.format(port=port) for k, v in env.items()})
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message.format(port=port)), result.stderr


def test_the_app_uses_no_private_attribute_and_sets_no_environment() -> None:
    source = APP.read_text(encoding="utf-8")
    tree = ast.parse(source)
    private = [node.attr for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")]
    private += [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names if alias.name.startswith("_")]
    assert private == []  # no agent._disable_streaming: the testbed's apphost names what Hermes has no switch for
    assert "os.environ[" not in source and "environ.setdefault" not in source and "putenv" not in source  # reads only
