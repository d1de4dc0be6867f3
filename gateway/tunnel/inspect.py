"""Watch the first bytes of a connector stream both ways, then splice untouched.

For protocol plugins that must see a connection's handshake (who, which dialect, which
security) and may refuse it, without altering a byte: :func:`dial_inspect_and_splice` dials the
app's destination like :func:`gateway.tunnel.splice.dial_and_splice`, accepts the stream, and
hands every chunk of both directions to an *inspector* (a codec without I/O) before forwarding
it. The inspector answers each chunk with a verdict:

- ``continue``: forward the chunk, keep inspecting;
- ``done``: forward the chunk, then splice the rest as :mod:`gateway.tunnel.splice` does, with
  no inspector call per chunk any more;
- ``refuse``: do not forward the chunk; write the verdict's ``reply`` bytes (if any) to the
  client, send FIN to the client and close the connection to the app.

The inspector holds what it needs between calls (bounded by the codec); this module holds
nothing: every chunk is forwarded as soon as it was fed. Once the inspection ends (or the
connection ends before it did) the session's facts are put on ``stream.session_facts`` (a dict)
and logged on the connector as one event (``event="session_facts"``) naming the app, the user
(the stream's ``user`` metadata, if any), the client, the decision and the reason.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import frozen
from twisted.logger import Logger

from gateway.errors import GatewayError
from gateway.tunnel.frame import ResetCode
from gateway.tunnel.splice import SocketSide, StreamSide, dial_and_splice

log = Logger(namespace="gateway.inspect")

# A refused stream gets FIN after the reply; a client that never closes its side is reset
# after this many seconds, so a refusal holds nothing open for long.
REFUSAL_GRACE = 10.0

DECISION_SPLICED = "spliced"
DECISION_REFUSED = "refused"
DECISION_CLOSED = "closed"


@frozen
class _Failed:
    """The verdict standing in for an inspector that raised."""

    reason: str
    action: str = "refuse"
    code: str = "internal"
    reply: bytes = b""


def _action(verdict: Any) -> str:
    """A verdict's action as a string: codecs define their own Action enums."""
    action = verdict.action
    return getattr(action, "value", action)


class Inspection:
    """One stream's inspection: feeds the inspector, decides what each chunk does, logs the end.

    ``facts(inspector) -> dict`` says what the session showed (dialect, user, ...), for
    ``stream.session_facts`` and the log.
    """

    def __init__(self, stream: Any, app: Any, inspector: Any, facts: Callable[[Any], dict[str, Any]],
                 reactor: Any, grace: float = REFUSAL_GRACE) -> None:
        self.stream = stream
        self.app = app
        self.inspector = inspector
        self.facts = facts
        self.reactor = reactor
        self.grace = grace
        self.backend: InspectingSocketSide | None = None
        self.active = True
        self.refused = False

    def from_client(self, data: bytes) -> None:
        """Bytes the user's client sent (they came on the stream), bound for the app."""
        if self.refused:
            return
        if self.active and not self._forward(self._feed(self.inspector.feed_client, data)):
            return
        self.backend.transport.write(data)

    def from_server(self, data: bytes) -> None:
        """Bytes the app sent, bound for the client."""
        if self.refused:
            return
        if self.active and not self._forward(self._feed(self.inspector.feed_server, data)):
            return
        self.stream.write(data)

    def _feed(self, feed: Callable[[bytes], Any], data: bytes) -> Any:
        """The inspector's verdict on ``data``; a refusal if it raised. This runs inside the
        tunnel's dataReceived, where an exception would end every stream of the tunnel."""
        try:
            return feed(data)
        except Exception as e:
            log.failure("app {app}: the {protocol} inspector failed", app=self.app.name, protocol=self.app.protocol)
            return _Failed(f"the {self.app.protocol} inspector failed: {e!r}")

    def _forward(self, verdict: Any) -> bool:
        """Whether the chunk just fed goes on; ends the inspection on done or refuse."""
        action = _action(verdict)
        if action == "continue":
            return True
        self.active = False
        if action == "done":
            self._record(DECISION_SPLICED, verdict.reason)
            self._splice_plain()
            return True
        self._refuse(verdict)
        return False

    def _splice_plain(self) -> None:
        """From now on each chunk goes straight through, exactly as a plain splice's does: the
        protocols' dataReceived become the other side's write (no inspection call per chunk)."""
        backend, stream = self.backend, self.stream
        backend.dataReceived = stream.write
        stream.protocol.dataReceived = backend.transport.write

    def _refuse(self, verdict: Any) -> None:
        self.refused = True
        self._record(DECISION_REFUSED, verdict.reason, getattr(verdict, "code", ""))
        stream, backend = self.stream, self.backend
        backend.transport.unregisterProducer()
        stream.unregisterProducer()
        reply = getattr(verdict, "reply", b"")
        if reply:
            stream.write(reply)
        stream.loseConnection()
        backend.transport.loseConnection()
        self.reactor.callLater(self.grace, self._reset_if_open)

    def _reset_if_open(self) -> None:
        if not self.stream.closed:
            self.stream.reset(ResetCode.REFUSED, f"app {self.app.name}: the connection was refused and the client"
                                                 f" did not close it within {self.grace:g}s")

    def connection_lost(self) -> None:
        """The connection to the app ended (either side closed it)."""
        if self.active:
            self.active = False
            self._record(DECISION_CLOSED, "the connection ended before the inspection did")

    def _record(self, decision: str, reason: str, code: str = "") -> None:
        stream, app = self.stream, self.app
        try:
            facts = dict(self.facts(self.inspector))
        except Exception as e:   # inside the tunnel's dataReceived too: see _feed
            log.failure("app {app}: the {protocol} plugin's facts failed", app=app.name, protocol=app.protocol)
            facts = {"facts_error": repr(e)}
        facts["decision"] = decision
        facts["reason"] = reason
        if code:
            facts["code"] = code
        stream.session_facts = facts
        report = getattr(stream.session.owner, "report_session_facts", None)
        if report is not None:   # to the service, for the stream's session record
            report(stream, facts)
        meta = stream.metadata
        summary = " ".join(f"{k}={v}" for k, v in facts.items() if k not in ("decision", "reason") and v not in (None, ""))
        fields = dict(event="session_facts", app=app.name, protocol=app.protocol, user=meta.get("user"),
                      client=meta.get("client"), request_id=meta.get("request_id"), decision=decision,
                      reason=reason, facts=facts, summary=summary)
        text = ("app {app} ({protocol}) request {request_id}: session from {client} (user {user}) {decision}:"
                " {reason}; {summary}")
        if decision == DECISION_REFUSED:
            log.warn(text, **fields)
        else:
            log.info(text, **fields)


class InspectingStreamSide(StreamSide):
    """The stream's protocol while an inspection may still look at the client's bytes."""

    def __init__(self, socket_side: InspectingSocketSide) -> None:
        super().__init__(socket_side)
        self.inspection = socket_side.inspection

    def dataReceived(self, data: bytes) -> None:
        self.inspection.from_client(data)

    # After a refusal the socket to the app is closed already: the client's FIN or the stream's
    # end has nothing left to pass on to it.

    def readConnectionLost(self) -> None:
        if not self.inspection.refused:
            super().readConnectionLost()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.inspection.refused:
            super().connectionLost(reason)


class InspectingSocketSide(SocketSide):
    """The socket to the app, its bytes fed to the inspection before they go on the stream."""

    stream_side = InspectingStreamSide

    def __init__(self, inspection: Inspection) -> None:
        super().__init__()
        self.inspection = inspection
        inspection.backend = self

    def dataReceived(self, data: bytes) -> None:
        self.inspection.from_server(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.inspection.connection_lost()
        super().connectionLost(reason)


def dial_inspect_and_splice(stream: Any, app: Any, reactor: Any, inspector: Any,
                            facts: Callable[[Any], dict[str, Any]]) -> Inspection:
    """The connector's half of a protocol whose handshake is inspected: dial ``app.host:app.port``,
    accept the stream once connected, feed both directions to ``inspector`` (``feed_client(bytes)``
    and ``feed_server(bytes)`` returning a verdict with ``action`` continue/done/refuse, ``reason``
    and optionally ``code`` and ``reply``) until it is done, then splice. A failed dial resets the
    stream with the reason, as dial_and_splice does."""
    inspection = Inspection(stream, app, inspector, facts, reactor)
    dial_and_splice(stream, app, reactor, InspectingSocketSide(inspection))
    return inspection


def flag_option(app: Any, key: str, default: bool) -> bool:
    """The app's boolean ``options.<key>``; GatewayError naming the key if it is not a boolean."""
    value = app.options.get(key, default)
    if not isinstance(value, bool):
        raise GatewayError(f"app {app.name}: options.{key}: expected true or false, got {value!r}")
    return value



class InspectingHandler:
    """A base for a protocol handler whose connector side inspects the handshake, then splices.

    A subclass sets ``name`` and implements ``inspector(app)`` (a new inspector for one
    connection; GatewayError naming the option when the app's options are wrong) and
    ``facts(inspector)`` (the session's facts as a dict). It still needs a ``service_factory``:
    the gateway_tcp.TCPHandler one serves any byte stream.
    """

    name: str = ""

    def inspector(self, app: Any) -> Any:
        raise NotImplementedError

    def facts(self, inspector: Any) -> dict[str, Any]:
        raise NotImplementedError

    def connector_stream(self, stream: Any, app: Any, reactor: Any) -> None:
        dial_inspect_and_splice(stream, app, reactor, self.inspector(app), self.facts)

    def check_connector_app(self, app: Any) -> str | None:
        try:
            self.inspector(app)
        except GatewayError as e:
            return str(e)
        return None

    def check_apps(self, apps: Any, *more: Callable[[Any], Any]) -> None:
        """Raise GatewayError for the first app of this protocol whose options are wrong, by
        ``inspector(app)`` and each of ``more(app)`` (for a gateway_service_listeners check, so a
        bad option stops the service, and `gateway check-config`, before anything binds)."""
        for app in apps:
            if app.protocol == self.name:
                self.inspector(app)
                for check in more:
                    check(app)
