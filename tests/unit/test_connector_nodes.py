"""A connector on a several-node service: where its tunnels go, and how that follows the node list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from gateway.config import parse_config
from gateway.connector.identity import CERT_FILE, KEY_FILE, ConnectorIdentity, write_settings
from gateway.connector.node import ConnectorNode
from gateway.connector.targets import BadNodeList, Target, chosen_nodes, parse_nodes, plan
from gateway.pki import keys
from gateway.pki.ca import CertificateAuthority
from gateway.service.tunnels import connector_nodes

NOW = datetime.now(UTC)


def nodes(*ports, host="127.0.0.1"):
    return [{"node_id": f"n{i + 1}", "address": f"{host}:{port}"} for i, port in enumerate(ports)]


def targets(*ports):
    return parse_nodes(nodes(*ports))


# -- the plan (pure) --------------------------------------------------------------------------


def test_without_a_node_list_tunnels_go_to_the_service_address():
    """Before any node list, `tunnels` tunnels go to the bootstrap address."""
    boot = [Target("gw.example", 8443)]
    assert plan(2, 8, (), boot, "c1") == {boot[0]: 2}


def test_a_name_resolving_to_several_addresses_spreads_the_tunnels():
    """DNS round robin: tunnels go to distinct addresses of the service's name."""
    boot = [Target("10.0.0.1", 8443), Target("10.0.0.2", 8443), Target("10.0.0.3", 8443)]
    assert plan(3, 8, (), boot, "c1") == dict.fromkeys(boot, 1)
    assert plan(2, 8, (), boot, "c1") == {boot[0]: 1, boot[1]: 1}


def test_every_listed_node_gets_a_tunnel_even_beyond_tunnels():
    """With 3 nodes and tunnels = 2 each node gets one; the bootstrap node is not dialled twice."""
    listed = targets(7001, 7002, 7003)
    wanted = plan(2, 8, listed, [Target("127.0.0.1", 7001)], "c1")
    assert wanted == dict.fromkeys(listed, 1)


def test_more_tunnels_than_nodes_are_spread_evenly():
    """tunnels = 5 over 2 nodes gives 3 and 2."""
    listed = targets(7001, 7002)
    assert sorted(plan(5, 8, listed, [Target("127.0.0.1", 7001)], "c1").values()) == [2, 3]


def test_the_bootstrap_address_keeps_a_tunnel_when_no_listed_node_has_it():
    """A service name no listed node has stays dialled (one tunnel), so a stale list can be replaced."""
    listed = targets(7001, 7002)
    boot = Target("gw.example", 443)
    wanted = plan(2, 8, listed, [boot], "c1")
    assert wanted == {listed[0]: 1, listed[1]: 1, boot: 1}


def test_max_nodes_bounds_the_nodes_and_connectors_start_at_different_places():
    """Above max_nodes a connector keeps max_nodes nodes; different connectors cover different ones."""
    listed = targets(*range(7001, 7011))
    picks = {tuple(t.node_id for t in chosen_nodes(listed, 3, f"connector-{i}")) for i in range(20)}
    assert all(len(p) == 3 and len(set(p)) == 3 for p in picks)
    assert len({n for p in picks for n in p}) == 10
    assert len(plan(2, 3, listed, [Target("127.0.0.1", 7001)], "c1")) <= 4


@pytest.mark.parametrize("value, named", [
    ("127.0.0.1:7001", "must be a list"),
    ([{"node_id": "n1"}], r"nodes\[0\] must be"),
    ([{"node_id": "", "address": "127.0.0.1:1"}], r"nodes\[0\] must be"),
    ([{"node_id": "n1", "address": "127.0.0.1"}], r"nodes\[0\]\.address: .* is not HOST:PORT"),
    ([{"node_id": "n1", "address": "127.0.0.1:0"}], r"nodes\[0\]\.address"),
    ([{"node_id": f"n{i}", "address": "127.0.0.1:1"} for i in range(300)], "more than 256"),
])
def test_a_malformed_node_list_is_refused_naming_the_entry(value, named):
    """parse_nodes refuses a node list that is not [{node_id, address}] and says which entry."""
    with pytest.raises(BadNodeList, match=named):
        parse_nodes(value)


def test_ipv6_node_addresses_are_understood():
    """A node at [::1]:7001 is dialled at host ::1, port 7001."""
    (target,) = parse_nodes([{"node_id": "n1", "address": "[::1]:7001"}])
    assert (target.host, target.port, target.address) == ("::1", 7001, "[::1]:7001")


# -- the connector following the list (MemoryReactor) -----------------------------------------


class _NoPlugins:
    class hook:
        @staticmethod
        def gateway_register_sso_providers(register):
            pass


class FakeResolver:
    """An IHostnameResolver answering one name with several IPv4 addresses."""

    def __init__(self, name, addresses):
        self.name, self.addresses = name, addresses

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        receiver.resolutionBegan(None)
        for a in self.addresses if hostName == self.name else [hostName]:
            receiver.addressResolved(IPv4Address("TCP", a, portNumber))
        receiver.resolutionComplete()


@pytest.fixture
def identity(tmp_path):
    ca = CertificateAuthority.create(NOW - timedelta(days=1))
    key = keys.generate_key()
    cert = ca.issue_client_certificate(keys.make_csr(key, "x"), "c0ffee00", NOW, timedelta(days=30))
    keys.write_private(tmp_path / KEY_FILE, keys.key_pem(key))
    keys.write_public(tmp_path / CERT_FILE, keys.cert_pem(cert))
    keys.write_public(tmp_path / "ca.pem", keys.cert_pem(ca.cert))
    return tmp_path


def started(state_dir, service_host="127.0.0.1", resolver=None, **connector):
    write_settings(state_dir, service_host=service_host, service_port=7001, server_name="gw.example",
                   connector_id="c0ffee00", group="default", name="test")
    config = parse_config({"connector": {"state_dir": str(state_dir), "proxy": "", **connector}}, "c.toml")
    reactor = MemoryReactorClock()
    if resolver is not None:
        reactor.nameResolver = resolver
    node = ConnectorNode(config, reactor, pm=_NoPlugins(), handlers={},
                         identity=ConnectorIdentity.load(state_dir))
    node.startService()
    reactor.advance(0)
    return node, reactor


def dialled(reactor):
    """How many TCP connections the connector asked for, per host:port."""
    counts = {}
    for host, port, *_ in reactor.tcpClients:
        counts[f"{host}:{port}"] = counts.get(f"{host}:{port}", 0) + 1
    return counts


def config(listed):
    return {"type": "config", "version": "v1", "group": "default", "apps": [], "nodes": listed}


def test_a_connector_dials_every_node_of_the_pushed_list(identity):
    """A config with 3 nodes makes the connector dial each of them (one already is the bootstrap)."""
    node, reactor = started(identity)
    assert dialled(reactor) == {"127.0.0.1:7001": 2}
    node.apply_config(config(nodes(7001, 7002, 7003)))
    reactor.advance(0)
    assert dialled(reactor) == {"127.0.0.1:7001": 2, "127.0.0.1:7002": 1, "127.0.0.1:7003": 1}
    assert {t.address: len(s) for t, s in node.slots.items()} == {
        "127.0.0.1:7001": 1, "127.0.0.1:7002": 1, "127.0.0.1:7003": 1}


def test_a_node_gone_from_the_list_is_no_longer_dialled_and_a_new_one_is(identity):
    """A node dropped from the list loses its slot (no redial); one added later gets a tunnel."""
    node, reactor = started(identity)
    node.apply_config(config(nodes(7001, 7002)))
    dropped = node.slots[Target("127.0.0.1", 7002, "n2")][0]
    node.apply_config(config(nodes(7001)[:1] + [{"node_id": "n3", "address": "127.0.0.1:7003"}]))
    reactor.advance(0)
    assert dropped.client.parent is None and not dropped.client.running
    assert {t.node_id for t in node.slots} == {"n1", "n3"}
    assert dialled(reactor)["127.0.0.1:7003"] == 1


def test_a_lost_tunnel_is_dialled_again_with_backoff(identity):
    """A failed connection to a node is retried to the same node after the backoff delay."""
    node, reactor = started(identity, backoff_initial=1.0, backoff_max=1.0)
    node.apply_config(config(nodes(7001, 7002)))
    reactor.advance(0)
    before = dialled(reactor)["127.0.0.1:7002"]
    _, _, factory, *_ = [c for c in reactor.tcpClients if c[1] == 7002][-1]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    for _ in range(4):   # the backoff (at most 1 s), then the endpoint's attempt
        reactor.advance(0.5)
    assert dialled(reactor)["127.0.0.1:7002"] > before


def test_a_malformed_node_list_keeps_the_previous_one(identity):
    """A bad `nodes` in a config is logged and the connector keeps its tunnels where they were."""
    node, reactor = started(identity)
    node.apply_config(config(nodes(7001, 7002)))
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        node.apply_config(config([{"node_id": "n9", "address": "nowhere"}]))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert {t.node_id for t in node.slots} == {"n1", "n2"}
    assert any("ignoring the node list" in e.get("log_format", "") and "nodes[0].address" in e.get("error", "")
               for e in seen)


def test_a_service_name_with_several_addresses_spreads_the_tunnels(identity):
    """A service name resolving to 3 addresses gets its 2 tunnels on 2 distinct addresses."""
    resolver = FakeResolver("gw.example", ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    node, reactor = started(identity, service_host="gw.example", resolver=resolver)
    assert dialled(reactor) == {"127.0.0.1:7001": 1, "127.0.0.2:7001": 1}


def test_an_empty_node_list_goes_back_to_the_service_address(identity):
    """A service that lists no nodes any more: the tunnels go to the bootstrap address again."""
    node, reactor = started(identity, service_host="gw.example",
                            resolver=FakeResolver("gw.example", ["127.0.0.9"]))
    node.apply_config(config(nodes(7002, 7003)))
    assert {t.address for t in node.slots} == {"127.0.0.1:7002",
                                               "127.0.0.1:7003", "127.0.0.9:7001"}
    node.apply_config(config([]))
    assert {t.address: len(s) for t, s in node.slots.items()} == {"127.0.0.9:7001": 2}


class FakeSession:
    """A live tunnel's session as far as retiring a slot looks at it."""

    def __init__(self, tunnel_id):
        self.tunnel_id, self.connected, self.went_away = tunnel_id, True, []
        self.idle = Deferred()

    def go_away(self, code, message):
        self.went_away.append((code, message))

    def wait_idle(self):
        return self.idle


def with_live_tunnel(node, node_id):
    (target,) = [t for t in node.slots if t.node_id == node_id]
    slot = node.slots[target][0]
    slot.session = FakeSession(f"t-{node_id}")
    node.tunnels[slot.session.tunnel_id] = object()
    return slot


def test_a_node_with_a_live_tunnel_is_kept_when_one_list_misses_it(identity):
    """A list lacking a node we hold a tunnel to (another node's older view) cuts nothing."""
    node, reactor = started(identity)
    node.apply_config(config(nodes(7001, 7002)))
    slot = with_live_tunnel(node, "n2")
    node.apply_config(config(nodes(7001)))
    assert not slot.retired and slot.session.went_away == []


def test_a_dropped_node_tunnel_drains_before_its_slot_goes(identity):
    """Retiring a slot with a live tunnel sends GO_AWAY and removes the slot once the tunnel is idle."""
    node, reactor = started(identity)
    node.apply_config(config(nodes(7001, 7002)))
    slot = with_live_tunnel(node, "n2")
    node._retire(slot)
    assert slot.session.went_away and slot.client.parent is node
    slot.session.idle.callback(None)
    assert slot.client.parent is None and all(slot not in s for s in node.slots.values())


def test_a_draining_connector_adds_no_tunnel_for_a_new_node(identity):
    """A node list arriving while the connector drains (SIGTERM) dials nothing new."""
    node, reactor = started(identity)
    node.draining = True
    node.apply_config(config(nodes(7001, 7002)))
    reactor.advance(0)
    assert "127.0.0.1:7002" not in dialled(reactor)


def test_a_lost_nodes_share_of_the_tunnels_goes_to_the_others(identity):
    """tunnels = 4 over 2 nodes is 2 and 2; once the list drops one, all 4 go to the other."""
    node, reactor = started(identity, tunnels=4)
    node.apply_config(config(nodes(7001, 7002)))
    assert {t.address: len(s) for t, s in node.slots.items()} == {"127.0.0.1:7001": 2, "127.0.0.1:7002": 2}
    node.apply_config(config(nodes(7001)))
    assert {t.address: len(s) for t, s in node.slots.items()} == {"127.0.0.1:7001": 4}


# -- the service's side: what the config carries ----------------------------------------------


def service_node(store, live):
    return SimpleNamespace(config=SimpleNamespace(service=SimpleNamespace(store=store)), nodes=lambda: live)


def test_the_config_lists_the_live_nodes_of_a_shared_store_only():
    """On PostgreSQL the config carries every live node with an address; on SQLite, or with no
    node known yet, it carries no `nodes` (connectors keep what they have)."""
    live = [SimpleNamespace(node_id="n1", tunnel_address="127.0.0.1:7001"),
            SimpleNamespace(node_id="n2", tunnel_address="")]
    assert connector_nodes(service_node("postgresql://gw@db/gw", live)) == {
        "nodes": [{"node_id": "n1", "address": "127.0.0.1:7001"}]}
    assert connector_nodes(service_node("", live)) == {}
    assert connector_nodes(service_node("postgresql://gw@db/gw", [])) == {}
