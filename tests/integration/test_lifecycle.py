"""Connector status, lifecycle and groups with a real service and connector."""

from __future__ import annotations

import json

import pytest

from gateway import __version__
from gateway_harness import connect, echo_handler, read_exact, wait_echo, wait_until

SERVICE = {"inactive_after": 2, "sweep_interval": 0.5, "heartbeat_interval": 1}


def listed(gw, svc, *extra: str) -> list[dict]:
    result = gw.cli("connectors", "list", "--json", "--all", "--config", str(svc.config_path), *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def record(gw, svc, connector_id: str) -> dict:
    [r] = [r for r in listed(gw, svc) if r["connector_id"] == connector_id]
    return r


@pytest.mark.timeout(120)
def test_status_group_move_and_inactive_tag(gw, backends):
    """The list shows a live connector's status, a CLI group move reaches it, and a stopped one turns inactive."""
    backend = backends(echo_handler)
    svc = gw.service(apps=[{"name": "echo", "destination": backend.destination},
                           {"name": "lab-echo", "group": "lab", "destination": backend.destination}],
                     service=SERVICE)
    conn = gw.connector(svc, tunnels=2)
    cid = conn.connector_id
    wait_echo(svc.app_port("echo"))

    status = wait_until(lambda: (r := record(gw, svc, cid))["tunnels"] == 2 and r, 15, "2 tunnels in the list")
    assert status["state"] == "active" and status["group"] == "default"
    assert status["software_version"] == __version__
    assert status["address"].startswith("127.0.0.1:")
    assert status["last_seen"] and status["cert_not_after"] and status["cert_serial"]
    assert status["node_id"] == svc.name
    table = gw.cli("connectors", "list", "--config", str(svc.config_path)).stdout
    [row] = [line for line in table.splitlines() if line.startswith(cid[:12] + " ")]
    assert row.split()[2:8] == ["default", "active", __version__, status["address"], "2", "0"]

    held = connect(svc.app_port("echo"))  # a stream open across the group change
    held.sendall(b"before the move")
    assert read_exact(held, len(b"before the move"))[0] == len(b"before the move")
    moved = gw.cli("connectors", "move", cid[:12], "--group", "lab", "--config", str(svc.config_path))
    assert moved.returncode == 0, moved.stderr
    assert record(gw, svc, cid)["group"] == "lab"
    # Within a heartbeat the node routes lab's apps to it and the connector has lab's config.
    wait_echo(svc.app_port("lab-echo"), timeout=15)
    assert "moved from group default to group lab" in svc.log()
    held.sendall(b"after the move")  # a group change does not cut open streams
    assert read_exact(held, len(b"after the move"))[0] == len(b"after the move")
    held.close()
    groups = gw.cli("groups", "list", "--config", str(svc.config_path)).stdout
    assert any(line.split()[:2] == ["lab", "1"] for line in groups.splitlines()), groups

    assert conn.stop() == 0
    inactive = wait_until(lambda: (r := record(gw, svc, cid))["state"] == "inactive" and r, 15,
                          "the stopped connector to be tagged inactive")
    assert inactive["tunnels"] == 0 and inactive["deleted_at"] is None
    assert f"connector {cid} (" in svc.log() and "is inactive: no tunnel since" in svc.log()
