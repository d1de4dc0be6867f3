"""Connectors on a service of several nodes (issue 15, part 3): tunnels to every node from the
config's node list, a node added later, and kill -9 of a node under load.

Real twistd nodes on 127.0.0.1 sharing a throwaway PostgreSQL cluster and the CA files."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from components import require
from gateway_harness import GATEWAY, TWISTD, Connector, free_port, subprocess_env, wait_until
from loadgen import LoadGen, Seen, tcp_handler


def nodes_reached(connector) -> set[str]:
    """The node ids the connector's log says it has had a tunnel up to."""
    return set(re.findall(r"tunnel \S+ up to node (\S+)", connector.proc.log()))


@pytest.fixture
def cluster(backends, multinode):
    """A shared store whose nodes publish a TCP app to a back end recording what it was sent."""
    seen = Seen()
    multinode.apps = [{"name": "app", "destination": backends(tcp_handler(seen)).destination}]
    return seen, multinode


@pytest.mark.timeout(180)
def test_a_connector_gets_tunnels_to_every_node_and_to_one_added_later(cluster):
    """Registered with node 1 only, a connector gets a tunnel to each of 2 nodes, then to a third
    started later (within a config push), and serves the app through each node."""
    seen, nodes = cluster
    node1, node2 = nodes.add_node(), nodes.add_node()
    conn = nodes.connector(node1, tunnels=1)
    wait_until(lambda: nodes_reached(conn) >= {"node1", "node2"}, 30, "tunnels to node1 and node2")
    node3 = nodes.add_node()
    wait_until(lambda: "node3" in nodes_reached(conn), 30, "a tunnel to node3, started later")
    for node in (node1, node2, node3):
        load = LoadGen(tcp_port=node.app_port("app"), tcp_workers=1, max_requests=5, max_seconds=30).start()
        wait_until(lambda: load.done == 5, 30, f"5 requests through {node.name}")
        assert load.stop().succeeded() == 5, load.summary()
    assert not re.search(r"tunnel \S+ to the service failed", conn.proc.log())


@pytest.mark.timeout(240)
def test_kill_9_of_a_node_under_load_the_others_carry_on(cluster):
    """kill -9 of one of three nodes under load: every request through the other two succeeds
    (only requests on the killed node fail: counted), and the connector stops dialling it."""
    seen, nodes = cluster
    node1, node2, node3 = nodes.start(3)
    conn = nodes.connector(node1, tunnels=1, ping_interval=1.0)
    wait_until(lambda: nodes_reached(conn) == {"node1", "node2", "node3"}, 30, "tunnels to the three nodes")
    loads = {n.name: LoadGen(tcp_port=n.app_port("app"), tcp_workers=2, max_requests=20_000, max_seconds=90,
                             timeout=10) for n in (node1, node2, node3)}
    for load in loads.values():
        load.start()
    try:
        wait_until(lambda: all(load.succeeded() > 100 for load in loads.values()), 60, "load through every node")
        node3.kill9()
        killed_at = time.monotonic()
        loads["node3"].stop()   # its users would go to another node (DNS, the load balancer)
        before = {name: load.succeeded() for name, load in loads.items()}
        wait_until(lambda: all(loads[n].succeeded() > before[n] + 300 for n in ("node1", "node2")), 60,
                   "load through node1 and node2 after the kill")
        wait_until(lambda: "the service has 2 nodes" in conn.proc.log(), 30,
                   "the connector told that node3 is gone")
    finally:
        for load in loads.values():
            load.stop()
    for name in ("node1", "node2"):
        assert loads[name].failures == [], f"{name}: {loads[name].summary()}"
    victim = loads["node3"]
    reached = [f for f in victim.failures if f.request_id in seen]
    print(f"node3 (killed): {victim.summary()}; {len(reached)} of the failed had reached the back end,"
          f" the rest were in flight on node3 or refused at connect after the kill")
    assert seen.twice() == [], "a request reached the back end twice"
    after_list = conn.proc.log().rpartition("the service has 2 nodes")[2]
    kept = re.search(r"keeping tunnels to (.*)", after_list)
    assert kept and "node3" not in kept.group(1) and "node1" in kept.group(1), kept


def in_hosts_namespace(hosts: Path, argv: list[str]) -> list[str]:
    """`argv` run where /etc/hosts is `hosts` (a private mount namespace: nothing else sees it)."""
    return [require("unshare"), "--map-root-user", "--mount", "sh", "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *argv]


@pytest.mark.timeout(180)
def test_a_service_name_with_an_address_per_node_spreads_the_first_tunnels(gw, cluster, tmp_path):
    """Registered with a name resolving to 3 nodes' addresses (hosts file), the connector's first
    2 tunnels go to 2 distinct addresses, before any node list; then it reaches all three."""
    seen, nodes = cluster
    port = free_port()
    for i in (1, 2, 3):
        nodes.add_node(name=f"rr{i}", listen=f"tcp:{port}:interface=127.0.0.{i}", names=["gw.test", f"127.0.0.{i}"])
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"127.0.0.{i} gw.test\n" for i in (1, 2, 3)))
    conn = Connector(gw, "rrconn", nodes.nodes[0])
    registered = subprocess.run(
        in_hosts_namespace(hosts, [GATEWAY, "connector", "register", "--service", f"gw.test:{port}", "--token-file",
                                   str(nodes.nodes[0].token()), "--state-dir", str(conn.state_dir), "--name", "rr"]),
        capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert registered.returncode == 0, registered.stdout + registered.stderr
    conn.configure(tunnels=2)
    conn.proc = gw.spawn("rrconn-1", in_hosts_namespace(
        hosts, [TWISTD, "-n", "--pidfile=", "gateway", "--config", str(conn.config_path)]))
    wait_until(lambda: nodes_reached(conn) == {"rr1", "rr2", "rr3"}, 30, "tunnels to the three nodes")
    log = conn.proc.log()
    assert "the service address gw.test resolves to 127.0.0.1, 127.0.0.2, 127.0.0.3" in log
    first = re.search(r"keeping tunnels to (.*)", log).group(1)
    assert first == f"1 to the service address 127.0.0.1:{port}, 1 to the service address 127.0.0.2:{port}", first


@pytest.mark.timeout(180)
def test_a_node_beyond_max_nodes_refuses_the_stream_naming_max_nodes(cluster):
    """With max_nodes = 1 and 3 nodes, a node the connector keeps no tunnel to refuses a stream
    (the client's connection is closed, nothing reaches the back end) and says why: max_nodes."""
    seen, nodes = cluster
    node1, node2, node3 = nodes.start(3)
    conn = nodes.connector(node1, tunnels=1, start=False)
    conn.config_path.write_text(conn.config_path.read_text().replace("[connector]\n", "[connector]\nmax_nodes = 1\n"))
    conn.start()
    # The config line comes after the node list's and the plan's of the same message.
    wait_until(lambda: ": apps app→" in conn.proc.log().partition("the service has 3 nodes")[2], 30,
               "the node list at the connector")
    plan = re.findall(r"keeping tunnels to (.*)", conn.proc.log())[-1]   # logged before the list if unchanged
    kept = {n for n in (node1, node2, node3) if f":{n.port}" in plan}
    uncovered = [n for n in (node1, node2, node3) if n not in kept]
    assert node1 in kept and 1 <= len(kept) <= 2, plan   # one chosen node and the bootstrap (node1)
    wait_until(lambda: nodes_reached(conn) >= {n.name for n in kept}, 30, "the tunnels of the plan")
    load = LoadGen(tcp_port=uncovered[0].app_port("app"), tcp_workers=1, max_requests=1, max_seconds=30).start()
    wait_until(lambda: load.done == 1, 30, "the request through the uncovered node to end")
    assert load.stop().failures and len(seen) == 0
    wait_until(lambda: "is connected to this node" in uncovered[0].log(), 10, "the refusal's reason in the log")
    assert "[connector] max_nodes" in uncovered[0].log()
