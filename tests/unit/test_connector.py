"""The connector's stream dispatch and the service's routing, without real sockets."""

from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, connect

from gateway.config import parse_config
from gateway.connector.node import ConnectorNode, jittered_backoff
from gateway.service.registry import ConnectorTunnel, NoConnector, Registry
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.session import TunnelSession, TunnelSettings
from gateway.tunnel.stream import StreamReset


class RecordingHandler:
    name = "tcp"

    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail

    def connector_stream(self, stream, app, reactor):
        if self.fail:
            raise RuntimeError("plugin exploded")
        self.calls.append((stream, app))
        stream.accept()


def make_connector(handler):
    config = parse_config({"connector": {"state_dir": "/tmp/unused"}}, "connector.toml")
    identity = SimpleNamespace(connector_id="c0ffee", group="default", name="test")
    node = ConnectorNode(config, Clock(), pm=_NoPlugins(), handlers={"tcp": handler}, identity=identity)
    node.apply_config({
        "type": "config", "version": "v1", "group": "default",
        "apps": [{"name": "web", "protocol": "tcp", "destination": "10.1.2.3:80", "host": "10.1.2.3", "port": 80}],
    })
    return node


class _NoPlugins:
    class hook:
        @staticmethod
        def gateway_register_sso_providers(register):
            pass


def tunnel_to(node):
    clock = Clock()
    service = TunnelSession(clock, TunnelSettings(), is_client=False)
    connector = TunnelSession(clock, TunnelSettings(), is_client=True, on_stream=node.dispatch)
    pump = connect(service, FakeTransport(service, True), connector, FakeTransport(connector, False), greet=False)
    return service, pump


def open_and_wait(service, pump, metadata):
    d = service.open_stream(metadata)
    pump.flush()
    result = []
    d.addBoth(result.append)
    return result[0]


def test_connector_dials_only_its_apps_destinations():
    """A stream naming a destination other than the app's is reset with REFUSED and a reason."""
    handler = RecordingHandler()
    node = make_connector(handler)
    service, pump = tunnel_to(node)
    result = open_and_wait(service, pump, {"kind": "app", "app": "web", "destination": "10.9.9.9:22"})
    assert result.check(StreamReset)
    assert result.value.code == ResetCode.REFUSED
    assert "10.9.9.9:22" in result.value.reason and "only the destinations its apps name" in result.value.reason
    assert handler.calls == []


def test_connector_serves_its_app():
    """A stream for a configured app and its destination goes to the protocol handler."""
    handler = RecordingHandler()
    node = make_connector(handler)
    service, pump = tunnel_to(node)
    stream = open_and_wait(service, pump, {"kind": "app", "app": "web", "destination": "10.1.2.3:80"})
    assert not hasattr(stream, "check")
    (served, app), = handler.calls
    assert app.host == "10.1.2.3" and app.port == 80


def test_unknown_app_is_reset_with_reason():
    """A stream for an app the connector's config lacks is reset UNKNOWN_APP."""
    node = make_connector(RecordingHandler())
    service, pump = tunnel_to(node)
    result = open_and_wait(service, pump, {"kind": "app", "app": "payroll", "destination": "10.1.2.3:80"})
    assert result.value.code == ResetCode.UNKNOWN_APP and "payroll" in result.value.reason


def test_faulty_plugin_resets_only_that_stream():
    """A protocol handler that raises resets the stream INTERNAL_ERROR; the tunnel stays usable."""
    node = make_connector(RecordingHandler(fail=True))
    service, pump = tunnel_to(node)
    result = open_and_wait(service, pump, {"kind": "app", "app": "web", "destination": "10.1.2.3:80"})
    assert result.value.code == ResetCode.INTERNAL_ERROR and "plugin exploded" in result.value.reason
    assert service.connected and service.available


def test_malformed_config_keeps_last_good_one():
    """A config message that cannot be parsed is ignored and the previous apps stay."""
    node = make_connector(RecordingHandler())
    node.apply_config({"type": "config", "version": "v2", "apps": [{"name": "broken"}]})
    assert node.config_version == "v1" and set(node.apps) == {"web"}


def test_backoff_grows_with_jitter_and_is_capped():
    """Delays are random up to an exponential bound that never exceeds the maximum."""
    policy = jittered_backoff(1.0, 60.0)
    early = [policy(0) for _ in range(500)]
    late = [policy(20) for _ in range(500)]
    assert all(0 <= d <= 1.0 for d in early) and max(early) > 0.9 and min(early) < 0.1
    assert all(0 <= d <= 60.0 for d in late) and max(late) > 50
    assert len({round(d, 6) for d in late}) > 400


def _tunnel(connector_id, open_streams, group="default", healthy=True, capacity=1.0):
    session = SimpleNamespace(open_streams=open_streams, available=healthy)
    return ConnectorTunnel(session=session, connector_id=connector_id, group=group, address="x",
                           load={"capacity": capacity})


def test_registry_picks_least_loaded_healthy_connector_of_the_group():
    """Routing prefers the connector with the fewest open streams per capacity, skipping unhealthy ones and other groups."""
    r = Registry()
    r.add(_tunnel("a", 5))
    r.add(_tunnel("b", 2))
    r.add(_tunnel("c", 0, healthy=False))
    r.add(_tunnel("d", 0, group="other"))
    assert r.pick("default").connector_id == "b"
    r.add(_tunnel("e", 3, capacity=4.0))
    assert r.pick("default").connector_id == "e"
    assert r.pick("default", exclude=frozenset({"e", "b"})).connector_id == "a"


def test_registry_without_connectors_says_so():
    """No healthy connector in the group is a NoConnector error naming the group."""
    r = Registry()
    r.add(_tunnel("a", 0, healthy=False))
    with pytest.raises(NoConnector, match="group 'default'"):
        r.pick("default")


def test_tied_connectors_take_turns():
    """Equally loaded connectors share sequential streams evenly."""
    r = Registry()
    for name in ("a", "b", "c"):
        r.add(_tunnel(name, 0))
    picks = [r.pick("default").connector_id for _ in range(300)]
    assert {n: picks.count(n) for n in "abc"} == {"a": 100, "b": 100, "c": 100}


def test_affinity_keeps_a_client_on_its_connector_while_healthy():
    """With an affinity key the same key lands on the same connector; when it leaves only its keys move."""
    r = Registry()
    tunnels = {name: _tunnel(name, 0) for name in "abc"}
    for t in tunnels.values():
        r.add(t)
    first = {k: r.pick("default", affinity=f"client:10.0.0.{k}").connector_id for k in range(60)}
    assert all(r.pick("default", affinity=f"client:10.0.0.{k}").connector_id == c for k, c in first.items())
    assert len(set(first.values())) == 3, "keys should spread over the connectors"
    gone = first[0]
    tunnels[gone].session.available = False
    after = {k: r.pick("default", affinity=f"client:10.0.0.{k}").connector_id for k in range(60)}
    assert all(after[k] == c for k, c in first.items() if c != gone)
    assert all(after[k] != gone for k in after)


def test_affinity_key_follows_the_app_setting():
    """affinity "client" keys on the address without the port; "user" prefers the user; "none" has no key."""
    from gateway.config import parse_config
    from gateway.service.node import affinity_key

    def app(affinity):
        return parse_config({"service": {"state_dir": "/tmp/x"}, "apps": [
            {"name": "a", "listen": "tcp:0", "destination": "10.0.0.1:22", "affinity": affinity,
             "options": {"preauth": "none"}}]}, "s.toml").apps[0]

    assert affinity_key(app("none"), {"client": "1.2.3.4:5555"}) is None
    assert affinity_key(app("client"), {"client": "1.2.3.4:5555"}) == affinity_key(app("client"), {"client": "1.2.3.4:6"})
    assert affinity_key(app("user"), {"client": "1.2.3.4:5", "user": "alice"}) == "user:alice"
    assert affinity_key(app("user"), {"client": "1.2.3.4:5"}) == "client:1.2.3.4"
