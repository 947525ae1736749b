"""The one version stamp of a run (the matrix's header and the benchmark report): Python, machine, versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any, Dict, Optional

DISTRIBUTIONS = (
    "statebackends",
    "statebackends-instrumentation-hermes-agent",
    "statebackends-hermes-testbed",
    "hermes-agent",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation",
    "wrapt",
    "loongsuite-instrumentation-hermes-agent",
    # Hermes plugins the matrix judges with --hermes-plugin (the bundled Langfuse plugin runs on the langfuse SDK).
    "hermes-plugin-otel-tracing",
    "langfuse",
)
"""The distributions whose versions a stamp records (None for one not installed)."""


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def version_stamp() -> Dict[str, Any]:
    """Python, machine and the installed versions of :data:`DISTRIBUTIONS`, as JSON-able data."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": f"{platform.system().lower()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
        "versions": {dist: _version(dist) for dist in DISTRIBUTIONS},
    }


def stamp_line(stamp: Dict[str, Any]) -> str:
    """One line for a header: the interpreter, the installed versions and the machine."""
    versions = ", ".join(f"{dist} {v}" for dist, v in stamp["versions"].items() if v)
    return (
        f"{stamp['implementation']} {stamp['python']}, {versions} "
        f"({stamp['platform']}, {stamp['cpu_count']} CPUs)"
    )
