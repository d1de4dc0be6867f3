"""The connector: keeps N outbound tunnels up and serves the streams the service opens on them."""

from __future__ import annotations

import itertools
import os
import random
from typing import Any

from attrs import define
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import LoopingCall
from prometheus_client.core import GaugeMetricFamily
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import PROTOCOL_VERSION, __version__, plugins
from gateway.config import AppConfig, GatewayConfig
from gateway.connector import destinations
from gateway.connector.identity import ConnectorIdentity
from gateway.connector.proxy import choose_proxy
from gateway.connector.renewal import CertificateRenewer, IdentityEndpoint, clock_skew_warning
from gateway.connector.targets import BadNodeList, Target, parse_nodes, plan
from gateway.control import messages as m
from gateway.control.messages import ControlChannel
from gateway.segments import Where, parse_segments
from gateway.errors import ConfigError, GatewayError, describe_failure
from gateway.oplogs import session as sessionlog
from gateway.oplogs.forward import AdminEventForwarder
from gateway.metrics import result_of, role_metrics
from gateway.tunnel.frame import GoAwayCode, ResetCode
from gateway.tunnel.session import TunnelSession, TunnelSettings
from gateway.tunnel.splice import QuietFactory
from gateway.tunnel.stream import Stream

# A TLS handshake plus hello that takes longer than this is abandoned and retried.
PREPARE_TIMEOUT = 30.0


class TunnelRefused(GatewayError):
    """The service refused this tunnel (version, revoked certificate, ...)."""


def _segments(app: dict[str, Any], index: int) -> tuple:
    """A private app's segments from the config message (none for other apps); ConfigError if malformed."""
    if "segments" not in app:
        return ()
    return parse_segments(app["segments"], Where("the service's config message", f"apps[{index}].segments"))


def _reaches(app: AppConfig) -> str:
    return "; ".join(str(s) for s in app.segments) if app.is_private else app.destination


def jittered_backoff(initial: float, maximum: float) -> Any:
    """Exponential backoff with 'full jitter': a random delay up to the exponential bound.

    After a node restart every connector's first attempt lands anywhere in [0, initial), not
    in one burst; those the node sheds (max_handshakes) retry over a window twice as long.
    """

    def policy(attempt: int) -> float:
        return random.uniform(0, min(initial * 2 ** min(attempt, 30), maximum))

    return policy


@define(eq=False)
class Slot:
    """One ClientService keeping one tunnel to ``target`` up, and the session it has now."""

    target: Target
    client: ClientService | None = None
    session: TunnelSession | None = None
    retired: bool = False
    # Tunnels in a row that connected but never got the welcome (a wrong CA, a refusal): the
    # backoff counts them, since ClientService sees each as a connection made.
    handshake_failures: int = 0


class ConnectorNode(MultiService):
    log = Logger()

    def __init__(
        self, config: GatewayConfig, reactor: Any, pm: Any, handlers: dict[str, Any], identity: ConnectorIdentity,
        metrics: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        # gateway.metrics.Metrics with [metrics] enabled, else None; connector_metrics does nothing then.
        self.metrics = metrics
        self.connector_metrics = role_metrics(metrics, "connector")
        self.pm = pm
        self.handlers = handlers
        self.identity = identity
        # SSO providers plugins register, handed to the protocol handlers that use them.
        self.sso_providers = plugins.sso_providers(pm)
        for handler in handlers.values():
            if hasattr(handler, "use_sso_providers"):
                handler.use_sso_providers(self.sso_providers)
        for provider in self.sso_providers.values():
            if hasattr(provider, "start"):   # optional: a provider configures itself from its own table
                provider.start(config, reactor)
        self.settings = TunnelSettings.from_config(config.tunnel)
        self.apps: dict[str, AppConfig] = {}
        self.config_version: str | None = None
        self.tunnels: dict[str, TunnelClient] = {}
        self.draining = False   # stopService began: every tunnel says GO_AWAY
        # type -> handler(tunnel_client, message) for control messages beyond welcome/config/error
        self.control_handlers: dict[str, Any] = {}
        self._tunnel_ids = itertools.count(1)
        self._slot_ids = itertools.count(1)
        # Where tunnels go (gateway.connector.targets): the service's node list from the config,
        # the bootstrap address(es) from the registration, and a Slot per tunnel kept up.
        self.nodes: tuple[Target, ...] = ()
        self.bootstrap: list[Target] = []
        self.slots: dict[Target, list[Slot]] = {}
        self._endpoint: IdentityEndpoint | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.ctx = {"connector_id": identity.connector_id}
        # This connector's admin events, sent to the service over a live tunnel (rate-bounded);
        # gateway.tap makes it a listener of the admin log.
        self.admin_forwarder = AdminEventForwarder(reactor, self._send_control)
        # Chosen at start (gateway.tap checked it already: an unusable HTTPS_PROXY or password file).
        self.proxy: Any = None
        self.renewer = CertificateRenewer(self, reactor)
        self.renewer.setServiceParent(self)
        self.control_handlers[m.RENEW_RESULT] = self.renewer.on_result
        self.control_handlers[m.ERROR] = self.renewer.on_error

    # -- start and stop ------------------------------------------------------------------

    def startService(self) -> None:
        ident = self.identity
        self.proxy = choose_proxy(self.config.connector.proxy, self.config.connector.proxy_password_file,
                                  ident.service_host, ident.service_port)
        # Built from the current identity at each connect: new tunnels get a renewed certificate.
        self._endpoint = IdentityEndpoint(self, self.reactor, proxy=self.proxy)
        if self.metrics is not None:
            self.metrics.collect(self._state_metrics, "the connector")
        super().startService()
        self.log.info(
            "connector {connector_id} ({name}, group {group}) keeping {n} tunnels to {host}:{port}",
            event="connector_started", name=ident.name, group=ident.group, n=self.config.connector.tunnels,
            host=ident.service_host, port=ident.service_port, **self.ctx,
        )
        if self.proxy is not None:
            self.log.info("reaching the service through the proxy at {proxy} ({source})",
                          proxy=self.proxy.address, source=self.proxy.source, **self.ctx)
        self._resolve_bootstrap().addCallback(lambda _: self.reconcile())

    def stopService(self) -> Deferred:
        """Drain: GO_AWAY on every tunnel, let open streams finish (bounded), then disconnect."""
        self.draining = True
        live = [t.session for t in self.tunnels.values() if t.session.connected]
        for session in live:
            session.go_away(GoAwayCode.NORMAL, "connector is shutting down")
        open_streams = sum(s.open_streams for s in live)
        self.log.info(
            "connector {connector_id} draining {n} open streams (up to {timeout}s)",
            event="drain", n=open_streams, timeout=self.config.connector.drain_timeout, **self.ctx,
        )
        drained = gatherResults([s.wait_idle() for s in live])
        timeout = self.reactor.callLater(self.config.connector.drain_timeout, drained.cancel)

        def stop(result: Any) -> Deferred:
            if timeout.active():
                timeout.cancel()
            left = sum(s.open_streams for s in live if s.connected)
            if left:
                self.log.warn("drain deadline passed; closing {n} streams", n=left, **self.ctx)
            for session in live:
                # ClientService closes the connection itself; TLS only closes once the
                # session no longer is its producer.
                if session.connected:
                    session.transport.unregisterProducer()
            return maybeDeferred(super(ConnectorNode, self).stopService)

        return drained.addBoth(stop)

    # -- where tunnels go -----------------------------------------------------------------

    def _resolve_bootstrap(self) -> Deferred:
        """The service address's addresses, one bootstrap target each (DNS round robin spreads
        tunnels over them); the name itself when it does not resolve now (each dial tries again)
        or when a proxy resolves it."""
        host, port = self.identity.service_host, self.identity.service_port
        self.bootstrap = [Target(host, port)]
        if self.proxy is not None:
            return succeed(None)

        def resolved(addresses: list[str]) -> None:
            unique = list(dict.fromkeys(addresses))
            if unique:
                self.bootstrap = [Target(a, port) for a in unique]
            if len(unique) > 1:
                self.log.info("the service address {host} resolves to {addresses}: tunnels spread over them",
                              host=host, addresses=", ".join(unique), **self.ctx)

        def failed(failure: Failure) -> None:
            self.log.warn("could not resolve the service address {host} now ({reason}); dialling the name",
                          host=host, reason=failure.getErrorMessage(), **self.ctx)

        return destinations.resolve(self.reactor.nameResolver, host, "tcp").addCallbacks(resolved, failed)

    def _take_nodes(self, value: Any) -> None:
        """The service's node list from a config message (absent: a service that sends none)."""
        if value is None:
            return
        try:
            nodes = parse_nodes(value)
        except BadNodeList as e:
            self.log.error("ignoring the node list in the service's config: {error}; keeping {n} nodes",
                           error=str(e), n=len(self.nodes), **self.ctx)
            return
        if nodes != self.nodes:
            self.nodes = nodes
            self.log.info("the service has {n} nodes: {nodes}", event="service_nodes", n=len(nodes),
                          nodes=", ".join(f"{t.node_id} at {t.address}" for t in nodes) or "none", **self.ctx)
            self.reconcile()

    def reconcile(self) -> None:
        """Add and retire slots until every target has the tunnels the plan gives it (not while
        the connector drains: it dials nothing new then)."""
        if not self.running or self.draining or self._endpoint is None or not self.bootstrap:
            return
        connector = self.config.connector
        wanted = plan(connector.tunnels, connector.max_nodes, self.nodes + self._unlisted_but_up(),
                      self.bootstrap, self.identity.connector_id)
        for target in wanted:
            if target in self.slots:   # the same address, maybe now known by its node id
                self.slots[target] = self.slots.pop(target)
                for slot in self.slots[target]:
                    slot.target = target
        changed = False
        for target in set(self.slots) | set(wanted):
            live = [s for s in self.slots.get(target, []) if not s.retired]
            for _ in range(wanted.get(target, 0) - len(live)):
                self._add_slot(target)
                changed = True
            for slot in live[wanted.get(target, 0):]:
                self._retire(slot)
                changed = True
        if changed:
            self.log.info("keeping tunnels to {targets}", event="tunnel_targets", targets=", ".join(
                f"{n} to {t.node_id or 'the service address'} {t.address}" for t, n in sorted(
                    wanted.items(), key=lambda item: (item[0].node_id, item[0].address))), **self.ctx)

    def _unlisted_but_up(self) -> tuple[Target, ...]:
        """Nodes missing from the list that hold a tunnel of ours up: nodes read the list at their
        own heartbeats, so one may not list a node that just joined; a node that stopped or died
        has lost its tunnels. Kept until then, so the lists' small disagreements cut nothing."""
        return tuple(t for t, slots in self.slots.items() if t.node_id and t not in self.nodes and any(
            s.session is not None and s.session.tunnel_id in self.tunnels for s in slots if not s.retired))

    def _add_slot(self, target: Target) -> None:
        connector = self.config.connector
        slot = Slot(target)
        backoff = jittered_backoff(connector.backoff_initial, connector.backoff_max)
        # No prepareConnection (wait for the welcome): a connection lost while it runs makes
        # ClientService raise NoTransition (its Connecting and Waiting states have no transition
        # for a disconnect), a traceback in the log for every refused handshake. The welcome is
        # waited for here instead, and failed handshakes count in the retry delay.
        slot.client = ClientService(
            self._endpoint.to(target),
            QuietFactory.forProtocol(lambda: self._build_session(slot)),
            retryPolicy=lambda attempt: backoff(attempt - 1 + slot.handshake_failures),
            clock=self.reactor,
        )
        self.slots.setdefault(target, []).append(slot)
        slot.client.setName(f"tunnel-{target.address}-{next(self._slot_ids)}")
        slot.client.setServiceParent(self)

    def _retire(self, slot: Slot) -> None:
        """Stop a slot's redialling; a tunnel it has up drains first (GO_AWAY, open streams finish,
        at most drain_timeout), so dropping a node from the list cuts no stream."""
        slot.retired = True
        session = slot.session

        def remove(_: Any = None) -> None:
            if slot in self.slots.get(slot.target, []):
                self.slots[slot.target].remove(slot)
                if not self.slots[slot.target]:
                    del self.slots[slot.target]
            if slot.client is not None and slot.client.parent is self:
                slot.client.disownServiceParent()

        if session is None or not session.connected or session.tunnel_id not in self.tunnels:
            remove()
            return
        session.go_away(GoAwayCode.NORMAL, f"the connector no longer keeps a tunnel to {slot.target.address}")
        idle = session.wait_idle()
        timeout = self.reactor.callLater(self.config.connector.drain_timeout, idle.cancel)
        idle.addBoth(lambda _: timeout.cancel() if timeout.active() else None).addBoth(remove)

    # -- tunnels -------------------------------------------------------------------------

    def _build_session(self, slot: Slot) -> TunnelSession:
        tunnel_id = f"{self.identity.connector_id[:8]}/t{next(self._tunnel_ids)}"
        session = TunnelSession(self.reactor, self.settings, is_client=True, on_stream=self.dispatch,
                                tunnel_id=tunnel_id)
        slot.session = session
        session.log_context.update(self.ctx)
        session.on_stream_closed = self.stream_closed
        client = TunnelClient(self, session)
        client.ready.addCallbacks(lambda _: setattr(slot, "handshake_failures", 0),
                                  lambda _: setattr(slot, "handshake_failures", slot.handshake_failures + 1))
        return session

    def tunnel_up(self, client: TunnelClient) -> None:
        if self.draining:
            # Dialled before the drain began (or redialled during it): it must take no stream,
            # since the process ends with the drain. A SYN the node sent before this GO_AWAY
            # reaches it is refused GOING_AWAY, and the node opens that stream elsewhere.
            client.session.go_away(GoAwayCode.NORMAL, "connector is shutting down")
        self.tunnels[client.session.tunnel_id] = client
        plugins.notify(self.pm, "gateway_connector_up", connector=client)
        self.admin_forwarder.flush()

    def _send_control(self, message: dict[str, Any]) -> bool:
        """Put a control message on one live tunnel; False if none is up."""
        for client in self.tunnels.values():
            if client.control is not None and client.session.connected:
                client.control.send(message)
                return True
        return False

    def tunnel_lost(self, client: TunnelClient, reason: str) -> None:
        if self.tunnels.pop(client.session.tunnel_id, None) is not None:
            plugins.notify(self.pm, "gateway_connector_lost", connector=client, reason=reason)
            if self.running:
                self.reconcile()   # a node kept only for its tunnel (_unlisted_but_up) is let go now

    # -- config --------------------------------------------------------------------------

    def apply_config(self, message: dict[str, Any]) -> None:
        self._switch_session_log(message.get("session_log"))
        self._take_nodes(message.get("nodes"))
        version = message.get("version")
        if version == self.config_version:
            return
        try:
            apps = {
                a["name"]: AppConfig(
                    name=a["name"], listen="", destination=a["destination"], host=a["host"], port=int(a["port"]),
                    group=message.get("group", self.identity.group), protocol=a["protocol"],
                    connect_timeout=float(a.get("connect_timeout", 10)), options=dict(a.get("options") or {}),
                    internal_url=a.get("internal_url", ""),
                    segments=_segments(a, i),
                )
                for i, a in enumerate(message["apps"])
            }
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            self.log.error("ignoring malformed config {version} from the service: {error}; keeping {current}",
                           version=version, error=str(e) if isinstance(e, ConfigError) else repr(e),
                           current=self.config_version, **self.ctx)
            return
        for app in apps.values():
            if any(s.protocol == "udp" for s in app.segments) and "udp" not in self.handlers:
                self.log.warn("app {app} has udp segments, but no plugin here provides the udp handler",
                              app=app.name, **self.ctx)
            handler = self.handlers.get(app.protocol)
            if handler is None:
                self.log.warn("app {app} uses protocol {protocol}, which no plugin here provides",
                              app=app.name, protocol=app.protocol, **self.ctx)
            elif hasattr(handler, "check_connector_app"):
                problem = handler.check_connector_app(app)
                if problem:
                    self.log.error("config error: {problem}", problem=problem, **self.ctx)
        self.apps = apps
        self.config_version = version
        self.log.info("config {version}: apps {apps}", event="config_applied", version=version,
                      apps=", ".join(f"{a.name}→{_reaches(a)}" for a in apps.values()) or "none", **self.ctx)

    def _switch_session_log(self, on: Any) -> None:
        """The session log switch the service sent with the config (gateway logs session)."""
        log = sessionlog.current
        if not isinstance(on, bool) or log is None:
            return
        if log.switch(sessionlog.CONNECTOR, on):
            self.log.info("session log switched {state} by the service", state="on" if on else "off",
                          event="session_log_switched", **self.ctx)

    # -- streams -------------------------------------------------------------------------

    def dispatch(self, stream: Stream) -> None:
        meta = stream.metadata
        stream.opened_at = self.reactor.seconds()
        ctx = {**stream.session.log_context, "stream_id": stream.id, "app": meta.get("app"),
               "request_id": meta.get("request_id")}
        if meta.get("kind") != "app":
            stream.reset(ResetCode.REFUSED, f"connectors accept only app streams, not {meta.get('kind')!r}")
            return
        app = self.apps.get(meta.get("app"))
        if app is None:
            reason = (f"connector {self.identity.connector_id} has no app {meta.get('app')!r}"
                      f" in its configuration (version {self.config_version})")
            self.log.warn("stream {stream_id} refused: {reason}", reason=reason, **ctx)
            stream.reset(ResetCode.UNKNOWN_APP, reason)
            return
        if app.is_private:
            self._dispatch_private(stream, app, ctx)
            return
        if meta.get("destination") != app.destination:
            reason = (f"destination {meta.get('destination')!r} is not the destination of app {app.name!r};"
                      " a connector dials only the destinations its apps name")
            self.log.warn("stream {stream_id} refused: {reason}", reason=reason, **ctx)
            stream.reset(ResetCode.REFUSED, reason)
            return
        self._hand_over(stream, app, app.protocol, ctx)

    def _hand_over(self, stream: Stream, app: AppConfig, protocol: str, ctx: dict[str, Any]) -> None:
        """Give the stream to the plugin handling ``protocol``, which dials app.host:app.port."""
        handler = self.handlers.get(protocol)
        if handler is None:
            stream.reset(ResetCode.UNKNOWN_PROTOCOL, f"no plugin on this connector handles protocol {protocol!r}")
            return
        stream.metrics_series = self.connector_metrics.opened(app.name, app.group, protocol)
        try:
            handler.connector_stream(stream, app, self.reactor)
        except Exception as e:
            self.log.failure("stream {stream_id}: the {protocol} plugin failed", protocol=protocol, **ctx)
            stream.reset(ResetCode.INTERNAL_ERROR, f"the {protocol} plugin failed on the connector: {e!r}")
            return
        self.log.debug("stream {stream_id} for app {app} → {destination}", destination=app.destination, **ctx)

    def _dispatch_private(self, stream: Stream, app: AppConfig, ctx: dict[str, Any]) -> None:
        """A private app's stream: the destination checked against the app's segments as asked,
        then resolved here and checked again by the address that will be dialled (the service
        may have been fooled; this check does not depend on it)."""
        meta = stream.metadata
        transport = meta.get("transport", "tcp")
        asked = meta.get("destination")
        ctx = {**ctx, "user": meta.get("user")}
        try:
            host, port, _ = destinations.requested(app, asked, transport)
        except destinations.DestinationRefused as e:
            self._refuse_destination(stream, str(e), ctx)
            return
        d = destinations.resolve(self.reactor.nameResolver, host, transport)

        def resolved(addresses: list[str]) -> None:
            if stream.closed:
                return
            try:
                address, _ = destinations.choose_address(app, host, addresses, port, transport)
            except destinations.DestinationRefused as e:
                self._refuse_destination(stream, str(e), ctx)
                return
            except destinations.NoAddress as e:
                self.log.warn("stream {stream_id} failed: {reason}", reason=str(e), **ctx)
                stream.reset(ResetCode.CONNECT_FAILED, str(e))
                return
            self._hand_over(stream, destinations.dial_target(app, address, port),
                            "udp" if transport == "udp" else app.protocol, ctx)

        def failed(failure: Failure) -> None:
            reason = f"the connector could not resolve {host}: {failure.getErrorMessage()}"
            self.log.warn("stream {stream_id} failed: {reason}", reason=reason, **ctx)
            if not stream.closed:
                stream.reset(ResetCode.CONNECT_FAILED, reason)

        d.addCallbacks(resolved, failed)

    def _refuse_destination(self, stream: Stream, reason: str, ctx: dict[str, Any]) -> None:
        self.log.warn("stream {stream_id} for app {app} (user {user}, request {request_id}) refused: {reason}",
                      reason=reason, event="destination_refused", **ctx)
        stream.reset(ResetCode.DESTINATION_REFUSED, reason)

    def stream_closed(self, stream: Stream, reason: Failure) -> None:
        """Count a stream's end; one refused before a plugin had it counts as not opened, and why."""
        session_log = sessionlog.current
        if session_log is not None and session_log.on[sessionlog.CONNECTOR]:
            self._session_record(session_log, stream, reason)
        series = getattr(stream, "metrics_series", None)
        if series is not None:
            series.closed(result_of(reason), stream.bytes_in, stream.bytes_out)
            return
        meta = stream.metadata
        if meta.get("kind") == "app":
            # Labels from our own config only: an app name the service sent that we do not know is "".
            app = self.apps.get(meta.get("app"))
            self.connector_metrics.refused(app.name if app else "", app.group if app else self.identity.group,
                                           app.protocol if app else "", result_of(reason))

    def _session_record(self, session_log: Any, stream: Stream, reason: Failure) -> None:
        meta = stream.metadata
        if meta.get("kind") != "app":
            return
        opened = getattr(stream, "opened_at", None)
        session_log.write(sessionlog.CONNECTOR, {
            "type": "stream", "request_id": meta.get("request_id"), "app": meta.get("app"),
            "protocol": meta.get("protocol"), "user": meta.get("user"), "client": meta.get("client"),
            "connector_id": self.identity.connector_id, "tunnel_id": stream.session.tunnel_id,
            "transport": meta.get("transport", "tcp"), "destination": meta.get("destination"),
            "segment": meta.get("segment", ""), "bytes_up": stream.bytes_in, "bytes_down": stream.bytes_out,
            "duration": round(self.reactor.seconds() - opened, 3) if opened is not None else None,
            "result": "done" if reason is None or reason.check(ConnectionDone) else describe_failure(reason),
        })

    def _state_metrics(self) -> list:
        """Tunnels up and the config version, read at each scrape."""
        group = next(iter(self.apps.values())).group if self.apps else self.identity.group
        version = GaugeMetricFamily("gateway_connector_config_info", "Always 1: the config version this connector"
                                    " runs (from the service's config push).", labels=("group", "version"))
        if self.config_version is not None:
            version.add_metric((group, self.config_version), 1)
        return [GaugeMetricFamily("gateway_connector_tunnels", "Tunnels to the service up (hello done).",
                                  value=len(self.tunnels)), version]

    def pull_config(self) -> None:
        """Ask the service for the current config now (SIGHUP on a connector)."""
        for client in self.tunnels.values():
            client.pull_config()
            return

    def load(self) -> dict[str, Any]:
        sessions = [t.session for t in self.tunnels.values()]
        times = os.times()
        return {
            "open_streams": sum(s.open_streams for s in sessions),
            "tunnels": len(sessions),
            "bytes_in": sum(s.bytes_in for s in sessions),
            "bytes_out": sum(s.bytes_out for s in sessions),
            "cpu_seconds": round(times.user + times.system, 3),
            "capacity": 1.0,
        }


class TunnelClient:
    """The connector's end of one tunnel: hello, config, heartbeats."""

    log = Logger()

    def __init__(self, node: ConnectorNode, session: TunnelSession) -> None:
        self.node = node
        self.session = session
        self.ready: Deferred = Deferred()
        self.control: ControlChannel | None = None
        self.welcome: dict[str, Any] = {}
        self._timers: list[LoopingCall] = []
        session.owner = self
        session.on_handshake = self._handshake_done
        session.on_lost.append(self._lost)
        session.on_go_away.append(self._service_going_away)
        self._deadline = node.reactor.callLater(PREPARE_TIMEOUT, self._too_slow)

    @property
    def connector_id(self) -> str:
        return self.node.identity.connector_id

    @property
    def tunnel_id(self) -> str:
        return self.session.tunnel_id

    def _handshake_done(self, session: TunnelSession) -> None:
        d = session.open_stream({"kind": "control"})
        d.addCallbacks(self._control_open, self._fail)

    def _control_open(self, stream: Stream) -> None:
        self.control = ControlChannel(self._message)
        stream.attach(self.control)
        self.control.send({
            "type": m.HELLO, "protocol_version": PROTOCOL_VERSION, "software_version": __version__,
            "connector_id": self.connector_id, "capabilities": list(m.CAPABILITIES),
            "hostname": os.uname().nodename,
        })

    def _message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == m.WELCOME:
            self._welcome(message)
        elif kind == m.CONFIG:
            self.node.apply_config(message)
        elif kind in self.node.control_handlers:
            self.node.control_handlers[kind](self, message)
        elif kind == m.ERROR:
            self._fail(Failure(TunnelRefused(f"the service refused the tunnel: {message.get('message')}")))
        else:
            self.log.warn("tunnel {tunnel_id}: ignoring control message {kind!r}", kind=kind,
                          **self.session.log_context)

    def _welcome(self, message: dict[str, Any]) -> None:
        self.welcome = message
        if self._deadline.active():
            self._deadline.cancel()
        self._every(float(message.get("heartbeat_interval", 15)), self._heartbeat)
        self._every(float(message.get("config_interval", 300)), self.pull_config)
        self.log.info("tunnel {tunnel_id} up to node {node_id}", event="tunnel_up", node_id=message.get("node_id"),
                      **self.session.log_context)
        skew = clock_skew_warning(message.get("time"), self.node.reactor.seconds())
        if skew is not None:
            self.log.warn("tunnel {tunnel_id}: {warning}", warning=skew, event="clock_skew",
                          **self.session.log_context)
        self.node.connector_metrics.handshake("ok")
        self.node.tunnel_up(self)
        if not self.ready.called:
            self.ready.callback(self.session)

    def _every(self, interval: float, f: Any) -> None:
        call = LoopingCall(f)
        call.clock = self.node.reactor
        call.start(interval, now=False)
        self._timers.append(call)

    def _service_going_away(self, session: TunnelSession, code: int, message: str) -> None:
        # The node drains (restart, stream ids used up): finish what is open, then close, so
        # ClientService dials a fresh tunnel instead of keeping one that takes no new streams.
        session.wait_idle().addCallback(lambda _: session.close())

    def _heartbeat(self) -> None:
        if self.control is not None:
            self.control.send({"type": m.HEARTBEAT, **self.node.load()})

    def report_session_facts(self, stream: Stream, facts: dict[str, Any]) -> None:
        """What a protocol plugin read of a stream's session (SMB dialect, RDP protocol...), sent
        to the service before the stream ends so its session record carries them."""
        if self.control is not None:
            self.control.send({"type": m.SESSION_FACTS, "stream_id": stream.id, "facts": facts})

    def pull_config(self) -> None:
        if self.control is not None:
            self.control.send({"type": m.CONFIG_REQUEST, "have_version": self.node.config_version})

    def _too_slow(self) -> None:
        self._fail(Failure(TunnelRefused(f"no TLS handshake and welcome within {PREPARE_TIMEOUT:.0f}s")))

    def _fail(self, failure: Failure) -> None:
        if not self.ready.called:
            self.log.error("tunnel {tunnel_id} to the service failed: {reason}",
                           reason=describe_failure(failure), **self.session.log_context)
            self.node.connector_metrics.handshake("refused" if failure.check(TunnelRefused) else "failed")
            self.ready.errback(failure)
        if self.session.connected:
            self.session.transport.abortConnection()

    def _lost(self, session: TunnelSession, reason: Failure) -> None:
        if self._deadline.active():
            self._deadline.cancel()
        for call in self._timers:
            if call.running:
                call.stop()
        why = describe_failure(reason)
        if session.go_away_reason is not None and session.go_away_reason[0] != GoAwayCode.NORMAL:
            why = f"the service closed the tunnel: {session.go_away_reason[1]}"
        if not self.ready.called:
            if session.go_away_reason is not None and session.go_away_reason[0] == GoAwayCode.NORMAL:
                # The node stops (or drains) while this tunnel was being set up: not a failure.
                self.log.info("tunnel {tunnel_id} ended before the welcome: {reason}; dialling again",
                              reason=session.go_away_reason[1], **self.session.log_context)
            else:
                self.log.error("tunnel {tunnel_id} to the service failed: {reason}", reason=why,
                               **self.session.log_context)
            self.node.connector_metrics.handshake("refused" if session.go_away_reason is not None else "failed")
            self.ready.errback(Failure(TunnelRefused(why)))
        else:
            self.log.warn("tunnel {tunnel_id} lost: {reason}", event="tunnel_lost", reason=why,
                          **self.session.log_context)
            self.node.tunnel_lost(self, why)
