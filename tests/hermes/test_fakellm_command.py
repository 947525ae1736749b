"""The fake LLM as a command (``python -m statebackends_hermes_testbed.fakellm``, ``statebackends-fakellm``).

Each test runs the real command in a subprocess on 127.0.0.1: it serves until SIGINT or SIGTERM, documents every
directive in ``--help``, answers a request with an unknown directive or a bad value with HTTP 400 naming it, and
ends with one line naming the bad value (never a traceback) for bad arguments and a port in use.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest

from statebackends_hermes_testbed.fakellm import DIRECTIVES, Directives, Script, directive_problems

MODULE = [sys.executable, "-m", "statebackends_hermes_testbed.fakellm"]
SCRIPT = Path(sys.executable).parent / "statebackends-fakellm"
TIMEOUT = 60


def _run(*args: str, command: Optional[list[str]] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(command or MODULE), *args], capture_output=True, text=True, timeout=TIMEOUT)


def _popen_in_the_foreground(command: list[str]) -> subprocess.Popen[str]:
    """``command`` started as a terminal starts a foreground program: with SIGINT at its default, so that Python
    installs its KeyboardInterrupt handler there and Ctrl-C (SIGINT) stops it.

    A child inherits an ignored SIGINT across exec, and Python then leaves it ignored: a shell without job control
    starts every background job (``pytest ... &`` in a script, CI's second lane) with SIGINT ignored, so a child
    started from such a run as it is would never see Ctrl-C. A handled SIGINT is reset to its default by exec, so
    the parent holds Python's own handler (what an interactive pytest has) while it starts the child.
    """
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class Served:
    """A running ``fakellm`` command: its process and the base URL it printed."""

    def __init__(self, *args: str) -> None:
        self.proc = _popen_in_the_foreground([*MODULE, *args])
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline()
        assert self.first_line.startswith("fake LLM serving on http://127.0.0.1:"), (self.first_line, self._rest())
        self.base_url = self.first_line.split()[4]

    def _rest(self) -> str:
        self.proc.kill()
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return out + err

    def chat(self, text: str) -> tuple[int, dict]:
        body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": text}]}).encode()
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def stop(self, signum: int) -> tuple[int, str, str]:
        self.proc.send_signal(signum)
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, out, err


@pytest.fixture(params=["interactive", "background"])
def sigint(request: pytest.FixtureRequest) -> Iterator[str]:
    """The SIGINT disposition this test process runs with: Python's handler (pytest from a terminal), or ignored (the
    suite run as a background job of a shell without job control, as CI's second lane runs it)."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN if request.param == "background" else signal.default_int_handler)
    try:
        yield request.param
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def served() -> Iterator[Served]:
    server = Served("--port", "0")
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.communicate(timeout=TIMEOUT)


# -- the directives are documented, all of them ------------------------------------------------------------------------


def test_every_directive_is_documented_and_parsed() -> None:
    assert set(DIRECTIVES) == {f.name for f in dataclasses.fields(Directives)}


@pytest.mark.parametrize("command", [MODULE, [str(SCRIPT)]], ids=["module", "console-script"])
def test_help_lists_every_directive(command: list[str]) -> None:
    result = _run("--help", command=command)
    assert result.returncode == 0, result.stderr
    for syntax, _ in DIRECTIVES.values():
        assert syntax in result.stdout
    assert "--port" in result.stdout


# -- serving until stopped ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serves_the_script_until_stopped(sigint: str, served: Served, signum: int) -> None:
    status, body = served.chat("[conv:demo] [tools:2] hello")
    assert status == 200
    calls = body["choices"][0]["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["call_demo_1", "call_demo_2"]
    assert body["id"] == "chatcmpl-demo-1" and body["usage"]["prompt_tokens"] == 107
    with urllib.request.urlopen(f"{served.base_url}/models", timeout=TIMEOUT) as response:
        assert [m["id"] for m in json.load(response)["data"]] == ["fake-model"]
    code, out, err = served.stop(signum)
    assert code == 0, err
    assert out.strip() == "fake LLM stopped"
    assert "chatcmpl-demo-1 -> 2 tool call(s) to sb_echo" in err
    assert "Traceback" not in err


def test_a_chosen_port_and_models() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Served("--port", str(port), "--model", "m1", "--model", "m2", "--quiet")
    try:
        assert server.base_url == f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(f"{server.base_url}/models", timeout=TIMEOUT) as response:
            assert [m["id"] for m in json.load(response)["data"]] == ["m1", "m2"]
        assert server.chat("hello")[0] == 200
    finally:
        code, _, err = server.stop(signal.SIGTERM)
    assert code == 0 and err == ""  # --quiet: nothing per request


# -- bad input: one clear line, never a traceback ------------------------------------------------------------------------


def test_unknown_directive_and_bad_values_are_answered_with_400_naming_them(served: Served) -> None:
    status, body = served.chat("[conv:demo] [toolz:2] [tools:two] [llm_error:yes] [delegate] hello")
    assert status == 400
    message = body["error"]["message"]
    assert "unknown directive [toolz:2]" in message
    assert "valid directives: " + ", ".join(DIRECTIVES) in message
    assert "bad value 'two' in [tools:two]" in message
    assert "[llm_error] takes no value" in message
    assert "[delegate] needs a value, as in [delegate:KID]" in message
    assert served.chat("[conv:demo] hello")[0] == 200  # still serving
    code, _, err = served.stop(signal.SIGTERM)
    assert code == 0
    assert "HTTP 400: fake LLM: unknown directive [toolz:2]" in err
    assert "Traceback" not in err


def test_port_in_use_is_one_line_naming_the_port() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _run("--port", str(port))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"python -m statebackends_hermes_testbed.fakellm: error: port {port} on 127.0.0.1 is already in use: "
        "stop what listens there, or pick another --port (0 picks a free one)"
    ]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "http"], "'http' is not a port"),
        (["--port", "65536"], "'65536' is not a port"),
        (["--port", "-1"], "'-1' is not a port"),
        (["--model", "two words"], "'two words' is not a model name"),
        (["--portt", "1"], "unrecognized arguments: --portt"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_value(args: list[str], named: str) -> None:
    result = _run(*args)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


# -- the checks themselves; the library's Script stays lenient ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[conv:a] [tools:2] [tool:x] [tool_ms:5] [child_tools:1] [delay_ms:0] [llm_error] hi", None),
        ("[delegate_batch:a,b] [delegate:k] [files:/a.md,b.md] hi [not a directive] [A:b]", None),
        ("[files:]", "[files] needs a value"),
        ("[tools:-1]", "bad value '-1' in [tools:-1]"),
        ("[delay_ms:1.5]", "bad value '1.5' in [delay_ms:1.5]"),
        ("[delegate_batch:,]", "[delegate_batch] needs a value"),
        ("[conv:]", "[conv] needs a value"),
        ("[note] hi", "unknown directive [note]"),
    ],
)
def test_directive_problems(text: str, problem: Optional[str]) -> None:
    found = directive_problems(text)
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and problem in found[0], found


def test_the_library_script_stays_lenient() -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "[conv:x] [toolz:2] [tools:two] hi"}]}
    reply = Script().plan(request)
    assert reply.error is None and reply.content == "done x"
    strict = Script(strict=True).plan(request)
    assert strict.status == 400 and strict.error is not None and "[toolz:2]" in strict.error


def test_files_asks_for_one_read_file_per_path() -> None:
    reply = Script().plan({"model": "m", "messages": [{"role": "user", "content": "[conv:x] [files:/n/a.md, b.md] hi"}]})
    assert reply.finish_reason == "tool_calls"
    assert reply.tool_calls == (("call_x_1", "read_file", '{"path": "/n/a.md"}'), ("call_x_2", "read_file", '{"path": "b.md"}'))
