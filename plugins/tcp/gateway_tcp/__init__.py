"""The generic TCP protocol plugin: any TCP app, spliced byte for byte; and UDP flows.

Loaded through the ``gateway`` entry point exactly as a third-party plugin would be. Its
"udp" handler carries the UDP flows of private apps (docs/protocol.md, *UDP flows*).
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.error import ConnectionDone, MessageLengthError
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from gateway.errors import GatewayError
from gateway.hookspecs import hookimpl
from gateway.protocols import IProtocolHandler
from gateway.tunnel.datagram_flow import QUEUE_BYTES, QUEUE_DATAGRAMS, DatagramSender, IdleTimer
from gateway.tunnel.datagrams import MAX_DATAGRAM, DatagramDecoder, DatagramError
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.splice import QuietFactory, SocketSide, dial_and_splice

log = Logger(namespace="gateway_tcp")

# gateway_udp_datagrams_dropped{app, group, direction}, made when [metrics] is on (gateway_register_metrics).
UDP_DROPPED: Any = None

# Like a typical NAT or firewall: a connection with no byte either way for two hours is gone.
DEFAULT_IDLE_TIMEOUT = 7200.0
# Idleness is checked this many times per idle_timeout (so a connection is closed after
# idle_timeout and at most a quarter more); a check reads two counters, no per-byte cost.
IDLE_CHECKS = 4


def idle_timeout(app: Any) -> float | None:
    """The app's ``options.idle_timeout`` in seconds (None: never); GatewayError if it is not one."""
    value = app.options.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise GatewayError(f"app {app.name}: options.idle_timeout: expected a number of seconds >= 0"
                           f" (0 never closes an idle connection), got {value!r}")
    return float(value) or None


class _ClientSide(SocketSide):
    """A user's connection to the app's listen port on the service."""

    def __init__(self, app: Any, open_stream: Any, reactor: Any = None, idle: float | None = None) -> None:
        super().__init__()
        self.app = app
        self.open_stream = open_stream
        self._gone = False
        self._reactor = reactor
        self._idle = idle
        self._idle_call: Any = None
        self._seen = 0
        self._active_at = 0.0
        self._closing = False

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        d = self.open_stream({"client": f"{peer.host}:{peer.port}"})
        d.addCallbacks(self._opened, self._failed)

    def _opened(self, stream: Any) -> None:
        if self._gone:
            stream.loseConnection()
            return
        self.join(stream)
        if self._idle is not None and self._reactor is not None:
            self._active_at = self._reactor.seconds()
            self._idle_call = self._reactor.callLater(self._idle / IDLE_CHECKS, self._check_idle)

    def _check_idle(self) -> None:
        """Close the connection once no byte went either way for idle_timeout.

        The stream counts bytes both ways already, so a check compares counters instead of
        timing every chunk. A client that stopped reading while data waits for it counts as
        idle too; if the clean close cannot finish (its buffer does not drain), the next check
        aborts the connection.
        """
        now = self._reactor.seconds()
        seen = self.stream.bytes_in + self.stream.bytes_out
        if seen != self._seen:
            self._seen = seen
            self._active_at = now
        elif self._closing:
            self.transport.abortConnection()
            return
        elif now - self._active_at >= self._idle:
            peer = self.transport.getPeer()
            log.info("app {app}: connection from {client} idle for {idle:.0f}s (options.idle_timeout = {timeout:g});"
                     " closing it", app=self.app.name, client=f"{peer.host}:{peer.port}",
                     idle=now - self._active_at, timeout=self._idle)
            self._closing = True
            self.transport.loseConnection()
        self._idle_call = self._reactor.callLater(self._idle / IDLE_CHECKS, self._check_idle)

    def _failed(self, failure: Any) -> None:
        log.warn(
            "app {app}: could not open a stream for {client}: {reason}",
            app=self.app.name, client=str(self.transport.getPeer()), reason=failure.getErrorMessage(),
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._gone = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        super().connectionLost(reason)


@implementer(IProtocolHandler)
class TCPHandler:
    name = "tcp"

    def service_factory(self, app: Any, open_stream: Any, reactor: Any) -> Factory:
        idle = idle_timeout(app)
        return QuietFactory.forProtocol(lambda: _ClientSide(app, open_stream, reactor, idle))

    def connector_stream(self, stream: Any, app: Any, reactor: Any) -> None:
        dial_and_splice(stream, app, reactor)


# A UDP flow with no datagram either way for this long is closed (options.udp_idle_timeout).
DEFAULT_UDP_IDLE_TIMEOUT = 60.0
# What one flow holds while its stream cannot take more (the user's side reads slowly): the
# oldest datagrams are dropped beyond either bound, and counted.
UDP_QUEUE_DATAGRAMS = QUEUE_DATAGRAMS
UDP_QUEUE_BYTES = QUEUE_BYTES


def udp_idle_timeout(app: Any) -> float:
    """The app's ``options.udp_idle_timeout`` in seconds (> 0); GatewayError if it is not one."""
    value = app.options.get("udp_idle_timeout", DEFAULT_UDP_IDLE_TIMEOUT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise GatewayError(f"app {app.name}: options.udp_idle_timeout: expected a number of seconds > 0,"
                           f" got {value!r}")
    return float(value)


def udp_protocol_error(app: Any) -> GatewayError:
    """Why an app may not say protocol = "udp": that handler only carries private apps' UDP flows."""
    return GatewayError(f"app {app.name}: protocol \"udp\" is only for the UDP flows of private apps, which the"
                        " connector picks by their segments' protocol = \"udp\"; use protocol = \"tcp\" (or leave"
                        " it out) and give the app a segment with protocol = \"udp\"")


@implementer(IPushProducer)
class UDPFlow(DatagramProtocol):
    """One UDP flow on the connector: a UDP socket connected to app.host:app.port and a stream
    whose bytes are length-prefixed datagrams (gateway.tunnel.datagrams).

    Datagrams from the app go onto the stream through a DatagramSender (bounded, drop-oldest
    while the stream cannot take more); datagrams from the stream are sent as they come: a UDP
    send does not wait.
    """

    def __init__(self, stream: Any, app: Any, reactor: Any, idle: float,
                 max_datagrams: int = UDP_QUEUE_DATAGRAMS, max_bytes: int = UDP_QUEUE_BYTES) -> None:
        self.stream = stream
        self.app = app
        self.reactor = reactor
        self.idle = idle
        self.sender = DatagramSender(max_datagrams, max_bytes, on_stop=lambda: self.close("the stream stopped"))
        self.decoder = DatagramDecoder()
        self.closed = False
        self.port: Any = None
        self.datagrams_in = 0
        self.unsent = 0  # datagrams from the stream the UDP socket would not send
        self.timer: IdleTimer | None = None

    @property
    def queue(self) -> Any:
        return self.sender.queue

    @property
    def paused(self) -> bool:
        return self.sender.paused

    @property
    def request_id(self) -> Any:
        return self.stream.metadata.get("request_id")

    def start(self) -> None:
        """Bind an ephemeral port of the destination's family, connect it, accept the stream."""
        interface = "::" if isIPv6Address(self.app.host) else "0.0.0.0"
        self.port = self.reactor.listenUDP(0, self, interface=interface, maxPacketSize=MAX_DATAGRAM)
        self.transport.connect(self.app.host, self.app.port)
        self.stream.accept()
        self.stream.attach(_DatagramStreamSide(self))
        self.sender.attach(self.stream)
        self.timer = IdleTimer(self.reactor, self.idle,
                               lambda: self.close(f"idle for {self.idle:g}s (options.udp_idle_timeout)"))

    # -- from the app to the stream --------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.closed:
            return
        self.timer.touch()
        self.sender.send(datagram)

    def connectionRefused(self) -> None:
        # ICMP port unreachable from the app: UDP promises nothing, the flow stays until idle.
        pass

    # -- from the stream to the app --------------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            datagrams = self.decoder.feed(data)
        except DatagramError as e:
            self.stream.reset(ResetCode.REFUSED, f"udp flow to {self.app.destination}: {e}")
            return
        if datagrams:
            self.timer.touch()
        for datagram in datagrams:
            self.datagrams_in += 1
            try:
                self.transport.write(datagram)
            except (OSError, MessageLengthError):
                # The socket's buffer is full or the datagram is too long for UDP: UDP would lose
                # it on the way anyway, so lose this one (counted), not the whole flow.
                self.unsent += 1

    # -- ending ----------------------------------------------------------------------------

    def close(self, why: str) -> None:
        """End the flow: FIN on the stream (if still open), the socket closed, the drops logged."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        dropped, dropped_bytes = self.queue.dropped, self.queue.dropped_bytes
        if UDP_DROPPED is not None:
            count_drops(self.app, dropped, self.unsent)
        self.sender.close()
        if not self.stream.closed:
            self.stream.loseConnection()
        if self.port is not None:
            self.port.stopListening()
        log.info("request {request_id} for app {app}: udp flow to {destination} closed ({why}): {sent} datagrams"
                 " sent ({unsent} refused by the socket), {received} received,"
                 " {dropped} dropped ({dropped_bytes} bytes) while the stream was full",
                 request_id=self.request_id, app=self.app.name, destination=self.app.destination, why=why,
                 sent=self.datagrams_in, unsent=self.unsent, received=self.sender.sent,
                 dropped=dropped, dropped_bytes=dropped_bytes)


@implementer(IHalfCloseableProtocol)
class _DatagramStreamSide(Protocol):
    """The protocol on a UDP flow's stream."""

    def __init__(self, flow: UDPFlow) -> None:
        self.flow = flow

    def dataReceived(self, data: bytes) -> None:
        self.flow.stream_data(data)

    def readConnectionLost(self) -> None:
        self.flow.close("the user's end closed the flow")

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if reason is None or reason.check(ConnectionDone):
            self.flow.close("the stream ended")
        else:
            self.flow.close(f"the stream was reset: {reason.getErrorMessage()}")


@implementer(IProtocolHandler)
class UDPHandler:
    """UDP flows of private apps: the connector dispatches every stream with transport "udp"
    here, whatever the app's protocol. No listener on the service: users reach UDP segments
    only through Private Access."""

    name = "udp"

    def service_factory(self, app: Any, open_stream: Any, reactor: Any) -> Factory:
        raise udp_protocol_error(app)

    def connector_stream(self, stream: Any, app: Any, reactor: Any) -> None:
        UDPFlow(stream, app, reactor, udp_idle_timeout(app)).start()


def count_drops(app: Any, to_user: int, to_app: int) -> None:
    """Add a UDP flow's drops to the metric when it ends (a flow's drops are in its log line too)."""
    if to_user:
        UDP_DROPPED.labels(app.name, app.group, "to_user").inc(to_user)
    if to_app:
        UDP_DROPPED.labels(app.name, app.group, "to_app").inc(to_app)


@hookimpl
def gateway_register_metrics(metrics: Any) -> None:
    global UDP_DROPPED
    if "connector" in metrics.roles:
        UDP_DROPPED = metrics.counter(
            "gateway_udp_datagrams_dropped", "UDP datagrams of private apps' flows dropped on the connector,"
            " counted when the flow ends: to_user while the stream was full (oldest first), to_app refused"
            " by the UDP socket.", ("app", "group", "direction"))


@hookimpl
def gateway_register_protocols(register: Any) -> None:
    register(TCPHandler())
    register(UDPHandler())


@hookimpl
def gateway_service_listeners(register: Any, config: Any, open_stream: Any, reactor: Any) -> None:
    """Registers no listener: checks the tcp apps' options, so a bad one stops the service
    (and `gateway check-config`) before anything binds."""
    for app in config.apps:
        if app.protocol == "tcp":
            idle_timeout(app)
        if app.protocol == "udp":
            raise udp_protocol_error(app)
        if any(segment.protocol == "udp" for segment in app.segments):
            udp_idle_timeout(app)
