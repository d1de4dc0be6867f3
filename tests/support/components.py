"""What a test needs from the machine, and what happens when it is missing.

The programs tests use (nginx, node, chromium...) are listed once, in scripts/packages.txt,
with the Debian package that provides each; scripts/setup.sh --with-tests installs them.
A test asks for one here instead of checking for it itself:

- ``require("nginx")`` (in a fixture or a test) returns the program's path;
- ``@needs("node", "chromium")`` (or ``pytestmark = needs(...)``) does the same before the test;
- ``require_module("gateway_http")``, ``require_node_modules("oidc-provider")`` for what pip
  and npm install;
- ``missing(what, install)`` for anything else.

When something is missing, the test is skipped with one line naming the package to install,
or, when the environment variable CI is true, **fails** with that line: a CI run never passes
by skipping what it was meant to test. The only other skips are ``by_nature(reason)`` /
``by_nature_if(condition, reason)``: tests that cannot apply on this machine whatever is
installed (the unreadable-key test as root). tests/unit/test_skips.py holds every test file
to this. The root tests/conftest.py wires the marker and prints the skips after the summary.
"""

from __future__ import annotations

import importlib
import glob
import importlib.util
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from types import ModuleType
import pytest
from attrs import frozen

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
NODE_DIR = ROOT / "tests" / "node"
# GATEWAY_PACKAGES_FILE points the helper at another list: for checking the helper itself
# (a list whose nginx is absent), never needed otherwise.
PACKAGES_FILE = Path(os.environ.get("GATEWAY_PACKAGES_FILE", ROOT / "scripts" / "packages.txt"))
SETUP_TESTS = "scripts/setup.sh --with-tests"
SETUP_VENV = "scripts/setup.sh installs gateway and its plugins into .venv"
BY_NATURE = "by nature: "


@frozen
class Component:
    """One line of scripts/packages.txt."""

    name: str
    package: str
    probe: str
    needed_by: frozenset[str]

    def locate(self) -> str | None:
        """The program's (or file:'s) path, or the probe for py: probes, when it is there, else None."""
        if self.probe.startswith("py:"):
            modules = self.probe[3:].split(",")
            return self.probe if all(importlib.util.find_spec(m) for m in modules) else None
        if self.probe.startswith("file:"):
            path = self.probe.removeprefix("file:")
            return path if os.path.isfile(path) else None
        if self.probe.startswith("glob:"):
            found = [p for p in glob.glob(self.probe.removeprefix("glob:")) if os.access(p, os.X_OK)]
            return max(found, key=_version_key) if found else None
        if self.probe.startswith("/"):
            return self.probe if os.access(self.probe, os.X_OK) else None
        return shutil.which(self.probe)


def _version_key(path: str) -> list[tuple[int, int | str]]:
    # Numbers compare as numbers, so /usr/lib/postgresql/16 beats /usr/lib/postgresql/9.6.
    return [(1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", path)]


def read_packages(path: Path) -> dict[str, Component]:
    """The components of a packages file (blank lines and # comments ignored), by name."""
    components = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected 4 columns (component package probe needed-by), got {line!r}")
        name, package, probe, needed_by = fields
        components[name] = Component(name, package, probe, frozenset(needed_by.split(",")))
    return components


def in_ci() -> bool:
    """Whether this run is CI's (CI=true, as CI services set it): missing components fail it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(what: str, install: str) -> None:
    """Skip (or, in CI, fail) the current test: `what` is not there, `install` says how to get it."""
    line = f"{what} is missing: {install}"
    if in_ci():
        pytest.fail(f"{line} (CI=true: a missing component fails the run instead of skipping)", pytrace=False)
    pytest.skip(line, allow_module_level=True)


def find(name: str, packages: Path | None = None) -> Component:
    """The component called `name` in the packages file; a KeyError names the file to add it to."""
    path = packages or PACKAGES_FILE
    components = read_packages(path)
    if name not in components:
        raise KeyError(f"no component {name!r} in {path}: add a line for it there")
    return components[name]


def require(name: str, packages: Path | None = None) -> str:
    """The path of component `name` (a line of scripts/packages.txt); skips or fails when it is missing."""
    component = find(name, packages)
    where = component.locate()
    if where is None:
        missing(f"{name} ({component.probe})",
                f"install the Debian package {component.package} (as root, {SETUP_TESTS} does)")
    return where


def require_module(module: str) -> ModuleType:
    """The Python module `module`, imported; skips or fails when it is not installed in this venv."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"Python module {module} ({e})", SETUP_VENV)


def require_node_modules(*modules: str) -> Path:
    """tests/node, where npm installed `modules`; skips or fails when one is not there."""
    absent = [m for m in modules if not (NODE_DIR / "node_modules" / m).is_dir()]
    if absent:
        missing(f"npm modules {', '.join(absent)} in tests/node/node_modules",
                f"{SETUP_TESTS} installs them (npm ci in tests/node)")
    return NODE_DIR


def needs(*names: str, node_modules: tuple[str, ...] = (), modules: tuple[str, ...] = ()) -> pytest.MarkDecorator:
    """A marker: before the test runs, require() each component, require_node_modules(*node_modules)
    and require_module() each of `modules` (tests/conftest.py applies it)."""
    return pytest.mark.needs(*names, node_modules=tuple(node_modules), modules=tuple(modules))


def by_nature(reason: str) -> None:
    """Skip the current test because it cannot apply on this machine whatever is installed."""
    pytest.skip(BY_NATURE + reason)


def by_nature_if(condition: bool, reason: str) -> pytest.MarkDecorator:
    """by_nature as a marker: skip when `condition` holds (e.g. running as root)."""
    return pytest.mark.skipif(condition, reason=BY_NATURE + reason)


# -- pytest hooks, imported by tests/conftest.py ------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*components, node_modules=(), modules=()): what the test runs "
                            "(components of scripts/packages.txt, npm modules in tests/node, Python modules)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        for name in mark.args:
            require(name)
        for module in mark.kwargs.get("modules", ()):
            require_module(module)
        require_node_modules(*mark.kwargs.get("node_modules", ()))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    # A skip raised in this module is about the test that asked: show the test's place, not ours.
    if report.skipped and isinstance(report.longrepr, tuple) and Path(report.longrepr[0]).resolve() == HERE:
        path, line = item.reportinfo()[:2]
        report.longrepr = (os.fspath(path), (line or 0) + 1, report.longrepr[2])
    return report


def skip_reasons(reports) -> Counter:
    """How many skipped tests gave each reason."""
    reasons = Counter()
    for report in reports:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    return reasons


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    # Outermost wrapper: this runs after pytest's short summary (the -rs lines) and before its
    # closing "N passed" line, so a CI log shows every skip and still ends the usual way.
    result = yield
    reasons = skip_reasons(terminalreporter.stats.get("skipped", []))
    write = terminalreporter.write_line
    terminalreporter.write_sep("-", f"skipped: {sum(reasons.values())}")
    for reason, count in sorted(reasons.items()):
        write(f"  {count} x {reason}")
    return result
