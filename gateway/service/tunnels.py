"""The service's end of each tunnel: authenticate, enrol or say hello, then serve the control stream."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from gateway import PROTOCOL_VERSION, __version__
from gateway.control import messages as m
from gateway.control.messages import ControlChannel
from gateway.errors import StoreClosed, StoreUnavailable, describe_failure
from gateway.pki.tls import peer_identity
from gateway.service.access import AccessRefused, AccessTunnel, check_credential
from gateway.service.admission import AddressCounter, RateLimiter, ThrottledLog, address_key
from gateway.service.registry import ConnectorTunnel
from gateway.tunnel.frame import GoAwayCode, ResetCode
from gateway.tunnel.session import TunnelSession
from gateway.tunnel.stream import Stream

if TYPE_CHECKING:
    from gateway.service.node import ServiceNode

# A peer that has not finished TLS and hello by then is dropped, so idle sockets cannot pile up.
# (TLS itself has the shorter [service] handshake_timeout.)
HELLO_TIMEOUT = 30.0
# Streams a peer may open before its hello is accepted: a connector opens one (control or
# enrol); a few more are answered with RST, then the tunnel is refused.
MAX_STREAMS_BEFORE_HELLO = 4
# The largest `capacity` a heartbeat may report: routing divides by it, so it must be sane.
MAX_CAPACITY = 1000.0
# Streams a user's client may open while the store checks its credential; they wait for it.
MAX_STREAMS_WHILE_CHECKING = 64
# What a connector may report of one stream's session (session_facts): keys kept, each small.
MAX_SESSION_FACTS = 32

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
        clock = node.reactor
        service = node.config.service
        # Connections from accept until their hello is accepted (or enrolment is done), by address.
        self.unauthenticated = AddressCounter(service.max_unauthenticated_per_address)
        self.enrolments = RateLimiter(service.enrolments_per_minute, clock)
        self._shed_log = ThrottledLog(
            self.log, clock, "{n} TLS handshakes in progress (max_handshakes); refusing new tunnels for now"
                             " ({more} more refused since the last line)")
        self._address_log = ThrottledLog(
            self.log, clock, "refusing a tunnel connection from {address}: it already holds {limit} unauthenticated"
                             " connections (max_unauthenticated_per_address; {more} more refused since the last line)")
        self.slow_handshake_log = ThrottledLog(
            self.log, clock, "connection from {address} closed: no TLS handshake within {timeout:g}s"
                             " (handshake_timeout; {more} more since the last line)")
        self.no_handshake_log = ThrottledLog(
            self.log, clock, "connection from {address} ended before the TLS handshake completed: {reason}"
                             " ({more} more since the last line)")
        self.refusal_log = ThrottledLog(
            self.log, clock, "tunnel {tunnel_id} from {address} refused before authentication: {message}"
                             " ({more} more since the last line)")

    def admit(self, addr: Any) -> bool:
        """Whether to take a new connection from `addr` (counted against its address if so)."""
        service = self.node.config.service
        key = address_key(str(getattr(addr, "host", addr)))
        # Read at each connection, so a reloaded config applies at once.
        self.unauthenticated.limit = service.max_unauthenticated_per_address
        self.enrolments.per_minute = service.enrolments_per_minute
        if not self.unauthenticated.acquire(key):
            # One address (or IPv6 /64) must not hold every handshake slot: refuse it, not the others.
            self._address_log.emit(address=key, limit=self.unauthenticated.limit)
            self.node.node_metrics.handshake("address_limit")
            return False
        if self.handshaking >= service.max_handshakes:
            # Shed load during a reconnect storm: the connector's jittered backoff retries later.
            self.unauthenticated.release(key)
            self._shed_log.emit(n=self.handshaking)
            self.node.node_metrics.handshake("shed")
            return False
        return True

    def buildProtocol(self, addr: Any) -> TunnelSession:
        """A session for a connection admit() took."""
        node = self.node
        service = node.config.service
        session = TunnelSession(
            node.reactor, node.settings, is_client=False, tunnel_id=f"{service.node_id}/t{next(self._ids)}"
        )
        self.handshaking += 1
        TunnelHandler(node, session, addr, self)
        return session


class TunnelTLSFactory(TLSMemoryBIOFactory):
    """TLS around ServiceTunnelFactory; a connection it does not admit is closed at once, before
    any TLS state is made (TLSMemoryBIOFactory would wrap a None protocol and fail later)."""

    def buildProtocol(self, addr: Any) -> Any:
        if not self.wrappedFactory.admit(addr):
            return None
        return super().buildProtocol(addr)


class TunnelHandler:
    log = Logger()

    def __init__(self, node: ServiceNode, session: TunnelSession, addr: Any,
                 factory: ServiceTunnelFactory | None = None) -> None:
        self.node = node
        # The factory holds what its connections share: the handshake count and the limits on
        # unauthenticated peers. (None for a handler made without one, in unit tests.)
        self._admission = factory
        self._handshaking = factory is not None  # counted in factory.handshaking
        self.session = session
        host = str(getattr(addr, "host", addr))
        self.address = f"{host}:{getattr(addr, 'port', '')}"
        self.source = address_key(host)  # what per-address limits count by
        self._counted = factory is not None  # against factory.unauthenticated
        self._streams_before_hello = 0
        self._enrol_stream: Stream | None = None
        self._enrol_requests = 0
        self.state = "handshaking"
        self.identity: Any = None
        self.group: str | None = None
        self.control: ControlChannel | None = None
        self.entry: ConnectorTunnel | None = None
        self._queued: list[dict] = []
        self._user_streams: list[Stream] = []
        # An updater's `update` streams that wait for the certificate check (gateway/service/updates.py).
        self._update_streams: list[Stream] = []
        self.access: AccessTunnel | None = None
        session.owner = self
        session.on_stream = self.on_stream
        session.on_handshake = self.handshake_done
        session.on_lost.append(self.lost)
        session.on_stream_closed = node.stream_closed
        self._deadline = node.reactor.callLater(HELLO_TIMEOUT, self._too_slow)
        self._handshake_timeout = node.config.service.handshake_timeout
        self._handshake_deadline = node.reactor.callLater(self._handshake_timeout, self._handshake_too_slow)

    @property
    def ctx(self) -> dict[str, Any]:
        return self.session.log_context

    # -- authentication ------------------------------------------------------------------

    def _handshake_over(self) -> None:
        if self._handshaking:
            self._handshaking = False
            self._admission.handshaking -= 1
        if self._handshake_deadline.active():
            self._handshake_deadline.cancel()

    def _authentication_over(self) -> None:
        """This connection no longer counts against its address's unauthenticated limit."""
        if self._counted:
            self._counted = False
            self._admission.unauthenticated.release(self.source)

    def _handshake_too_slow(self) -> None:
        if self.state != "handshaking" or self.session.transport is None:
            return
        self.state = "timed out"
        self.node.node_metrics.handshake("timeout")
        if self._admission is not None:
            self._admission.slow_handshake_log.emit(address=self.address, timeout=self._handshake_timeout)
        # Before TLS there is no way to say why: just close, and free the handshake slot now.
        self._handshake_over()
        self.session.transport.abortConnection()

    def handshake_done(self, session: TunnelSession) -> None:
        self._handshake_over()
        self.identity = peer_identity(session.transport)
        if self.identity is None:
            self.state = "enrolling"
            return
        if self.identity.kind == "user":
            self._check_user()
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

    def _check_user(self) -> None:
        """A Private Access user's tunnel: its certificate's credential must be valid in the store."""
        self.state = "user-checking"
        self.ctx["credential_id"] = self.identity.user_credential
        if self.node.config.access is None:
            self.refuse(GoAwayCode.NOT_AUTHORIZED, "Private Access is not enabled on this service ([access] table)")
            return

        def valid(record: Any) -> None:
            if self.state != "user-checking" or not self.session.connected:
                return
            problem = self.node.user_tunnel_problem(record)
            if problem is not None:
                self.refuse(GoAwayCode.NOT_AUTHORIZED, problem)
                return
            self.state = "user"
            self.node.node_metrics.handshake("user_ok")
            self._deadline.cancel()
            self._authentication_over()
            self.access = AccessTunnel(self.node, self, record)
            self.node.user_tunnel_up(self)
            queued, self._user_streams = self._user_streams, []
            for stream in queued:
                if not stream.closed:
                    self.access.on_stream(stream)

        def invalid(failure: Failure) -> None:
            if failure.check(AccessRefused):
                self.refuse(GoAwayCode.NOT_AUTHORIZED, str(failure.value))
            else:
                self._internal_error(failure)

        check_credential(self.node, self.identity.user_credential).addCallbacks(valid, invalid)

    def recheck(self) -> Any:
        """Check again that this tunnel's certificate and connector are still valid."""
        if self.access is not None:
            return self.access.recheck()
        if self.identity is None or self.identity.kind != "connector":
            return None
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
        waiting, self._update_streams = self._update_streams, []
        for stream in waiting:
            if not stream.closed:
                self._update_stream(stream)

    def refuse(self, code: int, message: str) -> None:
        if self.state not in ("up", "user"):
            self.node.node_metrics.handshake("refused")
        if self.state == "enrolling" and self._admission is not None:
            # Anyone without a certificate can get here, as often as they can connect: a flood
            # is one line a second. (A refused certificate, revoked say, is worth a line each.)
            self._admission.refusal_log.emit(address=self.address, message=message, **self.ctx)
        else:
            self.log.warn(
                "tunnel {tunnel_id} from {address} refused: {message}",
                address=self.address, message=message, **self.ctx,
            )
        if self.control is not None:
            self.control.send({"type": m.ERROR, "code": GoAwayCode(code).name.lower(), "message": message})
        self.session.go_away(code, message)
        self.session.close()

    def _internal_error(self, failure: Failure) -> None:
        if failure.check(StoreClosed):
            # The node stops while this tunnel was being checked: a drain, not an error; the
            # peer dials again (another node, or this one once it is back).
            self.refuse(GoAwayCode.NORMAL, "service node is shutting down")
            return
        if failure.check(StoreUnavailable):
            # A store outage (logged once by the node): a tunnel it cannot check is refused,
            # and the peer's backoff brings it back once the store is.
            self.refuse(GoAwayCode.INTERNAL_ERROR, f"the service cannot check this certificate now"
                                                   f" ({failure.getErrorMessage()}); retry later")
            return
        self.log.failure("tunnel {tunnel_id}: internal error", failure, **self.ctx)
        self.refuse(GoAwayCode.INTERNAL_ERROR, "internal error on the service; see the service log")

    def _too_slow(self) -> None:
        if self.state not in ("up", "user", "updating") and self.session.connected:
            self.refuse(GoAwayCode.PROTOCOL_ERROR, f"no TLS handshake and hello within {HELLO_TIMEOUT:.0f}s")

    # -- streams from the connector --------------------------------------------------------

    def on_stream(self, stream: Stream) -> None:
        kind = stream.metadata.get("kind")
        if self.state == "user":
            self.access.on_stream(stream)
            return
        if self.state == "user-checking":
            # A client opens streams as soon as TLS is up; they wait for the store's answer.
            if len(self._user_streams) >= MAX_STREAMS_WHILE_CHECKING:
                stream.reset(ResetCode.TOO_MANY_STREAMS, f"more than {MAX_STREAMS_WHILE_CHECKING} streams"
                                                         " before the user's credential was checked")
                return
            self._user_streams.append(stream)
            return
        if self.state != "up":
            self._streams_before_hello += 1
            if self._streams_before_hello > MAX_STREAMS_BEFORE_HELLO:
                reason = (f"{self._streams_before_hello} streams opened before the hello; the limit is"
                          f" {MAX_STREAMS_BEFORE_HELLO} (a connector opens one: control, or enrol)")
                stream.reset(ResetCode.TOO_MANY_STREAMS, reason)
                self.refuse(GoAwayCode.PROTOCOL_ERROR, reason)
                return
        if kind in ("enrol", "user_login") and self.state == "enrolling":
            if self._enrol_stream is not None:
                stream.reset(ResetCode.REFUSED, "one enrolment per connection: open a new connection for another")
                return
            self._enrol_stream = stream
            stream.accept()
            answer = self.node.enrol if kind == "enrol" else self.node.user_certificate
            stream.attach(ControlChannel(lambda msg: self._enrol(stream, msg, answer)))
        elif kind == "update" and self.state in ("checking", "authenticated", "updating") and self.control is None:
            self._update_stream(stream)
        elif kind == "control" and self.state in ("checking", "authenticated") and self.control is None:
            stream.accept()
            self.control = ControlChannel(self.on_control, lambda reason: self._control_lost())
            stream.attach(self.control)
        elif self.state == "enrolling":
            stream.reset(ResetCode.REFUSED, "no client certificate: only enrolment is possible on this connection")
        else:
            stream.reset(ResetCode.REFUSED, f"a connector may not open a {kind!r} stream here")

    def _update_stream(self, stream: Stream) -> None:
        """An updater's request, made with the connector's own certificate: answered once the
        certificate is known valid. Such a connection never becomes a tunnel (no hello)."""
        if self.state == "checking":
            self._update_streams.append(stream)
            return
        if self.state == "authenticated":
            self.state = "updating"
            self._deadline.cancel()
            self._authentication_over()
        self.node.updates.on_stream(self, stream)

    def _enrol(self, stream: Stream, message: dict, answer: Any) -> None:
        """Answer the one request of an unauthenticated connection: a connector's enrolment, or
        a Private Access user's certificate request; both rate-limited per address."""
        self._enrol_requests += 1
        if self._enrol_requests > 1:
            # Each request is a store write: one per connection, and connections are limited.
            self.refuse(GoAwayCode.PROTOCOL_ERROR,
                        "more than one enrolment request on one connection; send one, then open a new connection")
            return

        def reply(result: dict) -> None:
            channel = stream.protocol
            if channel is not None:
                channel.send(result)
                stream.loseConnection()
            if self.session.connected:
                self.session.go_away(GoAwayCode.NORMAL, "one enrolment per connection")
                self.session.close()

        wait = self._admission.enrolments.take(self.source) if self._admission is not None else 0.0
        if wait:
            limit = self._admission.enrolments.per_minute
            reason = (f"too many enrolment requests from {self.source} (the limit is {limit} a minute,"
                      f" enrolments_per_minute); try again in {math.ceil(wait)} s")
            self._admission.refusal_log.emit(address=self.address, message=reason, **self.ctx)
            reply({"type": m.ERROR, "code": "rate_limited", "message": reason})
            return
        d = answer(message, self.address)
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
        elif kind == m.SESSION_FACTS:
            self._session_facts(message)
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
        if message.get("diagnose") is True:
            self._diagnose()
            return
        self.state = "up"
        self.node.node_metrics.handshake("ok")
        self._deadline.cancel()
        self._authentication_over()
        self.control.send(self._welcome())
        self.entry = ConnectorTunnel(
            session=self.session, connector_id=self.identity.connector_id, group=self.group,
            address=self.address, software_version=str(message.get("software_version", "?")),
        )
        # The config goes first: a stream routed here the moment the tunnel is up (one waiting
        # for a connector, say) must not reach the connector before the apps it names.
        self.send_config(force=True)
        self.node.tunnel_up(self)

    def _welcome(self) -> dict:
        service = self.node.config.service
        return {
            "type": m.WELCOME,
            "protocol_version": PROTOCOL_VERSION,
            "software_version": __version__,
            "node_id": service.node_id,
            "connector_id": self.identity.connector_id,
            "group": self.group,
            "config_interval": service.config_interval,
            "heartbeat_interval": service.heartbeat_interval,
            "capabilities": list(m.CAPABILITIES),
            # The service's clock: a connector warns when its own is off, `gateway diagnose` checks it.
            "time": self.node.reactor.seconds(),
        }

    def _diagnose(self) -> None:
        """`gateway diagnose` said hello: its certificate passed the checks a tunnel's does; it gets
        the welcome (with the service's time) and its group's config, never a tunnel: no stream is
        routed to it, no heartbeat kept. The client closes the connection once it has both."""
        self.state = "diagnosing"
        self._deadline.cancel()
        self._authentication_over()
        self.log.info("connector {connector_id} ran gateway diagnose from {address}", address=self.address,
                      **self.ctx)
        self.control.send(self._welcome())
        self.control.send(self.node.group_config(self.group))

    def send_config(self, force: bool = False) -> None:
        if self.control is None or self.state != "up":
            return
        # session_log: this connector's switch (gateway logs session), outside the apps' version
        # so flipping it reaches a connector whose apps did not change.
        self.control.send({**self.node.group_config(self.group),
                           "session_log": self.node.session_log_for(self.identity.connector_id, self.group),
                           **connector_nodes(self.node)})

    def _heartbeat(self, message: dict) -> None:
        problem = capacity_problem(message.get("capacity", 1.0))
        if problem is not None:
            self.refuse(GoAwayCode.PROTOCOL_ERROR, f"heartbeat refused: {problem}")
            return
        if self.entry is not None:
            self.entry.load = {k: v for k, v in message.items() if k != "type"}
        self.node.heartbeat(self.identity.connector_id)

    def _session_facts(self, message: dict) -> None:
        """A plugin's facts about one of this tunnel's streams, kept for its session record.

        Only for an app stream still open on this tunnel, only flat values, and bounded: the
        connector may not grow the node's memory through it."""
        stream = self.session.streams.get(message.get("stream_id"))
        facts = message.get("facts")
        if stream is None or getattr(stream, "log_info", None) is None or not isinstance(facts, dict):
            return
        kept = {}
        for key, value in list(facts.items())[:MAX_SESSION_FACTS]:
            if isinstance(key, str) and len(key) <= 64 and (
                    value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 256)):
                kept[key] = value
        stream.session_facts = kept

    def _control_lost(self) -> None:
        if self.session.connected and self.state == "up":
            self.refuse(GoAwayCode.PROTOCOL_ERROR, "the control stream was closed")

    def lost(self, session: TunnelSession, reason: Failure) -> None:
        self._handshake_over()
        self._authentication_over()
        if self._deadline.active():
            self._deadline.cancel()
        if self.state == "up":
            self.node.tunnel_lost(self, reason)
        elif self.state == "user":
            self.access.lost()
            self.node.user_tunnel_lost(self)
        elif self.state == "handshaking" and self._admission is not None:
            self.node.node_metrics.handshake("failed")
            self._admission.no_handshake_log.emit(address=self.address, reason=describe_failure(reason), **self.ctx)


def connector_nodes(node: Any) -> dict[str, Any]:
    """The config message's ``nodes``: the live nodes sharing a PostgreSQL store, each with the
    address connectors dial, so every connector keeps tunnels to every node (docs/protocol.md).
    Nothing on the embedded SQLite store (one node): its connectors keep dialling its address;
    nothing either before this node's first heartbeat read the list (connectors keep theirs)."""
    if not node.config.service.store:
        return {}
    listed = [{"node_id": n.node_id, "address": n.tunnel_address} for n in node.nodes() if n.tunnel_address]
    return {"nodes": listed} if listed else {}


def capacity_problem(value: Any) -> str | None:
    """Why a reported capacity is unusable (routing divides load by it), or None if it is fine."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_CAPACITY:
        return f"capacity must be a finite number > 0 and <= {MAX_CAPACITY:g}, got {value!r}"
    return None
