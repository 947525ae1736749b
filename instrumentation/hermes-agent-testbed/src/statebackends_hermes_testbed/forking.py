"""A function run in a forked child, for the tests that a lock held at fork cannot hang the child (POSIX only)."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable


def in_forked_child(body: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``body`` in a forked child; its JSON-able return value, or AssertionError if it hung or failed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(body()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        raise AssertionError(f"the forked child hung for {timeout} s")
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    assert status == 0 and data, f"the forked child failed (status {status})"
    return json.loads(data)
