"""State that lived in one node's memory, now shared by every node through the store (issue 15):
the status page's sessions, the browser sign-in's one-time codes and a group's update lease and
halt, through real twistd nodes on 127.0.0.1 sharing a throwaway PostgreSQL database
(tests/integration/multinode.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from gateway_harness import HOST, free_port, listening, subprocess_env, toml_table, wait_until
from test_admin_api import (_csrf_field, create_admin_token, request, session_cookie, sign_in,
                            signin_form, token_text)

# A user's client trading a sign-in code for a certificate at one node's tunnel port, as
# `gateway login` does once the browser hands it the code; it waits for a common start time so
# that two of them ask two nodes at the same moment.
REDEEM = """
import sys, time
from pathlib import Path
from twisted.internet import task
from twisted.internet.defer import Deferred
from gateway.access import login
from gateway.pki import keys

tunnel, ca_pem, code, verifier, start_at = sys.argv[1:6]
fingerprint = keys.fingerprint(keys.load_cert(Path(ca_pem).read_bytes()))


async def main(reactor):
    time.sleep(max(0.0, float(start_at) - time.time()))
    try:
        _, reply, _ = await login.request_certificate(reactor, tunnel, "127.0.0.1", fingerprint,
                                                      {"kind": "code", "code": code, "verifier": verifier})
        print("GRANTED", reply["user"]["sub"], flush=True)
    except login.LoginError as e:
        print("REFUSED", e, flush=True)

task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
"""


def with_admin(node) -> None:
    """Give a node (not started yet) an [admin] listener over TLS on a free loopback port."""
    node.admin_port, node.admin_tls = free_port(), True
    node.config_path.write_text(node.config_path.read_text() + "\n" + toml_table(
        "admin", {"listen": f"tcp:{node.admin_port}:interface={HOST}"}))


def admin_nodes(multinode, count: int) -> list:
    nodes = []
    for _ in range(count):
        node = multinode.add_node(start=False)
        with_admin(node)
        node.start()
        nodes.append(node)
    for node in nodes:
        wait_until(lambda: listening(node.admin_port), 20, "the admin listener")
    return nodes


@pytest.mark.timeout(150)
def test_a_status_page_session_made_at_one_node_works_at_another_and_ends_on_revocation(gw, multinode):
    """Signed in at node 1, the cookie opens node 2's page (the session survives node 1's restart);
    signing out at node 2 with its page's CSRF token ends it at node 1; a session of a token
    revoked through node 1 is sent to /signin by node 2."""
    node1, node2 = admin_nodes(multinode, 2)
    token_id, path = create_admin_token(gw, node1)
    cookie, field = signin_form(node1)
    jar = {"Cookie": session_cookie(sign_in(node1, token_text(path), cookie, field)).split(";")[0]}
    page = request(node2, "GET", "/", headers=jar)
    assert page.status == 200 and b"Gateway status" in page.body
    node1.proc.stop()
    node1.start()
    wait_until(lambda: listening(node1.admin_port), 20, "node 1's admin listener again")
    assert request(node1, "GET", "/", headers=jar).status == 200
    signout = request(node2, "POST", "/signout", f"csrf={_csrf_field(page.body.decode())}".encode(),
                      {**jar, "Content-Type": "application/x-www-form-urlencoded"})
    assert signout.status == 303
    assert request(node1, "GET", "/", headers=jar).status == 303
    cookie, field = signin_form(node2)
    jar = {"Cookie": session_cookie(sign_in(node2, token_text(path), cookie, field)).split(";")[0]}
    assert request(node1, "GET", "/", headers=jar).status == 200
    assert multinode.cli(node1, "admin", "token", "revoke", token_id).returncode == 0
    response = request(node2, "GET", "/", headers=jar)
    assert response.status == 303 and response.getheader("Location") == "/signin"


def store_code(multinode, code: str, verifier: str) -> None:
    """Record a sign-in code in the shared store as a node's front door does once the browser signed alice in."""
    script = """
import sys
from datetime import UTC, datetime, timedelta
from gateway.pkce import s256
from gateway.pki.tokens import hash_secret
from gateway.store.postgresql import PostgreSQLStore
from gateway.store.records import LoginCode

store = PostgreSQLStore(sys.argv[1])
now = datetime.now(UTC)
identity = {"sub": "alice-sub", "name": "Alice", "email": "alice@example.test", "email_verified": True, "groups": []}
store.add_login_code(hash_secret(sys.argv[2]), LoginCode(identity, s256(sys.argv[3]), now + timedelta(seconds=120)),
                     now, 1024)
store.close()
"""
    result = subprocess.run([sys.executable, "-c", script, multinode.url, code, verifier], capture_output=True,
                            text=True, env=subprocess_env(), timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(150)
def test_a_sign_in_code_redeemed_at_two_nodes_at_once_is_accepted_once(gw, multinode):
    """One code sent by two clients to two nodes' tunnel ports at the same moment buys one certificate;
    the other client hears the code is used; neither node logs an internal error."""
    for _ in range(2):
        node = multinode.add_node(start=False)
        node.config_path.write_text(node.config_path.read_text() + "\n"
                                    + toml_table("access", {"tunnel": node.address}))
        node.start()
    multinode.wait_nodes()
    node1, node2 = multinode.nodes
    code, verifier = "c0de" * 11, "v" * 50
    store_code(multinode, code, verifier)
    start_at = str(time.time() + 4)   # both clients have imported gateway by then
    runs = [subprocess.Popen([sys.executable, "-c", REDEEM, node.address, str(node1.state_dir / "ca.pem"), code,
                              verifier, start_at], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=subprocess_env())
            for node in (node1, node2)]
    outputs = [run.communicate(timeout=60)[0] for run in runs]
    for out in outputs:
        gw.cli_logs.append(("redeem a sign-in code", out))
    granted = [out for out in outputs if out.startswith("GRANTED alice-sub")]
    refused = [out for out in outputs if out.startswith("REFUSED") and "unknown, used or expired" in out]
    assert len(granted) == 1 and len(refused) == 1, outputs
    for node in (node1, node2):
        assert "internal error" not in node.log()


# An updater's request on the update exchange, as connector STATE_DIR, at one node's tunnel port:
# prints the service's JSON answer.
UPDATE_REQUEST = """
import json, sys
from pathlib import Path
import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred
from gateway.connector.identity import ConnectorIdentity
from gateway.updater.exchange import UpdateClient

state_dir, port, op, params = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])


async def main(reactor):
    ident = attrs.evolve(ConnectorIdentity.load(Path(state_dir)), service_port=port)
    print(json.dumps(await UpdateClient(reactor, lambda: ident).request(op, **params)), flush=True)

task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
"""


def update_request(gw, connector, node, op: str, **params) -> dict:
    """The answer of `node` to connector's updater asking `op`."""
    result = subprocess.run([sys.executable, "-c", UPDATE_REQUEST, str(connector.state_dir), str(node.port), op,
                             json.dumps(params)], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    gw.cli_logs.append((f"update {op} at {node.name} as {connector.name}", result.stdout + result.stderr))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def up_on(node, connector) -> bool:
    """Whether `node` logged a tunnel of `connector` up."""
    pattern = rf"connector {connector.connector_id} \(group \S+\) up on tunnel {node.name}/"
    return re.search(pattern, node.log()) is not None


@pytest.mark.timeout(180)
def test_a_groups_update_lease_held_via_one_node_is_refused_via_another_and_its_halt_outlives_a_restart(
        gw, multinode):
    """Connector A's lease taken at node 1 refuses B's at node 2 naming A; A's failed release at node 1
    halts the version at node 2, still after node 2 restarts; gateway update resume lifts it and B's
    lease is granted."""
    node1, node2 = multinode.start(2)
    a, b = multinode.connector(node1, name="upa"), multinode.connector(node1, name="upb")
    wait_until(lambda: all(up_on(n, c) for n in (node1, node2) for c in (a, b)), 60,
               "both connectors' tunnels on both nodes")
    assert update_request(gw, a, node1, "lease", version="9.9", duration=600)["granted"] is True
    refused = update_request(gw, b, node2, "lease", version="9.9", duration=600)
    assert refused["granted"] is False and f"connector {a.connector_id} of group 'default' is updating to 9.9" \
        in refused["reason"], refused
    assert update_request(gw, a, node1, "release", version="9.9", outcome="failed")["released"] is True
    node2.proc.stop()
    node2.start()
    multinode.wait_nodes()
    assert update_request(gw, b, node2, "manifest")["halted"] == "9.9"
    halted = update_request(gw, b, node2, "lease", version="9.9", duration=600)
    assert halted["granted"] is False and "gateway update resume --group default" in halted["reason"], halted
    resumed = multinode.cli(node2, "update", "resume", "--group", "default")
    assert resumed.returncode == 0 and "the rollout of 9.9 to group 'default' goes on" in resumed.stderr, resumed
    wait_until(lambda: up_on(node2, a), 60, "connector A's tunnel on the restarted node 2")
    assert update_request(gw, b, node2, "lease", version="9.9", duration=600)["granted"] is True
