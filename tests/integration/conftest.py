"""Registers the integration fixtures and hooks; the helpers live in gateway_harness.py,
nginx_harness.py, kdc_harness.py and multinode.py (distinct module names, so another conftest.py elsewhere in tests/ cannot shadow them)."""

from gateway_harness import backends, gw, pytest_runtest_makereport  # noqa: F401
from kdc_harness import kdc, negotiate_apache  # noqa: F401
from multinode import multinode, outage_multinode, own_postgres  # noqa: F401
from nginx_harness import nginx  # noqa: F401
