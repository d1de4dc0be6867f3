"""A service node: the tunnel listener, the app listeners, enrolment and the router."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, FirstError, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.endpoints import serverFromString
from prometheus_client.core import GaugeMetricFamily
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import plugins
from gateway.config import AppConfig, GatewayConfig, ServiceConfig
from gateway.control import messages as m
from gateway.errors import EnrolmentError, GatewayError, StoreUnavailable, describe_failure
from gateway.metrics import result_of, role_metrics
from gateway.pki import keys
from gateway.pki.ca import CertificateAuthority
from gateway.pki.tls import server_options
from gateway.protocols import StreamInfo
from gateway.segments import segment_table
from gateway.oplogs import session as sessionlog
from gateway.service.admin_events import AdminEvent, AdminEvents, handle_admin_event
from gateway.service.admission import ThrottledLog
from gateway.service.lifecycle import StatusRecorder, Sweeper, SweeperService
from gateway.service.changes import EVERYTHING, ChangeFeed, StoreHealth
from gateway.service.listeners import SwappableFactory
from gateway.service.nodes import NodeRoster, claim_shared_ca
from gateway.service.registry import ConnectorWaitExpired, NoConnector, Registry
from gateway.service.renewal import handle_renew_request
from gateway.service.users import LoginPortal, UserAuthority
from gateway.service import store_apps
from gateway.service.tunnels import ServiceTunnelFactory, TunnelHandler, TunnelTLSFactory
from gateway.service.updates import UpdateDesk
from gateway.store.records import CertificateRecord, ConnectorRecord
from gateway.store.sqlite import SQLiteStore, SQLStore
from gateway.store.threaded import ThreadedStore
from gateway.tunnel.frame import GoAwayCode, ResetCode
from gateway.tunnel.session import TunnelClosed, TunnelSettings
from gateway.tunnel.stream import Stream, StreamReset

STORE_FILE = "gateway.db"
OPEN_GRACE = 5.0
NODE_CERT_FILE = "node.pem"
NODE_KEY_FILE = "node.key"

# After a connector of a group said GO_AWAY NORMAL (it drains: a restart, an update), a stream
# that finds no healthy connector in the group for this long waits for one to come back (up to
# the app's connect_timeout) instead of failing: the group of one being restarted.
RESTART_GRACE = 300.0

# Resets that prove the back end was never reached, so the stream can go to another connector.
_RETRYABLE = {
    ResetCode.GOING_AWAY, ResetCode.TOO_MANY_STREAMS, ResetCode.CONNECT_FAILED,
    ResetCode.UNKNOWN_APP, ResetCode.TIMEOUT,
}


def prepare_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)


def open_store(service: ServiceConfig) -> SQLStore:
    """The node's store, its schema migrated: the SQLite file in state_dir, or the PostgreSQL
    database that [service] store names."""
    if service.store:
        from gateway.store.postgresql import open_postgresql

        return open_postgresql(service.store, service.store_password_file)
    prepare_state_dir(service.state_dir)
    return SQLiteStore(service.state_dir / STORE_FILE)


DEFAULT_BACKLOG = 1024


def listen_endpoint(reactor: Any, description: str) -> Any:
    """A server endpoint; TCP listeners get a deeper accept queue than Twisted's 50 unless the
    admin set one, so a burst of connections is not dropped into SYN retries."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        description = f"{description}:backlog={DEFAULT_BACKLOG}"
    return serverFromString(reactor, description)


def affinity_key(app: AppConfig, extra: dict[str, Any]) -> str | None:
    """What keeps a stream on the same connector: the user, else the client's address."""
    if app.affinity == "none":
        return None
    user = extra.get("user")
    if app.affinity == "user" and user:
        return f"user:{user}"
    client = str(extra.get("client", ""))
    return f"client:{client.rsplit(':', 1)[0]}"


class ServiceNode(MultiService):
    log = Logger()
    change_feed: ChangeFeed | None = None   # PostgreSQL's LISTEN/NOTIFY; SQLite has none

    def __init__(self, config: GatewayConfig, reactor: Any, pm: Any, handlers: dict[str, Any],
                 metrics: Any = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.pm = pm
        self.handlers = handlers
        # gateway.metrics.Metrics with [metrics] enabled, else None; node_metrics does nothing then.
        self.metrics = metrics
        self.node_metrics = role_metrics(metrics, "node")
        self.settings = TunnelSettings.from_config(config.tunnel)
        self.registry = Registry()
        self.store: Any = None
        self.ca: CertificateAuthority | None = None
        self.apps: dict[str, AppConfig] = {a.name: a for a in config.apps}
        # The config file as last loaded; self.config is it plus the apps from the store.
        self.file_config = config
        # Apps published with `gateway apps` (valid ones, by name) and why others are not served.
        self.store_apps: dict[str, AppConfig] = {}
        self._store_left_out: dict[str, str] = {}
        # One reload at a time: SIGHUP and the store refresh both close and rebind listeners.
        self._reloading = DeferredLock()
        self._app_services: dict[str, StreamServerEndpointService] = {}
        # listeners plugins register through gateway_service_listeners (shared by several apps)
        # name -> (endpoint, factory holder, listener): kept bound across reloads while the name
        # and endpoint stay, so a reload (or a `gateway apps` change) never refuses connections.
        self._shared: dict[str, tuple[str, SwappableFactory, StreamServerEndpointService]] = {}
        # type -> handler(tunnel_handler, message) for control messages beyond hello/config/heartbeat
        self.control_handlers: dict[str, Any] = {}
        self.control_handlers[m.RENEW_REQUEST] = handle_renew_request
        # connector id -> when (epoch seconds) this node last renewed its certificate
        self.last_renewals: dict[str, float] = {}
        # Private Access: sign-in codes and user certificates; the users' live tunnels.
        self.users = UserAuthority(self)
        self.user_tunnels: set[TunnelHandler] = set()
        # Connector updates: the published release, its wheel and the one-per-group lease.
        self.updates = UpdateDesk(self)
        # group -> Deferreds of streams waiting for a connector of that group to come up
        self._connector_waiters: dict[str, list[Deferred]] = {}
        # group -> when (reactor seconds) a connector of it last drained (GO_AWAY NORMAL)
        self._drained_at: dict[str, float] = {}
        self._restart_wait_log = ThrottledLog(
            self.log, reactor, "app {app}: every connector of group {group} is draining or restarting; new"
                               " streams wait up to {timeout:g}s for one ({more} more since the last line)",
            level="info")
        # The recent admin events of this node ("node") and of each connector (its id), bounded.
        self.admin_events = AdminEvents()
        self.control_handlers[m.ADMIN_EVENT] = handle_admin_event
        # The process's logs (gateway.oplogs.OpLogs), when tap built them; the session log
        # switches from the store: {(scope, name): on}, pushed to connectors with their config.
        self.oplogs: Any = None
        self.session_switches: dict[tuple[str, str], bool] = {}
        # This node's row in the store and the live nodes sharing it (started with the node).
        self.roster: NodeRoster | None = None
        # Whether the store answers (a store outage: logged once, routing on for a grace).
        self.store_health: StoreHealth | None = None

    # -- start and stop ------------------------------------------------------------------

    def startService(self) -> None:
        service = self.config.service
        now = datetime.now(UTC)
        prepare_state_dir(service.state_dir)
        self.ca = CertificateAuthority.load_or_create(service.state_dir)
        node_cert, node_key = self.ca.issue_node_certificate(list(service.names), now)
        keys.write_public(service.state_dir / NODE_CERT_FILE, keys.cert_pem(node_cert))
        keys.write_private(service.state_dir / NODE_KEY_FILE, keys.key_pem(node_key))
        sync_store = open_store(service)
        self.log.info("store {store} at schema version {version} (was {before})", store=sync_store.location,
                      version=sync_store.migrated[1], before=sync_store.migrated[0])
        if service.store:   # nodes sharing a store share one CA; the first node's is recorded
            claim_shared_ca(sync_store, self.ca, service.state_dir, now)
        for group in sorted({a.group for a in self.apps.values()} | {"default"}):
            sync_store.ensure_group(group, now)
        # Read before anything binds, so stored apps are served from the start.
        self._take_store_apps(sync_store.list_apps())
        self.session_switches = sync_store.session_log_switches()
        self.config = self._merged()
        self.apps = {a.name: a for a in self.config.apps}
        self.store = ThreadedStore(sync_store, self.reactor)
        self.store_health = StoreHealth(self.reactor, sync_store.location, service.store_outage_grace,
                                        on_back=self.catch_up)
        self.store.health = self.store_health
        if hasattr(sync_store, "listen"):   # PostgreSQL: other nodes' changes arrive as notices
            self.change_feed = ChangeFeed(sync_store, self.reactor, self.store_health, self.apply_changes)
            self.change_feed.setServiceParent(self)

        tls_factory = TunnelTLSFactory(
            server_options(self.ca.cert, node_cert, node_key), False, ServiceTunnelFactory(self)
        )
        tunnel_listener = StreamServerEndpointService(listen_endpoint(self.reactor, service.listen), tls_factory)
        tunnel_listener._raiseSynchronously = True
        tunnel_listener.setName("tunnel-listener")
        tunnel_listener.setServiceParent(self)
        if self.config.admin is not None:
            from gateway.admin.site import admin_listener

            admin_listener(self, listen_endpoint(self.reactor, self.config.admin.listen), node_cert,
                           node_key).setServiceParent(self)
        for app in self.apps.values():
            self._add_app_listener(app)
        self._bind_shared_listeners()
        revalidate = TimerService(service.config_interval, self.revalidate_tunnels)
        revalidate.clock = self.reactor
        revalidate.setName("revalidate-tunnels")
        revalidate.setServiceParent(self)
        refresh = TimerService(service.config_interval, self.refresh_store_apps)
        refresh.clock = self.reactor
        refresh.setName("store-apps")
        refresh.setServiceParent(self)
        switches = TimerService(service.config_interval, self.refresh_session_switches)
        switches.clock = self.reactor
        switches.setName("session-log-switches")
        switches.setServiceParent(self)
        self.lifecycle = StatusRecorder(self.store, self.registry, self.reactor, service.node_id,
                                        service.heartbeat_interval)
        sweeper = Sweeper(self.store, self.reactor, lambda cid: bool(self.registry.tunnels_of(cid)),
                          service.inactive_after, service.remove_inactive_after)
        SweeperService(sweeper, service.sweep_interval, self.reactor).setServiceParent(self)
        if self.metrics is not None:
            self.metrics.collect(self._state_metrics, "the service node")
        super().startService()
        self._start_roster(tunnel_listener)
        self.log.info(
            "service node {node_id} listening for tunnels on {listen}; CA {fingerprint}; apps: {apps}",
            event="node_started", node_id=service.node_id, listen=service.listen, fingerprint=self.ca.fingerprint,
            apps=", ".join(sorted(self.apps)) or "none",
        )

    def _start_roster(self, tunnel_listener: StreamServerEndpointService) -> None:
        """Keep this node's row in the store fresh every heartbeat, with the address connectors
        should dial ([service] advertise, else the tunnel listener's own)."""
        service = self.config.service
        bound: list[int] = []
        tunnel_listener._waitingForPort.addCallback(lambda port: (bound.append(port.getHost().port), port)[1])
        address = service.tunnel_address(bound[0] if bound else None)
        self.roster = NodeRoster(self.store, self.reactor, service.node_id, address, service.heartbeat_interval,
                                 on_change=lambda _nodes: self._push_config())
        self.roster.service().setServiceParent(self)

    def nodes(self) -> list[Any]:
        """The live nodes sharing this node's store (NodeRecord: node_id, tunnel_address, ...),
        this one included once its first heartbeat was written; by node id."""
        return list(self.roster.live) if self.roster is not None else []

    def apply_changes(self, topics: set[str]) -> None:
        """Re-read what the change feed says changed in the store (any node or the CLI wrote it)."""
        if not self.running or self.store is None or self.store.closed:
            return
        if "apps" in topics:
            self.refresh_store_apps()
        if "log_switches" in topics:
            self.refresh_session_switches()
        if topics & {"connectors", "credentials"}:
            # A connector deleted or a certificate or user revoked: cut its tunnels now.
            self.revalidate_tunnels()
        if "connectors" in topics:
            # A connector moved to another group: its status write answers with the new group.
            for connector_id in list(self.registry.connectors()):
                self.lifecycle.changed(connector_id)
        if "nodes" in topics and self.roster is not None:
            self.roster.beat()

    def changed_here(self) -> None:
        """This node wrote the store itself (a command through the admin API): re-read it now
        rather than at the next config_interval, unless the change feed tells every node anyway."""
        if self.change_feed is None:
            self.apply_changes(set(EVERYTHING))

    def catch_up(self) -> None:
        """The store is back after an outage: re-read everything, as notices sent meanwhile are lost."""
        self.apply_changes(set(EVERYTHING))

    def _push_config(self) -> None:
        """Send every connector tunnel its config again (the nodes or the apps changed)."""
        for handler in self._handlers():
            handler.send_config()

    def _add_app_listener(self, app: AppConfig) -> None:
        if not app.listen:
            return  # a web app: served by a shared listener (gateway_service_listeners)
        handler = self.handlers[app.protocol]
        factory = handler.service_factory(app, lambda extra, _app=app: self.open_app_stream(_app, extra), self.reactor)
        listener = StreamServerEndpointService(listen_endpoint(self.reactor, app.listen), factory)
        listener._raiseSynchronously = True
        listener.setName(f"app:{app.name}")
        listener.setServiceParent(self)
        self._app_services[app.name] = listener

    @property
    def _shared_services(self) -> list[StreamServerEndpointService]:
        return [listener for _, _, listener in self._shared.values()]

    def _wanted_shared_listeners(self) -> dict[str, tuple[str, Any]]:
        """What plugins register for self.config: {name: (endpoint, factory)}; raises if one refuses."""
        wanted: dict[str, tuple[str, Any]] = {}

        def register(name: str, endpoint: str, factory: Any) -> None:
            if name in wanted:
                raise plugins.PluginError(f"two plugins register the service listener {name!r}")
            wanted[name] = (endpoint, factory)

        self.pm.hook.gateway_service_listeners(
            register=register, config=self.config, open_stream=self.open_app_stream, reactor=self.reactor,
            choose_connector=self.choose_connector,
            access=LoginPortal.from_config(self.config, self.ca.fingerprint if self.ca else "", self.users.codes.issue),
        )
        return wanted

    def _add_shared_listeners(self) -> Deferred:
        """Bring the listeners plugins register for several apps at once (e.g. the HTTP front
        door) in line with self.config: one whose name and endpoint stay keeps its socket and
        gets the new factory (connections open now finish with the old one); the others are
        closed before new ones bind. A plugin refusing the config changes nothing."""
        wanted = self._wanted_shared_listeners()
        closing = []
        for name, (endpoint, holder, listener) in list(self._shared.items()):
            if wanted.get(name, (None,))[0] == endpoint:
                holder.factory = wanted[name][1]
            else:
                del self._shared[name]
                closing.append(maybeDeferred(listener.disownServiceParent))

        def bind(_: Any) -> None:
            for name, (endpoint, factory) in wanted.items():
                if name in self._shared:
                    continue
                holder = SwappableFactory(factory)
                listener = StreamServerEndpointService(listen_endpoint(self.reactor, endpoint), holder)
                listener._raiseSynchronously = True
                listener.setName(f"listener:{name}")
                listener.setServiceParent(self)
                self._shared[name] = (endpoint, holder, listener)
                self.log.info("listener {name} on {endpoint}", name=name, endpoint=endpoint)

        if not closing:
            bind(None)   # synchronously: at start, a port in use must stop the service at once
            return succeed(None)
        return gatherResults(closing, consumeErrors=True).addCallback(bind)

    def stopService(self) -> Deferred:
        for session in self.registry.sessions():
            session.go_away(GoAwayCode.NORMAL, "service node is shutting down")
        d = maybeDeferred(super().stopService)
        if self.roster is not None:
            d.addBoth(lambda _: self.roster.leave())
        if self.store is not None:
            d.addBoth(lambda _: self.store.close())
        return d

    # -- config --------------------------------------------------------------------------

    def group_config(self, group: str) -> dict[str, Any]:
        apps = [
            {
                "name": a.name, "protocol": a.protocol, "destination": a.destination,
                "host": a.host, "port": a.port, "connect_timeout": a.connect_timeout, "options": self._connector_options(a),
                "internal_url": a.internal_url,
                **({"segments": [segment_table(seg) for seg in a.segments]} if a.is_private else {}),
            }
            for a in sorted(self.apps.values(), key=lambda a: a.name)
            if a.group == group
        ]
        body = json.dumps(apps, sort_keys=True, separators=(",", ":")).encode()
        return {"type": m.CONFIG, "version": hashlib.sha256(body).hexdigest()[:16], "group": group, "apps": apps}

    def _connector_options(self, app: AppConfig) -> dict[str, Any]:
        """The options a connector gets: a private app's UDP flows idle out after [access]
        udp_idle_timeout unless the app says otherwise."""
        access = self.config.access
        if app.is_private and access is not None and "udp_idle_timeout" not in app.options:
            return {**app.options, "udp_idle_timeout": access.udp_idle_timeout}
        return app.options

    def reload(self, config: GatewayConfig) -> Deferred:
        """Take a new config file (SIGHUP): with the apps in the store read again, apply it."""

        def read() -> Deferred:
            self.file_config = config
            d = self.store.list_apps() if self.store is not None and not self.store.closed else succeed(None)
            d.addCallbacks(lambda records: None if records is None else self._take_store_apps(records),
                           self._store_unreadable)
            return d.addCallback(lambda _: self._apply(self._merged(), "configuration reloaded"))

        return self._reloading.run(read)

    def refresh_store_apps(self) -> Deferred:
        """Every config_interval: apply apps added, changed or removed with `gateway apps`."""
        if self.store is None or self.store.closed or not self.running:
            return succeed(None)

        def read() -> Deferred:
            d = self.store.list_apps()

            def got(records: list) -> Deferred | None:
                if not self._take_store_apps(records) or not self.running:
                    return None
                return self._apply(self._merged(), "apps from the store applied")

            return d.addCallbacks(got, self._store_unreadable)

        return self._reloading.run(read)

    def _take_store_apps(self, records: list) -> bool:
        """Remember the stored apps, logging what changed; whether anything did."""
        apps, problems = store_apps.parse_records(records)
        new = {a.name: a for a in apps}
        _, left_out = store_apps.merge(self.file_config, new.values(), self.handlers)
        left_out = {**problems, **left_out}
        old = self.store_apps
        if new == old and left_out == self._store_left_out:
            return False
        for name in sorted(set(new) - set(old)):
            self.log.info("app {app} added (from the store)", app=name)
        for name in sorted(set(old) - set(new)):
            self.log.info("app {app} removed (from the store)", app=name)
        for name in sorted(n for n in set(old) & set(new) if old[n] != new[n]):
            self.log.info("app {app} changed (from the store)", app=name)
        for name, why in sorted(left_out.items()):
            if self._store_left_out.get(name) != why:
                self.log.warn("app {app} in the store is not served: {why}; fix it with `gateway apps`",
                              app=name, why=why)
        self.store_apps = new
        self._store_left_out = left_out
        return True

    def _store_unreadable(self, failure: Failure) -> None:
        if failure.check(StoreUnavailable):
            return   # a store outage: logged once by store_health
        self.log.error("cannot read the apps in the store ({error}); keeping the ones read before",
                       error=failure.getErrorMessage())

    def _merged(self) -> GatewayConfig:
        return store_apps.merge(self.file_config, self.store_apps.values(), self.handlers)[0]

    def _apply(self, config: GatewayConfig, what: str = "configuration reloaded") -> Deferred:
        """Replace changed app listeners and rebind the shared ones for `config`; push config to connectors.

        Old listeners are closed before new ones bind, so an app may keep its port; a listener
        that fails to bind is logged and the other apps still take effect.
        """
        new_apps = {a.name: a for a in config.apps}
        closing = []
        for name, old in list(self.apps.items()):
            if new_apps.get(name) != old:
                if name in self._app_services:
                    closing.append(maybeDeferred(self._app_services.pop(name).disownServiceParent))
                del self.apps[name]
        self.config = config

        def bind(_: Any) -> None:
            for name, app in new_apps.items():
                if name in self.apps:
                    continue
                try:
                    self._add_app_listener(app)
                except Exception as e:
                    self._app_services.pop(name, None)
                    self.log.error("app {app}: cannot listen on {listen}: {error}; fix the config and reload",
                                   app=name, listen=app.listen, error=str(e))
                    continue
                self.apps[name] = app
            try:
                d = self._bind_shared_listeners()
            except Exception as e:
                d = fail(e)

            def refused(failure: Failure) -> None:
                self.log.error("shared listeners: {error}; fix the config and reload",
                               error=failure.getErrorMessage())

            def done(_: Any) -> None:
                for handler in self._handlers():
                    handler.send_config()
                for handler in self.user_tunnels:   # an app or assignment gone cuts its streams now
                    handler.access.recheck_flows()
                self.log.info("{what}; apps: {apps}", event="config_applied", what=what, apps=", ".join(sorted(self.apps)) or "none")

            return d.addErrback(refused).addCallback(done)

        return gatherResults(closing, consumeErrors=True).addCallback(bind)

    def _bind_shared_listeners(self) -> Deferred:
        """The shared listeners for self.config; should a plugin refuse the stored apps, without them.

        A bad app from the store must not take the front door (and the file's apps) down.
        """
        try:
            return self._add_shared_listeners()
        except Exception as e:
            from_store = sorted(n for n in self.store_apps if n in self.apps)
            if not from_store:
                raise
            error = str(e)
        self.log.error("the listeners refuse the apps from the store ({error}); serving without {apps}:"
                       " fix them with `gateway apps set` or `gateway apps remove`",
                       error=error, apps=", ".join(from_store))
        for name in from_store:
            del self.apps[name]
        self.config = attrs.evolve(self.config, apps=tuple(self.apps.values()))
        return self._add_shared_listeners()

    def _handlers(self) -> list[TunnelHandler]:
        return [t.session.owner for ts in self.registry.connectors().values() for t in ts]

    # -- Private Access users ------------------------------------------------------------

    def user_certificate(self, message: dict[str, Any], address: str) -> Deferred:
        """Answer a user_certificate_request (gateway login); fires with the reply, never fails."""
        if self.config.access is None:
            return succeed({"type": m.ERROR, "code": "not_enabled",
                            "message": "Private Access is not enabled on this service ([access] table)"})
        return self.users.handle(message, address)

    def user_tunnel_problem(self, record: Any) -> str | None:
        """Why another tunnel of this user is refused (max_tunnels_per_user), or None."""
        limit = self.config.access.max_tunnels_per_user
        held = sum(1 for h in self.user_tunnels if h.access is not None and h.access.record.user == record.user)
        if held >= limit:
            return (f"{record.user} already holds {held} tunnels (max_tunnels_per_user = {limit});"
                    " close another gateway access first")
        return None

    def user_tunnel_up(self, handler: TunnelHandler) -> None:
        self.user_tunnels.add(handler)
        self.log.info("user {user} connected from {address} (credential {credential_id}, {kind})",
                      user=handler.access.record.user, address=handler.address,
                      credential_id=handler.access.record.credential_id, kind=handler.access.record.kind)

    def user_tunnel_lost(self, handler: TunnelHandler) -> None:
        self.user_tunnels.discard(handler)

    # -- tunnels -------------------------------------------------------------------------

    def tunnel_up(self, handler: TunnelHandler) -> None:
        self.registry.add(handler.entry)
        for waiter in self._connector_waiters.pop(handler.group, []):
            if not waiter.called:
                waiter.callback(None)
        self.log.info(
            "connector {connector_id} (group {group}) up on tunnel {tunnel_id} from {address} with certificate {serial}",
            event="tunnel_up", group=handler.group, address=handler.address, serial=handler.identity.serial_hex, **handler.ctx,
        )
        plugins.notify(self.pm, "gateway_connector_up", connector=handler.entry)
        connector_id = handler.identity.connector_id
        handler.session.on_go_away.append(lambda *_: self.lifecycle.changed(connector_id))
        handler.session.on_go_away.append(lambda _session, code, _message: self._draining(handler, code))
        self.lifecycle.changed(connector_id)

    def connector_up(self, group: str, timeout: float) -> Deferred:
        """Fires once a connector of ``group`` has a tunnel up (at once if one has), or fails with
        NoConnector after ``timeout`` seconds: after a node restart connectors come back within
        their backoff, and a stream asked for meanwhile can wait for them instead of failing."""
        if any(t.healthy and t.group == group for ts in self.registry.connectors().values() for t in ts):
            return succeed(None)
        waiter: Deferred = Deferred()
        self._connector_waiters.setdefault(group, []).append(waiter)

        def expire() -> None:
            if not waiter.called:
                self._connector_waiters.get(group, []).remove(waiter)
                waiter.errback(ConnectorWaitExpired(
                    f"no healthy connector of group {group!r} came up within {timeout:g}s"))

        call = self.reactor.callLater(timeout, expire)
        return waiter.addBoth(lambda result: (call.active() and call.cancel(), result)[1])

    def tunnel_lost(self, handler: TunnelHandler, reason: Failure) -> None:
        self.registry.remove(handler.session)
        self.lifecycle.changed(handler.entry.connector_id)
        why = describe_failure(reason)
        self.log.info("connector {connector_id} tunnel {tunnel_id} lost: {reason}", event="tunnel_lost", reason=why,
                      **handler.ctx)
        plugins.notify(self.pm, "gateway_connector_lost", connector=handler.entry, reason=why)

    def revalidate_tunnels(self) -> Deferred:
        """Close tunnels whose connector was deleted or certificate revoked since they connected."""
        checks = [handler.recheck() for handler in [*self._handlers(), *self.user_tunnels]]
        if not checks:
            return succeed(None)
        # A check the store could not answer keeps the tunnel (an outage is logged once), and
        # must not fail the timer, which would stop re-checking for good.
        return gatherResults(checks, consumeErrors=True).addErrback(self._recheck_failed)

    def _recheck_failed(self, failure: Failure) -> None:
        if failure.check(FirstError):
            failure = failure.value.subFailure
        if not failure.check(StoreUnavailable):
            self.log.failure("re-checking the tunnels failed", failure)

    # -- the session log switches and connectors' admin events -----------------------------

    def session_log_for(self, connector_id: str, group: str) -> bool:
        """Whether a connector keeps a session log: its own switch, else its group's, else off."""
        return sessionlog.switched_on(self.session_switches, connector_id, group)

    def refresh_session_switches(self) -> Deferred:
        """Every config_interval: read the switches `gateway logs session` keeps in the store; a
        connector whose switch changed gets its config again, so it takes effect without a restart."""
        if self.store is None or self.store.closed or not self.running:
            return succeed(None)

        def got(switches: dict[tuple[str, str], bool]) -> None:
            if switches == self.session_switches:
                return
            before = {h: self.session_log_for(h.identity.connector_id, h.group) for h in self._handlers()}
            self.session_switches = switches
            for handler, was in before.items():
                if self.session_log_for(handler.identity.connector_id, handler.group) != was:
                    handler.send_config()

        return self.store.session_log_switches().addCallbacks(got, self._switches_unreadable)

    def _switches_unreadable(self, failure: Failure) -> None:
        if failure.check(StoreUnavailable):
            return   # a store outage: logged once by store_health
        self.log.error("cannot read the session log switches in the store ({error}); keeping the ones read before",
                       error=failure.getErrorMessage())

    def connector_admin_event(self, event: AdminEvent, name: str) -> None:
        """A connector's admin event in this node's admin log, with the connector as its source."""
        if self.oplogs is not None:
            self.oplogs.admin_record(event.source, event.level, event.text, event.time, name)

    def heartbeat(self, connector_id: str) -> None:
        # Coalesced: at most one store write per connector per heartbeat interval.
        self.lifecycle.heartbeat(connector_id)

    # -- routing -------------------------------------------------------------------------

    def _draining(self, handler: TunnelHandler, code: int) -> None:
        """A connector's tunnel said GO_AWAY: a NORMAL one (a drain) starts its group's restart grace."""
        if code == GoAwayCode.NORMAL and handler.group is not None:
            self._drained_at[handler.group] = self.reactor.seconds()

    def _restarting(self, group: str) -> bool:
        """A connector of ``group`` drained within RESTART_GRACE: one is likely on its way back."""
        drained = self._drained_at.get(group)
        return drained is not None and self.reactor.seconds() - drained < RESTART_GRACE

    def _wait_for_restart(self, app: AppConfig, extra: dict[str, Any], request_id: str, deadline: float) -> Deferred:
        """No connector of the app's group takes streams, but one drained lately: wait for a
        connector to come up (until ``deadline``: connect_timeout after the first wait), then route
        again. Connectors that refused this stream before are tried again: they refused before
        dialling anything."""
        self._restart_wait_log.emit(key=app.group, app=app.name, group=app.group, timeout=app.connect_timeout)
        d = self.connector_up(app.group, max(0.0, deadline - self.reactor.seconds()))
        return d.addCallback(lambda _: self.open_app_stream(app, {**extra, "request_id": request_id},
                                                            deadline=deadline))

    def choose_connector(self, app: AppConfig) -> str:
        """The connector a new stream of ``app`` goes to now: the least loaded of its group, the
        one chosen least recently among equals (so successive calls take turns). Raises
        NoConnector. For plugins that keep idle streams per connector (the http front door's
        per-request balancing) and want the node's choice before taking one."""
        return self.registry.pick(app.group).connector_id

    def open_app_stream(self, app: AppConfig, extra: dict[str, Any], tried: frozenset[str] = frozenset(),
                        deadline: float | None = None, may_wait: bool = True, connector: str | None = None) -> Deferred:
        """Open a stream for `app` on the best connector of its group; retry only what never left.

        While the group restarts (a connector drained lately), a stream that finds no connector
        waits for one until ``deadline`` (connect_timeout after it first waited), as often as a
        drain turns it away: the connector's other tunnel may still look healthy when the first
        one says GO_AWAY, and says it a moment later. ``may_wait`` is false after a refusal that
        is not a drain (a back end that failed to connect), which waiting would only repeat.
        ``connector`` (from choose_connector): open it there if that connector takes streams,
        else wherever open_app_stream would."""
        request_id = extra.get("request_id") or uuid.uuid4().hex[:16]
        if self.store_health is not None and self.store_health.stale:
            self.log.warn("app {app} request {request_id} refused: {error}", app=app.name, request_id=request_id,
                          error=self.store_health.stale_reason())
            self.node_metrics.refused(app.name, app.group, app.protocol, "store_unavailable")
            return fail(NoConnector(self.store_health.stale_reason()))
        try:
            tunnel = None
            if connector is not None and connector not in tried:
                tunnel = self.registry.tunnel_of(connector, app.group)
            if tunnel is None:
                tunnel = self.registry.pick(app.group, exclude=tried, affinity=affinity_key(app, extra))
        except NoConnector as e:
            now = self.reactor.seconds()
            if may_wait and self._restarting(app.group) and (deadline is None or now < deadline):
                return self._wait_for_restart(app, extra, request_id,
                                              now + app.connect_timeout if deadline is None else deadline)
            if not tried:
                self.log.warn("app {app} request {request_id}: {error}", app=app.name, request_id=request_id,
                              error=str(e))
                self.node_metrics.refused(app.name, app.group, app.protocol, "no_connector")
            return fail(e)
        # A private app's stream goes where its user asked (the access check matched a segment);
        # any other app's goes to the app's one destination, whatever a plugin put in extra.
        destination, protocol = app.destination, app.protocol
        if app.is_private:
            destination = extra["destination"]
            protocol = "udp" if extra.get("transport") == "udp" else app.protocol
        metadata = {
            **extra, "kind": "app", "app": app.name, "protocol": protocol,
            "destination": destination, "request_id": request_id,
        }
        sent = self.reactor.seconds()
        try:
            # The connector answers once the back end connected or failed to: allow it that long.
            d = tunnel.session.open_stream(metadata, timeout=app.connect_timeout + OPEN_GRACE)
        except TunnelClosed:
            return self.open_app_stream(app, {**extra, "request_id": request_id}, tried | {tunnel.connector_id},
                                        deadline)

        def opened(stream: Stream) -> Stream:
            stream.log_info = StreamInfo(
                stream_id=stream.id, tunnel_id=tunnel.session.tunnel_id, connector_id=tunnel.connector_id,
                app=app.name, protocol=protocol, request_id=request_id, user=extra.get("user"),
                transport=str(extra.get("transport", "tcp")), destination=destination,
                segment=str(extra.get("segment", "")), client=str(extra.get("client", "")),
                opened_at=self.reactor.seconds(),
            )
            plugins.notify(self.pm, "gateway_stream_opened", stream=stream.log_info)
            stream.metrics_series = self.node_metrics.opened(app.name, app.group, protocol)
            stream.metrics_series.setup(self.reactor.seconds() - sent)
            return stream

        def failed(failure: Failure) -> Any:
            retry = failure.check(TunnelClosed) or (
                failure.check(StreamReset) and failure.value.code in _RETRYABLE
            )
            if retry:
                self.log.info(
                    "app {app} request {request_id}: connector {connector_id} could not take it ({error});"
                    " trying another connector of group {group}",
                    app=app.name, request_id=request_id, connector_id=tunnel.connector_id,
                    error=failure.getErrorMessage(), group=app.group,
                )
                drained = failure.check(TunnelClosed) or failure.value.code == ResetCode.GOING_AWAY
                again = self.open_app_stream(app, {**extra, "request_id": request_id}, tried | {tunnel.connector_id},
                                             deadline, may_wait=bool(drained) or deadline is None)
                # Out of connectors: the last real reason says more than "no connector left", but
                # less than a wait for a restarting connector that ran out.
                return again.addErrback(
                    lambda f: give_up(f if f.check(ConnectorWaitExpired) else failure) if f.check(NoConnector) else f)
            return give_up(failure)

        def give_up(failure: Failure) -> Failure:
            self.log.warn(
                "app {app} request {request_id} via connector {connector_id}: {error}",
                app=app.name, request_id=request_id, connector_id=tunnel.connector_id,
                error=failure.getErrorMessage(),
            )
            self.node_metrics.refused(app.name, app.group, protocol, result_of(failure))
            return failure

        return d.addCallbacks(opened, failed)

    def stream_closed(self, stream: Stream, reason: Failure) -> None:
        series = getattr(stream, "metrics_series", None)
        if series is not None:
            series.closed(result_of(reason), stream.bytes_out, stream.bytes_in)
        info = getattr(stream, "log_info", None)
        if info is not None:
            why = "done" if reason is None or reason.check(ConnectionDone) else describe_failure(reason)
            # The session record: what went each way and for how long, as the service saw it.
            record = attrs.evolve(info, bytes_up=stream.bytes_out, bytes_down=stream.bytes_in,
                                  duration=max(0.0, self.reactor.seconds() - info.opened_at), result=why,
                                  facts=getattr(stream, "session_facts", None) or {})
            plugins.notify(self.pm, "gateway_stream_closed", stream=record, reason=why)
            session_log = sessionlog.current
            if session_log is not None and session_log.on[sessionlog.SERVICE]:
                session_log.write(sessionlog.SERVICE, sessionlog.stream_record(record))
            if record.segment or record.facts:   # its session record in the log, until the session log
                self.log.info(
                    "session: user {user} app {app} {transport} {where} via connector"
                    " {connector_id}: {bytes_up} bytes up, {bytes_down} down, {duration:.1f}s, {result}{summary}",
                    facts=record.facts, summary="".join(f"; {k}={v}" for k, v in record.facts.items()),
                    where=f"{record.destination} (segment {record.segment})" if record.segment else record.destination,
                    event="session", user=record.user or "-", app=record.app, transport=record.transport,
                    destination=record.destination, segment=record.segment, connector_id=record.connector_id,
                    bytes_up=record.bytes_up, bytes_down=record.bytes_down, duration=record.duration,
                    result=record.result, request_id=record.request_id)

    def _state_metrics(self) -> list:
        """Tunnels, connectors and config versions per group, read at each scrape."""
        tunnels = GaugeMetricFamily("gateway_node_tunnels", "Connector tunnels up, by the connector's group.",
                                    labels=("group",))
        connectors = GaugeMetricFamily("gateway_node_connectors", "Connectors with a tunnel up, by group.",
                                       labels=("group",))
        per_group: dict[str, list[int]] = {group: [0, 0] for group in {a.group for a in self.apps.values()}}
        for entries in self.registry.connectors().values():
            if entries:
                counts = per_group.setdefault(entries[0].group, [0, 0])
                counts[0] += len(entries)
                counts[1] += 1
        for group, (n_tunnels, n_connectors) in sorted(per_group.items()):
            tunnels.add_metric((group,), n_tunnels)
            connectors.add_metric((group,), n_connectors)
        users = GaugeMetricFamily("gateway_node_user_tunnels", "Private Access users' tunnels up.",
                                  value=len(self.user_tunnels))
        versions = GaugeMetricFamily("gateway_node_config_info", "Always 1: the config version each group's"
                                     " connectors get (the version label changes with the group's apps).",
                                     labels=("group", "version"))
        for group in sorted({a.group for a in self.apps.values()}):
            versions.add_metric((group, self.group_config(group)["version"]), 1)
        return [tunnels, connectors, users, versions]

    # -- enrolment -----------------------------------------------------------------------

    def enrol(self, message: dict[str, Any], address: str) -> Deferred:
        """Redeem a token for a client certificate; fires with the reply message, never fails."""
        now = datetime.now(UTC)
        lifetime = self.config.service.certificate_lifetime
        try:
            if message.get("type") != m.ENROL_REQUEST:
                raise EnrolmentError(f"expected an enrol_request, got {message.get('type')!r}")
            token_id = str(message["token_id"])
            secret = str(message["secret"])
            csr = str(message["csr"]).encode()
            name = str(message.get("name") or "")[:200]
        except (KeyError, EnrolmentError) as e:
            return succeed({"type": m.ERROR, "code": "bad_request", "message": f"malformed enrolment request: {e}"})

        ca = self.ca

        def issue(token: Any) -> tuple[ConnectorRecord, CertificateRecord, Any]:
            connector_id = uuid.uuid4().hex
            cert = ca.issue_client_certificate(csr, connector_id, now, lifetime)
            return (
                ConnectorRecord(connector_id=connector_id, name=name or connector_id[:12], group=token.group, created_at=now),
                CertificateRecord(serial_hex=keys.serial_hex(cert), connector_id=connector_id,
                                  not_after=cert.not_valid_after_utc),
                cert,
            )

        def done(result: tuple[ConnectorRecord, Any]) -> dict[str, Any]:
            record, cert = result
            self.log.info(
                "enrolled connector {connector_id} ({name}) in group {group} from {address}",
                event="enrolled", connector_id=record.connector_id, name=record.name, group=record.group, address=address,
            )
            return {
                "type": m.ENROL_RESULT, "connector_id": record.connector_id, "group": record.group,
                "name": record.name, "certificate": keys.cert_pem(cert).decode(),
                "ca": keys.cert_pem(ca.cert).decode(),
            }

        def refused(failure: Failure) -> dict[str, Any]:
            if failure.check(GatewayError):
                message = str(failure.value)
            else:
                self.log.failure("enrolment failed", failure)
                message = "internal error on the service; see its log"
            self.log.warn("enrolment from {address} refused: {reason}", address=address, reason=message)
            return {"type": m.ERROR, "code": "enrolment_refused", "message": message}

        return self.store.enrol(token_id, secret, now, issue).addCallbacks(done, refused)
