"""`gateway access`: the user's tunnel to the service, and the local listeners that use it.

:class:`AccessTunnel` keeps one TLS tunnel with the user certificate (redialled with jittered
backoff), renewing the certificate through the credential cache when a third of its life is
left. Every local connection or UDP flow is one stream ``{"kind": "access", ...}``
(docs/protocol.md, *User tunnels and access streams*); the service ACKs it only once a
connector reached the destination, so the local side is read only after that
(:class:`~gateway.tunnel.splice.SocketSide`), and a refusal closes the local connection
cleanly and is printed once per distinct reason.

- ``gateway access tcp``: :class:`TcpForward`, one stream per accepted connection.
- ``gateway access socks``: :class:`SocksConnection` (CONNECT) and :class:`UdpAssociation`
  (UDP ASSOCIATE: one stream per client address and destination, datagrams framed by
  gateway.tunnel.datagrams, idle flows closed, bounded queues dropping the oldest).
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.access import socks5
from gateway.access.credentials import Credentials
from gateway.connector.node import jittered_backoff
from gateway.connector.register import parse_service
from gateway.errors import EnrolmentError, GatewayError, describe_failure
from gateway.pki.tls import client_options
from gateway.segments import host_port
from gateway.tunnel.datagram_flow import DatagramSender, IdleTimer
from gateway.tunnel.datagrams import DatagramDecoder, DatagramError
from gateway.tunnel.frame import GoAwayCode, ResetCode
from gateway.tunnel.session import TunnelClosed, TunnelSession, TunnelSettings
from gateway.tunnel.splice import QuietFactory, SocketSide, tune_socket
from gateway.tunnel.stream import StreamReset

__all__ = [
    "AccessError", "AccessTunnel", "Reporter", "SocksConnection", "TcpForward", "UdpAssociation",
    "parse_listen", "parse_target", "socks_reply_for",
]

# How long a local connection waits for a tunnel that is down before it is refused.
WAIT_FOR_TUNNEL = 30.0
# How long the service may take to answer a stream (it answers once a connector dialled).
OPEN_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 30.0
# A local connection waiting for a tunnel that is down brings the next redial this close.
HURRY = 1.0
RENEW_CHECK_INTERVAL = 60.0
UDP_IDLE_TIMEOUT = 60.0
MAX_FLOWS = 256                      # UDP flows of one association
# The relay socket reads whole datagrams: Twisted's default (8192) would cut larger ones short.
MAX_UDP_PACKET = 65535


class AccessError(GatewayError):
    """A local listener or target that cannot be used; the message says what to give instead."""


# -- addresses ----------------------------------------------------------------------------------


def parse_listen(text: str, option: str = "--listen") -> tuple[str, int]:
    """A loopback HOST:PORT to listen on; anything else is refused (the listeners have no auth)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise AccessError(f"{option} must be ADDRESS:PORT on this machine (for example 127.0.0.1:1080), got {text!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise AccessError(f"{option} must be a loopback address (127.0.0.1 or [::1]), got {host!r}") from None
    if not address.is_loopback:
        raise AccessError(f"{option} {text} is not a loopback address: these listeners have no authentication, so "
                          "anyone who reached them would use your access; listen on 127.0.0.1 (or [::1])")
    return str(address), int(port)


def parse_target(text: str) -> tuple[str, int]:
    """--to HOST:PORT: a name (resolved on the connector) or an address, IPv6 in brackets."""
    try:
        host, port = parse_service(text)
    except EnrolmentError:
        raise AccessError(f"--to must be HOST:PORT (for example db.corp.example:5432 or [fd00::1]:22), got {text!r}"
                          ) from None
    return host, port


def access_metadata(transport: str, host: str | None, port: int | None, app: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"kind": "access", "transport": transport}
    if host is not None:
        meta["host"], meta["port"] = host, port
    if app:
        meta["app"] = app
    return meta


# -- telling the user why, once -----------------------------------------------------------------


class Reporter:
    """Prints each distinct problem once to the user's terminal (bounded: a flood says it once)."""

    MAX_REMEMBERED = 1024

    def __init__(self, write: Callable[[str], Any]) -> None:
        self.write = write
        self._said: set[str] = set()

    def say(self, message: str) -> None:
        if message in self._said:
            return
        if len(self._said) >= self.MAX_REMEMBERED:
            self._said.clear()
        self._said.add(message)
        self.write(f"gateway access: {message}")

    def refused(self, failure: Failure, what: str) -> None:
        if failure.check(StreamReset):
            self.say(f"{what} refused: {failure.value.reason}")
        else:
            self.say(f"{what} failed: {describe_failure(failure)}")


_SOCKS_REPLIES = {
    ResetCode.NOT_ASSIGNED: socks5.Reply.NOT_ALLOWED,
    ResetCode.NO_SEGMENT: socks5.Reply.NOT_ALLOWED,
    ResetCode.DESTINATION_REFUSED: socks5.Reply.NOT_ALLOWED,
    ResetCode.REVOKED: socks5.Reply.NOT_ALLOWED,
    ResetCode.NO_CONNECTOR: socks5.Reply.NETWORK_UNREACHABLE,
}


def socks_reply_for(failure: Failure) -> socks5.Reply:
    """The SOCKS5 reply code that tells a program the most about why its stream was refused."""
    if not failure.check(StreamReset):
        return socks5.Reply.GENERAL_FAILURE
    code, reason = failure.value.code, failure.value.reason.lower()
    if code == ResetCode.CONNECT_FAILED:
        return socks5.Reply.CONNECTION_REFUSED if "refused" in reason else socks5.Reply.HOST_UNREACHABLE
    return _SOCKS_REPLIES.get(code, socks5.Reply.GENERAL_FAILURE)


# -- the tunnel ---------------------------------------------------------------------------------


class AccessTunnel:
    """One user tunnel kept up with backoff; :meth:`open` opens an access stream on it.

    ``renew(reactor, creds)`` buys a new certificate (gateway.access.login.renew) and ``save``
    keeps the result in the cache; both are parameters so tests can do without a service.

    Its own reconnect loop rather than ClientService: a connection that drops before its TLS
    handshake is done (ClientService's prepareConnection) makes ClientService raise NoTransition
    from connectionLost, a traceback on the user's terminal for every failed attempt.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, creds: Credentials, renew: Callable[[Any, Credentials], Any],
        save: Callable[[Credentials], Any], reporter: Reporter, settings: TunnelSettings | None = None,
        wait_for_tunnel: float = WAIT_FOR_TUNNEL, open_timeout: float = OPEN_TIMEOUT,
        backoff: tuple[float, float] = (1.0, 30.0), now: Callable[[], datetime] | None = None,
    ) -> None:
        self.reactor = reactor
        self.creds = creds
        self.renew = renew
        self.save = save
        self.reporter = reporter
        self.settings = settings or TunnelSettings()
        self.wait_for_tunnel = wait_for_tunnel
        self.open_timeout = open_timeout
        self.now = now or (lambda: datetime.now(UTC))
        self.session: TunnelSession | None = None
        self.last_problem = "not connected yet"
        self.running = False
        self._waiters: list[Deferred] = []
        self._renewing: Deferred | None = None
        self._renew_call: Any = None
        self._retry_call: Any = None
        self._failures = 0
        self._backoff = jittered_backoff(*backoff)

    # -- lifecycle

    def start(self) -> None:
        self.running = True
        self._attempt()
        self._renew_call = self.reactor.callLater(RENEW_CHECK_INTERVAL, self._renew_check)

    def stop(self) -> None:
        self.running = False
        for call in (self._renew_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        for waiter in self._waiters[:]:
            waiter.errback(TunnelClosed("gateway access is stopping"))
        if self.session is not None:
            self.session.close()

    def _attempt(self) -> None:
        self._retry_call = None
        if self.running:
            Deferred.fromCoroutine(self._connect()).addErrback(self._attempt_failed)

    def _attempt_failed(self, failure: Failure) -> None:
        self._failures += 1
        self._retry(self._backoff(self._failures))

    def _retry(self, delay: float) -> None:
        if self.running and self._retry_call is None:
            self._retry_call = self.reactor.callLater(delay, self._attempt)

    async def _connect(self) -> None:
        await self.ensure_fresh()
        creds = self.creds
        host, port = parse_service(creds.tunnel)
        tls = client_options(creds.ca, creds.certificate, creds.key, creds.server_name)
        session = self._build_session()
        endpoint = wrapClientTLS(tls, HostnameEndpoint(self.reactor, host, port, timeout=10))
        try:
            await connectProtocol(endpoint, session)
        except Exception as e:
            self._problem(f"cannot reach the service's tunnel at {creds.tunnel}: {describe_failure(Failure(e))};"
                          " retrying")
            raise
        deadline = self.reactor.callLater(HANDSHAKE_TIMEOUT, self._too_slow, session)
        try:
            await session.owner
        finally:
            if deadline.active():
                deadline.cancel()

    def _too_slow(self, session: TunnelSession) -> None:
        self._problem(f"no TLS handshake with the service's tunnel at {self.creds.tunnel} within "
                      f"{HANDSHAKE_TIMEOUT:g}s; retrying")
        if session.transport is not None:
            session.transport.abortConnection()

    def _build_session(self) -> TunnelSession:
        session = TunnelSession(self.reactor, self.settings, is_client=True, on_stream=None, tunnel_id="access")
        # Ready once TLS is up; a connection lost before that is a failed attempt.
        ready: Deferred = Deferred()
        session.owner = ready
        session.on_handshake = lambda s: ready.called or ready.callback(s)
        session.on_go_away.append(self._go_away)
        session.on_lost.append(lambda s, reason: self._lost(s, reason, ready))
        ready.addCallback(self._up)
        return session

    def _up(self, session: TunnelSession) -> TunnelSession:
        if not self.running:
            session.close()
            return session
        self.session = session
        self.log.info("access tunnel to {tunnel} is up", tunnel=self.creds.tunnel)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(session)
        return session

    def _go_away(self, session: TunnelSession, code: int, message: str) -> None:
        if self.session is session:
            # The old tunnel takes no new streams but may carry open ones for a while: dial a new one
            # now, or after a growing delay when the service refused us (a revoked user must not hammer).
            self.session = None
            self.last_problem = f"the service is closing the tunnel: {message}"
            if code == GoAwayCode.NOT_AUTHORIZED:
                self._failures += 1
            self._retry(self._backoff(self._failures))
        if code == GoAwayCode.NOT_AUTHORIZED:
            self._problem(f"the service closed the tunnel: {message}")
        elif code != GoAwayCode.NORMAL:
            self._problem(f"the service closed the tunnel (GO_AWAY {code}): {message}")

    def _lost(self, session: TunnelSession, reason: Failure, ready: Deferred) -> None:
        if self.session is session:
            self.session = None
            self.last_problem = "the tunnel to the service was lost; reconnecting"
            self.log.info("access tunnel to {tunnel} lost; reconnecting", tunnel=self.creds.tunnel)
            self._retry(self._backoff(0))
        if not ready.called:
            why = describe_failure(reason) if reason is not None else "closed"
            if session.go_away_reason is None:
                self._problem(f"the TLS connection to the service's tunnel at {self.creds.tunnel} failed: {why};"
                              " retrying")
            ready.errback(reason if reason is not None else Failure(TunnelClosed(why)))

    def _problem(self, message: str) -> None:
        self.last_problem = message
        self.reporter.say(message)

    # -- the certificate

    async def ensure_fresh(self) -> None:
        """Renew the certificate when less than a third of its life is left; one renewal at a time."""
        if not self.creds.needs_refresh(self.now()):
            return
        renewing = self._renewing
        if renewing is None:
            renewing = self._renewing = Deferred.fromCoroutine(self._renew())
            renewing.addBoth(self._renewed)
        d: Deferred = Deferred()
        renewing.addBoth(lambda result: (d.callback(None), result)[1])
        await d
        if self.creds.expires_at <= self.now():
            raise TunnelClosed(self.last_problem)

    async def _renew(self) -> None:
        try:
            creds = await self.renew(self.reactor, self.creds)
        except GatewayError as e:
            expired = self.creds.expires_at <= self.now()
            self._problem(f"{'not signed in' if expired else 'could not renew the certificate'}: {e}")
            return
        self.save(creds)
        self.creds = creds
        self.log.info("renewed the user certificate, valid until {until}", until=creds.expires_at.isoformat())

    def _renewed(self, result: Any) -> None:
        self._renewing = None

    def _renew_check(self) -> None:
        self._renew_call = self.reactor.callLater(RENEW_CHECK_INTERVAL, self._renew_check)
        Deferred.fromCoroutine(self.ensure_fresh()).addErrback(lambda f: None)

    # -- streams

    def open(self, metadata: dict[str, Any]) -> Deferred:
        """Fires with an accepted Stream; fails with StreamReset (refused) or TunnelClosed (down)."""
        session = self.session
        if session is not None and session.available:
            try:
                return session.open_stream(metadata, timeout=self.open_timeout).addCallback(self._served)
            except TunnelClosed:
                pass
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        self._hurry()
        timer = self.reactor.callLater(self.wait_for_tunnel, self._gave_up, waiter)

        def ready(session: TunnelSession) -> Deferred:
            if timer.active():
                timer.cancel()
            return session.open_stream(metadata, timeout=self.open_timeout).addCallback(self._served)

        return waiter.addCallback(ready)

    def _hurry(self) -> None:
        """Someone is waiting for the tunnel: a redial due later than HURRY seconds from now happens then."""
        call = self._retry_call
        if call is not None and call.active() and call.getTime() - self.reactor.seconds() > HURRY:
            call.reset(HURRY)

    def _served(self, stream: Any) -> Any:
        """A stream the service accepted: the tunnel works, so the next redial starts from the shortest delay."""
        self._failures = 0
        return stream

    def _gave_up(self, waiter: Deferred) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            waiter.errback(TunnelClosed(f"the tunnel to the service is down ({self.last_problem}); "
                                        f"gave up after {self.wait_for_tunnel:g}s"))


# -- access tcp ---------------------------------------------------------------------------------


class ForwardedConnection(SocketSide):
    """A local connection that waits, unread, for its stream; a refusal closes it cleanly."""

    def __init__(self, tunnel: AccessTunnel, metadata: dict[str, Any], what: str) -> None:
        super().__init__()
        self.tunnel = tunnel
        self.metadata = metadata
        self.what = what
        self._gone = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.tunnel.open(self.metadata).addCallbacks(self._opened, self._refused)

    def _opened(self, stream: Any) -> None:
        if self._gone:
            stream.loseConnection()
            return
        self.join(stream)

    def _refused(self, failure: Failure) -> None:
        self.tunnel.reporter.refused(failure, self.what)
        if not self._gone:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self._gone = True
        super().connectionLost(reason)
        report_cut(self.tunnel.reporter, self.stream, self.what)


def report_cut(reporter: Reporter, stream: Any, what: str) -> None:
    """Say why an established stream was cut by the far end (revoked, connector lost, ...)."""
    reason = getattr(stream, "close_reason", None)
    if reason is not None and reason.check(StreamReset) and reason.value.code != ResetCode.CANCELLED:
        reporter.say(f"{what} ended: {reason.value.reason}")


class TcpForward(QuietFactory):
    """``gateway access tcp``: every accepted connection is one stream to ``--to`` (or the app's)."""

    def __init__(self, tunnel: AccessTunnel, app: str, host: str | None, port: int | None) -> None:
        self.tunnel = tunnel
        self.metadata = access_metadata("tcp", host, port, app)
        self.what = f"app {app}" + (f" to {host}:{port}" if host is not None else "")

    def buildProtocol(self, addr: Any) -> ForwardedConnection:
        protocol = ForwardedConnection(self.tunnel, dict(self.metadata), self.what)
        protocol.factory = self
        return protocol


# -- access socks: CONNECT ----------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class SocksConnection(SocketSide):
    """One SOCKS5 client: negotiation by the socks5 state machine, then a spliced stream (CONNECT)
    or a UDP association that lasts as long as this connection (UDP ASSOCIATE)."""

    def __init__(self, tunnel: AccessTunnel, udp_idle_timeout: float = UDP_IDLE_TIMEOUT) -> None:
        super().__init__()
        self.tunnel = tunnel
        self.udp_idle_timeout = udp_idle_timeout
        self.socks = socks5.Socks5Server()
        self.association: UdpAssociation | None = None
        self._gone = False

    def connectionMade(self) -> None:
        tune_socket(self.transport)   # read the negotiation at once; SocketSide pauses only once a stream is due

    def dataReceived(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.write(data)
            return
        if self.association is not None:
            return   # a UDP ASSOCIATE connection carries nothing more
        try:
            step = self.socks.feed(data)
        except socks5.SocksError as e:
            self._fail(e)
            return
        if step.send:
            self.transport.write(step.send)
        if step.request is not None:
            self._decide(step.request)

    def _fail(self, error: socks5.SocksError) -> None:
        self.tunnel.reporter.say(f"a SOCKS client was refused: {error.reason}")
        if error.reply:
            self.transport.write(error.reply)
        self.transport.loseConnection()

    def _decide(self, request: socks5.Request) -> None:
        if request.command == socks5.Command.UDP_ASSOCIATE:
            self._associate(request)
            return
        self.transport.pauseProducing()
        where = f"{request.host}:{request.port}/tcp"
        d = self.tunnel.open(access_metadata("tcp", request.host, request.port))
        d.addCallbacks(self._connected, self._refused, errbackArgs=(where,))

    def _connected(self, stream: Any) -> None:
        if self._gone:
            stream.loseConnection()
            return
        local = self.transport.getHost()
        step = self.socks.reply(socks5.Reply.SUCCEEDED, local.host, local.port)
        self.transport.write(step.send)
        self.join(stream)
        if step.payload:
            stream.write(step.payload)

    def _refused(self, failure: Failure, where: str) -> None:
        self.tunnel.reporter.refused(failure, where)
        if self._gone:
            return
        self.transport.write(self.socks.reply(socks_reply_for(failure)).send)
        self.transport.loseConnection()

    def _associate(self, request: socks5.Request) -> None:
        client_host = self.transport.getPeer().host
        # RFC 1928: the request names where the client will send from; 0 means "not known yet".
        client_port = request.port or None
        self.association = UdpAssociation(self.tunnel, client_host, client_port, self.udp_idle_timeout)
        port = self.tunnel.reactor.listenUDP(0, self.association, interface=self.transport.getHost().host,
                                             maxPacketSize=MAX_UDP_PACKET)
        self.transport.write(self.socks.reply(socks5.Reply.SUCCEEDED, port.getHost().host, port.getHost().port).send)

    def readConnectionLost(self) -> None:
        if self.stream is None:
            self.transport.loseConnection()
        else:
            super().readConnectionLost()

    def connectionLost(self, reason: Failure = None) -> None:
        self._gone = True
        if self.association is not None:
            self.association.close()
        super().connectionLost(reason)
        if self.stream is not None:
            report_cut(self.tunnel.reporter, self.stream, f"{self.stream.metadata['host']}:{self.stream.metadata['port']}")


class SocksFactory(QuietFactory):
    def __init__(self, tunnel: AccessTunnel, udp_idle_timeout: float = UDP_IDLE_TIMEOUT) -> None:
        self.tunnel = tunnel
        self.udp_idle_timeout = udp_idle_timeout

    def buildProtocol(self, addr: Any) -> SocksConnection:
        protocol = SocksConnection(self.tunnel, self.udp_idle_timeout)
        protocol.factory = self
        return protocol


# -- access socks: UDP ASSOCIATE ----------------------------------------------------------------


class UdpFlow(Protocol):
    """One (client address, destination) flow: one stream of length-prefixed datagrams.

    Datagrams go out through a DatagramSender (held in its bounded drop-oldest queue while the
    stream is not open yet or cannot take more); the flow ends after ``idle`` seconds without a
    datagram either way.
    """

    def __init__(self, association: UdpAssociation, key: tuple[Any, ...], host: str, port: int) -> None:
        self.association = association
        self.key = key
        self.host = host
        self.port = port
        self.stream: Any = None
        self.sender = DatagramSender()
        self.decoder = DatagramDecoder()
        self.ended = False
        self.refused_drops = 0   # datagrams to a destination the service refused
        tunnel = association.tunnel
        self.timer = IdleTimer(tunnel.reactor, association.idle, self.end)
        tunnel.open(access_metadata("udp", host, port)).addCallbacks(self._opened, self._refused)

    @property
    def queue(self) -> Any:
        return self.sender.queue

    @property
    def where(self) -> str:
        return f"{host_port(self.host, self.port)}/udp"

    def send(self, datagram: bytes) -> None:
        self.timer.touch()
        if self.ended:
            self.refused_drops += 1
            return
        self.sender.send(datagram)

    def _opened(self, stream: Any) -> None:
        if self.ended:
            stream.loseConnection()
            return
        self.stream = stream
        stream.attach(self)
        self.sender.attach(stream)

    def _refused(self, failure: Failure) -> None:
        self.association.tunnel.reporter.refused(failure, self.where)
        self.ended = True     # datagrams are dropped until the flow idles out; then a new one may try again
        self.sender.close()

    # the stream's protocol: datagrams back to the client
    def dataReceived(self, data: bytes) -> None:
        self.timer.touch()
        try:
            datagrams = self.decoder.feed(data)
        except DatagramError as e:
            self.stream.reset(ResetCode.REFUSED, str(e))
            return
        for datagram in datagrams:
            self.association.deliver(self, datagram)

    def connectionLost(self, reason: Failure = None) -> None:
        if reason is not None and not reason.check(ConnectionDone):
            self.association.tunnel.reporter.refused(reason, self.where)
        self.end()

    def end(self) -> None:
        """Close the stream and forget the flow; what was dropped is logged."""
        self.timer.cancel()
        self.ended = True
        self.sender.close()
        if self.stream is not None and not self.stream.closed:
            self.stream.loseConnection()
        self.association.forget(self)


class UdpAssociation(DatagramProtocol):
    """The relay socket of one UDP ASSOCIATE: datagrams from the client become flows."""

    log = Logger()

    def __init__(self, tunnel: AccessTunnel, client_host: str, client_port: int | None, idle: float) -> None:
        self.tunnel = tunnel
        self.client_host = client_host
        self.client_port = client_port
        self.idle = idle
        self.flows: dict[tuple[Any, ...], UdpFlow] = {}
        self.closed = False

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        host, port = addr[0], addr[1]
        # Only the client that asked for the association may use it (it has no other authentication).
        if host != self.client_host or (self.client_port is not None and port != self.client_port):
            return
        try:
            datagram = socks5.decode_udp(data)
        except socks5.SocksError as e:
            self.tunnel.reporter.say(f"a SOCKS UDP datagram was dropped: {e.reason}")
            return
        key = (host, port, datagram.host, datagram.port)
        flow = self.flows.get(key)
        if flow is None:
            if len(self.flows) >= MAX_FLOWS:
                self.tunnel.reporter.say(f"a SOCKS UDP association has {MAX_FLOWS} flows open; dropping datagrams"
                                         " to new destinations until some idle out")
                return
            flow = self.flows[key] = UdpFlow(self, key, datagram.host, datagram.port)
        flow.send(datagram.data)

    def deliver(self, flow: UdpFlow, datagram: bytes) -> None:
        if self.closed:
            return
        self.transport.write(socks5.encode_udp(flow.host, flow.port, datagram), (flow.key[0], flow.key[1]))

    def forget(self, flow: UdpFlow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        if flow.queue.dropped:
            self.log.info("UDP flow to {where} ended; {dropped} datagrams dropped", where=flow.where,
                          dropped=flow.queue.dropped)

    def close(self) -> None:
        """The SOCKS connection that asked for the association closed: end every flow, stop listening."""
        if self.closed:
            return
        self.closed = True
        for flow in list(self.flows.values()):
            flow.end()
        if self.transport is not None:
            self.transport.stopListening()
