"""Shared state of a service of several nodes (issue 15, parts 2 and 5): real twistd nodes on
127.0.0.1 sharing a throwaway PostgreSQL database and the CA files (tests/integration/multinode.py)."""

from __future__ import annotations

import re

import pytest

from gateway_harness import echo_handler, echo_once, wait_echo, wait_until


def point_at(connector, node) -> None:
    """Make the registered connector dial `node` as its service (its registration says another)."""
    path = connector.state_dir / "connection.toml"
    text = re.sub(r"service_port = \d+", f"service_port = {node.port}", path.read_text())
    path.write_text(text)


@pytest.mark.timeout(120)
def test_enrolled_on_one_node_the_connector_serves_through_another(gw, multinode, backends):
    """A connector enrolled through node 1 is accepted by node 2 (same store, same CA) and serves its app there; the nodes list each other."""
    echo = backends(echo_handler)
    multinode.apps = [{"name": "echo", "destination": echo.destination}]
    node1, node2 = multinode.start(2)
    conn = multinode.connector(node1, start=False)
    point_at(conn, node2)
    conn.start()
    wait_echo(node2.app_port("echo"))
    assert echo_once(node2.app_port("echo"), b"across nodes") == b"across nodes"
    assert multinode.listed_by(node1) == ["node1", "node2"] == multinode.listed_by(node2)
