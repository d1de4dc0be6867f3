"""Deleting a connector cuts its live tunnels within one config interval (issue 4)."""

from __future__ import annotations

import pytest

from gateway_harness import echo_handler, echo_once, wait_echo, wait_until


@pytest.mark.timeout(90)
def test_deleting_a_connector_closes_its_open_tunnels(gw, backends):
    """After `gateway connectors delete`, the running connector's tunnels are closed with a reason and traffic stops."""
    echo = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": echo.destination}], service={"config_interval": 1})
    conn = gw.connector(svc, tunnels=2)
    port = svc.app_port("echo")
    wait_echo(port)
    result = svc.delete_connector(conn.connector_id)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: conn.log().count("was deleted from the service") >= 2, 10,
               "both tunnels to be closed with the deletion as the reason")
    try:
        answer = echo_once(port, b"after delete", timeout=3)
    except OSError:
        answer = None  # the service resets a client it has no connector for
    assert answer != b"after delete", "the deleted connector still carried traffic"
