"""`twistd gateway-updater --config FILE.toml`: the updater beside one connector."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from gateway import logs
from gateway.errors import GatewayError
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

    return build(options.config, reactor)


def build(config: Any, reactor: Any) -> IService:
    from gateway.updater.daemon import Updater, control_service

    top = MultiService()
    updater = Updater(config, reactor)
    updater.setServiceParent(top)
    control_service(updater, reactor).setServiceParent(top)
    return top
