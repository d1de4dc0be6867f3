"""The admin log: the node's key events (an ``event`` name in ADMIN_EVENTS on the log call) and
every warning and error, as JSON lines, to journald if asked, and to whoever listens (the
service node's recent events; the connector's sender to its service)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from attrs import define, field
from twisted.logger import LogLevel, formatEvent

# The key events: a log call names one with event="..." to put an info line in the admin log.
ADMIN_EVENTS = frozenset({
    "node_started", "connector_started", "tunnel_up", "tunnel_lost", "enrolled", "certificate_renewed",
    "config_applied", "drain", "update", "session_log_switched", "refused", "access_refused",
    "access_revoked", "store_back", "nodes_changed",
})
# Context kept from the log event beside the text, for `gateway logs show` filters and journald.
CONTEXT = ("connector_id", "tunnel_id", "group", "app", "request_id", "user", "address", "node_id")
LEVEL_NAMES = {LogLevel.debug: "debug", LogLevel.info: "info", LogLevel.warn: "warn",
               LogLevel.error: "error", LogLevel.critical: "critical"}
MAX_TEXT = 4096
# The updater beside a connector writes its admin log next to the connector's (two processes
# rotating one file would lose lines), with this source; `gateway logs show` reads both.
UPDATER_SOURCE = "updater"


def updater_admin_log(admin_log: Path) -> Path:
    """Where the updater of the connector whose admin log is `admin_log` writes its own."""
    return admin_log.with_name(f"updater-{admin_log.name}")


def is_admin_event(event: dict[str, Any]) -> bool:
    level = event.get("log_level", LogLevel.info)
    return level >= LogLevel.warn or event.get("event") in ADMIN_EVENTS


def admin_record(event: dict[str, Any], source: str) -> dict[str, Any]:
    """The admin log's line for a twisted.logger event."""
    text = formatEvent(event) or str(event.get("log_format") or "")
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}: {failure.getErrorMessage()}" if text else failure.getErrorMessage()
    record = {"time": round(float(event.get("log_time", 0.0)), 3), "kind": "admin",
              "level": LEVEL_NAMES.get(event.get("log_level"), "info"), "source": source,
              "event": str(event.get("event") or ""), "text": text[:MAX_TEXT],
              "namespace": event.get("log_namespace", "")}
    for key in CONTEXT:
        value = event.get(key)
        if isinstance(value, (str, int, float)):
            record[key] = value
    return record


@define
class AdminLog:
    """A twisted.logger observer writing the admin events to a file, journald and listeners."""

    source: str
    file: Any = None        # a files.RotatingLog, or None when the admin turned it off
    journal: Any = None     # a journald.Journal, or None
    listeners: list[Callable[[dict[str, Any]], None]] = field(factory=list)
    _busy: bool = field(default=False, init=False)

    def __call__(self, event: dict[str, Any]) -> None:
        # A listener that logs must not loop back into the admin log.
        if self._busy or not is_admin_event(event):
            return
        self._busy = True
        try:
            self.write(admin_record(event, self.source))
        finally:
            self._busy = False

    def write(self, record: dict[str, Any], listeners: bool = True) -> None:
        if self.file is not None:
            self.file.write(record)
        if self.journal is not None:
            self.journal.send(record)
        if listeners:
            for listener in self.listeners:
                listener(record)
