"""The systemd units in examples/systemd/: valid for systemd (`systemd-analyze verify`, no
warning), hardened (the options the docs promise, `systemd-analyze security` rating them at
most 2.0 exposure), and running the commands this gateway really has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from gateway_harness import BIN
from components import require

UNITS = Path(__file__).resolve().parents[2] / "examples" / "systemd"
NAMES = ["gateway-node.service", "gateway-connector.service", "gateway-updater.service"]
HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "UMask": "0077",
    "StateDirectoryMode": "0700",
}
MAX_EXPOSURE = 2.0


def settings(path: Path) -> dict[str, str]:
    """The last value of each key of a unit file (as systemd reads an override of a single value)."""
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


@pytest.fixture
def installed(tmp_path) -> Path:
    """The units with /opt/gateway/bin pointed at this checkout's virtualenv, so systemd checks
    that the commands they run exist (the paths under /opt are the install the docs describe)."""
    for name in NAMES:
        text = (UNITS / name).read_text().replace("/opt/gateway/bin/", f"{BIN}/")
        (tmp_path / name).write_text(text)
    return tmp_path


def test_units_are_hardened_as_documented():
    """Each unit sets the hardening options docs/operations.md lists, a state directory and a
    drain-sized stop timeout."""
    for name in NAMES:
        unit = settings(UNITS / name)
        for key, value in HARDENING.items():
            assert unit.get(key) == value, f"{name}: {key}={unit.get(key)!r}, expected {value!r}"
        assert unit["StateDirectory"].startswith("gateway/"), name
        assert int(unit["TimeoutStopSec"]) >= 60, f"{name}: stop timeout shorter than a drain"


def test_systemd_analyze_verify_accepts_the_units_without_a_warning(installed):
    """`systemd-analyze verify` exits 0 and prints nothing: it would print (and still exit 0)
    for a misspelt option or value, or an ExecStart= that does not exist."""
    analyze = require("systemd-analyze")
    result = subprocess.run([analyze, "verify", *(str(installed / n) for n in NAMES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_systemd_analyze_verify_does_catch_a_misspelt_value(installed):
    """The check above can fail: a misspelt ProtectSystem= value is reported."""
    analyze = require("systemd-analyze")
    bad = installed / "gateway-node.service"
    bad.write_text(bad.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
    result = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "ProtectSystem" in result.stderr or "protect system" in result.stderr.lower(), result.stderr


def test_systemd_analyze_security_rates_each_unit_ok(installed):
    """`systemd-analyze security --offline` rates each unit's exposure at most 2.0 ("OK")."""
    analyze = require("systemd-analyze")
    for name in NAMES:
        result = subprocess.run([analyze, "security", "--offline=true", str(installed / name)],
                                capture_output=True, text=True, timeout=60)
        match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
        assert match, result.stdout + result.stderr
        assert float(match.group(1)) <= MAX_EXPOSURE, f"{name}: exposure {match.group(1)}\n{result.stdout}"


def test_the_units_run_commands_this_gateway_has():
    """ExecStart= names the twistd plugins gateway and gateway-updater with --config, and
    ExecStartPre= the real `gateway check-config`: their --help works."""
    for name, plugin in [("gateway-node.service", "gateway"), ("gateway-connector.service", "gateway"),
                         ("gateway-updater.service", "gateway-updater")]:
        unit = settings(UNITS / name)
        argv = unit["ExecStart"].split()
        assert argv[1:5] == ["--nodaemon", "--pidfile=", plugin, "--config"], argv
        result = subprocess.run([f"{BIN}/twistd", plugin, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "--config" in result.stdout, result.stderr
    check = subprocess.run([f"{BIN}/gateway", "check-config", "--help"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0
