"""Hooks for the whole test tree: the `needs` marker and the closing list of skips, both from
tests/support/components.py (what a test needs from the machine; scripts/packages.txt)."""

from components import (  # noqa: F401
    pytest_configure,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_terminal_summary,
)
