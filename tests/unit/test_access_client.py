"""The gateway access client over an in-memory tunnel: local connections wait unread for their
stream, refusals close cleanly and are said once, SOCKS5 replies, UDP flows, renewal."""

from datetime import timedelta

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.access import socks5
from gateway.access.client import (
    AccessError, AccessTunnel, Reporter, SocksConnection, TcpForward, UdpAssociation, parse_listen, parse_target,
    socks_reply_for,
)
from gateway.errors import GatewayError
from gateway.tunnel.datagrams import DatagramDecoder, encode_datagram
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.stream import StreamReset

from tests.unit.test_access_credentials import make
from tests.unit.test_session import Collector, Pair


class Service:
    """The service end of a user tunnel: accepts or refuses access streams as told."""

    def __init__(self):
        self.refuse = None          # (code, reason) to refuse every stream with
        self.hold = False           # neither accept nor refuse yet
        self.streams = []           # (stream, Collector)
        self.pair = Pair(on_stream=self.on_stream)
        self.said = []
        self.saved = []
        self.renewals = []
        self.tunnel = AccessTunnel(self.pair.clock, make(), renew=self.renew, save=self.saved.append,
                                   reporter=Reporter(self.said.append), wait_for_tunnel=30)
        self.tunnel.session = self.pair.client
        self.tunnel.running = True
        self.pair.client.on_go_away.append(self.tunnel._go_away)

    async def renew(self, reactor, creds):
        self.renewals.append(creds)
        if isinstance(self.renewed, Exception):
            raise self.renewed
        return self.renewed

    renewed = None

    def on_stream(self, stream):
        if self.refuse is not None:
            stream.reset(*self.refuse)
            return
        proto = Collector()
        self.streams.append((stream, proto))
        if not self.hold:
            stream.accept()
        stream.attach(proto)

    def flush(self):
        self.pair.pump.flush()

    def advance(self, seconds):
        """Let time pass a second at a time, the tunnel's pings answered as they go."""
        for _ in range(int(seconds)):
            self.pair.clock.advance(1)
            self.flush()


def connect_local(protocol, port=40000):
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 1080))
    protocol.makeConnection(transport)
    return transport


# -- addresses


@pytest.mark.parametrize("text", ["0.0.0.0:1080", "192.0.2.1:1080", "[::]:1080", "example.com:1080"])
def test_a_listen_address_off_loopback_is_refused(text):
    """--listen takes loopback addresses only: the listeners have no authentication."""
    with pytest.raises(AccessError, match="loopback"):
        parse_listen(text)


def test_loopback_listen_addresses_are_taken():
    """127.0.0.1, [::1] and localhost (as 127.0.0.1) with a port are accepted."""
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:1080") == ("::1", 1080)
    assert parse_listen("localhost:22") == ("127.0.0.1", 22)
    with pytest.raises(AccessError, match="ADDRESS:PORT"):
        parse_listen("127.0.0.1")


def test_a_target_keeps_a_name_as_a_name():
    """--to host names stay names (resolved on the connector); IPv6 comes out of its brackets."""
    assert parse_target("db.corp.example:5432") == ("db.corp.example", 5432)
    assert parse_target("[fd00::1]:22") == ("fd00::1", 22)
    with pytest.raises(AccessError, match="HOST:PORT"):
        parse_target("db.corp.example")


@pytest.mark.parametrize("code, reason, reply", [
    (ResetCode.NOT_ASSIGNED, "alice is not assigned to app x", socks5.Reply.NOT_ALLOWED),
    (ResetCode.NO_SEGMENT, "no app segment covers h:1/tcp", socks5.Reply.NOT_ALLOWED),
    (ResetCode.DESTINATION_REFUSED, "outside the segments", socks5.Reply.NOT_ALLOWED),
    (ResetCode.NO_CONNECTOR, "no healthy connector in group g", socks5.Reply.NETWORK_UNREACHABLE),
    (ResetCode.CONNECT_FAILED, "connector could not connect to 10.0.0.1:22: Connection was refused",
     socks5.Reply.CONNECTION_REFUSED),
    (ResetCode.CONNECT_FAILED, "connector could not connect to 10.0.0.1:22: timed out", socks5.Reply.HOST_UNREACHABLE),
    (ResetCode.INTERNAL_ERROR, "oops", socks5.Reply.GENERAL_FAILURE),
])
def test_each_reset_code_has_its_socks_reply(code, reason, reply):
    """A refused stream's reset code becomes the SOCKS5 reply that says the most about it."""
    assert socks_reply_for(Failure(StreamReset(code, reason))) == reply


def test_the_reporter_says_each_reason_once():
    """The same refusal twice prints one line; another reason prints its own."""
    said = []
    reporter = Reporter(said.append)
    for _ in range(2):
        reporter.refused(Failure(StreamReset(ResetCode.NOT_ASSIGNED, "alice is not assigned to app x")), "app x")
    reporter.refused(Failure(StreamReset(ResetCode.NO_CONNECTOR, "no healthy connector in group g")), "app x")
    assert said == ["gateway access: app x refused: alice is not assigned to app x",
                    "gateway access: app x refused: no healthy connector in group g"]


# -- access tcp


def test_a_forwarded_connection_is_not_read_until_its_stream_is_accepted():
    """The local socket stays paused while the service has not answered, then bytes flow both ways."""
    svc = Service()
    svc.hold = True
    forwarded = TcpForward(svc.tunnel, "echo", None, None).buildProtocol(None)
    local = connect_local(forwarded)
    svc.flush()
    (stream, proto), = svc.streams
    assert stream.metadata == {"kind": "access", "transport": "tcp", "app": "echo"}   # no --to: no host/port
    assert local.producerState == "paused"
    stream.accept()
    svc.flush()
    assert local.producerState == "producing"
    forwarded.dataReceived(b"ping")
    stream.write(b"pong")
    svc.flush()
    assert proto.received == b"ping" and local.value() == b"pong"


def test_a_forward_with_to_sends_host_and_port():
    """--to puts host and port (a name as a name) in the access stream's metadata."""
    svc = Service()
    connect_local(TcpForward(svc.tunnel, "db", "db.corp.example", 5432).buildProtocol(None))
    svc.flush()
    assert svc.streams[0][0].metadata == {"kind": "access", "transport": "tcp", "host": "db.corp.example",
                                          "port": 5432, "app": "db"}


def test_a_refused_forward_closes_the_local_connection_cleanly_and_says_why_once():
    """NOT_ASSIGNED: each local connection gets a clean close (FIN, not RST), the reason is printed once."""
    svc = Service()
    svc.refuse = (ResetCode.NOT_ASSIGNED, "alice@example.test is not assigned to app db")
    factory = TcpForward(svc.tunnel, "db", None, None)
    locals_ = [connect_local(factory.buildProtocol(None), 40000 + i) for i in range(2)]
    svc.flush()
    for local in locals_:
        assert local.disconnecting and local.value() == b""
    assert svc.said == ["gateway access: app db refused: alice@example.test is not assigned to app db"]


def test_a_connection_while_the_tunnel_is_down_waits_then_is_refused_with_the_reason():
    """With no tunnel, a local connection waits (unread) for one, and after the wait is closed with a message."""
    svc = Service()
    svc.tunnel.session = None
    svc.tunnel.last_problem = "cannot reach the service's tunnel at 127.0.0.1:1: connection refused; retrying"
    local = connect_local(TcpForward(svc.tunnel, "db", None, None).buildProtocol(None))
    assert local.producerState == "paused" and not local.disconnecting
    svc.advance(29)
    assert not local.disconnecting
    svc.advance(1)
    assert local.disconnecting
    assert "the tunnel to the service is down (cannot reach" in svc.said[-1]


def test_a_connection_waiting_for_the_tunnel_is_served_once_it_is_up():
    """A local connection made while the tunnel is down gets its stream when the tunnel comes up."""
    svc = Service()
    session, svc.tunnel.session = svc.tunnel.session, None
    local = connect_local(TcpForward(svc.tunnel, "db", None, None).buildProtocol(None))
    svc.tunnel._up(session)
    svc.flush()
    assert len(svc.streams) == 1 and local.producerState == "producing"


# -- access socks: CONNECT


def socks_connect(svc, host, port):
    conn = SocksConnection(svc.tunnel)
    local = connect_local(conn)
    conn.dataReceived(socks5.encode_greeting())
    assert local.value() == b"\x05\x00"
    local.clear()
    conn.dataReceived(socks5.encode_request(socks5.Command.CONNECT, host, port) + b"early")
    svc.flush()
    return conn, local


def test_socks_connect_sends_the_name_unresolved_and_splices_after_the_reply():
    """CONNECT to a name opens a stream with that name; success is replied, then early and later bytes flow."""
    svc = Service()
    conn, local = socks_connect(svc, "wiki.corp.example", 443)
    (stream, proto), = svc.streams
    assert stream.metadata == {"kind": "access", "transport": "tcp", "host": "wiki.corp.example", "port": 443}
    assert socks5.decode_reply(local.value())[0] == socks5.Reply.SUCCEEDED
    stream.write(b"hello")
    svc.flush()
    assert proto.received == b"early" and local.value().endswith(b"hello")


@pytest.mark.parametrize("code, reply", [(ResetCode.NO_CONNECTOR, socks5.Reply.NETWORK_UNREACHABLE),
                                         (ResetCode.NO_SEGMENT, socks5.Reply.NOT_ALLOWED)])
def test_a_refused_socks_connect_gets_its_reply_code_and_a_close(code, reply):
    """A refused CONNECT answers the SOCKS client with the mapped reply, closes, and prints the reason."""
    svc = Service()
    svc.refuse = (code, "the service's sentence")
    conn, local = socks_connect(svc, "10.9.9.9", 22)
    assert socks5.decode_reply(local.value())[0] == reply
    assert local.disconnecting
    assert svc.said == ["gateway access: 10.9.9.9:22/tcp refused: the service's sentence"]


def test_a_socks_client_speaking_socks4_is_closed():
    """A greeting that is not SOCKS5 closes the connection and opens no stream."""
    svc = Service()
    conn = SocksConnection(svc.tunnel)
    local = connect_local(conn)
    conn.dataReceived(b"\x04\x01\x00\x16")
    assert local.disconnecting and not svc.streams


# -- access socks: UDP ASSOCIATE


class FakeUDP:
    def __init__(self):
        self.sent = []
        self.stopped = False

    def write(self, data, addr):
        self.sent.append((data, addr))

    def stopListening(self):
        self.stopped = True


def association(svc, idle=60.0):
    relay = UdpAssociation(svc.tunnel, "127.0.0.1", None, idle)
    relay.transport = FakeUDP()
    return relay


def test_udp_datagrams_become_one_stream_per_flow_and_replies_come_back_wrapped():
    """Datagrams to one destination share a stream of framed datagrams; replies reach the client with
    the SOCKS header of the destination."""
    svc = Service()
    relay = association(svc)
    client = ("127.0.0.1", 5555)
    relay.datagramReceived(socks5.encode_udp("dns.corp.example", 53, b"q1"), client)
    relay.datagramReceived(socks5.encode_udp("dns.corp.example", 53, b"q2"), client)
    svc.flush()
    (stream, proto), = svc.streams
    assert stream.metadata == {"kind": "access", "transport": "udp", "host": "dns.corp.example", "port": 53}
    assert DatagramDecoder().feed(proto.received) == [b"q1", b"q2"]
    stream.write(encode_datagram(b"answer"))
    svc.flush()
    assert relay.transport.sent == [(socks5.encode_udp("dns.corp.example", 53, b"answer"), client)]


def test_udp_from_another_address_is_ignored():
    """Only the address that asked for the association may use its relay socket."""
    svc = Service()
    relay = association(svc)
    relay.datagramReceived(socks5.encode_udp("10.0.0.1", 53, b"q"), ("127.0.0.2", 5555))
    svc.flush()
    assert not svc.streams and not relay.flows


def test_udp_datagrams_waiting_for_the_stream_are_bounded_dropping_the_oldest():
    """While the flow's stream is not open, datagrams queue up to the bound and the oldest are dropped."""
    svc = Service()
    svc.hold = True
    relay = association(svc)
    for i in range(300):
        relay.datagramReceived(socks5.encode_udp("10.0.0.1", 53, b"%03d" % i), ("127.0.0.1", 5555))
    flow, = relay.flows.values()
    assert len(flow.queue) == 256 and flow.queue.dropped == 44
    svc.flush()
    stream, proto = svc.streams[0]
    stream.accept()
    svc.flush()
    got = DatagramDecoder().feed(proto.received)
    assert got[0] == b"044" and got[-1] == b"299" and len(got) == 256


def test_an_idle_udp_flow_is_closed_and_a_new_datagram_opens_another():
    """After the idle timeout without datagrams the flow's stream ends; the next datagram opens a new one."""
    svc = Service()
    relay = association(svc, idle=60)
    relay.datagramReceived(socks5.encode_udp("10.0.0.1", 53, b"q"), ("127.0.0.1", 5555))
    svc.flush()
    svc.advance(59)
    assert relay.flows
    svc.advance(1)
    assert not relay.flows and svc.streams[0][1].eof
    relay.datagramReceived(socks5.encode_udp("10.0.0.1", 53, b"q"), ("127.0.0.1", 5555))
    svc.flush()
    assert len(svc.streams) == 2


def test_a_refused_udp_flow_drops_its_datagrams_and_says_why_once():
    """A refused flow reports the reason once and drops what follows without opening more streams."""
    svc = Service()
    svc.refuse = (ResetCode.NO_SEGMENT, "no app segment covers 10.0.0.1:53/udp")
    relay = association(svc)
    for _ in range(3):
        relay.datagramReceived(socks5.encode_udp("10.0.0.1", 53, b"q"), ("127.0.0.1", 5555))
        svc.flush()
    flow, = relay.flows.values()
    assert flow.refused_drops == 2
    assert svc.said == ["gateway access: 10.0.0.1:53/udp refused: no app segment covers 10.0.0.1:53/udp"]


def test_closing_the_socks_connection_ends_the_udp_association():
    """The association lasts as long as its TCP connection: closing it ends the flows and the relay socket."""
    svc = Service()
    conn = SocksConnection(svc.tunnel)
    local = connect_local(conn)
    relay_transport = FakeUDP()
    listened = []
    svc.pair.clock.listenUDP = lambda port, proto, interface, maxPacketSize=8192: (
        listened.append(maxPacketSize), setattr(proto, "transport", relay_transport), _Port(interface))[2]
    conn.dataReceived(socks5.encode_greeting() + socks5.encode_request(socks5.Command.UDP_ASSOCIATE, "0.0.0.0", 0))
    assert socks5.decode_reply(local.value()[2:]) == (0, "127.0.0.1", 4444)
    assert listened == [65535]   # whole datagrams: Twisted's default of 8192 would cut larger ones
    conn.association.datagramReceived(socks5.encode_udp("10.0.0.1", 53, b"q"), ("127.0.0.1", 5555))
    svc.flush()
    conn.connectionLost(Failure(ConnectionError()))
    svc.flush()
    assert relay_transport.stopped and not conn.association.flows and svc.streams[0][1].eof


class _Port:
    def __init__(self, host):
        self.host = host

    def getHost(self):
        return IPv4Address("UDP", self.host, 4444)


# -- renewal


def test_a_certificate_low_on_life_is_renewed_and_saved_before_dialling():
    """ensure_fresh trades the cached credential for a new certificate when < 1/3 of its life is left."""
    svc = Service()
    old = svc.tunnel.creds
    svc.renewed = make(lifetime=3600)
    svc.tunnel.now = lambda: old.expires_at - timedelta(minutes=5)
    d = Deferred.fromCoroutine(svc.tunnel.ensure_fresh())
    assert d.called and svc.renewals == [old]
    assert svc.tunnel.creds is svc.renewed and svc.saved == [svc.renewed]


def test_a_failed_renewal_of_an_expired_certificate_says_not_signed_in():
    """An expired certificate whose renewal is refused tells the user to sign in again."""
    svc = Service()
    old = svc.tunnel.creds
    svc.renewed = GatewayError("this credential has expired: run gateway login again")
    svc.tunnel.now = lambda: old.expires_at + timedelta(minutes=1)

    failures = []
    Deferred.fromCoroutine(svc.tunnel.ensure_fresh()).addErrback(failures.append)
    assert failures and svc.said == ["gateway access: not signed in: this credential has expired: run gateway login"
                                     " again"]


def test_a_stream_cut_by_the_service_says_why():
    """An established forward reset with REVOKED aborts the local connection and prints the reason."""
    svc = Service()
    forwarded = TcpForward(svc.tunnel, "db", None, None).buildProtocol(None)
    local = connect_local(forwarded)
    svc.flush()
    stream, _ = svc.streams[0]
    stream.reset(ResetCode.REVOKED, "your access was revoked by an administrator: run gateway login")
    svc.flush()
    assert local.disconnecting
    forwarded.connectionLost(Failure(ConnectionError("aborted")))
    assert svc.said == ["gateway access: app db ended: your access was revoked by an administrator: run gateway login"]


def test_a_draining_tunnel_is_replaced_at_once_and_new_connections_wait_for_the_new_one():
    """GO_AWAY from the service: a new tunnel is dialled right away; a connection made meanwhile is
    not opened on the draining tunnel."""
    svc = Service()
    dialled = []
    svc.tunnel._attempt = lambda: dialled.append(1)
    svc.pair.server.go_away(0, "service node is shutting down")
    svc.flush()
    assert svc.tunnel.session is None
    svc.pair.clock.advance(1)   # the backoff's first delay is below 1 s
    assert dialled == [1]
    local = connect_local(TcpForward(svc.tunnel, "db", None, None).buildProtocol(None))
    svc.flush()
    assert not svc.streams and local.producerState == "paused"


def test_a_connection_waiting_for_the_tunnel_brings_the_next_redial_forward():
    """With a redial due in 20 s, a new local connection makes it happen within a second."""
    svc = Service()
    svc.tunnel.session = None
    dialled = []
    svc.tunnel._attempt = lambda: dialled.append(svc.pair.clock.seconds())
    svc.tunnel._retry(20.0)
    connect_local(TcpForward(svc.tunnel, "db", None, None).buildProtocol(None))
    svc.pair.clock.advance(1)
    assert dialled == [1.0]
