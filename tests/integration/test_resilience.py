"""Failures and restarts: the service dies, a connector has the wrong CA, a connector drains."""

from __future__ import annotations

import re
import signal
import threading
from datetime import UTC, datetime

import pytest

from gateway_harness import (
    connect,
    echo_handler,
    echo_once,
    read_exact,
    slow_source_handler,
    wait_echo,
    wait_until,
)


@pytest.mark.timeout(120)
def test_connector_reconnects_after_service_kill_9(gw, backends):
    """After kill -9 and a restart of the service on the same ports and state, the connector comes back by itself."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    conn = gw.connector(svc, tunnels=2, backoff_initial=0.2, backoff_max=1.0)
    port = svc.app_port("echo")
    wait_echo(port)

    svc.kill9()
    wait_until(lambda: re.search(r"tunnel \S+ lost", conn.proc.log()), 30, "the connector to notice")
    with pytest.raises(OSError):
        echo_once(port, timeout=2)
    before = conn.up_count()

    svc.start()
    wait_until(lambda: conn.up_count() >= before + 2, 30, "both tunnels to come back")
    wait_echo(port)
    assert echo_once(port, b"after restart" * 1000) == b"after restart" * 1000
    assert conn.proc.running and conn.starts == 1, "the connector process was not restarted"


@pytest.mark.timeout(120)
def test_keepalive_detects_a_frozen_service_and_reconnects(gw, backends):
    """With a short ping_interval the connector drops tunnels to a frozen (SIGSTOP) service and reconnects after SIGCONT."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    conn = gw.connector(svc, tunnels=1, ping_interval=0.5, backoff_initial=0.2, backoff_max=0.5)
    port = svc.app_port("echo")
    wait_echo(port)
    svc.proc.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: re.search(r"tunnel \S+ dead: nothing received", conn.proc.log()), 15,
                   "the connector's keep-alive to declare the tunnel dead")
    finally:
        svc.proc.signal(signal.SIGCONT)
    before = conn.up_count()
    wait_until(lambda: conn.up_count() > before, 30, "a new tunnel after SIGCONT")
    wait_echo(port)
    assert conn.proc.running and conn.starts == 1


@pytest.mark.timeout(120)
def test_wrong_ca_fails_clearly_and_service_keeps_serving(gw, backends):
    """A connector trusting another CA fails with a verify error in its log; a good connector's app keeps working."""
    from gateway.pki import keys
    from gateway.pki.ca import CertificateAuthority

    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    good = gw.connector(svc, tunnels=1)
    port = svc.app_port("echo")
    wait_echo(port)

    bad = gw.connector(svc, start=False, tunnels=2, backoff_initial=0.2, backoff_max=0.5)
    other = CertificateAuthority.create(datetime.now(UTC), common_name="someone else's CA")
    (bad.state_dir / "ca.pem").write_bytes(keys.cert_pem(other.cert))
    bad.start(wait=False)

    # It keeps failing, with a clear reason, and keeps retrying.
    wait_until(lambda: len(re.findall(r"certificate verify failed", bad.proc.log())) >= 3, 30,
               "the bad connector to log certificate verify failures")
    failures = [line for line in bad.proc.log().splitlines() if "certificate verify failed" in line]
    assert all("to the service failed" in line for line in failures), failures[:3]
    assert bad.proc.running, "a wrong CA should not crash the connector"
    # ... and names the certificate it was shown (gateway/connector/proxy.py, untrusted_certificate).
    assert f"the service at {svc.address} presented a certificate for 'localhost' issued by" in bad.proc.log()
    assert "register again with a new token if the service has a new CA" in bad.proc.log()
    assert "up to node" not in bad.proc.log()
    # ... in those lines, not in a traceback for every attempt (ClientService's NoTransition
    # when a connection is lost while prepareConnection waits)
    assert "Traceback" not in bad.proc.log() and "NoTransition" not in bad.proc.log(), bad.proc.log()[-3000:]

    # During: the good connector serves the app.
    for _ in range(5):
        assert echo_once(port, b"during") == b"during"
    bad.kill9()
    # After.
    assert echo_once(port, b"after") == b"after"
    assert good.proc.running


@pytest.mark.timeout(120)
def test_sigterm_drains_streams_and_new_streams_go_elsewhere(gw, backends):
    """SIGTERM on a connector lets its open stream finish intact while new streams go to the other connector."""
    count, chunk = 200, 32 * 1024  # ~4 s at 20 ms per chunk
    slow = backends(slow_source_handler(count, chunk=chunk, interval=0.02))
    echo = backends(echo_handler)
    svc = gw.service(apps=[
        {"name": "slow", "destination": slow.destination},
        {"name": "echo", "destination": echo.destination},
    ])
    a = gw.connector(svc, tunnels=1, drain_timeout=30, log_level="debug")
    b = gw.connector(svc, tunnels=1, drain_timeout=30, log_level="debug")
    wait_echo(svc.app_port("echo"))

    result: dict[str, object] = {}

    def download() -> None:
        try:
            with connect(svc.app_port("slow"), timeout=30) as s:
                result["got"] = read_exact(s, count * chunk)
        except Exception as e:  # noqa: BLE001
            result["error"] = repr(e)

    thread = threading.Thread(target=download, daemon=True)
    thread.start()

    def carrier():
        for c in (a, b):
            if "for app slow" in c.proc.log():
                return c
        return None

    draining = wait_until(carrier, 15, "the slow stream to reach a connector")
    survivor = b if draining is a else a
    draining.proc.signal(signal.SIGTERM)
    wait_until(lambda: "draining 1 open streams" in draining.proc.log(), 10, "the connector to start draining")

    echo_before = {c.name: c.proc.log().count("for app echo") for c in (a, b)}
    for i in range(5):
        payload = f"during drain {i}".encode()
        assert echo_once(svc.app_port("echo"), payload) == payload
    assert draining.proc.running and thread.is_alive(), "the drain ended before the checks: make the source slower"
    assert draining.proc.log().count("for app echo") == echo_before[draining.name], \
        "a new stream was routed to the draining connector"
    assert survivor.proc.log().count("for app echo") == echo_before[survivor.name] + 5

    thread.join(60)
    assert "error" not in result, result
    [sent] = slow.wait_results(1, 10)
    assert result["got"] == sent and sent[0] == count * chunk
    assert "drain deadline passed" not in draining.proc.log()
    assert draining.proc.wait(30) == 0, "the drained connector did not exit 0"


@pytest.mark.timeout(60)
def test_sigterm_connector_exits_after_drain(gw, backends):
    """A connector given SIGTERM with no open stream exits promptly and cleanly."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}])
    conn = gw.connector(svc, tunnels=2, drain_timeout=5)
    wait_echo(svc.app_port("echo"))
    conn.proc.signal(signal.SIGTERM)
    rc = conn.proc.wait(15)
    assert rc == 0, f"a drained SIGTERM shutdown must exit 0, got {rc}"
    assert "Server Shut Down" in conn.proc.log()
    assert "drain deadline passed" not in conn.proc.log()
