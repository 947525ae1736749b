"""A package's top-level modules as they are at another commit, written out to import beside this checkout's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_snapshot(rev: str, path: str, into: Path, name: str) -> None:
    """Write the ``.py`` files of ``path`` (a folder in this repository) at ``rev`` as the package ``name`` under
    ``into``; put ``into`` on ``sys.path`` (once)."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:{path}"],
                           check=True, capture_output=True, text=True).stdout.split()
    package = into / name
    package.mkdir()
    for file in files:
        if file.endswith(".py"):
            source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}/{file}"],
                                    check=True, capture_output=True, text=True).stdout
            (package / file).write_text(source)
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
