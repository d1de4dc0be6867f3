"""The http plugin's front door against in-memory transports: framing, keep-alive, errors, backpressure."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from attrs import define, field
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.service.registry import NoConnector
from gateway_http.frontdoor import FrontDoor, Timeouts
from gateway_http.rules import ChunkDecoder


@define
class App:
    name: str = "wiki"
    external_url: str = "http://wiki.example.test/"
    internal_url: str = "http://wiki.corp:8000/"
    host: str = "wiki.corp"
    port: int = 8000
    options: dict = field(factory=dict)


class FakeStream:
    """Enough of gateway.tunnel.stream.Stream for the front door."""

    def __init__(self, metadata: dict) -> None:
        self.metadata = metadata
        self.data = b""
        self.protocol: Any = None
        self.producer: Any = None
        self.closed = False
        self.fin = False
        self.reset_with: Any = None
        self.paused = False

    def attach(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        self.data += data

    def writeSequence(self, seq) -> None:
        self.data += b"".join(seq)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    @property
    def _reading_paused(self) -> bool:   # the real Stream's name, which the front door reads
        return self.paused

    def stopProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.fin = True

    def loseWriteConnection(self) -> None:
        self.fin = True

    def reset(self, code: int, reason: str) -> None:
        self.reset_with = (code, reason)
        self.closed = True

    # the back end's side
    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.protocol.connectionLost(reason or Failure(ConnectionDone()))


class Harness:
    def __init__(self, apps=None, fail_with: Exception | None = None, clock: Clock | None = None) -> None:
        self.apps = {a.external_url.split("/")[2]: a for a in (apps or [App()])}
        self.opens: list[tuple[Deferred, FakeStream]] = []
        self.fail_with = fail_with
        self.door = FrontDoor(lambda host, target: self.apps.get(host), self.open_stream, reactor=clock,
                              timeouts=Timeouts(header=5, idle=20))
        self.transport = StringTransport()
        self.door.makeConnection(self.transport)

    def open_stream(self, app: Any, extra: dict) -> Deferred:
        if self.fail_with is not None:
            return fail(self.fail_with)
        d: Deferred = Deferred()
        self.opens.append((d, FakeStream(extra)))
        return d

    def accept(self, i: int = -1) -> FakeStream:
        d, stream = self.opens[i]
        d.callback(stream)
        return stream

    def send(self, data: bytes) -> None:
        self.door.dataReceived(data)

    def output(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value


GET = b"GET /a HTTP/1.1\r\nHost: wiki.example.test\r\n\r\n"


def test_request_goes_to_a_stream_and_response_comes_back():
    """One GET: translated head into the stream, the response back, the connection kept, the stream closed."""
    h = Harness()
    h.send(GET)
    stream = h.accept()
    assert stream.data.startswith(b"GET /a HTTP/1.1\r\n") and b"Host: wiki.corp:8000\r\n" in stream.data
    writes = []
    write = h.transport.write
    h.transport.write = lambda data: (writes.append(data), write(data))
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    out = h.output()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nhello")
    assert b"Connection: keep-alive" in out
    assert not stream.fin and not h.transport.disconnecting   # kept for the connection's next request
    assert h.transport.producerState == "producing"
    assert len(writes) == 1   # head and body in one write (one send)
    h.door.connectionLost(Failure(ConnectionDone()))
    assert stream.fin   # the client went: the kept stream ends


def test_bytes_arriving_while_a_request_is_in_flight_pause_the_client():
    """The socket is not paused per request, but the moment a pipelining client sends more while
    a request is in flight it is, and it resumes once the response is over."""
    h = Harness()
    h.send(GET)
    assert h.transport.producerState == "producing"
    h.send(GET.replace(b"/a", b"/b"))
    assert h.transport.producerState == "paused"
    stream = h.accept(0)
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert stream.data.count(b"GET /") == 2 and h.transport.producerState == "producing"


def test_pipelined_requests_are_answered_in_order():
    """Two requests in one read: the second goes on the same stream only after the first response ended."""
    h = Harness()
    h.send(GET + GET.replace(b"/a", b"/b"))
    stream = h.accept()
    assert stream.data.count(b"GET /") == 1
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert len(h.opens) == 1 and stream.data.count(b"GET /") == 2
    assert stream.data[stream.data.index(b"GET /b "):].startswith(b"GET /b ")
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    out = h.output()
    assert out.index(b"\r\n\r\n1") < out.index(b"\r\n\r\n2")


def test_a_new_stream_for_another_user_or_a_closed_one():
    """The kept stream serves the next request only for the same app and user and while it is open."""
    from gateway_http.auth import Allow, Identity
    h = Harness()
    h.send(GET)
    first = h.accept()
    first.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.door.gate = Gate(Allow(Identity("bob"), None))
    h.send(GET)
    assert len(h.opens) == 2 and first.fin   # another user: the kept stream ends, a new one opens
    second = h.accept()
    assert second.metadata["user"] == "bob"
    second.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    second.closed = True   # e.g. the connector went away
    h.send(GET)
    assert len(h.opens) == 3


def test_each_request_on_a_kept_stream_carries_its_own_id():
    """X-Gateway-Request-Id tells the connector (and the back end) which request it is; a client's is dropped."""
    h = Harness()
    h.send(GET.replace(b"\r\n\r\n", b"\r\nX-Gateway-Request-Id: forged\r\n\r\n"))
    stream = h.accept()
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.send(GET)
    ids = [line for line in stream.data.split(b"\r\n") if line.startswith(b"X-Gateway-Request-Id: ")]
    assert len(ids) == 2 and ids[0] != ids[1] and b"forged" not in stream.data


def test_chunked_request_body_is_re_encoded():
    """A chunked upload reaches the stream as well-formed chunks ending with the last chunk."""
    h = Harness()
    h.send(b"PUT /u HTTP/1.1\r\nHost: wiki.example.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    stream = h.accept()
    h.send(b"2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n")
    body = stream.data.partition(b"\r\n\r\n")[2]
    d = ChunkDecoder()
    pieces, _ = d.feed(body)
    assert b"".join(pieces) == b"abcde" and d.done
    assert b"Transfer-Encoding: chunked" in stream.data


def test_length_request_body_and_backpressure():
    """A length-framed body is relayed exactly; a full stream pauses reading from the client."""
    h = Harness()
    h.send(b"POST /u HTTP/1.1\r\nHost: wiki.example.test\r\nContent-Length: 6\r\n\r\nabc")
    stream = h.accept()
    assert h.transport.producerState == "producing"
    stream.producer.pauseProducing()
    assert h.transport.producerState == "paused"
    stream.producer.resumeProducing()
    assert h.transport.producerState == "producing"
    h.send(b"def")
    assert stream.data.endswith(b"\r\n\r\nabcdef") and stream.producer is None


def test_response_until_close_is_chunked_to_an_http_1_1_client():
    """A back end answering without length ends by closing; the client gets chunks and keeps its connection."""
    h = Harness()
    h.send(GET)
    stream = h.accept()
    stream.answer(b"HTTP/1.0 200 OK\r\n\r\nsome")
    stream.answer(b" body")
    stream.end()
    out = h.output()
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    d = ChunkDecoder()
    pieces, _ = d.feed(body)
    assert b"".join(pieces) == b"some body" and d.done
    assert not h.transport.disconnecting


def test_chunked_response_to_an_http_1_0_client_is_decoded_and_closes():
    """An HTTP/1.0 client gets the decoded body and the connection closes after it."""
    h = Harness()
    h.send(b"GET / HTTP/1.0\r\nHost: wiki.example.test\r\n\r\n")
    stream = h.accept()
    stream.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")
    out = h.output()
    assert out.endswith(b"\r\n\r\nabcd") and b"Connection: close" in out
    assert h.transport.disconnecting


def test_head_request_keeps_content_length_and_sends_no_body():
    """HEAD: the back end's Content-Length is passed on and the response ends without a body."""
    h = Harness()
    h.send(b"HEAD / HTTP/1.1\r\nHost: wiki.example.test\r\n\r\n")
    stream = h.accept()
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    out = h.output()
    assert b"Content-Length: 99" in out and out.endswith(b"\r\n\r\n") and not h.transport.disconnecting


def test_100_continue_is_passed_on():
    """An interim 100 Continue reaches an HTTP/1.1 client before the final response."""
    h = Harness()
    h.send(b"POST / HTTP/1.1\r\nHost: wiki.example.test\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n")
    stream = h.accept()
    stream.answer(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert h.output() == b"HTTP/1.1 100 Continue\r\n\r\n"
    h.send(b"x")
    stream.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert h.output().startswith(b"HTTP/1.1 201 Created")


def test_unknown_host_is_404_without_a_stream():
    """A Host no app has gets a 404 page with a correlation id and opens no stream."""
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: nobody.example.test\r\n\r\n")
    out = h.output()
    assert out.startswith(b"HTTP/1.1 404 ") and b"X-Request-Id: " in out
    assert not h.opens and h.transport.disconnecting


def test_no_connector_is_502_with_the_request_id_sent_to_the_router():
    """When no stream can be opened the page carries the same id the router was given."""
    seen = {}
    h = Harness(fail_with=NoConnector("no healthy connector of group 'default'"))
    original = h.open_stream
    h.door.open_stream = lambda app, extra: (seen.update(extra), original(app, extra))[1]
    h.send(GET)
    out = h.output()
    assert out.startswith(b"HTTP/1.1 502 ")
    assert seen["request_id"].encode() in out and b"default" not in out


def test_stream_lost_before_the_response_head_is_502():
    """A stream that ends (or resets) before any response head gives a 502 page."""
    h = Harness()
    h.send(GET)
    stream = h.accept()
    stream.end(Failure(ConnectionLost("tunnel lost")))
    out = h.output()
    assert out.startswith(b"HTTP/1.1 502 ") and stream.metadata["request_id"].encode() in out


def test_stream_lost_mid_body_aborts_the_client():
    """Once part of the response went out, a broken stream breaks the client connection."""
    h = Harness()
    h.send(GET)
    stream = h.accept()
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    stream.end()
    assert h.transport.disconnecting and b"502" not in h.output()


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\nContent-Length: 2\n"])
def test_malformed_response_is_502_and_resets_the_stream(answer):
    """A garbage status line, or a head with a line ending in LF alone (at once, not after a
    timeout), gives the client a 502 and resets the stream."""
    h = Harness()
    h.send(GET)
    stream = h.accept()
    stream.answer(answer)
    assert h.output().startswith(b"HTTP/1.1 502 ") and stream.reset_with is not None


def test_oversized_head_is_431():
    """A request head larger than the limit gets a 431 without opening a stream."""
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000)
    assert h.output().startswith(b"HTTP/1.1 431 ") and not h.opens


def test_client_gone_resets_the_stream():
    """A client hanging up mid-response resets the request's stream."""
    h = Harness()
    h.send(GET)
    stream = h.accept()
    h.door.connectionLost(Failure(ConnectionDone()))
    assert stream.reset_with is not None


def test_a_finished_response_lets_its_stream_drain():
    """A stream paused by a slow client is resumed once its response is complete, so it can close
    (or carry the next request)."""
    h = Harness()
    h.send(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    stream = h.accept()
    stream.pauseProducing()
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert not stream.paused and stream.fin


def test_idle_connection_is_closed_quietly():
    """A connection that sends nothing for idle_timeout is closed without a response."""
    clock = Clock()
    h = Harness(clock=clock)
    clock.advance(19)
    assert not h.transport.disconnecting
    clock.advance(1)
    assert h.transport.disconnecting and h.output() == b""


def test_slow_request_head_gets_408():
    """A head still incomplete header_timeout after its first byte gets 408, however slowly bytes trickle in."""
    clock = Clock()
    h = Harness(clock=clock)
    for _ in range(4):
        h.send(b"G")
        clock.advance(1)
    assert not h.transport.disconnecting
    clock.advance(1)
    out = h.output()
    assert out.startswith(b"HTTP/1.1 408 ") and b"X-Request-Id: " in out and h.transport.disconnecting


def test_timers_stop_during_a_request_and_restart_after():
    """No timeout while a request is in flight; a kept-alive connection gets the idle timeout again."""
    clock = Clock()
    h = Harness(clock=clock)
    h.send(GET)
    stream = h.accept()
    clock.advance(80)
    assert not h.transport.disconnecting
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    clock.advance(19)
    assert not h.transport.disconnecting
    clock.advance(1)
    assert h.transport.disconnecting and not clock.getDelayedCalls()


def test_silent_back_end_gets_504_after_its_timeout():
    """options.backend_timeout: "default" is 85 s, "long" 180 s; the page carries the request id and
    the stream is reset with TIMEOUT."""
    for option, seconds in (("default", 85), ("long", 180), (3, 3)):
        clock = Clock()
        h = Harness(apps=[App(options={"backend_timeout": option})], clock=clock)
        h.send(GET)
        stream = h.accept()
        clock.advance(seconds - 0.5)
        assert h.output() == b""
        clock.advance(0.5)
        out = h.output()
        assert out.startswith(b"HTTP/1.1 504 "), option
        assert stream.reset_with[0] == 6 and stream.metadata["request_id"].encode() in out


def test_back_end_timeout_counts_silence_not_the_whole_body():
    """A back end that keeps sending a long body is not cut off: the timer restarts with every piece."""
    clock = Clock()
    h = Harness(apps=[App(options={"backend_timeout": 10})], clock=clock)
    h.send(GET)
    stream = h.accept()
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    for piece in (b"a", b"b"):
        clock.advance(9)
        stream.answer(piece)
    clock.advance(9)
    stream.answer(b"c")
    assert h.output().endswith(b"abc") and not h.transport.disconnecting


def test_back_end_that_stops_taking_the_request_body_gets_504():
    """The stream pausing the client's body (the back end reads no more) runs options.backend_timeout,
    not the client's body_timeout; the wait starts again when the body flows."""
    clock = Clock()
    h = Harness(apps=[App(options={"backend_timeout": 10})], clock=clock)
    h.send(b"PUT /a HTTP/1.1\r\nHost: wiki.example.test\r\nContent-Length: 10\r\n\r\n12345")
    stream = h.accept()
    stream.producer.pauseProducing()
    clock.advance(9)
    stream.producer.resumeProducing()
    h.send(b"67")
    stream.producer.pauseProducing()
    clock.advance(9.9)
    assert h.output() == b"" and stream.reset_with is None
    clock.advance(0.1)
    assert h.output().startswith(b"HTTP/1.1 504 ") and stream.reset_with[0] == 6


def test_slow_request_body_gets_408():
    """A client that stops sending its body for body_timeout gets 408 and the stream is reset."""
    clock = Clock()
    h = Harness(clock=clock)
    h.door.timeouts = Timeouts(header=5, idle=20, body=7)
    h.send(b"PUT /a HTTP/1.1\r\nHost: wiki.example.test\r\nContent-Length: 10\r\n\r\n12345")
    stream = h.accept()
    clock.advance(6)
    h.send(b"67")
    clock.advance(6)
    assert not h.transport.disconnecting
    clock.advance(1)
    assert h.output().startswith(b"HTTP/1.1 408 ") and stream.reset_with is not None


class AckingTransport(StringTransport):
    """A StringTransport whose socket reports, as Linux TCP_INFO does, bytes the peer acknowledged."""

    def __init__(self) -> None:
        super().__init__()
        self.acked = 0

    def getHandle(self):
        transport = self

        class Socket:
            def getsockopt(self, level, option, size):
                info = bytearray(size)
                info[120:128] = transport.acked.to_bytes(8, sys.byteorder)
                return bytes(info)

        return Socket()


def _held_response(h: Harness, send: float = 60) -> FakeStream:
    """A GET whose response has started and whose client socket then pauses the stream (buffer full)."""
    h.door.timeouts = Timeouts(header=5, idle=20, send=send)
    h.send(GET)
    stream = h.accept()
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    h.transport.producer.pauseProducing()
    assert stream.paused
    return stream


def test_client_that_takes_no_response_bytes_is_cut_off_after_send_timeout():
    """Slow read: the stream stays paused for [http] send_timeout, so the connection is aborted and
    the stream reset, which frees the back-end connection on the connector."""
    clock = Clock()
    h = Harness(clock=clock)
    stream = _held_response(h)
    clock.advance(59.5)
    assert not h.transport.disconnecting and stream.reset_with is None
    clock.advance(0.5)
    assert h.transport.disconnecting
    assert stream.reset_with is not None and "took no response bytes for 60 s" in stream.reset_with[1]


def test_send_timeout_restarts_whenever_the_client_drains_its_buffer():
    clock = Clock()
    h = Harness(clock=clock)
    stream = _held_response(h)
    for _ in range(3):
        clock.advance(50)
        h.transport.producer.resumeProducing()
        assert not stream.paused
        h.transport.producer.pauseProducing()
    clock.advance(59)
    assert not h.transport.disconnecting
    clock.advance(1)
    assert h.transport.disconnecting


def test_a_slow_client_that_still_takes_bytes_is_not_cut_off():
    """As nginx's send_timeout: what counts is a stall, not a buffer that drains slowly."""
    clock = Clock()
    h = Harness(clock=clock)
    h.transport = AckingTransport()
    h.door.makeConnection(h.transport)
    h.transport.acked = 50_000
    stream = _held_response(h, send=10)
    for taken in (1000, 1000, 500):
        h.transport.acked += taken
        clock.advance(10)
        assert not h.transport.disconnecting
    clock.advance(10)            # nothing taken in this period
    assert h.transport.disconnecting and stream.reset_with is not None


def test_websocket_upgrade_splices_both_ways():
    """After a 101 the client connection and the stream carry raw bytes both ways, half-close included."""
    h = Harness()
    h.send(b"GET /ws HTTP/1.1\r\nHost: wiki.example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    stream = h.accept()
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in stream.data
    stream.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi")
    out = h.output()
    assert out.startswith(b"HTTP/1.1 101 ") and out.endswith(b"\r\n\r\n\x81\x02hi")
    assert h.transport.producerState == "producing"
    before = len(stream.data)
    h.send(b"\x81\x82abcdef")
    assert stream.data[before:] == b"\x81\x82abcdef"
    stream.answer(b"\x88\x00")
    assert h.output() == b"\x88\x00"
    h.door.readConnectionLost()
    assert stream.fin


def test_101_without_an_upgrade_request_is_502():
    """A back end switching protocols unasked is a broken answer."""
    h = Harness()
    h.send(GET)
    stream = h.accept()
    stream.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert h.output().startswith(b"HTTP/1.1 502 ")


def test_custom_request_headers_reach_the_stream():
    """options.request_headers are set on every request and win over the client's."""
    h = Harness(apps=[App(options={"request_headers": {"X-Tenant": "corp"}})])
    h.send(b"GET / HTTP/1.1\r\nHost: wiki.example.test\r\nX-Tenant: evil\r\n\r\n")
    stream = h.accept()
    assert b"X-Tenant: corp\r\n" in stream.data and b"evil" not in stream.data


class Gate:
    def __init__(self, decision) -> None:
        self.decision = decision
        self.seen = []

    def check(self, request, app, external, client_host, request_id=""):
        self.seen.append((request.target, external.host, client_host))
        from twisted.internet.defer import succeed
        return succeed(self.decision)


def test_gate_answering_itself_opens_no_stream_and_keeps_the_connection():
    """A Respond from pre-authentication (e.g. a redirect to sign in) is sent; no stream is opened."""
    from gateway_http.auth import Respond
    h = Harness()
    h.door.gate = Gate(Respond(302, [(b"Location", b"https://idp.example.test/auth")], b""))
    h.send(GET)
    out = h.output()
    assert out.startswith(b"HTTP/1.1 302 Found\r\n") and b"Location: https://idp.example.test/auth" in out
    assert b"Connection: keep-alive" in out and not h.opens and not h.transport.disconnecting
    h.send(b"POST /a HTTP/1.1\r\nHost: wiki.example.test\r\nContent-Length: 3\r\n\r\nabc")
    assert b"Connection: close" in h.output() and h.transport.disconnecting and not h.opens


def test_gate_identity_travels_in_the_stream_metadata():
    """An Allow with an identity puts user and identity into the metadata and may replace headers;
    the gate's own X-Gateway-* headers reach the back end, a client's of that name never do."""
    from gateway_http.auth import Allow, Identity
    h = Harness()
    who = Identity("alice", "Alice", "alice@example.test", ("staff",))
    h.door.gate = Gate(Allow(who, [(b"Host", b"wiki.example.test"), (b"X-Gateway-Jwt-Assertion", b"forged")],
                             [(b"X-Gateway-Jwt-Assertion", b"jwt")]))
    h.send(GET)
    stream = h.accept()
    assert stream.metadata["user"] == "alice" and stream.metadata["identity"]["groups"] == ["staff"]
    assert b"X-Gateway-Jwt-Assertion: jwt\r\n" in stream.data and b"forged" not in stream.data


def _translating_harness():
    from gateway_http.links import LinkMap
    apps = [App(options={"translate_links": True}), App(name="crm", external_url="http://crm.example.test/",
                                                        internal_url="http://crm.corp:9000/")]
    h = Harness(apps=apps)
    h.door.link_map = LinkMap.from_apps(apps)
    return h


def _dechunk(body: bytes) -> bytes:
    pieces, rest = ChunkDecoder().feed(body)
    return b"".join(pieces)


def test_links_in_html_are_translated_streaming_and_rechunked():
    """options.translate_links: internal URLs of every app become external ones in an HTML body,
    sent chunked (the length changed), Accept-Encoding narrowed to what we can undo, ETag weakened."""
    h = _translating_harness()
    h.send(b"GET / HTTP/1.1\r\nHost: wiki.example.test\r\nAccept-Encoding: br, gzip\r\n\r\n")
    stream = h.accept()
    assert b"Accept-Encoding: gzip\r\n" in stream.data
    page = b'<a href="http://wiki.corp:8000/x">x</a> <a href="http://crm.corp:9000/y">y</a>'
    stream.answer(b'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nETag: "abc"\r\nContent-Length: %d\r\n\r\n'
                  % len(page))
    for i in range(0, len(page), 7):   # links split across pieces
        stream.answer(page[i:i + 7])
    out = h.output()
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head and b'ETag: W/"abc"' in head
    assert _dechunk(body) == b'<a href="http://wiki.example.test/x">x</a> <a href="http://crm.example.test/y">y</a>'
    assert body.endswith(b"0\r\n\r\n") and not h.transport.disconnecting


def test_gzip_bodies_are_translated_and_images_left_alone():
    """A gzip HTML body is inflated, translated and deflated again; an image passes byte for byte."""
    import gzip
    import zlib
    h = _translating_harness()
    h.send(GET)
    stream = h.accept()
    body = gzip.compress(b"see http://wiki.corp:8000/page")
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    out = h.output().partition(b"\r\n\r\n")[2]
    assert zlib.decompress(_dechunk(out), 16 + zlib.MAX_WBITS) == b"see http://wiki.example.test/page"
    h.send(GET)
    png = b"\x89PNG http://wiki.corp:8000/"
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n%s" % (len(png), png))
    out = h.output()
    assert out.endswith(png) and b"Content-Length: %d" % len(png) in out


def test_translation_off_by_default():
    """Without options.translate_links bodies are untouched and keep their length."""
    from gateway_http.links import LinkMap
    h = Harness()
    h.door.link_map = LinkMap.from_apps([App()])
    h.send(GET)
    stream = h.accept()
    page = b"http://wiki.corp:8000/"
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s" % (len(page), page))
    assert h.output().endswith(b"\r\n\r\n" + page)


def test_a_decompression_bomb_breaks_the_response_not_the_service():
    """A gzip body that inflates far beyond its size ends the client connection; the stream is reset."""
    import gzip
    h = _translating_harness()
    h.send(GET)
    stream = h.accept()
    bomb = gzip.compress(b"\0" * (64 << 20))
    stream.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\nContent-Length: %d"
                  b"\r\n\r\n" % len(bomb))
    stream.answer(bomb)
    assert h.transport.disconnecting and stream.reset_with is not None


def test_interim_responses_reach_http11_clients_only():
    """103 Early Hints (any 1xx but 101) is passed on to an HTTP/1.1 client before the final answer."""
    h = Harness()
    h.send(GET)
    stream = h.accept()
    stream.answer(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    out = h.output()
    assert out.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n")
    h = Harness()
    h.send(GET.replace(b"HTTP/1.1", b"HTTP/1.0"))
    stream = h.accept()
    stream.answer(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.output().startswith(b"HTTP/1.1 200 OK\r\n")


def test_acked_bytes_reads_what_the_peer_acknowledged_on_a_real_socket():
    """The TCP_INFO offset holds on this kernel: after the peer's kernel took 100,000 bytes the
    counter says so; a transport without a socket says nothing."""
    import socket
    import time

    from gateway_http.frontdoor import acked_bytes

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    handle = type("Transport", (), {"getHandle": lambda self: server})()
    try:
        assert acked_bytes(handle) == 0
        server.sendall(b"x" * 100_000)
        received = 0
        while received < 100_000:
            received += len(client.recv(65536))
        deadline = time.monotonic() + 5
        while acked_bytes(handle) != 100_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert acked_bytes(handle) == 100_000
        assert acked_bytes(StringTransport()) is None
    finally:
        for s in (client, server, listener):
            s.close()


def test_connect_and_trace_are_405_without_a_stream_unless_allowed():
    """CONNECT and TRACE are answered 405 with an Allow header; an app opting in gets them forwarded."""
    for request in (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: wiki.example.test\r\n\r\n",
                    b"TRACE / HTTP/1.1\r\nHost: wiki.example.test\r\n\r\n"):
        h = Harness()
        h.send(request)
        out = h.output()
        assert out.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"\r\nAllow: GET, HEAD" in out
        assert h.opens == []
    h = Harness([App(options={"allow_connect": True})])
    h.send(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: wiki.example.test\r\n\r\n")
    assert h.accept().data.startswith(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n")


def test_a_bare_lf_head_is_400_at_once():
    """A head whose lines end in LF alone is a 400 as soon as the LF arrives, with no stream."""
    h = Harness()
    h.send(b"GET / HTTP/1.1\nHost: wiki.example.test\n")
    assert h.output().startswith(b"HTTP/1.1 400 ") and h.opens == []


def test_a_malformed_host_is_400_and_a_normalised_target_is_forwarded():
    """A Host with a quote is a 400; //a/%7Eb reaches the back end as /a/~b."""
    h = Harness()
    h.send(b'GET / HTTP/1.1\r\nHost: wiki.example.test"x\r\n\r\n')
    assert h.output().startswith(b"HTTP/1.1 400 ") and h.opens == []
    h = Harness()
    h.send(b"GET //a/%7Eb?q=%7E HTTP/1.1\r\nHost: wiki.example.test\r\n\r\n")
    assert h.accept().data.startswith(b"GET /a/~b?q=%7E HTTP/1.1\r\n")
