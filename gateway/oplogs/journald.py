"""journald's native protocol: one datagram of fields to /run/systemd/journal/socket.

No dependency: the format (systemd.io/JOURNAL_NATIVE_PROTOCOL) is ``KEY=value\\n`` per field,
or, for a value holding a newline, ``KEY\\n`` + its length as 64-bit little endian + value + ``\\n``.
"""

from __future__ import annotations

import re
import socket
import struct
from typing import Any

from attrs import define, field

DEFAULT_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "gateway"
# syslog priorities, as journalctl -p reads them
PRIORITY = {"debug": 7, "info": 6, "warn": 4, "error": 3, "critical": 2}
# Field names journald accepts: upper case letters, digits and underscores, not starting with _.
_BAD_NAME = re.compile(r"[^A-Z0-9_]")
# Records are bounded (files.MAX_RECORD); this keeps a datagram well inside the socket's limit.
MAX_VALUE = 16 * 1024


def field_name(key: str) -> str:
    name = _BAD_NAME.sub("_", key.upper()).lstrip("_")
    return name[:64] or "FIELD"


def encode(fields: dict[str, Any]) -> bytes:
    """One native-protocol datagram for ``fields`` (names normalised, values as text)."""
    out = bytearray()
    for key, value in fields.items():
        if value is None:
            continue
        name = field_name(key).encode()
        data = str(value).encode("utf-8", "replace")[:MAX_VALUE]
        if b"\n" in data:
            out += name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out)


def journal_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A log record as journal fields: MESSAGE, PRIORITY, the identifier, the rest as GATEWAY_*."""
    fields = {"MESSAGE": record.get("text") or record.get("summary") or "",
              "PRIORITY": PRIORITY.get(record.get("level", "info"), 6),
              "SYSLOG_IDENTIFIER": IDENTIFIER}
    for key, value in record.items():
        if key not in ("text", "summary", "level", "time") and isinstance(value, (str, int, float, bool)):
            fields[f"GATEWAY_{field_name(key)}"] = value
    return fields


@define
class Journal:
    """Sends records to journald; never blocks the reactor and never raises (a journal that is
    gone or full costs the journal copy only; the log files still have it)."""

    path: str = DEFAULT_SOCKET
    dropped: int = 0
    _socket: socket.socket | None = field(default=None, init=False, repr=False)

    def send(self, record: dict[str, Any]) -> None:
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(encode(journal_fields(record)), self.path)
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
