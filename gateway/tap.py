"""`twistd gateway --config FILE.toml`: build the service node and/or connector the file names."""

from __future__ import annotations

import gc
import resource
import signal
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

from gateway import logs, plugins
from gateway.config import DEFAULT_CONFIG_PATH, GatewayConfig, load_config
from gateway.connector.identity import ConnectorIdentity
from gateway.errors import GatewayError
from gateway.oplogs.service import LoggedServices, OpLogs
from gateway.service.admin_events import NODE, AdminEvent


class Options(usage.Options):
    synopsis = "--config FILE.toml"
    longdesc = (
        "Runs the roles a TOML file names: a service node ([service]), a connector ([connector]),"
        " or both. The file is checked before anything binds; errors name the file and key."
    )
    optParameters = [["config", "c", str(DEFAULT_CONFIG_PATH), "The TOML configuration file."]]

    def postOptions(self) -> None:
        try:
            self.pm = plugins.make_plugin_manager()
            self.handlers = plugins.protocol_handlers(self.pm)
            self.config = load_config(self["config"], plugins.config_sections(self.pm))
            check_protocols(self.config, self.handlers)
            if self.config.service is not None:
                # what plugins refuse (per-app options, certificates) stops us before anything starts
                plugins.check_service_listeners(self.pm, self.config)
                if self.config.service.store:
                    # A PostgreSQL store that cannot be opened (no driver, a wrong password, down)
                    # stops us here with its reason; opening it applies the migrations.
                    from gateway.service.node import open_store
                    from gateway.service.nodes import check_shared_ca

                    store = open_store(self.config.service)
                    try:
                        # Another node's CA files, or none: every node must issue and trust with one CA.
                        check_shared_ca(store, self.config.service.state_dir)
                    finally:
                        store.close()
            self.identity = (
                ConnectorIdentity.load(self.config.connector.state_dir) if self.config.connector else None
            )
            if self.identity is not None:
                # An unusable HTTPS_PROXY or proxy password file stops the start with its reason.
                from gateway.connector.proxy import choose_proxy

                connector = self.config.connector
                choose_proxy(connector.proxy, connector.proxy_password_file, self.identity.service_host,
                             self.identity.service_port)
        except GatewayError as e:
            raise usage.UsageError(str(e)) from None
        parent = getattr(self, "parent", None)
        # twistd reads its `logger` option after this runs; in the foreground we choose the
        # observer so the config's format (text or JSON) and level apply.
        if parent is not None and parent.get("nodaemon") and not parent.get("logger") and not parent.get("logfile"):
            parent["logger"] = logs.configure(self.config.logging.format, self.config.logging.level)


def check_protocols(config: GatewayConfig, handlers: dict[str, Any]) -> None:
    from gateway.errors import ConfigError

    for i, app in enumerate(config.apps):
        if app.protocol not in handlers:
            raise ConfigError(
                str(config.path), f"apps[{i}].protocol",
                f"a protocol a loaded plugin provides ({', '.join(sorted(handlers)) or 'none loaded'}),"
                f" got {app.protocol!r}",
            )


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    # twistd re-raises the signal that stopped it, so a drained, orderly SIGTERM shutdown would
    # exit with status -15; for gateway that shutdown is a success and exits 0.
    reactor.addSystemEventTrigger("after", "shutdown", _clean_exit, reactor)
    _tune_gc(reactor)
    raise_open_files_limit(resource, _log)
    from twisted.logger import globalLogPublisher

    return build(options.config, reactor, options.pm, options.handlers, options.identity, config_path=options["config"],
                 log_publisher=globalLogPublisher)


def _tune_gc(reactor: Any) -> None:
    """Keep the cyclic GC off the latency tail.

    With CPython's defaults, collections of the older generations over everything loaded at
    start-up paused a busy node for tens of milliseconds: p99 of keep-alive requests through a
    fresh service and connector was 25 ms against 3.5 ms once warm (docs/PERFORMANCE.md).
    Freezing the start-up objects and collecting the young generation less often removes that.
    """
    gc.set_threshold(50_000, 50, 100)
    reactor.callWhenRunning(gc.freeze)


_log = Logger(namespace="gateway.tap")

# Every tunnel, client connection and back-end connection is a file descriptor; the soft limit
# a shell or unit hands us (often 1,024) is far below what a busy node holds, so we take the
# hard limit, up to this (a bigger table only costs memory).
OPEN_FILES_CAP = 1_048_576
# Below this hard limit a node runs out of descriptors early: say so at start.
OPEN_FILES_LOW = 8192


def raise_open_files_limit(rlimits: Any, log: Logger) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (at most OPEN_FILES_CAP); one info line.

    `rlimits` is the resource module (a parameter for tests). Returns (before, after).
    """
    soft, hard = rlimits.getrlimit(rlimits.RLIMIT_NOFILE)
    target = OPEN_FILES_CAP if hard == rlimits.RLIM_INFINITY else min(hard, OPEN_FILES_CAP)
    after = soft
    if soft == rlimits.RLIM_INFINITY or soft >= target:
        log.info("open files limit (RLIMIT_NOFILE) is {soft} (hard limit {hard})", soft=soft, hard=hard)
    else:
        try:
            rlimits.setrlimit(rlimits.RLIMIT_NOFILE, (target, hard))
            after = target
            log.info("open files limit (RLIMIT_NOFILE) raised from {before} to {after} (hard limit {hard})",
                     before=soft, after=target, hard=hard)
        except (ValueError, OSError) as e:
            log.warn("could not raise the open files limit (RLIMIT_NOFILE) from {before} to {after}: {error}",
                     before=soft, after=target, error=str(e))
    if hard != rlimits.RLIM_INFINITY and hard < OPEN_FILES_LOW:
        log.warn("the hard open files limit (RLIMIT_NOFILE) is only {hard}: each tunnel and each client"
                 " connection takes a descriptor; raise it (LimitNOFILE= in a systemd unit, nofile in"
                 " /etc/security/limits.conf) to at least {low}", hard=hard, low=OPEN_FILES_LOW)
    return soft, after


def _clean_exit(reactor: Any) -> None:
    if getattr(reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
        reactor._exitSignal = None


def build(config: GatewayConfig, reactor: Any, pm: Any, handlers: dict[str, Any],
          identity: ConnectorIdentity | None, config_path: str | None = None, log_publisher: Any = None) -> IService:
    from gateway.connector.node import ConnectorNode
    from gateway.service.node import ServiceNode

    service = connector = None
    oplogs = OpLogs(config.logging, reactor, "node" if config.service is not None or identity is None
                    else identity.connector_id, log_publisher)
    top = LoggedServices(oplogs)
    metrics = start_metrics(config, reactor, pm, top)
    if config.service is not None:
        service = ServiceNode(config, reactor, pm, handlers, metrics=metrics)
        service.setServiceParent(top)
        service.oplogs = oplogs
        oplogs.admin.listeners.append(lambda record: service.admin_events.add(AdminEvent(
            time=record["time"], source=NODE, level=record["level"], text=record["text"])))
    if config.connector is not None:
        connector = ConnectorNode(config, reactor, pm, handlers, identity, metrics=metrics)
        connector.setServiceParent(top)
        if service is None:   # a node and connector in one process: the node keeps its events itself
            oplogs.admin.listeners.append(connector.admin_forwarder.report)
    if config_path is not None:
        install_reload(reactor, config_path, pm, handlers, service, connector, oplogs)
    return top


def start_metrics(config: GatewayConfig, reactor: Any, pm: Any, parent: MultiService) -> Any:
    """With ``[metrics] enabled``: the process's registry, the plugins' metrics in it, and its
    ``/metrics`` listener under ``parent``; None otherwise."""
    if not config.metrics.enabled:
        return None
    from gateway.metrics import Metrics, MetricsListener

    roles = [role for role, table in (("node", config.service), ("connector", config.connector)) if table]
    metrics = Metrics(roles)
    plugins.register_metrics(pm, metrics)
    MetricsListener(reactor, config.metrics.listen, metrics).setServiceParent(parent)
    _log.info("metrics endpoint on {listen} (path /metrics)", listen=config.metrics.listen)
    return metrics


def install_reload(reactor: Any, path: str, pm: Any, handlers: dict[str, Any], service: Any, connector: Any,
                   oplogs: Any = None) -> None:
    """SIGHUP: a service re-reads its file (a bad file is logged, the running config kept);
    a connector pulls its configuration from the service at once."""

    def reload() -> None:
        if connector is not None:
            connector.pull_config()
        if service is None:
            return
        try:
            config = load_config(path, plugins.config_sections(pm))
            check_protocols(config, handlers)
        except GatewayError as e:
            service.log.error("config reload refused, keeping the running config: {error}", error=str(e))
            return
        if oplogs is not None:
            oplogs.reconfigure(config.logging)
        service.reload(config)

    def on_signal(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload)

    reactor.callWhenRunning(signal.signal, signal.SIGHUP, on_signal)
