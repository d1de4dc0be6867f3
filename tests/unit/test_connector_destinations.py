"""The connector's own check of private apps' destinations, and its UDP flows, without real sockets."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import MessageLengthError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

import gateway_tcp
from gateway.config import AppConfig
from gateway.connector import destinations
from gateway.connector.destinations import DestinationRefused, NoAddress
from gateway.segments import DestinationError, Where, parse_segments, segment_table
from gateway.tunnel.datagrams import DatagramDecoder, encode_datagram
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.stream import HIGH_WATER, StreamReset

from test_connector import RecordingHandler, _NoPlugins, open_and_wait, tunnel_to


def private_app(*segments: dict, **options) -> AppConfig:
    parsed = parse_segments(list(segments), Where("test", "segments"))
    return AppConfig(name="corp", listen="", destination="", host="", port=0, segments=parsed,
                     options=dict(options))


CORP = private_app({"destination": "10.1.0.0/16", "ports": "22,8000-8100"},
                   {"destination": "db.corp.example", "ports": 5432},
                   {"destination": "*.svc.corp.example", "ports": 443},
                   {"destination": "10.53.0.1", "ports": 53, "protocol": "udp"})


class FakeResolver:
    """An IHostnameResolver answering from a table, recording every name it was asked."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[tuple[str, str]] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append((hostName, transportSemantics))
        receiver.resolutionBegan(None)
        for address in self.table.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind(transportSemantics, address, portNumber))
        receiver.resolutionComplete()
        return None


# -- step 1: the destination as asked ------------------------------------------------------


@given(st.integers(0, 0xFFFF), st.sampled_from([22, 8000, 8050, 8100]))
def test_addresses_inside_the_cidr_and_ports_are_asked_for_fine(low, port):
    """Any address of 10.1.0.0/16 on a listed port passes the as-asked check with the CIDR's segment."""
    address = str(ipaddress.IPv4Address(0x0A010000 + low))
    host, got_port, segment = destinations.requested(CORP, f"{address}:{port}", "tcp")
    assert (host, got_port) == (address, port) and str(segment.destination) == "10.1.0.0/16"


@given(st.integers(0, 0xFFFFFFFF).filter(lambda n: n >> 16 != 0x0A01 and n != 0x0A350001))
def test_addresses_outside_every_segment_are_refused_as_asked(n):
    """An address outside every CIDR and address segment is refused naming it and the app's segments."""
    address = str(ipaddress.IPv4Address(n))
    with pytest.raises(DestinationRefused) as e:
        destinations.requested(CORP, f"{address}:22", "tcp")
    assert address in str(e.value) and "tcp 10.1.0.0/16:22,8000-8100" in str(e.value)


@pytest.mark.parametrize("destination, transport", [
    ("10.1.2.3:23", "tcp"), ("10.1.2.3:22", "udp"), ("10.53.0.1:53", "tcp"), ("other.corp.example:5432", "tcp"),
    ("svc.corp.example:443", "tcp"),
])
def test_wrong_port_transport_or_name_is_refused_as_asked(destination, transport):
    """A port, a transport or a name no segment lists is refused before anything is resolved."""
    with pytest.raises(DestinationRefused, match="outside the segments of app corp"):
        destinations.requested(CORP, destination, transport)


@pytest.mark.parametrize("destination", [None, "", "10.1.2.3", "10.1.2.3:", "10.1.2.3:x", "::1:22", "[::1]:999999",
                                         "a..b:22", "10.1.2.3:0"])
def test_malformed_destinations_are_refused_saying_why(destination):
    """Metadata that is not host:port (IPv6 in brackets, port 1..65535) is refused, not guessed at."""
    with pytest.raises(DestinationRefused, match="destination"):
        destinations.requested(CORP, destination, "tcp")


def test_unknown_transport_is_refused():
    """A transport other than tcp or udp is refused naming it."""
    with pytest.raises(DestinationRefused, match="'sctp'"):
        destinations.requested(CORP, "10.1.2.3:22", "sctp")


def test_ipv6_destination_in_brackets_parses():
    """[address]:port gives the bare address and the port."""
    assert destinations.parse_host_port("[2001:db8::1]:443") == ("2001:db8::1", 443)
    with pytest.raises(DestinationError):
        destinations.parse_host_port("2001:db8::1:443")


# -- step 2: the address resolved -------------------------------------------------------------


@given(st.integers(0, 0xFFFFFFFF).filter(lambda n: n >> 16 != 0x0A01 and not ipaddress.IPv4Address(n).is_loopback))
def test_a_named_host_is_dialled_at_any_ordinary_address_it_resolves_to(n):
    """A name segment lets the connector dial whatever non-special address the name resolves to."""
    address = str(ipaddress.IPv4Address(n))
    if ipaddress.IPv4Address(n).is_link_local or ipaddress.IPv4Address(n).is_multicast or n == 0:
        with pytest.raises(DestinationRefused):
            destinations.choose_address(CORP, "db.corp.example", [address], 5432, "tcp")
        return
    assert destinations.choose_address(CORP, "db.corp.example", [address], 5432, "tcp")[0] == address


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "0.0.0.0", "fe80::1",
                                     "::ffff:127.0.0.1"])
def test_a_name_never_reaches_loopback_or_metadata_addresses(address):
    """A name resolving to loopback, link-local or unspecified is refused, naming what it resolved to."""
    with pytest.raises(DestinationRefused) as e:
        destinations.choose_address(CORP, "db.corp.example", [address], 5432, "tcp")
    text = str(e.value)
    assert "db.corp.example:5432/tcp resolved to" in text and address in text and "db.corp.example:5432" in text


def test_loopback_through_a_name_is_allowed_when_an_address_segment_lists_it():
    """An address segment listing 127.0.0.1 lets a name that resolves there through."""
    app = private_app({"destination": "echo.corp.example", "ports": 7}, {"destination": "127.0.0.1", "ports": 7})
    assert destinations.choose_address(app, "echo.corp.example", ["127.0.0.1"], 7, "tcp")[0] == "127.0.0.1"


def test_a_wildcard_name_resolving_outside_picks_the_first_allowed_address():
    """Of several addresses, the first one a segment allows is the one dialled; special ones are skipped."""
    address, segment = destinations.choose_address(
        CORP, "api.svc.corp.example", ["127.0.0.1", "fe80::1%eth0", "192.0.2.7"], 443, "tcp")
    assert address == "192.0.2.7" and str(segment) == "tcp *.svc.corp.example:443"


def test_a_name_without_a_name_segment_reaching_outside_the_cidr_is_refused():
    """A name the CIDR segment would need to resolve into, but that resolves outside it, is refused."""
    app = private_app({"destination": "10.1.0.0/16", "ports": 22}, {"destination": "*.corp.example", "ports": 80})
    with pytest.raises(DestinationRefused, match=r"host.corp.example:22/tcp resolved to 192.0.2.1, 10.2.0.1"):
        destinations.choose_address(app, "host.corp.example", ["192.0.2.1", "10.2.0.1"], 22, "tcp")
    assert destinations.choose_address(app, "host.corp.example", ["192.0.2.1", "10.1.9.9"], 22, "tcp")[0] == "10.1.9.9"


def test_no_address_is_not_a_refusal():
    """A name the resolver has no address for is NoAddress (a connect failure), not a policy refusal."""
    with pytest.raises(NoAddress, match="could not resolve db.corp.example"):
        destinations.choose_address(CORP, "db.corp.example", [], 5432, "tcp")


def test_resolve_asks_the_resolver_for_names_only():
    """A name goes to the resolver once with the transport; an address literal is never resolved."""
    resolver = FakeResolver({"db.corp.example": ["10.9.9.9", "2001:db8::9"]})
    got = []
    destinations.resolve(resolver, "db.corp.example", "udp").addCallback(got.append)
    destinations.resolve(resolver, "::ffff:10.1.2.3", "tcp").addCallback(got.append)
    assert got == [["10.9.9.9", "2001:db8::9"], ["10.1.2.3"]]
    assert resolver.asked == [("db.corp.example", "UDP")]


def test_dial_target_is_exactly_the_checked_address():
    """The app handed to a plugin names only the checked address and port."""
    target = destinations.dial_target(CORP, "2001:db8::9", 443)
    assert (target.host, target.port, target.destination) == ("2001:db8::9", 443, "[2001:db8::9]:443")
    assert target.segments == CORP.segments


# -- the connector's dispatch ---------------------------------------------------------------


class FakeUDPPort:
    def __init__(self, protocol) -> None:
        self.protocol = protocol
        self.connected_to = None
        self.sent: list[bytes] = []
        self.listening = True
        protocol.makeConnection(self)

    def connect(self, host, port):
        self.connected_to = (host, port)

    def write(self, datagram, addr=None):
        self.sent.append(datagram)

    def stopListening(self):
        self.listening = False


class FakeReactor(Clock):
    """A Clock with a name resolver and UDP ports that record what they send."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        super().__init__()
        self.nameResolver = FakeResolver(table)
        self.udp: list[FakeUDPPort] = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.udp.append(FakeUDPPort(protocol))
        self.udp[-1].interface = interface
        self.udp[-1].max_packet = maxPacketSize
        return self.udp[-1]


def private_connector(handlers, table, *segments, **options):
    from gateway.config import parse_config
    from gateway.connector.node import ConnectorNode

    config = parse_config({"connector": {"state_dir": "/tmp/unused"}}, "connector.toml")
    identity = SimpleNamespace(connector_id="c0ffee", group="default", name="test")
    reactor = FakeReactor(table)
    node = ConnectorNode(config, reactor, pm=_NoPlugins(), handlers=handlers, identity=identity)
    app = private_app(*segments, **options)
    node.apply_config({"type": "config", "version": "v1", "group": "default", "apps": [{
        "name": "corp", "protocol": "tcp", "destination": "", "host": "", "port": 0, "options": options,
        "segments": [segment_table(s) for s in app.segments]}]})
    return node, reactor


def access_meta(destination, transport="tcp"):
    return {"kind": "app", "app": "corp", "protocol": "udp" if transport == "udp" else "tcp", "transport": transport,
            "destination": destination, "segment": "?", "request_id": "r1", "user": "alice@example.test",
            "client": "access:abc"}


@pytest.fixture
def events():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def test_connector_reads_segments_and_refuses_malformed_ones():
    """Segments in the config message become the app's; a malformed segment keeps the last good config."""
    node, _ = private_connector({"tcp": RecordingHandler()}, {}, {"destination": "10.1.0.0/16", "ports": 22})
    assert [str(s) for s in node.apps["corp"].segments] == ["tcp 10.1.0.0/16:22"]
    node.apply_config({"type": "config", "version": "v2", "apps": [{
        "name": "corp", "protocol": "tcp", "destination": "", "host": "", "port": 0,
        "segments": [{"destination": "10.1.0.0/33", "ports": 22}]}]})
    assert node.config_version == "v1" and node.apps["corp"].is_private


def test_name_resolving_outside_is_refused_with_a_log_event(events):
    """A stream whose name resolves outside the segments is reset DESTINATION_REFUSED, with an admin event."""
    handler = RecordingHandler()
    node, reactor = private_connector({"tcp": handler}, {"db.corp.example": ["127.0.0.1"]},
                                      {"destination": "db.corp.example", "ports": 5432})
    service, pump = tunnel_to(node)
    result = open_and_wait(service, pump, access_meta("db.corp.example:5432"))
    assert result.check(StreamReset) and result.value.code == ResetCode.DESTINATION_REFUSED
    assert "resolved to 127.0.0.1" in result.value.reason and "tcp db.corp.example:5432" in result.value.reason
    assert handler.calls == []
    refused = [e for e in events if e.get("event") == "destination_refused"]
    assert refused and refused[0]["user"] == "alice@example.test" and refused[0]["request_id"] == "r1"
    assert refused[0]["app"] == "corp"


def test_allowed_name_is_resolved_once_and_dialled_by_address():
    """An allowed name is resolved once on the connector and the plugin gets the checked address."""
    handler = RecordingHandler()
    node, reactor = private_connector({"tcp": handler}, {"db.corp.example": ["10.7.7.7"]},
                                      {"destination": "db.corp.example", "ports": 5432})
    service, pump = tunnel_to(node)
    stream = open_and_wait(service, pump, access_meta("db.corp.example:5432"))
    assert not hasattr(stream, "check")
    (_, app), = handler.calls
    assert (app.host, app.port, app.destination) == ("10.7.7.7", 5432, "10.7.7.7:5432")
    assert reactor.nameResolver.asked == [("db.corp.example", "TCP")]


def test_address_outside_is_refused_without_resolving():
    """An address outside the segments is refused as asked; nothing is resolved or dialled."""
    handler = RecordingHandler()
    node, reactor = private_connector({"tcp": handler}, {}, {"destination": "10.1.0.0/16", "ports": 22})
    service, pump = tunnel_to(node)
    result = open_and_wait(service, pump, access_meta("10.2.0.1:22"))
    assert result.value.code == ResetCode.DESTINATION_REFUSED and "10.2.0.1:22/tcp" in result.value.reason
    assert handler.calls == [] and reactor.nameResolver.asked == []


def test_listen_apps_keep_the_exact_destination_check():
    """A listen app's stream still needs its exact destination (REFUSED otherwise), with no resolving."""
    from test_connector import make_connector

    node = make_connector(RecordingHandler())
    service, pump = tunnel_to(node)
    result = open_and_wait(service, pump, {"kind": "app", "app": "web", "destination": "10.1.2.4:80",
                                           "transport": "tcp"})
    assert result.value.code == ResetCode.REFUSED


# -- UDP flows -------------------------------------------------------------------------------


def udp_flow(table=None, **options):
    node, reactor = private_connector(
        {"tcp": RecordingHandler(), "udp": gateway_tcp.UDPHandler()}, table or {},
        {"destination": "10.53.0.0/24", "ports": 53, "protocol": "udp"}, **options)
    service, pump = tunnel_to(node)
    stream = open_and_wait(service, pump, access_meta("10.53.0.1:53", "udp"))
    assert not hasattr(stream, "check"), stream
    port, = reactor.udp
    return reactor, service, pump, stream, port


class Collect:
    def __init__(self):
        self.decoder = DatagramDecoder()
        self.datagrams = []
        self.ended = None

    def makeConnection(self, transport):
        pass

    def dataReceived(self, data):
        self.datagrams += self.decoder.feed(data)

    def connectionLost(self, reason):
        self.ended = reason


def test_udp_flow_keeps_datagram_boundaries_both_ways():
    """Datagrams cross a UDP flow one for one, however the stream's bytes are split."""
    reactor, service, pump, stream, port = udp_flow()
    assert port.connected_to == ("10.53.0.1", 53) and port.interface == "0.0.0.0"
    assert port.max_packet == 65535   # whole datagrams: Twisted's default read is 8 KiB, the rest cut off
    seen = Collect()
    stream.attach(seen)
    stream.write(encode_datagram(b"query-1") + encode_datagram(b"")[:1])
    stream.write(encode_datagram(b"")[1:] + encode_datagram(b"q3"))
    pump.flush()
    assert port.sent == [b"query-1", b"", b"q3"]
    port.protocol.datagramReceived(b"answer-1", ("10.53.0.1", 53))
    port.protocol.datagramReceived(b"answer-2", ("10.53.0.1", 53))
    pump.flush()
    assert seen.datagrams == [b"answer-1", b"answer-2"]


def test_udp_flow_to_a_paused_stream_drops_the_oldest_and_stays_bounded(events):
    """A flood to a stream that cannot take more keeps at most the queue's bound and counts the drops."""
    reactor, service, pump, stream, port = udp_flow()
    seen = Collect()
    stream.attach(seen)
    stream.pauseProducing()  # the user's side stops reading: no credit goes back
    flow = port.protocol
    datagram = bytes(1000)
    for i in range(3000):
        flow.datagramReceived(i.to_bytes(4, "big") + datagram, None)
        pump.flush()
    connector_stream = flow.stream
    assert flow.paused
    assert connector_stream.pending_bytes <= HIGH_WATER + 1006
    assert len(flow.queue) <= gateway_tcp.UDP_QUEUE_DATAGRAMS
    assert flow.queue.queued_bytes <= gateway_tcp.UDP_QUEUE_BYTES
    assert flow.queue.dropped > 0
    sent_before_pause = len(seen.datagrams)
    stream.resumeProducing()
    pump.flush()
    numbers = [int.from_bytes(d[:4], "big") for d in seen.datagrams]
    assert numbers[-1] == 2999 and len(numbers) + flow.queue.dropped == 3000, (sent_before_pause, len(numbers))
    assert numbers == sorted(numbers)


def test_udp_flow_closes_after_its_idle_timeout_logging_drops(events):
    """No datagram either way for options.udp_idle_timeout closes the flow (FIN) and logs its drop count."""
    reactor, service, pump, stream, port = udp_flow(udp_idle_timeout=30)
    seen = Collect()
    stream.attach(seen)
    reactor.advance(20)
    port.protocol.datagramReceived(b"x", None)
    reactor.advance(20)
    pump.flush()
    assert port.listening and seen.ended is None
    reactor.advance(10)
    pump.flush()
    assert not port.listening
    assert stream.fin_received
    closed = [e for e in events if "udp flow" in e.get("log_format", "")]
    assert closed and closed[0]["dropped"] == 0 and "idle for 30s" in closed[0]["why"]


def test_udp_flow_closes_when_the_user_ends_it():
    """A FIN from the user's end closes the UDP socket and ends the stream."""
    reactor, service, pump, stream, port = udp_flow()
    stream.attach(Collect())
    stream.loseConnection()
    pump.flush()
    assert not port.listening and stream.closed


def test_oversized_datagram_prefix_resets_the_flow():
    """A prefix announcing more than a datagram can hold resets the stream instead of buffering it."""
    reactor, service, pump, stream, port = udp_flow()
    seen = Collect()
    stream.attach(seen)
    flow = port.protocol
    flow.decoder = DatagramDecoder(max_datagram=100)
    stream.write(b"\x01\x00" + bytes(10))
    pump.flush()
    assert stream.closed and not port.listening


def test_bad_udp_idle_timeout_is_refused_naming_the_key():
    """options.udp_idle_timeout must be a positive number of seconds."""
    with pytest.raises(Exception, match="options.udp_idle_timeout"):
        gateway_tcp.udp_idle_timeout(private_app({"destination": "10.0.0.1", "ports": 53, "protocol": "udp"},
                                                 udp_idle_timeout=0))


def test_udp_handler_has_no_listen_port():
    """The udp handler refuses a listen app, saying udp is only for private apps' segments."""
    with pytest.raises(Exception, match="only for the UDP flows of private apps"):
        gateway_tcp.UDPHandler().service_factory(CORP, None, Clock())


def test_check_config_refuses_an_app_with_protocol_udp():
    """An app saying protocol = "udp" is refused where check-config looks (the service listeners hook)."""
    app = AppConfig(name="u", listen="tcp:7001", destination="127.0.0.1:53", host="127.0.0.1", port=53,
                    protocol="udp")
    with pytest.raises(Exception, match='app u: protocol "udp" is only for the UDP flows of private apps'):
        gateway_tcp.gateway_service_listeners(register=None, config=SimpleNamespace(apps=[app]), open_stream=None,
                                              reactor=None)


def test_a_name_is_resolved_exactly_as_it_was_checked():
    """The resolver is asked the normalised A-label name the segments matched, never the raw text
    (Python's getaddrinfo would map "faß" to "fass", a different host than the one checked)."""
    handler = RecordingHandler()
    node, reactor = private_connector({"tcp": handler}, {"xn--fa-hia.corp.example": ["10.7.7.8"]},
                                      {"destination": "faß.corp.example", "ports": 5432})
    service, pump = tunnel_to(node)
    stream = open_and_wait(service, pump, access_meta("FAß.Corp.Example.:5432"))
    assert not hasattr(stream, "check"), stream
    assert reactor.nameResolver.asked == [("xn--fa-hia.corp.example", "TCP")]
    (_, app), = handler.calls
    assert app.host == "10.7.7.8"


@pytest.mark.parametrize("error", [OSError(11, "Resource temporarily unavailable"), MessageLengthError()])
def test_a_datagram_the_socket_refuses_is_dropped_and_counted_not_the_flow(error, events):
    """A send the UDP socket refuses (buffer full, too long) drops that datagram, counted; the flow goes on."""
    reactor, service, pump, stream, port = udp_flow()
    stream.attach(Collect())
    def refuse(datagram, addr=None):
        raise error

    sent, port.write = port.write, refuse
    stream.write(encode_datagram(b"lost"))
    pump.flush()
    port.write = sent
    stream.write(encode_datagram(b"kept"))
    pump.flush()
    assert port.sent == [b"kept"] and not stream.closed
    stream.loseConnection()
    pump.flush()
    closed = [e for e in events if "udp flow" in e.get("log_format", "")]
    assert closed and closed[0]["unsent"] == 1, closed


def test_udp_flow_to_an_ipv6_address_binds_an_ipv6_socket():
    """A flow to [address]:port binds its ephemeral UDP port on "::" and connects to the bare address."""
    node, reactor = private_connector({"tcp": RecordingHandler(), "udp": gateway_tcp.UDPHandler()}, {},
                                      {"destination": "fd00::/64", "ports": 53, "protocol": "udp"})
    service, pump = tunnel_to(node)
    stream = open_and_wait(service, pump, access_meta("[fd00::53]:53", "udp"))
    assert not hasattr(stream, "check"), stream
    port, = reactor.udp
    assert port.interface == "::" and port.connected_to == ("fd00::53", 53)
