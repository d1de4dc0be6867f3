"""Registers the integration fixtures and hooks; the helpers live in gateway_harness.py
(a distinct module name, so another conftest.py elsewhere in tests/ cannot shadow them)."""

from gateway_harness import backends, gw, pytest_runtest_makereport  # noqa: F401
