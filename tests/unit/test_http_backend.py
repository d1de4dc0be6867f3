"""The connector's half of web apps (gateway_http.backend and .pool) without real sockets.

A real tunnel (two TunnelSessions over iosim) carries each stream; the back end is a scripted
fake endpoint whose connections are StringTransports, so every byte the back end gets is
visible and every byte it answers is chosen by the test.
"""

from __future__ import annotations

import pluggy
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect
from zope.interface import implementer

from gateway import hookimpl, hookspecs, plugins
from gateway.errors import GatewayError
from gateway.config import AppConfig
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.session import TunnelSession, TunnelSettings
from gateway.tunnel.stream import HIGH_WATER, StreamReset
from gateway_http import HTTPHandler
from gateway_http.backend import Backends, check_sso
from gateway_http import rules
from gateway_http.pool import BackendPool, Target

GET = b"GET /a HTTP/1.1\r\nHost: wiki.corp:8080\r\nX-Forwarded-For: 10.9.9.9\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def web_app(**options):
    return AppConfig(name="wiki", listen="", destination="wiki.corp:8080", host="wiki.corp", port=8080,
                     protocol="http", options=options, internal_url="http://wiki.corp:8080/")


class FakeBackendTransport(StringTransport):
    """A socket to the back end: closing it reports connectionLost on the next clock turn."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.protocol = None
        self.closed_how = None
        self.write_closed = False

    def _end(self, how, reason):
        if self.closed_how is None:
            self.closed_how = how
            self.disconnecting = True
            self.clock.callLater(0, self.protocol.connectionLost, reason)

    def loseConnection(self):
        self._end("close", Failure(ConnectionDone()))

    def abortConnection(self):
        self._end("abort", Failure(ConnectionLost("aborted")))

    def loseWriteConnection(self):
        self.write_closed = True


class Endpoint:
    def __init__(self, backend):
        self.backend = backend

    def connect(self, factory):
        if self.backend.refuse:
            return fail(ConnectionRefusedError("connection refused"))
        if self.backend.hang:
            return Deferred()
        protocol = factory.buildProtocol(None)
        transport = FakeBackendTransport(self.backend.clock)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.backend.conns.append(protocol)
        return succeed(protocol)


class FakeBackend:
    def __init__(self, clock):
        self.clock = clock
        self.conns = []
        self.refuse = False
        self.hang = False

    def answer(self, conn, data):
        conn.dataReceived(data)

    def close(self, conn, clean=True):
        conn.transport._end("peer", Failure(ConnectionDone()) if clean else Failure(ConnectionLost("reset")))


class ScriptedPool(BackendPool):
    backend: FakeBackend = None

    def endpoint(self, target):
        return Endpoint(self.backend)


@implementer(IHalfCloseableProtocol)
class ServiceSide(Protocol):
    """What the service sees on its end of the stream."""

    def __init__(self):
        self.data = b""
        self.fin = False
        self.reason = None

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.fin = True

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        self.reason = reason


class World:
    def __init__(self, app=None, sso=None):
        self.clock = Clock()
        self.app = app or web_app()
        self.backends = Backends(self.clock, sso or {})
        self.backend = FakeBackend(self.clock)
        self.backends.pool = ScriptedPool(self.clock)
        self.backends.pool.backend = self.backend
        self.service = TunnelSession(self.clock, TunnelSettings(), is_client=False)
        self.connector = TunnelSession(self.clock, TunnelSettings(), is_client=True,
                                       on_stream=lambda s: self.backends.serve(s, self.app))
        self.pump = connect(self.service, FakeTransport(self.service, True),
                            self.connector, FakeTransport(self.connector, False), greet=False)

    @property
    def pool(self):
        return self.backends.pool

    def flush(self):
        for _ in range(3):
            self.clock.advance(0)
            self.pump.flush()

    def open(self, **meta):
        result = []
        d = self.service.open_stream({"kind": "app", "app": "wiki", "request_id": "r1", **meta})
        d.addBoth(result.append)
        self.flush()
        stream = result[0]
        if isinstance(stream, Failure):
            return stream, None
        side = ServiceSide()
        stream.attach(side)
        return stream, side

    def send(self, stream, data):
        stream.write(data)
        self.flush()

    def request(self, request=GET):
        """`request` sent on a new stream: (the stream, what the service got, the back-end connection)."""
        stream, side = self.open()
        self.send(stream, request)
        return stream, side, self.current()

    def exchange(self, request=GET, response=OK):
        """One request through a new stream, answered by the back end; returns what the service got."""
        stream, side, conn = self.request(request)
        conn.dataReceived(response)
        self.flush()
        stream.loseConnection()
        self.flush()
        return side, conn

    def current(self):
        """The back-end connection serving a request now."""
        busy = [c for c in self.backend.conns if c.user is not None]
        assert len(busy) == 1, busy
        return busy[0]


def heads(conn):
    return conn.transport.value().split(b"\r\n\r\n")


# -- keep-alive and framing --------------------------------------------------------------


def test_response_relayed_verbatim_and_connection_reused():
    """Two requests on two streams use one back-end connection; bytes pass unchanged."""
    w = World()
    side1, conn1 = w.exchange()
    assert side1.data == OK and side1.fin
    assert w.pool.idle_count() == 1
    side2, conn2 = w.exchange(response=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert side2.data.endswith(b"hi")
    assert conn1 is conn2 and w.pool.dials == 1
    assert conn1.transport.value() == GET + GET
    assert side1.reason.check(ConnectionDone) and side2.reason.check(ConnectionDone)


def test_connection_close_from_service_is_not_passed_on():
    """An older service's Connection: close is dropped: back-end connections are kept alive."""
    w = World()
    request = b"GET / HTTP/1.1\r\nHost: wiki.corp:8080\r\nConnection: close\r\n\r\n"
    side, conn = w.exchange(request=request)
    assert conn.transport.value() == b"GET / HTTP/1.1\r\nHost: wiki.corp:8080\r\n\r\n"
    assert w.pool.idle_count() == 1


def test_upgrade_header_without_connection_upgrade_is_not_passed_on():
    """An Upgrade header that Connection does not name is dropped; a plain head is sent as it came."""
    w = World()
    request = b"GET / HTTP/1.1\r\nHost: wiki.corp:8080\r\nUpgrade: h2c\r\nAccept: */*\r\n\r\n"
    side, conn = w.exchange(request=request)
    assert conn.transport.value() == b"GET / HTTP/1.1\r\nHost: wiki.corp:8080\r\nAccept: */*\r\n\r\n"
    plain = b"GET /b HTTP/1.1\r\nHost: wiki.corp:8080\r\nX-Gateway-Request-Id: 0123456789abcdef\r\n\r\n"
    side, conn = World().exchange(request=plain)
    assert conn.transport.value() == plain


def test_chunked_both_ways():
    """A chunked request body goes through verbatim; a chunked response ends at its last chunk."""
    w = World()
    request = (b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nTrailer: t\r\n\r\n")
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    stream, side = w.open()
    w.send(stream, request[:60])
    w.send(stream, request[60:])
    conn = w.current()
    assert conn.transport.value() == request
    conn.dataReceived(response[:50])
    w.flush()
    assert not side.fin
    conn.dataReceived(response[50:])
    w.flush()
    assert side.data == response and not side.fin   # the stream waits for the next request
    stream.loseConnection()
    w.flush()
    assert side.fin and w.pool.idle_count() == 1


def test_head_and_204_have_no_body():
    w = World()
    side, _ = w.exchange(request=b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n",
                         response=b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert side.fin and w.pool.idle_count() == 1
    side, _ = w.exchange(response=b"HTTP/1.1 204 No Content\r\n\r\n")
    assert side.fin and w.pool.idle_count() == 1 and w.pool.dials == 1


def test_backend_connection_close_is_not_reused():
    """A response with Connection: close ends the back-end connection; the next request dials anew."""
    w = World()
    _, conn1 = w.exchange(response=b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    w.flush()
    assert conn1.transport.closed_how == "close" and w.pool.idle_count() == 0
    _, conn2 = w.exchange()
    assert conn2 is not conn1 and w.pool.dials == 2


def test_http10_response_is_not_reused():
    w = World()
    w.exchange(response=b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert w.pool.idle_count() == 0


def test_body_until_close():
    """A response without framing is relayed until the back end closes, then the stream ends."""
    w = World()
    stream, side, conn = w.request()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
    conn.dataReceived(b" more")
    w.flush()
    assert not side.fin
    w.backend.close(conn)
    w.flush()
    assert side.data == b"HTTP/1.1 200 OK\r\n\r\nsome more" and side.fin
    assert w.pool.idle_count() == 0


def test_interim_100_continue_is_relayed():
    """Expect: 100-continue reaches the back end and its 100 Continue reaches the service."""
    w = World()
    stream, side, conn = w.request(b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert b"Expect: 100-continue" in conn.transport.value()
    conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    w.flush()
    assert side.data == b"HTTP/1.1 100 Continue\r\n\r\n" and not side.fin
    w.send(stream, b"abc")
    assert conn.transport.value().endswith(b"\r\n\r\nabc")
    conn.dataReceived(OK)
    w.flush()
    assert side.data == b"HTTP/1.1 100 Continue\r\n\r\n" + OK


def test_early_response_before_body_is_not_reused():
    """A back end answering (413) before the whole body came cannot keep the connection."""
    w = World()
    stream, side, conn = w.request(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    conn.dataReceived(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    w.flush()
    assert side.fin and w.pool.idle_count() == 0
    assert conn.transport.closed_how == "close"
    w.send(stream, b"x" * 97)  # the rest of the body is dropped, not an error
    stream.loseConnection()
    w.flush()
    assert side.reason.check(ConnectionDone)


def test_bad_request_head_resets_the_stream():
    w = World()
    stream, side = w.open()
    w.send(stream, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert side.reason.check(StreamReset)
    assert "bad request head" in side.reason.value.reason and "malformed header" in side.reason.value.reason
    w.flush()
    assert w.backend.conns[0].transport.closed_how == "abort"


def test_bytes_after_request_reset_the_stream():
    w = World()
    stream, side = w.open()
    w.send(stream, GET + b"GET /again HTTP/1.1\r\n\r\n")
    assert side.reason.check(StreamReset) and "after the end of the request" in side.reason.value.reason


@pytest.mark.parametrize("answer, reason", [
    (b"HTCPCP/1.0 418 teapot\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n", "line ending in LF alone"),   # at once, not after a timeout
])
def test_malformed_response_resets_with_reason(answer, reason):
    """A malformed status line, or a head with a line ending in LF alone, resets the stream naming why."""
    w = World()
    stream, side, conn = w.request()
    conn.dataReceived(answer)
    w.flush()
    assert side.reason.check(StreamReset) and reason in side.reason.value.reason


# -- failures ----------------------------------------------------------------------------


def test_connect_failure_resets_connect_failed_naming_destination():
    w = World()
    w.backend.refuse = True
    stream, _ = w.open()
    assert stream.check(StreamReset) and stream.value.code == ResetCode.CONNECT_FAILED
    assert "wiki.corp:8080" in stream.value.reason and "refused" in stream.value.reason


def test_connect_deadline():
    """A back end that does not connect within connect_timeout is a CONNECT_FAILED reset."""
    w = World()
    w.backend.hang = True
    result = []
    w.service.open_stream({"kind": "app", "app": "wiki", "request_id": "r1"}).addBoth(result.append)
    w.flush()
    assert result == []
    w.clock.advance(10)
    w.flush()
    assert result[0].check(StreamReset) and "did not connect within 10s" in result[0].value.reason


def test_incomplete_response_resets_stream():
    """The back end closing mid-body resets the stream with a message; nothing is pooled."""
    w = World()
    stream, side, conn = w.request()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    w.backend.close(conn, clean=False)
    w.flush()
    assert side.data.endswith(b"abc")
    assert side.reason.check(StreamReset) and "before a complete response" in side.reason.value.reason
    assert w.pool.idle_count() == 0


def test_service_reset_aborts_backend():
    """The service resetting the stream (client gone, 504) aborts the back-end connection."""
    w = World()
    stream, side, conn = w.request()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    w.flush()
    stream.reset(ResetCode.TIMEOUT, "the back end did not answer within 85s")
    w.flush()
    assert conn.transport.closed_how == "abort" and w.pool.idle_count() == 0


def test_stale_pooled_connection_is_retried_once():
    """A kept-alive connection the back end closed as we reused it: retried on a new one."""
    w = World()
    _, first = w.exchange()
    stream, side = w.open()
    w.send(stream, GET)
    assert w.current() is first
    w.backend.close(first)
    w.flush()
    second = w.current()
    assert second is not first and second.transport.value() == GET
    second.dataReceived(OK)
    w.flush()
    assert side.data == OK


def test_no_retry_for_request_with_body_or_fresh_connection():
    w = World()
    _, first = w.exchange()
    stream, side = w.open()
    w.send(stream, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    w.backend.close(w.current())
    w.flush()
    assert side.reason.check(StreamReset) and side.reason.value.code == ResetCode.CONNECT_FAILED
    assert w.pool.dials == 1
    # a fresh (not pooled) connection that closes is the back end's answer, not a race
    stream, side = w.open()
    w.send(stream, GET)
    w.backend.close(w.current())
    w.flush()
    assert side.reason.check(StreamReset) and "closed the connection before a complete response" in \
        side.reason.value.reason
    assert w.pool.dials == 2


def test_pooled_connection_lost_before_head_dials_anew():
    w = World()
    _, first = w.exchange()
    stream, side = w.open()
    w.backend.close(first)
    w.flush()
    w.send(stream, GET)
    conn = w.current()
    assert conn is not first and conn.transport.value() == GET


# -- the pool ----------------------------------------------------------------------------


def test_idle_timeout_and_backend_close_leave_the_pool():
    w = World(web_app(backend_idle_timeout=5))
    _, conn = w.exchange()
    assert w.pool.idle_count() == 1
    w.clock.advance(4.9)
    assert w.pool.idle_count() == 1
    w.clock.advance(0.2)
    w.flush()
    assert w.pool.idle_count() == 0 and conn.transport.closed_how == "close"
    _, conn = w.exchange()
    w.backend.close(conn)
    w.flush()
    assert w.pool.idle_count() == 0


def test_max_idle_bounds_the_pool():
    w = World(web_app(backend_max_idle=1))
    streams = []
    for _ in range(3):
        stream, side = w.open()
        w.send(stream, GET)
        streams.append((stream, side))
    assert len(w.backend.conns) == 3
    for conn in w.backend.conns:
        conn.dataReceived(OK)
    w.flush()
    for stream, _ in streams:
        stream.loseConnection()
    w.flush()
    assert w.pool.idle_count() == 1
    assert sorted(str(c.transport.closed_how) for c in w.backend.conns) == ["None", "close", "close"]


def test_unexpected_bytes_on_idle_connection_drop_it():
    w = World()
    _, conn = w.exchange()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
    w.flush()
    assert w.pool.idle_count() == 0 and conn.transport.closed_how == "close"


def test_pool_key_separates_tls_settings():
    a = Target.from_app(web_app())
    b = Target.from_app(web_app(backend_ca_file="/x.pem"))
    assert a.key != b.key and a.scheme == "http"


def user(sub):
    return {"identity": {"sub": sub, "name": sub, "email": "", "groups": []}}


def exchange_as(w, **meta):
    """One request on a new stream with ``meta``, answered and ended; returns its back-end connection."""
    stream, side = w.open(**meta)
    w.send(stream, GET)
    conn = w.current()
    conn.dataReceived(OK)
    w.flush()
    stream.loseConnection()
    w.flush()
    assert side.data == OK
    return conn


def test_two_apps_on_one_back_end_never_share_a_connection():
    """A connection an app's stream used is reused by that app only, even on the same host:port."""
    w = World()
    first = exchange_as(w)
    w.app = AppConfig(
        name="crm", listen="", destination="wiki.corp:8080", host="wiki.corp", port=8080, protocol="http",
        options={}, internal_url="http://wiki.corp:8080/")
    second = exchange_as(w)
    assert second is not first and w.pool.dials == 2 and w.pool.idle_count() == 2
    w.app = web_app()
    assert exchange_as(w) is first and w.pool.dials == 2


def test_per_user_connections_are_reused_by_their_user_only():
    """With backend_connection_per_user a connection goes back to the same app and user only;
    a request with nobody signed in gets a connection of its own, closed after its stream."""
    w = World(web_app(backend_connection_per_user=True))
    alice = exchange_as(w, **user("alice"))
    bob = exchange_as(w, **user("bob"))
    assert bob is not alice and w.pool.idle_count() == 2
    assert exchange_as(w, **user("alice")) is alice and exchange_as(w, **user("bob")) is bob
    nobody = exchange_as(w)
    w.flush()
    assert nobody not in (alice, bob) and nobody.transport.closed_how == "close" and w.pool.idle_count() == 2
    assert exchange_as(w) is not nobody and w.pool.dials == 4


def test_sso_implies_per_user_connections():
    """An app with options.sso binds connections to the user without saying so; saying false is refused."""
    assert Target.from_app(web_app(sso="token")).per_user and not Target.from_app(web_app()).per_user
    problem = HTTPHandler().check_connector_app(web_app(sso="token", backend_connection_per_user=False))
    assert "backend_connection_per_user = false cannot apply with options.sso" in problem


def test_max_idle_bounds_per_user_connections_of_an_app_together():
    """backend_max_idle bounds an app's idle per-user connections across all users: the oldest goes."""
    w = World(web_app(backend_connection_per_user=True, backend_max_idle=2))
    conns = [exchange_as(w, **user(name)) for name in ("a", "b", "c")]
    w.flush()
    assert w.pool.idle_count() == 2 and conns[0].transport.closed_how == "close"
    assert exchange_as(w, **user("a")) is not conns[0] and exchange_as(w, **user("c")) is conns[2]


@pytest.mark.parametrize("options, expected", [
    ({"backend_tls_verify": "no"}, "backend_tls_verify"),
    ({"backend_max_idle": -1}, "backend_max_idle"),
    ({"backend_idle_timeout": 0}, "backend_idle_timeout"),
    ({"backend_connection_per_user": "yes"}, "backend_connection_per_user"),
])
def test_bad_backend_options_are_config_errors(options, expected):
    handler = HTTPHandler()
    problem = handler.check_connector_app(web_app(**options))
    assert problem and expected in problem and "wiki" in problem


def test_unreadable_ca_file_is_a_config_error(tmp_path):
    app = AppConfig(name="wiki", listen="", destination="wiki.corp:443", host="wiki.corp", port=443,
                    protocol="http", options={"backend_ca_file": str(tmp_path / "missing.pem")},
                    internal_url="https://wiki.corp/")
    problem = HTTPHandler().check_connector_app(app)
    assert "missing.pem" in problem and "cannot be read" in problem
    (tmp_path / "empty.pem").write_text("nothing here")
    app = AppConfig(name="wiki", listen="", destination="wiki.corp:443", host="wiki.corp", port=443,
                    protocol="http", options={"backend_ca_file": str(tmp_path / "empty.pem")},
                    internal_url="https://wiki.corp/")
    assert "no PEM certificate" in HTTPHandler().check_connector_app(app)


# -- backpressure ------------------------------------------------------------------------


def test_slow_backend_pauses_the_stream():
    """A back-end socket that cannot take more pauses the stream (no window credit to the service)."""
    w = World()
    stream, side, conn = w.request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n")
    connector_stream = conn.user.stream
    conn.transport.producer.pauseProducing()  # what a TCP transport does when its buffer is full
    assert connector_stream._reading_paused
    conn.transport.producer.resumeProducing()
    assert not connector_stream._reading_paused


def test_slow_stream_pauses_the_backend_socket():
    """Response bytes the tunnel cannot send yet pause reading from the back end, and resume."""
    w = World()
    stream, side, conn = w.request()
    stream.pauseProducing()  # the service's client reads nothing
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n")
    for _ in range(40):
        if conn.transport.producerState == "paused":
            break
        conn.dataReceived(b"x" * 65536)
        w.flush()
    assert conn.transport.producerState == "paused"
    assert conn.user.stream.pending_bytes >= HIGH_WATER
    assert len(side.data) < 2 * 1024 * 1024
    stream.resumeProducing()
    w.flush()
    assert conn.transport.producerState == "producing"


# -- upgrade -----------------------------------------------------------------------------


def test_upgrade_splices_both_ways_and_is_never_pooled():
    w = World()
    stream, side, conn = w.request(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                                    b"Sec-WebSocket-Key: k\r\n\r\n")
    assert b"Connection: Upgrade\r\n" in conn.transport.value() and b"Upgrade: websocket" in conn.transport.value()
    conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x01a")
    w.flush()
    assert side.data.endswith(b"\r\n\r\n\x81\x01a")
    conn.transport.clear()
    w.send(stream, b"\x81\x01b")
    assert conn.transport.value() == b"\x81\x01b"
    stream.loseWriteConnection()  # the client half-closes
    w.flush()
    assert conn.transport.write_closed
    conn.dataReceived(b"\x88\x00")
    w.backend.close(conn)
    w.flush()
    assert side.data.endswith(b"\x88\x00") and side.fin and side.reason.check(ConnectionDone)
    assert w.pool.idle_count() == 0


def test_refused_upgrade_is_a_normal_response():
    w = World()
    side, conn = w.exchange(request=b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                            response=b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert side.fin and side.data.startswith(b"HTTP/1.1 400")


def test_101_without_upgrade_request_is_an_error():
    w = World()
    stream, side, conn = w.request()
    conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    w.flush()
    assert side.reason.check(StreamReset) and "without an upgrade request" in side.reason.value.reason


# -- single sign-on ----------------------------------------------------------------------


class TokenProvider:
    def __init__(self):
        self.calls = []
        self.fail = False
        self.pending = None

    def credentials(self, app, identity, request):
        self.calls.append((app.name, identity, request.target))
        if self.fail:
            raise RuntimeError("the KDC said no")
        if self.pending is not None:
            return self.pending
        return [(b"Authorization", b"Negotiate " + identity["sub"].encode())]


class SSOPlugin:
    def __init__(self, provider):
        self.provider = provider

    @hookimpl
    def gateway_register_sso_providers(self, register):
        register("token", self.provider)


def providers_from_plugin(provider):
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(SSOPlugin(provider), name="test-sso")
    return plugins.sso_providers(pm)


IDENTITY = {"sub": "alice", "name": "Alice", "email": "alice@example.test", "groups": ["staff"]}


def test_sso_provider_sets_backend_headers():
    provider = TokenProvider()
    w = World(web_app(sso="token"), sso=providers_from_plugin(provider))
    stream, side = w.open(user="alice", identity=IDENTITY)
    w.send(stream, b"GET /me HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer from-client\r\n\r\n")
    sent = w.current().transport.value()
    assert b"Authorization: Negotiate alice\r\n" in sent and b"from-client" not in sent
    assert provider.calls == [("wiki", IDENTITY, b"/me")]


def test_sso_deferred_holds_the_body_until_credentials():
    provider = TokenProvider()
    provider.pending = Deferred()
    w = World(web_app(sso="token"), sso=providers_from_plugin(provider))
    stream, side = w.open(identity=IDENTITY)
    w.send(stream, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbo")
    w.send(stream, b"dy")
    assert w.current().transport.value() == b""
    provider.pending.callback([(b"X-Ticket", b"t")])
    w.flush()
    assert w.current().transport.value().endswith(b"X-Ticket: t\r\n\r\nbody")


def test_sso_failure_answers_a_502_page_with_the_correlation_id():
    """A provider that fails makes the connector answer 502 "single sign-on failed" with the request's
    correlation id, and nothing of the provider's error; the back end gets nothing."""
    provider = TokenProvider()
    provider.fail = True
    w = World(web_app(sso="token"), sso=providers_from_plugin(provider))
    stream, side = w.open(identity=IDENTITY)
    w.send(stream, GET)
    assert side.data.startswith(b"HTTP/1.1 502 ") and b"Single sign-on to the application failed" in side.data
    assert b"r1" in side.data and b"KDC" not in side.data
    assert side.fin and not isinstance(side.reason, Failure)
    assert all(c.transport.value() == b"" for c in w.backend.conns)


class ChallengeProvider(TokenProvider):
    """Sends nothing first; answers a 401 Negotiate challenge; judges the final answer's reply."""

    strip_headers = (b"authorization",)

    def __init__(self):
        super().__init__()
        self.judged = []

    def credentials(self, app, identity, request):
        self.calls.append((app.name, identity, request.target))
        return []

    def on_response(self, app, identity, request, sent, response):
        self.judged.append((response.status, list(sent)))
        if response.status == 401:
            return [(b"Authorization", b"Negotiate for-" + identity["sub"].encode())]
        if rules.values(response, b"www-authenticate") != [b"Negotiate good-reply"]:
            raise GatewayError("the mutual-auth reply does not verify")
        return None


def test_sso_never_forwards_the_clients_authorization_and_answers_a_challenge():
    """A provider with strip_headers: the client's Authorization never reaches the back end; its
    on_response answers a 401 by sending the request again, on a new connection, with its header,
    and the client sees only the second answer."""
    provider = ChallengeProvider()
    w = World(web_app(sso="token"), sso=providers_from_plugin(provider))
    stream, side = w.open(identity=IDENTITY)
    w.send(stream, b"GET /me HTTP/1.1\r\nHost: h\r\nAuthorization: Basic Zm9yZ2Vk\r\n\r\n")
    first = w.current()
    assert b"Authorization" not in first.transport.value()
    first.dataReceived(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Negotiate\r\nContent-Length: 3\r\n\r\nno!")
    w.flush()
    second = w.current()
    assert second is not first and b"Authorization: Negotiate for-alice\r\n" in second.transport.value()
    assert b"Zm9yZ2Vk" not in second.transport.value()
    second.dataReceived(b"HTTP/1.1 200 OK\r\nWWW-Authenticate: Negotiate good-reply\r\nContent-Length: 2\r\n\r\nok")
    w.flush()
    assert side.data.startswith(b"HTTP/1.1 200 OK") and side.data.endswith(b"ok") and b"401" not in side.data
    assert [status for status, _ in provider.judged] == [401, 200]


def test_sso_reply_that_does_not_verify_becomes_a_502():
    """A final answer the provider's on_response refuses (mutual auth failed) is not relayed: 502 page."""
    provider = ChallengeProvider()
    w = World(web_app(sso="token"), sso=providers_from_plugin(provider))
    stream, side = w.open(identity=IDENTITY)
    w.send(stream, GET)
    w.current().dataReceived(b"HTTP/1.1 200 OK\r\nWWW-Authenticate: Negotiate forged\r\nContent-Length: 6\r\n\r\nsecret")
    w.flush()
    assert side.data.startswith(b"HTTP/1.1 502 ") and b"secret" not in side.data


def test_sso_challenge_is_answered_at_most_twice():
    """A back end that keeps answering 401 gets the request three times at most, then the client a 502."""
    provider = ChallengeProvider()
    w = World(web_app(sso="token"), sso=providers_from_plugin(provider))
    stream, side = w.open(identity=IDENTITY)
    w.send(stream, GET)
    for _ in range(3):
        w.current().dataReceived(b"HTTP/1.1 401 No\r\nWWW-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n")
        w.flush()
    assert len(provider.judged) == 3
    assert side.data.startswith(b"HTTP/1.1 502 ")


def test_sso_without_identity_or_unknown_provider_refuses():
    w = World(web_app(sso="token"), sso=providers_from_plugin(TokenProvider()))
    result, _ = w.open()
    assert result.check(StreamReset) and "no signed-in user" in result.value.reason
    w = World(web_app(sso="kerberos"), sso=providers_from_plugin(TokenProvider()))
    result, _ = w.open(identity=IDENTITY)
    assert result.check(StreamReset) and "'kerberos'" in result.value.reason and "token" in result.value.reason
    assert w.backend.conns == []


def test_unknown_provider_is_a_config_error_when_the_app_arrives():
    problem = check_sso(web_app(sso="kerberos"), {"token": TokenProvider()})
    assert "options.sso" in problem and "'kerberos'" in problem and "loaded: token" in problem
    assert check_sso(web_app(sso="token"), {"token": TokenProvider()}) is None


def test_two_plugins_one_provider_name_is_an_error():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(SSOPlugin(TokenProvider()), name="a")
    pm.register(SSOPlugin(TokenProvider()), name="b")
    with pytest.raises(plugins.PluginError, match="two plugins register the SSO provider 'token'"):
        plugins.sso_providers(pm)


def test_a_stream_carries_the_connections_next_requests_on_the_same_back_end_connection():
    """After a complete exchange the stream stays for the next request, which goes out on the
    back-end connection paired with the stream; its X-Gateway-Request-Id names it in the logs."""
    w = World()
    stream, side, conn = w.request(GET)
    conn.dataReceived(OK)
    w.flush()
    assert side.data == OK and not side.fin and w.pool.idle_count() == 0
    second = GET.replace(b"\r\n\r\n", b"\r\nX-Gateway-Request-Id: r2\r\n\r\n")
    w.send(stream, second)
    assert w.current() is conn and conn.transport.value() == GET + second
    conn.dataReceived(OK)
    w.flush()
    assert side.data == OK + OK
    assert conn.user is None or conn.user.request_id == "r2"
    assert w.connector.streams[stream.id].protocol.request_id == "r2"
    stream.loseConnection()
    w.flush()
    assert side.fin and w.pool.idle_count() == 1 and w.pool.dials == 1


def test_a_closed_back_end_connection_is_replaced_for_the_next_request():
    """A back end saying Connection: close ends that connection, not the stream: the next request dials."""
    w = World()
    stream, side, conn = w.request(GET)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    w.flush()
    assert not side.fin and str(conn.transport.closed_how) == "close"
    w.send(stream, GET)
    again = w.current()
    assert again is not conn and again.transport.value() == GET


@pytest.mark.parametrize("stray", [b"EXTRA", b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n"])
def test_stray_bytes_on_the_connection_a_stream_keeps_close_it(stray):
    """Bytes the back end sends while the stream waits for its next request (a body longer than its
    Content-Length, Node's unsolicited 408) abort that connection without an error; the next request
    is answered on a new connection, not prefixed with them."""
    w = World()
    stream, side, conn = w.request(GET)
    conn.dataReceived(OK)
    w.flush()
    conn.dataReceived(stray)
    w.flush()
    assert conn.transport.closed_how == "abort" and not side.fin and side.reason is None
    w.send(stream, GET)
    fresh = w.current()
    assert fresh is not conn and fresh.transport.value() == GET and w.pool.dials == 2
    fresh.dataReceived(OK)
    w.flush()
    assert side.data == OK + OK
