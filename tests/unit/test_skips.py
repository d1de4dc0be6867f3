"""No silent skips: every test that needs something from the machine asks tests/support/components.py,
which names the Debian package (scripts/packages.txt) and fails instead of skipping when CI=true."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import components

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
# The helper itself, and this file, which names what it looks for.
EXEMPT = {TESTS / "support" / "components.py", Path(__file__).resolve()}
# Names that skip a test behind the helper's back: pytest's and unittest's.
SKIP_NAMES = {"skip", "skipif", "importorskip", "skipIf", "skipUnless", "SkipTest", "Skipped"}
# Files with a test that cannot apply on some machines whatever is installed (by_nature/by_nature_if).
# A new entry needs a reason a reviewer agrees with: a missing program is never one.
BY_NATURE = {
    "tests/unit/test_http_https.py",      # root reads any file, so an unreadable key cannot be made
    "tests/unit/test_pki_tls.py",         # an OpenSSL built without TLS 1.1
    "tests/integration/test_transfer.py",  # an RLIMIT_NOFILE hard limit below the test's need
}


def tree_files():
    """Every Python file under tests/ but node_modules."""
    return sorted(p for p in TESTS.rglob("*.py") if "node_modules" not in p.parts)


def unshared_skips(source: str, filename: str) -> list[str]:
    """Each place in `source` that skips without tests/support/components.py, or says by nature
    where it may not, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and node.attr in SKIP_NAMES:
            found.append((node.lineno, f"...{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in SKIP_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"import of {a.name}") for a in node.names if a.name in SKIP_NAMES]
        elif isinstance(node, ast.Call) and _called(node) in ("by_nature", "by_nature_if") and filename not in BY_NATURE:
            found.append((node.lineno, f"{_called(node)} in a file not listed in test_skips.py's BY_NATURE"))
    return [f"{filename}:{line}: {what}" for line, what in sorted(found)]


def _called(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def required_components(source: str) -> set[str]:
    """The component names `source` passes to require() or needs()."""
    return {
        arg.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
        and _called(node) in ("require", "needs")
        for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }


def test_every_skip_in_the_tests_goes_through_the_shared_helper():
    """No test file under tests/ calls pytest.skip, skipif, importorskip or unittest's skips itself."""
    found = [
        hit for path in tree_files() if path not in EXEMPT
        for hit in unshared_skips(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert found == [], (
        "skip through tests/support/components.py instead (require, needs, require_module, "
        "require_node_modules, missing; by_nature only for what no package can change):\n" + "\n".join(found))


@pytest.mark.parametrize("source", [
    'import pytest\npytestmark = pytest.mark.skipif(shutil.which("slapd") is None, reason="no slapd")',
    'import pytest\n@pytest.mark.skip(reason="later")\ndef test_x(): pass',
    'import pytest\ndef test_x():\n    if not os.path.exists("/usr/sbin/smbd"):\n        pytest.skip("no samba")',
    'import pytest\nkrb5 = pytest.importorskip("krb5")',
    'from pytest import skip\ndef test_x():\n    skip("no kdc")',
    'import unittest\n@unittest.skipIf(True, "no postgres")\ndef test_x(): pass',
    'from unittest import SkipTest\ndef test_x():\n    raise SkipTest("no dnsmasq")',
    'from components import by_nature\ndef test_x():\n    by_nature("apache is not installed")',
])
def test_the_scan_finds_a_skip_that_bypasses_the_helper(source):
    """A planted skip of each kind (skipif, skip, importorskip, unittest, by_nature outside the list) is reported."""
    assert unshared_skips(source, "tests/integration/test_planted.py") != []


def test_the_scan_accepts_the_helper():
    """Skips through the helper, and by_nature in a listed file, are not reported."""
    source = textwrap.dedent("""
        from components import by_nature, missing, needs, require, require_module
        pytestmark = needs("nginx", node_modules=["oidc-provider"])
        def test_x():
            require("node")
            by_nature("root reads any file")
    """)
    assert unshared_skips(source, "tests/unit/test_http_https.py") == []


def test_every_component_a_test_asks_for_is_installed_for_the_tests():
    """Each name passed to require()/needs() is a line of scripts/packages.txt that setup.sh --with-tests installs."""
    listed = components.read_packages(ROOT / "scripts" / "packages.txt")
    asked = set().union(*(required_components(p.read_text(encoding="utf-8")) for p in tree_files()))
    assert {"nginx", "node", "chromium"} <= asked
    assert sorted(n for n in asked if n not in listed or "tests" not in listed[n].needed_by) == []


def fake_packages(tmp_path: Path, probe: str) -> Path:
    """A packages file whose only component, nginx, is probed at `probe`."""
    path = tmp_path / "packages.txt"
    path.write_text(f"# component package probe needed-by\nnginx  nginx-light  {probe}  tests,bench\n")
    return path


def test_a_missing_component_skips_naming_its_package(tmp_path, monkeypatch):
    """Outside CI, require() of an absent program skips with a line naming its Debian package."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install the Debian package nginx-light"):
        components.require("nginx", fake_packages(tmp_path, str(tmp_path / "nginx")))


def test_in_ci_a_missing_component_fails_naming_its_package(tmp_path, monkeypatch):
    """With CI=true, require() of an absent program fails the test, naming its Debian package."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="nginx-light.*CI=true"):
        components.require("nginx", fake_packages(tmp_path, str(tmp_path / "nginx")))


def test_a_present_component_gives_its_path(tmp_path, monkeypatch):
    """require() returns the path of a program that is there, by absolute path or on PATH."""
    monkeypatch.setenv("CI", "true")
    assert components.require("nginx", fake_packages(tmp_path, sys.executable)) == sys.executable
    assert components.require("nginx", fake_packages(tmp_path, "sh")).endswith("/sh")


def test_a_file_probe_needs_the_file_not_the_execute_bit(tmp_path, monkeypatch):
    """A file:PATH probe (an Apache module, a header) finds a plain file and misses an absent one."""
    monkeypatch.setenv("CI", "true")
    module = tmp_path / "mod_x.so"
    module.write_bytes(b"")
    assert components.require("nginx", fake_packages(tmp_path, f"file:{module}")) == str(module)
    with pytest.raises(pytest.fail.Exception, match="nginx-light"):
        components.require("nginx", fake_packages(tmp_path, f"file:{tmp_path / 'absent.so'}"))


def test_a_glob_probe_finds_the_highest_version(tmp_path, monkeypatch):
    """A glob:PATTERN probe (a server under /usr/lib/postgresql/<major>/bin) picks the highest
    version numerically and misses when nothing matches."""
    monkeypatch.setenv("CI", "true")
    for major in ("9", "15", "16"):
        program = tmp_path / major / "initdb"
        program.parent.mkdir()
        program.write_bytes(b"")
        program.chmod(0o755)
    found = components.require("nginx", fake_packages(tmp_path, f"glob:{tmp_path}/*/initdb"))
    assert found == str(tmp_path / "16" / "initdb")
    with pytest.raises(pytest.fail.Exception, match="nginx-light"):
        components.require("nginx", fake_packages(tmp_path, f"glob:{tmp_path}/*/absent"))


def test_a_malformed_packages_line_is_refused(tmp_path):
    """A line without the four columns is an error naming the file and line."""
    path = tmp_path / "packages.txt"
    path.write_text("nginx nginx-light /usr/sbin/nginx\n")
    with pytest.raises(ValueError, match=r"packages.txt:1: expected 4 columns"):
        components.read_packages(path)


def run_pytest(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    """A pytest session in tmp_path with this tree's hooks, a `needs("nginx")` test, a
    `require("nginx")` fixture and a by-nature skip, nginx absent from its packages file."""
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -ra\n")
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text(encoding="utf-8"))
    (tmp_path / "test_planted.py").write_text(textwrap.dedent("""
        import pytest
        from components import by_nature, needs, require

        @pytest.fixture
        def nginx():
            return require("nginx")

        @needs("nginx")
        def test_marked():
            pass

        def test_fixture(nginx):
            pass

        def test_by_nature():
            by_nature("no such thing here")
    """))
    env = {**os.environ, "PYTHONPATH": str(TESTS / "support"),
           "GATEWAY_PACKAGES_FILE": str(fake_packages(tmp_path, str(tmp_path / "nginx")))}
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_ci_run_fails_where_a_run_elsewhere_skips(tmp_path):
    """Through a real pytest run: without CI the nginx tests skip naming nginx-light and the run passes;
    with CI=true they fail naming it and the run fails; both end with the skip count, reasons and pytest's line."""
    elsewhere = run_pytest(tmp_path, ci=False)
    assert elsewhere.returncode == 0, elsewhere.stdout
    lines = elsewhere.stdout.rstrip().splitlines()
    assert "3 skipped" in lines[-1]
    block = lines[lines.index(next(line for line in lines if "skipped: 3" in line)):-1]
    assert any("2 x nginx (" in line and "nginx-light" in line for line in block), block
    assert any("1 x by nature: no such thing here" in line for line in block), block
    assert "components.py" not in elsewhere.stdout   # each skip is shown at its test

    ci = run_pytest(tmp_path, ci=True)
    assert ci.returncode == 1, ci.stdout
    lines = ci.stdout.rstrip().splitlines()
    assert "2 errors" in lines[-1] and "1 skipped" in lines[-1], lines[-1]
    assert sum("nginx-light" in line and "CI=true" in line for line in lines if line.startswith("ERROR")) == 2
    assert any("skipped: 1" in line for line in lines[-4:-1]), lines[-4:]
