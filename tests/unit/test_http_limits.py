"""The front door's connection limits: in total, per address (IPv6 by /64), logged rate-limited."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from gateway_http import limits


def test_per_address_and_total_limits_refuse_and_release():
    """Over a limit admit says None; a released connection makes room again, per address and in total."""
    caps = limits.ConnectionLimits(Clock(), total=3, per_address=2)
    a1, a2 = caps.admit("10.0.0.1"), caps.admit("10.0.0.1")
    assert a1 == a2 == "10.0.0.1"
    assert caps.admit("::ffff:10.0.0.1") is None   # the same address, v4-mapped
    b1 = caps.admit("2001:db8::1")
    assert b1 == "2001:db8::/64"
    assert caps.admit("10.0.0.9") is None          # the total
    caps.release(a1)
    assert caps.admit("10.0.0.9") == "10.0.0.9"
    caps.release(b1)
    assert caps.admit("2001:db8::2") == "2001:db8::/64"
    assert caps.count == 3 and caps.by_address.counts == {"10.0.0.1": 1, "10.0.0.9": 1, "2001:db8::/64": 1}


def test_refusals_are_logged_once_per_address_per_interval():
    """A flood of refusals from one address is one log line per interval, the next one counting the rest."""
    clock = Clock()
    caps = limits.ConnectionLimits(clock, total=100, per_address=1)
    caps.admit("10.0.0.1")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(50):
            assert caps.admit("10.0.0.1") is None
        clock.advance(limits.LOG_INTERVAL)
        assert caps.admit("10.0.0.1") is None
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("limit") == "max_connections_per_address"]
    assert len(lines) == 2
    assert lines[0]["more"] == 0 and lines[1]["more"] == 49


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self):
        self.events = []

    def dataReceived(self, data):
        self.events.append(data)

    def readConnectionLost(self):
        self.events.append("read closed")

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        self.events.append("lost")


def test_the_limited_factory_refuses_over_the_limit_and_releases_on_close():
    """The factory builds nothing over the limit; a closed connection frees its slot; a half-close
    reaches the wrapped protocol."""
    caps = limits.ConnectionLimits(Clock(), total=10, per_address=1)
    factory = limits.LimitedFactory(Factory.forProtocol(Recorder), caps)
    address = IPv4Address("TCP", "127.0.0.1", 1234)
    first = factory.buildProtocol(address)
    first.makeConnection(StringTransport())
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1235)) is None
    assert IHalfCloseableProtocol.providedBy(first)
    wrapped = first.wrappedProtocol
    first.dataReceived(b"x")
    first.readConnectionLost()
    first.connectionLost(None)
    assert wrapped.events == [b"x", "read closed", "lost"]
    assert caps.count == 0
    second = factory.buildProtocol(IPv6Address("TCP", "::1", 1236))
    assert second is not None and caps.by_address.counts == {"::/64": 1}


def test_a_total_above_the_descriptor_limit_is_a_warning(monkeypatch):
    """max_connections above RLIMIT_NOFILE's hard limit (less a reserve) is logged; below it is not."""
    monkeypatch.setattr(limits, "descriptor_limit", lambda: 4096)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        limits.ConnectionLimits().configure(3000, 10, Clock())
        limits.ConnectionLimits().configure(10000, 10, Clock())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["total"] for e in events if "hard" in e] == [10000]


def test_every_front_door_listener_counts_against_the_configured_limits():
    """The shared listener and an app's own listener are limited factories over one set of limits,
    set from [http] when the listeners are made."""
    from gateway import plugins
    from gateway.config import parse_config

    import gateway_http

    data = {"service": {"state_dir": "/tmp/gw-state"}, "http": {"listen": "tcp:8080", "max_connections": 7,
                                                                "max_connections_per_address": 2},
            "apps": [{"name": "wiki", "external_url": "http://wiki.example.test:8080/",
                      "internal_url": "http://wiki.corp:8000/"},
                     {"name": "own", "protocol": "http", "listen": "tcp:8081", "destination": "own.corp:80",
                      "options": {"preauth": "none"}}]}
    config = parse_config(data, "gw.toml", plugins.config_sections(plugins.make_plugin_manager({})))
    registered = []
    gateway_http.gateway_service_listeners(lambda *a: registered.append(a), config, lambda app, extra: None, Clock())
    [(name, endpoint, factory)] = registered
    own = gateway_http.HTTPHandler().service_factory(config.apps[1], lambda extra: None, Clock())
    for built in (factory, own):
        assert isinstance(built, limits.LimitedFactory) and built.limits is gateway_http.CONNECTIONS
    assert (gateway_http.CONNECTIONS.total, gateway_http.CONNECTIONS.per_address) == (7, 2)
    gateway_http.CONNECTIONS.configure(limits.DEFAULT_MAX_CONNECTIONS, limits.DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
                                       None)
