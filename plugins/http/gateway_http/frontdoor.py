"""The front door: one client connection on the service, one tunnel stream per request.

For each request the client sends, ``FrontDoor`` parses the head, routes it by Host to a web
app, opens a stream to a connector of the app's group, writes the translated head and relays
the body (decoding chunked framing and re-encoding it, so nothing but the body crosses
unchecked). The connector dials the back end and splices bytes, nothing more. The response
comes back on the same stream; ``ResponseSide`` parses its head, translates it, and relays the
body to the client with framing of the front door's choosing, so the client connection stays
alive across requests while every back-end connection carries exactly one.

Backpressure: while a request body flows, the stream is the client socket's consumer (a full
stream pauses reading from the client); while a response flows, the client socket is the
stream's consumer (a slow client stops the stream's window credit). Between the two the client
socket is not read at all, so a pipelining client cannot make us buffer.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
from typing import Any, Callable

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import logs
from gateway.errors import GatewayError
from gateway.oplogs import session as sessionlog
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.stream import StreamReset
from gateway.tunnel.splice import tune_socket

from . import auth, links, routing, rules
from . import metrics as request_metrics
from .streampool import StreamPool, usable
from .rules import LAST_CHUNK, ChunkDecoder, HTTPError, Origin, chunk

log = Logger(namespace="gateway_http")

NOT_FOUND = "There is no application at this address."
UNREACHABLE = "The application cannot be reached right now. Try again later."
# A request a draining connector refused unforwarded is sent again through another connector,
# if the front door still holds all of it: its head and up to this much of its body...
REPLAY_LIMIT = 64 * 1024
# ...and at most this many times in all (a group whose every connector drains at once).
MAX_ATTEMPTS = 3
BAD_ANSWER = "The application did not send a complete answer."


def translate_host(app: Any) -> bool:
    """``options.translate_host`` (default true): send the internal host as Host to the back end."""
    return app.options.get("translate_host", True) is not False


_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)


def new_request_id() -> str:
    """16 hex digits unique in this process and very likely across processes (random prefix):
    a counter rather than uuid4, which costs a getrandom() call per request."""
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFFFFFF:08x}"


@implementer(IPushProducer)
class _ClientReader:
    """The client socket as the producer of a request body, seen by the stream."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door

    def pauseProducing(self) -> None:
        self.door._hold("tunnel")
        self.door._request_body_held()

    def resumeProducing(self) -> None:
        self.door._release("tunnel")
        self.door._request_body_flows()

    def stopProducing(self) -> None:
        self.door.transport.abortConnection()


@implementer(IPushProducer)
class _ResponseProducer:
    """The response's stream as the client socket's producer, timing how long the client holds it.

    The socket pauses us when its buffer is full; a client that then takes nothing for
    ``Timeouts.send`` (a slow-read attack, or a peer gone without a word) would hold a stream, a
    window and a back-end connection for good, so the front door cuts it off.
    """

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.stream: Any = None

    def pauseProducing(self) -> None:
        self.stream.pauseProducing()
        self.door._arm_send()

    def resumeProducing(self) -> None:
        self.door._cancel_send_timer()
        self.stream.resumeProducing()

    def stopProducing(self) -> None:
        self.stream.stopProducing()


def acked_bytes(transport: Any) -> int | None:
    """How many bytes of this connection the peer's TCP has acknowledged (Linux TCP_INFO
    tcpi_bytes_acked), under a TLS wrapper too; None where the transport has no such socket.

    Once the client's receive buffer is full, its TCP acknowledges only what the client reads,
    so this counter moving is the client taking bytes, whatever Twisted, TLS or the kernel
    hold in between.
    """
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    try:
        info = transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (AttributeError, OSError, TypeError):
        return None
    if not isinstance(info, bytes) or len(info) < _BYTES_ACKED + 8:
        return None
    return int.from_bytes(info[_BYTES_ACKED:_BYTES_ACKED + 8], sys.byteorder)


# struct tcp_info (linux/tcp.h): __u64 tcpi_bytes_acked sits at byte 120 since Linux 4.1
_BYTES_ACKED = 120
_TCP_INFO_SIZE = 256


@implementer(IHalfCloseableProtocol)
class ResponseSide(Protocol):
    """The protocol on a request's stream: everything the back end answers."""

    def __init__(self, door: FrontDoor, exchange: Exchange) -> None:
        self.door: FrontDoor | None = door
        self.exchange: Exchange | None = exchange
        self.pool: StreamPool | None = None

    def park(self, pool: StreamPool) -> None:
        """Between two requests in ``pool`` (balance = "request"): no client connection owns the stream."""
        self.door, self.exchange, self.pool = None, None, pool

    def _parked_event(self, why: str) -> None:
        self.pool.discard(self.transport)
        if why and not self.transport.closed:
            log.warn("an idle stream to connector {connector} {why}; closed",
                     connector=getattr(getattr(self.transport, "log_info", None), "connector_id", "?"), why=why)
            self.transport.reset(ResetCode.CANCELLED, f"the front door expected no bytes on an idle stream: {why}")

    def dataReceived(self, data: bytes) -> None:
        if self.door is None:
            self._parked_event("sent bytes before any request")
            return
        # Runs inside the tunnel's dataReceived: an exception here must cost one request only.
        try:
            self.door._response_data(self.exchange, data)
        except HTTPError as e:
            self.door._response_broken(self.exchange, e.message)
        except links.TranslationError as e:
            self.door._response_broken(self.exchange, f"link translation failed: {e}")
        except Exception:
            log.failure("request {request_id}: the http plugin failed on a response",
                        request_id=self.exchange.request_id)
            self.door._response_broken(self.exchange, "internal error in the http plugin")

    def readConnectionLost(self) -> None:
        # The connector sent all it will (FIN): the response ended, or an upgraded back end half-closed.
        if self.door is None:
            self._parked_event("")
            self.transport.loseConnection()
            return
        try:
            self.door._response_fin(self.exchange)
        except Exception:
            log.failure("request {request_id}: the http plugin failed ending a response",
                        request_id=self.exchange.request_id)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        if self.door is None:
            self._parked_event("")
            return
        try:
            self.door._response_lost(self.exchange, reason)
        except Exception:
            log.failure("request {request_id}: the http plugin failed ending a response",
                        request_id=self.exchange.request_id)


class Exchange:
    """One request and its response."""

    def __init__(self, request_id: str, request: rules.Request, app: Any, external: Origin, internal: Origin,
                 body_length: int | None, keep_alive: bool) -> None:
        self.request_id = request_id
        self.request = request
        self.app = app
        self.external = external
        self.internal = internal
        self.stream: Any = None
        self.extra: dict[str, Any] = {}   # what the stream was opened with (the user, the client)
        self.body_length = body_length
        # The request as written to its stream, until the response starts (None once it is larger
        # than REPLAY_LIMIT): what is sent again should a draining connector refuse it unforwarded.
        self.replay: list[bytes] | None = []
        self.replay_body = 0
        self.attempts = 1
        self.identity: auth.Identity | None = None
        self.added: rules.Headers = ()    # the gate's headers for the back end (the signed assertion)
        self.stream_identity: dict | None = None
        self.upgrade = False
        # request body: bytes left (int) or a chunk decoder
        self.body_left = body_length if body_length is not None else 0
        self.body_decoder = ChunkDecoder(400) if body_length is None else None
        self.request_done = False
        self.keep_alive = keep_alive
        # response
        self.response_state = "head"    # head, body, done
        self.response_buf = b""
        self.response: rules.Response | None = None
        self.response_left = 0          # for a length-framed body
        self.response_framing = 0       # n >= 0 (length), None (chunked), -1 (until close)
        self.response_decoder: ChunkDecoder | None = None
        self.chunked_to_client = False
        self.translator: links.LinkTranslator | None = None
        self.head_out = b""             # the client's response head, until body bytes go with it
        self.bytes_out = 0


class Deadline:
    """A timer a connection moves as its wait changes (the next request head, the back end, a
    request body, the client taking bytes).

    Every request moves the head/back-end wait twice; moving a pending DelayedCall later only
    sets a number, where cancelling it and calling callLater anew cost an object and heap work
    each time. A cleared deadline stays pending and finds nothing to do when it comes, unless
    set again first; stop() cancels it for good when the connection is gone.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.kind = ""                      # what the deadline is for now; "" when cleared
        self._call: Any = None
        self._action: tuple[Callable[..., None], tuple] | None = None

    def set(self, kind: str, delay: float, function: Callable[..., None], *args: Any) -> None:
        self.kind = kind
        self._action = (function, args)
        if self._call is not None and self._call.active():
            self._call.reset(delay)
        else:
            self._call = self.reactor.callLater(delay, self._due)

    def clear(self, kind: str | None = None) -> None:
        """Nothing to do at the deadline (if it is for ``kind``, when given)."""
        if kind is None or self.kind == kind:
            self.kind = ""
            self._action = None

    def stop(self) -> None:
        """The connection is gone: cancel for real."""
        self.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _due(self) -> None:
        self._call = None
        action, self._action, self.kind = self._action, None, ""
        if action is not None:
            action[0](*action[1])


@frozen
class Timeouts:
    """Slow-client limits of the front door (per app back-end timeouts are app options)."""

    header: float = 30.0   # from the first byte of a request head to its end, else 408
    idle: float = 60.0     # a connection with no request at all (new, or kept alive), else closed
    body: float = 60.0     # a request body with no byte from the client for this long (while we
                           # are not the ones holding it back), else 408
    send: float = 60.0     # a response the client takes no byte of for this long while its socket
                           # buffer is full (slow read), else the connection is closed


# options.backend_timeout: Entra application proxy's two settings, or seconds.
BACKEND_TIMEOUTS = {"default": 85.0, "long": 180.0}


def backend_timeout(app: Any) -> float:
    """How long the back end may be silent once the request has gone: until the response head
    arrives, and between pieces of the body; after that the client gets 504 (or, mid-body, a
    broken connection)."""
    value = app.options.get("backend_timeout", "default") if app is not None else "default"
    return BACKEND_TIMEOUTS[value] if isinstance(value, str) else float(value)


def balance_per_request(app: Any) -> bool:
    """options.balance = "request": each request of a client connection may go to another connector."""
    return app.options.get("balance") == "request"


def translate_links(app: Any) -> bool:
    """``options.translate_links``: internal URLs in HTML, CSS and JavaScript bodies become external."""
    return app.options.get("translate_links", False) is True


def request_headers(app: Any) -> list[tuple[bytes, bytes]]:
    """``options.request_headers``: headers every request to the back end carries (they replace a
    client header of the same name)."""
    table = app.options.get("request_headers") or {}
    return [(str(k).encode("latin-1"), str(v).encode("latin-1")) for k, v in table.items()]


DEFAULT_TIMEOUTS = Timeouts()

# CONNECT would make a back end that is a forward proxy an open relay into the private network;
# TRACE echoes the request, credentials included: both are answered 405 (as nginx does) unless
# an app opts in. The Allow header of that answer lists the methods a web app usually serves.
OPT_IN_METHODS = {b"CONNECT": "allow_connect", b"TRACE": "allow_trace"}
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def refused_method(method: bytes, app: Any) -> str:
    """Why the front door answers ``method`` for ``app`` with 405 itself, or "" to forward it."""
    option = OPT_IN_METHODS.get(method)
    if option is None or app.options.get(option, False) is True:
        return ""
    return f"The {method.decode()} method is not allowed for this application."


def upgrade_protocols(app: Any) -> frozenset[bytes]:
    """``options.upgrade_protocols`` (default ["websocket"]): the Upgrade protocols passed on to
    the back end; the front door drops any other (h2c, say) and forwards a plain request."""
    names = app.options.get("upgrade_protocols")
    if names is None:
        return rules.WEBSOCKET_ONLY
    return frozenset(str(n).lower().encode("latin-1") for n in names)


@implementer(IHalfCloseableProtocol)
class FrontDoor(Protocol):
    """One client connection to the HTTP front door."""

    def __init__(self, router: Callable[[str, bytes], Any], open_stream: Callable[[Any, dict], Any],
                 scheme: str = "http", reactor: Any = None, timeouts: Timeouts | None = None,
                 gate: Any = None, link_map: links.LinkMap | None = None,
                 choose_connector: Callable[[Any], str] | None = None, pool: StreamPool | None = None) -> None:
        self.reactor = reactor
        # balance = "request": the node's choice of connector per request, and the idle streams to take from
        self.choose_connector = choose_connector
        self.pool = pool
        self.link_map = link_map
        self.gate = gate or auth.PassthroughGate()
        self.timeouts = timeouts or Timeouts()
        self._deadline = Deadline(reactor)   # the request head's (idle, header) or the back end's
        self.router = router
        self.open_stream = open_stream
        self.scheme = scheme
        self.buf = b""
        self.state = "head"             # head, opening, body, response, closed
        self.exchange: Exchange | None = None
        self._holds: set[str] = set()
        self._paused = False
        self._reader = _ClientReader(self)
        self._client = ""
        self._read_closed = False
        self._streaming = False       # a request's stream is registered as the client socket's producer
        self._body_deadline = Deadline(reactor)   # the next piece of a request body from the client
        self._writer = _ResponseProducer(self)
        self._send_deadline = Deadline(reactor)   # the client taking response bytes again
        self._idle: tuple[Any, Any, dict | None] | None = None   # (stream, app, identity) kept for the next request
        self._request_started = 0.0   # request_metrics' clock when this request's head was read

    # -- the client socket -------------------------------------------------------------

    def connectionMade(self) -> None:
        tune_socket(self.transport)
        peer = self.transport.getPeer()
        self._client_host = getattr(peer, "host", "")
        self._client = f"{peer.host}:{peer.port}" if hasattr(peer, "port") else str(peer)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self.state == "upgraded":
            self.exchange.stream.write(data)
            return
        self.buf += data
        if self._holds:
            self._pause()
        if self.state == "body":
            self._arm_body()
        self._advance()

    def readConnectionLost(self) -> None:
        # The client sent all it will; answer what is in flight, then close.
        self._read_closed = True
        if self.state == "upgraded":
            self.exchange.stream.loseWriteConnection()
            return
        if self.exchange is not None:
            self.exchange.keep_alive = False
            if self.state == "body":
                self._fail(400, "The request body was cut short.")
        elif self.state == "head":
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.state = "closed"
        self._deadline.stop()
        self._body_deadline.stop()
        self._send_deadline.stop()
        idle, self._idle = self._idle, None
        if idle is not None and not idle[0].closed:
            idle[0].loseConnection()
        ex = self.exchange
        if ex is not None and ex.stream is not None and not ex.stream.closed and ex.response_state != "done":
            ex.stream.reset(ResetCode.CANCELLED, "the HTTP client went away")

    def _arm(self) -> None:
        """Time the wait for a request head: ``idle`` while nothing came, ``header`` once bytes did."""
        kind = "header" if self.buf else "idle"
        if self.reactor is None or self.state != "head" or self._deadline.kind == kind:
            return
        delay = self.timeouts.header if kind == "header" else self.timeouts.idle
        self._deadline.set(kind, delay, self._timed_out)

    def _disarm(self) -> None:
        self._deadline.clear("header")
        self._deadline.clear("idle")

    def _arm_body(self) -> None:
        """(Re)start the wait for the next piece of a request body from the client."""
        if self.reactor is not None:
            self._body_deadline.set("body", self.timeouts.body, self._body_timed_out)

    def _cancel_body_timer(self) -> None:
        self._body_deadline.clear()

    def _body_timed_out(self) -> None:
        if self.state != "body":
            return
        if self._holds:
            self._arm_body()   # we paused the client ourselves (the tunnel is full): not its fault
            return
        self._fail(408, "The request body took too long to arrive.")

    def _arm_backend(self, ex: Exchange) -> None:
        """(Re)start the wait for the back end: the response head, or the next piece of its body."""
        if self.reactor is None or ex.response_state == "done" or ex.response_state == "upgraded":
            return
        self._deadline.set("backend", backend_timeout(ex.app), self._backend_timed_out, ex)

    def _request_body_held(self) -> None:
        """The stream takes no more of the request body: a back end that stops reading an upload
        is as stuck as one that stops answering, so options.backend_timeout runs meanwhile."""
        ex = self.exchange
        if ex is not None and not ex.request_done and ex.response_state == "head":
            self._arm_backend(ex)

    def _request_body_flows(self) -> None:
        ex = self.exchange
        if ex is not None and not ex.request_done and ex.response_state == "head":
            self._cancel_backend_timer()

    def _cancel_backend_timer(self) -> None:
        self._deadline.clear("backend")

    def _backend_timed_out(self, ex: Exchange) -> None:
        if self.state == "closed" or self.exchange is not ex or ex.response_state in ("done", "upgraded"):
            return
        if not self._streaming_paused(ex):
            what = "sent nothing" if ex.request_done else "took none of the request body"
            log.warn("request {request_id} from {client} for app {app}: the back end {what} for {seconds:.0f} s "
                     "(options.backend_timeout): 504", request_id=ex.request_id, client=self._client,
                     app=ex.app.name, what=what, seconds=backend_timeout(ex.app))
            self._fail(504, "The application took too long to answer.", ResetCode.TIMEOUT,
                       "the front door gave up waiting for the back end")
        else:
            self._arm_backend(ex)

    def _arm_send(self) -> None:
        if self.reactor is None or self.state == "closed" or self._send_deadline.kind:
            return
        self._send_deadline.set("send", self.timeouts.send, self._send_timed_out, acked_bytes(self.transport))

    def _cancel_send_timer(self) -> None:
        self._send_deadline.clear()

    def _send_timed_out(self, acked_then: int | None) -> None:
        if self.state == "closed" or not self._streaming:
            return
        acked = acked_bytes(self.transport)
        if acked is not None and acked_then is not None and acked > acked_then:
            self._arm_send()   # slow, but it takes bytes: as nginx's send_timeout, only a stall counts
            return
        ex = self.exchange
        request_id = ex.request_id if ex is not None else "-"
        log.info("request {request_id} from {client}: the client took no response bytes for {seconds:.0f} s "
                 "([http] send_timeout); connection closed", request_id=request_id, client=self._client,
                 seconds=self.timeouts.send)
        self.state = "closed"
        if ex is not None and ex.stream is not None and not ex.stream.closed and ex.response_state != "done":
            ex.stream.reset(ResetCode.CANCELLED, f"the HTTP client took no response bytes for {self.timeouts.send:g} s")
        self.transport.abortConnection()

    def _streaming_paused(self, ex: Exchange) -> bool:
        """The response is held back by a slow client, not by the back end."""
        return ex.response_state == "body" and bool(getattr(ex.stream, "_reading_paused", False))

    def _timed_out(self) -> None:
        if self.state != "head":
            return
        if self.buf:
            self._fail(408, "The request took too long to arrive.")
        else:
            self.state = "closed"
            self.transport.loseConnection()

    def _take_idle(self, app: Any, identity: dict | None) -> Any:
        """The stream the previous request of this connection used, if the next may use it too:
        the same app, the same signed-in user, and its tunnel still taking new work. Any other
        kept stream is closed. One stream per client connection, not per request, saves opening
        and closing one (two round trips' worth of frames) for every request."""
        idle, self._idle = self._idle, None
        if idle is None:
            return None
        stream, idle_app, idle_identity = idle
        if usable(stream) and idle_app is app and idle_identity == identity:
            return stream
        if not stream.closed:
            stream.loseConnection()
        return None

    def _drop_idle(self, stream: Any) -> None:
        if self._idle is not None and self._idle[0] is stream:
            self._idle = None

    def _unregister(self) -> None:
        """The response is over: the stream stops being the client socket's producer."""
        if self._streaming:
            self._streaming = False
            self._cancel_send_timer()
            self.transport.unregisterProducer()

    # Why the client socket must not be read now. "tunnel" (the stream is full) pauses it at
    # once; "stream" (opening) and "response" (waiting for the answer) only keep further requests
    # from being parsed, so the socket is paused only should bytes arrive meanwhile (a client
    # that pipelines): pausing and resuming on every request cost two epoll_ctl calls each.
    EAGER_HOLDS = frozenset({"tunnel"})

    def _hold(self, why: str) -> None:
        self._holds.add(why)
        if why in self.EAGER_HOLDS:
            self._pause()

    def _release(self, why: str) -> None:
        if why not in self._holds:
            return
        self._holds.discard(why)
        if not self._holds:
            self._resume()

    def _pause(self) -> None:
        if not self._paused and self.state != "closed":
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self._paused and self.state != "closed":
            self._paused = False
            self.transport.resumeProducing()

    # -- requests ----------------------------------------------------------------------

    def _advance(self) -> None:
        """Parse and relay what the client sent, as far as the current state allows."""
        try:
            while self.state in ("head", "body"):
                if self.state == "head":
                    if not self._read_head():
                        return
                else:
                    self._relay_body()
                    if self.state == "body":
                        if self._read_closed:
                            raise HTTPError(400, "The request body was cut short.")
                        return
        except HTTPError as e:
            self._fail(e.status, e.message, headers=e.headers)
        except Exception:
            log.failure("the http plugin failed on a request from {client}", client=self._client)
            self._fail(502, UNREACHABLE)

    def _read_head(self) -> bool:
        self._request_id = None
        self.buf = self.buf.lstrip(b"\r\n")  # RFC 9112 2.2: ignore empty lines before a request
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            line_end = self.buf.find(b"\r\n")
            if (line_end < 0 and len(self.buf) > rules.MAX_REQUEST_LINE) or line_end > rules.MAX_REQUEST_LINE:
                raise HTTPError(414, "The request line is too long.")
            if len(self.buf) > rules.MAX_HEAD:
                raise HTTPError(431, "The request header is too large.")
            if rules.bare_lf(self.buf):
                raise HTTPError(400, "The request has a line ending in LF alone: end each line with CR LF.")
            self._arm()
            return False
        if end > rules.MAX_HEAD:
            raise HTTPError(431, "The request header is too large.")
        head, self.buf = self.buf[:end], self.buf[end + 4:]
        self._disarm()
        self._start(head)
        return True

    def _start(self, head: bytes) -> None:
        if request_metrics.RECORDER is not None:
            self._request_started = request_metrics.RECORDER.clock()
        request_id = new_request_id()
        self._request_id = request_id
        request = rules.parse_request_head(head)
        authority, target = routing.request_target(request.method, request.target)
        host = authority if authority is not None else rules.request_host(request)
        asked = routing.route_key(host, self.scheme)
        if asked is None:
            if host:
                raise HTTPError(400, "The Host header (or the host of the request URL) is not a valid host name "
                                     "or address with an optional port.")
            asked = ("", rules.DEFAULT_PORTS[self.scheme])   # HTTP/1.0 without Host: for a listener's own app
        if target is not request.target:   # the back end gets the path routing decided on
            request = rules.Request(request.method, target, request.version, request.headers)
        app = self.router(host, target)
        if app is None:
            log.info("request {request_id} from {client}: no app at host {host!r}: 404",
                     request_id=request_id, client=self._client, host=host)
            raise HTTPError(404, NOT_FOUND)
        if isinstance(app, auth.Respond):
            # the router answers itself, e.g. the plain listener redirecting to https
            self.exchange = Exchange(request_id, request, None, None, None, 0, rules.wants_keep_alive(request))
            self._answer(self.exchange, app, has_body=rules.request_body_length(request) != 0)
            return
        body_length = rules.request_body_length(request)
        refused = refused_method(request.method, app)
        if refused:
            raise HTTPError(405, refused, [(b"Allow", ALLOWED_METHODS)])
        if app.external_url:
            external = Origin.from_url(app.external_url)
            if external.host.startswith("*."):
                # a wildcard app: its external origin is the host the client asked for
                external = Origin(external.scheme, asked[0], external.port, external.path)
        else:
            external = Origin(self.scheme, *asked)
        internal = (Origin.from_url(app.internal_url) if app.internal_url
                    else Origin("http", app.host.lower(), app.port))
        ex = Exchange(request_id, request, app, external, internal, body_length, rules.wants_keep_alive(request))
        if self._read_closed:
            ex.keep_alive = False
        self.exchange = ex
        self.state = "opening"
        self._hold("stream")
        decision = self.gate.check(request, app, external, self._client_host, request_id=request_id)
        if isinstance(decision, Deferred):   # the gate had to ask the provider, say
            decision.addCallbacks(self._checked, self._check_failed, callbackArgs=(ex, body_length),
                                  errbackArgs=(ex,))
        else:                                # most requests: decided at once, no Deferred round trip
            self._checked(decision, ex, body_length)

    def _checked(self, decision: Any, ex: Exchange, body_length: int | None) -> None:
        """Pre-authentication said: forward (as whom) or answer here (sign in, forbidden...)."""
        if self.state == "closed" or self.exchange is not ex:
            return
        if isinstance(decision, auth.Respond):
            self._answer(ex, decision, has_body=body_length != 0)
            return
        extra: dict[str, Any] = {"client": self._client, "request_id": ex.request_id}
        if decision.headers is not None:
            ex.request = rules.Request(ex.request.method, ex.request.target, ex.request.version, decision.headers)
        ex.added = decision.added
        if decision.identity is not None:
            ex.identity = decision.identity
            extra["user"] = decision.identity.subject
            extra["identity"] = decision.identity.to_metadata()
        ex.extra = extra
        if self.pool is not None and balance_per_request(ex.app):
            self._route_request(ex, extra, body_length)
            return
        kept = self._take_idle(ex.app, extra.get("identity"))
        if kept is not None:
            self._opened(kept, ex, body_length)
            return
        d = self.open_stream(ex.app, extra)
        d.addCallbacks(self._opened, self._open_failed, callbackArgs=(ex, body_length),
                       errbackArgs=(ex,))

    def _route_request(self, ex: Exchange, extra: dict[str, Any], body_length: int | None) -> None:
        """balance = "request": the connector the node chooses now, an idle stream of it if the
        pool has one, else a new stream there (or wherever the node can, if it has none)."""
        try:
            connector = self.choose_connector(ex.app)
        except GatewayError:   # no connector now: open_stream waits for one or says why
            d = self.open_stream(ex.app, extra)
        else:
            kept = self.pool.take(ex.app, extra.get("identity"), connector)
            if kept is not None:
                self._opened(kept, ex, body_length)
                return
            d = self.open_stream(ex.app, extra, connector=connector)
        d.addCallbacks(self._opened, self._open_failed, callbackArgs=(ex, body_length),
                       errbackArgs=(ex,))

    def _check_failed(self, failure: Failure, ex: Exchange) -> None:
        log.failure("request {request_id} from {client}: pre-authentication failed", failure,
                    request_id=ex.request_id, client=self._client)
        if self.state != "closed" and self.exchange is ex:
            self._fail(502, "Signing in is not possible right now. Try again later.")

    def _answer(self, ex: Exchange, answer: auth.Respond, has_body: bool) -> None:
        """Send a response of the front door's own; a request body we did not read ends the connection."""
        keep_alive = ex.keep_alive and not has_body and not self._read_closed
        log.info("request {request_id} from {client} for app {app}: {status} from the front door",
                 request_id=ex.request_id, client=self._client, app=ex.app.name if ex.app else "-",
                 status=answer.status)
        self.transport.write(rules.own_response(answer.status, answer.headers, answer.body, keep_alive,
                                                ex.request.method == b"HEAD"))
        self._count_request(ex.app, answer.status)
        ex.keep_alive = keep_alive
        ex.request_done = True
        ex.response_state = "done"
        self._release("stream")
        self._hold("response")
        self.state = "response"
        self._exchange_over(ex)

    def _opened(self, stream: Any, ex: Exchange, body_length: int | None) -> None:
        if self.state == "closed" or self.exchange is not ex:
            stream.loseConnection()
            return
        ex.stream = stream
        ex.stream_identity = ex.identity.to_metadata() if ex.identity is not None else None
        try:
            if ex.attempts > 1:   # sent again (a draining connector refused it): the same bytes
                self._wire(stream, ex)
                stream.writeSequence(ex.replay)
                self._carry_on(ex)
                return
            if translate_links(ex.app) and self.link_map is not None and not self.link_map.empty:
                # ask for a coding we can undo, so the body can be translated
                accepted = b", ".join(rules.get(ex.request.headers, b"accept-encoding")) or None
                headers = [(k, v) for k, v in ex.request.headers if k.lower() != b"accept-encoding"]
                headers.append((b"Accept-Encoding", links.accept_encoding_for_translation(accepted)))
                ex.request = rules.Request(ex.request.method, ex.request.target, ex.request.version, headers)
            # The app's set only matters when the client asks to upgrade; an empty set (the app
            # allows none) must reach backend_request_head as it is, not as the default.
            upgrades = upgrade_protocols(ex.app) if b"upgrade" in ex.request.index else rules.WEBSOCKET_ONLY
            head = rules.backend_request_head(ex.request, body_length, ex.external, ex.internal,
                                              self._client_host, translate_host=translate_host(ex.app),
                                              extra_headers=[*request_headers(ex.app), *ex.added, (
                                                  b"X-Gateway-Request-Id", ex.request_id.encode())],
                                              upgrades=upgrades)
            ex.upgrade = b"upgrade" in ex.request.index and rules.upgrade_protocols(ex.request, upgrades) is not None
            self._wire(stream, ex)
            self._send(ex, head)
        except Exception:
            log.failure("request {request_id}: the http plugin failed sending a request", request_id=ex.request_id)
            self._fail(502, UNREACHABLE)
            return
        self._carry_on(ex)

    def _wire(self, stream: Any, ex: Exchange) -> None:
        """``stream`` carries ``ex``: its answer comes to us, and each side is the other's producer."""
        if isinstance(stream.protocol, ResponseSide):
            # a kept stream: its next exchange, maybe for another client connection (from the pool)
            stream.protocol.door, stream.protocol.exchange = self, ex
        else:
            stream.attach(ResponseSide(self, ex))
        self._writer.stream = stream
        self.transport.registerProducer(self._writer, True)
        self._streaming = True
        stream.registerProducer(self._reader, True)

    def _carry_on(self, ex: Exchange) -> None:
        """The head is on the stream: relay the body (or, for a complete request sent again, wait for the answer)."""
        if ex.request_done:
            self._release("stream")
            self._request_sent(ex)
            return
        self.state = "body"
        self._release("stream")
        if ex.body_decoder is not None or ex.body_left:
            self._arm_body()
        self._advance()

    def _send(self, ex: Exchange, data: bytes) -> None:
        """Request bytes to the stream, kept for a resend while the body is small enough."""
        ex.stream.write(data)
        replay = ex.replay
        if replay is not None:
            if replay:   # the head is always kept; the body up to REPLAY_LIMIT
                ex.replay_body += len(data)
                if ex.replay_body > REPLAY_LIMIT:
                    ex.replay = None
                    return
            replay.append(data)

    def _unforwarded(self, ex: Exchange, reason: Failure | None) -> bool:
        """The connector reset the stream with GOING_AWAY before any answer: it drains and
        promises that it forwarded nothing of this request (docs/protocol.md), so the request
        may go to another connector, whatever its method, if the front door still has all of it."""
        return (reason is not None and reason.check(StreamReset) is not None
                and reason.value.code == ResetCode.GOING_AWAY and ex.response_state == "head"
                and not ex.response_buf and ex.replay is not None and ex.attempts < MAX_ATTEMPTS)

    def _send_elsewhere(self, ex: Exchange) -> None:
        """Open a new stream for ``ex``; the service routes no new stream to a draining tunnel."""
        info = getattr(ex.stream, "log_info", None)
        log.info("request {request_id} from {client} for app {app}: connector {connector} is draining and did not"
                 " forward it; sending it through another connector", request_id=ex.request_id,
                 client=self._client, app=ex.app.name, connector=info.connector_id if info else "?")
        ex.attempts += 1
        ex.stream = None
        self._unregister()
        self._cancel_backend_timer()
        self._cancel_body_timer()
        self._release("tunnel")
        self.state = "opening"
        self._hold("stream")
        d = self.open_stream(ex.app, ex.extra)
        d.addCallbacks(self._opened, self._open_failed, callbackArgs=(ex, ex.body_length), errbackArgs=(ex,))

    def _open_failed(self, failure: Failure, ex: Exchange) -> None:
        log.warn("request {request_id} from {client} for app {app}: 502, no stream: {reason}",
                 request_id=ex.request_id, client=self._client, app=ex.app.name, reason=failure.getErrorMessage())
        if self.state != "closed" and self.exchange is ex:
            self._fail(502, UNREACHABLE)

    def _relay_body(self) -> None:
        ex = self.exchange
        if ex.body_decoder is not None:
            pieces, rest = ex.body_decoder.feed(self.buf)
            self.buf = rest
            if pieces:
                self._send(ex, b"".join([chunk(p) for p in pieces]))
            if ex.body_decoder.done:
                self._send(ex, LAST_CHUNK)
                self._request_sent(ex)
        else:
            n = min(ex.body_left, len(self.buf))
            if n:
                self._send(ex, self.buf[:n])
                self.buf = self.buf[n:]
                ex.body_left -= n
            if ex.body_left == 0:
                self._request_sent(ex)

    def _request_sent(self, ex: Exchange) -> None:
        ex.request_done = True
        self._cancel_body_timer()
        self._arm_backend(ex)
        ex.stream.unregisterProducer()
        self.state = "response"
        self._hold("response")
        self._release("tunnel")
        if ex.response_state == "done":
            self._exchange_over(ex)

    # -- responses ---------------------------------------------------------------------

    def _response_data(self, ex: Exchange, data: bytes) -> None:
        if ex.response_state == "done" or self.state == "closed":
            return
        if ex.response_state == "upgraded":
            self.transport.write(data)
            return
        ex.replay = None   # the connector forwarded the request: it is never sent again
        if ex.request_done:
            self._arm_backend(ex)
        if ex.response_state == "head":
            ex.response_buf += data
            while ex.response_state == "head":
                end = ex.response_buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(ex.response_buf) > rules.MAX_HEAD:
                        raise HTTPError(502, "the back end's response header is too large")
                    if rules.bare_lf(ex.response_buf):
                        raise HTTPError(502, "the back end's response head has a line ending in LF alone (not CRLF)")
                    return
                head, ex.response_buf = ex.response_buf[:end], ex.response_buf[end + 4:]
                self._response_head(ex, rules.parse_response_head(head))
            data, ex.response_buf = ex.response_buf, b""
            if ex.response_state == "upgraded":
                if data:
                    self.transport.write(data)
                return
            if not data:
                if ex.response_state == "body" and ex.response_framing == 0:
                    self._response_done(ex)
                return
        self._response_body(ex, data)

    def _response_head(self, ex: Exchange, response: rules.Response) -> None:
        if response.status == 101:
            if not ex.upgrade:
                raise HTTPError(502, "the back end switched protocols though the client did not ask to")
            self._upgrade(ex, response)
            return
        if 100 <= response.status < 200:
            # 100 Continue, 103 Early Hints...: passed on to HTTP/1.1 clients (RFC 9110 15.2),
            # with the same header rules as a final head
            if ex.request.version == b"HTTP/1.1":
                self.transport.write(rules.client_response_head(response, 0, False, True, ex.external, ex.internal))
            return
        framing = rules.response_body_length(response, ex.request.method)
        if framing != 0 and translate_links(ex.app) and self.link_map is not None:
            ex.translator, headers = links.translator_for_response(
                self.link_map, ex.request.method, response.status, response.headers)
            response = rules.Response(response.version, response.status, response.reason, headers)
        if ex.translator is not None:
            # the length changes: chunked to an HTTP/1.1 client, until close to an HTTP/1.0 one
            ex.chunked_to_client = ex.request.version == b"HTTP/1.1"
            if not ex.chunked_to_client:
                ex.keep_alive = False
            if framing is None:
                ex.response_decoder = ChunkDecoder(502)
        elif framing == -1:
            if ex.request.version == b"HTTP/1.1":
                ex.chunked_to_client = True
            else:
                ex.keep_alive = False
        elif framing is None:
            ex.chunked_to_client = ex.request.version == b"HTTP/1.1"
            ex.response_decoder = ChunkDecoder(502)
            if not ex.chunked_to_client:
                ex.keep_alive = False
        ex.response = response
        ex.response_framing = framing
        ex.response_left = framing if framing and framing > 0 else 0
        ex.response_state = "body"
        # sent with the first body bytes: one write, one send(), for most responses
        ex.head_out = rules.client_response_head(response, -1 if ex.translator else framing,
                                                 ex.chunked_to_client, ex.keep_alive, ex.external, ex.internal)

    def _upgrade(self, ex: Exchange, response: rules.Response) -> None:
        """101: from now on the client connection and the stream are spliced, bytes both ways."""
        self._cancel_backend_timer()
        self._cancel_body_timer()
        ex.response = response
        ex.response_state = "upgraded"
        ex.keep_alive = False
        self.transport.write(rules.client_response_head(response, 0, False, False, ex.external, ex.internal))
        self._count_request(ex.app, 101)
        log.info("request {request_id} {target} for app {app}: 101, switched to {protocol}",
                 request_id=ex.request_id, target=ex.request.target.decode("latin-1")[:200], app=ex.app.name,
                 protocol=b", ".join(rules.get(response.headers, b"upgrade")).decode("latin-1")[:60])
        self.state = "upgraded"
        ex.stream.registerProducer(self._reader, True)
        self._holds.clear()
        self._resume()
        rest, self.buf = self.buf, b""
        if rest:
            ex.stream.write(rest)
        if self._read_closed:
            ex.stream.loseWriteConnection()

    def _response_fin(self, ex: Exchange) -> None:
        """The connector half-closed the stream."""
        self._drop_idle(ex.stream)
        if ex.response_state == "upgraded":
            if self.state != "closed":
                loser = getattr(self.transport, "loseWriteConnection", None)
                if loser is not None and not getattr(self.transport, "TLS", False):
                    loser()
                else:
                    self.transport.loseConnection()
            if self._read_closed:
                ex.stream.loseConnection()
            return
        if ex.response_state != "done":
            self._response_lost(ex, None)
        if not ex.stream.closed:
            ex.stream.loseConnection()

    def _response_body(self, ex: Exchange, data: bytes) -> None:
        framing = ex.response_framing
        if framing is None:
            pieces, _ = ex.response_decoder.feed(data)
            self._to_client(ex, pieces)
            if ex.response_decoder.done:
                self._response_done(ex)
        elif framing == -1:
            self._to_client(ex, [data])
        else:
            n = min(ex.response_left, len(data))
            if n:
                self._to_client(ex, [data[:n] if n < len(data) else data])
                ex.response_left -= n
            if ex.response_left == 0:
                self._response_done(ex)

    def _to_client(self, ex: Exchange, pieces: list[bytes]) -> None:
        if ex.translator is not None:
            pieces = [ex.translator.feed(b"".join(pieces))]
        for p in pieces:
            ex.bytes_out += len(p)
        if ex.chunked_to_client:
            pieces = [chunk(p) for p in pieces if p]
        self._write_response(ex, b"".join(pieces))

    def _write_response(self, ex: Exchange, data: bytes) -> None:
        """Response bytes to the client, after the head if that has not gone yet."""
        if ex.head_out:
            data, ex.head_out = ex.head_out + data, b""
        if data:
            self.transport.write(data)

    def _end_body(self, ex: Exchange) -> None:
        """The back end's body is complete: the translator's last bytes, then the last chunk."""
        tail = b""
        if ex.translator is not None:
            tail = ex.translator.finish()
            ex.bytes_out += len(tail)
            if tail and ex.chunked_to_client:
                tail = chunk(tail)
        self._write_response(ex, tail + (LAST_CHUNK if ex.chunked_to_client else b""))

    def _session_record(self, ex: Exchange) -> None:
        """The request's line in the service's session log."""
        info = getattr(ex.stream, "log_info", None)
        sessionlog.http_request(sessionlog.SERVICE, request_id=ex.request_id, method=ex.request.method,
                                target=ex.request.target, status=ex.response.status, app=ex.app.name,
                                user=ex.extra.get("user"), client=self._client,
                                connector_id=info.connector_id if info else None, bytes_down=ex.bytes_out)

    def _response_done(self, ex: Exchange) -> None:
        if ex.response_state == "body":
            self._end_body(ex)
        self._write_response(ex, b"")   # a body-less answer's head
        ex.response_state = "done"
        self._count_request(ex.app, ex.response.status)
        self._cancel_backend_timer()
        if logs.enabled(LogLevel.info):   # the access log line; not even built when it would be dropped
            info = getattr(ex.stream, "log_info", None)
            log.info("request {request_id} {method} {target} for app {app} via connector {connector}: "
                     "{status}, {size} bytes",
                     request_id=ex.request_id, method=ex.request.method.decode("latin-1"),
                     target=ex.request.target.decode("latin-1")[:200], app=ex.app.name,
                     connector=info.connector_id if info else "?", status=ex.response.status, size=ex.bytes_out)
        session_log = sessionlog.current
        if session_log is not None and session_log.on[sessionlog.SERVICE]:
            self._session_record(ex)
        self._unregister()
        if not ex.request_done:
            # The back end answered before the whole request body came: this connection's
            # framing is lost, so it ends after this response.
            ex.keep_alive = False
            ex.stream.unregisterProducer()
            self._release("tunnel")
        # Whatever still comes on this stream is dropped: let it flow so the stream can close
        # (or, kept, so the connector's next answer is not held back).
        ex.stream.resumeProducing()
        reusable = (ex.request_done and ex.response_framing != -1 and not ex.stream.closed
                    and not getattr(ex.stream, "disconnecting", False))
        if reusable and self.pool is not None and balance_per_request(ex.app):
            # Back to the pool for any client connection's next request, this one's included.
            ex.stream.unregisterProducer()
            ex.stream.protocol.park(self.pool)
            if not self.pool.put(ex.stream, ex.app, ex.stream_identity):
                ex.stream.loseConnection()
        elif reusable and ex.keep_alive and not self._read_closed:
            self._idle = (ex.stream, ex.app, ex.stream_identity)
        else:
            ex.stream.loseConnection()
        if ex.request_done or not ex.keep_alive:
            self._exchange_over(ex)

    def _exchange_over(self, ex: Exchange) -> None:
        if self.exchange is not ex or self.state == "closed":
            return
        self.exchange = None
        if not ex.keep_alive or self._read_closed:
            self.state = "closed"
            self.transport.loseConnection()
            return
        self.state = "head"
        self._release("response")
        if self.buf:
            self._advance()
        self._arm()

    def _response_lost(self, ex: Exchange, reason: Failure | None) -> None:
        self._drop_idle(ex.stream)
        if ex.response_state == "upgraded":
            if self.state != "closed":
                self.state = "closed"
                self.transport.loseConnection()
            return
        if ex.response_state == "done" or self.state == "closed" or self.exchange is not ex:
            return
        if self._unforwarded(ex, reason):
            self._send_elsewhere(ex)
            return
        clean = reason is None or reason.check(ConnectionDone)
        if clean and ex.response_state == "body" and ex.response_framing == -1:
            self._response_done(ex)
            return
        why = "the stream closed" if clean else reason.getErrorMessage()
        self._response_broken(ex, f"the response ended early: {why}")

    def _response_broken(self, ex: Exchange, why: str) -> None:
        if self.state == "closed" or self.exchange is not ex:
            return
        log.warn("request {request_id} from {client} for app {app}: {why}",
                 request_id=ex.request_id, client=self._client, app=ex.app.name, why=why)
        if ex.stream is not None and not ex.stream.closed:
            ex.stream.reset(ResetCode.CANCELLED, why[:200])
        if ex.response_state == "head":
            self._fail(502, BAD_ANSWER)
        else:
            # The client already has part of the answer: only a broken connection tells it.
            self.state = "closed"
            self.transport.abortConnection()

    # -- errors ------------------------------------------------------------------------

    def _fail(self, status: int, message: str, code: int = ResetCode.CANCELLED, why: str = "",
              headers: rules.Headers = ()) -> None:
        """Answer with an error page carrying the correlation id, then close."""
        if self.state == "closed":
            return
        ex = self.exchange
        request_id = ex.request_id if ex is not None else getattr(self, "_request_id", None) or new_request_id()
        if status not in (404, 502):
            log.info("request {request_id} from {client}: {status} {message}",
                     request_id=request_id, client=self._client, status=status, message=message)
        self.state = "closed"   # first: resetting the stream must not answer a second time
        if ex is not None and ex.stream is not None and not ex.stream.closed:
            ex.stream.reset(code, why or f"the front door answered {status} itself")
        self._deadline.stop()
        self._cancel_body_timer()
        if ex is not None and ex.response_state != "head":
            self.transport.abortConnection()
            return
        self._unregister()
        self.transport.write(rules.error_page(status, message, request_id, headers))
        self._count_request(ex.app if ex is not None else None, status)
        self.transport.loseConnection()

    def _count_request(self, app: Any, status: int) -> None:
        if request_metrics.RECORDER is not None:
            # 0.0: an answer to a head that never started a request (too large, say): no duration
            request_metrics.RECORDER.observe(app, status, self._request_started)
            self._request_started = 0.0
