"""pytest fixtures that keep a test process on loopback; a ``conftest.py`` imports both names to use them.

``_network_guard`` (session, autouse) refuses every connection and DNS look-up beyond 127.0.0.1 for the whole
session (:func:`statebackends_hermes_testbed.hermes_harness.loopback_only`); ``_loopback_only`` (autouse) fails
any test during which something tried to reach beyond loopback, even if the caller swallowed the error.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from .hermes_harness import NetGuard, loopback_only

__all__ = ["_loopback_only", "_network_guard"]


@pytest.fixture(scope="session", autouse=True)
def _network_guard() -> Iterator[NetGuard]:
    """Refuse, for the whole session, every connection and DNS look-up beyond 127.0.0.1."""
    with loopback_only() as guard:
        yield guard


@pytest.fixture(autouse=True)
def _loopback_only(_network_guard: NetGuard) -> Iterator[None]:
    """Fail any test during which something tried to reach beyond loopback (even if the caller swallowed it)."""
    before = len(_network_guard.blocked)
    yield
    assert _network_guard.blocked[before:] == [], f"attempts beyond loopback: {_network_guard.blocked[before:]}"
