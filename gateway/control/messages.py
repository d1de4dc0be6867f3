"""Control-channel messages: length-prefixed JSON objects with a `type` (docs/protocol.md)."""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

from gateway import boundedjson

MAX_MESSAGE = 1024 * 1024

HELLO = "hello"
WELCOME = "welcome"
ERROR = "error"
CONFIG_REQUEST = "config_request"
CONFIG = "config"
HEARTBEAT = "heartbeat"
ENROL_REQUEST = "enrol_request"
ENROL_RESULT = "enrol_result"
RENEW_REQUEST = "renew_request"
RENEW_RESULT = "renew_result"
SESSION_FACTS = "session_facts"
ADMIN_EVENT = "admin_event"

CAPABILITIES = ("tcp", "go_away_drain", "config_push", "window_autotune")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


def decode(data: bytes) -> dict[str, Any]:
    try:
        value = boundedjson.loads(data)
    except boundedjson.TooDeep as e:
        raise ValueError(f"control message {e}") from None
    except ValueError as e:
        raise ValueError(f"control message is not JSON: {e}") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError("control message is not a JSON object with a string 'type'")
    return value


class ControlChannel(Int32StringReceiver):
    """One end of the control stream. `on_message(msg)` gets each decoded message."""

    MAX_LENGTH = MAX_MESSAGE
    log = Logger()

    def __init__(self, on_message: Callable[[dict[str, Any]], None],
                 on_lost: Callable[[Any], None] | None = None) -> None:
        self.on_message = on_message
        self.on_lost = on_lost

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and not getattr(self.transport, "closed", False):
            self.sendString(encode(message))

    def stringReceived(self, data: bytes) -> None:
        try:
            message = decode(data)
        except ValueError as e:
            self.log.error("control channel: {error}; closing it", error=str(e))
            self.transport.loseConnection()
            return
        self.on_message(message)

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.error("control message of {length} bytes exceeds {limit}; closing", length=length,
                       limit=self.MAX_LENGTH)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.on_lost is not None:
            self.on_lost(reason)
