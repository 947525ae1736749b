"""Suite-wide set-up that needs nothing but pytest: the core's tests (tests/core) run with the core alone."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """The pytest-benchmark figures run once as plain tests unless ``--benchmark-enable`` is given."""
    if hasattr(config.option, "benchmark_disable") and not config.option.benchmark_enable:
        config.option.benchmark_disable = True
