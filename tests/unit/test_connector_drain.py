"""The connector's drain: no tunnel that comes up once it began takes a stream."""

from types import SimpleNamespace

from gateway.tunnel.frame import ResetCode
from gateway.tunnel.stream import StreamReset
from test_connector import RecordingHandler, make_connector, open_and_wait, tunnel_to


def test_a_tunnel_up_after_the_drain_began_says_go_away_and_refuses_streams(monkeypatch):
    """A tunnel whose welcome arrives during the drain sends GO_AWAY at once: a SYN crossing it is refused GOING_AWAY."""
    monkeypatch.setattr("gateway.plugins.notify", lambda *a, **k: None)
    handler = RecordingHandler()
    node = make_connector(handler)
    node.stopService()
    service, pump = tunnel_to(node)
    session = pump.client if pump.client is not service else pump.server
    node.tunnel_up(SimpleNamespace(session=session))
    result = open_and_wait(service, pump, {"kind": "app", "app": "web", "destination": "10.1.2.3:80"})
    assert service.peer_going_away
    assert result.check(StreamReset) and result.value.code == ResetCode.GOING_AWAY
    assert handler.calls == []
