"""`gateway diagnose` on a connector machine, against a real service: every check passes on a
healthy setup, and each check is made to fail once (the certificate, the proxy, DNS, TCP, TLS,
the service's acceptance, the clock, an app's destination, the KDC and the keytab), each with
its fix on the line and a non-zero exit status."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from components import require
from gateway_harness import GATEWAY, HOST, echo_handler, free_port, subprocess_env, toml_table
from proxy_harness import connector_config, intercepting_proxy, password_file, tinyproxy  # noqa: F401 - fixtures

REALM = "CORP.TEST"
PRINCIPAL = f"HTTP/connector.corp.test@{REALM}"


def keytab(principal: str) -> bytes:
    """A one-entry MIT keytab (format 0x0502) for ``principal`` with a dummy AES key."""
    name, _, realm = principal.rpartition("@")
    parts = name.split("/")
    entry = struct.pack(">H", len(parts)) + struct.pack(">H", len(realm)) + realm.encode()
    for part in parts:
        entry += struct.pack(">H", len(part)) + part.encode()
    entry += struct.pack(">iIBHH", 1, 0, 1, 18, 32) + bytes(32)
    return b"\x05\x02" + struct.pack(">i", len(entry)) + entry


class Machine:
    """A registered connector's files, and `gateway diagnose` run on them."""

    def __init__(self, gw, tmp: Path, svc, kdc_port: int) -> None:
        self.gw = gw
        self.tmp = tmp
        self.svc = svc
        self.state = tmp / "conn" / "state"
        # Registered by name: the dns check has a name to resolve (localhost, from /etc/hosts).
        result = gw.cli("connector", "register", "--service", f"localhost:{svc.port}", "--token-file",
                        str(svc.token()), "--state-dir", str(self.state), "--name", "diag-conn")
        assert result.returncode == 0, result.stderr
        self.keytab = tmp / "connector.keytab"
        self.keytab.write_bytes(keytab(PRINCIPAL))
        self.krb5_conf = tmp / "krb5.conf"
        self.write_krb5_conf(kdc_port)
        self.config = self.configure()

    def write_krb5_conf(self, kdc_port: int) -> None:
        self.krb5_conf.write_text(f"[libdefaults]\n  default_realm = {REALM}\n\n[realms]\n  {REALM} = {{\n"
                                  f"    kdc = {HOST}:{kdc_port}\n  }}\n")

    def configure(self, **connector: object) -> Path:
        path = connector_config(self.tmp / "conn.toml", self.state, **connector)
        path.write_text(path.read_text() + "\n" + toml_table("kerberos", {
            "keytab": str(self.keytab), "principal": PRINCIPAL, "krb5_conf": str(self.krb5_conf)}))
        return path

    def diagnose(self, *prefix: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, list[str]], str]:
        """Run it; returns (exit status, the lines by check name, the whole output)."""
        argv = [*prefix, GATEWAY, "diagnose",
                "--config", str(self.config), "--timeout", "5"]
        result = subprocess.run(argv, capture_output=True, text=True, env=env or subprocess_env(), timeout=120)
        self.gw.cli_logs.append((" ".join(argv), result.stdout + result.stderr))
        lines: dict[str, list[str]] = {}
        for line in result.stdout.splitlines():
            match = re.match(r"(ok|FAIL|skip)\s+(\S+(?: \S+)?)\s{2,}", line)
            if match:
                lines.setdefault(match.group(2), []).append(line)
        return result.returncode, lines, result.stdout + result.stderr


def failed(lines: dict[str, list[str]]) -> list[str]:
    return sorted(name for name, found in lines.items() if any(line.startswith("FAIL") for line in found))


@pytest.fixture
def machine(gw, tmp_path, backends):
    echo = backends(echo_handler)
    kdc = backends(lambda conn, backend: None)   # a KDC as far as a TCP connect can tell
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    m = Machine(gw, tmp_path, svc, kdc.port)
    m.echo = echo
    return m


@pytest.mark.timeout(120)
def test_every_check_passes_on_a_healthy_connector(machine):
    """A registered connector, its service, app and KDC up: every check is ok and the exit status is 0."""
    status, lines, output = machine.diagnose()
    assert status == 0, output
    assert failed(lines) == []
    for name in ("certificate", "proxy", "dns", "tcp", "tls", "service", "clock", "app echo", "kdc", "keytab"):
        assert name in lines and lines[name][0].startswith("ok"), (name, output)
    assert "localhost resolves to 127.0.0.1" in lines["dns"][0]
    assert re.search(r"\(\d+ days left\)", lines["certificate"][0])
    assert f"holds 1 key(s) for {PRINCIPAL}" in lines["keytab"][0]
    assert "connector" in machine.svc.log() and "ran gateway diagnose" in machine.svc.log()


@pytest.mark.timeout(120)
def test_every_check_passes_through_tinyproxy_with_basic_auth(machine, tmp_path, tinyproxy):
    """Through a real tinyproxy with basic auth, the proxy, tcp, tls and service checks pass and say so."""
    machine.configure(proxy=tinyproxy.url, proxy_password_file=password_file(tmp_path))
    status, lines, output = machine.diagnose()
    assert status == 0, output
    assert f"through the proxy at {HOST}:{tinyproxy.port} ([connector] proxy" in lines["proxy"][0]
    assert f"(through the proxy at {HOST}:{tinyproxy.port})" in lines["tcp"][0]
    assert lines["tls"][0].startswith("ok") and lines["service"][0].startswith("ok")
    assert tinyproxy.connects_to(f"localhost:{machine.svc.port}") == 2   # the tcp check, then the TLS probe


@pytest.mark.timeout(120)
def test_an_expired_client_certificate_fails_the_certificate_check(machine):
    """With the clock 100 days on, the 90-day client certificate is expired: the certificate check says so."""
    status, lines, output = machine.diagnose(require("faketime"), "-f", "+100d")
    assert status == 1
    assert "expired" in lines["certificate"][0] and "fix: get a new token" in lines["certificate"][0], output


@pytest.mark.timeout(120)
def test_an_unreadable_proxy_password_file_fails_the_proxy_check(machine, tmp_path):
    """A proxy password file that is not there fails the proxy check, naming the file."""
    machine.configure(proxy=f"http://gw@{HOST}:{free_port()}", proxy_password_file=tmp_path / "missing")
    status, lines, output = machine.diagnose()
    assert status == 1 and failed(lines) == ["proxy"], output
    assert f"cannot read the proxy password file {tmp_path / 'missing'}" in lines["proxy"][0]


def test_a_name_that_does_not_resolve_fails_the_dns_check(machine, tmp_path):
    """A service name the resolver does not know fails the dns check (in process: no query may leave the machine)."""
    from gateway import diagnose, plugins
    from gateway.config import load_config

    settings = machine.state / "connection.toml"
    settings.write_text(settings.read_text().replace('service_host = "localhost"', 'service_host = "gw.corp.test"'))

    @implementer(IHostnameResolver)
    class NoSuchName:
        def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
            receiver.resolutionBegan(None)
            receiver.resolutionComplete()
            return receiver

    reactor = MemoryReactorClock()
    reactor.advance(__import__("time").time())
    reactor.nameResolver = NoSuchName()
    pm = plugins.make_plugin_manager()
    config = load_config(machine.config, plugins.config_sections(pm))
    result = []
    ensureDeferred(diagnose._service_checks(reactor, config, {}, 60.0, 5.0)).addBoth(result.append)
    checks = result[0]
    assert [c.name for c in checks] == ["certificate", "proxy", "dns"]
    assert checks[-1].failed and "gw.corp.test does not resolve on this machine" in checks[-1].detail
    assert "check service_host in connection.toml" in checks[-1].line()


@pytest.mark.timeout(120)
def test_a_stopped_service_fails_the_tcp_check(machine):
    """With the service stopped, the tcp check fails: nothing accepts connections at the service's address."""
    machine.svc.stop()
    status, lines, output = machine.diagnose()
    assert status == 1 and failed(lines) == ["tcp"], output
    assert f"nothing accepts connections at localhost:{machine.svc.port}" in lines["tcp"][0]
    assert "fix: check that the service listens" in lines["tcp"][0]


@pytest.mark.timeout(120)
def test_a_tls_inspecting_proxy_fails_the_tls_check_by_name(machine, intercepting_proxy):
    """Through a proxy that replaces the service's certificate, the tls check names the proxy and the fix."""
    machine.configure(proxy=f"http://{HOST}:{intercepting_proxy.port}")
    status, lines, output = machine.diagnose()
    assert status == 1 and failed(lines) == ["tls"], output
    assert f"the proxy at {HOST}:{intercepting_proxy.port} replaced the service's certificate" in lines["tls"][0]
    assert "fix: add an exception for the service's host" in lines["tls"][0]


@pytest.mark.timeout(120)
def test_a_deleted_connector_fails_the_service_check(machine):
    """A connector the service deleted: its certificate is refused and the service check says to register again."""
    text = (machine.state / "connection.toml").read_text()
    connector_id = re.search(r'connector_id = "([0-9a-f]+)"', text).group(1)
    assert machine.svc.delete_connector(connector_id).returncode == 0
    status, lines, output = machine.diagnose()
    assert status == 1 and failed(lines) == ["service"], output
    assert "the service refused this connector's certificate" in lines["service"][0]
    assert "register this connector again" in lines["service"][0]


@pytest.mark.timeout(120)
def test_a_clock_two_hours_off_fails_the_clock_check(machine):
    """With this machine's clock two hours ahead (faketime), the clock check fails and says how to fix it."""
    status, lines, output = machine.diagnose(require("faketime"), "-f", "+2h")
    assert status == 1 and failed(lines) == ["clock"], output
    assert re.search(r"this machine's clock is 7\d{3}s ahead of the service's", lines["clock"][0])
    assert "fix: synchronise it" in lines["clock"][0]


@pytest.mark.timeout(120)
def test_an_app_whose_back_end_is_down_fails_its_destination_check(machine):
    """An app whose back end no longer listens fails its own line, naming host:port."""
    machine.echo.close()
    status, lines, output = machine.diagnose()
    assert status == 1 and failed(lines) == ["app echo"], output
    assert f"nothing accepts connections at {machine.echo.destination}" in lines["app echo"][0]


@pytest.mark.timeout(120)
def test_an_unreachable_kdc_and_a_keytab_without_the_account_fail_their_checks(machine):
    """A KDC nobody listens at and a keytab for another principal fail the kdc and keytab checks."""
    machine.write_krb5_conf(free_port())
    machine.keytab.write_bytes(keytab(f"HTTP/other.corp.test@{REALM}"))
    status, lines, output = machine.diagnose()
    assert status == 1 and failed(lines) == ["kdc", "keytab"], output
    assert f"of {REALM}" in lines["kdc"][0] and "is unreachable" in lines["kdc"][0]
    assert f"holds no key for {PRINCIPAL} (it holds HTTP/other.corp.test@{REALM})" in lines["keytab"][0]
