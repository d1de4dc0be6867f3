"""`twistd gateway-updater --config FILE.toml`: the updater beside one connector."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.service import IService
from twisted.python import usage

from gateway import logs
from gateway.errors import GatewayError
from gateway.oplogs.admin import UPDATER_SOURCE, updater_admin_log
from gateway.oplogs.service import LoggedServices, OpLogs
from gateway.updater.config import load_updater_config

DEFAULT_PATH = "/etc/gateway/updater.toml"


class Options(usage.Options):
    synopsis = "--config FILE.toml"
    longdesc = (
        "Runs the connector named by [updater] connector_config as a child from its virtualenv, and"
        " updates it from the service's signed releases (drain, install, restart, health check, rollback)."
    )
    optParameters = [["config", "c", DEFAULT_PATH, "The updater's TOML file ([updater] table)."]]

    def postOptions(self) -> None:
        try:
            self.config = load_updater_config(self["config"])
        except GatewayError as e:
            raise usage.UsageError(str(e)) from None
        parent = getattr(self, "parent", None)
        if parent is not None and parent.get("nodaemon") and not parent.get("logger") and not parent.get("logfile"):
            parent["logger"] = logs.configure("text", "info")


def makeService(options: Options) -> IService:
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    return build(options.config, reactor, globalLogPublisher)


def updater_logging(logging: Any) -> Any:
    """The connector's [logging] as the updater uses it: its own admin log file beside the
    connector's (or none if the admin turned it off), journald as the connector's, no session log."""
    admin_log = None if logging.admin_log is None else updater_admin_log(logging.admin_log)
    return attrs.evolve(logging, admin_log=admin_log, session_log=False)


def build(config: Any, reactor: Any, log_publisher: Any = None) -> IService:
    from gateway.updater.daemon import Updater, control_service

    # Its admin log, like the node's and the connector's (tap.build): update steps are admin
    # events an admin reads on the connector's machine with `gateway logs show --kind admin`.
    oplogs = OpLogs(updater_logging(config.logging), reactor, UPDATER_SOURCE, log_publisher)
    top = LoggedServices(oplogs)
    updater = Updater(config, reactor)
    updater.setServiceParent(top)
    control_service(updater, reactor).setServiceParent(top)
    return top
