"""The session log: one JSON line per transaction (a stream closed; an HTTP request answered).

Off by default. The service node's own is switched by its config (``[logging] session_log``);
a connector's by the service, per group or per connector (``gateway logs session on|off``), in
the config it pushes. One SessionLog per process (a process may run a node and a connector):
each role has its own switch, and a record of a role switched off costs one attribute read.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from attrs import define, field

from gateway.oplogs.files import MAX_RECORD, json_value

SERVICE = "service"
CONNECTOR = "connector"


@define
class SessionLog:
    file: Any                # a files.RotatingLog
    journal: Any = None      # a journald.Journal, or None
    clock: Any = None        # the reactor: seconds() stamps the records
    on: dict[str, bool] = field(factory=lambda: {SERVICE: False, CONNECTOR: False})

    def switch(self, role: str, on: bool) -> bool:
        """Turn ``role``'s records on or off; whether that changed anything."""
        changed = self.on.get(role) != on
        self.on[role] = on
        return changed

    def write(self, role: str, record: dict[str, Any]) -> None:
        if not self.on.get(role):
            return
        record = {"time": round(self.clock.seconds(), 3), "kind": "session", "role": role, **record}
        self.file.write(record)
        if self.journal is not None:
            self.journal.send({**record, "level": "info", "summary": summary(record)})

    def write_http(self, role: str, request_id: str, method: str, path: str, status: int, app: str,
                   more: dict[str, Any]) -> None:
        """An HTTP request's line: write() of the same record, made without building it as a dict first.

        Two of these per request on the HTTP path (front door and connector), where ``write``'s
        dicts and the general JSON encoder cost more than the rest of a request's logging."""
        if not self.on.get(role):
            return
        if self.journal is not None:
            self.write(role, http_record(request_id, method, path, status, app, more))
            return
        line = ('{"time":%.3f,"kind":"session","role":%s,"type":"http","request_id":%s,"app":%s,"method":%s,'
                '"path":%s,"status":%d,"result":"%d"%s}\n' % (
                    self.clock.seconds(), json_value(role), json_value(request_id), json_value(app),
                    json_value(method), json_value(path), status, status,
                    "".join([f",{json_value(k)}:{json_value(v)}" for k, v in more.items()]))).encode()
        if len(line) > MAX_RECORD:   # the general path cuts long fields
            self.write(role, http_record(request_id, method, path, status, app, more))
            return
        self.file.write_line(line)


def summary(record: dict[str, Any]) -> str:
    """A one-line text for journald and `gateway logs show`."""
    who = record.get("user") or "-"
    if record.get("type") == "http":
        return (f"{record.get('method')} {record.get('path')} app {record.get('app')} user {who}:"
                f" {record.get('status')} ({record.get('request_id')})")
    return (f"app {record.get('app')} user {who} to {record.get('destination')} via connector"
            f" {str(record.get('connector_id', ''))[:12]}: {record.get('bytes_up', 0)} bytes up,"
            f" {record.get('bytes_down', 0)} down, {record.get('duration', 0)}s, {record.get('result')}"
            f" ({record.get('request_id')})")


def stream_record(info: Any) -> dict[str, Any]:
    """A closed stream's line from its StreamInfo record."""
    return {
        "type": "stream", "request_id": info.request_id, "app": info.app, "protocol": info.protocol,
        "user": info.user, "client": info.client, "connector_id": info.connector_id,
        "tunnel_id": info.tunnel_id, "transport": info.transport, "destination": info.destination,
        "segment": info.segment, "bytes_up": info.bytes_up, "bytes_down": info.bytes_down,
        "duration": round(info.duration or 0.0, 3), "result": info.result, **({"facts": info.facts} if info.facts else {}),
    }


def url_path(target: bytes | str) -> str:
    """The path of a request target without its query: a query may carry secrets."""
    text = target.decode("latin-1") if isinstance(target, bytes) else target
    return (urlsplit(text).path if "://" in text else text.split("?", 1)[0])[:512]


# The process's session log (None until tap builds one): the http plugin's request lines go
# through http_request below without knowing how the log is set up.
current: SessionLog | None = None


def http_request(role: str, *, request_id: str, method: bytes | str, target: bytes | str, status: int,
                 app: str, **more: Any) -> None:
    """One HTTP request's line, if ``role``'s session log is on."""
    log = current
    if log is None or not log.on.get(role):
        return
    log.write_http(role, request_id, method.decode("latin-1") if isinstance(method, bytes) else method,
                   url_path(target), int(status), app, more)


def http_record(request_id: str, method: str, path: str, status: int, app: str, more: dict[str, Any]) -> dict[str, Any]:
    return {"type": "http", "request_id": request_id, "app": app, "method": method, "path": path,
            "status": status, "result": str(status), **more}


def switched_on(switches: dict[tuple[str, str], bool], connector_id: str, group: str) -> bool:
    """A connector's session log switch: its own, else its group's, else off."""
    own = switches.get(("connector", connector_id))
    return own if own is not None else switches.get(("group", group), False)
