"""Shared state of a service of several nodes (issue 15, parts 2 and 5): real twistd nodes on
127.0.0.1 sharing a throwaway PostgreSQL database and the CA files (tests/integration/multinode.py)."""

from __future__ import annotations

import hashlib
import re
import subprocess

import pytest

from gateway_harness import (GATEWAY, connect, connection_ends, echo_handler, echo_once, free_port, http_request,
                             port_is_free, read_exact, subprocess_env, wait_echo, wait_until)
from loadgen import LoadGen, Seen, tcp_handler


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


def outage_lines(node) -> tuple[int, int]:
    """How many times `node` logged a store outage starting and ending."""
    log = node.log()
    return log.count("store outage;"), log.count("reachable again after")


@pytest.mark.timeout(300)
def test_with_postgresql_stopped_under_load_traffic_goes_on_and_admin_calls_fail_clearly(gw, outage_multinode,
                                                                                         backends):
    """PostgreSQL stopped under load: no request fails, `connectors delete` and a registration fail naming the
    store, each node logs the outage once; PostgreSQL back: the nodes log its end once and follow changes again
    (a delete cuts the connector's tunnels) without a restart."""
    cluster = outage_multinode
    seen = Seen()
    backend = backends(tcp_handler(seen))
    cluster.apps = [{"name": "app", "destination": backend.destination}]
    cluster.service_extra = {"config_interval": 3600}
    node1, node2 = cluster.start(2)
    conn = cluster.connector(node1, tunnels=2)
    for node in (node1, node2):   # the connector learns of node 2 from its config, then dials it
        wait_until(lambda: f"connector {conn.connector_id} (group default) up on tunnel {node.name}/" in node.log(),
                   30, f"the connector's tunnel to {node.name}")
    loads = [LoadGen(tcp_port=n.app_port("app"), tcp_workers=2, max_requests=20_000, max_seconds=150, timeout=10)
             for n in (node1, node2)]
    for load in loads:
        load.start()
    try:
        wait_until(lambda: all(load.succeeded() > 50 for load in loads), 60, "load through both nodes")
        token = node2.token()
        cluster.postgres.halt()
        wait_until(lambda: all(outage_lines(n)[0] == 1 for n in (node1, node2)), 60, "both nodes to log the outage")
        during = [load.succeeded() for load in loads]
        wait_until(lambda: all(load.succeeded() > n + 100 for load, n in zip(loads, during)), 60,
                   "100 more requests through each node with the store down")

        deleted = cluster.cli(node1, "connectors", "delete", conn.connector_id)
        assert deleted.returncode != 0
        assert f"127.0.0.1:{cluster.postgres.port}" in deleted.stderr and "PostgreSQL is up" in deleted.stderr
        assert "Traceback" not in deleted.stderr
        made = gw.cli("token", "create", "--config", str(node1.config_path))
        assert made.returncode != 0 and "PostgreSQL is up" in made.stderr and "Traceback" not in made.stderr
        enrolled = gw.register(node2, name="during", token=token)
        assert enrolled.returncode != 0
        assert f"the store postgresql://gateway_test@127.0.0.1:{cluster.postgres.port}" in enrolled.stderr

        cluster.postgres.resume()
        wait_until(lambda: all(outage_lines(n) == (1, 1) for n in (node1, node2)), 60,
                   "both nodes to log the store back")
        after = [load.succeeded() for load in loads]
        wait_until(lambda: all(load.succeeded() > n + 50 for load, n in zip(loads, after)), 60,
                   "requests through each node after the outage")
    finally:
        for load in loads:
            load.stop()
    for load in loads:
        assert not load.failures, load.summary()
    assert not seen.twice()
    assert "Traceback" not in node1.log() + node2.log()
    assert cluster.cli(node1, "connectors", "delete", conn.connector_id).returncode == 0
    wait_until(lambda: refused_on(node1, conn.connector_id) and refused_on(node2, conn.connector_id), 30,
               "both nodes to cut the connector deleted after the outage (the change feed is back)")


def echo_refused(port: int) -> bool:
    """Whether a new connection to the echo app is closed without its echo."""
    try:
        return echo_once(port, b"new", timeout=10) != b"new"
    except OSError:
        return True


@pytest.mark.timeout(180)
def test_after_store_outage_grace_new_streams_are_refused_naming_the_store_and_served_again_once_it_is_back(
        gw, outage_multinode, backends):
    """With PostgreSQL down longer than store_outage_grace, a node refuses new streams saying why (a stream opened
    before goes on) and a connector's new tunnel saying why (no traceback); with PostgreSQL back the connector's
    tunnels come up and new streams are served again without a restart."""
    echo = backends(echo_handler)
    outage_multinode.apps = [{"name": "echo", "destination": echo.destination}]
    (node,) = outage_multinode.start(1, store_outage_grace=2)
    outage_multinode.connector(node)
    spare = outage_multinode.connector(node)
    port = node.app_port("echo")
    wait_echo(port)
    held = connect(port)
    held.sendall(b"before")
    assert read_exact(held, 6)[1] == hashlib.sha256(b"before").hexdigest()
    outage_multinode.postgres.halt()
    wait_until(lambda: outage_lines(node)[0] == 1, 60, "the node to log the outage")
    wait_until(lambda: echo_refused(port), 60, "new streams refused once the grace is over")
    assert re.search(r"app echo request \S+ refused: the store postgresql://\S+ has been unreachable for \d+s,"
                     r" longer than store_outage_grace \(2s\)", node.log())
    held.sendall(b"during")
    assert read_exact(held, 6)[1] == hashlib.sha256(b"during").hexdigest()
    spare.stop()
    spare.start(wait=False)   # its new tunnel cannot be checked: refused saying why, and retried
    wait_until(lambda: re.search(r"refused: the service cannot check this certificate now \(the store "
                                 r"postgresql://\S+ (is unreachable|failed)", node.log()), 60, "the spare's tunnel refused")
    outage_multinode.postgres.resume()
    wait_until(lambda: outage_lines(node) == (1, 1), 60, "the node to log the store back")
    spare.wait_up()
    assert "Traceback" not in node.log()
    assert echo_once(port, b"again") == b"again"
    held.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("own_ca", [False, True], ids=["no CA files", "another CA"])
def test_a_node_without_the_shared_ca_refuses_to_start_saying_what_to_copy(gw, multinode, own_ca):
    """A node on the shared store with no CA files, or with a CA of its own, exits before binding with the
    store's CA named and what to copy, no traceback; with the first node's files copied in it starts."""
    from gateway.pki import keys
    from gateway.pki.ca import CertificateAuthority

    (node1,) = multinode.start(1)
    node2 = multinode.add_node(start=False)
    for name in ("ca.pem", "ca.key"):
        (node2.state_dir / name).unlink()
    if own_ca:
        other = CertificateAuthority.load_or_create(node2.state_dir)
        assert other.fingerprint != CertificateAuthority.load_or_create(node1.state_dir).fingerprint
    result = gw.twistd(node2.config_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in out, out
    shared = keys.fingerprint(keys.load_cert((node1.state_dir / "ca.pem").read_bytes()))
    assert shared in out and "copy ca.pem and ca.key from another node's state_dir" in out, out
    assert port_is_free(node2.port)
    if not own_ca:
        assert not (node2.state_dir / "ca.key").exists()   # no CA of its own made on the way out
    for name in ("ca.pem", "ca.key"):
        (node2.state_dir / name).unlink(missing_ok=True)
    multinode.copy_ca(node1, node2)
    node2.start()
    multinode.wait_nodes()


@pytest.mark.timeout(150)
def test_an_app_added_through_one_node_is_served_by_every_node_within_seconds(gw, multinode, backends):
    """`gateway apps add` reaches both nodes' front doors from the change feed, with config_interval an hour."""
    from test_apps_cli import BLOG, http_handler

    blog = backends(http_handler("blog-backend"))
    multinode.service_extra = {"config_interval": 3600}
    fronts = {}
    for name in ("node1", "node2"):
        node = multinode.add_node(name, start=False)
        fronts[name] = free_port()
        node.add_front_door(fronts[name], [])
        node.start()
    multinode.wait_nodes()
    node1 = multinode.node("node1")
    multinode.connector(node1)
    result = multinode.cli(node1, "apps", "add", "blog", "--external-url", f"http://{BLOG}/",
                           "--internal-url", f"http://{blog.destination}/")
    assert result.returncode == 0, result.stderr
    def answers(front: int) -> bool:
        # Host without the port: both front doors serve the one external URL (port 80, as behind
        # a load balancer), each on its own test port.
        response, body = http_request(front, BLOG, "/hello", timeout=10)
        return response.status == 200 and body.startswith(b"blog-backend /hello")

    for name, front in fronts.items():
        wait_until(lambda: answers(front), 30, f"the new app to answer on {name}'s front door")


@pytest.mark.timeout(150)
def test_a_user_revoked_through_one_node_is_cut_on_another_within_seconds(gw, multinode, backends, tmp_path):
    """A Private Access user's open connection through node 2 ends soon after `gateway users revoke` with node 1's
    config, with config_interval an hour (the change feed)."""
    from test_access_private import _accepts, publish, sign_in_with_token

    echo = backends(echo_handler)
    multinode.service_extra = {"config_interval": 3600}
    for name in ("node1", "node2"):
        node = multinode.add_node(name, start=False)
        publish(node, {"name": "echo", "options": {"allowed_users": ["alice"]},
                       "segments": [{"destination": "127.0.0.1", "ports": str(echo.port)}]})
        node.start()
    multinode.wait_nodes()
    node1, node2 = multinode.node("node1"), multinode.node("node2")
    multinode.connector(node2)
    env = sign_in_with_token(gw, node2, tmp_path / "home")
    port = free_port()
    gw.spawn("access", [GATEWAY, "access", "tcp", "--service", node2.address, "--app", "echo",
                        "--listen", f"127.0.0.1:{port}"], env=env)
    wait_until(lambda: _accepts(port), 30, "gateway access tcp to listen")
    sock = connect(port)
    sock.sendall(b"before")
    assert sock.recv(64) == b"before"
    revoked = multinode.cli(node1, "users", "revoke", "--user", "alice")
    assert revoked.returncode == 0, revoked.stderr
    assert connection_ends(sock, 30)
    assert "revoked" in node2.log()


@pytest.mark.timeout(180)
def test_the_admin_api_and_the_status_page_answer_503_naming_the_store_while_it_is_down(gw, outage_multinode):
    """PostgreSQL stopped: an API call gets 503 store_unavailable and the status page a 503 page, both
    naming the store and saying that traffic carries on; not a 500 and a traceback. Back: 200 again."""
    from gateway_harness import HOST, listening, toml_table, wait_until
    from test_admin_api import api, create_admin_token, request

    node = outage_multinode.add_node(start=False)
    node.admin_port, node.admin_tls = free_port(), True
    node.config_path.write_text(node.config_path.read_text() + "\n" + toml_table(
        "admin", {"listen": f"tcp:{node.admin_port}:interface={HOST}", "tls": True}))
    node.start()
    wait_until(lambda: listening(node.admin_port), 20, "the admin listener")
    _, token_file = create_admin_token(gw, node)
    token = token_file.read_text().strip()
    assert api(node, "GET", "/api/v1/status", token)[0] == 200

    outage_multinode.postgres.halt()
    store = f"127.0.0.1:{outage_multinode.postgres.port}"
    status, body, _ = api(node, "GET", "/api/v1/connectors", token)
    assert status == 503 and body["error"] == "store_unavailable", body
    assert store in body["message"] and "traffic carry on" in body["message"], body
    page = request(node, "GET", "/", headers={"Cookie": "gateway_admin_session=some-session"})
    text = page.body.decode()
    assert page.status == 503 and store in text and "traffic carry on" in text, (page.status, text[:2000])

    outage_multinode.postgres.resume()
    wait_until(lambda: api(node, "GET", "/api/v1/connectors", token)[0] == 200, 60, "the API to answer again")
    log = node.log()
    assert "Traceback" not in log and "admin request" not in log, log[-3000:]
