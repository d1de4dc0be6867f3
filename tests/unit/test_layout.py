"""The test tree itself: pytest imports test modules by basename, so two files with the same
name in tests/unit and tests/integration break collection of the whole suite."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_test_module_names_are_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "node_modules" not in p.parts)
    assert [n for n, c in names.items() if c > 1] == []
