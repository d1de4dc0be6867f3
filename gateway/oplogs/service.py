"""The process's operations logs as a Twisted service: built from ``[logging]`` by gateway.tap,
started before the node and the connector so their first key events are in the admin log."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred

from gateway.config import LoggingConfig
from gateway.oplogs import session as sessionlog
from gateway.oplogs.admin import AdminLog
from gateway.oplogs.files import RotatingLog
from gateway.oplogs.journald import Journal


class OpLogs(Service):
    """The admin log (an observer on ``publisher``), the session log and journald."""

    def __init__(self, config: LoggingConfig, reactor: Any, source: str, publisher: Any = None) -> None:
        self.publisher = publisher
        self.journal = Journal(config.journald_socket) if config.journald else None
        admin_file = RotatingLog(config.admin_log, config.max_bytes, config.max_files) if config.admin_log else None
        self.admin = AdminLog(source, admin_file, self.journal)
        # A line per request on the HTTP path: written out once per reactor turn, not per line.
        self.session = sessionlog.SessionLog(
            RotatingLog(config.session_log_file, config.max_bytes, config.max_files,
                        flush_soon=lambda flush: reactor.callLater(0, flush)), self.journal, reactor)
        self.session.switch(sessionlog.SERVICE, config.session_log)

    def startService(self) -> None:
        super().startService()
        sessionlog.current = self.session
        if self.publisher is not None:
            self.publisher.addObserver(self.admin)

    def stopService(self) -> None:
        super().stopService()
        if self.publisher is not None:
            self.publisher.removeObserver(self.admin)
        if sessionlog.current is self.session:
            sessionlog.current = None
        for log in (self.admin.file, self.session.file):
            if log is not None:
                log.close()
        if self.journal is not None:
            self.journal.close()

    def admin_record(self, source: str, level: str, text: str, time: float, event: str = "") -> None:
        """A line in the admin log from elsewhere (a connector's event, on its service)."""
        self.admin.write({"time": round(time, 3), "kind": "admin", "level": level, "source": source,
                          "event": event, "text": text}, listeners=False)

    def reconfigure(self, config: LoggingConfig) -> None:
        """SIGHUP: the service node's own session log switch (files and journald stay as started)."""
        self.session.switch(sessionlog.SERVICE, config.session_log)


class LoggedServices(MultiService):
    """The process's top service: its logs start before the roles and stop only once every role
    has stopped, so a connector's drain and its tunnels' end are still in the admin log."""

    def __init__(self, oplogs: OpLogs) -> None:
        super().__init__()
        self.oplogs = oplogs

    def startService(self) -> None:
        self.oplogs.startService()
        super().startService()

    def stopService(self) -> Deferred:
        d = maybeDeferred(super().stopService)
        return d.addBoth(self._stop_logs)

    def _stop_logs(self, result: Any) -> Any:
        self.oplogs.stopService()
        return result
