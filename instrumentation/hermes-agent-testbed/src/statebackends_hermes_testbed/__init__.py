"""Testbed for OpenTelemetry instrumentations of the Hermes agent: fake LLM, harness, scenarios, judge, matrix."""

from .version import __version__

__all__ = ["__version__"]
