"""Hooks for the whole test tree: the `needs` marker and the closing list of skips, both from
tests/support/components.py (what a test needs from the machine; scripts/packages.txt); the
session's PostgreSQL cluster and the store_backend fixture from tests/support/postgres.py."""

from components import (  # noqa: F401
    pytest_configure,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_terminal_summary,
)
from postgres import postgres_cluster, store_backend  # noqa: F401,E402
