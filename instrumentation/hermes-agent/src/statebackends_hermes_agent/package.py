"""The instrumented library and the versions this instrumentation is tested with."""

_instruments = ("hermes-agent >= 0.19.0, < 0.20",)
