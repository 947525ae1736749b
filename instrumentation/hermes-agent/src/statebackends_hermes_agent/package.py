"""The instrumented library and the versions this instrumentation is tested with."""

# Every release from 0.13.0 to 0.19.0 has each method the wrappers wrap, with the arguments they read at the
# same positions (the instrumentation README's "Hermes versions"); CI runs the instrumentation's tests and a
# matrix subset on 0.13.0, 0.17.0 and 0.18.2, and everything on 0.19.0.
_instruments = ("hermes-agent >= 0.13.0, < 0.20",)
