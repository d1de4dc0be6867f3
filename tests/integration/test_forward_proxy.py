"""The connector behind an HTTP CONNECT forward proxy: a real tinyproxy with basic auth carries
the enrolment and the tunnels (mutual TLS end to end), a proxy refusing the credentials (407) is
reported by name, HTTPS_PROXY/NO_PROXY are honoured, and a TLS-inspecting proxy (the test's own,
with a foreign CA) is detected: "the proxy at X replaced the service's certificate"."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from gateway_harness import HOST, TWISTD, echo_handler, echo_once, subprocess_env, wait_until
from proxy_harness import (  # noqa: F401 - fixtures
    PROXY_PASSWORD,
    PROXY_USER,
    connector_config,
    intercepting_proxy,
    password_file,
    tinyproxy,
)


def register_via(gw, svc, state_dir: Path, *proxy_args: str, name: str = "behind-proxy",
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return gw.cli("connector", "register", "--service", svc.address, "--token-file", str(svc.token()),
                  "--state-dir", str(state_dir), "--name", name, *proxy_args, env=env)


def start_connector(gw, config: Path, name: str, env: dict[str, str] | None = None):
    return gw.spawn(name, [TWISTD, "-n", "--pidfile=", "gateway", "--config", str(config)], env=env)


def tunnels_up(proc) -> int:
    return len(re.findall(r"tunnel \S+ up to node", proc.log()))


@pytest.mark.timeout(120)
def test_tinyproxy_with_basic_auth_carries_the_enrolment_and_the_tunnels(gw, tmp_path, backends, tinyproxy):
    """Enrolment and both tunnels go through tinyproxy with basic auth, mutual TLS intact: an app answers."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    secret = password_file(tmp_path)
    state = tmp_path / "conn" / "state"
    result = register_via(gw, svc, state, "--proxy", tinyproxy.url, "--proxy-password-file", str(secret))
    assert result.returncode == 0, result.stderr
    assert tinyproxy.connects_to(svc.address) == 1

    config = connector_config(tmp_path / "conn.toml", state, proxy=tinyproxy.url, proxy_password_file=secret)
    proc = start_connector(gw, config, "conn-proxied")
    wait_until(lambda: tunnels_up(proc) >= 2, 30, "both tunnels up through the proxy")
    assert tinyproxy.connects_to(svc.address) == 3
    assert f"reaching the service through the proxy at {HOST}:{tinyproxy.port}" in proc.log()
    # The service authenticated the connector by its client certificate (the proxy never saw it).
    assert re.search(r"connector \S+ \(behind-proxy\) up", svc.log()) or "behind-proxy" in svc.log()
    assert echo_once(svc.app_port("echo"), b"through the proxy") == b"through the proxy"
    assert PROXY_PASSWORD not in gw.all_logs()


@pytest.mark.timeout(120)
def test_a_proxy_refusing_the_credentials_is_reported_with_its_address(gw, tmp_path, tinyproxy):
    """A wrong proxy password: the refusal is reported naming the proxy and the user, by register and by the connector."""
    svc = gw.service()
    wrong = password_file(tmp_path, "not-the-password")
    state = tmp_path / "conn" / "state"
    result = register_via(gw, svc, state, "--proxy", tinyproxy.url, "--proxy-password-file", str(wrong))
    assert result.returncode == 1
    # tinyproxy answers a CONNECT with wrong credentials with 401 (not 407); both are read as a refusal
    assert (f"the proxy at {HOST}:{tinyproxy.port} (--proxy) refused the credentials of user '{PROXY_USER}'"
            " ('HTTP/1.0 401 Unauthorized'): check the password in") in result.stderr

    good = password_file(tmp_path)
    assert register_via(gw, svc, state, "--proxy", tinyproxy.url, "--proxy-password-file", str(good)).returncode == 0
    config = connector_config(tmp_path / "conn.toml", state, proxy=tinyproxy.url, proxy_password_file=wrong)
    proc = start_connector(gw, config, "conn-wrong-password")
    wait_until(lambda: "refused the credentials" in proc.log(), 30, "the refusal in the connector log")
    assert f"the proxy at {HOST}:{tinyproxy.port} ([connector] proxy) refused the credentials" in proc.log()
    assert tunnels_up(proc) == 0


@pytest.mark.timeout(120)
def test_https_proxy_and_no_proxy_from_the_environment(gw, tmp_path, backends, tinyproxy):
    """Without a proxy key the connector follows HTTPS_PROXY, and dials directly when NO_PROXY names the service."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    secret = password_file(tmp_path)
    state = tmp_path / "conn" / "state"
    via_env = subprocess_env(HTTPS_PROXY=tinyproxy.url, NO_PROXY="", no_proxy="")
    result = register_via(gw, svc, state, "--proxy-password-file", str(secret), env=via_env)
    assert result.returncode == 0, result.stderr
    assert tinyproxy.connects_to(svc.address) == 1

    config = connector_config(tmp_path / "conn.toml", state, proxy_password_file=secret)
    proc = start_connector(gw, config, "conn-env", env=via_env)
    wait_until(lambda: tunnels_up(proc) >= 2, 30, "both tunnels up through HTTPS_PROXY")
    assert "through the proxy at" in proc.log() and "(HTTPS_PROXY)" in proc.log()
    assert tinyproxy.connects_to(svc.address) == 3
    proc.stop()

    bypass = subprocess_env(HTTPS_PROXY=tinyproxy.url, NO_PROXY=f"localhost,{HOST}", no_proxy="")
    proc = start_connector(gw, config, "conn-no-proxy", env=bypass)
    wait_until(lambda: tunnels_up(proc) >= 2, 30, "both tunnels up directly")
    assert "through the proxy" not in proc.log()
    assert tinyproxy.connects_to(svc.address) == 3
    assert echo_once(svc.app_port("echo")) == b"ping"


@pytest.mark.timeout(120)
def test_a_tls_inspecting_proxy_is_detected_and_named(gw, tmp_path, intercepting_proxy):
    """A proxy that answers with its own certificate is named: "the proxy at X replaced the service's certificate"."""
    svc = gw.service()
    proxy = f"http://{HOST}:{intercepting_proxy.port}"
    expected = f"the proxy at {HOST}:{intercepting_proxy.port} replaced the service's certificate"

    state = tmp_path / "conn" / "state"
    result = register_via(gw, svc, state, "--proxy", proxy)
    assert result.returncode == 1
    assert expected in result.stderr and "'Corp Inspection CA'" in result.stderr
    assert f"add an exception for the service's host {svc.address}" in result.stderr

    assert gw.register(svc, name="direct", state_dir=state).returncode == 0
    config = connector_config(tmp_path / "conn.toml", state, proxy=proxy)
    proc = start_connector(gw, config, "conn-inspected")
    wait_until(lambda: expected in proc.log(), 30, "the connector to name the inspecting proxy")
    assert "issued by 'Corp Inspection CA'" in proc.log()
    assert f"CONNECT {svc.address} HTTP/1.1" in intercepting_proxy.results
    assert tunnels_up(proc) == 0
