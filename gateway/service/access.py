"""The service end of a Private Access user's tunnel: every stream checked, then relayed.

A user's client (``gateway access``) holds one TLS tunnel with its user certificate and opens
a stream per local connection or UDP flow, naming the host, port and transport it wants (and
maybe the app). :func:`authorize` decides against the user's assignments and the private
apps' segments before anything reaches a connector; an allowed stream is opened to a connector
of the app's group and relayed, and ACKed to the user only once the connector accepted it, so
every refusal (here, on the connector, or from the back end) reaches the user's program with
its reason. Every ``service.config_interval`` the tunnel's credential and each stream's
assignment are checked again; what no longer holds is cut (docs/protocol.md, *Private Access*).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Iterable

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.assignment import is_assigned
from gateway.errors import GatewayError, describe_failure
from gateway.segments import DestinationError, HostName, Network, Segment, host_port, match_destination
from gateway.service.registry import NoConnector
from gateway.tunnel.frame import GoAwayCode, ResetCode
from gateway.tunnel.splice import splice_streams
from gateway.tunnel.stream import Stream, StreamReset

TRANSPORTS = ("tcp", "udp")


class AccessRefused(GatewayError):
    """Why a user's stream is refused: a reset code and a sentence for the user."""

    def __init__(self, code: ResetCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@frozen
class Grant:
    """What an allowed stream reaches: the app, the segment that allows it and the destination."""

    app: Any
    segment: Segment
    host: str
    port: int
    transport: str

    @property
    def destination(self) -> str:
        return host_port(self.host, self.port)


def user_name(identity: dict[str, Any]) -> str:
    return str(identity.get("email") or identity.get("name") or identity.get("sub"))


def assigned(app: Any, identity: dict[str, Any]) -> bool:
    return is_assigned(app, str(identity.get("sub", "")), str(identity.get("email") or ""),
                       identity.get("email_verified") is True, [str(g) for g in identity.get("groups") or ()])


def single_destination(app: Any, transport: str) -> tuple[str, int] | None:
    """The one host and port an app names for ``transport``, if it names exactly one."""
    found = []
    for segment in app.segments:
        if segment.protocol != transport:
            continue
        destination = segment.destination
        single_host = isinstance(destination, HostName) or (
            isinstance(destination, Network) and destination.network.prefixlen == destination.network.max_prefixlen)
        if not single_host or len(segment.ports) != 1 or segment.ports[0].first != segment.ports[0].last:
            return None
        found.append((str(destination), segment.ports[0].first))
    return found[0] if len(set(found)) == 1 else None


def authorize(apps: Iterable[Any], identity: dict[str, Any], host: str | None, port: int | None,
              transport: str, app_name: str | None = None) -> Grant:
    """Which private app and segment let this user reach ``host:port`` over ``transport``.

    Raises AccessRefused: NO_SEGMENT when no segment (of the named app, or of any app) covers
    the destination, NOT_ASSIGNED when only apps the user is not assigned to do. A name is
    matched as a name (never resolved here: the connector resolves it, then checks again).
    """
    if transport not in TRANSPORTS:
        raise AccessRefused(ResetCode.REFUSED, f"transport must be tcp or udp, got {transport!r}")
    private = sorted((a for a in apps if a.is_private), key=lambda a: a.name)
    if app_name is not None:
        named = [a for a in private if a.name == app_name]
        if not named:
            raise AccessRefused(ResetCode.NO_SEGMENT, f"there is no private app named {app_name!r}")
        private = named
        app = named[0]
        if host is None:
            only = single_destination(app, transport)
            if only is None:
                raise AccessRefused(ResetCode.NO_SEGMENT,
                                    f"app {app.name} has several {transport} destinations: say which with --to HOST:PORT")
            host, port = only
    if host is None or port is None:
        raise AccessRefused(ResetCode.REFUSED, "an access stream needs a host and a port (or an app with one destination)")
    where = f"{host_port(host, port)}/{transport}"
    refused_by: list[str] = []
    for app in private:
        try:
            segment = match_destination(app.segments, host, port, transport)
        except DestinationError as e:
            raise AccessRefused(ResetCode.NO_SEGMENT, f"{where}: {e}") from None
        if segment is None:
            continue
        if assigned(app, identity):
            return Grant(app, segment, host, port, transport)
        refused_by.append(app.name)
    if refused_by:
        raise AccessRefused(ResetCode.NOT_ASSIGNED,
                            f"{user_name(identity)} is not assigned to app {refused_by[0]}, which covers {where};"
                            " ask your administrator to assign you")
    if app_name is not None:
        raise AccessRefused(ResetCode.NO_SEGMENT, f"no segment of app {app_name} covers {where}")
    raise AccessRefused(ResetCode.NO_SEGMENT, f"no app segment covers {where}")


def _metadata_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


@frozen
class _Flow:
    """One relayed user stream: what it was allowed by, for the periodic re-check."""

    user_stream: Stream
    app_stream: Stream
    grant: Grant


class AccessTunnel:
    """One user's tunnel on the service, after its certificate's credential was found valid."""

    log = Logger()

    def __init__(self, node: Any, handler: Any, record: Any) -> None:
        self.node = node
        self.handler = handler
        self.session = handler.session
        self.record = record
        self.identity: dict[str, Any] = dict(record.identity)
        self.flows: dict[int, _Flow] = {}
        self.ctx = {**handler.ctx, "user": record.user, "credential_id": record.credential_id}

    # -- streams -------------------------------------------------------------------------

    def on_stream(self, stream: Stream) -> None:
        meta = stream.metadata
        if meta.get("kind") != "access":
            stream.reset(ResetCode.REFUSED, f"a user tunnel carries access streams, not {meta.get('kind')!r}")
            return
        host = meta.get("host")
        app_name = meta.get("app")
        try:
            if (host is not None and not isinstance(host, str)) or (app_name is not None and not isinstance(app_name, str)):
                raise AccessRefused(ResetCode.REFUSED, "host and app must be strings")
            grant = authorize(self.node.apps.values(), self.identity, host, _metadata_int(meta.get("port")),
                              str(meta.get("transport", "tcp")), app_name)
        except AccessRefused as e:
            self.log.info("user {user}: stream {stream_id} refused: {reason}", stream_id=stream.id, reason=str(e),
                          event="access_refused", **self.ctx)
            stream.reset(e.code, str(e))
            return
        extra = {
            "user": self.record.user, "identity": self.identity, "client": f"access:{self.record.credential_id}",
            "transport": grant.transport, "segment": str(grant.segment), "destination": grant.destination,
        }
        if grant.transport == "udp":
            extra["protocol"] = "udp"
        d = self.node.open_app_stream(grant.app, extra)

        def no_connector_yet(failure: Failure) -> Any:
            # Right after a node restart the user's client is often back before the connectors
            # are: wait for one (up to the app's connect_timeout), then try once more.
            failure.trap(NoConnector)
            waited = self.node.connector_up(grant.app.group, grant.app.connect_timeout)
            return waited.addCallback(lambda _: self.node.open_app_stream(grant.app, extra))

        d.addErrback(no_connector_yet)
        d.addCallbacks(lambda app_stream: self._opened(stream, app_stream, grant),
                       lambda failure: self._failed(stream, grant, failure))

    def _opened(self, user_stream: Stream, app_stream: Stream, grant: Grant) -> None:
        if user_stream.closed or not self.session.connected:
            app_stream.reset(ResetCode.CANCELLED, "the user's stream ended before the connector accepted it")
            return
        user_stream.accept()
        self.flows[user_stream.id] = _Flow(user_stream, app_stream, grant)
        splice_streams(user_stream, app_stream, on_closed=lambda: self.flows.pop(user_stream.id, None))
        self.log.info("user {user} reaches {destination} ({transport}) through app {app} on connector {connector_id}",
                      destination=grant.destination, transport=grant.transport, app=grant.app.name,
                      connector_id=app_stream.log_info.connector_id if getattr(app_stream, "log_info", None) else "?",
                      event="access_opened", **self.ctx)

    def _failed(self, user_stream: Stream, grant: Grant, failure: Failure) -> None:
        if failure.check(NoConnector):
            code, reason = ResetCode.NO_CONNECTOR, (f"no healthy connector in group {grant.app.group} for app"
                                                    f" {grant.app.name}; try again later or tell your administrator")
        elif failure.check(StreamReset):
            code, reason = failure.value.code, failure.value.reason
        else:
            code, reason = ResetCode.CONNECT_FAILED, describe_failure(failure)
        user_stream.reset(code, reason)

    # -- re-authorization ------------------------------------------------------------------

    def recheck(self) -> Deferred:
        """The credential still valid, and every stream still allowed? Cut what is not."""
        d = self.node.store.get_user_credential(self.record.credential_id)
        return d.addCallback(self._rechecked)

    def _rechecked(self, record: Any) -> None:
        if not self.session.connected:
            return
        problem = credential_problem(record, datetime.now(UTC))
        if problem is not None:
            self.log.info("user {user}: closing the tunnel and {n} streams: {problem}", n=len(self.flows),
                          problem=problem, event="access_revoked", **self.ctx)
            for flow in list(self.flows.values()):
                flow.user_stream.reset(ResetCode.REVOKED, problem)
                flow.app_stream.reset(ResetCode.REVOKED, problem)
            self.handler.refuse(GoAwayCode.NOT_AUTHORIZED, problem)
            return
        self.record = record
        self.identity = dict(record.identity)
        self.recheck_flows()

    def recheck_flows(self) -> None:
        """Cut the streams the current apps no longer allow (also right after a config change)."""
        for flow in list(self.flows.values()):
            why = self.still_allowed(flow.grant)
            if why is not None:
                self.log.info("user {user}: stream to {destination} cut: {why}", destination=flow.grant.destination,
                              why=why, event="access_revoked", **self.ctx)
                flow.user_stream.reset(ResetCode.REVOKED, why)
                flow.app_stream.reset(ResetCode.REVOKED, why)

    def still_allowed(self, grant: Grant) -> str | None:
        app = self.node.apps.get(grant.app.name)
        if app is None or not app.is_private:
            return f"app {grant.app.name} is no longer published"
        if not assigned(app, self.identity):
            return f"{user_name(self.identity)} is no longer assigned to app {app.name}"
        try:
            if match_destination(app.segments, grant.host, grant.port, grant.transport) is None:
                return f"app {app.name} no longer covers {grant.destination}/{grant.transport}"
        except DestinationError as e:
            return str(e)
        if app.group != grant.app.group:
            return f"app {app.name} moved to group {app.group}"
        return None

    def lost(self) -> None:
        for flow in list(self.flows.values()):
            flow.app_stream.reset(ResetCode.CANCELLED, "the user's tunnel closed")
        self.flows.clear()


def credential_problem(record: Any, now: datetime) -> str | None:
    """Why a user credential no longer admits its tunnels, or None."""
    if record is None:
        return "your access credential no longer exists on the service: run gateway login"
    if record.revoked_at is not None:
        return "your access was revoked by an administrator: run gateway login to sign in again"
    if record.expires_at <= now:
        what = "personal token" if record.kind == "token" else "sign-in"
        return f"your {what} expired: run gateway login"
    return None


def check_credential(node: Any, credential_id: str) -> Deferred:
    """Fires with the record, or fails with AccessRefused saying why it admits nothing."""
    d = node.store.get_user_credential(credential_id)

    def checked(record: Any) -> Any:
        problem = credential_problem(record, datetime.now(UTC))
        if problem is not None:
            raise AccessRefused(ResetCode.REVOKED, problem)
        return record

    return d.addCallback(checked)


__all__ = ["AccessRefused", "AccessTunnel", "Grant", "authorize", "check_credential", "credential_problem",
           "single_destination"]
