"""The service's end of each tunnel: authenticate, enrol or say hello, then serve the control stream."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import PROTOCOL_VERSION, __version__
from gateway.control import messages as m
from gateway.control.messages import ControlChannel
from gateway.errors import describe_failure
from gateway.pki.tls import peer_identity
from gateway.service.registry import ConnectorTunnel
from gateway.tunnel.frame import GoAwayCode, ResetCode
from gateway.tunnel.session import TunnelSession
from gateway.tunnel.stream import Stream

if TYPE_CHECKING:
    from gateway.service.node import ServiceNode

# A peer that has not finished TLS and hello by then is dropped, so idle sockets cannot pile up.
HELLO_TIMEOUT = 30.0

_REFUSALS = {
    "unknown": "this client certificate was not issued to a known connector; register the connector again",
    "revoked": "this connector's certificate was revoked; register the connector again with a new token",
    "connector deleted": "this connector was deleted from the service; register it again with a new token",
}


class ServiceTunnelFactory(Factory):
    """Builds one TunnelSession (and its handler) per accepted TLS connection."""

    noisy = False
    log = Logger()

    def __init__(self, node: ServiceNode) -> None:
        self.node = node
        self._ids = itertools.count(1)
        self.handshaking = 0
        self._last_shed_log = 0.0

    def buildProtocol(self, addr: Any) -> TunnelSession | None:
        node = self.node
        if self.handshaking >= node.config.service.max_handshakes:
            # Shed load during a reconnect storm: the connector's jittered backoff retries later.
            now = node.reactor.seconds()
            if now - self._last_shed_log > 1.0:
                self._last_shed_log = now
                self.log.warn("{n} TLS handshakes in progress (max_handshakes); refusing new tunnels for now",
                              n=self.handshaking)
            return None
        session = TunnelSession(
            node.reactor, node.settings, is_client=False, tunnel_id=f"{node.config.service.node_id}/t{next(self._ids)}"
        )
        self.handshaking += 1
        TunnelHandler(node, session, addr, self)
        return session


class TunnelHandler:
    log = Logger()

    def __init__(self, node: ServiceNode, session: TunnelSession, addr: Any,
                 factory: ServiceTunnelFactory | None = None) -> None:
        self.node = node
        self._factory = factory
        self.session = session
        self.address = f"{getattr(addr, 'host', addr)}:{getattr(addr, 'port', '')}"
        self.state = "handshaking"
        self.identity: Any = None
        self.group: str | None = None
        self.control: ControlChannel | None = None
        self.entry: ConnectorTunnel | None = None
        self._queued: list[dict] = []
        session.owner = self
        session.on_stream = self.on_stream
        session.on_handshake = self.handshake_done
        session.on_lost.append(self.lost)
        session.on_stream_closed = node.stream_closed
        self._deadline = node.reactor.callLater(HELLO_TIMEOUT, self._too_slow)

    @property
    def ctx(self) -> dict[str, Any]:
        return self.session.log_context

    # -- authentication ------------------------------------------------------------------

    def _handshake_over(self) -> None:
        if self._factory is not None:
            self._factory.handshaking -= 1
            self._factory = None

    def handshake_done(self, session: TunnelSession) -> None:
        self._handshake_over()
        self.identity = peer_identity(session.transport)
        if self.identity is None:
            self.state = "enrolling"
            return
        self.state = "checking"
        self.ctx["connector_id"] = self.identity.connector_id
        d = self.node.store.certificate_status(self.identity.serial_hex, self.identity.connector_id)
        d.addCallback(self._checked)
        d.addErrback(self._internal_error)

    def _checked(self, status: str) -> Any:
        if status != "valid":
            self.refuse(GoAwayCode.NOT_AUTHORIZED, _REFUSALS.get(status, f"certificate is {status}"))
            return None
        d = self.node.store.get_connector(self.identity.connector_id)
        d.addCallback(self._authenticated)
        return d

    def recheck(self) -> Any:
        """Check again that this tunnel's certificate and connector are still valid."""
        d = self.node.store.certificate_status(self.identity.serial_hex, self.identity.connector_id)

        def checked(status: str) -> None:
            if status != "valid" and self.session.connected:
                self.refuse(GoAwayCode.NOT_AUTHORIZED, _REFUSALS.get(status, f"certificate is {status}"))

        return d.addCallback(checked)

    def _authenticated(self, record: Any) -> None:
        if record is None or record.deleted_at is not None:
            self.refuse(GoAwayCode.NOT_AUTHORIZED, _REFUSALS["connector deleted"])
            return
        self.group = record.group
        self.state = "authenticated"
        queued, self._queued = self._queued, []
        for message in queued:
            self.on_control(message)

    def refuse(self, code: int, message: str) -> None:
        self.log.warn(
            "tunnel {tunnel_id} from {address} refused: {message}",
            address=self.address, message=message, **self.ctx,
        )
        if self.control is not None:
            self.control.send({"type": m.ERROR, "code": GoAwayCode(code).name.lower(), "message": message})
        self.session.go_away(code, message)
        self.session.close()

    def _internal_error(self, failure: Failure) -> None:
        self.log.failure("tunnel {tunnel_id}: internal error", failure, **self.ctx)
        self.refuse(GoAwayCode.INTERNAL_ERROR, "internal error on the service; see the service log")

    def _too_slow(self) -> None:
        if self.state != "up" and self.session.connected:
            self.refuse(GoAwayCode.PROTOCOL_ERROR, f"no TLS handshake and hello within {HELLO_TIMEOUT:.0f}s")

    # -- streams from the connector --------------------------------------------------------

    def on_stream(self, stream: Stream) -> None:
        kind = stream.metadata.get("kind")
        if kind == "enrol" and self.state == "enrolling":
            stream.accept()
            stream.attach(ControlChannel(lambda msg: self._enrol(stream, msg)))
        elif kind == "control" and self.state in ("checking", "authenticated") and self.control is None:
            stream.accept()
            self.control = ControlChannel(self.on_control, lambda reason: self._control_lost())
            stream.attach(self.control)
        elif self.state == "enrolling":
            stream.reset(ResetCode.REFUSED, "no client certificate: only enrolment is possible on this connection")
        else:
            stream.reset(ResetCode.REFUSED, f"a connector may not open a {kind!r} stream here")

    def _enrol(self, stream: Stream, message: dict) -> None:
        def reply(result: dict) -> None:
            channel = stream.protocol
            if channel is not None:
                channel.send(result)
                stream.loseConnection()

        d = self.node.enrol(message, self.address)
        d.addCallback(reply)

    # -- the control channel ---------------------------------------------------------------

    def on_control(self, message: dict) -> None:
        if self.state == "checking":
            self._queued.append(message)
            return
        kind = message["type"]
        if kind == m.HELLO:
            self._hello(message)
        elif self.state != "up":
            self.refuse(GoAwayCode.PROTOCOL_ERROR, f"expected hello first, got {kind!r}")
        elif kind == m.CONFIG_REQUEST:
            self.send_config(force=True)
        elif kind == m.HEARTBEAT:
            self._heartbeat(message)
        elif kind in self.node.control_handlers:
            # Further control messages (certificate renewal, ...) live in their own modules.
            self.node.control_handlers[kind](self, message)
        else:
            self.log.warn("tunnel {tunnel_id}: ignoring control message {kind!r}", kind=kind, **self.ctx)

    def _hello(self, message: dict) -> None:
        version = message.get("protocol_version")
        if version != PROTOCOL_VERSION:
            self.refuse(
                GoAwayCode.UNSUPPORTED_VERSION,
                f"protocol version mismatch: the service speaks {PROTOCOL_VERSION} (gateway {__version__}),"
                f" the connector speaks {version!r} (gateway {message.get('software_version', '?')});"
                " upgrade the older side",
            )
            return
        if self.state != "authenticated":
            self.refuse(GoAwayCode.PROTOCOL_ERROR, "hello repeated")
            return
        self.state = "up"
        self._deadline.cancel()
        service = self.node.config.service
        self.control.send({
            "type": m.WELCOME,
            "protocol_version": PROTOCOL_VERSION,
            "software_version": __version__,
            "node_id": service.node_id,
            "connector_id": self.identity.connector_id,
            "group": self.group,
            "config_interval": service.config_interval,
            "heartbeat_interval": service.heartbeat_interval,
            "capabilities": list(m.CAPABILITIES),
        })
        self.entry = ConnectorTunnel(
            session=self.session, connector_id=self.identity.connector_id, group=self.group,
            address=self.address, software_version=str(message.get("software_version", "?")),
        )
        self.node.tunnel_up(self)
        self.send_config(force=True)

    def send_config(self, force: bool = False) -> None:
        if self.control is None or self.state != "up":
            return
        self.control.send(self.node.group_config(self.group))

    def _heartbeat(self, message: dict) -> None:
        if self.entry is not None:
            self.entry.load = {k: v for k, v in message.items() if k != "type"}
        self.node.heartbeat(self.identity.connector_id)

    def _control_lost(self) -> None:
        if self.session.connected and self.state == "up":
            self.refuse(GoAwayCode.PROTOCOL_ERROR, "the control stream was closed")

    def lost(self, session: TunnelSession, reason: Failure) -> None:
        self._handshake_over()
        if self._deadline.active():
            self._deadline.cancel()
        if self.state == "up":
            self.node.tunnel_lost(self, reason)
        elif self.state == "handshaking":
            self.log.warn(
                "connection from {address} ended before the TLS handshake completed: {reason}",
                address=self.address, reason=describe_failure(reason), **self.ctx,
            )
