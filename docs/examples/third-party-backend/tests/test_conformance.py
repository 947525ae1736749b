"""The example backend checked with the conformance kit: one test per contract rule and per declared model."""

from statebackends.testing import BackendContract

from statebackends_example_threadident import ThreadIdentStore


class TestThreadIdent(BackendContract):
    store_class = ThreadIdentStore
