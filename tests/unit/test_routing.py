"""The service's router: retries on another connector only what never reached the back end."""

from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, connect

from gateway.config import parse_config
from gateway.service.node import ServiceNode
from gateway.service.registry import ConnectorTunnel, NoConnector
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.session import TunnelSession, TunnelSettings
from gateway.tunnel.stream import StreamReset


def node_with(*behaviours, metrics=None):
    """A service node (with ``metrics``, a gateway.metrics.Metrics, if given) whose registry holds
    one in-memory tunnel per behaviour(stream)."""
    config = parse_config({
        "service": {"state_dir": "/tmp/unused"},
        "apps": [{"name": "web", "listen": "tcp:0", "destination": "10.0.0.5:80", "options": {"preauth": "none"}}],
    }, "svc.toml")
    node = ServiceNode(config, Clock(), pm=None, handlers={}, metrics=metrics)
    pumps = []
    for i, behaviour in enumerate(behaviours):
        clock = Clock()
        service = TunnelSession(clock, TunnelSettings(), is_client=False)
        connector = TunnelSession(clock, TunnelSettings(), is_client=True, on_stream=behaviour)
        pumps.append(connect(service, FakeTransport(service, True), connector, FakeTransport(connector, False),
                             greet=False))
        node.registry.add(ConnectorTunnel(session=service, connector_id=f"c{i}", group="default", address="x"))
    return node, pumps


def refuse(code, reason, asked=None):
    def behaviour(stream):
        if asked is not None:
            asked.append(stream.metadata["request_id"])
        stream.reset(code, reason)
    return behaviour


def accept(stream):
    stream.accept()


def open_web(node, pumps, monkeypatch, extra=None, connector=None):
    monkeypatch.setattr("gateway.plugins.notify", lambda *a, **k: None)
    d = node.open_app_stream(node.apps["web"], extra or {}, connector=connector)
    for _ in range(4):
        for p in pumps:
            p.flush()
    result = []
    d.addBoth(result.append)
    assert result, "the open did not finish"
    return result[0]


def test_connect_failure_is_retried_on_another_connector(monkeypatch):
    """A connector that could not reach the back end hands the stream to the next connector."""
    asked = []
    node, pumps = node_with(refuse(ResetCode.CONNECT_FAILED, "connection refused", asked), accept)
    result = open_web(node, pumps, monkeypatch)
    assert not hasattr(result, "check"), result
    assert result.session is node.registry._tunnels["c1"][0].session
    assert len(asked) == 1 and asked[0] == result.metadata["request_id"], "the first connector was not tried"


def test_refusal_by_policy_is_not_retried(monkeypatch):
    """A REFUSED stream (destination not allowed) fails at once with its reason."""
    node, pumps = node_with(refuse(ResetCode.REFUSED, "not allowed"), accept)
    result = open_web(node, pumps, monkeypatch)
    assert result.check(StreamReset) and result.value.code == ResetCode.REFUSED


def test_all_connectors_failing_reports_the_real_reason(monkeypatch):
    """When every connector fails to connect, the error is the connect failure, not 'no connector'."""
    node, pumps = node_with(refuse(ResetCode.CONNECT_FAILED, "connection refused by 10.0.0.5:80"),
                            refuse(ResetCode.CONNECT_FAILED, "connection refused by 10.0.0.5:80"))
    result = open_web(node, pumps, monkeypatch)
    assert result.check(StreamReset) and "10.0.0.5:80" in result.value.reason


# -- a group whose connectors are all restarting ------------------------------------------------


class _Lifecycle:
    def changed(self, connector_id):
        pass


def tunnel_up(node, connector_id, behaviour):
    """A connector tunnel (connector end serving with ``behaviour``) brought up the way TunnelHandler
    does (node.tunnel_up); returns (service session, connector session, pump)."""
    from types import SimpleNamespace
    service = TunnelSession(node.reactor, TunnelSettings(), is_client=False)
    connector = TunnelSession(node.reactor, TunnelSettings(), is_client=True, on_stream=behaviour)
    pump = connect(service, FakeTransport(service, True), connector, FakeTransport(connector, False), greet=False)
    entry = ConnectorTunnel(session=service, connector_id=connector_id, group="default", address="x")
    node.tunnel_up(SimpleNamespace(entry=entry, group="default", address="x", session=service,
                                   identity=SimpleNamespace(serial_hex="00", connector_id=connector_id),
                                   ctx={"connector_id": connector_id, "tunnel_id": service.tunnel_id}))
    return service, connector, pump


def open_while_the_only_connector_drained(monkeypatch):
    """A node whose group's one connector said GO_AWAY NORMAL, and a stream asked for then: (node, its result list)."""
    monkeypatch.setattr("gateway.plugins.notify", lambda *a, **k: None)
    node, _ = node_with()
    node.lifecycle = _Lifecycle()
    _, old, pump = tunnel_up(node, "c0", accept)
    old.go_away()
    pump.flush()
    result = []
    node.open_app_stream(node.apps["web"], {}).addBoth(result.append)
    return node, result


def test_a_stream_while_the_only_connector_restarts_waits_for_it_and_goes_to_the_new_tunnel(monkeypatch):
    """The group's only connector drains (GO_AWAY NORMAL): a new stream waits, and opens once a tunnel is up again."""
    node, result = open_while_the_only_connector_drained(monkeypatch)
    assert result == []   # waiting, not failed
    opened_on_a_new_tunnel(node, result)


def opened_on_a_new_tunnel(node, result):
    """A tunnel of c0 comes up: the waiting stream (its result in ``result``) opens on it."""
    service, _, pump = tunnel_up(node, "c0", accept)
    for _ in range(3):
        pump.flush()
    assert len(result) == 1 and not hasattr(result[0], "check"), result
    assert result[0].session is service


def turned_away_by_both_tunnels(monkeypatch):
    """Both tunnels of the group's one connector drain, the stream is sent to each in turn: (node, result)."""
    monkeypatch.setattr("gateway.plugins.notify", lambda *a, **k: None)
    node, _ = node_with()
    node.lifecycle = _Lifecycle()
    tunnels = [tunnel_up(node, "c0", accept) for _ in range(2)]
    for _, connector, _ in tunnels:
        connector.go_away()   # both connector ends drain; nothing has reached the service yet
    result = []
    node.open_app_stream(node.apps["web"], {}).addBoth(result.append)
    first = next(t for t in tunnels if t[0].open_streams)
    first[2].flush()          # GO_AWAY and the reset on the first tunnel: the stream moves on
    second = next(t for t in tunnels if t is not first)
    assert second[0].open_streams == 1, "the stream did not go to the connector's other tunnel"
    second[2].flush()         # ... which turns it away too
    return node, result


def test_a_stream_turned_away_by_each_tunnel_of_a_draining_connector_in_turn_still_waits_for_it(monkeypatch):
    """A connector with two tunnels drains: its GO_AWAY reaches the service on one tunnel first, so
    the stream that tunnel turned away is sent to the other one, which still looks healthy and
    turns it away a moment later. The stream waits on for the connector to come back (it failed
    with GOING_AWAY here: the wait was taken once only, and ended at once on the healthy-looking
    second tunnel)."""
    node, result = turned_away_by_both_tunnels(monkeypatch)
    assert result == [], f"the stream failed instead of waiting for the connector: {result}"
    opened_on_a_new_tunnel(node, result)


def test_a_wait_after_drains_that_runs_out_says_so(monkeypatch):
    """The connector does not come back within connect_timeout: the stream fails saying no connector
    came up in time, not with the GOING_AWAY that sent it waiting."""
    node, result = turned_away_by_both_tunnels(monkeypatch)
    node.reactor.advance(node.apps["web"].connect_timeout)
    assert len(result) == 1 and result[0].check(NoConnector), result
    assert "came up within 10s" in result[0].getErrorMessage(), result[0]


def test_a_refusal_that_is_not_a_drain_waits_no_more_than_once(monkeypatch):
    """While the group restarts, a connector that cannot reach the back end fails the stream after
    one wait: waiting again would only dial the dead back end again and again."""
    asked = []
    node, result = open_while_the_only_connector_drained(monkeypatch)
    service, _, pump = tunnel_up(node, "c0", refuse(ResetCode.CONNECT_FAILED, "connection refused", asked))
    for _ in range(3):
        pump.flush()
    assert len(result) == 1 and result[0].check(StreamReset), result
    assert result[0].value.code == ResetCode.CONNECT_FAILED and len(asked) == 1, asked


def test_the_wait_for_a_restarting_connector_ends_after_connect_timeout(monkeypatch):
    """No connector back within the app's connect_timeout: the stream fails with NoConnector."""
    node, result = open_while_the_only_connector_drained(monkeypatch)
    assert result == []
    node.reactor.advance(node.apps["web"].connect_timeout)
    assert len(result) == 1 and result[0].check(NoConnector), result


def test_a_group_that_never_drained_fails_at_once_without_waiting(monkeypatch):
    """A group with no connector and no drain is dark for real: NoConnector at once, nothing waits."""
    monkeypatch.setattr("gateway.plugins.notify", lambda *a, **k: None)
    node, _ = node_with()
    result = []
    node.open_app_stream(node.apps["web"], {}).addBoth(result.append)
    assert len(result) == 1 and result[0].check(NoConnector), result
    assert node._connector_waiters == {}


# -- a plugin choosing the connector (the http front door's balance = "request") ----------------


def test_choose_connector_takes_equally_loaded_connectors_in_turn_and_open_stream_goes_there(monkeypatch):
    node, pumps = node_with(accept, accept, accept)
    chosen = [node.choose_connector(node.apps["web"]) for _ in range(6)]
    assert chosen == ["c0", "c1", "c2", "c0", "c1", "c2"]
    result = open_web(node, pumps, monkeypatch, connector="c2")
    assert result.session is node.registry._tunnels["c2"][0].session


def test_a_chosen_connector_that_stopped_taking_streams_is_passed_over(monkeypatch):
    node, pumps = node_with(accept, accept)
    node.registry._tunnels["c1"][0].session.go_away()
    result = open_web(node, pumps, monkeypatch, connector="c1")
    assert result.session is node.registry._tunnels["c0"][0].session
