"""Lossless drain in the http plugin: the connector ends idle streams with GOING_AWAY when it
drains, and the front door sends a request refused that way through another connector, never
one that may have reached a back end."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.tunnel.frame import ResetCode
from gateway.tunnel.stream import StreamReset
from gateway_http.frontdoor import MAX_ATTEMPTS, REPLAY_LIMIT, FrontDoor, Timeouts
from test_http_backend import GET as BACKEND_GET
from test_http_backend import OK, World
from test_http_frontdoor import GET, App, Harness

POST = b"POST /a HTTP/1.1\r\nHost: wiki.example.test\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = b"POST /a HTTP/1.1\r\nHost: wiki.example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def drained(reason: str = "the connector is draining") -> Failure:
    return Failure(StreamReset(ResetCode.GOING_AWAY, reason))


# -- the connector: a draining tunnel's idle streams ------------------------------------------


def test_a_kept_stream_is_reset_going_away_when_the_connector_drains_and_a_crossing_request_is_dropped():
    """A stream between requests is reset GOING_AWAY at GO_AWAY; a request the service sent meanwhile never reaches the back end."""
    w = World()
    stream, side, conn = w.request()
    conn.dataReceived(OK)
    w.flush()
    assert side.data == OK and not side.fin   # kept for the client connection's next request
    stream.write(BACKEND_GET)                  # crosses the GO_AWAY on the wire
    w.connector.go_away()
    w.flush()
    assert conn.transport.value() == BACKEND_GET   # the first request only
    assert side.reason.check(StreamReset) and side.reason.value.code == ResetCode.GOING_AWAY
    assert w.pool.idle_count() == 1                # the back-end connection goes back to the pool
    assert w.connector.open_streams == 0           # nothing holds the drain


def test_a_request_in_flight_when_the_connector_drains_is_answered_then_its_stream_ends():
    """A request already forwarded when the drain starts gets its whole answer; the stream then ends with FIN."""
    w = World()
    stream, side, conn = w.request()
    w.connector.go_away()
    w.flush()
    assert side.reason is None
    conn.dataReceived(OK)
    w.flush()
    assert side.data == OK and side.fin   # not kept: the service sends no next request here


# -- the front door: sending a refused request elsewhere --------------------------------------


def test_a_request_refused_going_away_before_any_answer_is_sent_again_on_a_new_stream():
    """A GET whose stream is reset GOING_AWAY before any answer goes, byte for byte, on a new stream; the client gets its 200."""
    h = Harness()
    h.send(GET)
    first = h.accept()
    first.end(drained())
    assert len(h.opens) == 2 and h.output() == b""
    second = h.accept()
    assert second.data == first.data
    second.answer(ANSWER)
    assert h.output().startswith(b"HTTP/1.1 200 OK\r\n") and not h.transport.disconnecting


@pytest.mark.parametrize("request_, body_after", [
    (POST, b""),
    (CHUNKED + b"5\r\nhello\r\n", b"0\r\n\r\n"),
])
def test_a_post_refused_going_away_is_sent_again_with_its_body(request_, body_after):
    """A POST refused GOING_AWAY (body complete or still coming) goes again with the body sent so far, then the rest."""
    h = Harness()
    h.send(request_)
    first = h.accept()
    first.end(drained())
    second = h.accept()
    h.send(body_after)
    assert second.data.startswith(first.data) and second.data.endswith(b"0\r\n\r\n" if body_after else b"hello")
    assert second.data.count(b"POST /a") == 1
    second.answer(ANSWER)
    assert h.output().startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("code", [ResetCode.CANCELLED, ResetCode.CONNECT_FAILED, ResetCode.INTERNAL_ERROR])
def test_a_request_reset_for_another_reason_is_never_sent_again(code):
    """Only GOING_AWAY promises the request was not forwarded: any other reset is a 502, with no second stream."""
    h = Harness()
    h.send(POST)
    h.accept().end(Failure(StreamReset(code, "the back end closed the connection")))
    assert len(h.opens) == 1
    assert h.output().startswith(b"HTTP/1.1 502 ")


def test_going_away_after_the_answer_began_is_never_sent_again():
    """Once any answer byte came, the request reached the back end: a later reset breaks the response, no retry."""
    h = Harness()
    h.send(GET)
    first = h.accept()
    first.answer(b"HTTP/1.1 200 OK\r\nContent-Le")
    first.end(drained())
    assert len(h.opens) == 1 and h.output().startswith(b"HTTP/1.1 502 ")


def test_a_request_with_a_body_larger_than_the_replay_limit_is_not_sent_again():
    """The front door keeps at most REPLAY_LIMIT bytes of body to resend: a larger request refused GOING_AWAY is a 502."""
    h = Harness()
    size = REPLAY_LIMIT + 1
    h.send(b"POST /a HTTP/1.1\r\nHost: wiki.example.test\r\nContent-Length: %d\r\n\r\n" % size)
    first = h.accept()
    h.send(b"x" * size)
    first.end(drained())
    assert len(h.opens) == 1 and h.output().startswith(b"HTTP/1.1 502 ")


def test_a_request_is_sent_at_most_max_attempts_times():
    """A group whose every connector keeps refusing GOING_AWAY gets MAX_ATTEMPTS tries, then a 502."""
    h = Harness()
    h.send(GET)
    for _ in range(MAX_ATTEMPTS):
        h.accept().end(drained())
    assert len(h.opens) == MAX_ATTEMPTS and h.output().startswith(b"HTTP/1.1 502 ")


# -- both halves over real tunnel sessions ------------------------------------------------------


def test_a_request_crossing_the_drain_is_answered_by_the_other_connector_and_reaches_one_back_end():
    """Front door and two connectors over in-memory tunnels: a keep-alive request sent as its connector
    drains is refused unforwarded and answered through the other connector; each back end sees it at most once."""
    first, second = World(), World()
    app = App()

    def open_stream(_app, extra):   # the router: the first tunnel still taking streams
        world = first if first.service.available else second
        return world.service.open_stream({"kind": "app", "app": "wiki", "request_id": "r", **extra})

    door = FrontDoor(lambda host, target: app, open_stream, reactor=Clock(), timeouts=Timeouts())
    client = StringTransport()
    door.makeConnection(client)
    door.dataReceived(GET)
    first.flush()
    first.current().dataReceived(ANSWER)
    first.flush()
    assert client.value().endswith(b"\r\n\r\nok")
    client.clear()
    door.dataReceived(GET.replace(b"/a", b"/b"))   # on the kept stream, not yet on the wire
    first.connector.go_away()                      # the connector drains meanwhile
    first.flush()
    second.flush()
    assert [c.transport.value().count(b"GET /b") for c in first.backend.conns] == [0]
    second.current().dataReceived(ANSWER)
    second.flush()
    assert client.value().startswith(b"HTTP/1.1 200 OK\r\n") and not client.disconnecting
    assert second.backend.conns[0].transport.value().count(b"GET /b") == 1
