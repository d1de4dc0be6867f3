"""Shared state of a service of several nodes (issue 15, parts 2 and 5): real twistd nodes on
127.0.0.1 sharing a throwaway PostgreSQL database and the CA files (tests/integration/multinode.py)."""

from __future__ import annotations

import re
import subprocess

import pytest

from gateway_harness import GATEWAY, echo_handler, echo_once, subprocess_env, wait_echo, wait_until


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


def refused_on(node, connector_id: str) -> bool:
    """Whether `node`'s log shows a tunnel of `connector_id` that was up cut because the connector was deleted."""
    log = node.log()
    tunnels = re.findall(rf"connector {connector_id} \(group \S+\) up on tunnel (\S+) ", log)
    return any(re.search(rf"tunnel {re.escape(t)} from \S+ refused: this connector was deleted", log) for t in tunnels)


@pytest.mark.timeout(150)
def test_a_connector_deleted_through_one_node_is_cut_on_every_node_within_seconds(gw, multinode, backends):
    """`gateway connectors delete` cuts the connector's tunnels on each node from the change feed, long before
    config_interval (an hour here), and leaves the other connector of the group serving."""
    echo = backends(echo_handler)
    multinode.apps = [{"name": "echo", "destination": echo.destination}]
    multinode.service_extra = {"config_interval": 3600}
    node1, node2 = multinode.start(2)
    kept = multinode.connector(node1)
    doomed = multinode.connector(node1, start=False)
    point_at(doomed, node2)
    doomed.start()
    result = multinode.cli(node1, "connectors", "delete", doomed.connector_id)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: refused_on(node2, doomed.connector_id), 30, "node 2 to cut the deleted connector's tunnel")
    assert not refused_on(node1, kept.connector_id) and not refused_on(node2, kept.connector_id)
    assert echo_once(node1.app_port("echo"), b"still here") == b"still here"


@pytest.mark.timeout(120)
def test_a_token_raced_at_two_nodes_at_once_is_accepted_once(gw, multinode):
    """Two registrations with one token, sent to two nodes at the same moment, enrol one connector; the other is told the token was used."""
    node1, node2 = multinode.start(2)
    token = node1.token()
    argv = [GATEWAY, "connector", "register", "--token-file", str(token)]
    runs = [subprocess.Popen([*argv, "--service", node.address, "--state-dir", str(gw.tmp / f"race{i}"),
                              "--name", f"race{i}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=subprocess_env(), cwd=gw.tmp)
            for i, node in enumerate((node1, node2))]
    outputs = [(run.wait(60), run.stdout.read()) for run in runs]
    for _, out in outputs:
        gw.cli_logs.append(("gateway connector register (raced)", out))
    assert sorted(code for code, _ in outputs) == [0, 1], outputs
    refused = next(out for code, out in outputs if code != 0)
    assert "token already used" in refused
    listed = multinode.cli(node2, "connectors", "list")
    assert listed.returncode == 0 and listed.stdout.count("race") == 1, listed.stdout
